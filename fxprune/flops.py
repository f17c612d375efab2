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
