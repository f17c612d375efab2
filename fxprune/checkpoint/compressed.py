"""``format="compressed-tensors"``: the pruned checkpoint marked sparse the way vLLM reads it.

``config.json`` gets a ``quantization_config`` with ``quant_method: compressed-tensors`` and a
``sparsity_config`` built and validated by the ``compressed-tensors`` package
(``SparsityCompressionConfig``): the sparsity structure (``2:4`` when every pruned layer is
exactly 2:4, else ``unstructured``), the layers it covers (``targets: [Linear]`` minus ``ignore``:
the linear layers left dense, e.g. ``lm_head``) and the global sparsity.

The weights are stored dense (``format: dense``, zeros in place), the layout llm-compressor uses
for sparse-only models. The compressed storage formats (``sparse-24-bitmask``, ``sparse-bitmask``)
need compressors that compressed-tensors removed in the releases that support current torch
(0.17 and later), and ``transformers`` could not load them back; so they are not written.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..report import SparsityReport
from .shards import CheckpointError

EXTRA = "pip install 'fxprune[compressed-tensors]'"


def check_available(hf_config) -> None:
    """Before anything is written: the package is there and the model is not quantized already."""
    try:
        import compressed_tensors  # noqa: F401
        from compressed_tensors.config import SparsityCompressionConfig  # noqa: F401
    except ImportError as e:
        raise CheckpointError(f"format 'compressed-tensors' needs the compressed-tensors package "
                              f"({e}); {EXTRA}") from None
    quantized = getattr(hf_config, "quantization_config", None)
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else type(quantized).__name__
        raise CheckpointError(f"config.json already has a quantization_config ({method}); fxprune "
                              f"writes compressed-tensors sparsity metadata for unquantized models only")


def sparsity_config(report: SparsityReport) -> dict:
    """The ``sparsity_config`` of ``report``'s pruned model, as compressed-tensors validates it."""
    from compressed_tensors.config import SparsityCompressionConfig

    pruned = report.pruned_layers
    two_four = bool(pruned) and all(r.pattern == "2:4" and r.zeros * 2 >= r.numel and
                                    r.requested_sparsity == 0.5 for r in pruned)
    linear_dense = sorted({r.name for r in report.layers if not r.pruned and
                           r.module_type in ("Linear", "Conv1D")})
    config = SparsityCompressionConfig.load_from_registry(
        "dense", targets=["Linear"], ignore=linear_dense,
        global_sparsity=round(report.sparsity, 6),
        sparsity_structure="2:4" if two_four else "unstructured")
    return config.model_dump()


def compress_directory(directory: Path, report: SparsityReport, shards) -> None:
    """Write the ``quantization_config`` (with the ``sparsity_config``) into ``directory``'s config.json."""
    import compressed_tensors

    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "sparsity_config": sparsity_config(report),
        "version": compressed_tensors.__version__,
    }
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
