"""discover: every parameter used as the weight of a linear or convolution becomes a Target.

Recognised uses, in either capture (module calls, torch functions, ATen ops after export):
``nn.Linear`` / ``F.linear`` / ``aten.linear``; ``nn.ConvNd`` / ``F.convNd`` / ``aten.convNd`` /
``aten.convolution`` (not transposed); ``addmm(bias, x, W)`` (HF ``Conv1D``); ``x @ W``,
``mm``/``matmul`` against a parameter (or its transpose). One parameter used by several nodes
(tied weights) is one target.
"""
from __future__ import annotations

import warnings

from torch import fx, nn

from ..errors import FxPruneError
from ..aten import (ADDMM_BIAS, CONV_ND, LINEAR_WEIGHT_ARGS, ModuleLookup, arg, batch_norm_positions,
                    conv_positions, is_conv, is_hf_conv1d, is_weight_layer, named_arg, op_name)
from ..geometry import WeightGeometry
from .base import Pass
from .context import SYMBOLIC_CAPTURE, PruneContext, Target

def add_use(ctx: PruneContext, lookup: ModuleLookup, param: str, layout: str, op: str,
            groups: int, bias: str | None, owner: str | None, label: str, position: int) -> Target:
    """Record one use of ``param`` as a weight: its Target is made at the first use (graph order
    is target order); ``position`` is that of the last use. The one place a Target is built from a
    use, for the graph discovery and for :mod:`.eager`'s. ``lookup``: a :class:`ModuleLookup` of
    ``ctx.model`` with its canonical names (tied aliases)."""
    weight = lookup.parameter(param)
    geom = WeightGeometry(layout, tuple(weight.shape), groups)
    target = ctx.targets.get(param)
    if target is None:
        module_name = param[: -len(".weight")] if param.endswith(".weight") else param
        aliases = [a.removesuffix(".weight") for a in lookup.aliases(param)]
        target = Target(param=param, name=module_name, module_type=owner or _kind_name(op),
                        op=op, geometry=geom, bias=bias, aliases=aliases)
        ctx.targets[param] = target
    elif target.geometry != geom:  # e.g. F.linear(x, W) and x @ W: no one 2-D view to rank
        target.status = (f"skipped: used as a weight in two layouts ({target.geometry.layout} "
                         f"and {geom.layout}), so no block layout fits both")
    target.nodes.append(label)
    target.position = position
    return target


def owner_type(lookup: ModuleLookup, param: str) -> str | None:
    """Class name of the module owning ``param`` when that module *is* the op (nn.Linear...)."""
    try:
        owner = lookup.submodule(param.rpartition(".")[0])
    except AttributeError:
        return None
    return type(owner).__name__ if is_weight_layer(owner) else None


class DiscoverPass(Pass):
    name = "discover"
    keeps_module_tree = True

    def requires(self, ctx: PruneContext) -> None:
        if ctx.graph_module is None:
            raise FxPruneError("discover needs a captured graph: run the capture pass first")

    def call(self, ctx: PruneContext) -> None:
        self.ctx = ctx
        self.modules = dict(ctx.graph_module.named_modules()) if ctx.capture_method == SYMBOLIC_CAPTURE else {}
        self.lookup = ctx.module_lookup()
        opaque = []
        for position, node in enumerate(ctx.graph_module.graph.nodes):
            use = self._weight_use(node)
            if use is None:
                if node.op == "call_module" and _hides_weights(self.modules.get(node.target)):
                    opaque.append(f"{node.target} ({type(self.modules[node.target]).__name__})")
                continue
            param, layout, op, groups, bias, owner = use
            target = add_use(ctx, self.lookup, param, layout, op, groups, bias, owner, node.name,
                             position)
            # Every BatchNorm fed by any use of the weight (a shared conv, a branch beside the BN).
            for user in node.users:
                for name in self._bn_params(user, node):
                    if name not in target.channel_followers:
                        target.channel_followers.append(name)
        if opaque:
            warnings.warn(
                f"torch.fx.symbolic_trace keeps {', '.join(sorted(set(opaque))[:5])} as one opaque call: "
                f"the linear/conv weights inside are not pruned; pass example_inputs=(...) to capture "
                f"with torch.export, which sees them", stacklevel=2)

    # ------------------------------------------------------------------ recognising uses
    def _param(self, arg) -> str | None:
        if isinstance(arg, fx.Node):
            name = self.ctx.param_of_node.get(arg.name)
            if name is not None and _is_parameter(self.lookup, name):
                return name
        return None

    def _weight_param(self, arg, layout: str) -> tuple[str | None, str]:
        """The parameter behind a weight argument, and its layout (flipped when it is ``W.t()``)."""
        param = self._param(arg)
        if param is None and isinstance(arg, fx.Node) and _is_transpose(arg):
            param, layout = self._param(arg.args[0]), "in_out" if layout == "out_in" else "out_in"
        return param, layout


    def _weight_use(self, node: fx.Node):
        """(param, layout, op, groups, bias, owner type) if ``node`` uses a parameter as a weight."""
        if node.op == "call_module":
            return self._module_use(node)
        if node.op != "call_function":
            return None
        name = op_name(node)
        conv = conv_positions(name)
        if name == "linear":
            param, layout = self._weight_param(arg(node, 1, "weight"), "out_in")
            op, groups, bias = "linear", 1, arg(node, 2, "bias")
        elif conv is not None:
            if "transposed" in conv and named_arg(node, conv, "transposed", False):
                return None
            param, layout = self._param(named_arg(node, conv, "weight")), "conv"
            groups, bias = named_arg(node, conv, "groups", 1), named_arg(node, conv, "bias")
            op = name if name in CONV_ND else None
        elif name in ("addmm", "mm", "matmul"):
            w_pos = LINEAR_WEIGHT_ARGS[name][0]
            w_name = {"addmm": "mat2", "mm": "mat2", "matmul": "other"}[name]
            param, layout = self._weight_param(arg(node, w_pos, w_name), "in_out")
            op, groups = "linear", 1
            bias = arg(node, ADDMM_BIAS, "input") if name == "addmm" else None
        else:
            return None
        if param is None:
            return None
        weight = self.lookup.parameter(param)
        if layout != "conv" and weight.dim() != 2:
            return None
        if op is None:
            op = f"conv{weight.dim() - 2}d"
        return param, layout, op, int(groups or 1), self._param(bias), owner_type(self.lookup, param)

    def _module_use(self, node: fx.Node):
        module = self.modules.get(node.target)
        prefix = f"{node.target}."
        if isinstance(module, nn.Linear):
            layout, op, groups = "out_in", "linear", 1
        elif is_conv(module):
            layout, op, groups = "conv", f"conv{module.weight.dim() - 2}d", module.groups
        elif is_hf_conv1d(module):
            layout, op, groups = "in_out", "linear", 1
        else:
            return None
        # A module's parameters are not graph nodes; canonicalize their names (tied aliases) here.
        param = self.lookup.canonical.get(prefix + "weight")
        bias = self.lookup.canonical.get(prefix + "bias") if getattr(module, "bias", None) is not None else None
        return param, layout, op, groups, bias, type(module).__name__

    def _bn_params(self, user: fx.Node, output: fx.Node) -> list[str]:
        """Parameter/buffer names of a per-channel BatchNorm normalizing ``output``."""
        if not user.args or user.args[0] is not output:
            return []
        if user.op == "call_module":
            bn = self.modules.get(user.target)
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                names = [f"{user.target}.{p}" for p in ("weight", "bias", "running_mean")]
                return [n for n in names if _has_tensor(self.ctx.model, n)]
            return []
        if user.op != "call_function":
            return []
        positions = batch_norm_positions(user)
        if positions is None:
            return []
        out = []
        for role in ("weight", "bias", "running_mean"):
            a = named_arg(user, positions, role)
            if isinstance(a, fx.Node) and a.name in self.ctx.param_of_node:
                out.append(self.ctx.param_of_node[a.name])
        return out

    def ensures(self, ctx: PruneContext) -> None:
        if not ctx.targets:
            raise FxPruneError(
                f"found no prunable weights in {type(ctx.model).__name__}: fxprune prunes the weights "
                f"of linear and convolution layers (nn.Linear, nn.ConvNd, HF Conv1D, F.linear, "
                f"F.convNd, x @ W) and the captured graph has none")


def _hides_weights(module) -> bool:
    """A leaf module call (nn.MultiheadAttention, nn.TransformerEncoderLayer...) that holds linear
    or convolution layers symbolic_trace cannot see into."""
    return module is not None and any(
        isinstance(m, nn.Linear) or getattr(m, "in_proj_weight", None) is not None or is_conv(m)
        for m in module.modules())


def _kind_name(op: str) -> str:
    return "Linear" if op == "linear" else "Conv" + op[4:]


def _is_transpose(node: fx.Node) -> bool:
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = op_name(node)
    else:
        name = ""
    if name in ("t", "numpy_T"):
        return True
    if name == "transpose":
        dims = tuple(sorted(int(d) % 2 for d in node.args[1:3]))
        return dims == (0, 1)
    if name == "permute":
        dims = node.args[1] if len(node.args) == 2 else node.args[1:]
        return tuple(dims) == (1, 0)
    return False


def _is_parameter(lookup: ModuleLookup, name: str) -> bool:
    try:
        lookup.parameter(name)
        return True
    except AttributeError:
        return False


def _has_tensor(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    try:
        return getattr(model.get_submodule(module_name), attr, None) is not None
    except AttributeError:
        return False
