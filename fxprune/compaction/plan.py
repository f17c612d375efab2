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

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..selection import LazyScores, Scores, budget, ceil_budget
from .analysis import ChannelAnalysis
from .classes import ChannelClasses, class_score, ranked
from .hf_config import fit_hf_configs
from .slicing import tensor_getter

NOT_COMPACTED = "not compacted: pattern {!r} does not remove output channels (use 1xchannel or Nxchannel)"
NO_USE = "not compacted: no op the channel analysis follows uses its output"
# float64 entries of one _row_stats block (2 MB: stays in the cache)
ROW_STATS_BLOCK = 1 << 18


@dataclass
class CompactionPlan:
    """What the mask pass decided, for the compact pass: the analysis, the removed classes."""

    analysis: ChannelAnalysis
    classes: ChannelClasses                       # candidate classes (with masked rows)
    blocked: dict[int, str]                       # root -> why it cannot be removed
    dead: frozenset[int]                          # roots of removed classes (fixed)
    space: dict[int, int]                         # root -> space (classes sliced together)
    notes: dict[str, str] = field(default_factory=dict)  # param -> why its layer is not compacted

    def dead_rows(self) -> dict[str, np.ndarray]:
        """param -> the output channels (rows of its 2-D view) the removed classes hold, for every
        layer that has classes."""
        return self.classes.rows(self.classes.member(self.dead))

    def kept_rows(self, targets) -> dict[str, torch.Tensor]:
        """param -> whether each output channel (row of its 2-D view) stays, for every one of
        ``targets`` (a layer with no class keeps all its rows)."""
        dead = self.dead_rows()
        out = {}
        for t in targets:
            keep = torch.ones(t.geometry.view_shape[0], dtype=torch.bool)
            keep[torch.as_tensor(dead.get(t.param, ()), dtype=torch.long)] = False
            out[t.param] = keep
        return out

    def of_classes(self) -> tuple[np.ndarray, np.ndarray]:
        """(whether each class is removed, its space), arrays over ``classes``."""
        dead_roots, space_of = self._lookups()
        return dead_roots[self.classes.roots], space_of[self.classes.roots]

    def dead_mask(self, atoms: np.ndarray, spaces: set[int] | None = None) -> np.ndarray:
        """Whether each atom of ``atoms`` belongs to a removed class (of one of ``spaces``)."""
        dead_roots, space_of = self._lookups()
        if spaces is not None:
            dead_roots = self._dead_in(frozenset(spaces), dead_roots, space_of)
        return dead_roots[self.analysis.roots(atoms)]

    def _dead_in(self, spaces: frozenset, dead_roots: np.ndarray, space_of: np.ndarray) -> np.ndarray:
        """Whether the class of root r is removed and in ``spaces``, over atom ids; the last set
        asked for is kept (slicing and FLOP counting ask for one set node after node)."""
        cached = getattr(self, "_dead_in_cache", None)
        if cached is None or cached[0] != spaces or cached[1] is not dead_roots:
            chosen = np.zeros(space_of.size + 1, dtype=bool)  # the last entry: no space (-1)
            chosen[list(spaces)] = True
            cached = self._dead_in_cache = (spaces, dead_roots, dead_roots & chosen[space_of])
        return cached[2]

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
                # fromiter, not a list: numpy converts a list of ints one object at a time (ms here)
                space_of[np.fromiter(self.space, dtype=np.int64, count=len(self.space))] = \
                    np.fromiter(self.space.values(), dtype=np.int64, count=len(self.space))
            cached = self._cache = (key, dead_roots, space_of)
        return cached[1], cached[2]


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
        return CompactionPlan(None, ChannelClasses((), (), (), ()), {}, set(), {}, notes)
    plan = select_classes(ctx, ChannelAnalysis(ctx.graph_module, ctx.param_of_node, ctx.model).run(), groups, ctx.scores)
    members = [t for g in groups for t in ctx.selected(g)]
    notes.update({t.param: NO_USE for t in members if (t.param, output_dim(t)) not in plan.analysis.axes})
    plan.notes = notes
    kept = plan.kept_rows(members)
    for t in members:  # whole rows: one flag per row, seen as the view's shape (no copy)
        ctx.masks[t.param] = kept[t.param][:, None].expand(t.geometry.view_shape)
        ctx.scores.pop(t.param, None)
    return plan


def plan_zero_channels(model, targets, an: ChannelAnalysis) -> CompactionPlan:
    """The plan of an already-pruned model: every class none of whose channels carries anything
    (all its rows of every layer are zero, and its bias / norm entries too) is removed."""
    an.finalize()
    members = list(targets)
    blocked = _blocked(an, members, {t.param: t for t in members})
    classes = _classes(an, members, scores=None)
    live = np.zeros(an.atoms.size, dtype=bool)  # per root: some entry of its channels is nonzero
    tensor_of = tensor_getter(model)
    with torch.no_grad():
        for (fqn, dim), ax in an.axes.items():
            if not ax.roles & {"source", "zero"}:
                continue
            tensor = tensor_of(fqn)
            if tensor.dim() == 0 or tensor.shape[dim] != ax.atoms.size:
                continue
            nonzero = (tensor.detach().movedim(dim, 0).reshape(ax.atoms.size, -1) != 0).any(dim=1)
            live[an.roots(ax.atoms)[nonzero.cpu().numpy()]] = True
    dead = ~live[classes.roots] & ~classes.member(blocked)
    notes = {t.param: NO_USE for t in members if (t.param, output_dim(t)) not in an.axes}
    return CompactionPlan(an, classes, blocked, set(classes.roots[dead].tolist()), an.spaces(), notes)


def select_classes(ctx, an: ChannelAnalysis, groups, scores, *, target_sparsity: float | None = None,
                   warn: bool = True) -> CompactionPlan:
    """The plan of ``groups`` (of ``ctx``, patterns that remove output channels): their coupled
    classes, ranked by ``scores`` (param -> view scores) and selected at each group's target, or
    at ``target_sparsity`` (the Pruner's scheduled sparsity). ``an`` may be reused across calls."""
    blocked, classes = _group_classes(ctx, an, groups, scores)
    is_blocked = classes.member(blocked)
    reduce_types = {g.index: g.criterion_reduce_type for g in groups}
    removed = np.zeros(len(classes), dtype=bool)
    for group in groups:
        free = (classes.group == group.index) & ~is_blocked
        target = group.target_sparsity if target_sparsity is None else target_sparsity
        removed |= _select(ctx.selected(group), classes, free, group, target)
    space = an.spaces()
    score = classes.scores(reduce_types)
    if ctx.config.round_channels_to > 1:
        _round_up(classes, removed, space, ctx.config.round_channels_to, score)
    if ctx.model is not None:  # a Hugging Face config must still describe the sizes kept
        fit_hf_configs(ctx.model, an, classes, removed, score, ctx.module_lookup())
    for group in groups if warn else ():
        target = group.target_sparsity if target_sparsity is None else target_sparsity
        _warn_if_blocked(group, ctx.selected(group), classes, blocked, is_blocked, removed, target)
    return CompactionPlan(an, classes, blocked, set(classes.roots[removed].tolist()), space)


def plan_from_masks(ctx, an: ChannelAnalysis, groups, masks) -> CompactionPlan:
    """The plan whose removed classes are those every row of which ``masks`` (param -> keep-mask
    on the view) prunes: a Pruner resumed from its saved masks."""
    blocked, classes = _group_classes(ctx, an, groups, None)
    row_kept = np.concatenate([masks[p].any(dim=1).cpu().numpy() for p in classes.params]) if classes.params \
        else np.zeros(0, dtype=bool)
    kept = np.bincount(classes.entry_class[row_kept], minlength=len(classes)) > 0
    dead = ~kept & ~classes.member(blocked)
    return CompactionPlan(an, classes, blocked, set(classes.roots[dead].tolist()), an.spaces())


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
    for k, groups_of in classes.several_groups().items():
        blocked.setdefault(int(classes.roots[k]), f"couples layers of pruning_configs {groups_of}")
    return blocked, classes


def _warn_if_blocked(group, targets, classes, blocked, is_blocked, removed, target: float) -> None:
    """The target-missed warning of channel classes: blocked classes are kept, so a group whose
    target needs them falls short; say by how much and why (whole classes alone round a count
    down by less than one class, which is not warned about)."""
    mine = classes.in_group(group.index)
    stuck = np.flatnonzero(mine & is_blocked)
    if not stuck.size:
        return
    numel = {t.param: t.geometry.numel for t in targets}
    if group.pruning_scope == "local":
        wanted = sum(budget(target, n) for n in numel.values())
    else:
        wanted = budget(target, sum(numel.values()))
    pruned = int(classes.size[mine & removed].sum())
    if wanted - pruned <= int(classes.size[mine].max()):
        return
    total = sum(numel.values())
    warnings.warn(
        f"{group.where} (pattern {group.pattern!r}, {len(targets)} layers): achieved sparsity "
        f"{pruned / total:.4f}, target_sparsity {target:g}: {stuck.size} of {int(mine.sum())} "
        f"coupled channel units cannot be removed exactly and are kept (e.g. {blocked[int(classes.roots[stuck[0]])]}); "
        f"with compact=True the report's compaction entry lists every reason", stacklevel=4)


def _blocked(an: ChannelAnalysis, members, targets) -> dict[int, str]:
    """Classes the analysis blocked, and those also produced by a layer that is not a member."""
    is_member = {(t.param, output_dim(t)) for t in members}
    more = []
    for (fqn, dim), ax in an.axes.items():  # channels also produced by a layer that is not pruned
        if "source" in ax.roles and (fqn, dim) not in is_member:
            t = targets.get(fqn)
            if t is None:
                why = f"{fqn}, which is not a prunable layer"
            elif t.selected:
                why = f"{t.name}, pruned with pattern {t.group.pattern!r} in pruning_configs[{t.group.index}]"
            else:
                why = f"{t.name} ({t.status})"
            more.append((ax.atoms, f"coupled with {why}"))
    return an.blocked_roots(more)


def _classes(an: ChannelAnalysis, members, scores) -> ChannelClasses:
    """The classes holding the members' output channels; with ``scores`` (param -> view
    scores), each class's score sum and max."""
    params, cols, groups, roots, sums, maxes = [], [], [], [], [], []
    # one float64 buffer for the rows of every layer scored on the CPU (_row_stats)
    on_cpu = scores is not None and any(scores[t.param].device.type == "cpu"
                                        for t in members if t.param in scores)
    buffer = torch.empty(ROW_STATS_BLOCK, dtype=torch.float64) if on_cpu else None
    for t in members:
        ax = an.axes.get((t.param, output_dim(t)))
        if ax is None:
            continue  # its output is never used by an op the analysis follows
        params.append(t.param)
        cols.append(t.geometry.view_shape[1])
        groups.append(t.group.index if t.group is not None else -1)
        roots.append(an.roots(ax.atoms).ravel())
        if scores is not None:
            row_sums, row_maxes = _row_stats(scores[t.param], buffer)
            sums.append(row_sums)
            maxes.append(row_maxes)
    return ChannelClasses(params, cols, groups, roots, sums if scores is not None else None, maxes)


def _row_stats(scores: Scores, buffer: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's score sum (in float64) and max, a few rows at a time: a float64 copy of a large
    layer at once would leave the cache, and lazy scores that compute rows alone (|w|) are never
    held whole. ``buffer`` (float64, at least ``ROW_STATS_BLOCK`` entries), given, holds each
    float64 copy of contiguous rows (the same layout, so the same sums): one buffer for every
    layer, rather than fresh pages per layer."""
    rows, cols = scores.shape
    if isinstance(scores, LazyScores) and scores.rows is None:
        scores = scores()
    part = scores.rows if isinstance(scores, LazyScores) else (lambda a, b: scores[a:b])
    step = max(1, ROW_STATS_BLOCK // max(cols, 1))
    sums, maxes = [np.zeros(0)], [np.zeros(0)]
    for start in range(0, rows, step):
        s = part(start, min(start + step, rows))
        if buffer is not None and s.device == buffer.device and s.is_contiguous() and s.numel() <= buffer.numel():
            wide = buffer[:s.numel()].view(s.shape).copy_(s)
        else:
            wide = s.double()
        sums.append(wide.sum(dim=1).cpu().numpy())
        maxes.append(s.amax(dim=1).double().cpu().numpy() if cols else np.zeros(s.shape[0]))
    return np.concatenate(sums), np.concatenate(maxes)


def _round_up(classes: ChannelClasses, removed: np.ndarray, space: dict[int, int], multiple: int,
              score: np.ndarray) -> None:
    """Give back the best-scoring removed classes of each space until its first layer keeps a
    multiple of ``multiple`` channels (or all of them). ``removed`` (bool over classes) is updated."""
    class_space = np.fromiter((space[r] for r in classes.roots.tolist()), dtype=np.int64, count=len(classes))
    by_space = np.argsort(class_space, kind="stable")             # each space's classes, in class order
    starts = np.flatnonzero(np.diff(class_space[by_space], prepend=-1))
    sizes = np.diff(starts, append=by_space.size)
    layer = np.empty(len(classes), dtype=np.int64)                # the first layer of its space's first class
    layer[by_space] = np.repeat(classes.link_layer[classes.link_start[by_space[starts]]], sizes)
    there = classes.link_layer == layer[classes.link_class]
    rows = np.zeros(len(classes), dtype=np.int64)                 # each class's rows in that layer
    rows[classes.link_class[there]] = classes.link_rows[there]
    for members in np.split(by_space, starts[1:]):
        total = int(rows[members].sum())
        kept = total - int(rows[members[removed[members]]].sum())
        goal = min(total, -(-kept // multiple) * multiple)
        back = ranked(score, members[removed[members] & (rows[members] > 0)]).tolist()   # best last
        while kept < goal and back:
            k = back.pop()
            removed[k] = False
            kept += int(rows[k])


def _select(targets, classes: ChannelClasses, free: np.ndarray, group, target: float) -> np.ndarray:
    """The classes to remove (bool over ``classes``, of the ``free`` ones): lowest score first,
    whole classes, within the budget and the per-layer ratios (skipping a class that does not fit
    and going on with smaller ones)."""
    layer_of = {p: i for i, p in enumerate(classes.params)}
    walk = _Walk(classes, {layer_of[t.param]: budget(group.max_sparsity_ratio_per_op, t.geometry.numel)
                           for t in targets if t.param in layer_of})
    order = ranked(class_score(classes.score_sum, classes.score_max, classes.size, group.criterion_reduce_type),
                   np.flatnonzero(free))
    layers = [(layer_of[t.param], t.geometry.numel) for t in targets if t.param in layer_of]
    by_layer = _by_layer(classes, order, [i for i, _ in layers])
    for i, numel in layers:  # min_sparsity_ratio_per_op first
        least = ceil_budget(group.min_sparsity_ratio_per_op, numel)
        for k in by_layer[i][0].tolist() if least > 0 else ():
            if walk.pruned[i] >= least:
                break
            if not walk.taken[k]:
                walk.take_if_fits(k)
    if group.pruning_scope == "local":
        for i, numel in layers:
            candidates, weights = by_layer[i]
            if candidates.size:
                walk.fill(candidates, weights, budget(target, numel), i)
        return walk.taken
    total = sum(t.geometry.numel for t in targets)
    walk.fill(order, classes.size[order], budget(target, total) - int(walk.pruned.sum()))
    return walk.taken


def _by_layer(classes: ChannelClasses, order: np.ndarray, layers: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """layer -> (the ranked classes of ``order`` that hold rows of it, their weights there)."""
    links = classes.links_of(order)                              # in rank order
    layer = classes.link_layer[links]
    if len(classes.params) <= np.iinfo(np.uint16).max:  # numpy's stable sort of 16-bit ints is a radix sort
        layer = layer.astype(np.uint16)
    by_layer = links[np.argsort(layer, kind="stable")]
    bounds = np.searchsorted(classes.link_layer[by_layer], np.arange(len(classes.params) + 1))
    return {i: (classes.link_class[by_layer[bounds[i]:bounds[i + 1]]], classes.link_weight[by_layer[bounds[i]:bounds[i + 1]]])
            for i in layers}


class _Walk:
    """The greedy walk over ranked classes: the weights pruned per layer, the classes taken, and
    each layer's cap (``max_sparsity_ratio_per_op``). :meth:`fill` takes the leading run of
    classes that all fit, at once with array sums, and walks the rest one at a time: the result
    is the one-at-a-time walk's."""

    def __init__(self, classes: ChannelClasses, caps: dict[int, int]):
        self.classes = classes
        self.pruned = np.zeros(len(classes.params), dtype=np.int64)
        self.cap = np.zeros(len(classes.params), dtype=np.int64)   # layers of other groups: no free class
        self.cap[list(caps)] = list(caps.values())
        self.taken = np.zeros(len(classes), dtype=bool)
        self._links = None

    def take_if_fits(self, k: int) -> bool:
        """Take class ``k`` if every layer it holds rows of stays within its cap."""
        if self._links is None:  # Python lists: this runs once per class walked one at a time
            c = self.classes
            self._links = (c.link_start.tolist(), c.link_layer.tolist(), c.link_weight.tolist())
        start, layer, weight = self._links
        links = range(start[k], start[k + 1])
        pruned, cap = self.pruned, self.cap
        if any(pruned[layer[j]] + weight[j] > cap[layer[j]] for j in links):
            return False
        self.taken[k] = True
        for j in links:
            pruned[layer[j]] += weight[j]
        return True

    def fill(self, candidates: np.ndarray, weights: np.ndarray, goal: int, layer: int | None = None) -> None:
        """Walk ``candidates`` (ranked, with their ``weights`` against ``goal``) and take each one
        not taken yet whose weight fits in what ``goal`` has left and that fits the caps. With
        ``layer``, ``goal`` is that layer's and what it already prunes counts; without, ``goal``
        is the budget left."""
        least = int(weights.min()) if weights.size else 0    # of all of a layer's classes, taken or not
        rest = ~self.taken[candidates]
        candidates, weights = candidates[rest], weights[rest]
        used = int(self.pruned[layer]) if layer is not None else 0
        lead = int(np.searchsorted(np.cumsum(weights), goal - used, side="right"))   # fit the goal in a row
        lead = self._take_leading(candidates[:lead])
        used += int(weights[:lead].sum())
        smallest = np.minimum.accumulate(weights[::-1])[::-1] if layer is None else None
        for i in range(lead, candidates.size):
            if layer is not None:
                used = int(self.pruned[layer])
                if used + least > goal:
                    break  # no class of this layer fits any more
            elif smallest[i] > goal - used:
                break  # no class left fits in the budget
            w = int(weights[i])
            if used + w <= goal and self.take_if_fits(int(candidates[i])) and layer is None:
                used += w

    def _take_leading(self, candidates: np.ndarray) -> int:
        """Take the candidates, from the first, while each keeps every layer it holds rows of
        within its cap (given those before it); returns how many were taken."""
        if not candidates.size:
            return 0
        added = self._weights_per_layer(candidates)
        if np.any(self.pruned + added > self.cap):  # rare: find the first candidate that breaks a cap
            candidates = candidates[:_first_over(self.classes, candidates, self.cap - self.pruned)]
            added = self._weights_per_layer(candidates)
        self.taken[candidates] = True
        self.pruned += added
        return candidates.size

    def _weights_per_layer(self, candidates: np.ndarray) -> np.ndarray:
        """The weights ``candidates`` hold in each layer, together."""
        c = self.classes
        links = c.links_of(candidates)
        # float64 sums of weight counts are exact (far below 2**53)
        return np.bincount(c.link_layer[links], weights=c.link_weight[links], minlength=len(c.params)).astype(np.int64)


def _first_over(classes: ChannelClasses, candidates: np.ndarray, room: np.ndarray) -> int:
    """The first of ``candidates`` (in order) at which some layer's running weight passes its
    ``room``, or how many there are."""
    links = classes.links_of(candidates)
    owner = np.repeat(np.arange(candidates.size), np.diff(classes.link_start)[candidates])   # each link's candidate
    layer = classes.link_layer[links]
    by_layer = np.argsort(layer * candidates.size + owner)          # each layer's links in rank order
    layer, owner, weight = layer[by_layer], owner[by_layer], classes.link_weight[links][by_layer]
    running = np.cumsum(weight)
    starts = np.flatnonzero(np.diff(layer, prepend=-1))
    running -= np.repeat(running[starts] - weight[starts], np.diff(starts, append=layer.size))
    over = running > room[layer]
    return int(owner[over].min()) if over.any() else candidates.size
