"""Compaction (docs/design.md, "Compaction"; docs/compact.md): channel-pruned models physically shrink and compute what the masked
model computes; coupled channels (residual adds, concat, depthwise, attention heads) go together;
what cannot be compacted is reported with the op that blocked it."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.examples import ResNet
from fxprune.passes import CAPTURE_PASSES, PRUNE_PASSES, PassManager
from fxprune.compaction import zero_removed
from fxprune.passes.compact import compact_passes
from fxprune.transform import _context


def masked_and_compacted(model, config, inputs):
    """(the masked model just before slicing, the compacted model, the report)."""
    ctx = _context(model, config, inputs, inplace=False)
    ctx.compact = True
    passes = compact_passes([p() for p in (*CAPTURE_PASSES, *PRUNE_PASSES)])
    PassManager(passes[:-1]).run(ctx)
    zero_removed(ctx.model, ctx.compaction)
    masked = copy.deepcopy(ctx.model)
    passes[-1](ctx)
    return masked, ctx.model, ctx.report


def outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        out = model(*inputs) if isinstance(inputs, tuple) else model(**inputs)
    if isinstance(out, torch.Tensor):
        return [out]
    return [v for v in (out.values() if isinstance(out, dict) else out) if isinstance(v, torch.Tensor)]


def assert_same_function(masked, compacted, inputs):
    for a, b in zip(outputs(compacted, inputs), outputs(masked, inputs)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def kept_rows(weight):
    """Output channels of a masked weight that are not all zero."""
    return int((weight.detach().reshape(weight.shape[0], -1) != 0).any(dim=1).sum())


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


CHANNEL = {"pattern": "1xchannel", "target_sparsity": 0.5, "pruning_scope": "local"}


# ---------------------------------------------------------------------- models
class PlainCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c3 = nn.Conv2d(32, 24, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(24 * 2 * 2, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.c2(x))), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.c3(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class DenseBlock(nn.Module):
    """DenseNet-style: every layer's output is concatenated to its input."""

    def __init__(self, cin=8, growth=6, n=3):
        super().__init__()
        self.stem = nn.Conv2d(3, cin, 3, padding=1)
        self.layers = nn.ModuleList()
        for i in range(n):
            c = cin + i * growth
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1)))
        self.transition = nn.Conv2d(cin + n * growth, 12, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return self.fc(self.transition(x).mean((2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2-style: expand 1x1, depthwise 3x3, project 1x1, residual."""

    def __init__(self, c=8, expand=4):
        super().__init__()
        h = c * expand
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.fc(x.mean((2, 3)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 48), nn.Linear(48, 10)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.relu(self.fc1(x)))))


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=100)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


# ---------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("make,shape", [
    (PlainCNN, (2, 3, 8, 8)),
    (lambda: ResNet((1, 2, 1, 1), width=8, num_classes=10), (2, 3, 32, 32)),
    (DenseBlock, (2, 3, 8, 8)),
    (InvertedResidual, (2, 3, 8, 8)),
    (MLP, (4, 32)),
], ids=["cnn", "resnet", "densenet", "mobilenet", "mlp"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_compacted_equals_masked(make, shape, scope):
    torch.manual_seed(0)
    model = randomize_bn(make()).eval()
    x = torch.randn(*shape)
    masked, compacted, report = masked_and_compacted(model, {**CHANNEL, "pruning_scope": scope}, (x,))
    assert type(compacted) is type(model)
    assert_same_function(masked, compacted, (torch.randn(*shape),))
    c = report.compaction
    assert c["params_after"] == n_params(compacted) < c["params_before"] == n_params(model)
    assert c["flops_after"] < c["flops_before"]
    assert sum(g["removed"] for g in c["groups"]) > 0
    assert not any(b["reason"].startswith("not compacted") for g in c["groups"] for b in g["blocked"])


def test_compacted_model_trains_and_keeps_working_in_train_mode():
    torch.manual_seed(0)
    model = ResNet((1, 1, 1, 1), width=8, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    pruned = fxprune.transform(model, CHANNEL, (x,), compact=True)
    assert pruned.training
    loss = pruned(x).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in pruned.parameters())


def test_transform_leaves_the_user_model_alone():
    torch.manual_seed(0)
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxprune.transform(model, CHANNEL, (torch.randn(2, 32),), compact=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------- exact counts
def test_mlp_exact_shapes_and_parameter_count():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 32)
    masked, compacted, report = masked_and_compacted(model, CHANNEL, (x,))
    # local 50 %: fc1 and fc2 each lose half their rows; fc3 (classifier) only loses inputs
    assert compacted.fc1.weight.shape == (32, 32) and compacted.fc1.bias.shape == (32,)
    assert compacted.fc2.weight.shape == (24, 32) and compacted.fc3.weight.shape == (10, 24)
    assert (compacted.fc1.out_features, compacted.fc2.in_features, compacted.fc3.in_features) == (32, 32, 24)
    assert n_params(compacted) == (32 * 32 + 32) + (24 * 32 + 24) + (10 * 24 + 10)
    # the kept rows are the masked model's nonzero rows, in order
    keep = (masked.fc1.weight != 0).any(dim=1)
    torch.testing.assert_close(compacted.fc1.weight, masked.fc1.weight[keep])
    assert_same_function(masked, compacted, (x,))


def test_cnn_parameter_count_matches_kept_channels():
    torch.manual_seed(0)
    model = randomize_bn(PlainCNN()).eval()
    masked, compacted, report = masked_and_compacted(model, CHANNEL, (torch.randn(2, 3, 8, 8),))
    k1, k2, k3, k4 = (kept_rows(getattr(masked, n).weight) for n in ("c1", "c2", "c3", "fc1"))
    expected = ((k1 * 3 * 9 + k1) + 2 * k1 + (k2 * k1 * 9 + k2) + 2 * k2 + (k3 * k2 * 9 + k3)
                + (k4 * k3 * 4 + k4) + (10 * k4 + 10))
    assert (k1, k2, k3, k4) == (8, 16, 12, 16)
    assert n_params(compacted) == expected == report.compaction["params_after"]
    assert compacted.bn2.num_features == compacted.c3.in_channels == 16
    assert compacted.fc1.in_features == 12 * 4


def test_residual_channels_are_one_group():
    torch.manual_seed(0)
    model = randomize_bn(ResNet((2, 1, 1, 1), width=8, num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    masked, compacted, report = masked_and_compacted(model, CHANNEL, (x,))
    stage = [masked.layer1[0].downsample[0], masked.layer1[0].conv3, masked.layer1[1].conv3]
    rows = [(m.weight.reshape(m.weight.shape[0], -1) != 0).any(dim=1) for m in stage]
    assert all(torch.equal(rows[0], r) for r in rows) and not rows[0].all()
    group = next(g for g in report.compaction["groups"] if "layer1.0.conv3" in g["layers"])
    assert set(group["layers"]) == {"layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3"}
    assert group["removed"] == 16  # local 50 % of 32 channels, one score per coupled channel
    width = int(rows[0].sum())
    assert compacted.layer1[1].conv1.in_channels == compacted.layer2[0].conv1.in_channels == width
    assert compacted.layer1[0].bn3.num_features == width
    assert_same_function(masked, compacted, (x,))


def test_depthwise_follows_its_input_channels():
    torch.manual_seed(0)
    model = randomize_bn(InvertedResidual()).eval()
    masked, compacted, report = masked_and_compacted(model, CHANNEL, (torch.randn(2, 3, 8, 8),))
    dw = compacted.dw[0]
    assert dw.groups == dw.in_channels == dw.out_channels == compacted.expand[0].out_channels < 32
    assert compacted.project[0].in_channels == dw.out_channels


def test_concat_offsets():
    torch.manual_seed(0)
    model = randomize_bn(DenseBlock()).eval()
    masked, compacted, _ = masked_and_compacted(model, CHANNEL, (torch.randn(2, 3, 8, 8),))
    kept = [kept_rows(masked.stem.weight)] + [kept_rows(layer[2].weight) for layer in masked.layers]
    assert compacted.transition.in_channels == sum(kept) < 8 + 3 * 6
    assert [layer[2].in_channels for layer in compacted.layers] == [sum(kept[:i + 1]) for i in range(3)]


# ---------------------------------------------------------------------- Hugging Face BERT
def test_bert_ffn_and_heads():
    model = _bert()
    ids = torch.randint(0, 100, (2, 8))
    config = {"pattern": "1xchannel", "target_sparsity": 0.3,
              "op_names": ["attention.self", "intermediate.dense", "output.dense"]}
    masked, compacted, report = masked_and_compacted(model, config, (ids,))
    assert type(compacted).__name__ == "BertModel"
    assert_same_function(masked, compacted, (ids,))
    layers = compacted.encoder.layer
    groups = report.compaction["groups"]
    heads = [g for g in groups if "encoder.layer.0.attention.self.query" in g["layers"]][0]
    assert set(heads["layers"]) == {f"encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")}
    assert heads["units"] == 4  # whole heads
    ffn = [g for g in groups if g["layers"] == ["encoder.layer.0.intermediate.dense"]][0]
    assert ffn["units"] == 128
    for layer in layers:
        att = layer.attention.self
        assert att.query.out_features == att.key.out_features == att.value.out_features
        assert att.query.out_features == att.num_attention_heads * att.attention_head_size
        assert att.all_head_size == att.query.out_features
        assert layer.attention.output.dense.in_features == att.all_head_size
        assert layer.output.dense.in_features == layer.intermediate.dense.out_features
    assert sum(layer.intermediate.dense.out_features for layer in layers) < 2 * 128
    assert sum(layer.attention.self.num_attention_heads for layer in layers) < 2 * 4
    # the residual stream goes through LayerNorm: never compacted, reported with the op
    out_dense = [g for g in groups if g["layers"] == ["encoder.layer.0.output.dense"]][0]
    assert out_dense["removed"] == 0 and out_dense["blocked_units"] == 64
    assert any("layer_norm" in b["reason"] or "embedding" in b["reason"] or "reaches" in b["reason"]
               for b in out_dense["blocked"])
    assert report.compaction["params_after"] == n_params(compacted)


def test_bert_eager_attention():
    model = _bert()
    model.config._attn_implementation = "eager"
    for layer in model.encoder.layer:
        layer.attention.self.config._attn_implementation = "eager"
    ids = torch.randint(0, 100, (2, 8))
    config = {"pattern": "1xchannel", "target_sparsity": 0.3, "op_names": ["attention.self"]}
    masked, compacted, report = masked_and_compacted(model, config, (ids,))
    assert_same_function(masked, compacted, (ids,))
    assert sum(layer.attention.self.num_attention_heads for layer in compacted.encoder.layer) < 8


# ---------------------------------------------------------------------- blocked couplings
def _blocked(report):
    return [b["reason"] for g in report.compaction["groups"] for b in g["blocked"]]


class LayerNormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2, self.fc3 = nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(self.norm(self.fc1(x)))))


def test_layernorm_over_channels_blocks_with_reason():
    torch.manual_seed(0)
    masked, compacted, report = masked_and_compacted(LayerNormMLP(), CHANNEL, (torch.randn(2, 16),))
    assert compacted.fc1.out_features == 32  # untouched
    assert compacted.fc2.out_features == 16  # free channels still go
    assert any("layer_norm" in r and "mean and variance" in r for r in _blocked(report))
    assert_same_function(masked, compacted, (torch.randn(3, 16),))


class HardcodedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 4 * 4, 4)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv2(F.relu(self.conv(x)))
        return self.fc(y.view(-1, 8 * 4 * 4))  # hard-coded channel count


def test_hardcoded_view_is_caught_and_left_uncompacted():
    torch.manual_seed(0)
    model = HardcodedView()
    x = torch.randn(2, 3, 4, 4)
    masked, compacted, report = masked_and_compacted(model, CHANNEL, (x,))
    reasons = _blocked(report)
    assert any(r.startswith("not compacted: the compacted model fails") for r in reasons), reasons
    assert compacted.conv2.out_channels == 8  # that space stays masked
    assert compacted.conv.out_channels == 4   # the independent one is compacted
    assert_same_function(masked, compacted, (torch.randn(2, 3, 4, 4),))


class Gated(nn.Module):
    """Sigmoid and add-a-constant make pruned channels nonzero: the consumer blocks them."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc3(torch.sigmoid(self.fc1(x)) + (self.fc2(x) + 1.0))


def test_nonzero_preserving_ops_block():
    torch.manual_seed(0)
    masked, compacted, report = masked_and_compacted(Gated(), CHANNEL, (torch.randn(2, 8),))
    assert compacted.fc1.out_features == 16 and compacted.fc3.in_features == 16
    assert any("sigmoid" in r and "nonzero" in r for r in _blocked(report))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.gn, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.Conv2d(16, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.c2(F.relu(self.gn(self.c1(x)))).mean((2, 3)))


def test_groupnorm_removes_whole_groups_exactly():
    torch.manual_seed(0)
    model = randomize_bn(GroupNormNet())
    masked, compacted, report = masked_and_compacted(model, CHANNEL, (torch.randn(2, 3, 8, 8),))
    assert compacted.gn.num_channels == compacted.c1.out_channels == 8
    assert compacted.gn.num_groups == 2
    assert_same_function(masked, compacted, (torch.randn(2, 3, 8, 8),))


def test_grouped_conv_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    masked, compacted, report = masked_and_compacted(model, CHANNEL, (torch.randn(2, 3, 6, 6),))
    assert compacted[0].out_channels == 8 and compacted[2].out_channels == 8
    assert compacted[4].out_channels == 4
    assert any("grouped convolution (groups=2)" in r for r in _blocked(report))
    assert_same_function(masked, compacted, (torch.randn(2, 3, 6, 6),))


def test_non_channel_pattern_is_left_alone():
    torch.manual_seed(0)
    model = MLP()
    pruned = fxprune.transform(model, {"pattern": "4x1", "target_sparsity": 0.5}, (torch.randn(2, 32),),
                               compact=True)
    c = fxprune.sparsity_report(pruned).compaction
    assert c["params_after"] == c["params_before"] and c["groups"] == []
    assert "does not remove output channels" in c["not_compacted"]["fc1.weight"]


def test_compact_needs_example_inputs():
    with pytest.raises(fxprune.FxPruneError, match="example_inputs"):
        fxprune.transform(MLP(), CHANNEL, compact=True)


def test_report_round_trips_with_compaction():
    torch.manual_seed(0)
    pruned = fxprune.transform(MLP(), {**CHANNEL, "compact": True}, (torch.randn(2, 32),))
    report = fxprune.sparsity_report(pruned)
    again = fxprune.SparsityReport.from_json(report.to_json())
    assert again.compaction == report.compaction
    assert "compacted: params" in str(report)


# ---------------------------------------------------------------------- ONNX
def test_compacted_model_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = randomize_bn(ResNet((1, 1, 1, 1), width=8, num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    pruned = fxprune.transform(model, CHANNEL, (x,), compact=True).eval()
    path = tmp_path / "compact.onnx"
    torch.onnx.export(pruned, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), pruned(x), rtol=1e-4, atol=1e-4)


def test_round_channels_to_keeps_multiples():
    torch.manual_seed(0)
    model = randomize_bn(ResNet((1, 1, 1, 1), width=16, num_classes=10)).eval()
    config = {**CHANNEL, "target_sparsity": 0.3, "round_channels_to": 8}
    masked, compacted, report = masked_and_compacted(model, config, (torch.randn(2, 3, 32, 32),))
    convs = [m for m in compacted.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.out_channels % 8 == 0 for m in convs)
    assert any(m.out_channels < o.out_channels for m, o in zip(convs, (m for m in model.modules() if isinstance(m, nn.Conv2d))))
    assert_same_function(masked, compacted, (torch.randn(2, 3, 32, 32),))
    with pytest.raises(fxprune.ConfigError, match="round_channels_to"):
        fxprune.transform(MLP(), {**CHANNEL, "round_channels_to": 0}, (torch.randn(2, 32),), compact=True)
