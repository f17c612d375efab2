"""score: one float32 score per weight, on the 2-D view, with the group's criterion.

Checks every selected weight for NaN/inf first (an error naming the layer), so nothing is
rewritten when a weight is bad. Scores of weights that are already zero are forced to 0, the
lowest possible score, so an already-pruned weight is pruned first and stays pruned.
"""
from __future__ import annotations

import torch

from ..checks import check_weights
from ..criteria import get_criterion_class
from ..errors import WeightError
from ..geometry import to_view_2d
from .base import Pass
from .context import PruneContext


class ScorePass(Pass):
    name = "score"

    def call(self, ctx: PruneContext) -> None:
        done, total = 0, len(ctx.selected())
        # Every selected weight, before any criterion runs: a data-aware criterion would otherwise
        # report a NaN as a symptom (a singular Hessian, non-finite scores) of a later layer.
        check_weights(ctx.model, ctx.selected())
        for group in ctx.groups:
            targets = ctx.selected(group)
            if not targets:
                continue
            criterion = get_criterion_class(group.pruning_type, group.where)(group)
            criterion.prepare(ctx)
            ctx.criteria[group.index] = criterion  # the rewrite pass calls its update_weights
            for t in targets:
                weight = ctx.model.get_parameter(t.param).detach()
                # Compaction reads every layer's scores at once: it gets real tensors.
                lazy = None if ctx.compact else criterion.lazy_scores(t.param, weight, t.geometry)
                if lazy is not None:  # recomputed when needed (|w|): not held for every layer
                    ctx.scores[t.param] = lazy
                else:
                    ctx.scores[t.param] = _view_scores(criterion, group, t, weight)
                done += 1
                ctx.tick("score", done, total)


def _view_scores(criterion, group, t, weight: torch.Tensor) -> torch.Tensor:
    """The criterion's scores of one layer, checked: view-shaped float32, finite, >= 0, and +0.0
    where the weight is zero."""
    view = to_view_2d(weight, t.geometry)
    scores = criterion.view_scores(t.param, view)
    if scores.shape != view.shape or scores.dtype != torch.float32:
        raise WeightError(f"criterion {group.pruning_type!r} returned scores of shape "
                          f"{tuple(scores.shape)} / {scores.dtype} for {t.param}; expected "
                          f"{tuple(view.shape)} / torch.float32")
    scores = scores.contiguous()
    if not criterion.zero_weights_score_zero:
        scores.masked_fill_(view == 0, 0.0)
        scores += 0.0  # -0.0 -> +0.0: selection compares the float bits as ints
    low, high = torch.aminmax(scores)
    if not (low >= 0 and torch.isfinite(high)):
        raise WeightError(f"criterion {group.pruning_type!r} gave {t.param} scores that are "
                          f"not finite and >= 0 (min {float(low)}, max {float(high)})")
    return scores
