"""The fxprune entries of an ONNX model's ``metadata_props``: ``fxprune.report`` (the sparsity
report as JSON) and ``fxprune.version``. onnxruntime shows the same entries in
``InferenceSession(path).get_modelmeta().custom_metadata_map``."""
from __future__ import annotations

import json
from pathlib import Path

import onnx

from .errors import ExportError

REPORT_KEY = "fxprune.report"
VERSION_KEY = "fxprune.version"


def read_metadata(path) -> dict[str, str]:
    """The ONNX model's ``metadata_props`` as a dict (external data is not loaded)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ExportError(f"{path} is not an ONNX model ({type(e).__name__}: {e}); pass the "
                          ".onnx file written by fxprune.export.to_onnx, not its .data file") from e
    return {p.key: p.value for p in proto.metadata_props}


def report_from_metadata(metadata: dict[str, str]):
    """The ``SparsityReport`` in ``metadata``, or None."""
    from fxprune.report import SparsityReport

    text = metadata.get(REPORT_KEY)
    return None if text is None else SparsityReport.from_dict(json.loads(text))


def read_report(path):
    """The ``SparsityReport`` embedded in an ONNX file written by ``to_onnx``."""
    report = report_from_metadata(read_metadata(path))
    if report is None:
        raise ExportError(f"{path} has no '{REPORT_KEY}' metadata: it was not written by "
                          "fxprune.export.to_onnx, or was exported without a sparsity report")
    return report
