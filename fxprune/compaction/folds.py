"""Norms whose statistic averages over the channels: RMSNorm (``x * rsqrt(mean(x^2) + eps) * w``,
decomposed or the fused ``rms_norm``) and ConvNeXt-V2's global response norm (``g / (mean(g) +
eps)``). Removing channels that are zero leaves the sum in the mean unchanged but divides it by
C_kept instead of C; with r = C / C_kept the compacted statistic is r times the masked one, which
an epsilon rescaled by r turns into a constant factor folded into a parameter (the norm's weight).
The proof is in docs/compact.md, "Norms over the channels". The analysis records each such norm
as a :class:`~.values.ScaleFold`; :mod:`.slicing` applies it.
"""
from __future__ import annotations

import math

import torch
from torch import fx

from ..aten import arg, module_of, op_name, shape_of
from .modules import compact_class_of
from .rules import keep, nonzero_reason, param_plus_number, register_rule, unknown_op, where
from .values import Chan, ParamRef, ScaleFold

# ops a scalar factor passes through unchanged (first argument)
_CARRY = ("to", "_to_copy", "type_as", "clone", "contiguous", "alias", "detach", "view", "reshape",
          "_unsafe_view", "unsqueeze", "squeeze", "expand", "permute", "transpose", "t")
# ops that raise the statistic to a power
_POWERS = {"rsqrt": -0.5, "sqrt": 0.5, "reciprocal": -1.0}
# where a module keeps its epsilon, most likely first
EPS_ATTRS = ("variance_epsilon", "eps", "epsilon", "norm_eps", "layer_norm_eps", "rms_norm_eps")


def fold_factors(channels: int, kept: int, fold: ScaleFold) -> tuple[float, float]:
    """(factor for the folded parameter, factor for the epsilon) when ``kept`` of ``channels`` stay."""
    r = channels / kept
    return r ** fold.power, r ** fold.eps_power


def eps_attribute(module, eps: float | None) -> str | None:
    """The attribute of ``module`` that holds ``eps`` (a float equal to it), or None."""
    for name in EPS_ATTRS:
        v = getattr(module, name, None)
        if eps is None and name in vars(module) and v is None:
            return name
        if isinstance(v, float) and eps is not None and math.isclose(v, eps, rel_tol=1e-6, abs_tol=0.0):
            return name
    return None


def _live_users(an, node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u in an.live]


def _sole_use(an, fqn: str, end: fx.Node) -> bool:
    """Whether parameter ``fqn`` reaches no live op but ``end`` (through views and casts)."""
    todo = [n for n in an.gm.graph.nodes if n.op == "placeholder" and an.param_of_node.get(n.name) == fqn]
    seen = set()
    while todo:
        n = todo.pop()
        for u in _live_users(an, n):
            if u in seen:
                continue
            seen.add(u)
            if op_name(u) in _CARRY and u.args[0] is n:
                todo.append(u)
            elif u is not end:
                return False
    return True


def _param_of(an, arg) -> str | None:
    """The parameter ``arg`` is, through views and casts (the walk may not have reached them yet)."""
    while isinstance(arg, fx.Node):
        if arg.op == "placeholder":
            return an.param_of_node.get(arg.name)
        if arg.op != "call_function" or op_name(arg) not in _CARRY or not arg.args:
            return None
        arg = arg.args[0]
    return None


def _resolve_eps(an, fold: ScaleFold, node: fx.Node) -> str | None:
    """Find the module attribute holding the epsilon; a reason when it is not one."""
    if fold.eps is None or fold.eps == 0:
        return None
    model = an.model
    if model is None:  # resolved when slicing
        return None
    try:
        module = model.get_submodule(fold.module)
    except AttributeError:
        module = None
    name = eps_attribute(module, fold.eps) if module is not None else None
    if name is None and module is not None:  # a compact class holding the code's constant as an attribute
        compact = compact_class_of(module)
        name = eps_attribute(compact, fold.eps) if compact is not None else None
        fold.compact_class = compact if name is not None else None
    if name is None:
        return (f"its epsilon {fold.eps:g} ({where(node)}) is a constant in the code, not an attribute "
                f"of module {fold.module or 'the model'}, so it cannot be rescaled for the channels kept "
                f"(keep it as an attribute, e.g. self.eps, or register a compact class for "
                f"{type(module).__name__ if module is not None else 'the module'} with "
                f"fxprune.compaction.register_compact_class)")
    fold.eps_attr = name
    return None


def match_channel_mean(an, node: fx.Node, xv: Chan) -> ScaleFold | str:
    """``node`` averages the (zero when pruned) channels ``xv``: follow its result to the parameter
    the channel-count factor can be folded into. Returns the fold, or why not."""
    cur, power = node, 1.0
    eps, eps_node, eps_power, combined = None, None, 1.0, False
    for _ in range(64):
        users = _live_users(an, cur)
        if len(users) != 1:
            return f"its result is used by {len(users)} ops, not by one chain that ends at a weight"
        u = users[0]
        name = op_name(u)
        args = list(u.args)
        if name in _CARRY and args[0] is cur:
            cur = u
            continue
        if name in _POWERS and args[0] is cur:
            power *= _POWERS[name]
            cur = u
            continue
        if name == "pow" and args[0] is cur and isinstance(args[1], (int, float)):
            power *= float(args[1])
            cur = u
            continue
        if name == "add" and len(args) == 2 and not combined and eps is None:
            other = args[1] if args[0] is cur else args[0]
            if isinstance(other, (int, float)) and not isinstance(other, bool):
                eps, eps_node, eps_power = float(other), u, power
                cur = u
                continue
        if name in ("mul", "div") and len(args) == 2 and cur in args:
            other = args[1] if args[0] is cur else args[0]
            fqn = _param_of(an, other)
            if name == "mul" and fqn is not None:
                return _fold(an, node, xv, u, fqn, power, eps, eps_node, eps_power)
            shifted = _shifted_param_of(an, other, u) if name == "mul" else None
            if shifted is not None:  # times (offset + w): the factor goes into that sum
                fqn, offset, add = shifted
                return _fold(an, node, xv, add, fqn, power, eps, eps_node, eps_power, offset)
            if name == "div" and args[1] is cur:
                power = -power
            combined = True
            cur = u
            continue
        if name == "addcmul" and cur in args[1:3] and args[0] is not cur:
            fqn = _param_of(an, args[2] if args[1] is cur else args[1])
            if fqn is not None:  # input + gamma * cur: the factor goes into gamma
                return _fold(an, node, xv, u, fqn, power, eps, eps_node, eps_power)
        if name in ("linear", "conv1d", "conv2d", "conv3d") and args[0] is cur:
            fqn = _param_of(an, args[1])
            if fqn is not None:  # the factor scales the weight, not the bias
                return _fold(an, node, xv, u, fqn, power, eps, eps_node, eps_power)
        return f"{where(u)} uses it in a way compaction cannot rescale"
    return "its result goes through too many ops"


def _shifted_param_of(an, arg, end: fx.Node) -> tuple[str, float, fx.Node] | None:
    """(parameter, offset, the add) when ``arg`` is ``offset + parameter`` (through views and casts,
    ``w - c`` too) used by ``end`` alone: Gemma's ``1 + weight``."""
    while isinstance(arg, fx.Node) and arg.op == "call_function" and op_name(arg) in _CARRY and arg.args:
        if _live_users(an, arg) != [end]:
            return None
        end, arg = arg, arg.args[0]
    if not (isinstance(arg, fx.Node) and op_name(arg) in ("add", "sub") and _live_users(an, arg) == [end]):
        return None
    fqns: dict[int, str | None] = {}

    def is_param(i: int) -> bool:
        fqns[i] = _param_of(an, arg.args[i])
        return fqns[i] is not None
    found = param_plus_number(op_name(arg), arg.args, arg, is_param)
    return None if found is None else (fqns[found[0]], found[1], arg)


def _fold(an, node, xv, end, fqn, power, eps, eps_node, eps_power, offset=0.0) -> ScaleFold | str:
    if not _sole_use(an, fqn, end):
        return f"{fqn}, where the channel-count factor would be folded, is also used elsewhere"
    module = module_of(eps_node if eps_node is not None else node)
    fold = ScaleFold(module, xv.atoms.ravel(), -power, fqn, eps, None, eps_power, offset=offset)
    why = _resolve_eps(an, fold, eps_node if eps_node is not None else node)
    return why if why else fold


@register_rule("rms_norm")
def _rms_norm(an, node):
    """``rms_norm(x, normalized_shape, weight=None, eps=None)``: over the channels, exact with the
    epsilon times r and the weight times sqrt(r) (a module without weight gets one)."""
    xv = an.value(node.args[0])
    if not isinstance(xv, Chan):
        return unknown_op(an, node) if isinstance(xv, ParamRef) else None
    n = len(shape_of(node.args[0]))
    normalized = set(range(n - len(node.args[1]), n))
    weight = an.value(arg(node, 2, "weight"))
    if not normalized & set(xv.dims):
        return keep(xv)  # normalized per channel: a pruned channel stays zero
    if xv.dims != (n - 1,) or len(normalized) != 1:
        return unknown_op(an, node, "normalizes over the channel dims together with other dims")
    if not xv.zero:
        an.block(xv, nonzero_reason(xv, node))
        return keep(xv)
    dtype = node.meta["val"].dtype if "val" in node.meta else torch.float32
    eps = arg(node, 3, "eps", None)
    fold = ScaleFold(module_of(node), xv.atoms, 0.5, None, torch.finfo(dtype).eps if eps is None else float(eps),
                     dtype=dtype)
    if isinstance(weight, ParamRef):
        if not _sole_use(an, weight.fqn, node):
            return unknown_op(an, node, f"its weight {weight.fqn} is also used elsewhere")
        an.bind(weight, 0, xv.atoms, "slice")
        fold.scale = weight.fqn
    elif weight is None:
        fold.new_weight = True
    else:
        return unknown_op(an, node, "its weight is not a parameter")
    model = an.model
    if model is not None:
        module = model.get_submodule(fold.module) if fold.module else model
        fold.eps_attr = eps_attribute(module, None if eps is None else fold.eps)
        if fold.eps_attr is None:
            return unknown_op(an, node, f"its epsilon is not an attribute of module {fold.module}")
        if fold.new_weight and not (isinstance(module, torch.nn.RMSNorm) and module.weight is None):
            return unknown_op(an, node, "no weight to fold the channel-count factor into")
    an.scale_folds.append(fold)
    return keep(xv)
