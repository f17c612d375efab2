"""attach: choose the targets of each pruning group and give each the group's pattern object.

A target belongs to the first group that selects it (``pruning_op_types``, then ``op_names``,
minus ``excluded_op_names``). Like INC, the last linear layer of the graph (the classifier /
``lm_head``) is excluded unless ``exclude_last_linear: false``. A group that selects nothing, an
``op_names`` regex that matches no layer, or a pattern that fits none of a group's layers is a
ConfigError, not a silent no-op.
"""
from __future__ import annotations

import re

from ..errors import ConfigError
from ..extensions import calling, check_block_layout, layer_of
from ..patterns.base import BlockLayout
from ..registry import get_pattern
from .base import Pass
from .context import PruneContext, Target

LAST_LINEAR = "excluded: last linear layer (exclude_last_linear: false prunes it)"

class AttachPass(Pass):
    name = "attach"
    keeps_module_tree = True

    def call(self, ctx: PruneContext) -> None:
        targets = list(ctx.targets.values())
        ctx.groups = ctx.config.groups()
        if ctx.config.exclude_last_linear:
            linear = [t for t in targets if t.op == "linear"]
            if linear:
                max(linear, key=lambda t: t.position).status = LAST_LINEAR
        why_not: dict[str, str] = {}
        for group in ctx.groups:
            _check_regexes(group, targets)
            chosen = []
            for t in targets:
                if t.status != "candidate":
                    continue
                reason = _rejection(group, t)
                if reason:
                    why_not.setdefault(t.param, reason)
                else:
                    chosen.append(t)
            if not chosen:
                raise ConfigError(f"{group.where} selects no layer: {_summary(group, targets)}"
                                  f"{_last_linear_hint(group, targets)}")
            lookup = ctx.module_lookup()
            pattern = get_pattern(group, {t.name: _owner(lookup, t) for t in chosen})
            for t in chosen:
                t.group, t.pattern = group, pattern
                if t.geometry.numel:
                    with calling(pattern, "block_layout", f"for {layer_of(t)}"):
                        layout = pattern.block_layout(t.geometry)
                    check_block_layout(pattern, t, layout, BlockLayout)
                else:
                    layout = "the weight is empty"
                if isinstance(layout, str):
                    t.status = f"skipped: {layout}"
                else:
                    t.layout, t.status = layout, "selected"
            if not any(t.selected for t in chosen):
                reasons = "; ".join(f"{t.name}: {t.status[len('skipped: '):]}" for t in chosen[:5])
                raise ConfigError(f"{group.where}: pattern {group.pattern!r} fits none of the "
                                  f"{len(chosen)} selected layers ({reasons}); pick a pattern whose "
                                  f"block divides the weights")
        for t in targets:
            if t.status == "candidate":
                t.status = "excluded: " + why_not.get(t.param, "not selected by any pruning group")
        if ctx.graph_module is None:   # discovered without a graph (passes/eager.py)
            return
        nodes = {n.name: n for n in ctx.graph_module.graph.nodes}
        for t in targets:
            for name in t.nodes:
                nodes[name].meta["fxprune"] = t

def _rejection(group, t: Target) -> str | None:
    if not any(kind in t.module_type for kind in group.pruning_op_types):
        return f"type {t.module_type} not in pruning_op_types {list(group.pruning_op_types)}"
    names = [t.name, *t.aliases]
    if group.op_names and not any(re.search(rx, n) for rx in group.op_names for n in names):
        return f"matches no op_names of {group.where}"
    for rx in group.excluded_op_names:
        if any(re.search(rx, n) for n in names):
            return f"excluded_op_names {rx!r}"
    return None

def _check_regexes(group, targets: list[Target]) -> None:
    for key in ("op_names", "excluded_op_names"):
        for rx in getattr(group, key):
            if not any(re.search(rx, n) for t in targets for n in (t.name, *t.aliases)):
                raise ConfigError(
                    f"{group.where}: {key} regex {rx!r} matches no prunable layer; prunable layers "
                    f"are {_names(targets)} (`fxprune inspect` lists them)")

def _summary(group, targets: list[Target]) -> str:
    free = [t for t in targets if t.status == "candidate"]
    if not free:
        taken = "taken by an earlier group or " if group.index else ""
        return f"every prunable layer is already {taken}excluded ({_names(targets)})"
    types = sorted({t.module_type for t in free})
    return (f"pruning_op_types {list(group.pruning_op_types)}, op_names {list(group.op_names)} and "
            f"excluded_op_names {list(group.excluded_op_names)} leave none of {len(free)} layers "
            f"(types {types}: {_names(free)}); widen the selection")

def _last_linear_hint(group, targets: list[Target]) -> str:
    # The group asked for the auto-excluded classifier: say so, or the error reads as a regex typo.
    wanted = [t for t in targets if t.status == LAST_LINEAR and _rejection(group, t) is None]
    if not wanted:
        return ""
    return (f". {wanted[0].name} is the last linear layer, excluded by default; set "
            f"exclude_last_linear: false to prune it")

def _names(targets: list[Target], limit: int = 8) -> str:
    names = [t.name for t in targets]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more

def _owner(lookup, t: Target):
    try:
        return lookup.submodule(t.param.rpartition(".")[0])
    except AttributeError:
        return None
