"""discover: every parameter used as the weight of a linear or convolution becomes a Target.

Recognised uses, in either capture (module calls, torch functions, ATen ops after export):
``nn.Linear`` / ``F.linear`` / ``aten.linear``; ``nn.ConvNd`` / ``F.convNd`` / ``aten.convNd`` /
``aten.convolution`` (not transposed); ``addmm(bias, x, W)`` (HF ``Conv1D``); ``x @ W``,
``mm``/``matmul`` against a parameter (or its transpose). One parameter used by several nodes
(tied weights) is one target.
"""
from __future__ import annotations

import operator
import warnings

from torch import fx, nn

from ..errors import FxPruneError
from ..geometry import WeightGeometry
from .base import Pass
from .capture import canonical_names
from .context import PruneContext, Target
from .dependency import arg as _arg

_BN_ARGS = {  # op name -> positions of (weight, bias, running_mean); batch_norm: see _bn_params
    "_native_batch_norm_legit_no_training": (1, 2, 3),
    "_native_batch_norm_legit": (1, 2, 3),
}


def op_name(node: fx.Node) -> str:
    """'linear', 'conv2d', 'addmm'... for torch functions and ATen overloads alike."""
    target = node.target
    if target is operator.matmul:
        return "matmul"
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


class DiscoverPass(Pass):
    name = "discover"

    def requires(self, ctx: PruneContext) -> None:
        if ctx.graph_module is None:
            raise FxPruneError("discover needs a captured graph: run the capture pass first")

    def call(self, ctx: PruneContext) -> None:
        self.ctx = ctx
        self.modules = dict(ctx.graph_module.named_modules()) if ctx.capture_method == "symbolic_trace" else {}
        self.canonical = canonical_names(ctx.model)
        opaque = []
        for position, node in enumerate(ctx.graph_module.graph.nodes):
            use = self._weight_use(node)
            if use is None:
                if node.op == "call_module" and _hides_weights(self.modules.get(node.target)):
                    opaque.append(f"{node.target} ({type(self.modules[node.target]).__name__})")
                continue
            param, layout, op, groups, bias, owner = use
            weight = ctx.model.get_parameter(param)
            geom = WeightGeometry(layout, tuple(weight.shape), groups)
            target = ctx.targets.get(param)
            if target is None:
                module_name = param[: -len(".weight")] if param.endswith(".weight") else param
                aliases = [a.removesuffix(".weight") for a, c in self.canonical.items()
                           if c == param and a != param]
                target = Target(param=param, name=module_name, module_type=owner or _kind_name(op),
                                op=op, geometry=geom, bias=bias, aliases=aliases)
                ctx.targets[param] = target
            elif target.geometry != geom:  # e.g. F.linear(x, W) and x @ W: no one 2-D view to rank
                target.status = (f"skipped: used as a weight in two layouts ({target.geometry.layout} "
                                 f"and {geom.layout}), so no block layout fits both")
            target.nodes.append(node.name)
            target.position = position
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
            if name is not None and _is_parameter(self.ctx.model, name):
                return name
        return None

    def _weight_param(self, arg, layout: str) -> tuple[str | None, str]:
        """The parameter behind a weight argument, and its layout (flipped when it is ``W.t()``)."""
        param = self._param(arg)
        if param is None and isinstance(arg, fx.Node) and _is_transpose(arg):
            param, layout = self._param(arg.args[0]), "in_out" if layout == "out_in" else "out_in"
        return param, layout

    def _owner_type(self, param: str, op: str) -> str | None:
        """Class name of the module owning ``param`` when that module *is* the op (nn.Linear...)."""
        owner_name = param.rpartition(".")[0]
        try:
            owner = self.ctx.model.get_submodule(owner_name)
        except AttributeError:
            return None
        is_op_module = isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)) or type(owner).__name__ == "Conv1D"
        return type(owner).__name__ if is_op_module else None

    def _weight_use(self, node: fx.Node):
        """(param, layout, op, groups, bias, owner type) if ``node`` uses a parameter as a weight."""
        if node.op == "call_module":
            return self._module_use(node)
        if node.op != "call_function":
            return None
        name = op_name(node)
        if name == "linear":
            param, layout = self._weight_param(_arg(node, 1, "weight"), "out_in")
            op, groups, bias = "linear", 1, _arg(node, 2, "bias")
        elif name in ("conv1d", "conv2d", "conv3d"):
            param, layout, op = self._param(_arg(node, 1, "weight")), "conv", name
            groups, bias = _arg(node, 6, "groups", 1), _arg(node, 2, "bias")
        elif name == "convolution":
            if _arg(node, 6, "transposed", False):
                return None
            param, layout, groups, bias = self._param(_arg(node, 1, "weight")), "conv", _arg(node, 8, "groups", 1), _arg(node, 2, "bias")
            op = None
        elif name == "addmm":
            param, layout = self._weight_param(_arg(node, 2, "mat2"), "in_out")
            op, groups, bias = "linear", 1, _arg(node, 0, "input")
        elif name in ("mm", "matmul"):
            param, layout = self._weight_param(_arg(node, 1, "other" if name == "matmul" else "mat2"), "in_out")
            op, groups, bias = "linear", 1, None
        else:
            return None
        if param is None:
            return None
        weight = self.ctx.model.get_parameter(param)
        if layout != "conv" and weight.dim() != 2:
            return None
        if op is None:
            op = f"conv{weight.dim() - 2}d"
        return param, layout, op, int(groups or 1), self._param(bias), self._owner_type(param, op)

    def _module_use(self, node: fx.Node):
        module = self.modules.get(node.target)
        prefix = f"{node.target}."
        if isinstance(module, nn.Linear):
            layout, op, groups = "out_in", "linear", 1
        elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            layout, op, groups = "conv", f"conv{module.weight.dim() - 2}d", module.groups
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            layout, op, groups = "in_out", "linear", 1
        else:
            return None
        # A module's parameters are not graph nodes; canonicalize their names (tied aliases) here.
        param = self.canonical.get(prefix + "weight")
        bias = self.canonical.get(prefix + "bias") if getattr(module, "bias", None) is not None else None
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
        name = op_name(user)
        if name == "batch_norm":
            aten = getattr(user.target, "overloadpacket", None) is not None
            positions = (1, 2, 3) if aten else (3, 4, 1)  # aten: (x, w, b, mean...); F: (x, mean, var, w, b)
        elif name in _BN_ARGS:
            positions = _BN_ARGS[name]
        else:
            return []
        out = []
        for i in positions:
            arg = user.args[i] if i < len(user.args) else None
            if isinstance(arg, fx.Node) and arg.name in self.ctx.param_of_node:
                out.append(self.ctx.param_of_node[arg.name])
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
        isinstance(m, nn.Linear) or getattr(m, "in_proj_weight", None) is not None
        or (isinstance(m, nn.modules.conv._ConvNd) and not m.transposed) for m in module.modules())


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


def _is_parameter(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


def _has_tensor(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    try:
        return getattr(model.get_submodule(module_name), attr, None) is not None
    except AttributeError:
        return False
