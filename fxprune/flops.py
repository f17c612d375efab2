"""FLOPs per forward, counted with ``torch.utils.flop_counter`` plus formulas for the ops it has
none for, so the count is what the model runs: ``nn.MultiheadAttention``'s and
``nn.TransformerEncoderLayer``'s inference fast paths (one fused kernel each), scaled-dot-product
attention's CPU kernel, matrix-vector and vector products (``mv``, ``addmv``, ``dot``, ``vdot``,
``addr``: ``nn.Linear`` on a 1-D input, ``torch.outer``), ``nn.Bilinear`` (``_trilinear``) and the
CPU kernel of ``nn.LSTM`` / ``nn.GRU`` layers (``mkldnn_rnn_layer``). Conventions are the
counter's: 2 FLOPs per multiply-accumulate, products only (bias adds, norms, softmax and the
recurrent gates' elementwise math are not counted).
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _lengths(t: torch.Tensor) -> list[int]:
    """The sequence length of each batch item of ``t`` [B, L, E] (a nested tensor: per item)."""
    if t.is_nested:
        return [int(n) for n in t._nested_tensor_size()[:, 0].tolist()]
    return [t.shape[-2]] * (t.shape[0] if t.dim() == 3 else 1)


def _attention_flops(query: torch.Tensor, key: torch.Tensor, embed_dim: int, num_heads: int) -> int:
    """Packed in-projection, attention (q @ k^T, probs @ v) and out-projection of multi-head
    attention, per batch item (``query`` [B, Lq, E], ``key`` and ``value`` [B, Lk, E])."""
    d = embed_dim // num_heads
    total = 0
    for lq, lk in zip(_lengths(query), _lengths(key)):
        in_proj = 2 * lq * embed_dim * embed_dim + 2 * 2 * lk * embed_dim * embed_dim
        attention = sdpa_flop_count((1, num_heads, lq, d), (1, num_heads, lk, d), (1, num_heads, lk, d))
        total += in_proj + attention + 2 * lq * embed_dim * embed_dim
    return total


def _raw(formula):
    formula._get_raw = True  # the counter passes the tensors themselves (nested ones have no shape)
    return formula


@_raw
def native_multi_head_attention_flop(query, key, value, embed_dim, num_head, *args, out_val=None,
                                     **kwargs) -> int:
    """``aten._native_multi_head_attention``: ``nn.MultiheadAttention`` in eval without grad."""
    return _attention_flops(query, key, int(embed_dim), int(num_head))


@_raw
def transformer_encoder_layer_flop(src, embed_dim, num_heads, *args, out_val=None, **kwargs) -> int:
    """``aten._transformer_encoder_layer_fwd``: self-attention and the two feed-forward linears
    of ``nn.TransformerEncoderLayer`` (args after ``num_heads``: qkv weight and bias, proj weight
    and bias, use_gelu, norm_first, eps, the two norms' weight and bias, ffn weight 1 ...)."""
    hidden = args[11].shape[0]
    ffn = sum(2 * 2 * n * int(embed_dim) * hidden for n in _lengths(src))
    return _attention_flops(src, src, int(embed_dim), int(num_heads)) + ffn


def sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """``aten._scaled_dot_product_flash_attention_for_cpu``: ``F.scaled_dot_product_attention`` on CPU."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def mv_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``aten.mv`` ([n, m] @ [m])."""
    return 2 * a_shape[0] * a_shape[1]


def addmv_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``aten.addmv``: ``self + mat @ vec``."""
    return 2 * a_shape[0] * a_shape[1]


def dot_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``aten.dot`` / ``aten.vdot``."""
    return 2 * a_shape[0]


def addr_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``aten.addr``: ``self + outer(vec1, vec2)``."""
    return 2 * a_shape[0] * b_shape[0]


def trilinear_flop(i1, i2, i3, expand1, expand2, expand3, sumdim, *args, out_shape=None, **kwargs) -> int:
    """``aten._trilinear`` (``nn.Bilinear``): the three inputs, unsqueezed at their ``expand``
    dims, are multiplied over their broadcast shape and summed over ``sumdim``: one
    multiply-accumulate per element of that shape."""
    shapes = []
    for shape, expand in ((i1, expand1), (i2, expand2), (i3, expand3)):
        shape = list(shape)
        for d in sorted(expand):
            shape.insert(d, 1)
        shapes.append(shape)
    full = torch.broadcast_shapes(*shapes)
    return 2 * int(torch.Size(full).numel())


@_raw
def rnn_layer_flop(input, w_ih, w_hh, *args, out_val=None, **kwargs) -> int:
    """``aten.mkldnn_rnn_layer``: one direction of one ``nn.LSTM`` / ``nn.GRU`` layer on CPU; every
    step multiplies the input by ``w_ih`` [gates * hidden, in] and the state by ``w_hh``."""
    steps = input.numel() // input.shape[-1]  # time steps x batch
    return 2 * steps * (w_ih.numel() + w_hh.numel())


FUSED_FLOPS = {
    aten._native_multi_head_attention: native_multi_head_attention_flop,
    aten._transformer_encoder_layer_fwd: transformer_encoder_layer_flop,
    aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flop,
    aten.mv: mv_flop,
    aten.addmv: addmv_flop,
    aten.dot: dot_flop,
    aten.vdot: dot_flop,
    aten.addr: addr_flop,
    aten._trilinear: trilinear_flop,
    aten.mkldnn_rnn_layer: rnn_layer_flop,
}


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no display) that also counts the ops of :data:`FUSED_FLOPS`."""
    return FlopCounterMode(display=False, custom_mapping=FUSED_FLOPS)


# ---------------------------------------------------------------------- FLOPs of a captured graph
# ATen ops (pre-dispatch names, as captured) that dispatch to no op the counter counts: layout,
# elementwise, norms, reductions, pooling, creation, comparisons. Ops neither here nor in
# _FORMULAS are run once on meta tensors under the counter (cached by their shapes).
FLOP_FREE = frozenset("""
getitem clone contiguous alias detach lift_fresh_copy _to_copy to type_as dropout feature_dropout
native_dropout relu relu6 gelu silu tanh hardtanh leaky_relu elu selu celu hardswish mish neg abs
sin cos erf square sign sgn hardshrink softshrink tanhshrink atan asinh sinh tan sigmoid hardsigmoid
exp softplus log_sigmoid cosh rsqrt reciprocal sqrt log log1p expm1 pow clamp clamp_min clamp_max
add sub rsub mul div true_divide floor_divide remainder fmod addcmul addcdiv lerp where masked_fill
maximum minimum eq ne lt le gt ge logical_and logical_or logical_not logical_xor bitwise_and
bitwise_or bitwise_not bitwise_xor isnan isinf isfinite batch_norm instance_norm
_native_batch_norm_legit_no_training _native_batch_norm_legit native_batch_norm
_native_batch_norm_legit_functional group_norm native_group_norm layer_norm native_layer_norm
rms_norm _fused_rms_norm softmax _softmax log_softmax _log_softmax _safe_softmax mean sum amax amin max min
prod var std var_mean std_mean argmax argmin cumsum cumprod all any linalg_vector_norm norm
max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d adaptive_max_pool1d adaptive_max_pool2d
adaptive_max_pool3d max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices
upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_bilinear2d upsample_bicubic2d
upsample_linear1d upsample_trilinear3d _upsample_nearest_exact2d reflection_pad1d reflection_pad2d
replicate_pad1d replicate_pad2d constant_pad_nd pad view reshape _unsafe_view flatten unflatten
squeeze unsqueeze view_as reshape_as transpose permute t swapaxes swapdims numpy_T movedim expand
expand_as repeat repeat_interleave select slice narrow index_select index gather scatter
index_put cat concat concatenate stack split split_with_sizes chunk unbind embedding arange full
zeros ones empty zeros_like ones_like full_like empty_like new_ones new_zeros new_empty new_full
scalar_tensor tril triu fill fill_ copy copy_ topk sort flip roll diff _assert_tensor_metadata
sym_size sym_numel sym_stride _assert_scalar sym_constrain_range_for_size
""".split())


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _dense_flops(s, node) -> int:
    """``linear(x, W)``: x [..., in] times W [out, in]."""
    x, w = s(node.args[0]), s(node.args[1])
    return 2 * _numel(x[:-1]) * _numel(w)


def _counter_formula(name: str, arity: int):
    """``torch.utils.flop_counter``'s formula ``name`` on the shapes of the node's first ``arity``
    arguments (the counter's own arithmetic, not restated)."""
    def flops(s, node) -> int:
        from torch.utils import flop_counter as counter
        return getattr(counter, name)(*(tuple(s(a)) for a in node.args[:arity]))
    return flops


def _matmul_flops(s, node) -> int:
    """``matmul`` folds into ``dot`` / ``mv`` / ``mm`` / ``bmm``: one multiply-add per output entry
    and entry of the contracted dim, whatever the ranks."""
    return 2 * _numel(s(node)) * s(node.args[0])[-1]


def _conv_flops(s, node) -> int:
    from torch.utils.flop_counter import conv_flop_count
    name = node.target.__name__.split(".")[0]
    x, w, out = s(node.args[0]), s(node.args[1]), s(node)
    if name in ("convolution", "_convolution"):
        transposed = bool(node.args[6] if len(node.args) > 6 else node.kwargs.get("transposed", False))
    else:
        transposed = name.startswith("conv_transpose")
    if len(x) == len(w) - 1:  # an unbatched input: run as a batch of one
        x, out = (1, *x), (1, *out)
    return conv_flop_count(list(x), list(w), list(out), transposed)


def _sdpa_flops(s, node) -> int:
    """q @ k^T and probs @ v per batch and head (key/value heads broadcast to the query's)."""
    q, k, v = s(node.args[0]), s(node.args[1]), s(node.args[2])
    batch, length, source = _numel(q[:-2]), q[-2], k[-2]
    return 2 * batch * length * source * q[-1] + 2 * batch * length * source * v[-1]


_FORMULAS = {"linear": _dense_flops, "addmm": _counter_formula("addmm_flop", 3),
             "mm": _counter_formula("mm_flop", 2), "bmm": _counter_formula("bmm_flop", 2),
             "baddbmm": _counter_formula("baddbmm_flop", 3), "matmul": _matmul_flops, "scaled_dot_product_attention": _sdpa_flops,
             **{name: _conv_flops for name in ("conv1d", "conv2d", "conv3d", "convolution", "_convolution",
                                               "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")}}


class GraphFlops:
    """FLOPs of one run of a captured ATen graph (``torch.export`` or fxprune's trace), read from
    the shapes it records (``node.meta["val"]``), as :func:`flop_counter` counts them on a forward
    that takes the captured path, without running one. The dense ops have formulas
    (:data:`_FORMULAS`: the counter's, for what they dispatch to); ops of :data:`FLOP_FREE`
    count nothing; any other op is run once on ``meta`` tensors under :func:`flop_counter`
    (cached by op and shapes). ``count(shape)`` takes ``shape(node) -> tuple``, the shapes of
    another run (a compacted model's), or None for the recorded ones; it returns None when a node
    cannot be counted from shapes (then count on a forward)."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        self.other = any(n.op in ("call_module", "call_method", "get_attr") for n in gm.graph.nodes)
        self._meta: dict = {}

    def count(self, shape=None) -> int | None:
        from .aten import op_name, shape_of
        if self.other:
            return None
        s = shape or shape_of
        total = 0
        try:
            for node in self.nodes:
                name = op_name(node)
                # an in-place variant (relu_, add_) computes what its op does
                free = name in FLOP_FREE or (name.endswith("_") and name[:-1] in FLOP_FREE)
                if free and (_is_aten(node) or name == "getitem") or _is_python_operator(node):
                    continue
                formula = _FORMULAS.get(name) if _is_aten(node) else None
                flops = formula(s, node) if formula is not None else self._on_meta(node, s)
                if flops is None:
                    return None
                total += flops
        except Exception:  # a shape the formulas do not expect: count on a forward instead
            return None
        return int(total)

    def _on_meta(self, node, s) -> int | None:
        """The counter's FLOPs of ``node`` run once on meta tensors of its input shapes."""
        if not isinstance(node.target, torch._ops.OpOverload):
            return None
        key_parts = []

        def meta(a):
            if isinstance(a, torch.fx.Node):
                val = a.meta.get("val")
                if isinstance(val, torch.Tensor):
                    shape = s(a)
                    key_parts.append((tuple(shape), val.dtype))
                    return torch.empty(shape, dtype=val.dtype, device="meta")
                if isinstance(val, (int, float, bool)):
                    key_parts.append(val)
                    return val
                raise _NotCountable
            if isinstance(a, (list, tuple)):
                return type(a)(meta(x) for x in a)
            key_parts.append(repr(a))
            return a

        try:
            args = [meta(a) for a in node.args]
            kwargs = {k: meta(v) for k, v in node.kwargs.items()}
        except _NotCountable:
            return None
        key = (node.target, tuple(key_parts), tuple(kwargs))
        if key not in self._meta:
            try:
                with flop_counter() as counter:
                    node.target(*args, **kwargs)
                self._meta[key] = int(counter.get_total_flops())
            except Exception:
                self._meta[key] = None
        return self._meta[key]


class _NotCountable(Exception):
    pass


def _is_python_operator(node) -> bool:
    """``operator.mul`` on sizes and the like: Python arithmetic, no tensor op."""
    return getattr(node.target, "__module__", None) == "_operator"


def _is_aten(node) -> bool:
    return getattr(node.target, "namespace", None) == "aten"
