"""Norms whose statistic averages over the channels (docs/compact.md, "Norms over the channels"):
residual streams under RMSNorm (Hugging Face Llama / T5, ``nn.RMSNorm`` with and without weight,
a decomposed norm without weight) and ConvNeXt-V2's global response norm lose channels exactly,
with the epsilon and the weight rescaled by C / C_kept; LayerNorm stays blocked."""
import copy

import pytest
import torch
from torch import nn

import fxprune
from test_compact import assert_same_function, masked_and_compacted

LOCAL = {"pattern": "1xchannel", "target_sparsity": 0.3, "pruning_scope": "local"}


class DecomposedRMSNorm(nn.Module):
    """An RMSNorm written out (pow, mean, add eps, rsqrt, mul), with or without a weight."""

    def __init__(self, dim, weight=True, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5) if weight else None
        self.eps = eps

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x if self.weight is None else self.weight * x


class Stream(nn.Module):
    """A residual stream of width 16 written by ``inp`` and each block's ``fc2``, read through a
    norm by each block's ``fc1`` and by ``head``."""

    def __init__(self, norm, blocks=2):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.norms = nn.ModuleList(norm() for _ in range(blocks + 1))
        self.fc1 = nn.ModuleList(nn.Linear(16, 24) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(24, 16) for _ in range(blocks))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.inp(x)
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
            h = h + fc2(torch.relu(fc1(norm(h))))
        return self.head(self.norms[-1](h))


def _randomize(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.RMSNorm) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape) + 0.5)
    return model


NORMS = {
    "nn.RMSNorm": lambda: nn.RMSNorm(16, eps=1e-5),
    "nn.RMSNorm eps None": lambda: nn.RMSNorm(16),
    "nn.RMSNorm without weight": lambda: nn.RMSNorm(16, eps=1e-4, elementwise_affine=False),
    "decomposed": lambda: DecomposedRMSNorm(16),
}


@pytest.mark.parametrize("norm", list(NORMS))
def test_residual_stream_under_rmsnorm_is_compacted_exactly(norm):
    model = _randomize(Stream(NORMS[norm])).eval()
    x = (torch.randn(4, 3, 8),)
    masked, compacted, report = masked_and_compacted(model, LOCAL, x)
    assert compacted.inp.weight.shape == (16 - 4, 8)     # 30% of the 16 stream channels, floored
    assert compacted.head.weight.shape == (4, 12)
    for n in compacted.norms:
        if isinstance(n, nn.RMSNorm):
            assert n.normalized_shape == (12,)
            eps = torch.finfo(torch.float32).eps if norm.endswith("None") else (1e-4 if "without" in norm else 1e-5)
            assert n.eps == pytest.approx(eps * 16 / 12, rel=1e-12)
        if n.weight is not None and norm != "nn.RMSNorm without weight":
            old = dict(masked.named_parameters())
            i = list(compacted.norms).index(n)
            kept = old[f"norms.{i}.weight"][old["inp.weight"].abs().sum(1) != 0]
            torch.testing.assert_close(n.weight.detach(), kept * (16 / 12) ** 0.5)
    if norm == "nn.RMSNorm without weight":  # the factor became a weight
        assert all(torch.equal(n.weight, torch.full((12,), (16 / 12) ** 0.5)) for n in compacted.norms)
    assert_same_function(masked, compacted, (torch.randn(5, 2, 8),))
    assert not [g for g in report.compaction["groups"] if g["blocked"]]


def test_decomposed_rmsnorm_without_weight_folds_into_its_only_reader():
    class OneReader(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.norm, self.head = nn.Linear(8, 16), DecomposedRMSNorm(16, weight=False), nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.norm(self.inp(x)))

    model = OneReader().eval()
    masked, compacted, _ = masked_and_compacted(model, LOCAL, (torch.randn(4, 8),))
    assert compacted.head.weight.shape == (4, 12) and compacted.norm.eps == pytest.approx(1e-5 * 16 / 12)
    assert_same_function(masked, compacted, (torch.randn(6, 8),))


def test_decomposed_rmsnorm_without_weight_read_twice_is_blocked_with_its_reason():
    class ReadTwice(Stream):
        def forward(self, x):
            h = self.inp(x)
            for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
                n = norm(h)
                h = h + fc2(torch.relu(fc1(n))) + n
            return self.head(self.norms[-1](h))

    model = ReadTwice(lambda: DecomposedRMSNorm(16, weight=False)).eval()
    _, compacted, report = masked_and_compacted(model, LOCAL, (torch.randn(4, 3, 8),))
    assert compacted.inp.weight.shape == (16, 8)
    reasons = {b["reason"] for g in report.compaction["groups"] for b in g["blocked"]}
    assert any("a mean: removing channels changes its divisor" in r and "not by one chain" in r for r in reasons), reasons


def test_layer_norm_keeps_blocking_the_stream():
    model = Stream(lambda: nn.LayerNorm(16)).eval()
    _, compacted, report = masked_and_compacted(model, LOCAL, (torch.randn(4, 3, 8),))
    assert compacted.inp.weight.shape == (16, 8)
    reasons = {b["reason"] for g in report.compaction["groups"] for b in g["blocked"]}
    assert any("normalizes over the channel dim; removing channels would change its mean and variance" in r
               for r in reasons), reasons


# ---------------------------------------------------------------------- global response norm
class GRN(nn.Module):
    """ConvNeXt-V2's global response norm, channels last, epsilon held as an attribute (timm)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.randn(1, 1, 1, dim))
        self.eps = eps

    def forward(self, x):
        g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * (x * n) + self.bias + x


class ConvNeXtV2Block(nn.Module):
    def __init__(self, dim=8, eps=1e-6):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 1)
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.grn = GRN(4 * dim, eps)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.stem(x)
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        h = self.pwconv2(self.grn(nn.functional.gelu(self.pwconv1(h)))).permute(0, 3, 1, 2)
        return self.head((x + h).mean((2, 3)))


def test_global_response_norm_is_compacted_exactly():
    model = ConvNeXtV2Block(eps=1e-2).eval()   # a large epsilon: its rescaling shows
    masked, compacted, report = masked_and_compacted(model, LOCAL, (torch.randn(2, 3, 8, 8),))
    assert compacted.pwconv1.weight.shape == (32 - 9, 8) and compacted.pwconv2.weight.shape == (8, 23)
    assert compacted.grn.eps == pytest.approx(1e-2 * 32 / 23)
    kept = masked.pwconv1.weight.abs().sum(1) != 0
    torch.testing.assert_close(compacted.grn.weight.detach(), masked.grn.weight[..., kept] * 32 / 23)
    assert_same_function(masked, compacted, (torch.randn(3, 3, 8, 8),))
    # the stream under the LayerNorm stays, with its reason
    reasons = {b["reason"] for g in report.compaction["groups"] for b in g["blocked"]}
    assert any(r.startswith("layer_norm (norm)") for r in reasons), reasons


def test_global_response_norm_with_addcmul_is_compacted_exactly():
    class TimmGRN(GRN):  # timm's GlobalResponseNorm: the affine through addcmul on views
        def forward(self, x):
            g = x.norm(p=2, dim=(1, 2), keepdim=True)
            n = g / (g.mean(dim=-1, keepdim=True) + self.eps)
            return x + torch.addcmul(self.bias.view(1, 1, 1, -1), self.weight.view(1, 1, 1, -1), x * n)

    model = ConvNeXtV2Block(eps=1e-2)
    model.grn = TimmGRN(32, eps=1e-2)
    masked, compacted, _ = masked_and_compacted(model.eval(), LOCAL, (torch.randn(2, 3, 8, 8),))
    assert compacted.pwconv1.weight.shape == (23, 8) and compacted.grn.eps == pytest.approx(1e-2 * 32 / 23)
    assert_same_function(masked, compacted, (torch.randn(3, 3, 8, 8),))


class LiteralEpsGRN(GRN):
    """A GRN writing its epsilon (a large one, so that its rescaling shows) in the code."""

    def __init__(self, dim):
        super().__init__(dim)
        del self.eps

    def forward(self, x):
        g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        return self.weight * (x * (g / (g.mean(dim=-1, keepdim=True) + 1e-2))) + self.bias + x


def test_global_response_norm_with_a_literal_epsilon_is_blocked_with_its_reason():
    # as Hugging Face's ConvNextV2GRN (1e-6 in its code) when no compact class is registered
    model = ConvNeXtV2Block()
    model.grn = LiteralEpsGRN(32)
    _, compacted, report = masked_and_compacted(model.eval(), LOCAL, (torch.randn(2, 3, 8, 8),))
    assert compacted.pwconv1.weight.shape == (32, 8)
    reasons = {b["reason"] for g in report.compaction["groups"] for b in g["blocked"]}
    assert any("its epsilon 0.01 (add (grn)) is a constant in the code, not an attribute of module grn" in r
               for r in reasons), reasons


class CompactLiteralEpsGRN(LiteralEpsGRN):
    eps = 1e-2

    def forward(self, x):
        g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        return self.weight * (x * (g / (g.mean(dim=-1, keepdim=True) + self.eps))) + self.bias + x


class WrongCompactGRN(CompactLiteralEpsGRN):
    def forward(self, x):  # forgets the residual: not what the original computes
        return super().forward(x) - x


@pytest.fixture
def compact_classes():
    from fxprune.compaction.modules import COMPACT_CLASSES
    before = dict(COMPACT_CLASSES)
    yield COMPACT_CLASSES
    COMPACT_CLASSES.clear()
    COMPACT_CLASSES.update(before)


def test_a_registered_compact_class_makes_a_literal_epsilon_exact(compact_classes, tmp_path):
    fxprune.compaction.register_compact_class(LiteralEpsGRN)(CompactLiteralEpsGRN)
    model = ConvNeXtV2Block()
    model.grn = LiteralEpsGRN(32)
    masked, compacted, report = masked_and_compacted(model.eval(), LOCAL, (torch.randn(2, 3, 8, 8),))
    assert compacted.pwconv1.weight.shape == (23, 8)
    grn = compacted.grn
    assert type(grn) is CompactLiteralEpsGRN and isinstance(grn, LiteralEpsGRN)
    assert vars(grn)["eps"] == pytest.approx(1e-2 * 32 / 23) and CompactLiteralEpsGRN.eps == 1e-2
    assert set(compacted.state_dict()) == set(model.state_dict())
    assert type(model.grn) is LiteralEpsGRN and "eps" not in vars(model.grn)  # the caller's model untouched
    x = (torch.randn(3, 3, 8, 8),)
    assert_same_function(masked, compacted, x)
    # the rescaled epsilon matters: the original class with the compacted weights differs
    plain = copy.deepcopy(compacted)
    plain.grn.__class__ = LiteralEpsGRN
    with torch.no_grad():
        assert not torch.allclose(plain(*x), masked(*x), rtol=1e-4, atol=1e-6)
    torch.save(compacted, tmp_path / "m.pt")
    assert_same_function(masked, torch.load(tmp_path / "m.pt", weights_only=False), x)


def test_a_compact_class_that_computes_something_else_is_undone(compact_classes):
    fxprune.compaction.register_compact_class(LiteralEpsGRN)(WrongCompactGRN)
    model = ConvNeXtV2Block()
    model.grn = LiteralEpsGRN(32)
    masked, compacted, report = masked_and_compacted(model.eval(), LOCAL, (torch.randn(2, 3, 8, 8),))
    assert compacted.pwconv1.weight.shape == (32, 8)            # that space stays masked
    assert type(compacted.grn) is LiteralEpsGRN and "eps" not in vars(compacted.grn)
    reasons = [b["reason"] for g in report.compaction["groups"] for b in g["blocked"]]
    assert any(r.startswith("not compacted: output 0 differs from the masked model's") for r in reasons), reasons
    assert_same_function(masked, compacted, (torch.randn(3, 3, 8, 8),))


def test_register_compact_class_checks_its_arguments():
    with pytest.raises(TypeError, match="must decorate a subclass of LiteralEpsGRN"):
        fxprune.compaction.register_compact_class(LiteralEpsGRN)(GRN)
    with pytest.raises(TypeError, match="needs the nn.Module class"):
        fxprune.compaction.register_compact_class("LiteralEpsGRN")


# ---------------------------------------------------------------------- Hugging Face
transformers = pytest.importorskip("transformers")


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, vocab_size=50, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_llama_hidden_size_is_compacted_exactly():
    model = _llama()
    for m in model.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape) + 0.5)
    ids = torch.randint(0, 50, (2, 6))
    masked, compacted, report = masked_and_compacted(model, LOCAL, (ids,))
    kept = 24  # 30% of 32 removes 9; LlamaConfig needs a multiple of the 4 heads: one goes back
    assert compacted.model.embed_tokens.weight.shape == (50, kept)
    assert compacted.lm_head.weight.shape == (50, kept)
    layer = compacted.model.layers[1]
    assert layer.self_attn.q_proj.weight.shape[1] == kept and layer.mlp.down_proj.weight.shape[0] == kept
    assert layer.self_attn.o_proj.weight.shape[0] == kept and layer.mlp.up_proj.weight.shape[1] == kept
    assert layer.input_layernorm.variance_epsilon == pytest.approx(1e-6 * 32 / kept)
    assert compacted.model.norm.variance_epsilon == pytest.approx(1e-6 * 32 / kept)
    stream = next(g for g in report.compaction["groups"] if "model.layers.0.self_attn.o_proj" in g["layers"])
    assert stream["units"] == 32 and stream["removed"] == 32 - kept and stream["blocked"] == []
    assert_same_function(masked, compacted, (torch.randint(0, 50, (3, 9)),))


class _T5Logits(nn.Module):
    """A tiny T5 returning only its logits: the encoder's last hidden state, a model output, would
    keep the residual stream from being compacted."""

    def __init__(self):
        super().__init__()
        cfg = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1,
                                    num_heads=4, decoder_start_token_id=0)
        self.t5 = transformers.T5ForConditionalGeneration(cfg)

    def forward(self, input_ids, decoder_input_ids):
        return self.t5(input_ids=input_ids, decoder_input_ids=decoder_input_ids, use_cache=False).logits


def _t5_logits():
    inputs = {"input_ids": torch.randint(0, 50, (2, 7)), "decoder_input_ids": torch.randint(0, 50, (2, 4))}
    return _T5Logits().eval(), inputs


def test_t5_residual_streams_are_compacted_exactly():
    model, inputs = _t5_logits()
    masked, compacted, _ = masked_and_compacted(model, LOCAL, inputs)
    kept = 32 - int(0.3 * 32)
    assert compacted.t5.shared.weight.shape == (50, kept)
    assert compacted.t5.decoder.final_layer_norm.variance_epsilon == pytest.approx(1e-6 * 32 / kept)
    assert_same_function(masked, compacted, {"input_ids": torch.randint(0, 50, (3, 5)),
                                             "decoder_input_ids": torch.randint(0, 50, (3, 3))})


def _llama_gqa(layers=2):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, vocab_size=50, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_llama_config_describes_the_compacted_model_and_reloads(tmp_path):
    model = _llama_gqa()
    ids = torch.randint(0, 50, (2, 6))
    masked, compacted, report = masked_and_compacted(model, LOCAL, (ids,))
    config = report.compaction["config"]
    assert config["not_described"] == {}
    hidden, ffn = compacted.model.embed_tokens.weight.shape[1], compacted.model.layers[0].mlp.up_proj.out_features
    assert hidden == 48 and ffn == 96 - int(0.3 * 96)   # 64 - 19 = 45, up to a multiple of 4 heads
    assert config["updated"]["config.hidden_size"] == [64, 48]
    assert config["updated"]["config.intermediate_size"] == [96, ffn]
    assert compacted.config.rms_norm_eps == pytest.approx(1e-6 * 64 / 48)
    assert compacted.config.head_dim == 16
    compacted.save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = (torch.randint(0, 50, (3, 7)),)
    assert_same_function(compacted, again, x)
    assert_same_function(masked, again, x)
    assert again.model.layers[1].input_layernorm.variance_epsilon == compacted.config.rms_norm_eps


def _gemma(tied=True):
    cfg = transformers.GemmaConfig(hidden_size=32, intermediate_size=64, vocab_size=50, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   tie_word_embeddings=tied)
    model = transformers.GemmaForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "GemmaRMSNorm":   # initialised to zero: 1 + w would be 1
                m.weight.copy_(torch.rand(m.weight.shape) - 0.5)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_gemma_one_plus_weight_norms_are_compacted_exactly_and_reload(tmp_path, tied):
    # GemmaRMSNorm multiplies by 1 + w: (1 + w') = sqrt(r) (1 + w); the embeddings are scaled by
    # sqrt(hidden_size) from the config, and the head shares the embedding weight when tied
    model = _gemma(tied)
    ids = torch.randint(0, 50, (2, 6))
    masked, compacted, report = masked_and_compacted(model, LOCAL, (ids,))
    config = report.compaction["config"]
    assert config["not_described"] == {}
    kept = 32 - 9
    assert config["updated"]["config.hidden_size"] == [32, kept]
    assert compacted.model.embed_tokens.weight.shape == (50, kept)
    norm = compacted.model.layers[0].input_layernorm
    assert norm.eps == pytest.approx(1e-6 * 32 / kept) == compacted.config.rms_norm_eps
    kept_channels = masked.model.embed_tokens.weight.abs().sum(0) != 0
    torch.testing.assert_close(1 + norm.weight.detach(), (1 + masked.model.layers[0].input_layernorm.weight.detach()
                                                          [kept_channels]) * (32 / kept) ** 0.5)
    assert compacted.model.embed_tokens.scalar_embed_scale == pytest.approx(kept ** 0.5)
    stream = next(g for g in report.compaction["groups"] if "model.layers.0.self_attn.o_proj" in g["layers"])
    assert stream["removed"] == 9 and stream["blocked"] == []
    x = (torch.randint(0, 50, (3, 9)),)
    assert_same_function(masked, compacted, x)
    compacted.save_pretrained(tmp_path)
    again = transformers.GemmaForCausalLM.from_pretrained(tmp_path).eval()
    assert (again.lm_head.weight is again.model.embed_tokens.weight) == tied
    assert_same_function(compacted, again, x)
    assert_same_function(masked, again, x)


def test_layers_of_different_sizes_warn_that_the_config_cannot_describe_them():
    model = _llama_gqa()
    config = dict(LOCAL, pruning_scope="global")
    with pytest.warns(UserWarning, match="config cannot describe|from_pretrained cannot rebuild") as record:
        _, compacted, report = masked_and_compacted(model, config, (torch.randint(0, 50, (2, 6)),))
    sizes = [layer.mlp.up_proj.out_features for layer in compacted.model.layers]
    assert len(set(sizes)) > 1                          # global scope: the layers keep different widths
    assert sorted(set(report.compaction["config"]["not_described"]["config.intermediate_size"])) == sorted(set(sizes))
    assert compacted.config.intermediate_size == 96     # left as it was, not a wrong single value
    assert any("torch.save(model)" in str(w.message) for w in record)


def test_t5_config_gets_d_model_d_ff_and_epsilon(tmp_path):
    model, inputs = _t5_logits()
    _, compacted, report = masked_and_compacted(model, LOCAL, inputs)
    t5 = compacted.t5
    assert (t5.config.d_model, t5.config.d_ff) == (32 - int(0.3 * 32), 48 - int(0.3 * 48))
    assert t5.config.layer_norm_epsilon == pytest.approx(1e-6 * 32 / t5.config.d_model)
    assert report.compaction["config"]["updated"]["t5.config.d_model"] == [32, t5.config.d_model]
    assert (t5.config.num_heads, t5.config.d_kv) == (3, 8)   # a head of 4 goes whole, d_kv stays
    t5.save_pretrained(tmp_path)
    again = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a = t5(**inputs, use_cache=False).logits
        b = again(**inputs, use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class ToyConfig:
    """What update_hf_configs recognises as a Hugging Face config (to_dict, model_type)."""
    model_type = "toy"

    def __init__(self):
        self.hidden_size = 16

    def to_dict(self):
        return dict(vars(self))


class ReadsItsConfig(nn.Module):
    """Scales its embeddings by sqrt(config.hidden_size) at run time, as Gemma does."""

    def __init__(self):
        super().__init__()
        self.config = ToyConfig()
        self.emb, self.norm, self.final_norm = nn.Embedding(10, 16), nn.RMSNorm(16), nn.RMSNorm(16)
        self.fc1, self.fc2, self.head = nn.Linear(16, 24), nn.Linear(24, 16), nn.Linear(16, 3)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, ids):
        h = self.emb(ids) * self.config.hidden_size ** 0.5
        h = h + self.fc2(torch.relu(self.fc1(self.norm(h))))
        return self.head(self.final_norm(h))


def test_a_config_read_at_run_time_is_left_as_it_was_with_a_warning():
    model = ReadsItsConfig().eval()
    ids = torch.randint(0, 10, (2, 5))
    with pytest.warns(UserWarning, match="with these sizes in its config the model computes something else"):
        masked, compacted, report = masked_and_compacted(model, LOCAL, (ids,))
    assert compacted.emb.weight.shape == (10, 12) and compacted.config.hidden_size == 16
    assert report.compaction["config"] == {"updated": {}, "not_described": {"config.hidden_size": [12]}}
    assert_same_function(masked, compacted, (torch.randint(0, 10, (3, 4)),))


def test_llama_config_gets_the_head_counts_and_reloads(tmp_path):
    model = _llama_gqa()   # 4 query heads in 2 groups of a key/value head, head_dim 16
    config = dict(LOCAL, target_sparsity=0.5)
    masked, compacted, report = masked_and_compacted(model, config, (torch.randint(0, 50, (2, 6)),))
    attention = compacted.model.layers[0].self_attn
    assert attention.q_proj.out_features == 2 * 16 and attention.k_proj.out_features == 16
    updated = report.compaction["config"]["updated"]
    assert updated["config.num_attention_heads"] == [4, 2] and updated["config.num_key_value_heads"] == [2, 1]
    assert updated["config.hidden_size"] == [64, 32] and compacted.config.head_dim == 16
    compacted.save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert again.model.layers[1].self_attn.k_proj.weight.shape == (16, 32)
    x = (torch.randint(0, 50, (3, 7)),)
    assert_same_function(compacted, again, x)
    assert_same_function(masked, again, x)


def test_hugging_face_convnextv2_grn_gets_its_compact_class(tmp_path):
    # a vision model (no token embedding: get_input_embeddings raises) whose GRN writes + 1e-6 in the code
    from transformers.models.convnextv2.modeling_convnextv2 import ConvNextV2GRN
    cfg = transformers.ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32, num_labels=3)
    model = transformers.ConvNextV2ForImageClassification(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".grn." in name:   # initialised to zero: the norm would do nothing
                p.normal_(std=0.5)
    with pytest.warns(UserWarning, match=r"config.<no field>.*pwconv1"):
        masked, compacted, report = masked_and_compacted(model, LOCAL, (torch.randn(1, 3, 32, 32),))
    grns = [m for m in compacted.modules() if isinstance(m, ConvNextV2GRN)]
    assert [type(m).__name__ for m in grns] == ["CompactConvNextV2GRN"] * 2
    assert [m.weight.shape[-1] for m in grns] == [23, 45]  # 32 and 64 channels at 0.3
    assert grns[0].eps == pytest.approx(1e-6 * 32 / 23) and grns[1].eps == pytest.approx(1e-6 * 64 / 45)
    assert set(compacted.state_dict()) == set(model.state_dict())
    reasons = {b["reason"] for g in report.compaction["groups"] for b in g["blocked"]}
    assert not any("grn" in r for r in reasons), reasons
    assert list(report.compaction["config"]["not_described"]) == ["config.<no field>"]
    x = (torch.randn(2, 3, 32, 32),)
    assert_same_function(masked, compacted, x)
    torch.save(compacted, tmp_path / "m.pt")
    assert_same_function(masked, torch.load(tmp_path / "m.pt", weights_only=False), x)
