"""Channel dependency analysis over the captured ATen graph.

Every channel that compaction could remove is an *atom*; atoms that must go together (the two
inputs of a residual add, the q/k/v rows of one attention head, the channels of one GroupNorm
group, ...) are merged with a union-find, and one merged set is a *class*: the unit of channel
pruning, with one score. The analysis walks the graph once, in order, and gives each tensor a
:class:`~.values.Chan`: which of its dims carry atoms, which atom sits at each index, and whether
the pruned channels are still exact zeros there (they must be, wherever a consumer's input slice
is removed). Parameters are bound to atoms per dim (``axes``): that is what compaction slices.

Anything not understood (an unknown op touching a channel dim, a norm over channels, a channel
reaching the model output, a coupling with a tensor no prunable layer produced) *blocks* the
classes involved, with a reason naming the op; blocked classes are never pruned. The op rules
live in the rules registry (:mod:`.rules`; the built-in ones in :mod:`.ops` and :mod:`.layout`).
"""
from __future__ import annotations

import numpy as np
from torch import fx

from ..aten import is_mutating, op_name, shape_of
from . import folds, layout, ops  # noqa: F401  (register the built-in rules)
from .atoms import components
from .rules import find_rule, unknown_op
from .values import HEAD_COUNT_ATTRS, HEAD_WIDTH_ATTRS
from .values import AtomSet, Axis, Chan, ConvGroups, HeadSplit, NormGroups, ParamRef, ScaleFold, ShiftedParam

__all__ = ["ChannelAnalysis", "AtomSet", "Axis", "Chan", "ConvGroups", "HeadSplit", "NormGroups", "ParamRef",
           "ScaleFold"]


class ChannelAnalysis:
    """Run over an exported graph; then read ``axes``, ``blocked_roots()``, ``head_splits``.
    ``model``: the user's model the graph was captured from (rules read module attributes, such as
    a norm's epsilon; without it they are checked when slicing)."""

    def __init__(self, graph_module: fx.GraphModule, param_of_node: dict[str, str], model=None):
        self.gm = graph_module
        self.model = model                          # the user's modules (head counts, norms' epsilon)
        self.param_of_node = param_of_node
        self.live: set[fx.Node] = set()
        self.atoms = AtomSet()
        self.axes: dict[tuple[str, int], Axis] = {}
        self.blocks: list[tuple[np.ndarray, str]] = []
        self.param_blocks: dict[str, str] = {}     # param used by an op the analysis does not know
        self.head_splits: list[HeadSplit] = []
        self.packed_modules: set[str] = set()       # attention modules slicing a packed projection at offsets
        self.norm_groups: list[NormGroups] = []
        self.conv_groups: list[ConvGroups] = []
        self.scale_folds: list[ScaleFold] = []     # norms over the channels, rescaled when sliced
        self.values: dict[fx.Node, object] = {}
        self.dead_ends: dict[fx.Node, str] = {}     # node -> why its channels were dropped
        self._roots: np.ndarray | None = None

    # ------------------------------------------------------------------ building blocks
    def value(self, arg):
        """What the analysis knows of a graph argument: Chan, ParamRef, list, None or a constant."""
        if isinstance(arg, fx.Node):
            return self.values.get(arg)
        if isinstance(arg, (list, tuple)):
            return [self.value(a) for a in arg]
        return arg

    def axis(self, fqn: str, dim: int, size: int, role: str) -> np.ndarray:
        ax = self.axes.get((fqn, dim))
        if ax is None:
            ax = self.axes[(fqn, dim)] = Axis(self.atoms.new(size))
        ax.roles.add(role)
        return ax.atoms

    def bind(self, ref, view_dim: int, atoms: np.ndarray, role: str) -> None:
        """Tie dim ``view_dim`` of parameter view ``ref`` to ``atoms``."""
        dim = ref.perm[view_dim]
        axis = self.axis(ref.fqn, dim, ref.shape[view_dim], role)
        if axis.size != atoms.size:  # not one entry per channel: never slice it
            self.blocks += [(axis, f"{ref.fqn} dim {dim} does not line up with the channels"),
                            (atoms, f"{ref.fqn} dim {dim} does not line up with the channels")]
            return
        self.atoms.union_arrays(axis, atoms)

    def head_counts(self, module: str) -> set[int]:
        """The head counts module ``module`` of the user's model records (``num_heads``...)."""
        return self._sizes(module, HEAD_COUNT_ATTRS)

    def head_widths(self, module: str) -> set[int]:
        """The widths module ``module`` records (``embed_dim``, ``head_dim``...)."""
        return self._sizes(module, HEAD_WIDTH_ATTRS)

    def config_head_counts(self, module: str) -> set[int]:
        """The head counts the config of module ``module`` records (Phi-3's attention reads its
        query head count from ``self.config``)."""
        return self._sizes(module, HEAD_COUNT_ATTRS, of_config=True)

    def _sizes(self, module: str, names, of_config: bool = False) -> set[int]:
        """The sizes > 1 that module ``module`` (or its ``config``) records under ``names``."""
        if self.model is None:
            return set()
        try:
            holder = self.model.get_submodule(module)
        except AttributeError:
            return set()
        if of_config:
            holder = getattr(holder, "config", None)
        return {v for v in (getattr(holder, a, None) for a in names) if isinstance(v, int) and v > 1}

    def block(self, value, reason: str) -> None:
        """Mark every atom in ``value`` (a Chan, list of them, atom array) unprunable."""
        if isinstance(value, Chan):
            self.blocks.append((value.atoms, reason))
        elif isinstance(value, np.ndarray):
            self.blocks.append((value, reason))
        elif isinstance(value, ParamRef):
            self.param_blocks.setdefault(value.fqn, reason)
        elif isinstance(value, ShiftedParam):
            self.param_blocks.setdefault(value.ref.fqn, reason)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self.block(v, reason)

    # ------------------------------------------------------------------ the walk
    def run(self) -> "ChannelAnalysis":
        graph = self.gm.graph
        live = self.live = _live_nodes(graph)
        for node in graph.nodes:
            if node.op == "placeholder":
                fqn = self.param_of_node.get(node.name)
                if fqn is not None:
                    shape = shape_of(node) or ()
                    self.values[node] = ParamRef(fqn, tuple(range(len(shape))), shape)
                continue
            if node.op == "output":
                self.block(self.value(node.args[0]), "reaches the model output (its shape would change)")
                continue
            if node.op != "call_function" or node not in live:
                continue
            inputs = [self.values.get(a) for a in node.all_input_nodes]
            if not any(isinstance(v, (Chan, ParamRef, list)) for v in inputs):
                continue  # nothing channel-related flows through this node
            name = op_name(node)
            rule = find_rule(name)
            try:
                out = rule(self, node) if rule else unknown_op(self, node)
            except Exception as e:  # a rule that trips on an unusual graph blocks, never fails
                out = unknown_op(self, node, f"the channel analysis failed here ({type(e).__name__}: {e})")
            self.values[node] = out
            if is_mutating(node) and isinstance(out, Chan) and node.args and isinstance(node.args[0], fx.Node):
                self.values[node.args[0]] = out  # in-place: later readers of the input see this
        for fqn, reason in self.param_blocks.items():
            for (name, _), ax in self.axes.items():
                if name == fqn:
                    self.blocks.append((ax.atoms, reason))
        return self.finalize()

    def finalize(self) -> "ChannelAnalysis":
        """Fix the classes (call again after more unions)."""
        self._roots = self.atoms.roots()
        return self

    # ------------------------------------------------------------------ results
    def roots(self, atoms: np.ndarray) -> np.ndarray:
        return self._roots[atoms]

    def blocked_roots(self, more=()) -> dict[int, str]:
        """Root -> why its class is blocked: the reason of the first block holding one of its
        atoms, this analysis's blocks first, then ``more`` ((atoms, reason) pairs), in order."""
        blocks = [*self.blocks, *more]
        if not blocks:
            return {}
        roots = np.concatenate([self.roots(atoms).ravel() for atoms, _ in blocks])
        block = np.repeat(np.arange(len(blocks)), [atoms.size for atoms, _ in blocks])
        uniq, first = np.unique(roots, return_index=True)
        by_block = np.lexsort((uniq, block[first]))       # in the order the blocks name them
        reasons = [why for _, why in blocks]
        return dict(zip(uniq[by_block].tolist(), [reasons[b] for b in block[first[by_block]].tolist()]))

    def spaces(self) -> dict[int, int]:
        """Class root -> space id: classes that share a parameter dim are compacted together. The
        id is the space's smallest root. Computed over the dims (a few hundred) rather than the
        classes (thousands): dims that share a class are one space."""
        per_axis = [ax.atoms.ravel() for ax in self.axes.values()]
        sizes = [a.size for a in per_axis]
        if not sum(sizes):
            return {}
        n = len(per_axis)
        # int32 where the ids fit: these temporaries are as large as the atoms (half the memory
        # to write and fault in)
        small = np.int32 if max(self.atoms.size, n * n) <= np.iinfo(np.int32).max else np.int64
        ids = np.concatenate(per_axis, dtype=small, casting="same_kind")
        root = self._roots.astype(small, copy=False)[ids]
        axis = np.repeat(np.arange(n, dtype=small), sizes)
        first_axis = np.full(self.atoms.size, n, dtype=small)
        np.minimum.at(first_axis, root, axis)                  # each class's first dim
        other = first_axis[root]
        tie = (axis * n + other)[other != axis]               # dim -> a dim it shares a class with
        # a dim's atoms repeat the same few ties (the -1 of tie's dtype: no int64 copy)
        tie = tie[np.flatnonzero(np.diff(tie, prepend=tie.dtype.type(-1)))]
        label = components(n, [np.divmod(tie, n)])             # each dim's space
        roots = np.flatnonzero(first_axis < n)
        space = label[first_axis[roots]]
        smallest = np.full(n, self.atoms.size)
        np.minimum.at(smallest, space, roots)                  # each space's smallest root
        return dict(zip(roots.tolist(), smallest[space].tolist()))


def _live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose result reaches the output, and in-place ops (their effect is not a result)."""
    live: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if node.op == "output" or is_mutating(node) or any(u in live for u in node.users):
            live.add(node)
    return live
