"""Channel-analysis rules for layout ops: pooling, padding, reductions, reshape, transpose,
expand, indexing, cat/stack/split (see :mod:`.rules` for the rule interface)."""
from __future__ import annotations

import numpy as np
from torch import fx

from ..aten import arg, module_of, op_name, shape_of
from .folds import match_channel_mean
from .rules import keep, nonzero_reason, register_rule, unknown_op, where, whole_along
from .values import Chan, HeadSplit, ParamRef


_POOLS = ("max_pool", "avg_pool", "adaptive_avg_pool", "_adaptive_avg_pool", "adaptive_max_pool",
          "upsample_nearest", "_upsample_nearest_exact", "reflection_pad", "replicate_pad")
SPATIAL = {f"{p}{k}d": k for k in (1, 2, 3) for p in _POOLS}
SPATIAL.update({f"max_pool{k}d_with_indices": k for k in (1, 2, 3)})
SPATIAL.update({"upsample_bilinear2d": 2, "upsample_bicubic2d": 2, "upsample_linear1d": 1,
                "upsample_trilinear3d": 3, "_upsample_bilinear2d_aa": 2})
_TWO_OUTPUTS = tuple(n for n in SPATIAL if n.endswith("_with_indices") or n.startswith("adaptive_max"))


@register_rule(*SPATIAL)
def _spatial(an, node):
    xv = an.value(node.args[0])
    name = op_name(node)
    if not isinstance(xv, Chan):
        return None
    n = len(shape_of(node.args[0]))
    if any(d >= n - SPATIAL[name] for d in xv.dims):
        return unknown_op(an, node, "acts on the channel dim")
    out = keep(xv)
    return [out, None] if name in _TWO_OUTPUTS else out


@register_rule("constant_pad_nd", "pad")
def _pad(an, node):
    xv = an.value(node.args[0])
    if not isinstance(xv, Chan):
        return None
    n = len(shape_of(node.args[0]))
    padded = len(node.args[1]) // 2
    if any(d >= n - padded for d in xv.dims):
        return unknown_op(an, node, "pads the channel dim")
    value = arg(node, 2, "value", 0) if op_name(node) == "constant_pad_nd" else arg(node, 3, "value", 0)
    return keep(xv) if not value else keep(xv, False, where(node))


@register_rule("mean", "sum", "amax", "amin", "max", "min")
def _reduce(an, node):
    xv = an.value(node.args[0])
    name, overload = op_name(node), getattr(node.target, "_overloadname", "")
    if not isinstance(xv, Chan) or overload == "other":
        return unknown_op(an, node)
    n = len(shape_of(node.args[0]))
    dims = arg(node, 1, "dim", None)
    if dims is None or overload == "default":
        dims = list(range(n))
    dims = {int(d) % n for d in (dims if isinstance(dims, (list, tuple)) else [dims])} or set(range(n))
    keepdim = bool(arg(node, 2, "keepdim", False))
    tuple_out = name in ("max", "min") and overload == "dim"
    if not dims & set(xv.dims):
        new = [d if keepdim else d - sum(r < d for r in dims) for d in xv.dims]
        out = keep(xv, dims=new)
    elif set(xv.dims) <= dims and name == "sum":
        if not xv.zero:
            an.block(xv, nonzero_reason(xv, node))
        out = None  # pruned channels add nothing to the sum
    elif name == "mean" and set(xv.dims) <= dims and xv.zero:  # RMSNorm, GRN: fold the divisor
        fold = match_channel_mean(an, node, xv)
        if isinstance(fold, str):
            return unknown_op(an, node, f"reduces over the channel dim (a mean: removing channels "
                                        f"changes its divisor, and {fold})")
        an.scale_folds.append(fold)
        out = None  # a statistic over the channels: it carries none
    elif not set(xv.dims) <= dims and name in ("mean", "sum", "amax", "amin"):
        # over some channel dims only (a norm over the head dim, Qwen3's q_norm): exact when those
        # dims never lose entries, whole units of the others go; a removed unit reduces to zero
        for d in dims & set(xv.dims):
            whole_along(an, xv, d)
        axes = tuple(k for k, d in enumerate(xv.dims) if d in dims)
        rest = [d for d in xv.dims if d not in dims]
        new = [d if keepdim else d - sum(r < d for r in dims) for d in rest]
        out = keep(xv, dims=new, atoms=xv.atoms[tuple(0 if k in axes else slice(None) for k in range(xv.atoms.ndim))])
    elif name == "mean":
        return unknown_op(an, node, "reduces over the channel dim (a mean: removing channels "
                                    "changes its divisor)")
    else:
        return unknown_op(an, node, "reduces over the channel dim")
    return [out, None] if tuple_out else out


# Norms over dims: (input, ord, dim, keepdim) in every overload; the default order by op.
NORM_DEFAULT_ORD = {"linalg_vector_norm": 2, "norm": 2, "linalg_norm": None, "linalg_matrix_norm": "fro"}
# Orders whose norm is the same with zero entries left out (absent entries add nothing to a sum of
# |x|^p, p >= 0, nor to a max, nor change the nonzero singular values of a matrix): removing
# pruned channels, which are zero, leaves these norms exact.
ZERO_BLIND_MATRIX_ORD = ("fro", "nuc", 1, 2, float("inf"), None)


def _zero_blind_vector(order) -> bool:
    return order is None or (isinstance(order, (int, float)) and not isinstance(order, bool) and order >= 0)


@register_rule(*NORM_DEFAULT_ORD)
def _norm(an, node):
    xv = an.value(node.args[0])
    name = op_name(node)
    if not isinstance(xv, Chan):
        return unknown_op(an, node)
    n = len(shape_of(node.args[0]))
    order = arg(node, 1, "ord" if name != "norm" else "p", NORM_DEFAULT_ORD[name])
    dims = arg(node, 2, "dim", [-2, -1] if name == "linalg_matrix_norm" else None)
    dims = set(range(n)) if dims is None or dims == [] else {
        int(d) % n for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    keepdim = bool(arg(node, 3, "keepdim", False))
    matrix = name == "linalg_matrix_norm" or (name == "linalg_norm" and (isinstance(order, str) or len(dims) == 2))
    exact = order in ZERO_BLIND_MATRIX_ORD if matrix else _zero_blind_vector(order)
    if not dims & set(xv.dims):  # a norm per channel: zero channels have norm zero
        new = [d if keepdim else d - sum(r < d for r in dims) for d in xv.dims]
        return keep(xv, None if exact else False, "" if exact else where(node), dims=new)
    if not exact:
        return unknown_op(an, node, f"a norm of order {order!r} over the channel dim changes "
                                    f"when zero channels are removed")
    if not set(xv.dims) <= dims:
        return unknown_op(an, node, "reduces over part of the channel dims")
    if not xv.zero:
        an.block(xv, nonzero_reason(xv, node))
    return None  # pruned channels, zero, add nothing to the norm


# ---------------------------------------------------------------------- shape ops
def _chunks(src, dst):
    """Group the non-unit dims of a reshape into minimal chunks of equal size:
    [(src dims, dst dims), ...]."""
    a = [i for i, s in enumerate(src) if s != 1]
    b = [j for j, s in enumerate(dst) if s != 1]
    out, x, y = [], 0, 0
    while x < len(a) and y < len(b):
        ins, outs = [a[x]], [b[y]]
        pa, pb = src[a[x]], dst[b[y]]
        while pa != pb:
            if pa < pb:
                x += 1
                ins.append(a[x])
                pa *= src[a[x]]
            else:
                y += 1
                outs.append(b[y])
                pb *= dst[b[y]]
        out.append((ins, outs))
        x, y = x + 1, y + 1
    return out


@register_rule("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze",
      "view_as", "reshape_as")
def _reshape(an, node):
    xv = an.value(node.args[0])
    src, dst = shape_of(node.args[0]), shape_of(node)
    if isinstance(xv, ParamRef):
        return _reshape_param(an, node, xv, src, dst)
    if not isinstance(xv, Chan):
        return None
    if any(src[d] == 1 for d in xv.dims):
        return unknown_op(an, node, "reshapes a single channel")
    hit = [(i, o) for i, o in _chunks(src, dst) if set(i) & set(xv.dims)]
    if all(len(i) == 1 and len(o) == 1 for i, o in hit):  # the channel dims only move
        move = {i[0]: o[0] for i, o in hit}
        return keep(xv, dims=[move[d] for d in xv.dims])
    # The chunks that hold channels, each reshaped on its own (the others are left as unit dims:
    # a reshape keeps chunk boundaries, so this is the reshape restricted to them); the atoms
    # are broadcast over the non-channel dims they merge with (``repeat_kv``'s expanded dim).
    ins = sorted(d for i, _ in hit for d in i)
    outs = sorted(d for _, o in hit for d in o)
    ordered = sorted(xv.dims)
    arr = np.transpose(xv.atoms, [xv.dims.index(d) for d in ordered])
    arr = arr.reshape([src[d] if d in xv.dims else 1 for d in ins])
    arr = np.broadcast_to(arr, [src[d] for d in ins]).reshape([dst[o] for o in outs])
    carrying = [j for j in range(arr.ndim) if (arr != np.take(arr, [0], axis=j)).any()]
    sub = arr[tuple(slice(None) if j in carrying else 0 for j in range(arr.ndim))].copy()
    new_dims = [outs[j] for j in carrying]
    if len(carrying) > len(xv.dims):  # channels split into (heads, head_dim), (3, heads, head_dim)...
        shrink = _heads_axis(an, node, sub, new_dims)
        if shrink is None:  # a packing (nn.MultiheadAttention's (3, embed_dim)): later ops decide
            return Chan(tuple(new_dims), sub, xv.zero, xv.why)
        units = np.moveaxis(sub, shrink, 0).reshape(sub.shape[shrink], -1)
        for row in units:  # only whole units along the other axes can go
            an.atoms.union_all(row)
        an.head_splits.append(HeadSplit(module_of(node), _distinct_rows(units)))
    return Chan(tuple(new_dims), sub, xv.zero, xv.why)


def _heads_axis(an, node, sub: np.ndarray, dims) -> int | None:
    """The axis of a split channel that loses whole units (the heads): the one the view leaves
    to ``-1``; else the one with as many distinct slices as a head count the module records
    (``num_heads``..., so that timm's packed ``reshape(B, N, 3, num_heads, head_dim)`` shrinks on
    its heads, and ``nn.MultiheadAttention``'s ``view(L, B * num_heads, head_dim)`` on the heads
    merged with the batch); None when an axis is a width the module records and none is a head
    count (``unflatten(-1, (3, embed_dim))``: not a head split); else the first."""
    spec = node.args[1] if op_name(node) in ("view", "reshape", "_unsafe_view") else None
    free = [k for k, d in enumerate(dims) if spec is not None and spec[d] == -1]
    if len(free) == 1:
        return free[0]
    module = module_of(node)
    counts = an.head_counts(module)
    distinct = [len(_distinct_rows(np.moveaxis(sub, k, 0).reshape(sub.shape[k], -1))) for k in range(sub.ndim)]
    named = [k for k, n in enumerate(distinct) if n in counts]
    if named:
        return named[0]
    if set(sub.shape) & an.head_widths(module):
        return None
    return 0


def _distinct_rows(units: np.ndarray) -> np.ndarray:
    """``units`` without repeated rows (a batch merged with the heads, as
    ``nn.MultiheadAttention`` does, repeats each head once per sample), in first-seen order."""
    _, first = np.unique(units, axis=0, return_index=True)
    return units[np.sort(first)]


def _reshape_param(an, node, ref: ParamRef, src, dst):
    """A parameter reshaped only by adding or removing unit dims (``b.view(1, -1, 1, 1)``)."""
    if [s for s in src if s != 1] != [s for s in dst if s != 1]:
        return unknown_op(an, node, "reshapes a parameter")
    real = iter([p for p, s in zip(ref.perm, src) if s != 1])
    perm = tuple(next(real) if s != 1 else -1 for s in dst)
    return ParamRef(ref.fqn, perm, tuple(dst))


@register_rule("transpose", "permute", "t", "swapaxes", "swapdims", "numpy_T", "movedim")
def _permute(an, node):
    xv = an.value(node.args[0])
    n = len(shape_of(node.args[0]))
    name = op_name(node)
    if name == "permute":
        perm = [int(d) % n for d in node.args[1]]
    elif name == "movedim":
        return unknown_op(an, node)
    elif name in ("t", "numpy_T"):
        perm = list(range(n))[::-1]
    else:
        d0, d1 = int(node.args[1]) % n, int(node.args[2]) % n
        perm = list(range(n))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    if isinstance(xv, ParamRef):
        return ParamRef(xv.fqn, tuple(xv.perm[p] for p in perm), tuple(xv.shape[p] for p in perm))
    if not isinstance(xv, Chan):
        return None
    return keep(xv, dims=[perm.index(d) for d in xv.dims])


@register_rule("expand", "expand_as", "repeat")
def _expand(an, node):
    xv = an.value(node.args[0])
    if not isinstance(xv, Chan):
        return unknown_op(an, node) if isinstance(xv, ParamRef) else None
    shift = len(shape_of(node)) - len(shape_of(node.args[0]))
    dims = [d + shift for d in xv.dims]
    if tuple(shape_of(node)[d] for d in dims) != xv.atoms.shape:
        return unknown_op(an, node, "repeats the channels")
    return keep(xv, dims=dims)


@register_rule("repeat_interleave")
def _repeat_interleave(an, node):
    """``x.repeat_interleave(n, dim)`` with a constant n: each entry n times in a row (the
    reference Llama / Mistral code's key/value heads for grouped-query attention)."""
    xv = an.value(node.args[0])
    repeats, dim = arg(node, 1, "repeats", None), arg(node, 2, "dim", None)
    if not isinstance(xv, Chan) or not isinstance(repeats, int) or dim is None:
        return unknown_op(an, node)
    dim = int(dim) % len(shape_of(node.args[0]))
    if dim not in xv.dims:
        return keep(xv)
    return keep(xv, atoms=np.repeat(xv.atoms, repeats, axis=xv.dims.index(dim)))


@register_rule("select", "slice", "narrow", "index_select")
def _index(an, node):
    xv = an.value(node.args[0])
    if not isinstance(xv, Chan):
        return unknown_op(an, node) if isinstance(xv, ParamRef) else None
    src = shape_of(node.args[0])
    dim = int(arg(node, 1, "dim", 0)) % len(src)
    name = op_name(node)
    if dim in xv.dims:
        if name == "slice" and shape_of(node)[dim] == src[dim] and arg(node, 4, "step", 1) == 1:
            return keep(xv)  # x[:, :] -- the whole dim
        index = _positions(node, src[dim])
        if index is not None and xv.dims == (dim,) and _packed_piece(an, node, dim, len(src)):
            return keep(xv, atoms=xv.atoms[index])
        if index is None or not whole_along(an, xv, dim):
            return unknown_op(an, node, "indexes the channel dim")
        # a dim of whole units (the head dim of whole heads, the q/k/v dim of a packed
        # projection) never loses entries, so the same positions stay right after compaction
        atoms = np.take(xv.atoms, index, axis=xv.dims.index(dim))
        if name == "select":
            return keep(xv, dims=[d - (d > dim) for d in xv.dims if d != dim], atoms=atoms)
        return keep(xv, atoms=atoms)
    if name == "select":
        return keep(xv, dims=[d - (d > dim) for d in xv.dims])
    return keep(xv)


def _packed_piece(an, node, dim: int, ndim: int) -> bool:
    """Whether ``node`` is one of the slices that cut a packed projection's channels into
    consecutive pieces of different sizes at offsets its attention module computes from its head
    counts (Phi-3's ``qkv_proj``: ``qkv[..., :heads * head_dim]``, then the key and value heads):
    every use of the tensor is such a slice, together they cover it, and the module records head
    counts. Each piece then keeps its own channels, and the offsets follow the head counts
    compaction rewrites (the verification checks that the forward computes them so)."""
    source, size = node.args[0], shape_of(node.args[0])[dim]
    ranges = []
    for u in source.users:
        if u not in an.live:
            continue
        if (op_name(u) != "slice" or u.args[0] is not source or int(arg(u, 1, "dim", 0)) % ndim != dim
                or arg(u, 4, "step", 1) != 1):
            return False
        index = _positions(u, size)
        if index is None or index.size == 0:
            return False
        ranges.append((int(index[0]), int(index[-1]) + 1))
    ranges.sort()
    if (len(ranges) < 2 or ranges[0][0] != 0 or ranges[-1][1] != size
            or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:]))):
        return False
    module = module_of(node)
    if not (an.head_counts(module) or an.config_head_counts(module)):
        return False
    an.packed_modules.add(module)
    return True


def _positions(node, size: int):
    """The constant positions an indexing op takes along its dim (None when computed)."""
    name = op_name(node)
    if name == "select":
        return int(node.args[2]) % size
    if name == "slice":
        start, end, step = (arg(node, k, key, dflt) for k, key, dflt in
                            ((2, "start", None), (3, "end", None), (4, "step", 1)))
        if any(isinstance(v, fx.Node) for v in (start, end, step)):
            return None
        return np.arange(size)[slice(start, end, step)]
    if name == "narrow":
        start, length = node.args[2], node.args[3]
        if isinstance(start, fx.Node) or isinstance(length, fx.Node):
            return None
        return np.arange(size)[int(start):int(start) + int(length)]
    return None  # index_select: a tensor of positions


def _is_empty(node) -> bool:
    """The empty 1-D tensor ``torch.cat`` skips (an empty key/value cache)."""
    return isinstance(node, fx.Node) and tuple(shape_of(node) or (1,)) == (0,)


@register_rule("cat", "concat", "concatenate")
def _cat(an, node):
    tensors = [t for t in node.args[0] if not _is_empty(t)]
    vals = [an.value(t) for t in tensors]
    n = len(shape_of(node))
    dim = int(arg(node, 1, "dim", 0)) % n
    chans = [v for v in vals if isinstance(v, Chan)]
    if not chans:
        return unknown_op(an, node) if any(isinstance(v, ParamRef) for v in vals) else None
    if all(c.dims == (dim,) for c in chans):  # along the channels: offsets
        parts, zero = [], all(c.zero for c in chans)
        for t, v in zip(tensors, vals):
            if isinstance(v, Chan):
                parts.append(v.atoms)
            else:
                fresh = an.atoms.new(shape_of(t)[dim])
                an.block(fresh, f"{where(node)}: concatenated with {t.name}, which no prunable layer produces")
                parts.append(fresh)
        why = next((c.why for c in chans if not c.zero), "")
        return Chan((dim,), np.concatenate(parts), zero, why)
    first = chans[0]
    same = len(chans) == len(vals) and all(c.dims == first.dims for c in chans)
    if same and dim not in first.dims and all(c.atoms.shape == first.atoms.shape for c in chans):
        for c in chans[1:]:
            an.atoms.union_arrays(first.atoms, c.atoms)
        return keep(first, all(c.zero for c in chans), next((c.why for c in chans if c.why), ""))
    axis = first.dims.index(dim) if dim in first.dims else -1
    other = [s for k, s in enumerate(first.atoms.shape) if k != axis]
    if same and axis >= 0 and all([s for k, s in enumerate(c.atoms.shape) if k != axis] == other
                                  for c in chans):
        # along a dim of whole units (RoPE's rotate-half: cat(-x2, x1) on the head dim): the
        # pieces keep their positions as long as the dim never loses entries
        out = Chan(first.dims, np.concatenate([c.atoms for c in chans], axis=axis),
                   all(c.zero for c in chans), next((c.why for c in chans if not c.zero), ""))
        if whole_along(an, out, dim):
            return out
    return unknown_op(an, node, "concatenates tensors whose channels do not line up")


@register_rule("stack")
def _stack(an, node):
    vals = [an.value(t) for t in node.args[0]]
    n = len(shape_of(node))
    dim = int(arg(node, 1, "dim", 0)) % n
    first = vals[0]
    if not all(isinstance(v, Chan) and v.dims == first.dims and v.atoms.shape == first.atoms.shape
               for v in vals):
        return unknown_op(an, node, "stacks tensors whose channels do not line up")
    for v in vals[1:]:
        an.atoms.union_arrays(first.atoms, v.atoms)
    return keep(first, all(v.zero for v in vals), dims=[d + (d >= dim) for d in first.dims])


@register_rule("split", "split_with_sizes", "chunk", "unbind")
def _split(an, node):
    xv = an.value(node.args[0])
    pieces = [shape_of(v) for v in node.meta.get("val", [])]
    if not isinstance(xv, Chan):
        return unknown_op(an, node) if isinstance(xv, ParamRef) else [None] * len(pieces)
    src = shape_of(node.args[0])
    name = op_name(node)
    dim = int(arg(node, 1 if name == "unbind" else 2, "dim", 0)) % len(src)
    if dim not in xv.dims:
        if name == "unbind":
            return [keep(xv, dims=[d - (d > dim) for d in xv.dims]) for _ in pieces]
        return [keep(xv) for _ in pieces]
    axis = xv.dims.index(dim)
    if len(xv.dims) > 1 and whole_along(an, xv, dim):
        # a dim of whole units (q/k/v of a packed projection split into heads) keeps its size
        if name == "unbind":
            dims = [d - (d > dim) for d in xv.dims if d != dim]
            return [keep(xv, dims=dims, atoms=np.take(xv.atoms, i, axis=axis)) for i in range(len(pieces))]
        bounds = np.cumsum([0] + [p[dim] for p in pieces])
        return [keep(xv, atoms=np.take(xv.atoms, np.arange(a, b), axis=axis)) for a, b in zip(bounds, bounds[1:])]
    sizes = [p[dim] for p in pieces]
    if name == "unbind" or len(xv.dims) != 1 or len(set(sizes)) != 1:
        return unknown_op(an, node, "splits the channels unevenly")
    parts = np.split(xv.atoms, len(sizes))
    for p in parts[1:]:  # equal pieces stay equal: channel j goes from every piece or none
        an.atoms.union_arrays(parts[0], p)
    return [keep(xv, atoms=p) for p in parts]


@register_rule("where")
def _where(an, node):
    """``where(cond, a, b)``: a channel tensor masked by a condition that does not depend on the
    channel (T5's position bias under the attention mask)."""
    if len(node.args) < 3:
        return unknown_op(an, node)
    out_shape = shape_of(node)
    n = len(out_shape)
    vals = [an.value(a) for a in node.args[:3]]
    chans = [(k, v) for k, v in enumerate(vals) if isinstance(v, Chan)]
    if not chans or any(isinstance(v, ParamRef) for v in vals) or chans[0][0] == 0:
        return unknown_op(an, node)
    shifted = []
    for k, v in chans:
        shift = n - len(shape_of(node.args[k]))
        shifted.append((k, Chan(tuple(d + shift for d in v.dims), v.atoms, v.zero, v.why)))
    k, c = shifted[0]
    if tuple(out_shape[d] for d in c.dims) != c.atoms.shape:
        return unknown_op(an, node, "broadcasts a channel dim")
    for j, a in enumerate(node.args[:3]):
        if any(j == kk for kk, _ in shifted) or not isinstance(a, fx.Node):
            continue
        osh = shape_of(a)
        if any(d - (n - len(osh)) >= 0 and osh[d - (n - len(osh))] != 1 for d in c.dims):
            return unknown_op(an, node, "selects along the channel dim")
    if len(shifted) == 2:
        c2 = shifted[1][1]
        if c2.dims != c.dims or c2.atoms.shape != c.atoms.shape:
            return unknown_op(an, node, "selects between tensors whose channels do not line up")
        an.atoms.union_arrays(c.atoms, c2.atoms)
        return Chan(c.dims, c.atoms, c.zero and c2.zero, c.why or c2.why)
    other = node.args[3 - k]  # the non-channel branch
    zero = c.zero and not isinstance(other, fx.Node) and other == 0
    return keep(c, zero, "" if zero else where(node))


@register_rule("getitem")
def _getitem(an, node):
    seq = an.value(node.args[0])
    if isinstance(seq, (list, tuple)) and isinstance(node.args[1], int) and node.args[1] < len(seq):
        return seq[node.args[1]]
    return None
