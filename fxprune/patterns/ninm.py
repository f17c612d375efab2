"""N:M (``2:4``, ``1:4``, ``4:8``): in every run of M consecutive weights along the columns of the
2-D view, the N lowest-scoring are pruned ("N out of every M continuous weights").

At the full target N/M every M-group is pruned; below it only some groups become N:M sparse and
the rest stay dense: a group's score is the reduce of its N smallest element scores, and the
lowest-scoring groups are chosen (globally or per layer).
"""
from __future__ import annotations

import functools
import re
from fractions import Fraction

import torch
from torch import Tensor

from ..config import GroupConfig
from ..errors import ConfigError
from ..geometry import WeightGeometry
from ..selection import decimal_fraction, materialize
from .base import BasePattern, BlockLayout, register_pattern

_NINM = re.compile(r"^(\d+):(\d+)$")


def n_lowest_of_each_column(scores: Tensor, n: int, out: Tensor | None = None) -> Tensor:
    """Bool ``[M, k]``: in each column of ``scores`` (``[M, k]``, float32, >= 0), the ``n`` lowest,
    ties to the lowest row: the order of :meth:`NInMPattern._n_smallest` on the transposed
    ``[k, M]`` groups, in a few whole-tensor operations (SparseGPT's adaptive N:M choice runs it
    once per M columns, so its cost is per-operation overhead, not arithmetic).

    Rank of ``i`` = how many ``j`` come first, ``j`` first when ``s_j < s_i`` or (``s_j == s_i``
    and ``j < i``). Non-negative floats order like their int32 bits, so with integer keys
    "``k_j <= k_i``" is "``k_j < k_i + 1``": one comparison against ``k_i + [j < i]``.
    """
    m = scores.shape[0]
    keys = scores.view(torch.int32)
    first = keys.unsqueeze(0) < keys.unsqueeze(1) + _earlier(m, scores.device)  # [i, j, k]: j first
    rank = first.sum(dim=1, dtype=torch.uint8 if m < 256 else torch.int32)
    return torch.lt(rank, n, out=out) if out is not None else rank < n


@functools.lru_cache(maxsize=16)
def _earlier(m: int, device: torch.device) -> Tensor:
    """``[m, m, 1]`` int32: 1 where ``j < i`` (read-only, shared)."""
    return torch.ones(m, m, dtype=torch.int32, device=device).tril_(-1).unsqueeze(2)


@register_pattern("N:M")
class NInMPattern(BasePattern):
    @classmethod
    def matches(cls, pattern: str) -> bool:
        return bool(_NINM.match(pattern))

    @classmethod
    def check_config(cls, group: GroupConfig) -> None:
        n, m = (int(v) for v in _NINM.match(group.pattern).groups())
        if not 1 <= n < m:
            raise ConfigError(f"{group.where}: pattern {group.pattern!r} needs 1 <= N < M "
                              f"(N of every M weights are pruned)")
        if decimal_fraction(group.target_sparsity) > Fraction(n, m):
            raise ConfigError(
                f"{group.where}: target_sparsity {group.target_sparsity} is above what pattern "
                f"{group.pattern!r} can reach ({n}/{m} = {n / m:g}); lower target_sparsity to at "
                f"most {n / m:g} or use a pattern such as '4x1' or '1x1'")

    def __init__(self, config, modules=None):
        super().__init__(config, modules)
        self.n, self.m = (int(v) for v in _NINM.match(self.pattern).groups())

    def block_layout(self, geom: WeightGeometry) -> BlockLayout | str:
        rows, cols = geom.view_shape
        if cols % self.m:
            return f"{cols} columns are not divisible by M={self.m}"
        return BlockLayout((rows, cols // self.m, self.m), (2,), self.n, self.pattern)

    def _n_smallest(self, view_scores: Tensor) -> Tensor:
        """Bool ``[groups, M]``: the N lowest scores of each group, ties to the lowest column."""
        groups = view_scores.reshape(-1, self.m)
        if self.m > 8:  # a stable sort; below, pairwise compares are several times faster
            index = torch.sort(groups, dim=1, stable=True).indices[:, : self.n]
            return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, index, True)
        keys = groups.view(torch.int32)  # scores are >= 0: the bits order like the floats
        rank = torch.zeros(groups.shape, dtype=torch.uint8, device=groups.device)
        for i in range(self.m):
            for j in range(i + 1, self.m):
                j_first = keys[:, j] < keys[:, i]  # on a tie, the lower column i goes first
                rank[:, i] += j_first
                rank[:, j] += ~j_first
        return rank < self.n

    def block_scores(self, view_scores: Tensor, layout: BlockLayout) -> Tensor:
        # scores are >= 0, so zeroing the others keeps sum and max of the N smallest
        smallest = view_scores.reshape(-1, self.m) * self._n_smallest(view_scores)
        if self.reduce_type == "max":
            return smallest.amax(dim=1)
        total = smallest.sum(dim=1)
        return total / self.n if self.reduce_type == "mean" else total

    expand_needs_scores = True

    def _every_group(self, target_sparsity=None) -> bool:
        """At the full target N/M every group is pruned: no ranking, one sort per layer."""
        target = self.target_sparsity if target_sparsity is None else target_sparsity
        full = decimal_fraction(target) == Fraction(self.n, self.m)
        return full and self.max_sparsity_ratio_per_op >= self.n / self.m

    def layers_are_independent(self) -> bool:
        return self._every_group() or super().layers_are_independent()

    def get_masks(self, scores, layouts, *, consume=False, target_sparsity=None):
        if not self._every_group(target_sparsity):
            return super().get_masks(scores, layouts, consume=consume, target_sparsity=target_sparsity)
        masks = {}
        for name in list(scores):
            view = materialize(scores.pop(name) if consume else scores[name])
            every_group = torch.ones(layouts[name].num_blocks, dtype=torch.bool, device=view.device)
            masks[name] = ~self.expand(every_group, layouts[name], tuple(view.shape), view)
        return masks

    def expand(self, pruned_blocks: Tensor, layout: BlockLayout, view_shape, view_scores=None) -> Tensor:
        pruned = self._n_smallest(view_scores) & pruned_blocks.reshape(-1, 1)
        return pruned.reshape(view_shape)
