"""Checkpoints on several processes (``torch.distributed``), and the row-piece selection that
also bounds one process's memory.

- Shard files are assigned to ranks by size (largest first, to the least loaded rank); a rank
  writes its own output shards; rank 0 writes the index, config and tokenizer files and the
  report, into one temporary directory that rank 0 renames to ``out_dir`` once every rank has
  finished (``out_dir`` on a filesystem every rank sees, for several nodes).
- Magnitude, global scope, 1x1 blocks, ``[out, in]`` weights (Linear; the usual LLM case): the
  work goes by row pieces (:func:`prune_rows`). In the selection passes every rank reads its
  share of the rows of every weight (rank ``r`` the ``r``-th of ``world`` even row ranges), cut
  into pieces of at most :data:`PIECE_ELEMENTS` entries; the exact threshold and tie split come
  from histograms of the score bits summed over the ranks (the two-pass radix select of
  :mod:`fxprune.selection`, with all-reduced counts). The owner of a weight's shard then masks
  and writes it piece by piece, in the same pieces. So no rank holds more than its share of one
  weight (and of :data:`PIECE_ELEMENTS`) at a time, and the reads are split evenly. One process
  runs the same code with one share per weight. Bit-identical masks.
- Other magnitude groups: local scope, each rank prunes the layers of its own shards; other
  global rankings with uniform blocks (4x1, N:M below its full target...): the same radix select
  over whole layers, each rank reading the layers of its own shards. Rankings over blocks of
  differing sizes and user patterns are decided on every rank from all layers' scores
  (replicated reads), each rank writing its own layers.
- ``activation`` / ``sparse_gpt``: data-parallel block-sequential calibration
  (:mod:`fxprune.distributed`); every rank loads each block (the weights are replicated), the
  rank owning a weight's shard writes it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..distributed import Distributed, assign
from ..selection import (Cut, LayerPlan, LazyScores, _histogram, blocks_within, budget, capped_selection,
                         cut_k_smallest, keys_of, materialize)
from .shards import ShardSet


def own_files(shards: ShardSet, d: Distributed) -> set[Path]:
    """The shard files of rank ``d.rank`` (the same assignment on every rank)."""
    owner = assign([f.stat().st_size for f in shards.files], d.world)
    return {f for f, r in zip(shards.files, owner) if r == d.rank}


def prune_streaming(job, group, scores_of: Callable) -> bool:
    """Magnitude-like groups of a sharded run; False when the group needs the replicated path
    (every rank ranks all layers itself, writing its own)."""
    targets = job.ctx.selected(group)
    pattern = targets[0].pattern
    mine = [t for t in targets if job.owns(t)]
    if pattern.layers_are_independent():
        job.write_independent(group, mine, scores_of)
        return True
    if len({t.layout.block_weights for t in targets}) != 1:
        return False
    lazy = job.lazy_block_scores(pattern, mine, scores_of)
    plans = sharded_plans(job.dist, pattern, targets, lazy)
    del lazy
    job.write_planned(pattern, plans, mine, scores_of)
    return True


def sharded_plans(d: Distributed, pattern, targets, block_scores: dict) -> dict[str, LayerPlan]:
    """:meth:`BasePattern.plan_global` (uniform block sizes) when each rank holds the block scores
    of some layers (``block_scores``: param -> scores of this rank's layers): the plans of this
    rank's layers, equal to the single-process ones. Same steps as
    :func:`fxprune.selection.plan_global`; every cross-layer quantity is all-reduced."""
    layouts = [t.layout for t in targets]
    bounds = [pattern.block_bounds(lay) for lay in layouts]
    mins, maxs = [lo for lo, _ in bounds], [hi for _, hi in bounds]
    weight = layouts[0].block_weights
    total_budget = budget(pattern.target_sparsity, sum(lay.numel for lay in layouts))
    n = len(targets)
    keys = {i: keys_of(block_scores[t.param]) for i, t in enumerate(targets) if t.param in block_scores}
    forced_cuts = {i: cut_k_smallest([kk], mins[i])[0] if mins[i] > 0 else None for i, kk in keys.items()}
    forced = {i: None if c is None else c.pruned(keys[i]) for i, c in forced_cuts.items()}
    budget_left = total_budget - sum(m * weight for m in mins)
    parts = {i: [kk] for i, kk in keys.items()}
    free, cuts, fixed = capped_selection(
        mins, maxs, [weight] * n, budget_left,
        lambda free, residual, capacity: sharded_cut(d, free, blocks_within(residual, weight, capacity), parts, forced))
    plans = {}
    for j, i in enumerate(free):
        if i in keys:
            plans[targets[i].param] = LayerPlan(cuts[j], forced_cuts[i])
    for i, count in fixed.items():
        if i in keys:
            plans[targets[i].param] = LayerPlan(cut_k_smallest([keys[i]], count)[0])
    return plans


def sharded_cut(d, layers: list[int], k: int, keys: dict, excluded: dict) -> list[Cut]:
    """:func:`fxprune.selection.cut_k_smallest` over ``layers`` (global layer indices, in order)
    when this rank holds parts of some of them (``keys``: layer index -> list of this rank's
    parts of its keys, whole layers or row ranges; ``excluded``: layer index -> excluded mask,
    only for a layer held as one part): the radix select with histograms and per-layer counts
    summed over the ranks. Same threshold, counts and tie split on every rank."""
    if k <= 0:
        return [Cut.NOTHING] * len(layers)
    own = [(j, i) for j, i in enumerate(layers) if i in keys]

    def parts(i):
        for kk in keys[i]:
            kk = materialize(kk)
            yield kk if excluded.get(i) is None else kk[~excluded[i]]

    def high_bits():
        high = torch.zeros(1 << 16, dtype=torch.int64)
        for _, i in own:
            for kk in parts(i):
                high += _histogram(kk >> 16)
                del kk
        return high

    # each step: local passes (an error there is reported at the status exchange), then the sums
    (high,) = d.all_reduce_sum([d.run("the global threshold", high_bits)])
    hi = int(torch.searchsorted(high.cumsum(0), k))
    del high
    in_bin: dict[int, list[torch.Tensor]] = {}
    start = hi << 16

    def low_bits():
        below = torch.zeros(len(layers), dtype=torch.int64)
        low = torch.zeros(1 << 16, dtype=torch.int64)
        for j, i in own:
            in_bin[j] = []
            for kk in parts(i):
                # high bits below / equal to hi, compared on the keys themselves (finite float
                # bits: no overflow), with bool temporaries only (count_nonzero: a bool .sum()
                # makes an int64 copy)
                below[j] += int(torch.count_nonzero(kk < start))
                in_bin[j].append(kk[(kk >= start) & (kk < start + (1 << 16))] & 0xFFFF)
                low += _histogram(in_bin[j][-1])
        return below, low

    my_below, my_low = d.run("the global threshold", low_bits)
    below, low = d.all_reduce_sum([my_below, my_low])
    lo = int(torch.searchsorted(low.cumsum(0), k - int(below.sum())))
    less = torch.zeros(len(layers), dtype=torch.int64)
    equal = torch.zeros(len(layers), dtype=torch.int64)
    for j, _ in own:     # this rank's parts only: the sum over the ranks follows
        less[j] = int(my_below[j]) + sum(int(torch.count_nonzero(b < lo)) for b in in_bin[j])
        equal[j] = sum(int(torch.count_nonzero(b == lo)) for b in in_bin[j])
    less, equal = d.all_reduce_sum([less, equal])
    threshold = (hi << 16) | lo
    ties_left = k - int(less.sum())
    cuts = []
    for n_less, n_equal in zip(less.tolist(), equal.tolist()):
        take = min(ties_left, n_equal)
        ties_left -= take
        cuts.append(Cut(threshold, take, take == n_equal, n_less + take))
    return cuts


# ---------------------------------------------------------------------- row pieces
# Most entries a piece of a tensor holds: a rank works on at most this much of a tensor at once
# (its float32 scores: 64 MB), whatever the tensor's size. Below it, pieces are a rank's share.
PIECE_ELEMENTS = 1 << 24


class OneRank:
    """The collective steps of :func:`sharded_cut` for one process: sums over one rank."""
    rank, world = 0, 1

    @staticmethod
    def run(stage: str, fn: Callable):
        return fn()

    @staticmethod
    def all_reduce_sum(tensors):
        return list(tensors)


def row_pieces(rows: int, cols: int, world: int, limit: int | None = None) -> list[list[tuple[int, int]]]:
    """Each rank's pieces of a ``[rows, cols]`` tensor, as row ranges ``(start, stop)``: rank
    ``r`` takes the ``r``-th of ``world`` even row ranges, cut into pieces of at most ``limit``
    entries (default :data:`PIECE_ELEMENTS`; at least one row). Every rank computes the same
    pieces; in rank order, then piece order, they cover the rows once, in order."""
    step = max(1, (PIECE_ELEMENTS if limit is None else limit) // max(cols, 1))
    out = []
    for r in range(world):
        start, stop = rows * r // world, rows * (r + 1) // world
        out.append([(a, min(a + step, stop)) for a in range(start, stop, step)])
    return out


def rows_apply(targets, pattern, criterion) -> bool:
    """Whether a global group can be selected and written in row pieces: the built-in magnitude
    (scores entry by entry), 1x1 blocks ranked by the base selection with no per-layer minimum,
    and weights whose 2-D view is the stored ``[out, in]`` tensor (rows of the view are rows of
    the shard)."""
    from ..criteria.magnitude import MagnitudeCriterion
    from ..patterns.base import BasePattern
    return (type(criterion) is MagnitudeCriterion
            and type(pattern).expand is BasePattern.expand and not pattern.expand_needs_scores
            and not pattern.prunes_output_channels
            and all(t.geometry.layout == "out_in" and len(t.geometry.weight_shape) == 2
                    and pattern._blocks_are_elements(t.layout) and pattern.block_bounds(t.layout)[0] == 0
                    for t in targets))


def prune_rows(job, targets, pattern, scores_of_rows: Callable, d) -> None:
    """Global magnitude over 1x1 blocks, by row pieces (one process or several: ``d``).

    Selection: every rank reads its own rows of every layer (its share of the rows, in pieces of
    at most :data:`PIECE_ELEMENTS` entries) in the passes of :func:`sharded_cut`, so the counting
    work, the bytes read and what a rank holds at once are split between the ranks. Writing: the
    rank owning a weight's shard writes it, piece by piece in the same pieces. The masks are the
    single-process ones bit for bit (the same exact selection and tie split)."""
    world, rank = d.world, d.rank
    pieces = {i: row_pieces(*t.geometry.weight_shape, world) for i, t in enumerate(targets)}
    keys = {i: [LazyScores(lambda t=t, a=a, b=b: scores_of_rows(t, a, b)[1].view(torch.int32).reshape(-1),
                           ((b - a) * t.geometry.weight_shape[1],))
                for a, b in pieces[i][rank]] for i, t in enumerate(targets)}
    layouts = [t.layout for t in targets]
    maxs = [pattern.block_bounds(lay)[1] for lay in layouts]
    total_budget = budget(pattern.target_sparsity, sum(lay.numel for lay in layouts))
    free, chosen, fixed = capped_selection(       # 1x1 blocks (a block is one entry), no minimum
        [0] * len(targets), maxs, [1] * len(targets), total_budget,
        lambda free, residual, capacity: sharded_cut(d, free, blocks_within(residual, 1, capacity), keys, {}))
    cuts = dict(zip(free, chosen))
    for i, count in fixed.items():
        cuts[i] = sharded_cut(d, [i], count, keys, {})[0]
    del keys
    for i, t in enumerate(targets):
        if job.owns(t):
            job.write_rows(t, cuts.pop(i), [p for share in pieces[i] for p in share], scores_of_rows)
        t.status = "pruned"
