"""mask: each group's pattern turns the scores into keep-masks (global or local ranking).

Every mask is checked (bool, view-shaped) before the rewrite pass touches a weight, so a bad
user pattern raises here and leaves the model as it was. A group whose target the config's
caps or the block size make unreachable gets a warning that says what was achieved and why.
"""
from __future__ import annotations

import inspect
import warnings

import torch

from ..config import budget
from ..errors import FxPruneError
from ..selection import materialize
from .base import Pass
from .context import PruneContext


class MaskPass(Pass):
    name = "mask"

    def requires(self, ctx: PruneContext) -> None:
        missing = [t.param for t in ctx.selected() if t.param not in ctx.scores]
        if missing:
            raise RuntimeError(f"mask needs scores for {missing[:3]}: run the score pass first")

    def call(self, ctx: PruneContext) -> None:
        for group in ctx.groups:
            targets = ctx.selected(group)
            if not targets:
                continue
            pattern = targets[0].pattern
            # Scores are as large as the weights: hand them over, so the pattern frees each
            # layer's as soon as it is done with them.
            scores = {t.param: ctx.scores.pop(t.param) for t in targets}
            layouts = {t.param: t.layout for t in targets}
            # A user pattern may override get_masks(scores, layouts) from before `consume` and
            # LazyScores existed: it gets plain tensors.
            if "consume" in inspect.signature(pattern.get_masks).parameters:
                masks = pattern.get_masks(scores, layouts, consume=True)
            else:
                masks = pattern.get_masks({p: materialize(s) for p, s in scores.items()}, layouts)
            for t in targets:
                _check_mask(pattern, t, masks.get(t.param))
            ctx.masks.update({t.param: masks[t.param] for t in targets})
            _warn_if_target_missed(group, pattern, targets, masks)


def _check_mask(pattern, t, mask) -> None:
    view_shape = tuple(t.geometry.view_shape)
    if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
            and tuple(mask.shape) == view_shape):
        got = "no mask" if mask is None else (
            f"{type(mask).__name__} {getattr(mask, 'dtype', '')} {tuple(getattr(mask, 'shape', ()))}")
        raise FxPruneError(
            f"pattern {pattern.pattern!r} ({type(pattern).__name__}.get_masks) gave {got} for "
            f"{t.param}; expected a bool keep-mask of the 2-D view's shape {view_shape}")


def _warn_if_target_missed(group, pattern, targets, masks) -> None:
    total = sum(t.layout.numel for t in targets)
    wanted = budget(pattern.target_sparsity, total)
    pruned = sum(t.layout.numel - int(torch.count_nonzero(masks[t.param])) for t in targets)
    bounds = [pattern.block_bounds(t.layout) for t in targets]
    most = sum(hi * t.layout.block_weights for (_, hi), t in zip(bounds, targets))
    least = sum(lo * t.layout.block_weights for (lo, _), t in zip(bounds, targets))
    where = f"{group.where} (pattern {group.pattern!r}, {len(targets)} layers)"
    achieved = f"achieved sparsity {pruned / total:.4f}, target_sparsity {group.target_sparsity}"
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
    warnings.warn(f"{where}: {achieved}: {reason}", stacklevel=2)
