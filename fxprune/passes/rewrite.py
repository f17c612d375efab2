"""rewrite: ``weight.mul_(mask)`` in place, keeping the parameter objects, dtype and device.

A criterion that adjusts the kept weights (SparseGPT) does so first, through its
``update_weights(ctx, targets)``; every other criterion leaves them as they are.

For output-channel patterns (``1xchannel``, ``Nxchannel``) a pruned channel goes as a whole: the
layer's bias entry and the following BatchNorm's weight, bias and running mean of that channel
are zeroed too, so the channel outputs exactly zero rather than a BatchNorm constant; with
example inputs, every per-channel tensor of a removed channel class is zeroed
(:func:`fxprune.compaction.zero_removed`).
"""
from __future__ import annotations

import torch

from ..aten import ModuleLookup
from ..compaction import joint_selection, output_dim, zero_removed
from ..geometry import from_view_2d
from ..extensions import calling
from .base import Pass
from .context import PruneContext


class RewritePass(Pass):
    name = "rewrite"

    def call(self, ctx: PruneContext) -> None:
        for group in ctx.groups:  # group by group: a criterion may first update the kept weights
            criterion = ctx.criteria.get(group.index)
            if criterion is not None:
                with calling(criterion, "update_weights", f"for {group.where}"):
                    criterion.update_weights(ctx, ctx.selected(group))  # SparseGPT's OBS update
            self._mask(ctx, ctx.selected(group))
        plan = ctx.compaction
        if plan is not None and plan.analysis is not None:
            # removed channel classes: zero every per-channel tensor they feed (a BatchNorm after
            # an activation, GroupNorm affine...), so the masked model computes what the
            # compacted one will
            zero_removed(ctx.model, plan, ctx.module_lookup())

    def _mask(self, ctx: PruneContext, targets) -> None:
        model, lookup = ctx.model, ctx.module_lookup()
        with torch.no_grad():
            for done, t in enumerate(targets, 1):
                if not _zeroed_by_plan(ctx, t):
                    apply_keep_mask(model, t, ctx.masks[t.param], lookup)
                t.status = "pruned"
                ctx.tick("rewrite", done, len(targets))


def _zeroed_by_plan(ctx: PruneContext, t) -> bool:
    """Whether :func:`zero_removed` zeroes what ``t``'s mask prunes: the rows of its removed
    channel classes (its mask is those rows alone), on an output axis the plan zeroes (source
    role), with the bias and norm entries they feed; or its mask prunes nothing."""
    plan = ctx.compaction
    if plan is None or plan.analysis is None or not joint_selection(ctx, t.pattern):
        return False
    ax = plan.analysis.axes.get((t.param, output_dim(t)))
    return ax is None or bool(ax.roles & {"source", "zero"})


def apply_keep_mask(model, t, keep: torch.Tensor, lookup: ModuleLookup | None = None) -> None:
    """Zero the weights of ``t`` that ``keep`` (the view's keep-mask) prunes, in place, and the
    bias/BatchNorm entries of whole pruned channels. Call under ``torch.no_grad()``. ``lookup``:
    a :class:`~fxprune.aten.ModuleLookup` of ``model``, for a caller masking many layers."""
    weight = model.get_parameter(t.param) if lookup is None else lookup.parameter(t.param)
    if t.pattern.prunes_output_channels:
        # rows are kept or pruned whole (checked with the mask): only the pruned rows are
        # touched, as ``mul_`` by the mask would (a zero keeps the weight's sign)
        dead = dead_rows(keep)
        index = dead.nonzero().flatten().to(weight.device)
        if index.numel():
            dim = output_dim(t)
            weight.index_copy_(dim, index, weight.index_select(dim, index).mul_(0))
        _zero_followers(model, t, dead, lookup)
        return
    weight.mul_(from_view_2d(keep, t.geometry).to(device=weight.device, dtype=weight.dtype))


def dead_rows(keep: torch.Tensor) -> torch.Tensor:
    """The rows (output channels) a whole-row keep-mask prunes."""
    return ~keep[:, 0] if keep.shape[1] else torch.ones(keep.shape[0], dtype=torch.bool, device=keep.device)


def zero_pruned_channels(model, t, keep: torch.Tensor) -> None:
    """Output-channel patterns: zero the bias and BatchNorm entries of the channels that ``keep``
    (the view's keep-mask) prunes whole; other patterns: nothing."""
    if t.pattern.prunes_output_channels:
        _zero_followers(model, t, ~keep.any(dim=1))  # rows of the view are output channels


def _zero_followers(model, t, dead: torch.Tensor, lookup: ModuleLookup | None = None) -> None:
    for name in ([t.bias] if t.bias else []) + t.channel_followers:
        _zero_channels(model, name, dead, lookup)


def _zero_channels(model, name: str, dead: torch.Tensor, lookup: ModuleLookup | None = None) -> None:
    module_name, _, attr = name.rpartition(".")
    tensor = getattr(model.get_submodule(module_name) if lookup is None else lookup.submodule(module_name), attr)
    if tensor is not None and tensor.shape[:1] == dead.shape:
        tensor[dead.to(tensor.device)] = 0
