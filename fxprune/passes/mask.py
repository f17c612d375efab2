"""mask: each group's pattern turns the scores into keep-masks (global or local ranking).

With example inputs, a group whose pattern removes whole output channels is selected by coupled
channel classes instead (:func:`fxprune.compaction.plan_channels`: channels tied by a residual
add, an attention head... go together), ``compact=True`` or not, so the masks do not depend on
whether the model is compacted now, later (``fxprune.compact``) or never.

:func:`mask_group` is the one mask path (the mask pass, the compaction run and
:class:`fxprune.Pruner` use it). Every mask is checked (bool, view-shaped) before anything
touches a weight, so a bad user pattern raises here and leaves the model as it was. A group whose
target the config's caps or the block size make unreachable gets a warning that says what was
achieved and why.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Mapping, Sequence

import torch

from ..compaction import joint_selection, plan_channels
from ..config import GroupConfig
from ..errors import ExtensionError, FxPruneError
from ..extensions import calling, who
from ..selection import Scores, budget, materialize
from .base import Pass
from .context import PruneContext, Target


class MaskPass(Pass):
    name = "mask"

    def requires(self, ctx: PruneContext) -> None:
        missing = [t.param for t in ctx.selected() if t.param not in ctx.scores]
        if missing:
            raise RuntimeError(f"mask needs scores for {missing[:3]}: run the score pass first")
        if ctx.compact and not ctx.shapes_known:
            raise FxPruneError(
                "compact=True needs example_inputs: compaction follows tensor shapes through the "
                "graph, which only a capture with inputs records; pass example_inputs=(x,)")

    def call(self, ctx: PruneContext) -> None:
        joint = []  # groups whose coupled output channels are selected as one
        for group in ctx.groups:
            targets = ctx.selected(group)
            if not targets:
                continue
            if joint_selection(ctx, targets[0].pattern):
                joint.append(group)
            else:
                ctx.masks.update(mask_group(group, targets, take_scores(ctx, targets)))
        if ctx.shapes_known:  # the channel plan (empty without joint groups)
            ctx.compaction = plan_channels(ctx, joint)


def take_scores(ctx: PruneContext, targets: Sequence[Target]) -> dict[str, Scores]:
    """Hand the targets' scores over from the context: they are as large as the weights, and the
    pattern frees each layer's as soon as it is done with them."""
    return {t.param: ctx.scores.pop(t.param) for t in targets}


def mask_group(group: GroupConfig, targets: Sequence[Target], scores: dict[str, Scores], *,
               target_sparsity: float | None = None, warn: bool = True) -> dict[str, torch.Tensor]:
    """Checked keep-masks (param -> bool, view-shaped) of ``targets``, all of one pruning group.

    ``targets`` may be any subset of the group's selected targets: global scope then ranks that
    subset alone. ``scores`` (param -> tensor or LazyScores, from
    :func:`~fxprune.passes.score.score_targets`) is consumed. ``target_sparsity`` overrides the
    group's (the Pruner's scheduled sparsity). ``warn``: warn when the target cannot be reached.
    """
    pattern = targets[0].pattern
    target = pattern.target_sparsity if target_sparsity is None else float(target_sparsity)
    layouts = {t.param: t.layout for t in targets}
    accepts = inspect.signature(pattern.get_masks).parameters
    kwargs = {}
    if "target_sparsity" in accepts:
        kwargs["target_sparsity"] = target
    elif target != pattern.target_sparsity:
        raise FxPruneError(
            f"pattern {pattern.pattern!r} ({type(pattern).__name__}.get_masks) does not take "
            f"target_sparsity=, which pruning at a sparsity other than the config's (fxprune.Pruner's "
            f"schedule) needs; add `*, target_sparsity=None` to its signature")
    with calling(pattern, "get_masks", f"for {group.where}"):
        if "consume" in accepts:
            masks = pattern.get_masks(scores, layouts, consume=True, **kwargs)
        else:  # a user pattern written before `consume` and LazyScores existed: plain tensors
            masks = pattern.get_masks({p: materialize(s) for p, s in scores.items()}, layouts, **kwargs)
    if not isinstance(masks, Mapping):
        raise ExtensionError(f"{who(pattern, 'get_masks')} returned {type(masks).__name__}; expected "
                             f"a dict of parameter name -> bool keep-mask")
    for t in targets:
        check_mask(pattern, t, masks.get(t.param))
    if warn:
        warn_if_target_missed(group, pattern, targets, masks, target)
    return {t.param: masks[t.param] for t in targets}


def check_mask(pattern, t: Target, mask) -> None:
    view_shape = tuple(t.geometry.view_shape)
    if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
            and tuple(mask.shape) == view_shape):
        got = "no mask" if mask is None else (
            f"{type(mask).__name__} {getattr(mask, 'dtype', '')} {tuple(getattr(mask, 'shape', ()))}")
        raise ExtensionError(
            f"pattern {pattern.pattern!r} ({type(pattern).__name__}.get_masks) gave {got} for "
            f"{t.param}; expected a bool keep-mask of the 2-D view's shape {view_shape}")
    if pattern.prunes_output_channels and mask.numel():
        # the rewrite zeroes a pruned row's bias and BatchNorm entries: rows are kept or pruned whole
        whole = mask.all(dim=1) | ~mask.any(dim=1)
        if not bool(whole.all()):
            row = int((~whole).nonzero()[0])
            raise ExtensionError(
                f"pattern {pattern.pattern!r} ({type(pattern).__name__}) declares "
                f"prunes_output_channels but its mask for {t.param} prunes part of output channel "
                f"{row}; prune whole rows of the 2-D view, or set prunes_output_channels = False")


def warn_if_target_missed(group: GroupConfig, pattern, targets: Sequence[Target],
                          masks: Mapping[str, torch.Tensor], target: float) -> None:
    total = sum(t.layout.numel for t in targets)
    wanted = budget(target, total)
    pruned = sum(t.layout.numel - int(torch.count_nonzero(masks[t.param])) for t in targets)
    bounds = [pattern.block_bounds(t.layout) for t in targets]
    most = sum(hi * t.layout.block_weights for (_, hi), t in zip(bounds, targets))
    least = sum(lo * t.layout.block_weights for (lo, _), t in zip(bounds, targets))
    where = f"{group.where} (pattern {group.pattern!r}, {len(targets)} layers)"
    achieved = f"achieved sparsity {pruned / total:.4f}, target_sparsity {target:g}"
    if most < wanted:
        reason = (f"max_sparsity_ratio_per_op {group.max_sparsity_ratio_per_op} lets each layer "
                  f"prune at most that fraction in whole blocks ({most} of {total} weights); "
                  f"raise max_sparsity_ratio_per_op to reach the target")
    elif least > wanted:
        reason = (f"min_sparsity_ratio_per_op {group.min_sparsity_ratio_per_op} makes every layer "
                  f"prune at least that fraction ({least} of {total} weights)")
    elif pruned == 0 and wanted > 0:
        reason = ("the target rounds down to zero whole blocks of the pattern; nothing was pruned "
                  "(raise target_sparsity or use a smaller block)")
    else:
        return
    warnings.warn(f"{where}: {achieved}: {reason}", stacklevel=3)
