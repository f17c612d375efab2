"""Exact selection of the lowest-scoring blocks: the tensor math behind every mask.

Pure functions over lists of 1-D block-score tensors (one per layer, float32, finite, >= 0), so
they are testable without a model. Ties are broken by the *global flat index* (layer order, then
index inside the layer): the lowest index is pruned first, which makes counts exact and runs
reproducible bit for bit.

Speed: a global 1x1 ranking of BERT-base has 86M scores. ``torch.kthvalue`` or a sort over them
takes seconds. Instead (a non-negative IEEE float orders like its int32 bit pattern):

1. a seeded random sample of the keys brackets the k-th smallest between two sample keys, with
   a margin of several standard deviations; one vectorised pass counts the keys below the
   bracket and gathers the few inside it, where a small ``kthvalue`` finds the exact key;
2. if the bracket missed (rare, or on few keys), an exact two-pass radix select: a 65536-bin
   histogram of the high 16 bits, then one of the low 16 bits inside the chosen bin.

Either way the result is exact; the sample only decides how fast. Passes work layer by layer,
so memory stays at one layer's temporaries. Scores may be :class:`LazyScores`, recomputed at each
pass instead of held for every layer at once (magnitude: |w| is cheaper to recompute than to keep).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence, Union

import torch
from torch import Tensor

_BINS = 1 << 16


# ---------------------------------------------------------------------- budgets
@functools.lru_cache(maxsize=256)
def decimal_fraction(value: float) -> Fraction:
    """``value`` as the decimal the user wrote: the shortest decimal repr of the float, exactly.

    ``0.29 * 100`` is 28.999... in binary floating point; a user who asks for 29 % of 100 weights
    means 29.
    """
    return Fraction(repr(float(value)))


def budget(target: float, total: int) -> int:
    """floor(target * total), computed on the decimal value the user wrote."""
    return math.floor(decimal_fraction(target) * total)


def ceil_budget(target: float, total: int) -> int:
    return math.ceil(decimal_fraction(target) * total)


class LazyScores:
    """Scores computed on demand. ``compute()`` returns the tensor (of ``shape``); ``sample(idx)``
    returns a random-sample-worthy subset of its values cheaply (any order is fine);
    ``rows(start, stop)``, when given, computes rows ``start:stop`` alone (the same values), so a
    reader going a few rows at a time never holds the whole tensor."""

    def __init__(self, compute: Callable[[], Tensor], shape, device=None,
                 sample: Callable[[Tensor], Tensor] | None = None,
                 rows: Callable[[int, int], Tensor] | None = None):
        self.compute, self.shape = compute, tuple(shape)
        self.device = torch.device("cpu") if device is None else device
        self._sample = sample
        self.rows = rows

    def __call__(self) -> Tensor:
        return self.compute()

    def numel(self) -> int:
        return math.prod(self.shape)

    def sample(self, index: Tensor) -> Tensor:
        return self._sample(index) if self._sample is not None else self.compute().reshape(-1)[index]

    def map(self, fn: Callable[[Tensor], Tensor], shape=None) -> "LazyScores":
        sample = (lambda index: fn(self.sample(index))) if self._sample is not None else None
        return LazyScores(lambda: fn(self.compute()), self.shape if shape is None else shape,
                          self.device, sample)


Scores = Union[Tensor, LazyScores]


def materialize(scores: Scores) -> Tensor:
    return scores() if isinstance(scores, LazyScores) else scores


def keys_of(scores: Scores) -> Scores:
    """int32 keys ordered like the (non-negative, finite) float32 scores; a view, no copy."""
    if isinstance(scores, LazyScores):
        return scores.map(lambda t: t.view(torch.int32))
    return scores.view(torch.int32)


def _histogram(values: Tensor) -> Tensor:
    return torch.bincount(values, minlength=_BINS)


def kth_key(keys: Sequence[Tensor], k: int, excluded: Sequence[Tensor | None] | None = None,
            *, sample: bool = True) -> tuple[int, int, list[int]]:
    """The key of the k-th smallest (1-based) non-excluded entry over all layers' keys (>= 0,
    non-negative float bits), how many non-excluded entries are strictly smaller, and how many
    equal it in each layer. ``sample=False`` forces the radix select."""
    threshold, n_less, n_equal = _kth_per_layer(keys, k, excluded, sample=sample)
    return threshold, sum(n_less), n_equal


def _kth_per_layer(keys: Sequence[Scores], k: int, excluded: Sequence[Tensor | None] | None = None,
                   *, sample: bool = True) -> tuple[int, list[int], list[int]]:
    """:func:`kth_key` with the count of smaller non-excluded entries per layer."""
    excluded = excluded or [None] * len(keys)
    live = [kk if ex is None else materialize(kk)[~ex] for kk, ex in zip(keys, excluded)]
    found = _bracket_select(live, k) if sample else None
    return found if found is not None else _radix_select(live, k)


_SAMPLE = 1 << 16        # keys drawn to bracket the k-th
_MIN_FOR_SAMPLING = 1 << 20
_MARGIN_SD = 5.0         # bracket half-width, in binomial standard deviations of the sample rank


def _bracket_select(live: Sequence[Scores], k: int) -> tuple[int, list[int], list[int]] | None:
    sizes = [kk.numel() for kk in live]
    total = sum(sizes)
    if total < _MIN_FOR_SAMPLING:
        return None
    gen = torch.Generator().manual_seed(0)  # reproducible speed; the result is exact anyway
    picks = [_sample(kk, torch.randint(0, n, (max(1, _SAMPLE * n // total),), generator=gen))
             for kk, n in zip(live, sizes) if n]
    sample = torch.sort(torch.cat(picks)).values
    m = sample.numel()
    q = k / total
    half = _MARGIN_SD * (m * q * (1 - q)) ** 0.5 + 2
    lo_rank, hi_rank = int(q * m - half), int(q * m + half)
    low = int(sample[lo_rank]) if lo_rank >= 0 else None
    high = int(sample[hi_rank]) if hi_rank < m else None
    below, inside = [], []
    for kk in live:  # one full pass per layer; the second compare runs on the small window
        kk = materialize(kk)
        window = kk if low is None else kk[kk >= low]
        below.append(kk.numel() - window.numel())
        inside.append(window if high is None else window[window <= high])
    n_below, n_inside = sum(below), sum(w.numel() for w in inside)
    if not n_below < k <= n_below + n_inside:
        return None  # the k-th lies outside the bracket: fall back to the radix select
    threshold = int(torch.kthvalue(torch.cat(inside).cpu(), k - n_below).values)
    n_less = [b + int(torch.count_nonzero(w < threshold)) for b, w in zip(below, inside)]
    return threshold, n_less, [int(torch.count_nonzero(w == threshold)) for w in inside]


def _sample(kk: Scores, index: Tensor) -> Tensor:
    if isinstance(kk, LazyScores):
        return kk.sample(index.to(kk.device))
    return kk[index.to(kk.device)]


def _radix_select(live: Sequence[Scores], k: int) -> tuple[int, list[int], list[int]]:
    highs = [_histogram(materialize(kk) >> 16) for kk in live]
    cum_high = sum(highs).cumsum(0)
    hi = int(torch.searchsorted(cum_high, k))  # a Python scalar: works whatever the device
    below = [int(h[:hi].sum()) for h in highs]
    del highs
    lows = []
    for kk in live:
        kk = materialize(kk)
        lows.append(_histogram(kk[(kk >> 16) == hi] & 0xFFFF))
    cum_low = sum(lows).cumsum(0)
    lo = int(torch.searchsorted(cum_low, k - sum(below)))
    n_less = [b + int(h[:lo].sum()) for b, h in zip(below, lows)]
    return (hi << 16) | lo, n_less, [int(h[lo]) for h in lows]


def _first_true(mask: Tensor, n: int) -> Tensor:
    """``mask`` with only its first ``n`` True entries (in flat order) kept: from the indices of
    its True entries, not a cumsum (8 bytes per entry)."""
    out = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    out.view(-1)[mask.reshape(-1).nonzero()[:max(n, 0), 0]] = True
    return out


@dataclass(frozen=True)
class Cut:
    """One layer's share of a k-smallest selection, as scalars: every non-excluded key below
    ``threshold`` is pruned, and of the non-excluded keys equal to it the first ``ties`` (all of
    them when ``all_ties``). ``count`` is how many that prunes. Applying it needs the layer's keys
    only, so a selection can be decided in one streaming pass and applied layer by layer later."""

    threshold: int
    ties: int
    all_ties: bool
    count: int

    NOTHING = None  # set below: prunes nothing

    def pruned(self, keys: Scores, excluded: Tensor | None = None) -> Tensor:
        """Boolean mask (True = pruned) of this cut on the layer's keys."""
        kk = materialize(keys)
        if self.count == 0:
            return torch.zeros(kk.shape, dtype=torch.bool, device=kk.device)
        if self.all_ties:  # the usual case: every tie at the threshold (often one) is taken
            pruned = kk <= self.threshold
        else:  # ties split at this layer: the lowest indices go first
            pruned = kk == self.threshold
            if excluded is not None:
                pruned &= ~excluded
            pruned = (kk < self.threshold) | _first_true(pruned, self.ties)
        if excluded is not None:
            pruned &= ~excluded
        return pruned

    def pruned_part(self, keys: Tensor, ties_before: int) -> tuple[Tensor, int]:
        """:meth:`pruned` on one part of the layer's keys (parts taken in flat order, none
        excluded), given how many ties the earlier parts took: the part's mask and the ties taken
        up to its end. The parts' masks, concatenated, equal the whole layer's mask."""
        if self.count == 0:
            return torch.zeros(keys.shape, dtype=torch.bool, device=keys.device), ties_before
        if self.all_ties:
            return keys <= self.threshold, ties_before
        ties = keys == self.threshold
        n_ties = int(torch.count_nonzero(ties))
        pruned = keys < self.threshold
        if ties_before < self.ties and n_ties:
            pruned |= _first_true(ties, self.ties - ties_before)
        return pruned, min(self.ties, ties_before + n_ties)


Cut.NOTHING = Cut(-1, 0, True, 0)


def cut_k_smallest(keys: Sequence[Scores], k: int,
                   excluded: Sequence[Tensor | None] | None = None) -> list[Cut]:
    """Per-layer :class:`Cut` of the ``k`` smallest non-excluded entries over all layers."""
    if k <= 0:
        return [Cut.NOTHING] * len(keys)
    threshold, n_less, n_equal = _kth_per_layer(keys, k, excluded)
    ties_left = k - sum(n_less)
    cuts = []
    for less, equal_here in zip(n_less, n_equal):
        take = min(ties_left, equal_here)
        ties_left -= take
        cuts.append(Cut(threshold, take, take == equal_here, less + take))
    return cuts


def prune_k_smallest(keys: Sequence[Scores], k: int,
                     excluded: Sequence[Tensor | None] | None = None) -> list[Tensor]:
    """Boolean masks (True = pruned) of the ``k`` smallest non-excluded entries over all layers."""
    excluded = excluded or [None] * len(keys)
    cuts = cut_k_smallest(keys, k, excluded)
    return [c.pruned(kk, ex) for c, kk, ex in zip(cuts, keys, excluded)]


def select_local(scores: Scores, k: int) -> Tensor:
    """Pruned mask of the ``k`` lowest entries of one layer's block scores."""
    return prune_k_smallest([keys_of(scores)], k)[0]


@dataclass(frozen=True)
class LayerPlan:
    """How one layer's pruned blocks follow from its own block scores once a global selection is
    decided: its share of the global :class:`Cut`, on top of the blocks it must prune anyway
    (``forced``: its own lowest ``min`` blocks), or a mask decided already (``mask``: blocks of
    differing sizes, which rank by a walk over every score at once)."""

    cut: Cut = Cut.NOTHING
    forced: Cut | None = None
    mask: Tensor | None = None

    def pruned(self, scores: Scores) -> Tensor:
        """Boolean mask (True = pruned) of the layer's blocks."""
        if self.mask is not None:
            return self.mask
        keys = materialize(keys_of(scores))
        forced = None if self.forced is None else self.forced.pruned(keys)
        pruned = self.cut.pruned(keys, forced)
        return pruned if forced is None else pruned | forced


def select_global(scores: Sequence[Scores], block_weights: Sequence[int], budget: int,
                  min_blocks: Sequence[int], max_blocks: Sequence[int]) -> list[Tensor]:
    """One ranking over all layers, pruning up to ``budget`` weights in whole blocks.

    Layer ``i`` prunes between ``min_blocks[i]`` and ``max_blocks[i]`` blocks; the result is the
    clamped water-filling: a layer's count is clamp(blocks below the global threshold, min, max),
    and what a capped layer cannot take goes to the others, so the total still meets the budget
    when the caps allow it. Blocks are taken in score order while they fit in the budget.
    """
    plans = plan_global(scores, block_weights, budget, min_blocks, max_blocks)
    return [plan.pruned(s) for plan, s in zip(plans, scores)]


def plan_global(scores: Sequence[Scores], block_weights: Sequence[int], budget: int,
                min_blocks: Sequence[int], max_blocks: Sequence[int]) -> list[LayerPlan]:
    """:func:`select_global` as per-layer plans: the ranking is decided here (passes over the
    scores, which may be :class:`LazyScores` read again at each pass), and each layer's mask is
    made later from its own scores (``plan.pruned(scores)``), one layer at a time."""
    n = len(scores)
    keys = [keys_of(s) for s in scores]
    # Every layer first prunes its own `min` lowest blocks; the rest compete globally.
    forced_cuts = [cut_k_smallest([kk], m)[0] if m > 0 else None for kk, m in zip(keys, min_blocks)]
    forced = [None if c is None else c.pruned(kk) for c, kk in zip(forced_cuts, keys)]
    budget_left = budget - sum(m * b for m, b in zip(min_blocks, block_weights))
    uniform = len(set(block_weights)) == 1

    def select(free, residual, capacity):
        if uniform:
            return cut_k_smallest([keys[i] for i in free], blocks_within(residual, block_weights[0], capacity),
                                  [forced[i] for i in free])
        return _prefix_by_weight([scores[i] for i in free], [block_weights[i] for i in free],
                                 max(0, residual), [forced[i] for i in free], capacity)
    count = (lambda c: c.count) if uniform else (lambda c: int(c.sum()))
    free, chosen, fixed = capped_selection(min_blocks, max_blocks, block_weights, budget_left, select, count)
    plans: list[LayerPlan | None] = [None] * n
    for j, i in enumerate(free):
        if uniform:
            plans[i] = LayerPlan(chosen[j], forced_cuts[i])
        else:
            plans[i] = LayerPlan(mask=chosen[j] if forced[i] is None else chosen[j] | forced[i])
    for i, blocks in fixed.items():
        plans[i] = LayerPlan(cut_k_smallest([keys[i]], blocks)[0])
    return plans  # type: ignore[return-value]


def capped_selection(min_blocks: Sequence[int], max_blocks: Sequence[int], block_weights: Sequence[int],
                     budget_left: int, select: Callable, count: Callable = lambda cut: cut.count):
    """The per-layer cap of a global selection. ``select(free, residual, capacity)`` selects
    within ``residual`` (entries left once every layer has its minimum and the capped layers
    their maximum) over the ``free`` layers (indices, in order), each taking at most
    ``capacity`` blocks above its minimum, and returns one selection per free layer (``count``:
    its block count). A layer whose selection passes its capacity is fixed at its maximum and the
    rest selected again. Returns ``(free, selections, fixed)``, ``fixed``: layer -> block count."""
    fixed: dict[int, int] = {}
    while True:
        free = [i for i in range(len(min_blocks)) if i not in fixed]
        residual = budget_left - sum((fixed[i] - min_blocks[i]) * block_weights[i] for i in fixed)
        capacity = [max_blocks[i] - min_blocks[i] for i in free]
        chosen = select(free, residual, capacity)
        over = [i for i, c, cap in zip(free, chosen, capacity) if count(c) > cap]
        if not over:
            return free, chosen, fixed
        for i in over:
            fixed[i] = max_blocks[i]


def blocks_within(residual: int, block_weight: int, capacity: Sequence[int]) -> int:
    """How many blocks of ``block_weight`` entries a uniform selection takes: as many as
    ``residual`` entries hold, at most the free layers' total ``capacity``."""
    return max(0, min(residual // block_weight if capacity else 0, sum(capacity)))


def _prefix_by_weight(scores: Sequence[Tensor], block_weights: Sequence[int], budget: int,
                      excluded: Sequence[Tensor | None], capacity: Sequence[int]) -> list[Tensor]:
    """Blocks of differing sizes (channel patterns): walk the global score order and take blocks
    while the running weight count fits in the budget, passing over the blocks of a layer that
    already holds ``capacity`` of them. Block counts here are small (channels)."""
    if not scores:
        return []
    scores = [materialize(s) for s in scores]
    flat = torch.cat([s.float() for s in scores])
    device = flat.device
    weight = torch.cat([torch.full((s.numel(),), b, dtype=torch.int64, device=device)
                        for s, b in zip(scores, block_weights)])
    skip = torch.cat([torch.zeros(s.numel(), dtype=torch.bool, device=device) if ex is None else ex
                      for s, ex in zip(scores, excluded)])
    layer = torch.cat([torch.full((s.numel(),), i, dtype=torch.int64, device=device)
                       for i, s in enumerate(scores)])
    order = torch.sort(flat, stable=True).indices
    order = order[~skip[order]]
    # A full layer's later blocks must not end the walk: drop each block ranked past its
    # layer's capacity (rank = position among the layer's own blocks in score order).
    layer_in_order = layer[order]
    by_layer = torch.sort(layer_in_order, stable=True).indices
    per_layer = torch.bincount(layer_in_order, minlength=len(scores))
    rank = torch.empty_like(by_layer)
    rank[by_layer] = (torch.arange(by_layer.numel(), device=device)
                      - (per_layer.cumsum(0) - per_layer)[layer_in_order[by_layer]])
    order = order[rank < torch.tensor(capacity, dtype=torch.int64, device=device)[layer_in_order]]
    running = weight[order].cumsum(0)
    n_take = int((running <= budget).sum())  # cumsum is increasing: a prefix fits
    pruned = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
    pruned[order[:n_take]] = True
    return list(pruned.split([s.numel() for s in scores]))
