"""Sparsity metadata (docs/design.md, "Metadata"): one record per prunable target, totals, config and versions.

Reach it from a pruned model with :func:`fxprune.sparsity_report`; it serializes to JSON and is
embedded in exported ONNX models.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import FxPruneError, ReportError
from .staging import staged_file

REPORT_ATTR = "_fxprune_report"

# Entries compared at a time by count_zeros: bounds its bool temporary (1 MiB) on a large weight.
ZERO_COUNT_PIECE = 1 << 20


def count_zeros(tensor: torch.Tensor) -> int:
    """The zero entries of ``tensor`` (``-0.0`` counts), the count every report holds.

    The comparison goes in pieces of whole rows (dim 0), as many as fit in ``ZERO_COUNT_PIECE``
    entries (one row when a row is longer), so a large weight never needs a same-sized
    temporary. On the CPU, numpy compares and counts (its loops are vectorised: 3-8x faster than
    torch's with one thread, whatever the pattern of zeros); elsewhere, or for a dtype numpy
    lacks or compares slowly (bfloat16, float16), ``count_nonzero(t == 0)`` (several times
    faster than ``count_nonzero(t)`` on a float tensor with scattered zeros, or
    ``(t == 0).sum()``), the pieces' counts added on the tensor's device and read once (one
    synchronisation on a GPU)."""
    whole = tensor.dim() == 0 or tensor.numel() <= ZERO_COUNT_PIECE
    rows = 0 if whole else max(1, ZERO_COUNT_PIECE // (tensor.numel() // tensor.shape[0]))
    array = _numpy_view(tensor)
    if array is not None:
        pieces = [array] if whole else [array[i:i + rows] for i in range(0, array.shape[0], rows)]
        return sum(int(np.count_nonzero(piece == 0)) for piece in pieces)
    pieces = [tensor] if whole else tensor.split(rows)
    return int(sum(torch.count_nonzero(piece == 0) for piece in pieces))


# float16 is left to torch: numpy compares it in software, 5x slower than torch
_NUMPY_DTYPES = frozenset({torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64,
                           torch.uint8, torch.bool, torch.complex64, torch.complex128})


def _numpy_view(tensor: torch.Tensor) -> np.ndarray | None:
    """``tensor``'s values as a numpy array without a copy, or None (another device, a dtype
    numpy lacks, a tensor subclass or a lazy conjugate/negation numpy cannot view)."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.device.type != "cpu" \
            or tensor.dtype not in _NUMPY_DTYPES:
        return None
    try:
        return tensor.detach().numpy()
    except (RuntimeError, TypeError):
        return None


@dataclass
class LayerReport:
    name: str                   # module FQN ("encoder.layer.0.output.dense")
    param: str                  # parameter FQN ("encoder.layer.0.output.dense.weight")
    module_type: str
    weight_shape: list[int]
    view_shape: list[int]
    pattern: str | None
    block_shape: str | None
    scope: str | None
    criterion: str | None
    requested_sparsity: float
    achieved_sparsity: float    # zeros / numel, counted from the rewritten weight
    numel: int
    zeros: int
    status: str                 # "pruned", "skipped: <reason>" or "excluded: <reason>"
    group: int | None = None
    aliases: list[str] = field(default_factory=list)  # other module names of a tied weight

    @property
    def pruned(self) -> bool:
        return self.status == "pruned"


@dataclass
class SparsityReport:
    layers: list[LayerReport]
    config: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    capture: str = ""
    # compact=True: params/FLOPs before and after, channel groups removed or blocked (and why),
    # and the new weight shapes; the layer records above describe the masks (before slicing)
    compaction: dict | None = None
    # data-aware criteria: how they were calibrated (block-sequential or whole-model, and why;
    # block count, block batches, block forwards, spilled hidden states)
    calibration: dict | None = None

    # ------------------------------------------------------------------ totals
    @property
    def pruned_layers(self) -> list[LayerReport]:
        return [r for r in self.layers if r.pruned]

    @property
    def sparsity(self) -> float:
        """Zeros / weights over the pruned layers."""
        numel = sum(r.numel for r in self.pruned_layers)
        return sum(r.zeros for r in self.pruned_layers) / numel if numel else 0.0

    @property
    def overall_sparsity(self) -> float:
        """Zeros / weights over every prunable weight the capture found (pruned or not)."""
        numel = sum(r.numel for r in self.layers)
        return sum(r.zeros for r in self.layers) / numel if numel else 0.0

    def totals(self) -> dict[str, Any]:
        return {
            "layers": len(self.layers),
            "pruned_layers": len(self.pruned_layers),
            "skipped_layers": sum(r.status.startswith("skipped") for r in self.layers),
            "excluded_layers": sum(r.status.startswith("excluded") for r in self.layers),
            "pruned_weights": sum(r.numel for r in self.pruned_layers),
            "zeros": sum(r.zeros for r in self.pruned_layers),
            "sparsity": self.sparsity,
            "prunable_weights": sum(r.numel for r in self.layers),
            "overall_sparsity": self.overall_sparsity,
        }

    def weight_zeros(self, param: str) -> int:
        """Zeros the model's weight ``param`` holds now: the recorded zeros, or, for a weight that
        compaction sliced, the zeros left in the smaller weight (pruned channels are gone)."""
        sliced = (self.compaction or {}).get("layers", {}).get(param)
        return sliced["zeros_after"] if sliced is not None else self.layer(param).zeros

    def layer(self, name: str) -> LayerReport:
        for r in self.layers:
            if name in (r.name, r.param) or name in r.aliases:
                return r
        raise KeyError(f"no layer {name!r} in the report; layers: {[r.name for r in self.layers][:20]}")

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        d = {"layers": [asdict(r) for r in self.layers], "totals": self.totals(),
             "config": self.config, "versions": self.versions, "capture": self.capture}
        if self.compaction is not None:
            d["compaction"] = self.compaction
        if self.calibration is not None:
            d["calibration"] = self.calibration
        return d

    def to_json(self, path: str | Path | None = None, indent: int | None = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            try:
                with staged_file(path) as staged:   # whole or not at all
                    staged.write_text(text + "\n")
            except OSError as e:
                raise FxPruneError(f"cannot write the report to {str(path)!r}: {e.strerror or e}") from e
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "SparsityReport":
        """From :meth:`to_dict`'s form; :class:`~fxprune.ReportError` names the first field that
        is missing or of the wrong type (a report read back from a file may be corrupt)."""
        if not isinstance(d, dict):
            raise ReportError(f"a sparsity report is a JSON object, got {type(d).__name__}")
        layers = d.get("layers", [])
        if not isinstance(layers, list):
            raise ReportError(f"'layers' must be a list of layer records, got {type(layers).__name__}")
        records = [_layer_from_dict(i, r) for i, r in enumerate(layers)]
        for key, kind in (("config", dict), ("versions", dict), ("capture", str)):
            if key in d and not isinstance(d[key], kind):
                raise ReportError(f"{key!r} must be a {_KIND_NAMES[kind]}, got {type(d[key]).__name__}")
        for key in ("compaction", "calibration"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ReportError(f"{key!r} must be an object or null, got {type(d[key]).__name__}")
        return cls(records, d.get("config", {}), d.get("versions", {}), d.get("capture", ""),
                   d.get("compaction"), d.get("calibration"))

    @classmethod
    def from_json(cls, source: str | Path) -> "SparsityReport":
        """From a JSON file path or a JSON string."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            p = Path(source)
            if not p.is_file():
                raise FxPruneError(f"report file {str(p)!r} does not exist")
            text = p.read_text()
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, ReportError) as e:
            raise ReportError(f"not a valid fxprune sparsity report: {e}") from None

    # ------------------------------------------------------------------ display
    def __str__(self) -> str:
        head = ("layer", "type", "shape", "pattern", "target", "sparsity", "status")
        rows = [(r.name, r.module_type, "x".join(map(str, r.weight_shape)), r.pattern or "-",
                 f"{r.requested_sparsity:.3f}" if r.pruned else "-", f"{r.achieved_sparsity:.3f}",
                 r.status) for r in self.layers]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
        t = self.totals()
        out = [line(head), line(["-" * w for w in widths]), *map(line, rows), "",
               f"pruned {t['pruned_layers']}/{t['layers']} layers "
               f"({t['skipped_layers']} skipped, {t['excluded_layers']} excluded); "
               f"sparsity {t['sparsity']:.4f} over {t['pruned_weights']:,} pruned-layer weights, "
               f"{t['overall_sparsity']:.4f} over all {t['prunable_weights']:,} prunable weights"]
        c = self.compaction
        if c is not None:
            blocked = sum(g["blocked_units"] for g in c["groups"])
            flops = (f", FLOPs {c['flops_before']:,} -> {c['flops_after']:,}"
                     if c.get("flops_before") is not None else "")
            out.append(f"compacted: params {c['params_before']:,} -> {c['params_after']:,}{flops}; "
                       f"{sum(g['removed'] for g in c['groups'])} channel units removed, "
                       f"{blocked} blocked")
        return "\n".join(out)

    def __repr__(self) -> str:
        t = self.totals()
        return (f"SparsityReport({t['pruned_layers']}/{t['layers']} layers pruned, "
                f"sparsity={t['sparsity']:.4f})")


_KIND_NAMES = {dict: "JSON object", str: "string", list: "list", int: "integer", float: "number"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# What each LayerReport field holds in JSON: (check, expected form for the message).
_LAYER_FIELDS = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "param": (lambda v: isinstance(v, str), "a string"),
    "module_type": (lambda v: isinstance(v, str), "a string"),
    "weight_shape": (lambda v: isinstance(v, list) and all(map(_is_int, v)), "a list of integers"),
    "view_shape": (lambda v: isinstance(v, list) and all(map(_is_int, v)), "a list of integers"),
    "pattern": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "block_shape": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "scope": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "criterion": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "requested_sparsity": (_is_number, "a number"),
    "achieved_sparsity": (_is_number, "a number"),
    "numel": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "zeros": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "status": (lambda v: isinstance(v, str), "a string"),
    "group": (lambda v: v is None or _is_int(v), "an integer or null"),
    "aliases": (lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v), "a list of strings"),
}


def _layer_from_dict(i: int, r) -> LayerReport:
    if not isinstance(r, dict):
        raise ReportError(f"layers[{i}] must be an object, got {type(r).__name__}")
    optional = {f.name for f in fields(LayerReport) if f.default is not MISSING
                or f.default_factory is not MISSING}
    for name, (ok, form) in _LAYER_FIELDS.items():
        if name not in r:
            if name in optional:
                continue
            raise ReportError(f"layers[{i}] has no field {name!r}")
        if not ok(r[name]):
            raise ReportError(f"layers[{i}].{name} must be {form}, got {r[name]!r:.60}")
    return LayerReport(**{k: v for k, v in r.items() if k in _LAYER_FIELDS})


def attach_report(model: nn.Module, report: SparsityReport) -> None:
    # A plain attribute: survives deepcopy and pickling, invisible to state_dict.
    object.__setattr__(model, REPORT_ATTR, report)


def sparsity_report(model: nn.Module) -> SparsityReport:
    """The sparsity report of a model returned by :func:`fxprune.transform`."""
    report = getattr(model, REPORT_ATTR, None)
    if report is None:
        raise FxPruneError(f"{type(model).__name__} carries no fxprune report; pass the model "
                           f"returned by fxprune.transform(...)")
    return report
