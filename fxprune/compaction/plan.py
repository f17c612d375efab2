"""Channel plans: which coupled output channels are removed together.

For every pruning group whose pattern removes output channels (``prunes_output_channels``:
``1xchannel``, ``Nxchannel``, a user pattern that opts in), the channel analysis
(:mod:`.analysis`) merges the channels that must go together (the convs feeding one residual
add, the q/k/v rows of an attention head, a depthwise conv and its input, ...) into *classes*.
Each class is one block: its score is the group's ``criterion_reduce_type`` over all the weights
it masks (mean by default, so the score of a single row is the pattern's own row score), and its
size is those weights. Classes are then selected like blocks of different sizes (see
docs/design.md, "Patterns"): ``global`` walks one ranking over the group and takes each class
that fits the weight budget ``floor(target * weights)``; ``local`` does the same per layer.
``max/min_sparsity_ratio_per_op`` hold for every member layer. With ``round_channels_to: m``,
each space (the channels sliced together) then gets back its best-scoring removed classes until
it keeps a multiple of m channels: fewer weights are pruned than asked, for kernels that run
faster.

A class is *blocked* (never pruned, reported with the reason) when the analysis did not
understand an op on its path, or when it is also produced by a layer that is not pruned with an
output-channel pattern in the same group.

:func:`plan_channels` is the mask step of a graph captured with example inputs (``compact`` or
not, so masks do not depend on it); :func:`plan_zero_channels` finds the removable channels of
an already-pruned model (``fxprune.compact``).
"""
from __future__ import annotations

import contextlib
import gc
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from ..selection import LazyScores, Scores, budget, ceil_budget
from .analysis import ChannelAnalysis
from .hf_config import fit_hf_configs
from .slicing import get_tensor

NOT_COMPACTED = "not compacted: pattern {!r} does not remove output channels (use 1xchannel or Nxchannel)"
NO_USE = "not compacted: no op the channel analysis follows uses its output"


@dataclass(slots=True)
class ChannelClass:
    root: int
    order: int                                   # first appearance, breaks score ties
    rows: dict[str, list[int]] = field(default_factory=dict)     # param -> rows
    weights: dict[str, int] = field(default_factory=dict)        # param -> weights
    score_sum: float = 0.0
    score_max: float = 0.0
    groups: set = field(default_factory=set)

    @property
    def size(self) -> int:
        return sum(self.weights.values())

    def score(self, reduce_type: str) -> float:
        if reduce_type == "sum":
            return self.score_sum
        if reduce_type == "max":
            return self.score_max
        return self.score_sum / max(self.size, 1)


@dataclass
class CompactionPlan:
    """What the mask pass decided, for the compact pass: the analysis, the removed classes."""

    analysis: ChannelAnalysis
    classes: dict[int, ChannelClass]              # candidate classes (with masked rows) by root
    blocked: dict[int, str]                       # root -> why it cannot be removed
    dead: frozenset[int]                          # roots of removed classes (fixed)
    space: dict[int, int]                         # root -> space (classes sliced together)
    notes: dict[str, str] = field(default_factory=dict)  # param -> why its layer is not compacted

    def dead_rows(self) -> dict[str, list[int]]:
        """param -> the output channels (rows of its 2-D view) the removed classes hold."""
        rows: dict[str, list[int]] = defaultdict(list)
        for root in self.dead:
            for param, r in self.classes[root].rows.items():
                rows[param].extend(r)
        return rows

    def dead_mask(self, atoms: np.ndarray, spaces: set[int] | None = None) -> np.ndarray:
        """Whether each atom of ``atoms`` belongs to a removed class (of one of ``spaces``)."""
        roots = self.analysis.roots(atoms)
        dead_roots, space_of = self._lookups()
        dead = dead_roots[roots]
        if spaces is not None:
            chosen = np.zeros(space_of.size + 1, dtype=bool)  # the last entry: no space (-1)
            chosen[list(spaces)] = True
            dead &= chosen[space_of[roots]]
        return dead

    def __post_init__(self):
        self.dead = frozenset(self.dead)  # fixed once planned: the lookups below rely on it

    def _lookups(self) -> tuple[np.ndarray, np.ndarray]:
        """(is the class of root r removed, the space of root r or -1), arrays over atom ids,
        built once per plan (``dead`` and ``space`` are not changed after planning)."""
        key = (id(self.dead), id(self.space), self.analysis.atoms.size)
        cached = getattr(self, "_cache", None)
        if cached is None or cached[0] != key:
            n = self.analysis.atoms.size
            dead_roots = np.zeros(n, dtype=bool)
            dead_roots[np.fromiter(self.dead, dtype=np.int64, count=len(self.dead))] = True
            space_of = np.full(n, -1, dtype=np.int64)
            if self.space:
                space_of[np.fromiter(self.space, dtype=np.int64, count=len(self.space))] = list(self.space.values())
            cached = self._cache = (key, dead_roots, space_of)
        return cached[1], cached[2]


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector while classes are built: thousands of small objects
    allocated next to a captured graph of millions otherwise trigger collections that walk the
    whole graph and cost more than the work itself (nothing built here forms a cycle)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def output_dim(target) -> int:
    """The dim of the weight that indexes output channels (the rows of the 2-D view)."""
    return 1 if target.geometry.layout == "in_out" else 0


def joint_selection(ctx, pattern) -> bool:
    """Whether a group's masks come from the coupled channel classes: its pattern removes whole
    output channels and the graph was captured with example inputs (so shapes are known)."""
    return bool(pattern.prunes_output_channels) and ctx.shapes_known


def plan_channels(ctx, groups) -> CompactionPlan:
    """Select the channel classes of ``groups`` (their patterns remove output channels) from
    ``ctx.scores`` (popped) and write their keep-masks into ``ctx.masks``. The plan's notes say
    why the other selected layers are not compacted."""
    notes = {t.param: NOT_COMPACTED.format(g.pattern)
             for g in ctx.groups if g not in groups for t in ctx.selected(g)}
    if not groups:
        return CompactionPlan(None, {}, {}, set(), {}, notes)
    plan = select_classes(ctx, ChannelAnalysis(ctx.graph_module, ctx.param_of_node, ctx.model).run(), groups, ctx.scores)
    members = [t for g in groups for t in ctx.selected(g)]
    notes.update({t.param: NO_USE for t in members if (t.param, output_dim(t)) not in plan.analysis.axes})
    plan.notes = notes
    dead_rows = plan.dead_rows()
    for t in members:  # whole rows: one flag per row, seen as the view's shape (no copy)
        rows, cols = t.geometry.view_shape
        keep = torch.ones(rows, dtype=torch.bool)
        keep[torch.as_tensor(dead_rows[t.param], dtype=torch.long)] = False
        ctx.masks[t.param] = keep[:, None].expand(rows, cols)
        ctx.scores.pop(t.param, None)
    return plan


def plan_zero_channels(model, targets, an: ChannelAnalysis) -> CompactionPlan:
    """The plan of an already-pruned model: every class none of whose channels carries anything
    (all its rows of every layer are zero, and its bias / norm entries too) is removed."""
    an.finalize()
    members = list(targets)
    blocked = _blocked(an, members, {t.param: t for t in members})
    with gc_paused():
        classes = _classes(an, members, scores=None)
    dead = set()
    zero_entry: dict[int, bool] = defaultdict(lambda: True)
    with torch.no_grad():
        for (fqn, dim), ax in an.axes.items():
            if not ax.roles & {"source", "zero"}:
                continue
            tensor = get_tensor(model, fqn)
            if tensor.dim() == 0 or tensor.shape[dim] != ax.atoms.size:
                continue
            nonzero = (tensor.detach().movedim(dim, 0).reshape(ax.atoms.size, -1) != 0).any(dim=1)
            for root, live in zip(an.roots(ax.atoms).tolist(), nonzero.tolist()):
                if live:
                    zero_entry[root] = False
    for root in classes:
        if root not in blocked and zero_entry[root]:
            dead.add(root)
    notes = {t.param: NO_USE for t in members if (t.param, output_dim(t)) not in an.axes}
    return CompactionPlan(an, classes, blocked, dead, an.spaces(), notes)


def select_classes(ctx, an: ChannelAnalysis, groups, scores, *, target_sparsity: float | None = None,
                   warn: bool = True) -> CompactionPlan:
    """The plan of ``groups`` (of ``ctx``, patterns that remove output channels): their coupled
    classes, ranked by ``scores`` (param -> view scores) and selected at each group's target, or
    at ``target_sparsity`` (the Pruner's scheduled sparsity). ``an`` may be reused across calls."""
    with gc_paused():
        blocked, classes = _group_classes(ctx, an, groups, scores)
        dead: set[int] = set()
        for group in groups:
            only = {group.index}
            free = [c for c in classes.values() if c.groups == only and c.root not in blocked]
            target = group.target_sparsity if target_sparsity is None else target_sparsity
            dead |= _select(ctx.selected(group), free, group, target)
        space = an.spaces()
        if ctx.config.round_channels_to > 1:
            _round_up(classes, dead, space, ctx.config.round_channels_to,
                      {g.index: g.criterion_reduce_type for g in groups})
        if ctx.model is not None:  # a Hugging Face config must still describe the sizes kept
            fit_hf_configs(ctx.model, an, classes, dead, {g.index: g.criterion_reduce_type for g in groups})
        for group in groups if warn else ():
            target = group.target_sparsity if target_sparsity is None else target_sparsity
            _warn_if_blocked(group, ctx.selected(group), classes, blocked, dead, target)
        return CompactionPlan(an, classes, blocked, dead, space)


def plan_from_masks(ctx, an: ChannelAnalysis, groups, masks) -> CompactionPlan:
    """The plan whose removed classes are those every row of which ``masks`` (param -> keep-mask
    on the view) prunes: a Pruner resumed from its saved masks."""
    blocked, classes = _group_classes(ctx, an, groups, None)
    dead = {root for root, c in classes.items() if root not in blocked
            and not any(bool(masks[p][rows].any()) for p, rows in c.rows.items())}
    return CompactionPlan(an, classes, blocked, dead, an.spaces())


def _group_classes(ctx, an: ChannelAnalysis, groups, scores):
    """(blocked roots -> why, classes) of the output channels of ``groups``' selected targets."""
    members = [t for g in groups for t in ctx.selected(g)]
    for t in members:  # Nxchannel: N consecutive rows are one block
        n = t.pattern.output_channel_block
        ax = an.axes.get((t.param, output_dim(t)))
        if ax is not None and n > 1:
            an.atoms.union_rows(ax.atoms.reshape(-1, n))
    an.finalize()
    blocked = _blocked(an, members, ctx.targets)
    classes = _classes(an, members, scores=scores)
    for root, c in classes.items():
        if len(c.groups) > 1:
            blocked.setdefault(root, f"couples layers of pruning_configs {sorted(c.groups)}")
    return blocked, classes


def _warn_if_blocked(group, targets, classes, blocked, dead, target: float) -> None:
    """The target-missed warning of channel classes: blocked classes are kept, so a group whose
    target needs them falls short; say by how much and why (whole classes alone round a count
    down by less than one class, which is not warned about)."""
    mine = [c for c in classes.values() if group.index in c.groups]
    stuck = [c for c in mine if c.root in blocked]
    if not stuck:
        return
    numel = {t.param: t.geometry.numel for t in targets}
    if group.pruning_scope == "local":
        wanted = sum(budget(target, n) for n in numel.values())
    else:
        wanted = budget(target, sum(numel.values()))
    pruned = sum(c.size for c in mine if c.root in dead)
    if wanted - pruned <= max(c.size for c in mine):
        return
    total = sum(numel.values())
    warnings.warn(
        f"{group.where} (pattern {group.pattern!r}, {len(targets)} layers): achieved sparsity "
        f"{pruned / total:.4f}, target_sparsity {target:g}: {len(stuck)} of {len(mine)} "
        f"coupled channel units cannot be removed exactly and are kept (e.g. {blocked[stuck[0].root]}); "
        f"with compact=True the report's compaction entry lists every reason", stacklevel=4)


def _blocked(an: ChannelAnalysis, members, targets) -> dict[int, str]:
    """Classes the analysis blocked, and those also produced by a layer that is not a member."""
    blocked = an.blocked_roots()
    is_member = {(t.param, output_dim(t)) for t in members}
    for (fqn, dim), ax in an.axes.items():  # channels also produced by a layer that is not pruned
        if "source" in ax.roles and (fqn, dim) not in is_member:
            t = targets.get(fqn)
            if t is None:
                why = f"{fqn}, which is not a prunable layer"
            elif t.selected:
                why = f"{t.name}, pruned with pattern {t.group.pattern!r} in pruning_configs[{t.group.index}]"
            else:
                why = f"{t.name} ({t.status})"
            for r in np.unique(an.roots(ax.atoms)).tolist():
                blocked.setdefault(r, f"coupled with {why}")
    return blocked


def _classes(an: ChannelAnalysis, members, scores) -> dict[int, ChannelClass]:
    """The classes holding the members' output channels; with ``scores`` (param -> view
    scores), each class's score sum and max. Classes are numbered in order of first appearance
    (members in order, rows in order) and their score sums added in that order."""
    layers = []  # (param, cols, group, roots of its rows, row score sums, row score maxes)
    for t in members:
        ax = an.axes.get((t.param, output_dim(t)))
        if ax is None:
            continue  # its output is never used by an op the analysis follows
        sums = maxes = None
        if scores is not None:
            sums, maxes = _row_stats(scores[t.param])
        layers.append((t.param, t.geometry.view_shape[1], t.group.index if t.group is not None else None,
                       an.roots(ax.atoms), sums, maxes))
    if not layers:
        return {}
    all_roots = np.concatenate([r for *_, r, _, _ in layers])
    uniq, first, inverse = np.unique(all_roots, return_index=True, return_inverse=True)
    by_order = np.argsort(first, kind="stable")          # class ids in order of first appearance
    rank = np.empty_like(by_order)
    rank[by_order] = np.arange(by_order.size)
    cls = rank[inverse.ravel()]                           # each entry's class, numbered by appearance
    n = by_order.size
    score_sum, score_max = np.zeros(n), np.zeros(n)
    if scores is not None:
        np.add.at(score_sum, cls, np.concatenate([s for *_, s, _ in layers]))   # in entry order
        np.maximum.at(score_max, cls, np.concatenate([m for *_, m in layers]))
    roots = uniq[by_order].tolist()
    sums_l, maxes_l = score_sum.tolist(), score_max.tolist()
    classes: dict[int, ChannelClass] = {}
    out = [None] * n
    for k, root in enumerate(roots):
        out[k] = classes[root] = ChannelClass(root, k, {}, {}, sums_l[k], maxes_l[k], set())
    start = 0
    for param, cols, group, layer_roots, _, _ in layers:
        ids = cls[start:start + layer_roots.size]
        start += layer_roots.size
        if not ids.size:
            continue
        order = np.argsort(ids, kind="stable")            # this layer's rows, by class
        sorted_ids = ids[order]
        cuts = np.flatnonzero(np.diff(sorted_ids)) + 1
        if cuts.size == sorted_ids.size - 1:  # one row per class (the common case)
            for k, row in zip(sorted_ids.tolist(), order.tolist()):
                c = out[k]
                if param in c.rows:
                    c.rows[param].append(row)
                    c.weights[param] += cols
                else:
                    c.rows[param], c.weights[param] = [row], cols
                if group is not None:
                    c.groups.add(group)
            continue
        bounds = [0, *cuts.tolist(), sorted_ids.size]
        rows_sorted = order.tolist()
        for k, (a, b) in zip(sorted_ids[np.asarray(bounds[:-1], dtype=np.int64)].tolist(), zip(bounds, bounds[1:])):
            c = out[k]
            rows = rows_sorted[a:b]
            old = c.rows.get(param)
            if old is None:
                c.rows[param], c.weights[param] = rows, cols * len(rows)
            else:  # a param reached twice (never in practice: one axis per param dim)
                old.extend(rows)
                c.weights[param] += cols * len(rows)
            if group is not None:
                c.groups.add(group)
    return classes


def _row_stats(scores: Scores) -> tuple[np.ndarray, np.ndarray]:
    """Each row's score sum (in float64) and max, a few rows at a time: a float64 copy of a large
    layer at once would leave the cache, and lazy scores that compute rows alone (|w|) are never
    held whole."""
    rows, cols = scores.shape
    if isinstance(scores, LazyScores) and scores.rows is None:
        scores = scores()
    part = scores.rows if isinstance(scores, LazyScores) else (lambda a, b: scores[a:b])
    step = max(1, (1 << 18) // max(cols, 1))  # a 2 MB float64 block: stays in the cache
    sums, maxes = [np.zeros(0)], [np.zeros(0)]
    for start in range(0, rows, step):
        s = part(start, min(start + step, rows))
        sums.append(s.double().sum(dim=1).cpu().numpy())
        maxes.append(s.amax(dim=1).double().cpu().numpy() if cols else np.zeros(s.shape[0]))
    return np.concatenate(sums), np.concatenate(maxes)


def _round_up(classes, dead: set[int], space, multiple: int, reduce_types) -> None:
    """Give back the best-scoring removed classes of each space until its first layer keeps a
    multiple of ``multiple`` channels (or all of them)."""
    by_space = defaultdict(list)
    for c in classes.values():
        by_space[space[c.root]].append(c)
    for members in by_space.values():
        layer = next(iter(members[0].rows))
        rows = {c.root: len(c.rows.get(layer, ())) for c in members}
        total = sum(rows.values())
        kept = total - sum(rows[c.root] for c in members if c.root in dead)
        goal = min(total, -(-kept // multiple) * multiple)
        removed = sorted((c for c in members if c.root in dead and rows[c.root]),
                         key=lambda c: (c.score(reduce_types[next(iter(c.groups))]), c.order))
        while kept < goal and removed:
            c = removed.pop()
            dead.discard(c.root)
            kept += rows[c.root]


def _ranked(classes: list[ChannelClass], reduce_type: str) -> list[ChannelClass]:
    """``classes`` by ``(score, order)``, lowest first (``ChannelClass.score``, as arrays)."""
    if not classes:
        return []
    order = np.fromiter((c.order for c in classes), dtype=np.int64, count=len(classes))
    if reduce_type == "sum":
        score = np.fromiter((c.score_sum for c in classes), dtype=np.float64, count=len(classes))
    elif reduce_type == "max":
        score = np.fromiter((c.score_max for c in classes), dtype=np.float64, count=len(classes))
    else:  # the mean: the same float division as ChannelClass.score
        total = np.fromiter((c.score_sum for c in classes), dtype=np.float64, count=len(classes))
        size = np.fromiter((c.size for c in classes), dtype=np.int64, count=len(classes))
        score = total / np.maximum(size, 1)
    return [classes[i] for i in np.lexsort((order, score)).tolist()]


def _select(targets, free: list[ChannelClass], group, target: float) -> set[int]:
    """Roots of the classes to remove: lowest score first, whole classes, within the budget and
    the per-layer ratios (skipping a class that does not fit and going on with smaller ones)."""
    numel = {t.param: t.geometry.numel for t in targets}
    hi = {p: budget(group.max_sparsity_ratio_per_op, n) for p, n in numel.items()}
    lo = {p: ceil_budget(group.min_sparsity_ratio_per_op, n) for p, n in numel.items()}
    # each class as (root, its (layer, weights) pairs): the loops below run once per class and
    # layer, tens of thousands of times on a transformer
    ranked = [(c.root, tuple(c.weights.items()), c.size) for c in _ranked(free, group.criterion_reduce_type)]
    pruned: dict[str, int] = dict.fromkeys(numel, 0)
    chosen: set[int] = set()

    def take_if_fits(root, items) -> bool:
        for p, w in items:
            if pruned[p] + w > hi[p]:
                return False
        chosen.add(root)
        for p, w in items:
            pruned[p] += w
        return True

    by_layer: dict[str, list] = defaultdict(list)  # each layer's classes, ranked, with their weights there
    smallest: dict[str, int] = {}                  # and its smallest class's weights
    for root, items, _ in ranked:
        for p, w in items:
            by_layer[p].append((root, items, w))
            if w < smallest.get(p, w + 1):
                smallest[p] = w
    for t in targets:  # min_sparsity_ratio_per_op first
        p = t.param
        for root, items, _ in by_layer[p]:
            if pruned[p] >= lo[p]:
                break
            if root not in chosen:
                take_if_fits(root, items)
    if group.pruning_scope == "local":
        for t in targets:
            p = t.param
            goal, least = budget(target, numel[p]), smallest.get(p, 0)
            for root, items, w in by_layer[p]:
                if pruned[p] + least > goal:
                    break  # no class of this layer fits any more
                if root not in chosen and pruned[p] + w <= goal:
                    take_if_fits(root, items)
        return chosen
    left = budget(target, sum(numel.values())) - sum(pruned.values())
    for root, items, size in ranked:
        if root not in chosen and size <= left and take_if_fits(root, items):
            left -= size
    return chosen
