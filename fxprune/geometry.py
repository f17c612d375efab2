"""The 2-D view every weight is ranked on (docs/design.md, "The 2-D view"), and back.

- Linear ``[out, in]``: as is.  HF ``Conv1D`` / ``x @ W`` weights (``[in, out]``): transposed.
- ConvNd ``[Cout, Cin/groups, *k]`` -> ``permute(0, 2, ..., 1)`` -> ``[Cout, prod(k) * Cin/groups]``:
  input channels are the innermost column index (INC's layout).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class WeightGeometry:
    layout: str                     # "out_in" (Linear), "in_out" (Conv1D, x @ W) or "conv"
    weight_shape: tuple[int, ...]
    groups: int = 1                 # convolution groups

    @property
    def kind(self) -> str:
        return "conv" if self.layout == "conv" else "linear"

    @property
    def out_channels(self) -> int:
        return self.weight_shape[1] if self.layout == "in_out" else self.weight_shape[0]

    @property
    def in_channels_per_group(self) -> int:
        return self.weight_shape[0] if self.layout == "in_out" else self.weight_shape[1]

    @property
    def in_channels(self) -> int:
        return self.in_channels_per_group * self.groups

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.weight_shape[2:]) if self.layout == "conv" else 1

    @property
    def view_shape(self) -> tuple[int, int]:
        return (self.out_channels, self.kernel_numel * self.in_channels_per_group)

    @property
    def numel(self) -> int:
        return math.prod(self.weight_shape)


def to_view_2d(weight: Tensor, geom: WeightGeometry) -> Tensor:
    """The ``[rows, cols]`` view of ``weight`` (a copy only where a permute needs one)."""
    if geom.layout == "out_in":
        return weight
    if geom.layout == "in_out":
        return weight.t()
    dims = (0, *range(2, weight.dim()), 1)
    return weight.permute(dims).reshape(geom.view_shape)


def view_rows(weight: Tensor, geom: WeightGeometry, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of :func:`to_view_2d` (the same values), copying only those rows."""
    if geom.layout == "out_in":
        return weight[start:stop]
    if geom.layout == "in_out":
        return weight[:, start:stop].t()
    part = weight[start:stop]
    rows = WeightGeometry(geom.layout, tuple(part.shape), geom.groups)
    return to_view_2d(part, rows)


def from_view_2d(view: Tensor, geom: WeightGeometry) -> Tensor:
    """Inverse of :func:`to_view_2d`: a tensor shaped like the weight."""
    if geom.layout == "out_in":
        return view
    if geom.layout == "in_out":
        return view.t()
    shape = geom.weight_shape
    permuted = view.reshape(shape[0], *shape[2:], shape[1])
    nd = len(shape)
    return permuted.permute(0, nd - 1, *range(1, nd - 1))
