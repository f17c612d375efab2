"""Export a pruned model to ONNX and check the file is deployable.

    from fxprune.export import to_onnx, read_report
    result = to_onnx(pruned, (x,), "model.onnx")   # raises ValidationError if a check fails
    print(result)                                  # files, size, check table, ORT latency
    read_report("model.onnx")                      # the embedded SparsityReport

Modules: ``onnx_export`` (to_onnx), ``validate`` (validate_onnx, ort_latency), ``sparsity``
(sparsity survival: finding pruned weights in the ONNX graph), ``metadata`` (read_report,
read_metadata), ``results`` (Check, ExportResult), ``errors``.
"""
from .errors import ExportError, ValidationError
from .metadata import read_metadata, read_report
from .onnx_export import to_onnx
from .results import Check, ExportResult, format_checks
from .validate import ort_latency, validate_onnx

__all__ = ["to_onnx", "read_report", "read_metadata", "validate_onnx", "ort_latency",
           "ExportResult", "Check", "format_checks", "ExportError", "ValidationError"]
