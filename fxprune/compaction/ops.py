"""The built-in rules of the channel analysis for elementwise ops, weight layers (linear, matmul,
convolution), attention and norms (see :mod:`.rules` for the rule interface). Layout ops
(reshape, transpose, cat, split, pooling, reductions) are in :mod:`.layout`.
"""
from __future__ import annotations

import numbers
import numpy as np
from torch import fx

from ..aten import BATCH_NORM_ARGS, BATCH_NORM_TUPLE_OPS, CONV_ND_ARGS, CONVOLUTION_ARGS, GENERAL_CONVOLUTIONS, arg, named_arg, op_name, shape_of
from .rules import keep, nonzero_reason, param_plus_number, register_rule, unknown_op, where, whole_along
from .values import Chan, ConvGroups, NormGroups, ParamRef, ShiftedParam

# ---------------------------------------------------------------------- elementwise
PASS_THROUGH = ("clone", "contiguous", "alias", "detach", "lift_fresh_copy", "_to_copy", "to",
                "type_as", "dropout", "feature_dropout")
ZERO_KEEPING = ("relu", "relu6", "gelu", "silu", "tanh", "hardtanh", "leaky_relu", "elu", "selu",
                "celu", "hardswish", "mish", "neg", "abs", "sin", "erf", "square", "sign", "sgn",
                "hardshrink", "softshrink", "tanhshrink", "atan", "asinh", "sinh", "tan")
ZERO_BREAKING = ("sigmoid", "hardsigmoid", "exp", "cos", "softplus", "log_sigmoid", "cosh", "rsqrt", "reciprocal")


@register_rule(*PASS_THROUGH, *ZERO_KEEPING, *ZERO_BREAKING)
def _unary(an, node):
    x = an.value(node.args[0])
    name = op_name(node).rstrip("_")
    if isinstance(x, ParamRef):
        return x if name in PASS_THROUGH else unknown_op(an, node, "computes a new weight")
    if not isinstance(x, Chan):
        return None
    if name in ZERO_BREAKING:
        return keep(x, False, where(node))
    return keep(x)


@register_rule("native_dropout")
def _native_dropout(an, node):
    x = an.value(node.args[0])
    return [x, None] if isinstance(x, Chan) else unknown_op(an, node)


@register_rule("clamp", "clamp_min", "clamp_max", "pow")
def _bounded(an, node):
    x = an.value(node.args[0])
    if not isinstance(x, Chan):
        return unknown_op(an, node)
    name = op_name(node).rstrip("_")
    rest = list(node.args[1:3])
    if any(isinstance(a, fx.Node) for a in rest):
        return unknown_op(an, node, "bounds or exponent are tensors")
    if name == "pow":
        ok = isinstance(rest[0], numbers.Number) and rest[0] > 0
    else:
        lo = rest[0] if name in ("clamp", "clamp_min") and rest else None
        hi = rest[-1] if name == "clamp_max" else (rest[1] if name == "clamp" and len(rest) > 1 else None)
        ok = (lo is None or lo <= 0) and (hi is None or hi >= 0)
    return keep(x) if ok else keep(x, False, where(node))


@register_rule("add", "sub", "rsub", "mul", "div")
def _binary(an, node):
    kind = op_name(node).rstrip("_")
    additive = kind in ("add", "sub", "rsub")
    out_shape = shape_of(node)
    n = len(out_shape)
    operands = list(node.args[:2])
    vals = [an.value(a) for a in operands]
    shapes = [shape_of(a) or () if isinstance(a, fx.Node) else () for a in operands]
    chans = [(i, Chan(tuple(d + n - len(shapes[i]) for d in v.dims), v.atoms, v.zero, v.why))
             for i, v in enumerate(vals) if isinstance(v, Chan)]
    if not chans:
        shifted = _shifted_param(kind, vals, operands, node)
        return shifted if shifted is not None else unknown_op(an, node, "computes a new weight")
    i, c = chans[0]
    if tuple(out_shape[d] for d in c.dims) != c.atoms.shape:
        return unknown_op(an, node, "broadcasts a channel dim")
    if len(chans) == 2:
        _, c2 = chans[1]
        if c2.dims != c.dims or c2.atoms.shape != c.atoms.shape:
            big, small = (c, c2) if len(c.dims) >= len(c2.dims) else (c2, c)
            spread = _broadcast_atoms(small, big, shapes[chans[0][0] if small is c else chans[1][0]], n)
            if spread is None:
                return unknown_op(an, node, "combines tensors whose channels do not line up")
            if kind == "div":
                return unknown_op(an, node, "divides by pruned channels")
            # per-unit values broadcast over the unit's channels (x * rsqrt(mean(x^2)) per head)
            an.atoms.union_arrays(big.atoms, spread)
            zero = (c.zero and c2.zero) if additive else (c.zero or c2.zero)
            return Chan(big.dims, big.atoms, zero, big.why or small.why)
        if kind == "div":
            return unknown_op(an, node, "divides by pruned channels")
        an.atoms.union_arrays(c.atoms, c2.atoms)
        zero = (c.zero and c2.zero) if additive else (c.zero or c2.zero)
        return Chan(c.dims, c.atoms, zero, c.why or c2.why)
    other, other_arg, osh = vals[1 - i], operands[1 - i], shapes[1 - i]
    if kind == "div" and i == 1:
        return unknown_op(an, node, "divides by pruned channels")
    if not isinstance(other_arg, fx.Node):  # a Python number
        return keep(c, False, where(node)) if additive and other_arg != 0 else keep(c)
    aligned = {d: d - (n - len(osh)) for d in c.dims}
    full = [d for d, od in aligned.items() if od >= 0 and osh[od] != 1]
    if not full:  # broadcast along the channels: a constant per channel position
        return keep(c, False, where(node)) if additive else keep(c)
    if isinstance(other, ParamRef) and len(c.dims) == 1 and other.perm[aligned[c.dims[0]]] >= 0:
        an.bind(other, aligned[c.dims[0]], c.atoms, "zero" if additive else "slice")
        return keep(c)
    if (isinstance(other, ShiftedParam) and kind == "mul" and len(c.dims) == 1
            and other.ref.perm[aligned[c.dims[0]]] >= 0):  # x * (1 + w): w sliced with x's channels
        an.bind(other.ref, aligned[c.dims[0]], c.atoms, "slice")
        return keep(c)
    if not isinstance(other, Chan) and set(full) != set(c.dims):
        # varies along some channel dims only (RoPE's cos/sin along the head dim, not the heads):
        # exact when those dims never lose entries, so whole units of the others go
        for d in full:
            whole_along(an, c, d)
        return keep(c, False, where(node)) if additive else keep(c)
    an.block(c, f"{where(node)}: combines the channels with {_origin(an, other_arg)}")
    return None


def _shifted_param(kind: str, vals, operands, node) -> ShiftedParam | None:
    """``w + c``, ``c + w`` or ``w - c`` of a parameter ``w`` and a number ``c``, else None."""
    found = param_plus_number(kind, operands, node, lambda i: isinstance(vals[i], ParamRef))
    return None if found is None else ShiftedParam(vals[found[0]], found[1])


def _broadcast_atoms(small: Chan, big: Chan, small_shape, n: int) -> np.ndarray | None:
    """``small``'s atoms spread over ``big``'s channel dims, when ``small`` carries a subset of
    them and has size 1 along the others (None otherwise)."""
    if not set(small.dims) < set(big.dims):
        return None
    shift = n - len(small_shape)
    for d in big.dims:
        if d not in small.dims and d - shift >= 0 and small_shape[d - shift] != 1:
            return None
    axes = [big.dims.index(d) for d in small.dims]
    if any(small.atoms.shape[i] != big.atoms.shape[a] for i, a in enumerate(axes)):
        return None
    shape = [big.atoms.shape[k] if k in axes else 1 for k in range(big.atoms.ndim)]
    arr = np.transpose(small.atoms, np.argsort(axes)).reshape(shape)
    return np.broadcast_to(arr, big.atoms.shape)


def _origin(an, node: fx.Node) -> str:
    """What ``node`` is, for a report: it carries no removable channels."""
    why = an.dead_ends.get(node)
    detail = f" ({why})" if why else ""
    return f"{where(node)}, whose channels cannot be removed{detail}"


# ---------------------------------------------------------------------- weight layers
def _dense(an, node, x, w, b, w_in: int, w_out: int):
    """``x @ W`` (+ b) with W seen as [in, out] through dims (w_in, w_out) of ``w``."""
    wref, xv = an.value(w), an.value(x)
    if not isinstance(wref, ParamRef) or min(wref.perm) < 0:
        return unknown_op(an, node, "its weight is not a parameter")
    xs = shape_of(x)
    if isinstance(xv, Chan):
        if xv.dims != (len(xs) - 1,):
            an.block(xv, f"{where(node)}: the channels are not its input features")
        elif not xv.zero:
            an.block(xv, nonzero_reason(xv, node))
        else:
            an.bind(wref, w_in, xv.atoms, "slice")
    elif isinstance(xv, ParamRef):
        an.block(xv, f"{where(node)}: multiplies two parameters")
    out = an.axis(wref.fqn, wref.perm[w_out], wref.shape[w_out], "source")
    _bias(an, node, b, out)
    return Chan((len(shape_of(node)) - 1,), out)


def _bias(an, node, b, out: np.ndarray) -> None:
    if b is None:
        return
    bv = an.value(b)
    if isinstance(bv, ParamRef) and len(bv.shape) >= 1 and bv.shape[-1] == out.size and min(bv.perm) >= 0:
        an.bind(bv, len(bv.shape) - 1, out, "zero")
    else:
        an.block(out, f"{where(node)}: its bias is not a parameter")


@register_rule("linear")
def _linear(an, node):
    return _dense(an, node, node.args[0], node.args[1], arg(node, 2, "bias"), w_in=1, w_out=0)


@register_rule("addmm")
def _addmm(an, node):
    return _dense(an, node, node.args[1], node.args[2], node.args[0], w_in=0, w_out=1)


@register_rule("mm", "matmul", "bmm")
def _matmul(an, node):
    a, b = node.args[0], node.args[1]
    if isinstance(an.value(b), ParamRef) and len(an.value(b).shape) == 2:
        return _dense(an, node, a, b, None, w_in=0, w_out=1)
    av, bv = an.value(a), an.value(b)
    if isinstance(av, Chan) and isinstance(bv, Chan):
        return _attention_matmul(an, node, av, bv, len(shape_of(a)), len(shape_of(b)))
    return unknown_op(an, node, "multiplies activations whose channels it cannot follow")


def _axes(c: Chan, dims: tuple[int, ...]) -> np.ndarray | None:
    """c.atoms with its axes in the order ``dims``, or None when c's dims are not those."""
    if sorted(c.dims) != sorted(dims):
        return None
    return np.transpose(c.atoms, [c.dims.index(d) for d in dims])


def _attention_matmul(an, node, av: Chan, bv: Chan, na: int, nb: int):
    """Eager attention: scores = q @ k^T and out = probs @ v, per head (a batch dim)."""
    n = len(shape_of(node))
    heads = [d for d in av.dims if d < na - 2]
    if len(heads) == 1:
        ha = heads[0]
        hb = ha - (n - na) + (n - nb)
        q, k = _axes(av, (ha, na - 1)), _axes(bv, (hb, nb - 2))
        if q is not None and k is not None and q.shape == k.shape:  # q @ k^T: contract head_dim
            an.atoms.union_rows(np.concatenate([q, k], axis=1))
            return Chan((ha + n - na,), q[:, 0].copy(), av.zero or bv.zero, av.why)
        p, v = _axes(av, (ha,)), _axes(bv, (hb, nb - 1))
        if p is not None and v is not None and p.shape[0] == v.shape[0]:  # probs @ v
            an.atoms.union_rows(np.concatenate([p.reshape(-1, 1), v.reshape(v.shape[0], -1)], axis=1))
            return Chan((ha + n - na, n - 1), v, av.zero or bv.zero, bv.why)
    return unknown_op(an, node, "multiplies activations whose channels it cannot follow")


@register_rule("scaled_dot_product_attention")
def _sdpa(an, node):
    q, k, v = (an.value(a) for a in node.args[:3])
    n = len(shape_of(node))
    hd = (n - 3, n - 1)
    arrays = [_axes(c, hd) if isinstance(c, Chan) else None for c in (q, k, v)]
    mask = arg(node, 3, "attn_mask")
    mask_shape = shape_of(mask) if isinstance(mask, fx.Node) else None
    heads = arrays[0].shape[0] if arrays[0] is not None else 0
    if any(a is None for a in arrays) or arrays[1].shape[0] != arrays[2].shape[0] or heads % arrays[1].shape[0]:
        return unknown_op(an, node, "attention whose heads it cannot remove whole (q, k and v must all "
                                    "come from pruned projections)")
    group = heads // arrays[1].shape[0]
    if group > 1 and not arg(node, 7, "enable_gqa", False):
        return unknown_op(an, node, "attention with fewer key/value heads than query heads")
    head_mask = _head_mask(an, mask, mask_shape, heads)
    if isinstance(head_mask, str):
        return unknown_op(an, node, head_mask)
    # one head goes as a whole: q, k and v rows together (with grouped-query attention, a
    # key/value head with every query head of its group)
    kv = np.arange(heads) // group
    parts = [arrays[0].reshape(heads, -1), arrays[1][kv].reshape(heads, -1), arrays[2][kv].reshape(heads, -1)]
    if head_mask is not None:
        parts.append(np.asarray(head_mask).reshape(heads, 1))
    an.atoms.union_rows(np.concatenate(parts, axis=1))
    out = np.repeat(arrays[2], group, axis=0)
    return Chan(hd, out, v.zero, v.why)


def _head_mask(an, mask, mask_shape, heads: int):
    """The atoms of a per-head attention mask's head dim (T5's relative position bias: its heads
    go with the attention heads), None for a mask shared by the heads, or why not."""
    if mask_shape is None or len(mask_shape) < 3 or mask_shape[-3] == 1:
        if isinstance(an.value(mask), Chan):
            return "its mask depends on the channels"
        return None
    mv = an.value(mask)
    dim = len(mask_shape) - 3
    if mask_shape[-3] != heads:
        return "a per-head mask whose heads do not line up"
    if isinstance(mv, Chan):
        if mv.dims != (dim,):
            return "its mask depends on the channels"
        return mv.atoms
    if mv is not None:
        return "a per-head mask it cannot follow"
    # a per-head mask no layer makes (zeros of shape (1, n_heads, q, k), T5's cross-attention):
    # its heads go with the attention's; its size must follow the module's head count, which
    # compaction rewrites (the verification checks it)
    fresh = an.atoms.new(heads)
    an.values[mask] = Chan((dim,), fresh, False, where(mask))
    return fresh


@register_rule("conv1d", "conv2d", "conv3d", "convolution", "_convolution")
def _conv(an, node):
    general = op_name(node) in GENERAL_CONVOLUTIONS
    pos = CONVOLUTION_ARGS if general else CONV_ND_ARGS
    x, w, b = node.args[0], node.args[1], named_arg(node, pos, "bias")
    transposed = named_arg(node, pos, "transposed", False) if general else False
    groups = int(named_arg(node, pos, "groups", 1) or 1)
    wref, xv = an.value(w), an.value(x)
    if transposed or not isinstance(wref, ParamRef) or wref.perm != tuple(range(len(wref.shape))):
        return unknown_op(an, node, "transposed convolution or computed weight")
    xs = shape_of(x)
    cdim = len(xs) - (len(wref.shape) - 2) - 1
    cin, cout = xs[cdim], wref.shape[0]
    chan_in = isinstance(xv, Chan) and xv.dims == (cdim,)
    if isinstance(xv, Chan) and not chan_in:
        an.block(xv, f"{where(node)}: the channels are not its input channels")
    if groups == 1:
        out = an.axis(wref.fqn, 0, cout, "source")
        if chan_in:
            if xv.zero:
                an.bind(wref, 1, xv.atoms, "slice")
            else:
                an.block(xv, nonzero_reason(xv, node))
    else:
        # grouped (depthwise: one input channel per group): output channel o reads only the input
        # channels of its group o // (cout / groups), so a group goes whole, inputs and outputs
        # together, and ``groups`` drops by one; the weight's in-group dim is never cut
        role = "slice" if chan_in and xv.zero else "source"
        out = an.axis(wref.fqn, 0, cout, role)
        if chan_in and cin % groups == 0 and cout % groups == 0:
            per_group = np.concatenate([xv.atoms.reshape(groups, -1), out.reshape(groups, -1)], axis=1)
            an.atoms.union_rows(per_group)
            an.conv_groups.append(ConvGroups(wref.fqn.rpartition(".")[0], groups, per_group))
        else:
            kind = "depthwise" if wref.shape[1] == 1 else f"grouped (groups={groups})"
            an.block(out, f"{where(node)}: {kind} convolution whose input channels cannot be removed")
    _bias(an, node, b, out)
    return Chan((cdim,), out)


# ---------------------------------------------------------------------- norms
@register_rule("batch_norm", "instance_norm", *BATCH_NORM_TUPLE_OPS)
def _batch_norm(an, node):
    xv = an.value(node.args[0])
    tuple_out = op_name(node) in BATCH_NORM_TUPLE_OPS
    if not isinstance(xv, Chan):
        out = None
    elif xv.dims != (1,):
        out = unknown_op(an, node, "normalizes along a dim that is not the channel dim")
    else:
        params = [an.value(named_arg(node, BATCH_NORM_ARGS, k))
                  for k in ("weight", "bias", "running_mean", "running_var")]
        for p, role in zip(params, ("zero", "zero", "zero", "slice")):
            if isinstance(p, ParamRef):
                an.bind(p, 0, xv.atoms, role)
            elif p is not None:
                return unknown_op(an, node, "its statistics or affine are not parameters")
        affine = isinstance(params[0], ParamRef)
        out = keep(xv, True) if affine else keep(xv)
    return [out, None, None] if tuple_out else out


@register_rule("group_norm")
def _group_norm(an, node):
    xv = an.value(node.args[0])
    if not isinstance(xv, Chan):
        return None
    if xv.dims != (1,):
        return unknown_op(an, node, "normalizes along a dim that is not the channel dim")
    groups = int(node.args[1])
    w, b = an.value(arg(node, 2, "weight")), an.value(arg(node, 3, "bias"))
    per = xv.atoms.reshape(groups, -1)
    an.atoms.union_rows(per)  # exact only when whole norm groups go: their statistics are their own
    for p in (w, b):
        if isinstance(p, ParamRef):
            an.bind(p, 0, xv.atoms, "zero")
        elif p is not None:
            return unknown_op(an, node, "its affine is not a parameter")
    module = w.fqn.rpartition(".")[0] if isinstance(w, ParamRef) else ""
    an.norm_groups.append(NormGroups(module, groups, per))
    return keep(xv, True) if isinstance(w, ParamRef) else keep(xv)


@register_rule("layer_norm", "native_layer_norm")
def _layer_norm(an, node):
    xv = an.value(node.args[0])
    tuple_out = op_name(node) == "native_layer_norm"
    if not isinstance(xv, Chan):
        out = None
    else:
        n = len(shape_of(node.args[0]))
        normalized = range(n - len(node.args[1]), n)
        if any(d in normalized for d in xv.dims):
            out = unknown_op(an, node, "normalizes over the channel dim; removing channels would "
                                       "change its mean and variance")
        else:
            bias = arg(node, 3, "bias")
            out = keep(xv) if bias is None else keep(xv, False, where(node))
    return [out, None, None] if tuple_out else out


@register_rule("softmax", "_softmax", "log_softmax", "_log_softmax")
def _softmax(an, node):
    xv = an.value(node.args[0])
    if not isinstance(xv, Chan):
        return None
    dim = node.args[1] % len(shape_of(node))
    if dim in xv.dims:
        return unknown_op(an, node, "normalizes over the channel dim")
    return keep(xv, False, where(node))



# ---------------------------------------------------------------------- embeddings
@register_rule("embedding")
def _embedding(an, node):
    """A lookup table's columns are its output channels (the model's hidden size). They are not
    a pruned layer's rows, so they go with the classes of the layers they are coupled with (the
    residual stream's writers): zeroed in the masked model, removed by compaction."""
    w, idx = an.value(node.args[0]), an.value(node.args[1])
    if isinstance(idx, (Chan, ParamRef)):
        return unknown_op(an, node, "looks up indices computed from the channels")
    if not isinstance(w, ParamRef) or len(w.shape) != 2 or min(w.perm) < 0:
        return unknown_op(an, node, "its table is not a parameter")
    atoms = an.axis(w.fqn, w.perm[1], w.shape[1], "zero")
    return Chan((len(shape_of(node)) - 1,), atoms)


@register_rule("addcmul")
def _addcmul(an, node):
    """``input + value * t1 * t2`` (timm's GRN adds its affine this way): the product as a
    ``mul``, then the sum as an ``add``, on one channel dim."""
    n = len(shape_of(node))
    operands = list(zip(node.args[:3], ("add", "mul", "mul")))
    chans = [(a, c) for a, c in ((a, an.value(a)) for a, _ in operands) if isinstance(c, Chan)]
    if not chans:
        return unknown_op(an, node, "computes a new weight")
    dims = {tuple(d + n - len(shape_of(a)) for d in c.dims) for a, c in chans}
    first = chans[0][1]
    if len(dims) != 1 or len(first.dims) != 1 or any(c.atoms.shape != first.atoms.shape for _, c in chans):
        return unknown_op(an, node, "combines tensors whose channels do not line up")
    (d,) = dims.pop()
    if shape_of(node)[d] != first.atoms.size:
        return unknown_op(an, node, "broadcasts a channel dim")
    for _, c in chans[1:]:
        an.atoms.union_arrays(first.atoms, c.atoms)
    zero = {"add": True, "mul": False}   # the input adds; the product is zero if a factor is
    for a, kind in operands:
        v = an.value(a) if isinstance(a, fx.Node) else a
        if isinstance(v, Chan):
            zero[kind] = (zero[kind] and v.zero) if kind == "add" else (zero[kind] or v.zero)
        elif isinstance(v, ParamRef):
            od = d - (n - len(v.shape))
            if od < 0 or v.shape[od] != first.atoms.size or v.perm[od] < 0:
                return unknown_op(an, node, "its parameter does not line up with the channels")
            an.bind(v, od, first.atoms, "zero" if kind == "add" else "slice")
        elif isinstance(a, fx.Node):
            osh = shape_of(a)
            od = d - (n - len(osh))
            if od >= 0 and osh[od] != 1:
                an.block(first, f"{where(node)}: combines the channels with {_origin(an, a)}")
                return None
            zero[kind] = False if kind == "add" else zero[kind]   # a constant per channel position
        elif kind == "add" and a != 0:
            zero["add"] = False
    out = zero["add"] and zero["mul"]
    return Chan((d,), first.atoms, out, "" if out else where(node))
