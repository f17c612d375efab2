"""The input features a weight's 2-D view multiplies, from one recorded call.

The 2-D view is ``[rows, cols]`` (docs/design.md, "The 2-D view"). A linear layer's columns are its input features, so
a call's input ``[..., in]`` is ``[P, in]`` rows of features. A convolution's columns are
``kernel position x input channel`` (kernel-major, channel-minor, per group), so its features are
the input patches the kernel sees, unfolded in that same order: ``[P, groups, k * Cin/groups]``,
with ``patches[:, g] @ view[g-th block of rows].T`` equal to the convolution's output.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

from ..errors import FxPruneError
from ..geometry import WeightGeometry

MAX_PATCH_ELEMENTS = 1 << 24   # unfold conv inputs a few samples at a time above this size


def linear_features(x: Tensor, geom: WeightGeometry, name: str) -> Tensor:
    """``[P, in]`` float32 rows of input features of a linear-kind call."""
    cols = geom.view_shape[1]
    if x.shape[-1] != cols:
        raise FxPruneError(f"layer {name}: a call used its weight on an input of shape "
                           f"{tuple(x.shape)}, expected the last dim {cols}")
    return x.reshape(-1, cols).float()


def conv_input(x: Tensor, geom: WeightGeometry) -> Tensor:
    """The conv input with a batch dim (``F.convNd`` also takes unbatched inputs)."""
    spatial = len(geom.weight_shape) - 2
    return x.unsqueeze(0) if x.dim() == spatial + 1 else x


def conv_patches(x: Tensor, geom: WeightGeometry, stride, padding, dilation, groups: int) -> Tensor:
    """``[N * L, groups, K * Cin/groups]`` float32 patches of a batched conv input ``x``.

    Columns are kernel-major, channel-minor (the view's order); padding is applied as zeros, as
    the convolution does (``'same'`` pads the extra element on the right, like PyTorch).
    """
    kernel = tuple(geom.weight_shape[2:])
    nd = len(kernel)
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    pads = _pads(padding, kernel, dilation, nd)
    flat = [p for lr in reversed(pads) for p in lr]   # F.pad wants the last dim first
    x = x.float()
    if any(flat):
        x = F.pad(x, flat)
    for i in range(nd):
        span = dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])          # appends the window dim
    x = x[(..., *(slice(None, None, d) for d in dilation))]  # [N, C, O1..On, k1..kn]
    channels = x.shape[1]
    x = x.permute(0, *range(2, 2 + 2 * nd), 1)        # [N, O..., k..., C]
    k = math.prod(kernel)
    cin_g = channels // groups
    return x.reshape(-1, k, groups, cin_g).transpose(1, 2).reshape(-1, groups, k * cin_g)


def iter_conv_patches(x: Tensor, geom: WeightGeometry, conv: dict):
    """:func:`conv_patches` of a recorded call, a few samples at a time (bounded memory)."""
    x = conv_input(x, geom)
    k = math.prod(geom.weight_shape[2:])
    per_sample = max(1, x[:1].numel() * k)
    step = max(1, MAX_PATCH_ELEMENTS // per_sample)
    for part in x.split(step, dim=0):
        yield conv_patches(part, geom, conv["stride"], conv["padding"], conv["dilation"],
                           int(conv["groups"]))


def _tuple(v, nd: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * nd
    v = tuple(int(i) for i in v)
    return v * nd if len(v) == 1 else v


def _pads(padding, kernel: Sequence[int], dilation: Sequence[int], nd: int) -> list[tuple[int, int]]:
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * nd
        if padding == "same":
            out = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return out
        raise FxPruneError(f"unsupported conv padding {padding!r}")
    return [(p, p) for p in _tuple(padding, nd)]


def group_of_rows(view: Tensor, groups: int) -> Tensor:
    """The view as ``[groups, rows/groups, cols]``: a grouped conv's rows in group order."""
    return view.reshape(groups, view.shape[0] // groups, view.shape[1])


def accumulate_hessian(H: Tensor, features: Tensor) -> None:
    """``H[g] += F[:, g].T @ F[:, g]`` for ``features`` ``[P, groups, cols]`` (float32, in place)."""
    f = features.transpose(0, 1)                      # [groups, P, cols]
    H.baddbmm_(f.transpose(1, 2), f)


__all__ = ["accumulate_hessian", "conv_input", "conv_patches", "group_of_rows",
           "iter_conv_patches", "linear_features"]
