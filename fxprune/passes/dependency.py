"""Channel dependency analysis over the captured ATen graph (issue 4: compaction).

Every channel that compaction could remove is an *atom*; atoms that must go together (the two
inputs of a residual add, the q/k/v rows of one attention head, the channels of one GroupNorm
group, ...) are merged with a union-find, and one merged set is a *class*: the unit of channel
pruning, with one score. The analysis walks the graph once, in order, and gives each tensor a
:class:`Chan`: which of its dims carry atoms, which atom sits at each index, and whether the
pruned channels are still exact zeros there (they must be, wherever a consumer's input slice is
removed). Parameters are bound to atoms per dim (``axes``): that is what compaction slices.

Anything not understood (an unknown op touching a channel dim, a norm over channels, a channel
reaching the model output, a coupling with a tensor no prunable layer produced) *blocks* the
classes involved, with a reason naming the op; blocked classes are never pruned. The op rules
live in :mod:`fxprune.passes.channel_ops`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
from torch import fx


class AtomSet:
    """Union-find over atom ids (ints)."""

    def __init__(self):
        self.parent: list[int] = []

    def new(self, shape) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64).reshape(shape)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the oldest atom stays the root

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.ravel().tolist(), b.ravel().tolist()):
            if x != y:
                self.union(x, y)

    def union_all(self, a: np.ndarray) -> None:
        flat = a.ravel().tolist()
        for x in flat[1:]:
            self.union(flat[0], x)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


@dataclass
class Chan:
    """The channel structure of one tensor: ``atoms[i, j, ...]`` is the atom at index i of
    ``dims[0]``, j of ``dims[1]``... (broadcast over the other dims)."""

    dims: tuple[int, ...]
    atoms: np.ndarray
    zero: bool = True          # pruned channels hold exact zeros here
    why: str = ""              # the op that made them nonzero, when not zero


@dataclass(frozen=True)
class ParamRef:
    """A parameter or buffer seen through transposes: dim i of this value is dim perm[i] of it."""

    fqn: str
    perm: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass
class Axis:
    """Atoms bound to one dim of a parameter/buffer; ``roles``: source (a layer's output
    channels), zero (zeroed with a pruned channel: bias, norm affine), slice (cut only)."""

    atoms: np.ndarray
    roles: set = field(default_factory=set)


@dataclass
class HeadSplit:
    """A reshape that splits channels into (heads, head_dim): the module's head-count attributes
    change when whole heads go."""

    module: str
    atoms: np.ndarray          # [heads, head_dim]


@dataclass
class NormGroups:
    module: str
    num_groups: int
    atoms: np.ndarray          # [num_groups, channels_per_group]


def op_name(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    packet = getattr(node.target, "overloadpacket", None)
    return packet.__name__ if packet is not None else getattr(node.target, "__name__", str(node.target))


def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument ``index`` of ``node``, positional or keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_mutating(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def shape_of(value) -> tuple[int, ...] | None:
    if isinstance(value, fx.Node):
        value = value.meta.get("val")
    shape = getattr(value, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def module_of(node: fx.Node) -> str:
    """FQN (in the user's model) of the innermost module that ran ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return "" if path == "model" else path.removeprefix("model.")


def where(node: fx.Node) -> str:
    module = module_of(node)
    return f"{op_name(node)} ({module or node.name})"


class ChannelAnalysis:
    """Run over an exported graph; then read ``axes``, ``blocked_roots()``, ``head_splits``."""

    def __init__(self, graph_module: fx.GraphModule, param_of_node: dict[str, str]):
        self.gm = graph_module
        self.param_of_node = param_of_node
        self.atoms = AtomSet()
        self.axes: dict[tuple[str, int], Axis] = {}
        self.blocks: list[tuple[np.ndarray, str]] = []
        self.param_blocks: dict[str, str] = {}     # param used by an op the analysis does not know
        self.head_splits: list[HeadSplit] = []
        self.norm_groups: list[NormGroups] = []
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

    def block(self, value, reason: str) -> None:
        """Mark every atom in ``value`` (a Chan, list of them, atom array) unprunable."""
        if isinstance(value, Chan):
            self.blocks.append((value.atoms, reason))
        elif isinstance(value, np.ndarray):
            self.blocks.append((value, reason))
        elif isinstance(value, ParamRef):
            self.param_blocks.setdefault(value.fqn, reason)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self.block(v, reason)

    # ------------------------------------------------------------------ the walk
    def run(self) -> "ChannelAnalysis":
        from .channel_ops import RULES, unknown_op  # the op table

        graph = self.gm.graph
        live = _live_nodes(graph)
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
            rule = RULES.get(name) or (RULES.get(name[:-1]) if name.endswith("_") else None)
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

    def blocked_roots(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for atoms, reason in self.blocks:
            for r in np.unique(self.roots(atoms)).tolist():
                out.setdefault(r, reason)
        return out

    def spaces(self) -> dict[int, int]:
        """Class root -> space id: classes that share a parameter dim are compacted together."""
        dsu = AtomSet()
        index: dict[int, int] = {}
        for ax in self.axes.values():
            ids = [index.setdefault(r, len(index)) for r in np.unique(self.roots(ax.atoms)).tolist()]
            while len(dsu.parent) < len(index):
                dsu.parent.append(len(dsu.parent))
            dsu.union_all(np.array(ids))
        return {r: dsu.find(i) for r, i in index.items()}


def _live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose result reaches the output, and in-place ops (their effect is not a result)."""
    live: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if node.op == "output" or is_mutating(node) or any(u in live for u in node.users):
            live.add(node)
    return live
