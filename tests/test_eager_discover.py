"""Discovery without a graph on the block-sequential path: one eager run on the example inputs
(first block real, later blocks standing in) must find exactly the layers the graph capture
finds, give the same report, and fall back to the capture whenever it cannot vouch for that."""
import pytest
import torch
from torch import nn

import fxprune
import fxprune.passes.eager as eager
from fxprune.config import PruningConfig
from fxprune.errors import CaptureError
from fxprune.passes import CAPTURE_PASSES, EagerDiscoverPass, PassManager, PruneContext
from tiny_llm import tiny_gpt2, tiny_llama, token_batches

transformers = pytest.importorskip("transformers")

EXAMPLE = (torch.zeros(1, 12, dtype=torch.long),)
WANDA = {"pruning_type": "activation", "pattern": "2:4", "target_sparsity": 0.5,
         "pruning_scope": "local"}


def _tied_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, vocab_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


MODELS = {"llama": lambda: tiny_llama(3), "llama_tied": _tied_llama, "gpt2": tiny_gpt2}


def _targets(model, passes, config=WANDA, example=EXAMPLE):
    ctx = PruneContext(model=model, config=PruningConfig.from_any(config), example_inputs=example)
    ctx.calibration = token_batches(1)
    PassManager(passes).run(ctx)
    fields = [(t.param, t.name, t.module_type, t.op, t.geometry, t.bias, t.aliases, len(t.nodes))
              for t in ctx.targets.values()]
    order = sorted(ctx.targets, key=lambda p: ctx.targets[p].position)
    return ctx.capture_method, fields, order


@pytest.mark.parametrize("name", list(MODELS))
def test_eager_discovery_finds_exactly_the_graph_layers(name):
    model = MODELS[name]()
    method, fields, order = _targets(model, [EagerDiscoverPass()])
    assert method == eager.EAGER_CAPTURE
    graph_method, graph_fields, graph_order = _targets(model, [p() for p in CAPTURE_PASSES])
    assert graph_method == "aten_trace"
    assert fields == graph_fields            # same layers, names, aliases, layouts, in graph order
    assert order == graph_order              # same last linear (lm_head, or the tied embedding)
    assert len(fields) == {"llama": 22, "llama_tied": 15, "gpt2": 9}[name]


@pytest.mark.parametrize("name,config", [
    ("llama", WANDA), ("gpt2", WANDA),
    ("llama", {**WANDA, "pruning_type": "sparse_gpt", "pattern": "1x1"}),
    ("gpt2", {**WANDA, "pruning_type": "sparse_gpt", "true_sequential": True})])
def test_report_and_weights_equal_the_captured_path(name, config, monkeypatch):
    calib = token_batches(2)
    model = MODELS[name]()
    fast = fxprune.transform(model, config, EXAMPLE, calibration=calib)
    monkeypatch.setattr(eager, "eligible", lambda ctx: None)     # force the graph capture
    slow = fxprune.transform(model, config, EXAMPLE, calibration=calib)
    a, b = fxprune.sparsity_report(fast).to_dict(), fxprune.sparsity_report(slow).to_dict()
    assert (a.pop("capture"), b.pop("capture")) == (eager.EAGER_CAPTURE, "aten_trace")
    assert a == b
    for (n, p), q in zip(fast.named_parameters(), slow.parameters()):
        assert torch.equal(p, q), n


class _Projection(nn.Module):
    """A weight used as ``x @ W.t()`` (graph discovery sees it; the eager one falls back)."""

    def __init__(self, width):
        super().__init__()
        self.w = nn.Parameter(torch.randn(width, width) / width ** 0.5)

    def forward(self, x):
        return x @ self.w.t()


class _Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2, self.proj = nn.Linear(width, 2 * width), nn.Linear(2 * width, width), _Projection(width)

    def forward(self, x):
        return x + self.proj(self.fc2(torch.relu(self.fc1(x))))


class _Stack(nn.Module):
    def __init__(self, width=16, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_a_functional_weight_use_falls_back_to_the_capture():
    torch.manual_seed(0)
    model = _Stack().eval()
    x = torch.randn(8, 16)
    method, fields, _ = _targets(model, [EagerDiscoverPass()], example=(x,))
    assert method == "aten_trace"            # fell back: x @ W.t() is not a plain linear call
    assert [f[1] for f in fields].count("blocks.1.proj.w") == 1
    out = fxprune.transform(model, WANDA, (x,), calibration=[x, x + 1])
    report = fxprune.sparsity_report(out)
    assert report.capture == "aten_trace"
    assert report.layer("blocks.2.proj.w").status == "pruned"        # not skipped
    assert report.calibration["block_sequential"] == [0]


def test_a_group_outside_the_blocks_captures_the_graph():
    """lm_head selected (exclude_last_linear: false) cannot go block by block: the graph is
    captured and the group runs on the whole-model path, as without the eager discovery."""
    model, calib = tiny_llama(2), token_batches(2)
    cfg = {**WANDA, "exclude_last_linear": False}
    out = fxprune.transform(model, cfg, EXAMPLE, calibration=calib)
    report = fxprune.sparsity_report(out)
    assert report.capture == "aten_trace"
    assert report.layer("lm_head").status == "pruned"
    assert "outside model.layers" in report.calibration["whole_model"]["0"]


def test_bad_example_inputs_are_still_a_capture_error():
    with pytest.raises(CaptureError, match="cannot run on example_inputs"):
        fxprune.transform(tiny_llama(2), WANDA, (torch.zeros(1, 12),), calibration=token_batches(1))
