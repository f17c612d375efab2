"""record: the sparsity report (docs/design.md, "Metadata"), counted from the rewritten weights, attached to the model."""
from __future__ import annotations

import torch

from .._version import __version__
from ..report import LayerReport, SparsityReport, attach_report, count_zeros
from .base import Pass
from .context import PruneContext


class RecordPass(Pass):
    name = "record"
    keeps_module_tree = True

    def call(self, ctx: PruneContext) -> None:
        layers = []
        lookup = ctx.module_lookup()
        for t in ctx.targets.values():
            weight = lookup.parameter(t.param).detach()
            numel = weight.numel()
            if t.param in ctx.zero_counts:   # counted when pruned (the weight may be released)
                zeros = ctx.zero_counts[t.param]
            else:
                zeros = count_zeros(weight)
            layers.append(layer_report(t, zeros, numel))
        ctx.report = build_report(ctx, layers)
        attach_report(ctx.model, ctx.report)


def layer_report(t, zeros: int, numel: int) -> LayerReport:
    """One target's record, from the zeros counted in its rewritten weight."""
    g = t.group
    return LayerReport(
        name=t.name, param=t.param, module_type=t.module_type,
        weight_shape=list(t.geometry.weight_shape), view_shape=list(t.geometry.view_shape),
        pattern=g.pattern if g else None,
        block_shape=t.layout.block_shape if t.layout else None,
        scope=g.pruning_scope if g else None, criterion=g.pruning_type if g else None,
        requested_sparsity=float(g.target_sparsity) if g else 0.0,
        achieved_sparsity=zeros / numel if numel else 0.0,
        numel=numel, zeros=zeros, status=t.status, group=g.index if g else None,
        aliases=list(t.aliases))


def build_report(ctx: PruneContext, layers: list[LayerReport]) -> SparsityReport:
    return SparsityReport(layers=layers, config=ctx.config.to_dict(),
                          versions={"fxprune": __version__, "torch": torch.__version__},
                          capture=ctx.capture_method,
                          calibration=ctx.block_plan.summary() if ctx.block_plan is not None else None)
