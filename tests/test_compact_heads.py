"""Attention heads removed whole by compaction (docs/compact.md, "Attention heads"): through RoPE,
grouped-query attention, T5's relative position bias, packed q/k/v projections and
nn.MultiheadAttention. The compacted model equals the masked one on fresh inputs, the head counts
are exact per layer, and the modules' head attributes follow."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxprune.compaction.modules import CompactMultiheadAttention
from test_compact import masked_and_compacted as compact_run

transformers = pytest.importorskip("transformers")

LOCAL = {"pattern": "1xchannel", "target_sparsity": 0.3, "pruning_scope": "local"}


def masked_and_compacted(model, inputs, config=LOCAL):
    """The masked model just before slicing, the compacted one and its report's compaction entry
    (one run; the masks do not depend on compact)."""
    masked, compacted, report = compact_run(model, config, inputs)
    return masked, compacted, report.compaction


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return first_tensor(out[0])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_equal_on(masked, compacted, inputs):
    masked.eval(), compacted.eval()
    with torch.no_grad():
        call = (lambda m: m(**inputs)) if isinstance(inputs, dict) else (lambda m: m(*inputs))
        a, b = first_tensor(call(masked)), first_tensor(call(compacted))
    assert a.shape == b.shape
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def head_group(report, layer):
    (group,) = [g for g in report["groups"] if layer in g["layers"]]
    return group


def tokens(*shape):
    return torch.randint(0, 100, shape)


# ---------------------------------------------------------------------- RoPE and grouped-query attention
DECODERS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),      # q/k/v biases
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),       # q_norm, k_norm per head
}


def decoder(name, heads, kv_heads):
    config_class, model_class = DECODERS[name]
    torch.manual_seed(0)
    cfg = config_class(hidden_size=64, intermediate_size=128, vocab_size=100, num_hidden_layers=2,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64 // heads)
    return model_class(cfg).eval()


@pytest.mark.parametrize("name,heads,kv_heads", [("llama", 8, 4), ("qwen2", 8, 4), ("mistral", 4, 4),
                                                  ("qwen3", 8, 4)])
def test_rope_and_gqa_remove_whole_kv_groups_exactly(name, heads, kv_heads):
    model = decoder(name, heads, kv_heads)
    masked, compacted, report = masked_and_compacted(model, (tokens(2, 8),))
    head_dim, group = 64 // heads, heads // kv_heads
    for i, layer in enumerate(compacted.model.layers):
        att = layer.self_attn
        unit = head_group(report, f"model.layers.{i}.self_attn.q_proj")
        assert set(unit["layers"]) == {f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"}
        # a unit is one key/value head with the query heads it serves: kv_heads units, of which
        # floor(0.3 * kv_heads) fit the local budget of each projection
        assert unit["units"] == kv_heads and unit["blocked_units"] == 0
        removed = int(0.3 * kv_heads)
        assert unit["removed"] == removed
        assert att.q_proj.out_features == (heads - removed * group) * head_dim
        assert att.k_proj.out_features == att.v_proj.out_features == (kv_heads - removed) * head_dim
        assert att.o_proj.in_features == att.q_proj.out_features
        assert att.num_key_value_groups == group            # unchanged: the forward needs no rewrite
        if name == "qwen2":
            assert att.q_proj.bias.shape == (att.q_proj.out_features,)
    assert_equal_on(masked, compacted, (tokens(3, 11),))     # fresh tokens, another length


def test_gqa_unit_larger_than_the_local_budget_is_kept_not_blocked():
    """With 2 key/value heads a unit is half of the attention: local 0.3 cannot take one; global
    scope can (the FFN and the heads share one ranking)."""
    model = decoder("llama", 4, 2)
    _, compacted, report = masked_and_compacted(model, (tokens(2, 8),))
    unit = head_group(report, "model.layers.0.self_attn.q_proj")
    assert (unit["units"], unit["removed"], unit["blocked_units"]) == (2, 0, 0)
    masked, compacted, report = masked_and_compacted(
        model, (tokens(2, 8),), {**LOCAL, "pruning_scope": "global", "target_sparsity": 0.5})
    kept = [layer.self_attn.k_proj.out_features // 16 for layer in compacted.model.layers]
    removed = sum(head_group(report, f"model.layers.{i}.self_attn.q_proj")["removed"] for i in range(2))
    assert sum(2 - k for k in kept) == removed
    assert_equal_on(masked, compacted, (tokens(2, 9),))


def _phi3(heads=8, kv_heads=4):
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(hidden_size=64, intermediate_size=128, vocab_size=100, num_hidden_layers=2,
                                  num_attention_heads=heads, num_key_value_heads=kv_heads, pad_token_id=0,
                                  eos_token_id=1, bos_token_id=2)
    return transformers.Phi3ForCausalLM(cfg).eval()


def test_phi3_packed_qkv_sliced_at_config_offsets_loses_whole_kv_groups_and_reloads(tmp_path):
    # qkv_proj is cut by qkv[..., :heads * head_dim] (heads read from the config), then the key
    # and value heads: pieces of unequal size whose offsets follow the head counts rewritten
    model = _phi3()
    masked, compacted, report = masked_and_compacted(model, (tokens(2, 8),))
    for i, layer in enumerate(compacted.model.layers):
        unit = head_group(report, f"model.layers.{i}.self_attn.qkv_proj")
        assert (unit["units"], unit["removed"], unit["blocked_units"]) == (4, 1, 0)
        att = layer.self_attn
        assert att.qkv_proj.out_features == (6 + 2 * 3) * 8 and att.o_proj.in_features == 6 * 8
        assert att.num_key_value_heads == 3 and att.num_key_value_groups == 2
        assert layer.mlp.gate_up_proj.out_features == 2 * (128 - int(0.3 * 128))
    config = compacted.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (6, 3, 8)
    assert config.intermediate_size == 128 - int(0.3 * 128)
    assert report["config"]["not_described"] == {}
    x = (tokens(3, 11),)
    assert_equal_on(masked, compacted, x)
    compacted.save_pretrained(tmp_path)
    again = transformers.Phi3ForCausalLM.from_pretrained(tmp_path).eval()
    assert_equal_on(compacted, again, x)


def test_phi3_global_removes_kv_groups_per_layer_and_says_the_config_cannot_describe_them():
    model = _phi3(4, 2)
    masked, compacted, report = masked_and_compacted(
        model, (tokens(2, 8),), {**LOCAL, "pruning_scope": "global", "target_sparsity": 0.6})
    removed = [head_group(report, f"model.layers.{i}.self_attn.qkv_proj")["removed"] for i in range(2)]
    assert sum(removed) >= 1
    for r, layer in zip(removed, compacted.model.layers):
        assert layer.self_attn.num_key_value_heads == 2 - r
        assert layer.self_attn.qkv_proj.out_features == (2 * (2 - r) + 2 * (2 - r)) * 16
    assert_equal_on(masked, compacted, (tokens(3, 11),))


def test_phi3_layers_keep_their_own_head_counts(tmp_path):
    # Phi-3 reads the query head count from the shared config: a layer that keeps fewer heads than
    # the others gets its own view of the config
    import fxprune
    from fxprune.compaction.modules import ConfigView
    model = _phi3(4, 2)
    with torch.no_grad():  # layer 0 only: key/value head 0 and its query heads 0, 1 (head_dim 16)
        w = model.model.layers[0].self_attn.qkv_proj.weight
        w[0:32], w[64:80], w[96:112] = 0, 0, 0
    with pytest.warns(UserWarning, match=r"config.num_attention_heads: \[2, 4\]"):
        compacted = fxprune.compact(model, (tokens(2, 8),))
    first, second = (layer.self_attn for layer in compacted.model.layers)
    assert first.qkv_proj.out_features == (2 + 2) * 16 and second.qkv_proj.out_features == (4 + 4) * 16
    assert isinstance(first.config, ConfigView) and first.config.num_attention_heads == 2
    assert second.config is compacted.config and compacted.config.num_attention_heads == 4
    assert first.config.vocab_size == compacted.config.vocab_size     # the rest is the shared config's
    x = (tokens(3, 11),)
    assert_equal_on(model, compacted, x)
    torch.save(compacted, tmp_path / "m.pt")
    assert_equal_on(model, torch.load(tmp_path / "m.pt", weights_only=False), x)


def test_slices_of_channels_at_offsets_outside_attention_stay_blocked():
    class Halves(nn.Module):  # hard-coded offsets no head count rewrites
        def __init__(self):
            super().__init__()
            self.fc, self.a, self.b = nn.Linear(8, 32), nn.Linear(16, 4), nn.Linear(16, 4)

        def forward(self, x):
            h = self.fc(x)
            return self.a(h[..., :16]) + self.b(h[..., 16:])

    masked, compacted, report = masked_and_compacted(Halves().eval(), (torch.randn(2, 8),))
    assert compacted.fc.out_features == 32
    reasons = {b["reason"] for g in report["groups"] for b in g["blocked"]}
    assert any("slice" in r and "indexes the channel dim" in r for r in reasons), reasons


# ---------------------------------------------------------------------- T5's relative position bias
def test_t5_relative_bias_columns_go_with_their_heads():
    torch.manual_seed(0)
    cfg = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100)
    model = transformers.T5Model(cfg).eval()
    inputs = {"input_ids": tokens(2, 8), "decoder_input_ids": tokens(2, 5)}
    masked, compacted, report = masked_and_compacted(model, inputs)
    # the position bias is computed once per stack and shared by its layers: head h of every
    # self-attention layer of a stack is one unit, with column h of the bias table
    for stack in (compacted.encoder, compacted.decoder):
        table = stack.block[0].layer[0].SelfAttention.relative_attention_bias
        heads = [block.layer[0].SelfAttention.n_heads for block in stack.block]
        assert heads == [3, 3] and table.weight.shape == (32, 3) and table.embedding_dim == 3
        for block in stack.block:
            att = block.layer[0].SelfAttention
            assert att.inner_dim == 24 and att.q.out_features == 24 and att.o.in_features == 24
    unit = head_group(report, "encoder.block.0.layer.0.SelfAttention.q")
    assert "encoder.block.1.layer.0.SelfAttention.q" in unit["layers"]
    assert (unit["units"], unit["removed"], unit["blocked_units"]) == (4, 1, 0)
    for block in compacted.decoder.block:  # cross-attention: no bias table, heads removed too
        assert block.layer[1].EncDecAttention.n_heads == 3
    assert_equal_on(masked, compacted, {"input_ids": tokens(3, 7), "decoder_input_ids": tokens(3, 4)})


# ---------------------------------------------------------------------- packed q/k/v
class PackedAttention(nn.Module):
    """One projection makes q, k and v (timm's ViT attention, GPT-style chunk)."""

    def __init__(self, style, dim=32, heads=4):
        super().__init__()
        self.num_heads, self.head_dim, self.style = heads, dim // heads, style
        self.fc = nn.Linear(16, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 4)

    def forward(self, x):
        x = self.fc(x)
        B, N, C = x.shape
        if self.style == "chunk":
            q, k, v = (t.view(B, N, -1, self.head_dim).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        else:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0) if self.style in ("unbind", "fixed width") else (qkv[0], qkv[1], qkv[2])
        if self.style == "index":  # eager attention
            a = ((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5).softmax(-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        width = C if self.style == "fixed width" else -1   # reshape(B, N, C) ties heads to the input
        return self.out(self.proj(a.transpose(1, 2).reshape(B, N, width)))


@pytest.mark.parametrize("style", ["unbind", "index", "chunk"])
def test_packed_qkv_loses_whole_heads(style):
    torch.manual_seed(0)
    model = PackedAttention(style).eval()
    masked, compacted, report = masked_and_compacted(model, (torch.randn(2, 5, 16),))
    unit = head_group(report, "qkv")
    assert unit["layers"] == ["qkv"] and (unit["units"], unit["removed"], unit["blocked_units"]) == (4, 1, 0)
    assert compacted.qkv.weight.shape == (3 * 24, 23) and compacted.proj.weight.shape == (23, 24)
    assert compacted.num_heads == 3 and compacted.head_dim == 8
    assert_equal_on(masked, compacted, (torch.randn(3, 7, 16),))


def test_packed_qkv_whose_code_fixes_the_width_stays_masked_with_the_reason():
    torch.manual_seed(0)
    model = PackedAttention("fixed width").eval()
    masked, compacted, report = masked_and_compacted(model, (torch.randn(2, 5, 16),))
    unit = head_group(report, "qkv")
    assert unit["removed"] == 0
    assert "not compacted: the compacted model fails" in unit["blocked"][0]["reason"]
    assert compacted.qkv.weight.shape[0] == 96 and compacted.num_heads == 4
    assert_equal_on(masked, compacted, (torch.randn(2, 5, 16),))


# ---------------------------------------------------------------------- nn.MultiheadAttention
class WithMHA(nn.Module):
    def __init__(self, batch_first=True, need_weights=False):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.att = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.out = nn.Linear(32, 4)
        self.need_weights = need_weights

    def forward(self, x):
        h = self.fc(x)
        a, w = self.att(h, h, h, need_weights=self.need_weights)
        return self.out(a)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_loses_heads_and_input_channels(batch_first):
    torch.manual_seed(0)
    model = WithMHA(batch_first).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    masked, compacted, report = masked_and_compacted(model, (x,))
    unit = head_group(report, "att.in_proj_weight")
    assert (unit["units"], unit["removed"], unit["blocked_units"]) == (4, 1, 0)
    att = compacted.att
    assert type(att) is CompactMultiheadAttention and isinstance(att, nn.MultiheadAttention)
    assert (att.num_heads, att.head_dim, att.embed_dim) == (3, 8, 23)
    assert att.in_proj_weight.shape == (72, 23) and att.in_proj_bias.shape == (72,)
    assert att.out_proj.weight.shape == (23, 24)
    assert set(compacted.state_dict()) == set(model.state_dict())
    fresh = (torch.randn(*x.shape[:2], 16),)
    assert_equal_on(masked, compacted, fresh)          # eval, no grad: torch's fast path for the masked
    masked.train(), compacted.train()                  # dropout 0: the normal path
    with torch.no_grad():
        torch.testing.assert_close(compacted(*fresh), masked(*fresh), rtol=1e-4, atol=1e-5)


def test_transformer_encoder_layer_heads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
                          nn.Linear(32, 4)).eval()
    masked, compacted, report = masked_and_compacted(model, (torch.randn(2, 5, 16),))
    assert compacted[1].self_attn.num_heads == 3 and compacted[1].linear1.out_features == 45
    assert_equal_on(masked, compacted, (torch.randn(3, 6, 16),))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_compact_multihead_attention_computes_what_torch_does(batch_first, need_weights):
    """Same sizes, the swapped class against torch's own forward (fast path under no_grad, normal
    path with gradients), with a bool key padding mask and a float attention mask."""
    torch.manual_seed(0)
    torch_mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    mine = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    mine.load_state_dict(torch_mha.state_dict())
    mine.__class__ = CompactMultiheadAttention
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    causal = torch.triu(torch.full((5, 5), float("-inf")), 1)
    for kwargs in ({}, {"key_padding_mask": pad}, {"attn_mask": causal, "key_padding_mask": pad}):
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                a, wa = torch_mha(x, x, x, need_weights=need_weights, **kwargs)
                b, wb = mine(x, x, x, need_weights=need_weights, **kwargs)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            if need_weights:
                torch.testing.assert_close(wb, wa, rtol=1e-5, atol=1e-6)


class ReferenceGQA(nn.Module):
    """The reference Llama / Mistral code's attention: views with the head counts the module
    records (no -1) and ``repeat_interleave`` for the key/value heads."""

    def __init__(self, dim=32, heads=8, kv_heads=4):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, dim // heads
        self.fc = nn.Linear(16, dim)
        self.wq, self.wo = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.wk, self.wv = nn.Linear(dim, kv_heads * self.head_dim), nn.Linear(dim, kv_heads * self.head_dim)
        self.out = nn.Linear(dim, 4)

    def forward(self, x):
        x = self.fc(x)
        B, N, _ = x.shape
        q = self.wq(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (w(x).view(B, N, self.num_key_value_heads, self.head_dim).transpose(1, 2) for w in (self.wk, self.wv))
        group = self.num_heads // self.num_key_value_heads
        a = F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))
        return self.out(self.wo(a.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)))


def test_reference_gqa_rewrites_both_head_counts():
    torch.manual_seed(0)
    model = ReferenceGQA().eval()
    masked, compacted, report = masked_and_compacted(model, (torch.randn(2, 5, 16),))
    unit = head_group(report, "wq")
    assert unit["layers"] == ["wq", "wk", "wv"] and (unit["units"], unit["removed"], unit["blocked_units"]) == (4, 1, 0)
    assert (compacted.num_heads, compacted.num_key_value_heads) == (6, 3)
    assert compacted.wq.out_features == 24 and compacted.wk.out_features == compacted.wv.out_features == 12
    assert_equal_on(masked, compacted, (torch.randn(3, 7, 16),))
