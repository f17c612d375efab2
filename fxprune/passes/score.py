"""score: one float32 score per weight, on the 2-D view, with the group's criterion.

:func:`score_targets` is the one score path (the score pass, the compaction run and
:class:`fxprune.Pruner` use it): it checks every weight for NaN/inf first (an error naming the
layer), so nothing is rewritten when a weight is bad, and checks what the criterion returns.
Scores of weights that are already zero are forced to 0, the lowest possible score, so an
already-pruned weight is pruned first and stays pruned.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..aten import ModuleLookup
from ..checks import check_weights
from ..criteria import Criterion
from ..registry import get_criterion_class
from ..errors import ExtensionError, WeightError
from ..extensions import calling, is_user_code, layer_of, who
from ..geometry import to_view_2d
from ..selection import Scores
from .base import Pass
from .context import PruneContext, Target

FIX_WEIGHTS = "fix or re-initialise the weights before pruning"


class CheckWeightsPass(Pass):
    """Every selected weight (values, dtype, NaN/inf) before any criterion runs: a data-aware
    criterion would otherwise report a bad weight as a symptom in another layer (a singular
    Hessian, non-finite scores)."""

    name = "check"
    keeps_module_tree = True

    def call(self, ctx: PruneContext) -> None:
        check_weights(ctx.model, ctx.selected(), ctx.module_lookup())


class ScorePass(Pass):
    name = "score"

    def call(self, ctx: PruneContext) -> None:
        lookup = ctx.module_lookup()
        check_not_meta(ctx.model, ctx.selected(), lookup)
        done, total = 0, len(ctx.selected())
        for group in ctx.groups:
            targets = ctx.selected(group)
            if not targets:
                continue
            cls = get_criterion_class(group.pruning_type, group.where)
            with calling(cls, "__init__", f"for {group.where}"):
                criterion = cls(group)
            with calling(criterion, "prepare", f"for {group.where}"):
                criterion.prepare(ctx)
            ctx.criteria[group.index] = criterion  # the rewrite pass calls its update_weights
            # lazy where the criterion can (|w|): a layer's scores are computed when the mask
            # pass reads them and freed after, never held for every layer at once; the check
            # pass has just checked every selected weight for NaN/inf
            for t in targets:
                ctx.scores.update(score_targets(ctx.model, [t], criterion, lazy=True, checked=True,
                                                lookup=lookup))
                done += 1
                ctx.tick("score", done, total)


def score_targets(model: torch.nn.Module, targets: Sequence[Target], criterion: Criterion, *,
                  lazy: bool = False, when: str = "", fix: str = FIX_WEIGHTS,
                  checked: bool = False, lookup: ModuleLookup | None = None) -> dict[str, Scores]:
    """Checked scores of ``targets`` (any subset of a group's selected targets), param -> scores.

    Each is view-shaped float32, finite, >= 0 and +0.0 where the weight is zero. With ``lazy``,
    a criterion that recomputes its scores cheaply (magnitude) gives a
    :class:`~fxprune.selection.LazyScores` instead of a tensor held for the layer. The criterion
    must be prepared (``criterion.prepare(ctx)`` for data-aware ones). A NaN/inf weight is a
    WeightError naming the layer, ``when`` (e.g. " at step 3") and ``fix``; ``checked``: the
    weights were checked for NaN/inf already (:class:`CheckWeightsPass`), which lazy scores
    (computed from them later, unchecked) then do not repeat. ``lookup``: a
    :class:`~fxprune.aten.ModuleLookup` of ``model``, for a caller scoring many layers.
    """
    parameter = model.get_parameter if lookup is None else lookup.parameter
    check_not_meta(model, targets, lookup)
    out: dict[str, Scores] = {}
    for t in targets:
        weight = parameter(t.param).detach()
        with calling(criterion, "lazy_scores", f"for {layer_of(t)}"):
            source = criterion.lazy_scores(t.param, weight, t.geometry) if lazy else None
        if source is not None:  # recomputed when needed (|w|): not held for every layer
            if not checked:
                check_finite(t, weight, when, fix)
            out[t.param] = source
        else:
            out[t.param] = _view_scores(criterion, t, weight, when, fix)
    return out


def check_not_meta(model: torch.nn.Module, targets: Sequence[Target], lookup: ModuleLookup | None = None) -> None:
    parameter = model.get_parameter if lookup is None else lookup.parameter
    for t in targets:
        if parameter(t.param).is_meta:  # no values: nothing to rank
            raise WeightError(f"layer {t.name} ({t.param}) is on the meta device and has no values "
                              f"to prune; load the weights first (e.g. model.to_empty(device='cpu') "
                              f"then load_state_dict)")


def _view_scores(criterion: Criterion, t: Target, weight: torch.Tensor, when: str, fix: str) -> torch.Tensor:
    """The criterion's scores of one layer, checked: view-shaped float32, finite, >= 0, and +0.0
    where the weight is zero."""
    if not criterion.zero_weights_score_zero:  # else |w| scores show NaN/inf below
        check_finite(t, weight, when, fix)
    view = to_view_2d(weight, t.geometry)
    with calling(criterion, "view_scores", f"for {layer_of(t)}"):
        scores = criterion.view_scores(t.param, view)
    kind = criterion.name or type(criterion).__name__
    # What a user criterion returns is its contract's business (ExtensionError naming the class);
    # a built-in one's bad scores come from the data (WeightError).
    user = is_user_code(type(criterion).view_scores)
    error = ExtensionError if user else WeightError
    source = who(criterion, "view_scores") if user else f"criterion {kind!r}"
    if not isinstance(scores, torch.Tensor) or scores.shape != view.shape or scores.dtype != torch.float32:
        got = (f"{tuple(scores.shape)} / {scores.dtype}" if isinstance(scores, torch.Tensor)
               else type(scores).__name__)
        raise error(f"{source} returned scores of shape {got} for {layer_of(t)}; "
                    f"expected {tuple(view.shape)} / torch.float32")
    scores = scores.contiguous()
    if not criterion.zero_weights_score_zero:
        scores.masked_fill_(view == 0, 0.0)
        scores += 0.0  # -0.0 -> +0.0: selection compares the float bits as ints
    if scores.numel():
        low, high = torch.aminmax(scores)
        if not (low >= 0 and torch.isfinite(high)):
            check_finite(t, weight, when, fix)
            raise error(f"{source} gave {layer_of(t)} scores that are not finite and >= 0 "
                        f"(min {float(low)}, max {float(high)}){when}")
    return scores


def check_finite(t: Target, weight: torch.Tensor, when: str = "", fix: str = FIX_WEIGHTS) -> None:
    # A finite sum means finite entries (one cheap pass); a non-finite one may be an overflow.
    if torch.isfinite(weight.sum(dtype=torch.float32)) or torch.isfinite(weight).all():
        return
    bad = int((~torch.isfinite(weight)).sum())
    raise WeightError(f"layer {t.name} ({t.param}) has {bad} NaN/inf weight values{when}; {fix}")
