"""compact: remove pruned channels physically, so the model gets smaller and faster.

With ``compact=True`` (and example inputs) the mask pass has already selected coupled output
channels as one (:func:`fxprune.compaction.plan_channels`) and the rewrite pass zeroed every
per-channel tensor they feed; this pass, run last, slices them out and checks the outputs
(:func:`fxprune.compaction.compact_model`), then adds ``compaction`` to the sparsity report.
"""
from __future__ import annotations

from ..compaction import compact_model, nothing_to_compact, summary
from ..errors import FxPruneError
from .base import Pass
from .context import PruneContext


def compact_passes(passes: list) -> list:
    """The pipeline of ``compact=True``: the given passes, then the compact pass."""
    return [*passes, CompactPass()]


class CompactPass(Pass):
    name = "compact"
    keeps_module_tree = True

    def requires(self, ctx: PruneContext) -> None:
        if ctx.compaction is None or ctx.report is None:
            raise FxPruneError("compact needs the mask pass (with example inputs) and the record pass "
                               "before it (run fxprune.transform(..., example_inputs, compact=True))")

    def call(self, ctx: PruneContext) -> None:
        plan, model = ctx.compaction, ctx.model
        if plan.analysis is None:  # no group removes output channels: nothing to slice
            ctx.report.compaction = nothing_to_compact(model, plan)
            return
        lookup = ctx.module_lookup()
        figures = compact_model(model, plan, ctx.example_inputs, lookup)
        ctx.report.compaction = summary(model, ctx.targets, plan, figures, lookup)

    def ensures(self, ctx: PruneContext) -> None:
        assert ctx.report.compaction is not None
