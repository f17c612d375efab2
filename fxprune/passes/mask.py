"""mask: each group's pattern turns the scores into keep-masks (global or local ranking)."""
from __future__ import annotations

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
            ctx.masks.update(pattern.get_masks(scores, layouts, consume=True))
