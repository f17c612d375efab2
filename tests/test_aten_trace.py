"""The recorded ATen trace (the default capture with example inputs) against torch.export: the same
graph (ops, arguments, module paths, shapes), the same pruning and compaction, a silent fallback
to torch.export where the trace cannot be trusted, and the model left as it was."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from torch import nn

import fxprune
from fxprune import examples
from fxprune.aten import module_of, shape_of
from fxprune.errors import CaptureError
from fxprune.passes import aten_trace
from fxprune.passes.capture import CapturePass, canonical_names
from fxprune.passes.context import PruneContext
from fxprune.config import PruningConfig
from conftest import refuse_aten_trace
from test_compact import randomize_bn
from tiny_llm import tiny_llama

CHANNELS = {"pattern": "1xchannel", "target_sparsity": 0.3, "pruning_scope": "local"}


class _InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, depthwise 3x3, 1x1 project, residual."""

    def __init__(self, c, expand=4):
        super().__init__()
        h = c * expand
        self.block = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(inplace=True),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(inplace=True),
            nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.block(x)


class TinyMobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(_InvertedResidual(8), _InvertedResidual(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class WithMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.att = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = self.fc(x)
        h = h + self.att(h, h, h, need_weights=False)[0]
        return self.out(h + self.mlp(h))


MODELS = {
    "resnet": lambda: (randomize_bn(examples.ResNet(layers=(1, 1, 1, 1), width=8, num_classes=10)).eval(),
                       (torch.randn(2, 3, 32, 32),)),
    "mobilenet": lambda: (randomize_bn(TinyMobileNet()).eval(), (torch.randn(2, 3, 16, 16),)),
    "llama": lambda: (tiny_llama(2), {"input_ids": torch.randint(0, 64, (2, 12))}),
    "mha": lambda: (WithMHA().eval(), (torch.randn(2, 5, 16),)),
}


def _capture(model, inputs, trace: bool) -> PruneContext:
    ctx = PruneContext(model=model, config=PruningConfig.from_any({}), example_inputs=inputs)
    CapturePass(aten_trace=trace)(ctx)
    return ctx


def _signature(ctx: PruneContext) -> list:
    """Each op of the graph: target, arguments (parameters by name, inputs by position, other ops
    by their index), module path, shape and dtype of the result."""
    index, inputs, out = {}, {}, []

    def arg(a):
        if isinstance(a, torch.fx.Node):
            if a.op == "placeholder":
                name = ctx.param_of_node.get(a.name)
                return ("param", name) if name is not None else ("input", inputs.setdefault(a, len(inputs)))
            return ("op", index[a])
        if isinstance(a, (list, tuple)):
            return [arg(x) for x in a]
        return a

    for node in ctx.graph_module.graph.nodes:
        if node.op != "call_function" or "_assert_tensor_metadata" in str(node.target):
            continue   # torch.export asserts the dtype after each .to(); nothing to prune there
        index[node] = len(out)
        val = node.meta.get("val")
        out.append((str(node.target), arg(node.args), arg(dict(node.kwargs)), module_of(node),
                    shape_of(node), getattr(val, "dtype", None)))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_the_trace_records_the_graph_torch_export_records(name):
    model, inputs = MODELS[name]()
    traced, exported = _capture(model, inputs, True), _capture(model, inputs, False)
    assert (traced.capture_method, exported.capture_method) == ("aten_trace", "torch.export")
    assert sorted(traced.param_of_node.values()) == sorted(exported.param_of_node.values())
    ops = _signature(traced)
    assert ops == _signature(exported)
    assert len(ops) > 10 and all(shape is not None for *_, shape, dtype in ops if dtype is not None)


def _dispatch_state():
    """What the direct dispatch step changes while a trace runs: OpOverload's own
    ``_get_dispatch``, the pre-dispatch mode slot, the PreDispatch key in the include set."""
    from torch import _ops
    return (vars(_ops.OpOverload).get("_get_dispatch"), _ops.mode_stack_state_for_pre_dispatch().get(0),
            torch._C._dispatch_tls_is_dispatch_key_included(torch._C.DispatchKey.PreDispatch))


@pytest.mark.parametrize("name", list(MODELS))
def test_the_direct_dispatch_step_records_what_torchs_own_step_records(name, monkeypatch):
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) not in aten_trace._DIRECT_DISPATCH_TORCH:
        pytest.skip("this torch release keeps torch's own dispatch step")
    calls = []
    own = aten_trace._Recorder.__torch_dispatch__

    def counted(self, *args, **kwargs):     # torch's step calls the mode; the direct one does not
        calls.append(1)
        return own(self, *args, **kwargs)
    monkeypatch.setattr(aten_trace._Recorder, "__torch_dispatch__", counted)
    model, inputs = MODELS[name]()
    direct = _capture(model, inputs, True)
    through_torch = len(calls)
    monkeypatch.setattr(aten_trace, "_direct_dispatch", lambda recorder: contextlib.nullcontext())
    plain = _capture(model, inputs, True)
    assert (direct.capture_method, plain.capture_method) == ("aten_trace", "aten_trace")
    assert through_torch == 0 and len(calls) > 10
    nodes = lambda ctx: [(n.op, n.name, str(n.target), n.meta.get("nn_module_stack"))  # noqa: E731
                         for n in ctx.graph_module.graph.nodes]
    assert nodes(direct) == nodes(plain)
    assert _signature(direct) == _signature(plain)


def test_the_dispatch_state_is_restored_after_a_refused_or_failed_trace():
    before = _dispatch_state()
    model = _Reads(VALUE_READS["tolist"])
    with pytest.raises(aten_trace.TraceRefused):
        aten_trace.trace_aten(model, (torch.randn(2, 8),), {})
    assert _dispatch_state() == before

    def fail(h):
        raise ValueError("a model error")
    model = _Reads(fail)
    with pytest.raises(ValueError, match="a model error"):
        aten_trace.trace_aten(model, (torch.randn(2, 8),), {})
    assert _dispatch_state() == before
    assert before[1] is None and not before[2]


def _transform(model, inputs, config, trace: bool, monkeypatch):
    with monkeypatch.context() as m:
        if not trace:
            refuse_aten_trace(m)
        return fxprune.transform(model, config, inputs, compact=True)


@pytest.mark.parametrize("name", list(MODELS))
def test_pruning_and_compaction_are_the_same_with_either_capture(name, monkeypatch):
    model, inputs = MODELS[name]()
    a = _transform(model, inputs, CHANNELS, True, monkeypatch)
    b = _transform(model, inputs, CHANNELS, False, monkeypatch)
    ra, rb = fxprune.sparsity_report(a).to_dict(), fxprune.sparsity_report(b).to_dict()
    assert (ra.pop("capture"), rb.pop("capture")) == ("aten_trace", "torch.export")
    assert ra == rb                                   # every layer's status, zeros, the compaction
    assert ra["compaction"]["params_after"] < ra["compaction"]["params_before"]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:                                    # same compacted shapes, same kept weights
        assert sa[key].shape == sb[key].shape and torch.equal(sa[key], sb[key]), key
    assert any(sa[k].shape != v.shape for k, v in model.state_dict().items())


def test_a_read_of_tensor_values_falls_back_to_torch_export():
    class ConstantRead(nn.Module):   # torch.export folds the constant; the trace does not guess
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x) * int(torch.tensor(3))

    model, x = ConstantRead(), torch.randn(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # silently
        ctx = _capture(model, (x,), True)
    assert ctx.capture_method == "torch.export"
    assert ctx.param_of_node and ctx.shapes_known


class _Reads(nn.Module):
    def __init__(self, read):
        super().__init__()
        self.fc, self.read = nn.Linear(8, 8), read

    def forward(self, x):
        return self.read(self.fc(x))


VALUE_READS = {
    "branch": lambda h: h if h.sum() > 0 else -h,
    "tolist": lambda h: h * h.argmax(-1).tolist()[0],
    "numpy": lambda h: h * float(h.detach().numpy()[0, 0]),
    "mask index": lambda h: h[h > 0].sum() + h,
    "nonzero": lambda h: h + torch.nonzero(h).shape[0],
}


@pytest.mark.parametrize("read", list(VALUE_READS))
def test_a_graph_that_follows_the_data_is_refused(read):
    model = _Reads(VALUE_READS[read])
    with pytest.raises(aten_trace.TraceRefused, match="the graph would depend on tensor values"):
        aten_trace.trace_aten(model, (torch.randn(2, 8),), {})


def test_control_flow_on_data_fails_as_torch_export_fails():
    model = _Reads(VALUE_READS["branch"])
    with pytest.raises(CaptureError, match="torch.export could not capture _Reads"):
        fxprune.capture(model, (torch.randn(2, 8),))


def test_any_failure_of_the_trace_falls_back_silently(monkeypatch):
    model, inputs = MODELS["resnet"]()
    traced = fxprune.capture(model, inputs)

    def broken(*args):
        raise RuntimeError("a bug in the trace")
    monkeypatch.setattr(aten_trace, "trace_aten", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = fxprune.capture(model, inputs)
    assert (traced.meta["fxprune_capture"], gm.meta["fxprune_capture"]) == ("aten_trace", "torch.export")
    assert list(gm.meta["fxprune_targets"]) == list(traced.meta["fxprune_targets"])
    assert len(gm.meta["fxprune_targets"]) == 18      # 17 convolutions and the classifier


def test_a_training_model_keeps_its_statistics_and_the_random_state():
    """A real forward in training mode updates BatchNorm statistics and draws dropout masks:
    both are undone, as torch.export (fake tensors) leaves them."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    rng = torch.random.get_rng_state()
    gm = fxprune.capture(model, (x,))
    assert gm.meta["fxprune_capture"] == "aten_trace"
    assert torch.equal(torch.random.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    bn = next(n for n in gm.graph.nodes if "batch_norm" in str(n.target))
    assert bn.args[5] is True                                    # recorded in training mode
    assert any("dropout" in str(n.target) for n in gm.graph.nodes)
    assert model.training and torch.backends.mha.get_fastpath_enabled()


def test_a_meta_model_is_traced_without_data():
    """A meta-device skeleton (checkpoint pruning): shapes only, parameters kept apart."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))
    ctx = _capture(model, (torch.randn(2, 8, device="meta"),), True)
    assert ctx.capture_method == "aten_trace"
    weights = [ctx.param_of_node[n.args[1].name] for n in ctx.graph_module.graph.nodes
               if "linear" in str(n.target)]
    assert weights == ["0.weight", "2.weight", "3.weight"]


def test_a_buffer_the_forward_replaces_is_put_back():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls = self.calls + 1          # a new tensor in the buffer slot
            return self.fc(x)

    model = Counter()
    buffer = model.calls
    ctx = _capture(model, (torch.randn(2, 4),), True)
    assert ctx.capture_method == "aten_trace"
    assert model.calls is buffer and float(buffer) == 0.0


def test_one_module_lookup_walks_as_torchs_own_walks():
    """The walks the passes share (ModuleLookup) equal nn.Module's: shared submodules, tied and
    missing parameters, buffers; parameters replaced after the walk are seen."""
    from fxprune.aten import ModuleLookup

    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Sequential(shared, nn.BatchNorm1d(4)), shared,
                          nn.Linear(4, 4))
    model[3].weight = model[0].weight                                  # tied
    lookup = ModuleLookup(model)
    assert lookup.named == list(model.named_modules(remove_duplicate=False))
    assert lookup.named_modules() == list(model.named_modules())
    assert lookup.modules() == list(model.modules())
    assert [(n, id(p)) for n, p in lookup.named_parameters()] == [(n, id(p)) for n, p in model.named_parameters()]
    first = {}
    expected = {n: first.setdefault(id(t), n) for n, t in [*model.named_parameters(remove_duplicate=False),
                                                          *model.named_buffers(remove_duplicate=False)]}
    assert lookup.canonical == expected and canonical_names(model) == expected
    assert lookup.canonical["3.weight"] == "0.weight" and lookup.aliases("0.weight") == ["3.weight"]
    assert lookup.tensor("1.1.running_mean") is model[1][1].running_mean
    model[1][0].weight = nn.Parameter(torch.zeros(2, 4))               # replaced: seen
    assert lookup.parameter("2.weight") is shared.weight and lookup.tensor("1.0.weight") is shared.weight
    assert [id(p) for p in lookup.parameters()] == [id(p) for p in model.parameters()]
    with pytest.raises(AttributeError):
        lookup.submodule("9")


def test_the_module_walk_is_taken_again_after_a_pass_that_may_replace_modules():
    """The passes of one run share one walk of the modules; a pass not marked
    ``keeps_module_tree`` (a user's own, or one running criteria or hooks) may replace modules,
    so the passes after it see the new ones: a replaced layer is the one pruned. The run's
    lookup is put back when a pass raises."""
    from fxprune.config import PruningConfig
    from fxprune.passes import TRANSFORM_PASSES, CheckWeightsPass, Pass, PassManager, PruneContext

    class Replace(Pass):
        name = "replace"

        def call(self, ctx):
            new = nn.Linear(8, 8)
            new.load_state_dict(ctx.model[0].state_dict())
            ctx.model[0] = new

    class Read(Pass):
        name = "read"
        keeps_module_tree = True

        def call(self, ctx):
            seen.append(ctx.module_lookup().submodule("0"))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    config = PruningConfig.from_any({"pattern": "1x1", "target_sparsity": 0.5,
                                     "pruning_scope": "local"})
    ctx = PruneContext(model=model, config=config, example_inputs=(torch.randn(2, 8),))
    seen = []
    PassManager([Read(), Replace(), Read()]).run(ctx)
    assert seen[0] is not seen[1] and seen[1] is model[0] and ctx.lookup is None

    ctx = PruneContext(model=model, config=config, example_inputs=(torch.randn(2, 8),))
    passes = [p() for p in TRANSFORM_PASSES]
    at = next(i for i, p in enumerate(passes) if isinstance(p, CheckWeightsPass)) + 1
    passes.insert(at, Replace())        # after a pass that walked the modules
    PassManager(passes).run(ctx)
    assert int((model[0].weight == 0).sum()) == 32      # the new layer, pruned at 0.5
    assert int((model[2].weight == 0).sum()) == 0       # the last linear is excluded

    class Fail(Pass):
        name = "fail"

        def call(self, ctx):
            raise RuntimeError("stop")

    ctx.lookup = outer = object()
    with pytest.raises(RuntimeError, match="stop"):
        PassManager([Read(), Fail()]).run(ctx)
    assert ctx.lookup is outer
