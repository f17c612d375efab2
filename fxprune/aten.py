"""Reading graph nodes: op names, argument positions, and the layers fxprune recognises.

The one place that knows how torch functions, ATen ops and modules lay out their arguments, for
discovery, calibration and compaction alike. Nodes come from ``torch.fx.symbolic_trace`` (torch
functions, module calls) or ``torch.export`` (ATen overloads); calibration sees ATen calls at
dispatch time (``func``, ``args``), which use the same ATen positions.
"""
from __future__ import annotations

import operator
from typing import Any

from torch import fx, nn

# ---------------------------------------------------------------------- argument positions
# aten.convolution / aten._convolution:
#   (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
CONVOLUTION_ARGS = {"input": 0, "weight": 1, "bias": 2, "stride": 3, "padding": 4, "dilation": 5,
                    "transposed": 6, "output_padding": 7, "groups": 8}
# aten.convNd / F.convNd: (input, weight, bias, stride, padding, dilation, groups)
CONV_ND_ARGS = {"input": 0, "weight": 1, "bias": 2, "stride": 3, "padding": 4, "dilation": 5, "groups": 6}
GENERAL_CONVOLUTIONS = ("convolution", "_convolution")
CONV_ND = ("conv1d", "conv2d", "conv3d")

# The ATen batch-norm family: (input, weight, bias, running_mean, running_var, ...);
# F.batch_norm (a symbolic_trace node): (input, running_mean, running_var, weight, bias, ...).
BATCH_NORM_ARGS = {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4}
FUNCTIONAL_BATCH_NORM_ARGS = {"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4}
BATCH_NORM_TUPLE_OPS = ("_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                        "native_batch_norm")   # return (out, mean, invstd)
BATCH_NORM_OPS = ("batch_norm", *BATCH_NORM_TUPLE_OPS)

# Matrix products with a weight: op -> (weight position, input position); the weight is [in, out].
LINEAR_WEIGHT_ARGS = {"mm": (1, 0), "addmm": (2, 1), "bmm": (1, 0), "matmul": (1, 0)}
ADDMM_BIAS = 0


def op_name(node: fx.Node) -> str:
    """'linear', 'conv2d', 'addmm', 'getitem'... for torch functions and ATen overloads alike."""
    target = node.target
    if target is operator.getitem:
        return "getitem"
    if target is operator.matmul:
        return "matmul"
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


def is_aten(node: fx.Node) -> bool:
    """Whether ``node`` calls an ATen overload (a ``torch.export`` graph) rather than a torch function."""
    return getattr(node.target, "overloadpacket", None) is not None


def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument ``index`` of ``node``, positional or keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def named_arg(node: fx.Node, positions: dict[str, int], name: str, default=None):
    """Argument ``name`` of ``node`` by a positions table (``CONVOLUTION_ARGS``...)."""
    return arg(node, positions[name], name, default)


def conv_positions(name: str) -> dict[str, int] | None:
    """The argument positions of a convolution op, None for another op."""
    if name in GENERAL_CONVOLUTIONS:
        return CONVOLUTION_ARGS
    if name in CONV_ND:
        return CONV_ND_ARGS
    return None


def batch_norm_positions(node: fx.Node) -> dict[str, int] | None:
    """The argument positions of a batch-norm node (ATen or ``F.batch_norm``), None for another op."""
    name = op_name(node)
    if name == "batch_norm":
        return BATCH_NORM_ARGS if is_aten(node) else FUNCTIONAL_BATCH_NORM_ARGS
    if name in BATCH_NORM_TUPLE_OPS:
        return BATCH_NORM_ARGS
    return None


def is_mutating(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def shape_of(value) -> tuple[int, ...] | None:
    """The shape of a node's value (``meta["val"]``, recorded by ``torch.export``) or a tensor."""
    if isinstance(value, fx.Node):
        value = value.meta.get("val")
    shape = getattr(value, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def module_of(node: fx.Node) -> str:
    """FQN (in the user's model) of the innermost module that ran ``node`` (``torch.export``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return "" if path == "model" else path.removeprefix("model.")


# ---------------------------------------------------------------------- modules
def is_hf_conv1d(module: Any) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer whose weight is ``[in, out]``. Recognised by
    class name, so transformers is not imported."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def is_conv(module: Any) -> bool:
    """A (not transposed) ``nn.ConvNd``."""
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed


def is_weight_layer(module: Any) -> bool:
    """A module that *is* a linear or convolution op: ``nn.Linear``, ``nn.ConvNd``, HF ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv(module) or is_hf_conv1d(module)


class ModuleLookup:
    """``model.get_submodule`` / ``get_parameter`` for many names, each parameter's aliases, and the
    walks over the modules the passes make, from one walk of the modules (``get_submodule`` walks
    and checks every step of a path, about 14 us a call; ``named_parameters`` and the like walk
    the module tree again on every call). ``canonical``: every parameter/buffer name (tied aliases
    included) -> the first name of that tensor (``capture.canonical_names``), worked out from the
    same walk when not given. A name the walk does not know goes to ``model``'s own methods (same
    results and errors). The modules are walked once, so a module added or replaced after that is
    not seen (tensors replaced are): one lookup serves passes that change tensors and attributes,
    not the module tree (the passes of a ``PassManager`` run between two that may replace
    modules: ``Pass.keeps_module_tree``, ``PruneContext.module_lookup``)."""

    def __init__(self, model: nn.Module, canonical: dict[str, str] | None = None):
        self.model = model
        self._canonical = canonical
        self._named: list[tuple[str, nn.Module]] | None = None
        self._modules: dict[str, nn.Module] | None = None
        self._distinct: list[tuple[str, nn.Module]] | None = None
        self._aliases: dict[str, list[str]] | None = None

    @property
    def named(self) -> list[tuple[str, nn.Module]]:
        """``list(model.named_modules(remove_duplicate=False))``."""
        if self._named is None:
            self._named = list(self.model.named_modules(remove_duplicate=False))
        return self._named

    def named_modules(self) -> list[tuple[str, nn.Module]]:
        """``list(model.named_modules())``: each module once, under its first name."""
        if self._distinct is None:
            seen: set[int] = set()
            self._distinct = [(n, m) for n, m in self.named if not (id(m) in seen or seen.add(id(m)))]
        return self._distinct

    def modules(self) -> list[nn.Module]:
        """``list(model.modules())``."""
        return [m for _, m in self.named_modules()]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``list(model.named_parameters())``, read now (parameters replaced since are seen)."""
        seen: set[int] = set()
        out = []
        for prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    out.append((f"{prefix}.{name}" if prefix else name, p))
        return out

    def parameters(self) -> list[nn.Parameter]:
        """``list(model.parameters())``, read now."""
        return [p for _, p in self.named_parameters()]

    @property
    def canonical(self) -> dict[str, str]:
        if self._canonical is None:
            first: dict[int, str] = {}
            out: dict[str, str] = {}
            for store in ("_parameters", "_buffers"):   # named_parameters / named_buffers(remove_duplicate=False)
                for prefix, module in self.named:
                    for name, t in getattr(module, store).items():
                        if t is not None:
                            full = f"{prefix}.{name}" if prefix else name
                            out[full] = first.setdefault(id(t), full)
            self._canonical = out
        return self._canonical

    def submodule(self, name: str) -> nn.Module:
        module = self._module(name)
        return module if module is not None else self.model.get_submodule(name)

    def parameter(self, name: str) -> nn.Parameter:
        module_name, _, attr = name.rpartition(".")
        module = self._module(module_name)
        p = module._parameters.get(attr) if module is not None else None
        return p if p is not None else self.model.get_parameter(name)

    def tensor(self, name: str):
        """The parameter or buffer ``name`` (``KeyError`` for a buffer the module does not have)."""
        module_name, _, attr = name.rpartition(".")
        module = self.submodule(module_name)
        t = module._parameters.get(attr)
        return t if t is not None else module._buffers[attr]

    def _module(self, name: str) -> nn.Module | None:
        if self._modules is None:
            self._modules = dict(self.named)
        return self._modules.get(name)

    def aliases(self, param: str) -> list[str]:
        """The other names of ``param`` (tied weights), in ``canonical``'s order."""
        if self._aliases is None:
            self._aliases = {}
            for a, c in self.canonical.items():
                if a != c:
                    self._aliases.setdefault(c, []).append(a)
        return self._aliases.get(param, [])
