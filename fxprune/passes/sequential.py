"""block_sequential: score, mask and rewrite the data-aware groups one repeated block at a time.

Runs after attach, before score. For each group it can take (see :func:`plan`), it does the work
of the score, mask and rewrite passes block by block inside
:class:`~fxprune.sequential.BlockSequentialRunner`: record the block's layer inputs (one dense
forward of the block per batch), compute each distinct input's statistics once (q/k/v share their
input, so one Hessian / one norm vector; gate/up likewise), score and mask with the group's
pattern, update (SparseGPT) and zero the pruned weights; the runner then runs the pruned block to
make the next block's inputs. The targets it prunes are marked ``pruned``, so the whole-model
passes that follow only see the groups it did not take.

Groups taken: ``activation`` and ``sparse_gpt`` groups with local scope whose selected layers are
all linear-kind layers inside the blocks. Global scope needs every layer's scores before any mask,
gradient criteria need the loss at the model's output, convolutions and layers outside the blocks
(``lm_head``) are not block-local: those stay on the whole-model path.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..checks import all_finite
from ..criteria import ActivationCriterion, SparseGPTCriterion, get_criterion_class
from ..criteria.calibration import (StopForward, WeightInputRecorder, _NoFusedFastPaths,
                                    require_data, reusable)
from ..criteria.features import linear_features
from ..criteria.sparse_gpt import (act_order, group_act_order, group_refine_steps,
                                   inverse_hessian_factor, sparsegpt_prune)
from ..errors import ConfigError, WeightError
from ..geometry import from_view_2d, to_view_2d
from ..report import count_zeros
from ..selection import budget
from ..sequential import BlockList, BlockSequentialRunner, BlockStep, RunStats, find_blocks
from .base import Pass
from .context import PruneContext
from .mask import check_mask, mask_group
from .rewrite import apply_keep_mask, zero_pruned_channels
from .score import check_finite, check_not_meta, score_targets

log = logging.getLogger("fxprune")

BLOCK_CRITERIA = (ActivationCriterion, SparseGPTCriterion)


@dataclass
class BlockPlan:
    """What the block-sequential pass will do: the blocks, the groups it takes, their targets per
    block, and why any data-aware group stays on the whole-model path."""

    blocks: BlockList | None
    groups: list = field(default_factory=list)
    by_block: dict[int, list] = field(default_factory=dict)
    whole_model: dict[int, str] = field(default_factory=dict)   # group index -> reason
    stats: RunStats | None = None
    stages: int = 0             # recording passes: one per block, or per stage (true_sequential)

    def summary(self) -> dict | None:
        """For the sparsity report: the path taken and, block-sequentially, what it ran."""
        if self.blocks is None and not self.whole_model:
            return None
        out = {"description": self.describe(), "block_sequential": [g.index for g in self.groups],
               "whole_model": {str(i): r for i, r in self.whole_model.items()}}
        if self.blocks is not None and self.groups:
            out["blocks"] = self.blocks.name
            out["num_blocks"] = len(self.blocks)
        if self.stats is not None:
            out.update(batches=self.stats.batches, block_batches=self.stats.block_batches,
                       block_forwards=self.stats.block_forwards,
                       stopped_early=self.stats.stopped_early, spilled=self.stats.spilled,
                       stages=self.stages)
        return out

    def describe(self) -> str:
        if self.blocks is None or not self.groups:
            why = "; ".join(f"pruning_configs[{i}]: {r}" for i, r in self.whole_model.items())
            return f"whole-model calibration ({why})" if why else "no data-aware group"
        text = (f"block-sequential calibration over {self.blocks.name} ({len(self.blocks)} blocks) "
                f"for pruning_configs{[g.index for g in self.groups]}")
        if self.whole_model:
            text += "; whole-model for " + "; ".join(
                f"pruning_configs[{i}]: {r}" for i, r in self.whole_model.items())
        return text


def plan(ctx: PruneContext) -> BlockPlan:
    """Which data-aware groups run block-sequentially (config key ``block_sequential``)."""
    mode = ctx.config.block_sequential
    data_groups = [g for g in ctx.groups if ctx.selected(g)
                   and get_criterion_class(g.pruning_type, g.where).needs_data]
    if mode is False or not data_groups:
        return BlockPlan(None, whole_model={g.index: "block_sequential is false" for g in data_groups})
    blocks = find_blocks(ctx.model, ctx.config.block_list)
    if blocks is None:
        reason = "the model has no ModuleList of repeated blocks"
        if mode is True:
            raise ConfigError(f"block_sequential: true, but {reason} (set block_list to the "
                              f"ModuleList of the blocks, or block_sequential: auto)")
        return BlockPlan(None, whole_model={g.index: reason for g in data_groups})
    p = BlockPlan(blocks)
    for g in data_groups:
        reason = _why_whole_model(ctx, g, blocks)
        if reason is None:
            p.groups.append(g)
            for t in ctx.selected(g):
                p.by_block.setdefault(blocks.index_of(t.param), []).append(t)
        else:
            p.whole_model[g.index] = reason
    if mode is True and p.whole_model:
        i, reason = next(iter(p.whole_model.items()))
        raise ConfigError(f"block_sequential: true, but pruning_configs[{i}] cannot run block by "
                          f"block: {reason}; set block_sequential: auto to use the whole-model "
                          f"path for it")
    return p


def _why_whole_model(ctx: PruneContext, g, blocks: BlockList) -> str | None:
    cls = get_criterion_class(g.pruning_type, g.where)
    if not issubclass(cls, BLOCK_CRITERIA):
        return f"criterion {g.pruning_type!r} is not block-local (gradients need the model's loss)"
    if g.pruning_scope != "local":
        return "global scope ranks all layers at once"
    if ctx.compact:
        return "compact needs every layer's scores at once"
    for t in ctx.selected(g):
        if t.geometry.kind == "conv":
            return f"layer {t.name} is a convolution"
        if blocks.index_of(t.param) is None:
            return f"layer {t.name} is outside {blocks.name}"
    return None


class BlockSequentialPass(Pass):
    name = "block_sequential"

    def call(self, ctx: PruneContext) -> None:
        p = plan(ctx)
        ctx.block_plan = p
        if ctx.config.true_sequential and p.whole_model:
            import warnings
            warnings.warn("true_sequential applies to block-sequential calibration only; "
                          + "; ".join(f"pruning_configs[{i}] records every layer at once ({r})"
                                      for i, r in p.whole_model.items()), stacklevel=2)
        if p.blocks is None or not p.groups:
            log.info("fxprune: %s", p.describe())
            return
        require_data(ctx, p.groups[0].pruning_type)
        log.info("fxprune: %s", p.describe())
        if ctx.distributed is not None:     # a group= reused after a failed run starts afresh
            ctx.distributed.forget_pending()
        runner = BlockSequentialRunner(
            ctx.model, p.blocks, reusable(ctx.calibration),
            propagation=ctx.config.block_propagation,
            cache_bytes=int(ctx.config.activation_cache_mb * (1 << 20)),
            batch_tokens=ctx.config.block_batch_tokens,
            on_block_start=ctx.on_block_start, on_block_end=ctx.on_block_end,
            progress=ctx.tick if ctx.progress is not None else None,
            # data-parallel: this rank's share of the block batches
            keep_batches=ctx.distributed.block_batch_share if ctx.distributed is not None else None)
        p.stats = runner.run(lambda step: prune_block(ctx, p, step))
        if ctx.distributed is not None:     # the report counts every rank's share of the work
            ctx.distributed.total_stats(p.stats, ctx.zero_counts)


# ---------------------------------------------------------------------------- per block
def prune_block(ctx: PruneContext, p: BlockPlan, step: BlockStep) -> None:
    """Record the inputs of the block's targets, then score, mask, update and zero them."""
    targets = p.by_block.get(step.index, [])
    if not targets:
        return
    model = ctx.model
    if ctx.on_block_start is not None:  # a streaming caller loads them there: check what it loaded
        check_not_meta(model, targets)  # (the check pass saw the weights of everything else)
        for t in targets:
            check_finite(t, model.get_parameter(t.param).detach())
    late = []       # rows of other ranks still arriving (data-parallel SparseGPT)

    def finish() -> None:
        for writes in late:
            writes.finish()
        dist = ctx.distributed
        for t in targets:
            weight = model.get_parameter(t.param).detach()
            if dist is None:
                ctx.zero_counts[t.param] = count_zeros(weight)
            else:               # each rank counts its share of the rows; summed at the end
                dist.count_zeros_share(t.param, weight)
            t.status = "pruned"

    # after the pruned forward, which writes the rows still arriving as it reaches their layers;
    # the cleanup removes the write hooks left, also when the block fails
    step.defer(finish, cleanup=lambda: [writes.close() for writes in late])
    left = list(targets)
    while left:     # true_sequential: one stage of layers at a time, the earlier ones pruned
        stats = record_inputs(ctx, step, left, stage=ctx.config.true_sequential)
        stage = {t.param for t in stats.targets}
        for group in p.groups:
            group_targets = [t for t in stats.targets if t.group is group]
            if not group_targets:
                continue
            if _is_sparse_gpt(group):
                writes = _sparse_gpt(ctx, group, group_targets, stats)
                if writes is not None:
                    late.append(writes)
            else:
                _activation(ctx, group, group_targets, stats)
        p.stages += 1
        left = [t for t in left if t.param not in stage]
        del stats               # not alive during the next stage's recording


def record_inputs(ctx: PruneContext, step: BlockStep, targets, stage: bool = False) -> "BlockInputStats":
    """The input statistics of ``targets`` (layers of block ``step`` not pruned yet) from one
    recording pass over the block batches; with ``stage``, of the first stage among them only
    (see :meth:`BlockInputStats.first_stage_only`): the returned statistics' ``targets``."""
    dist = ctx.distributed
    model = ctx.model
    stats = BlockInputStats(model, targets) if dist is None else dist.block_input_stats(model, targets)
    if stage:
        stats.first_stage_only()
    if not step.outputs_needed:         # outputs thrown away: stop each batch after its last input
        stats.stop_early()
    with stats.installed():
        step.record(context=stats.context, on_batch=stats.new_batch)
    stats.check_complete(step.name)
    if dist is not None:                # data-parallel: sum the statistics of every rank's batches
        dist.reduce_block_stats(stats, step.name)
    return stats


def _is_sparse_gpt(group) -> bool:
    return issubclass(get_criterion_class(group.pruning_type, group.where), SparseGPTCriterion)


def _activation(ctx, group, targets, stats: "BlockInputStats") -> None:
    criterion = get_criterion_class(group.pruning_type)(group)
    criterion.geometry = {t.param: t.geometry for t in targets}
    criterion.sumsq = {t.param: stats.sumsq(t) for t in targets}
    masks = mask_group(group, targets, score_targets(ctx.model, targets, criterion))
    _apply_masks(ctx, targets, masks)


def _sparse_gpt(ctx, group, targets, stats: "BlockInputStats") -> None:
    criterion = get_criterion_class(group.pruning_type)(group)
    pattern = targets[0].pattern
    adaptive = adaptive_mode(pattern)
    shared_groups = stats.shared_groups(targets)       # layers with one input: one factor

    def order(shared) -> Tensor | None:
        # from the sum of squared inputs (diag H up to the count), which every rank holds whole
        # (the Hessian itself only on the rank computing the factor): the same order everywhere
        return act_order(stats.sumsq(shared[0])) if _uses_act_order(shared[0]) else None

    def factor(shared) -> Tensor:
        return _sparse_gpt_factor(stats, criterion, shared, order(shared))

    def solve(shared, u: Tensor, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        return _sparse_gpt_rows(ctx, group, shared, u, r0, r1, criterion, pattern, adaptive,
                                order(shared))

    def apply(shared, new: Tensor, pruned: Tensor) -> None:
        weights = [ctx.model.get_parameter(t.param) for t in shared]
        rows = [t.geometry.view_shape[0] for t in shared]
        for t, w, part, gone in zip(shared, weights, new.split(rows), pruned.split(rows)):
            keep = ~gone
            check_mask(pattern, t, keep)
            with torch.no_grad():
                # the solve zeroed the pruned weights: only whole pruned channels' biases are left
                w.copy_(from_view_2d(part, t.geometry).to(dtype=w.dtype))
                zero_pruned_channels(ctx.model, t, keep)

    if ctx.distributed is None:     # each group written as soon as solved: one result at a time
        # the widest input first: its Hessian sum, the largest statistic, is released before the
        # other groups' working copies are made (the groups are independent: same results)
        for shared in sorted(shared_groups, key=_input_width, reverse=True):
            apply(shared, *solve(shared, factor(shared), 0, _stacked_rows(shared)))
    else:   # factors and row ranges divided among the ranks; the other ranks' rows are written
        # when they are needed (the next forward reaching their layer) or at the block's end
        arriving = ctx.distributed.split_sparse_gpt(
            shared_groups, factor, solve, lambda shared: row_cuts(shared, adaptive), stats=stats)
        writes = LateWrites(lambda g: apply(shared_groups[g], *arriving.get(g)))
        for g, shared in enumerate(shared_groups):
            modules = [stats.owner[t.param] for t in shared]
            if arriving.ready(g) or any(not _called_module(m) or t.uses_per_forward != 1
                                        for m, t in zip(modules, shared)):
                writes.write(g)
            else:
                writes.add(g, modules)
        return writes if writes.pending else None


class LateWrites:
    """Writes of layers whose solved rows come from other ranks, done when first needed: a
    forward pre-hook on each layer's module writes its group before the layer runs (so a rank
    starts the pruned block's forward while rows are still on their way), :meth:`finish`
    writes the rest; ``write(g)`` waits for group ``g``'s rows and writes them."""

    def __init__(self, write):
        self._write = write
        self.pending: dict[int, list] = {}      # group -> its hook handles

    def add(self, g: int, modules) -> None:
        self.pending[g] = [m.register_forward_pre_hook(lambda module, args, g=g: self.write(g))
                           for m in dict.fromkeys(modules)]

    def write(self, g: int) -> None:
        for handle in self.pending.pop(g, []):
            handle.remove()
        self._write(g)

    def finish(self) -> None:
        for g in sorted(self.pending):
            self.write(g)

    def close(self) -> None:
        for handles in self.pending.values():
            for handle in handles:
                handle.remove()
        self.pending.clear()


def _input_width(shared) -> int:
    return shared[0].geometry.view_shape[1]


def _stacked_rows(shared) -> int:
    return sum(t.geometry.view_shape[0] for t in shared)


# Row ranges of one SparseGPT solve start at multiples of this many rows: with such cuts the
# row-sliced solves reproduce the whole solve's bits (the BLAS kernels' row blocking).
ROW_ALIGN = 64


def row_cuts(shared, adaptive: str | None) -> list[int]:
    """Where the stacked rows of layers sharing one input may be split between solves: rows are
    independent given the inverse factor for N:M and fixed masks (cuts every ``ROW_ALIGN`` rows);
    the unstructured adaptive selection couples a layer's rows (cuts between layers only)."""
    rows = [t.geometry.view_shape[0] for t in shared]
    total = sum(rows)
    if adaptive == "unstructured":
        cuts, at = [0], 0
        for r in rows:
            at += r
            cuts.append(at)
        return cuts
    return list(range(0, total, ROW_ALIGN)) + [total]


def _uses_act_order(t) -> bool:
    """SparseGPT takes the columns of ``t`` (and of the layers sharing its input) by descending
    input energy: for unstructured masks chosen block by block, unless the group says not to."""
    return (_is_sparse_gpt(t.group) and group_act_order(t.group)
            and adaptive_mode(t.pattern) == "unstructured")


def _sparse_gpt_factor(stats: "BlockInputStats", criterion, shared, order=None) -> Tensor:
    """The upper Cholesky factor of the inverse Hessian of layers sharing one input, its columns
    taken in ``order`` if given (their Hessian sum is released: each group's factor is computed
    once)."""
    lead = shared[0]
    return inverse_hessian_factor(stats.take_hessian(shared).unsqueeze(0), criterion.percdamp,
                                  lead.name, overwrite=True, order=order)[0]


def _sparse_gpt_rows(ctx, group, shared, u: Tensor, r0: int, r1: int, criterion, pattern,
                     adaptive, order=None) -> tuple[Tensor, Tensor]:
    """Rows ``[r0, r1)`` of the stacked float32 2-D views of layers sharing one input, updated by
    SparseGPT with the inverse factor ``u`` (of the columns in ``order``, if given), and their
    pruned mask. For unstructured masks ``r0`` and ``r1`` are layer boundaries (see
    :func:`row_cuts`)."""
    weights = [ctx.model.get_parameter(t.param) for t in shared]
    views = [to_view_2d(w.detach(), t.geometry).float() for w, t in zip(weights, shared)]
    rows = [v.shape[0] for v in views]
    W = stacked_rows_t(views, r0, r1).t()
    steps = group_refine_steps(group)
    if adaptive == "n_of_m":
        new, pruned = sparsegpt_prune(W, u, criterion.blocksize,
                                      n_of_m=(pattern.n, pattern.m), refine_steps=steps)
    elif adaptive == "unstructured":
        starts = [sum(rows[:i]) for i in range(len(rows))]
        inside = [i for i, s in enumerate(starts) if s >= r0 and s + rows[i] <= r1]
        counts = [_local_count(pattern, shared[i]) for i in inside]
        new, pruned = sparsegpt_prune(W, u, criterion.blocksize, counts=counts,
                                      rows=[rows[i] for i in inside], refine_steps=steps,
                                      order=order)
    else:  # fixed mask: SparseGPT's saliency through the pattern, then the OBS update
        criterion.diag = {t.param: u.diagonal().unsqueeze(0) for t in shared}
        masks = mask_group(group, shared, score_targets(ctx.model, shared, criterion))
        fixed = torch.cat([~masks[t.param] for t in shared])[r0:r1]
        new, pruned = sparsegpt_prune(W, u, criterion.blocksize, fixed=fixed,
                                      refine_steps=steps)
    if not all_finite(new):
        raise WeightError(f"sparse_gpt produced non-finite weights for {shared[0].name}; raise "
                          f"SparseGPTCriterion.percdamp or check the calibration data")
    return new, pruned


def stacked_rows_t(views, r0: int, r1: int) -> Tensor:
    """Rows ``[r0, r1)`` of the 2-D ``views`` stacked (``torch.cat(views)[r0:r1]``), transposed:
    ``[cols, r1 - r0]``, always a fresh contiguous tensor: the working layout of
    :func:`sparsegpt_prune`, which then updates it in place, never the layers' own memory (a
    one-row range or a ``[in, out]`` layer's view would otherwise be the weight itself). Only
    the rows asked for are copied, once: no stacked copy of every row first."""
    parts, at = [], 0
    for v in views:
        a, b = max(r0 - at, 0), min(r1 - at, v.shape[0])
        if a < b:
            parts.append(v[a:b])
        at += v.shape[0]
    if len(parts) <= 1:
        return (parts[0] if parts else views[0][:0]).t().clone(memory_format=torch.contiguous_format)
    return torch.cat([p.t() for p in parts], dim=1)


def adaptive_mode(pattern) -> str | None:
    """How SparseGPT chooses masks for a local-scope pattern: ``"unstructured"`` (1x1 blocks) and
    ``"n_of_m"`` (N:M at its full N/M target) adaptively, block by block; None: a fixed mask
    from the pattern (NxM blocks, channels, N:M below N/M where only some groups are pruned)."""
    from fractions import Fraction

    from ..selection import decimal_fraction
    from ..patterns.ninm import NInMPattern
    from ..patterns.nxm import NxMPattern

    if type(pattern) is NInMPattern:
        full = decimal_fraction(pattern.target_sparsity) == Fraction(pattern.n, pattern.m)
        if full and pattern.max_sparsity_ratio_per_op >= pattern.n / pattern.m:
            return "n_of_m"
        return None
    if type(pattern) is NxMPattern and pattern.pattern == "1x1":
        return "unstructured"
    return None


def _local_count(pattern, t) -> int:
    """The layer's pruned-weight count, as the local selection computes it (1x1 blocks)."""
    lo, hi = pattern.block_bounds(t.layout)
    return min(max(budget(pattern.target_sparsity, t.layout.numel), lo), hi)


def _apply_masks(ctx, targets, masks) -> None:
    with torch.no_grad():
        for t in targets:
            apply_keep_mask(ctx.model, t, masks[t.param])
            # not kept in ctx.masks: nothing after the rewrite needs them, and for a large model
            # they would be one byte per weight of the whole model


# ---------------------------------------------------------------------------- input statistics
class _InputStat:
    """Statistics of one distinct input (shared by the layers it feeds)."""

    __slots__ = ("sumsq", "hessian", "count", "members")

    def __init__(self):
        self.sumsq: Tensor | None = None
        self.hessian: Tensor | None = None
        self.count = 0
        self.members: list = []


class BlockInputStats:
    """The inputs of one block's target layers, reduced to what the criteria need.

    A layer owned by an ``nn.Linear`` (or Hugging Face ``Conv1D``) is observed with a forward
    pre-hook on its module; layers that receive the very same input tensor in a forward (q/k/v,
    gate/up) share one statistic, computed once. Other linear-kind uses (functional ``F.linear``)
    are seen by the dispatch-mode recorder. Wanda needs the per-feature sum of squares (the same
    float32 sums, in the same order, as the whole-model path); SparseGPT the Hessian ``X^T X``,
    and the sum of squares too where it takes the columns by descending input energy.

    After :meth:`stop_early`, a batch's forward ends as soon as every target has had its inputs
    of that batch: the statistics are the same, the layers after the last one never run.

    After :meth:`first_stage_only`, only the first *stage* of the targets is recorded (the
    ``targets`` are narrowed to it once it is known): the targets called first in the forward,
    with every target sharing their input (q/k/v; gate/up).
    """

    def __init__(self, model: nn.Module, targets):
        self.model = model
        self.targets = list(targets)
        self.need_hessian = {t.param for t in targets if _is_sparse_gpt(t.group)}
        # Wanda's statistic; also SparseGPT's column order where it takes one (_uses_act_order)
        self.need_sumsq = {t.param for t in targets
                           if t.param not in self.need_hessian or _uses_act_order(t)}
        self.stat_of: dict[str, _InputStat] = {}
        # input id -> (weak reference to it, its statistic): a weak reference lets an input die
        # when the forward drops it (q/k/v's input is dead by the MLP), and tells a new tensor
        # given a dead one's id apart from it
        self.seen: dict[int, tuple[weakref.ref, _InputStat]] = {}
        self.stop_after: dict[str, int] | None = None
        self.calls: dict[str, int] = {}         # calls of each target in this batch
        # uses of each target in one forward of the model (all inside this block unless the
        # weight is shared: then they never all come)
        self.uses = {t.param: t.uses_per_forward for t in self.targets}
        self.stage: set[str] | None = None   # first_stage_only: its members' params so far
        self.stage_open = False
        self.hooked, self.dispatched = [], []
        self._untaken: dict[int, set[str]] = {}   # per Hessian: layers yet to take it
        self.owner = {t.param: _owner(model, t) for t in self.targets}   # (see _owner)
        for t in self.targets:
            owner = self.owner[t.param]
            if _called_module(owner):
                self.hooked.append((owner, t))
            else:
                self.dispatched.append(t)
        self.recorder = (WeightInputRecorder(model, self.dispatched, lambda c: self._called(c.target, c.x))
                         if self.dispatched else None)

    def stop_early(self) -> None:
        """End each batch's forward (with :class:`StopForward`, which ``BlockStep.record``
        catches) once every target has been called as many times as it has uses in one forward
        of the model (its discovered uses, all inside this block unless the weight is shared:
        then it never stops). Only for a forward whose outputs are not used."""
        self.stop_after = {t.param: self.uses[t.param] for t in self.targets}

    def first_stage_only(self) -> None:
        """Record only the first stage of the targets (true sequential pruning: the later stages
        are recorded again once this one is pruned). The stage is found in the first batch's
        forward: the first target called, every target called with an input some member had
        (the same tensor: q/k/v after the input norm, gate/up after the post-attention norm),
        and every target called before all members have had all their uses (a weight used
        twice keeps its later layers in its stage; a weight also used outside the block takes
        every later layer). The first other call ends the stage: ``targets`` become its
        members, and the forward stops there if :meth:`stop_early` allows."""
        self.stage, self.stage_open = set(), True

    def _stage_takes(self, t, x: Tensor) -> bool:
        if t.param in self.stage:
            return True
        if not self.stage_open:
            return False
        hit = self.seen.get(id(x))
        if not self.stage or (hit is not None and hit[0]() is x) or not all(
                self.calls.get(p, 0) >= self.uses[p] for p in self.stage):
            self.stage.add(t.param)
            return True
        self._close_stage()
        if self.stop_after is not None:
            raise StopForward
        return False

    def _close_stage(self) -> None:
        """The stage is known: the targets are its members (all targets when none was called,
        so that :meth:`check_complete` names them)."""
        self.stage_open = False
        members = [t for t in self.targets if t.param in self.stage]
        if members:
            self.targets = members
            if self.stop_after is not None:
                self.stop_after = {t.param: self.stop_after[t.param] for t in members}

    @contextlib.contextmanager
    def installed(self):
        handles = [m.register_forward_pre_hook(self._hook(t)) for m, t in self.hooked]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.seen.clear()

    def context(self):
        if self.recorder is None:
            return contextlib.nullcontext()
        self.recorder.reset()
        stack = contextlib.ExitStack()
        stack.enter_context(_NoFusedFastPaths())
        stack.enter_context(self.recorder)
        return stack

    def new_batch(self, b: int) -> None:
        if self.stage_open and b > 0:   # the first batch ran every target it calls
            self._close_stage()
        self.seen.clear()
        self.calls.clear()

    def _hook(self, t):
        def pre_hook(module, args):
            if args:
                self._called(t, args[0])
        return pre_hook

    def _called(self, t, x: Tensor) -> None:
        if self.stage is not None and not self._stage_takes(t, x):
            return
        self.observe(t, x)
        self.calls[t.param] = self.calls.get(t.param, 0) + 1
        if self.stop_after is not None:
            if self.uses[t.param] == 1:     # the layers sharing this input (known after the
                for m in self.stat_of[t.param].members:   # first batch) have nothing more to add
                    if self.uses[m.param] == 1:
                        self.calls.setdefault(m.param, 1)
            if len(self.calls) == len(self.stop_after) and all(
                    self.calls[p] >= n for p, n in self.stop_after.items()):
                raise StopForward

    def observe(self, t, x: Tensor) -> None:
        hit = self.seen.get(id(x))
        stat = self.stat_of.get(t.param)
        if hit is not None and hit[0]() is x:
            shared = hit[1]
            if stat is None:                     # first batch: join the input's statistic
                self.stat_of[t.param] = shared
                shared.members.append(t)
                self._fill_missing(shared, t, x)
                return
            if stat is shared:                   # already counted for this input
                return
        if stat is None:
            stat = self.stat_of[t.param] = _InputStat()
            stat.members.append(t)
        self._accumulate(stat, t, x)
        self.seen[id(x)] = (weakref.ref(x), stat)

    def _features(self, t, x: Tensor) -> Tensor:
        return linear_features(x, t.geometry, t.name)

    def _needs(self, stat: _InputStat) -> tuple[bool, bool]:
        params = {m.param for m in stat.members}
        return bool(params & self.need_sumsq), bool(params & self.need_hessian)

    def _accumulate(self, stat: _InputStat, t, x: Tensor) -> None:
        feats = self._features(t, x)
        want_sumsq, want_hessian = self._needs(stat)
        if want_sumsq:
            self.add_sumsq(stat, feats.pow(2).sum(dim=0))
        if want_hessian:
            self.add_hessian(stat, self._gram(feats))
        stat.count += feats.shape[0]

    def add_sumsq(self, stat: _InputStat, s: Tensor) -> None:
        """One batch's sum of squares into the running sum (data-parallel calibration keeps each
        contribution too, to sum all ranks' in the single-process order)."""
        stat.sumsq = s if stat.sumsq is None else stat.sumsq + s

    def _gram(self, feats: Tensor) -> Tensor:
        """``X^T X`` (float32), a fresh product freed once added: a buffer kept for the next call
        would be alive through the rest of the forward, at the moment its activations peak."""
        return torch.mm(feats.T, feats)

    def add_hessian(self, stat: _InputStat, h: Tensor) -> None:
        """One call's float32 ``X^T X`` into the float64 running sum, in place. A float64 sum of
        float32 products rounds only where one entry's products span more than about 2^29 in
        magnitude, so the float32 Hessian does not depend on the order of the sum (block batches
        split over ranks and all-reduced) but in such rare entries; SparseGPT's masks then
        match."""
        if stat.hessian is None:
            stat.hessian = torch.zeros(h.shape, dtype=torch.float64, device=h.device)
        add_in_chunks_(stat.hessian, h)

    def _fill_missing(self, stat: _InputStat, t, x: Tensor) -> None:
        """A layer joining a shared input in the first batch may need what the others did not."""
        feats = None
        if t.param in self.need_sumsq and stat.sumsq is None:
            feats = self._features(t, x)
            self.add_sumsq(stat, feats.pow(2).sum(dim=0))
        if t.param in self.need_hessian and stat.hessian is None:
            feats = self._features(t, x) if feats is None else feats
            self.add_hessian(stat, self._gram(feats))

    def check_complete(self, block_name: str) -> None:
        if self.stage_open:
            self._close_stage()
        missing = [t.name for t in self.targets if t.param not in self.stat_of]
        if missing:
            raise WeightError(f"block {block_name}: the calibration never ran layer(s) {missing[:5]}; "
                              f"check that the batches reach them (or set block_sequential: false)")

    def sumsq(self, t) -> Tensor:
        return self.stat_of[t.param].sumsq

    def hessian(self, t) -> Tensor:
        """The float32 mean ``X^T X`` (divided in float64, rounded once to float32; no float64
        temporary)."""
        stat = self.stat_of[t.param]
        out = torch.empty(stat.hessian.shape, dtype=torch.float32, device=stat.hessian.device)
        total, mean, count = stat.hessian.view(-1), out.view(-1), max(stat.count, 1)
        step = conversion_step(total)      # (a whole-matrix division would make a float64
        for s in range(0, total.numel(), step):             # quotient first on the CPU)
            torch.div(total[s:s + step], count, out=mean[s:s + step])
        return out

    def take_hessian(self, shared) -> Tensor:
        """:meth:`hessian` of the layers ``shared`` (one input); the float64 sum is released
        once every layer using it has taken it (layers of other groups may share the input)."""
        lead = shared[0]
        h = self.hessian(lead)
        stat = self.stat_of[lead.param]
        left = self._untaken.setdefault(id(stat), {m.param for m in stat.members} & self.need_hessian)
        left.difference_update(t.param for t in shared)
        if not left:
            stat.hessian = None
        return h

    def shared_groups(self, targets) -> list[list]:
        """``targets`` grouped by shared input statistic, in first-seen order."""
        out: dict[int, list] = {}
        for t in targets:
            out.setdefault(id(self.stat_of[t.param]), []).append(t)
        return list(out.values())


# Elements per step when float32 meets float64 (Hessian sums and means): on the CPU an operation
# mixing the two dtypes makes a converted copy of its whole operand first, 8 bytes per entry of
# the largest Hessian; by steps, the copy is this small.
CONVERT_CHUNK = 1 << 15


def conversion_step(t: Tensor) -> int:
    """How many entries of ``t`` one mixed-dtype step takes: :data:`CONVERT_CHUNK` on the CPU;
    all of them elsewhere (GPU kernels convert as they go, and a step is a kernel launch)."""
    return CONVERT_CHUNK if t.device.type == "cpu" else max(t.numel(), 1)


def add_in_chunks_(total: Tensor, part: Tensor) -> Tensor:
    """``total += part`` in place for a float64 ``total`` and a float32 (or float64) ``part`` of
    one shape, both contiguous: the same bits as ``total.add_(part)``, through small converted
    pieces."""
    flat_total, flat_part = total.view(-1), part.view(-1)
    step = conversion_step(total)
    for s in range(0, flat_total.numel(), step):
        flat_total[s:s + step].add_(flat_part[s:s + step])
    return total


def _called_module(owner: nn.Module | None) -> bool:
    """Whether ``owner`` (:func:`_owner`) uses its weight in its own forward, so that a forward
    hook on it sees every use: ``nn.Linear`` and HF ``Conv1D``; a weight of any other module may
    be used by its parent (``F.linear(x, child.weight)``) and is seen at the op instead."""
    return owner is not None and (isinstance(owner, nn.Linear) or type(owner).__name__ == "Conv1D")


def _owner(model: nn.Module, t):
    module_name, _, attr = t.param.rpartition(".")
    try:
        owner = model.get_submodule(module_name)
    except AttributeError:
        return None
    return owner if attr == "weight" and getattr(owner, "weight", None) is model.get_parameter(t.param) else None
