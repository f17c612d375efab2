"""The fxprune entries of an ONNX model's ``metadata_props``: ``fxprune.report`` (the sparsity
report as JSON) and ``fxprune.version``. onnxruntime shows the same entries in
``InferenceSession(path).get_modelmeta().custom_metadata_map``."""
from __future__ import annotations

import json
import os
from pathlib import Path

import onnx

from .errors import ExportError

REPORT_KEY = "fxprune.report"
VERSION_KEY = "fxprune.version"


def read_metadata(path) -> dict[str, str]:
    """The ONNX model's ``metadata_props`` as a dict (external data is not loaded)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"path must be the path of an .onnx file, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ExportError(f"{path} is not an ONNX model ({type(e).__name__}: {e}); pass the "
                          ".onnx file written by fxprune.export.to_onnx, not its .data file") from e
    return {p.key: p.value for p in proto.metadata_props}


def report_from_metadata(metadata: dict[str, str], source="the ONNX model"):
    """The ``SparsityReport`` in ``metadata``, or None; a ``ReportError`` naming ``source`` and
    the bad field when the entry is not a valid report."""
    from fxprune.errors import ReportError
    from fxprune.report import SparsityReport

    text = metadata.get(REPORT_KEY)
    if text is None:
        return None
    try:
        return SparsityReport.from_dict(json.loads(text))
    except (json.JSONDecodeError, ReportError) as e:
        raise ReportError(f"{source}: metadata {REPORT_KEY!r} is not a valid fxprune sparsity report "
                          f"({e}); re-export the model with fxprune.export.to_onnx, or remove the "
                          f"entry") from None


def read_report(path):
    """The ``SparsityReport`` embedded in an ONNX file written by ``to_onnx``."""
    report = report_from_metadata(read_metadata(path), path)
    if report is None:
        raise ExportError(f"{path} has no '{REPORT_KEY}' metadata: it was not written by "
                          "fxprune.export.to_onnx, or was exported without a sparsity report")
    return report
