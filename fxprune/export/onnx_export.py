"""``to_onnx``: export a (pruned) model with the torch.export-based ONNX exporter, embed the
sparsity report, validate the file, and time it in onnxruntime."""
from __future__ import annotations

import os
from pathlib import Path

import onnx
import torch

import fxprune
from fxprune.errors import FxPruneError
from fxprune.inputs import eval_mode
from fxprune.staging import staged_file

from .errors import ExportError, ValidationError
from .metadata import REPORT_KEY, VERSION_KEY
from .results import ExportResult, format_checks
from .validate import ort_latency, run_torch, split_inputs, validate_onnx


def _output_path(path) -> Path:
    """``path`` as a Path whose directory exists and is writable, or a clear error."""
    if not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"path must be a file path such as 'model.onnx', "
                          f"got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a directory; pass a file path such as {path / 'model.onnx'}")
    folder = path.parent.resolve()
    if not folder.is_dir():
        raise ExportError(f"cannot write {path}: directory {folder} does not exist; "
                          "create it first (mkdir -p) or choose another path")
    if not os.access(folder, os.W_OK):
        raise ExportError(f"cannot write {path}: directory {folder} is not writable; "
                          "choose a writable location")
    return path


def _default_report(model):
    """The model's sparsity report, or None when it was not made by fxprune."""
    try:
        return fxprune.sparsity_report(model)
    except FxPruneError:
        return None


def _data_path(path: Path) -> Path | None:
    """The external-data file the saved model refers to, or None when weights are inline."""
    proto = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for t in proto.graph.initializer
                 if t.data_location == onnx.TensorProto.EXTERNAL
                 for entry in t.external_data if entry.key == "location"}
    return path.parent / sorted(locations)[0] if locations else None


def to_onnx(model: torch.nn.Module, example_inputs, path, *, dynamic_shapes=None, opset=None,
            validate: bool = True, rtol: float = 1e-3, atol: float = 1e-5, report=None,
            external_data: bool | None = None, latency_runs: int = 20) -> ExportResult:
    """Export ``model`` to the ONNX file ``path`` and validate it.

    - ``example_inputs``: a tensor, a tuple of positional arguments or a dict of keyword
      arguments for ``model.forward``.
    - ``dynamic_shapes``: passed to ``torch.onnx.export`` (e.g. ``({0: "batch"},)``).
    - ``opset``: ONNX opset version; None lets the exporter choose.
    - ``report``: the ``SparsityReport`` to embed; None means ``fxprune.sparsity_report(model)``
      when the model has one, else no report is embedded (``fxprune.version`` always is).
    - ``external_data``: None stores weights in ``<path>.data`` only above 2 GB; True always.
    - ``validate``: run the checks of ``validate_onnx`` and raise ``ValidationError`` with the
      table of checks if one fails (the file stays on disk); then time ``latency_runs`` ORT runs.
      ``validate=False`` skips both.

    The model is exported and compared in eval mode; its mode is restored afterwards.
    """
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = _output_path(path)
    args, kwargs = split_inputs(example_inputs)
    if report is None:
        report = _default_report(model)

    with eval_mode(model):
        run_torch(model, args, kwargs)  # wrong example_inputs fail here, with a clear message
        try:
            program = torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True,
                                        dynamic_shapes=dynamic_shapes, opset_version=opset,
                                        verbose=False)
        except Exception as e:
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise ExportError(f"torch.onnx.export could not export {type(model).__name__} to "
                              f"{path} ({type(e).__name__}: {first_line}); the model must be "
                              "capturable by torch.export.export(strict=False) with these "
                              "example_inputs and dynamic_shapes") from e
        program.model.metadata_props[VERSION_KEY] = fxprune.__version__
        if report is not None:
            program.model.metadata_props[REPORT_KEY] = report.to_json()
        try:
            with staged_file(path) as staged:   # the file (and its .data) whole or not at all
                program.save(str(staged), external_data=external_data)
        except OSError as e:
            # strerror, not str(e): its file name would be the staging path, not the user's
            raise ExportError(f"could not write {path}: {e.strerror or e}") from e

        data_path = _data_path(path)
        size = path.stat().st_size + (data_path.stat().st_size if data_path else 0)
        result = ExportResult(path=path, data_path=data_path, size=size,
                              opset=program.model.opset_imports.get("", 0), report=report)
        if not validate:
            return result
        result.checks = validate_onnx(path, model, example_inputs, report=report,
                                      rtol=rtol, atol=atol)
    if not result.passed:
        failed = [c for c in result.checks if not c.passed]
        raise ValidationError(f"{path} failed {len(failed)} of {len(result.checks)} validation "
                              f"checks (the file is kept for inspection):\n"
                              f"{format_checks(result.checks)}", result.checks, result)
    if latency_runs > 0:
        result.latency_ms = ort_latency(path, example_inputs, runs=latency_runs)
        result.latency_runs = latency_runs
    return result
