"""The FLOP count of the compaction report (fxprune/flops.py; docs/design.md, "Compaction"):
fused attention kernels count what they compute, the same as the unfused path and as the formula
written out here."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.flops import flop_counter

B, L, E, H, FFN = 2, 5, 32, 4, 64


def attention_flops(lengths, e=E):
    """In-projection (q, k, v), q @ k^T and probs @ v, out-projection: 2 FLOPs per multiply-add."""
    return sum(2 * n * e * 3 * e + 2 * 2 * n * n * e + 2 * n * e * e for n in lengths)


def ffn_flops(lengths, e=E, hidden=FFN):
    return sum(2 * 2 * n * e * hidden for n in lengths)


def count(fn):
    with torch.no_grad(), flop_counter() as counter:
        fn()
    return counter.get_total_flops(), {str(k) for k in counter.get_flop_counts()["Global"]}


@pytest.fixture
def fastpath():
    """Run with and without the fast path of nn.MultiheadAttention / TransformerEncoderLayer."""
    def run(enabled, fn):
        before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(enabled)
        try:
            return count(fn)
        finally:
            torch.backends.mha.set_fastpath_enabled(before)
    return run


def test_multihead_attention_fast_path_counts_what_it_computes(fastpath):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    x = torch.randn(B, L, E)
    fast, ops = fastpath(True, lambda: mha(x, x, x, need_weights=False))
    assert ops == {"aten._native_multi_head_attention"}          # the fused kernel ran
    slow, _ = fastpath(False, lambda: mha(x, x, x, need_weights=False))
    assert fast == slow == attention_flops([L] * B) == 88320


def test_encoder_layer_fast_path_and_nested_sequences(fastpath):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, FFN, batch_first=True).eval()
    x = torch.randn(B, L, E)
    fast, ops = fastpath(True, lambda: layer(x))
    assert ops == {"aten._transformer_encoder_layer_fwd"}
    slow, _ = fastpath(False, lambda: layer(x))
    assert fast == slow == attention_flops([L] * B) + ffn_flops([L] * B)
    # padded batch: the encoder runs nested tensors, each sequence at its own length (5 and 3)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    nested, ops = fastpath(True, lambda: encoder(x, src_key_padding_mask=pad))
    assert ops == {"aten._transformer_encoder_layer_fwd"}
    assert nested == 2 * (attention_flops([5, 3]) + ffn_flops([5, 3]))


def test_sdpa_on_cpu_is_counted():
    q, k, v = (torch.randn(B, H, L, E // H) for _ in range(3))
    flops, _ = count(lambda: F.scaled_dot_product_attention(q, k, v))
    assert flops == 2 * 2 * B * H * L * L * (E // H)


class ViTBlock(nn.Module):
    """A ViT encoder block as torchvision writes it: LayerNorm, nn.MultiheadAttention, MLP."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(E, FFN), nn.Linear(FFN, E)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def test_compaction_report_counts_multihead_attention():
    torch.manual_seed(0)
    x = torch.randn(B, L, E)
    pruned = fxprune.transform(ViTBlock().eval(), {"pattern": "1xchannel", "target_sparsity": 0.5,
                                                   "op_names": ["fc1"]}, (x,), compact=True)
    c = fxprune.sparsity_report(pruned).compaction
    assert pruned.fc1.out_features == FFN // 2
    assert c["flops_before"] == attention_flops([L] * B) + ffn_flops([L] * B)
    assert c["flops_after"] == attention_flops([L] * B) + ffn_flops([L] * B, hidden=FFN // 2)


class _VectorOps(nn.Module):
    """Ops torch's counter has no formula for: matrix-vector, vector products, bilinear, LSTM."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))
        self.bilinear = nn.Bilinear(4, 3, 5)
        self.lstm = nn.LSTM(4, 7, batch_first=True)

    def forward(self, x, v, u):
        y, _ = self.lstm(x)
        return (torch.mv(self.w, v).sum() + torch.addmv(u, self.w, v).sum() + torch.dot(v, v)
                + torch.addr(self.w, u, v).sum() + self.bilinear(x, x[..., :3]).sum() + y.sum())


def test_vector_products_bilinear_and_rnn_layers_are_counted():
    torch.manual_seed(0)
    model = _VectorOps().eval()
    x, v, u = torch.randn(2, 5, 4), torch.randn(4), torch.randn(6)
    total, ops = count(lambda: model(x, v, u))
    steps = 2 * 5
    expected = (2 * 6 * 4          # mv
                + 2 * 6 * 4        # addmv
                + 2 * 4            # dot
                + 2 * 6 * 4        # addr: outer(u, v) added to w
                + 2 * steps * 5 * 4 * 3          # bilinear: a multiply-add per (item, out, in1, in2)
                + 2 * steps * (4 * 7 * 4 + 4 * 7 * 7))  # LSTM: 4 gates x hidden 7 over input 4 and state 7
    assert total == expected
    assert {"aten.mv", "aten.addmv", "aten.dot", "aten.addr", "aten._trilinear", "aten.mkldnn_rnn_layer"} <= ops


# ---------------------------------------------------------------------- FLOPs from the graph
def _dispatch_flops(model, inputs):
    with torch.no_grad(), flop_counter() as counter:
        model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return counter.get_total_flops()


def _graph_models():
    """(name, model, inputs): convolutions (residual, depthwise, grouped), nn.MultiheadAttention,
    a Hugging Face Llama (RoPE, grouped-query attention) and GPT-2 (Conv1D, addmm)."""
    from test_compact import InvertedResidual, PlainCNN, ResNeXtBlock
    from tiny_llm import tiny_gpt2, tiny_llama
    torch.manual_seed(0)
    out = [("cnn", PlainCNN().eval(), (torch.randn(2, 3, 8, 8),)),
           ("mobilenet", InvertedResidual().eval(), (torch.randn(2, 3, 8, 8),)),
           ("resnext", ResNeXtBlock().eval(), (torch.randn(2, 3, 8, 8),)),
           ("vit", ViTBlock().eval(), (torch.randn(B, L, E),)),
           ("vector_ops", _VectorOps().eval(), (torch.randn(2, 5, 4), torch.randn(4), torch.randn(6)))]
    pytest.importorskip("transformers")
    for name, model in (("llama", tiny_llama()), ("gpt2", tiny_gpt2())):
        model.config.use_cache = False  # logits only (torch.export cannot return a cache)
        out.append((name, model, {"input_ids": torch.randint(0, 64, (2, 12))}))
    return out


def test_graph_flops_equal_the_dispatch_count():
    """The graph's shapes give exactly what the counter counts on a forward (dense ops by formula,
    the others (LSTM, bilinear, matrix-vector) on meta tensors), without running the model."""
    from fxprune.flops import GraphFlops
    for name, model, inputs in _graph_models():
        args, kwargs = ((), inputs) if isinstance(inputs, dict) else (inputs, {})
        gm = torch.export.export(model, args, kwargs, strict=False).graph_module
        assert GraphFlops(gm).count() == _dispatch_flops(model, inputs), name


@pytest.mark.parametrize("name", ["cnn", "mobilenet", "resnext", "vit", "llama", "gpt2"])
def test_compaction_flops_equal_the_dispatch_count_before_and_after(name, monkeypatch):
    """The report's FLOPs, counted from the graph (after: from the sliced shapes), equal the
    counter's on a forward of the model and of the compacted model."""
    import fxprune.compaction.apply as apply

    def no_forward_counting():
        raise AssertionError("compaction counted FLOPs on a forward, not from the graph")
    monkeypatch.setattr(apply, "flop_counter", no_forward_counting)
    model, inputs = next((m, i) for n, m, i in _graph_models() if n == name)
    config = {"pattern": "1xchannel", "target_sparsity": 0.5, "pruning_scope": "local"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a target missed by whole classes
        compacted = fxprune.transform(model, config, inputs, compact=True)
    monkeypatch.undo()
    c = fxprune.sparsity_report(compacted).compaction
    assert sum(g["removed"] for g in c["groups"]) > 0, name      # something was sliced
    assert c["flops_before"] == _dispatch_flops(model, inputs)
    assert c["flops_after"] == _dispatch_flops(compacted, inputs) < c["flops_before"]

