"""Checks of the weights fxprune is about to rank, run on every selected layer before any
criterion looks at one (so an error names the layer at fault, not a later symptom elsewhere)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from .aten import ModuleLookup
from .errors import WeightError

RANKABLE = "real floating point (float32, float16, bfloat16, float64)"


def check_weight(t, weight: Tensor) -> None:
    """A ``WeightError`` naming target ``t`` when its weight has no values (meta), a dtype whose
    ``|w|`` does not rank (complex, integer, bool), or NaN/inf entries."""
    if weight.is_meta:
        raise WeightError(f"layer {t.name} ({t.param}) is on the meta device and has no values "
                          f"to prune; load the weights first (e.g. model.to_empty(device='cpu') "
                          f"then load_state_dict)")
    if weight.is_complex() or not weight.is_floating_point():
        why = " (|w| of a complex weight drops its imaginary part)" if weight.is_complex() else ""
        raise WeightError(f"layer {t.name} ({t.param}) has dtype {str(weight.dtype).removeprefix('torch.')}; "
                          f"fxprune ranks {RANKABLE} weights only{why}; exclude the layer with "
                          f"excluded_op_names or convert the weight")
    bad = nonfinite_count(weight)
    if bad:
        raise WeightError(f"layer {t.name} ({t.param}) has {bad} NaN/inf weight values; "
                          f"fix or re-initialise the weights before pruning")


def check_weights(model: nn.Module, targets: Iterable, lookup: ModuleLookup | None = None) -> None:
    """:func:`check_weight` for every target, in graph order (``lookup``: a ModuleLookup of ``model``)."""
    lookup = ModuleLookup(model) if lookup is None else lookup
    for t in targets:
        check_weight(t, lookup.parameter(t.param).detach())


def all_finite(x: Tensor) -> bool:
    """Whether every entry of the float tensor ``x`` is finite. On the CPU one reduction
    (``torch.aminmax``, which propagates NaN) without ``isfinite``'s bool tensor of ``x``'s size,
    about 20x faster for a weight matrix; elsewhere ``isfinite`` (min/max NaN handling is not
    relied on outside the CPU kernels tested here)."""
    if x.numel() == 0:
        return True
    if x.device.type != "cpu" or not x.is_floating_point():
        return bool(torch.isfinite(x).all())
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def nonfinite_count(x: Tensor) -> int:
    """How many entries of ``x`` are NaN or inf (0 for non-float tensors)."""
    if not (x.is_floating_point() or x.is_complex()) or x.is_meta or x.numel() == 0:
        return 0
    # A finite sum means finite entries (one cheap pass); a non-finite one may be an overflow.
    if x.is_floating_point() and bool(torch.isfinite(x.sum(dtype=torch.float32))):
        return 0
    return int((~torch.isfinite(x)).sum())


def nonfinite_tensors(model: nn.Module, limit: int = 3) -> list[str]:
    """Names of the model's parameters and buffers holding NaN/inf (at most ``limit``), to say
    where a NaN seen in an activation comes from."""
    found = []
    for name, x in [*model.named_parameters(), *model.named_buffers()]:
        n = nonfinite_count(x.detach())
        if n:
            found.append(f"{name} ({n} NaN/inf)")
            if len(found) == limit:
                break
    return found


def nonfinite_input_message(model: nn.Module, layer: str, where: str) -> str:
    """Why the input of ``layer`` holds NaN/inf: the parameters or buffers that do, if any."""
    sources = nonfinite_tensors(model)
    cause = (f"the model's {', '.join(sources)} hold NaN/inf" if sources else
             "no parameter or buffer holds NaN/inf, so the inputs do, or the forward overflows "
             "before it (check the batches' values and the model's dtype)")
    return f"the input of layer {layer} holds NaN/inf on {where}: {cause}"
