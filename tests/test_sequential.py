"""Block-sequential calibration: equality with the whole-model path, block-forward counts, hooks,
spilling (SparseGPT's per-layer math: test_sparse_gpt_math.py)."""
import copy

import pytest
import torch

import fxprune
from fxprune.errors import ConfigError
from fxprune.sequential import find_blocks
from tiny_llm import tiny_gpt2, tiny_llama, token_batches

transformers = pytest.importorskip("transformers")


def _llama(layers=2, seed=0):
    return tiny_llama(layers, seed)


def _calib(n=3, seed=1):
    return token_batches(n, seed)


EXAMPLE = (torch.zeros(1, 12, dtype=torch.long),)


def _cfg(pt, pattern="1x1", **extra):
    return {"pruning_type": pt, "pattern": pattern, "target_sparsity": 0.5,
            "pruning_scope": "local", **extra}


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _prune(model, cfg, calib, **kw):
    return fxprune.transform(model, cfg, EXAMPLE, calibration=calib, **kw)


def test_finds_decoder_layers_not_bare_linear_lists():
    blocks = find_blocks(_llama())
    assert blocks.name == "model.layers" and len(blocks) == 2
    assert blocks.index_of("model.layers.1.mlp.up_proj.weight") == 1
    assert blocks.index_of("lm_head.weight") is None
    mlp = torch.nn.Module()
    mlp.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
    assert find_blocks(mlp) is None     # the model may do anything between bare layers


@pytest.mark.parametrize("batch_tokens", [0, 4096])   # batches as given / merged into one
def test_activation_dense_propagation_equals_whole_model_masks(batch_tokens):
    model, calib = _llama(3), _calib()
    whole = _prune(model, _cfg("activation", block_sequential=False), calib)
    seq = _prune(model, _cfg("activation", block_sequential=True, block_propagation="dense",
                             block_batch_tokens=batch_tokens), calib)
    assert seq is not whole
    w, s = _weights(whole), _weights(seq)
    pruned = [n for n in w if ".layers." in n and n.endswith("proj.weight")]
    assert len(pruned) == 21
    for n in w:
        assert torch.equal(w[n], s[n]), n        # same masks, kept weights untouched


def test_gpt2_conv1d_blocks_dense_propagation_equals_whole_model():
    model, calib = tiny_gpt2(), _calib()
    assert find_blocks(model).name == "transformer.h"
    whole = _weights(_prune(model, _cfg("activation", "2:4", block_sequential=False), calib))
    seq = _weights(_prune(model, _cfg("activation", "2:4", block_sequential=True,
                                      block_propagation="dense"), calib))
    conv1d = [n for n in whole if ".h." in n and n.endswith("weight") and whole[n].dim() == 2]
    assert len(conv1d) == 8
    for n in whole:
        assert torch.equal(whole[n], seq[n]), n


def test_activation_pruned_propagation_equals_whole_model_on_the_pruned_prefix():
    """With the peers' propagation, block i is scored on the outputs of the already pruned blocks
    0..i-1: the whole-model path on the model whose earlier blocks carry the block-sequential
    result, restricted to block i, must give the same masks."""
    model, calib = _llama(3), _calib()
    seq = _prune(model, _cfg("activation", block_sequential=True), calib)
    seq_w = _weights(seq)
    for i in range(3):
        reference = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in reference.named_parameters():
                if any(n.startswith(f"model.layers.{j}.") for j in range(i)):
                    p.copy_(seq_w[n])
        one_block = _cfg("activation", block_sequential=False, op_names=[rf"model\.layers\.{i}\."])
        ref = _prune(reference, one_block, calib)
        for n, p in ref.named_parameters():
            if n.startswith(f"model.layers.{i}.") and n.endswith("proj.weight"):
                assert torch.equal(p, seq_w[n]), n
    # and the dense and pruned propagations do differ after the first block
    dense = _weights(_prune(model, _cfg("activation", block_propagation="dense"), calib))
    assert torch.equal(dense["model.layers.0.mlp.up_proj.weight"], seq_w["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(dense["model.layers.2.mlp.up_proj.weight"], seq_w["model.layers.2.mlp.up_proj.weight"])


def test_magnitude_groups_equal_the_whole_model_path_beside_a_block_group():
    model, calib = _llama(2), _calib()
    cfg = {"pruning_configs": [
        {"pruning_type": "magnitude", "pattern": "4x1", "target_sparsity": 0.5, "op_names": ["self_attn"]},
        {"pruning_type": "activation", "pattern": "2:4", "target_sparsity": 0.5,
         "pruning_scope": "local", "op_names": ["mlp"]}]}
    seq = _weights(_prune(model, {**cfg, "block_sequential": True}, calib))
    whole = _weights(_prune(model, {**cfg, "block_sequential": False}, calib))
    attn = [n for n in seq if "self_attn" in n and n.endswith("weight")]
    assert len(attn) == 8
    for n in attn:
        assert torch.equal(seq[n], whole[n]), n
    assert sum(int((seq[n] == 0).sum()) for n in attn) == sum(seq[n].numel() for n in attn) // 2


@pytest.mark.parametrize("layers,propagation,batch_tokens,block_batches", [
    (2, "pruned", 0, 3), (4, "pruned", 0, 3),        # the 3 batches as given
    (2, "pruned", 4096, 1), (4, "pruned", 4096, 1),  # merged into one block batch
    (4, "pruned", 48, 2),                            # 24 tokens each: 2 + 1
    (2, "dense", 0, 3), (4, "dense", 0, 3)])
def test_block_forwards_are_linear_in_depth(layers, propagation, batch_tokens, block_batches):
    from torch._subclasses.fake_tensor import FakeTensor
    model, calib = _llama(layers), _calib(3)
    calls, completed, traced = [], [], []
    for layer in model.model.layers:   # a graph capture would trace each block on fake tensors
        layer.register_forward_pre_hook(
            lambda m, a: None if isinstance(a[0], FakeTensor) else calls.append(m))
        layer.register_forward_hook(
            lambda m, a, o: (traced if isinstance(o, FakeTensor) else completed).append(m))
    cfg = _cfg("sparse_gpt", "2:4", block_propagation=propagation, block_batch_tokens=batch_tokens)
    out = fxprune.transform(model, cfg, EXAMPLE, calibration=calib, inplace=True)
    # per block and block batch: one forward to record, one to propagate (pruned propagation;
    # the last block's outputs are not needed); dense propagation keeps the recording's outputs
    per_block = 2 if propagation == "pruned" else 1
    expected = per_block * layers * block_batches - (block_batches if per_block == 2 else 0)
    # with pruned propagation every recording forward stops at down_proj's input (its outputs
    # are not used); dense propagation needs them whole
    stopped = layers * block_batches if propagation == "pruned" else 0
    # + the first block once: the layers are discovered from one run on the example inputs, with
    # the later blocks standing in; no graph is captured
    assert len(calls) == expected + 1
    assert len(completed) == expected - stopped + 1
    assert len(traced) == 0
    info = fxprune.sparsity_report(out).calibration    # the report says the same
    assert (info["block_forwards"], info["stopped_early"], info["block_batches"], info["batches"]) == (
        expected, stopped, block_batches, 3)
    assert info["blocks"] == "model.layers" and info["block_sequential"] == [0]


def test_batches_of_other_lengths_are_not_merged():
    from fxprune.sequential import BlockCall, merge_calls
    h = [torch.zeros(1, 8, 4), torch.zeros(2, 8, 4), torch.zeros(1, 6, 4), torch.zeros(1, 6, 4)]
    rope = [torch.ones(1, 8, 2), torch.ones(1, 8, 2), torch.ones(1, 6, 2), torch.full((1, 6, 2), 2.0)]
    calls = [BlockCall(0, (), {"position_embeddings": (r, r), "use_cache": False}) for r in rope]
    merged = merge_calls(calls, h, 4096)
    # 0+1 merge (same rotary: kept once); 2 differs in length; 2+3 differ in rotary with batch 1: concatenated
    assert [tuple(m[1].shape) for m in merged] == [(3, 8, 4), (2, 6, 4)]
    assert merged[0][0].kwargs["position_embeddings"][0].shape == (1, 8, 2)
    assert merged[1][0].kwargs["position_embeddings"][0].shape == (2, 6, 2)


def test_shared_inputs_get_one_hessian(monkeypatch):
    import fxprune.passes.sequential as seqpass
    factors = []
    real = seqpass.inverse_hessian_factor
    monkeypatch.setattr(seqpass, "inverse_hessian_factor",
                        lambda H, d, name="", **kw: factors.append(name) or real(H, d, name, **kw))
    _prune(_llama(2), _cfg("sparse_gpt", "2:4"), _calib())
    # q/k/v one, o one, gate/up one, down one: 4 per block; the widest input (down's) first, so
    # that its Hessian sum, the largest, is released before the others' solves
    assert len(factors) == 8
    assert factors[:4] == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                           "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj"]


def test_spilled_activations_give_the_same_result():
    model, calib = _llama(2), _calib()
    in_ram = _weights(_prune(model, _cfg("sparse_gpt", "2:4"), calib))
    spilled = _prune(model, _cfg("sparse_gpt", "2:4", activation_cache_mb=0), calib)
    for n, w in _weights(spilled).items():
        assert torch.equal(w, in_ram[n]), n


def test_hooks_stream_blocks_from_meta():
    """A caller may keep the blocks on the meta device, load each in on_block_start and release
    it in on_block_end: the result equals the in-memory one."""
    model, calib = _llama(3), _calib()
    expected = _weights(_prune(model, _cfg("sparse_gpt", "1x1"), calib))
    streamed = copy.deepcopy(model)
    source = _weights(model)
    # the graph capture needs values; the blocks go to meta right after it (first hook call)
    events, written = [], {}

    def start(i, name, block):
        events.append(("start", i, name))
        if i > 0:
            block.to_empty(device="cpu")
            with torch.no_grad():
                for n, p in block.named_parameters():
                    p.copy_(source[f"{name}.{n}"])
        if i == 0:  # release every later block before any of them is used
            for later in streamed.model.layers[1:]:
                later.to("meta")

    def end(i, name, block):
        events.append(("end", i, name))
        written.update({f"{name}.{n}": p.detach().clone() for n, p in block.named_parameters()})
        block.to("meta")

    out = fxprune.transform(streamed, _cfg("sparse_gpt", "1x1"), EXAMPLE, calibration=calib,
                            inplace=True, on_block_start=start, on_block_end=end)
    assert events == [(kind, i, f"model.layers.{i}") for i in range(3) for kind in ("start", "end")]
    for n, w in written.items():
        assert torch.equal(w, expected[n]), n
    report = fxprune.sparsity_report(out)
    q = next(layer for layer in report.layers if layer.param == "model.layers.2.self_attn.q_proj.weight")
    assert q.zeros == q.numel // 2 and q.status == "pruned"


def test_deferred_block_work_runs_after_the_pruned_forward_before_on_block_end():
    """``step.defer(finish, cleanup)``: work left to the forward that makes the next block's
    inputs (weights written by hooks as it reaches them) is finished right after that forward,
    or after ``process`` for the last block, before ``on_block_end``; when the block fails, only
    the cleanup runs."""
    from fxprune.sequential import BlockSequentialRunner

    model, calib = _llama(2), _calib()      # 3 batches, kept apart: 3 forwards per block run
    blocks = find_blocks(model)
    events = []
    for i, block in enumerate(blocks.modules):
        block.register_forward_hook(lambda m, a, o, i=i: events.append(("forward", i)))

    def process(step):
        step.record()
        events.append(("process", step.index))
        step.defer(lambda: events.append(("finish", step.index)),
                   cleanup=lambda: events.append(("cleanup", step.index)))

    def run(model, blocks):
        BlockSequentialRunner(model, blocks, calib, batch_tokens=0,
                              on_block_end=lambda i, n, b: events.append(("end", i))).run(process)

    run(model, blocks)
    assert events == ([("forward", 0)] * 3 + [("process", 0)] + [("forward", 0)] * 3
                      + [("finish", 0), ("cleanup", 0), ("end", 0)]
                      + [("forward", 1)] * 3 + [("process", 1), ("finish", 1), ("cleanup", 1), ("end", 1)])
    events.clear()
    calls = [0]

    def fail_in_the_pruned_forward(module, args):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("the pruned forward failed")
    blocks.modules[0].register_forward_pre_hook(fail_in_the_pruned_forward)
    with pytest.raises(RuntimeError, match="the pruned forward failed"):
        run(model, blocks)
    assert events == [("forward", 0)] * 3 + [("process", 0), ("cleanup", 0)]


def test_block_sequential_true_without_blocks_is_a_config_error(mlp):
    with pytest.raises(ConfigError, match="block_sequential: true"):
        fxprune.transform(mlp, _cfg("activation", block_sequential=True),
                          calibration=[torch.randn(4, 32)])


def test_global_scope_stays_on_the_whole_model_path():
    model, calib = _llama(2), _calib()
    cfg = {**_cfg("activation"), "pruning_scope": "global"}
    auto = _prune(model, {**cfg, "block_sequential": "auto"}, calib)
    assert "global scope" in fxprune.sparsity_report(auto).calibration["whole_model"]["0"]
    a = _weights(auto)
    b = _weights(_prune(model, {**cfg, "block_sequential": False}, calib))
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(ConfigError, match="global scope"):
        _prune(model, {**cfg, "block_sequential": True}, calib)


class _FunctionalLinear(torch.nn.Module):
    """A layer that is not an ``nn.Linear``: its input is seen by the dispatch-mode recorder."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, n) / n ** 0.5)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


class _Block(torch.nn.Module):
    def __init__(self, n, twice):
        super().__init__()
        self.twice = twice
        self.a, self.b, self.c = _FunctionalLinear(n), torch.nn.Linear(n, n), torch.nn.Linear(n, n)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        if self.twice:      # b's second call comes after c's only one
            h = self.b(torch.relu(self.c(h)))
        else:
            h = self.c(torch.relu(h))
        return x + h


class _Stack(torch.nn.Module):
    def __init__(self, twice, n=16):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(_Block(n, twice) for _ in range(3))
        self.head = torch.nn.Linear(n, 4)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _statistics_and_weights(monkeypatch, model, cfg, calib, example, stop):
    """Each target's input statistic (Wanda's sums of squares, SparseGPT's Hessians) and the
    pruned weights, with or without the early stop of the recording forwards."""
    _, recorded, out = _stages(monkeypatch, model, cfg, calib, example, stop)
    return recorded, _weights(out), fxprune.sparsity_report(out).calibration


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("criterion", ["activation", "sparse_gpt"])
def test_recording_forwards_stop_after_the_last_input_with_the_same_results(monkeypatch, arch, criterion):
    """With pruned propagation a recording forward's outputs are thrown away, so it stops at the
    last target's input (down_proj's / mlp.c_proj's): statistics and weights are bit-identical
    to full recording forwards, and the last layer runs only in the propagating forwards."""
    model = _llama(3) if arch == "llama" else tiny_gpt2()
    last = model.model.layers[0].mlp.down_proj if arch == "llama" else model.transformer.h[0].mlp.c_proj
    calls = []
    last.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))   # it ran
    cfg, calib = _cfg(criterion, "2:4"), _calib(3)
    stopped, w_stopped, info = _statistics_and_weights(monkeypatch, model, cfg, calib, EXAMPLE, True)
    n_stopped = len(calls)
    calls.clear()
    full, w_full, info_full = _statistics_and_weights(monkeypatch, model, cfg, calib, EXAMPLE, False)
    per_block = 7 if arch == "llama" else 4
    assert len(stopped) == len(full) == per_block * len(find_blocks(model))
    for n in full:
        assert stopped[n].dtype == full[n].dtype and torch.equal(stopped[n], full[n]), n
    for n in w_full:
        assert torch.equal(w_stopped[n], w_full[n]), n
    # block 0's last layer runs in the discovery run, then per block batch to record and to
    # propagate without the stop, only to propagate with it
    batches, blocks = info["block_batches"], len(find_blocks(model))
    assert (n_stopped, len(calls)) == (1 + batches, 1 + 2 * batches)
    assert (info["stopped_early"], info_full["stopped_early"]) == (blocks * batches, 0)
    assert info["block_forwards"] == info_full["block_forwards"] == (2 * blocks - 1) * batches


@pytest.mark.parametrize("twice", [False, True])
def test_recording_stops_only_after_every_use_of_every_layer(monkeypatch, twice):
    """Functional layers (seen by the dispatch recorder) count too, and a layer used twice per
    forward stops the recording only after its second call."""
    model = _Stack(twice)
    calib = [torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    example = (calib[0],)
    cfg = {**_cfg("activation", "1x1"), "block_batch_tokens": 0, "op_names": ["layers"]}
    stopped, w_stopped, info = _statistics_and_weights(monkeypatch, model, cfg, calib, example, True)
    full, w_full, _ = _statistics_and_weights(monkeypatch, model, cfg, calib, example, False)
    assert sorted(stopped) == sorted(full) and len(full) == 9
    for n in full:
        assert torch.equal(stopped[n], full[n]), n
    for n in w_full:
        assert torch.equal(w_stopped[n], w_full[n]), n
    assert info["stopped_early"] == 3 * 3       # every recording forward, 3 batches x 3 blocks


def test_dense_propagation_records_whole_forwards():
    model, calib = _llama(2), _calib()
    out = _prune(model, _cfg("activation", "2:4", block_propagation="dense"), calib)
    assert fxprune.sparsity_report(out).calibration["stopped_early"] == 0


def test_sparse_gpt_groups_sharing_an_input_each_get_its_hessian():
    """q_proj in one group, k/v_proj (same input) in another: the second group still finds the
    shared Hessian after the first took its factor, and gets what one group gives them (rows are
    independent under N:M: same masks, weights equal up to the BLAS row blocking)."""
    ids = token_batches(4)
    two_four = {"pattern": "2:4", "target_sparsity": 0.5}
    base = {"pruning_type": "sparse_gpt", "pruning_scope": "local"}
    split = fxprune.transform(tiny_llama(), {**base, "pruning_configs": [
        {"op_names": ["q_proj"], **two_four}, {"op_names": ["k_proj", "v_proj"], **two_four}]},
        (ids[0],), calibration=ids)
    whole = fxprune.transform(tiny_llama(), {**base, "pruning_configs": [
        {"op_names": ["q_proj", "k_proj", "v_proj"], **two_four}]}, (ids[0],), calibration=ids)
    assert fxprune.sparsity_report(split).calibration["block_sequential"] == [0, 1]
    checked = 0
    for (name, a), (_, b) in zip(split.named_parameters(), whole.named_parameters()):
        if any(k in name for k in ("q_proj", "k_proj", "v_proj")):
            assert torch.equal(a == 0, b == 0), name
            assert int((a == 0).sum()) == a.numel() // 2, name
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
            checked += 1
    assert checked == 6


def test_block_statistics_hold_no_input_alive_between_batches(monkeypatch):
    """The inputs a block's statistics have seen (to share one statistic between q/k/v) are
    remembered by weak reference: once a batch's forward is over, none of them is kept alive."""
    import fxprune.passes.sequential as seqpass
    checked = []
    real = seqpass.BlockInputStats.new_batch

    def new_batch(self, b):
        if b:
            assert self.seen and all(ref() is None for ref, _ in self.seen.values())
            checked.append(b)
        return real(self, b)
    monkeypatch.setattr(seqpass.BlockInputStats, "new_batch", new_batch)
    model = _llama(2)
    _prune(model, _cfg("sparse_gpt", "2:4", block_batch_tokens=0), _calib(3), inplace=True)
    assert checked == [1, 2, 1, 2]      # 3 block batches, 2 blocks


# ---------------------------------------------------------------------------- true sequential
def _stages(monkeypatch, model, cfg, calib, example=EXAMPLE, stop=True):
    """(block index, stage's layer names) per recording pass, the statistics of each stage's
    layers as recorded (Wanda's sums of squares, SparseGPT's Hessians), and the pruned model;
    ``stop=False`` turns off the early stop of the recording forwards."""
    import fxprune.passes.sequential as seqpass
    stages, recorded = [], {}
    real = seqpass.record_inputs

    def record(ctx, step, targets, stage=False):
        stats = real(ctx, step, targets, stage)
        stages.append((step.index, [t.name.split(".", 3)[-1] for t in stats.targets]))
        for t in stats.targets:
            recorded[t.param] = (stats.hessian(t) if t.param in stats.need_hessian else stats.sumsq(t)).clone()
        return stats
    with monkeypatch.context() as m:
        m.setattr(seqpass, "record_inputs", record)
        if not stop:
            m.setattr(seqpass.BlockInputStats, "stop_early", lambda self: None)
        out = fxprune.transform(copy.deepcopy(model), cfg, example, calibration=calib)
    return stages, recorded, out


LLAMA_STAGES = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
GPT2_STAGES = [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("criterion,pattern", [("sparse_gpt", "1x1"), ("activation", "2:4")])
def test_true_sequential_stages_follow_the_forward(monkeypatch, arch, criterion, pattern):
    """Layers sharing an input form one stage, stages in forward order; every stage's recording
    forward stops after its last input; masks keep their exact counts."""
    model = _llama(2) if arch == "llama" else tiny_gpt2()
    calib = _calib(3)
    stages, _, out = _stages(monkeypatch, model, _cfg(criterion, pattern, true_sequential=True), calib)
    expected = LLAMA_STAGES if arch == "llama" else GPT2_STAGES
    assert stages == [(i, s) for i in range(2) for s in expected]
    info = fxprune.sparsity_report(out).calibration
    batches = info["block_batches"]
    assert info["stages"] == 8
    # per block and block batch: one recording forward per stage (each stopped) and, but after
    # the last block, one propagating forward
    assert (info["block_forwards"], info["stopped_early"]) == ((8 + 1) * batches, 8 * batches)
    layers = [layer for layer in fxprune.sparsity_report(out).layers if layer.status == "pruned"]
    assert len(layers) == (14 if arch == "llama" else 8)
    assert all(layer.zeros == layer.numel // 2 for layer in layers)
    off, _, _ = _stages(monkeypatch, model, _cfg(criterion, pattern), calib)
    assert [len(s) for _, s in off] == [7 if arch == "llama" else 4] * 2   # one pass per block


def _independent_statistics(model, layer_names, calib, hessian):
    """Layers' input statistics from forwards of the whole model, computed as the block path
    does (per batch: float32 ``X^T X`` summed in float64 then averaged, or the float32 sum of
    squares)."""
    totals, counts = {}, dict.fromkeys(layer_names, 0)

    def hook(name):
        def pre(m, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            part = (x.T @ x).double() if hessian else x.pow(2).sum(dim=0)
            totals[name] = part if name not in totals else totals[name] + part
            counts[name] += x.shape[0]
        return pre
    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in layer_names]
    with torch.no_grad():
        for ids in calib:
            model(input_ids=ids)
    for h in handles:
        h.remove()
    return {n: (totals[n] / counts[n]).float() if hessian else totals[n] for n in layer_names}


@pytest.mark.parametrize("criterion", ["sparse_gpt", "activation"])
def test_true_sequential_stage_statistics_see_the_earlier_stages_pruned(monkeypatch, criterion):
    """Stage k of block i is recorded on the block whose earlier stages carry their final pruned
    weights and whose later ones are still dense, blocks 0..i-1 pruned: the same statistics as
    whole-model forwards of exactly that model (calibration batches as given, so the sums run in
    the same order), and not those of the block with its earlier stages unpruned."""
    model, calib = _llama(2), _calib(2)
    cfg = _cfg(criterion, "2:4", true_sequential=True, block_batch_tokens=0)
    stages, recorded, out = _stages(monkeypatch, model, cfg, calib)
    final, dense = _weights(out), _weights(model)
    hessian = criterion == "sparse_gpt"
    checked = differs = 0
    for k, (i, names) in enumerate(stages):
        earlier = {f"model.layers.{i}.{n}.weight" for j, s in stages[:k] if j == i for n in s}
        layers = [f"model.layers.{i}.{n}" for n in names]
        for prefix_pruned in (True, False) if earlier else (True,):
            reference = copy.deepcopy(model)
            with torch.no_grad():
                for n, p in reference.named_parameters():
                    if any(n.startswith(f"model.layers.{j}.") for j in range(i)) or (
                            prefix_pruned and n in earlier):
                        p.copy_(final[n])
            expected = _independent_statistics(reference, layers, calib, hessian)
            for layer in layers:
                got = recorded[layer + ".weight"]
                if prefix_pruned:
                    torch.testing.assert_close(got, expected[layer], rtol=1e-6, atol=1e-7)
                    checked += 1
                else:
                    differs += not torch.allclose(got, expected[layer], rtol=1e-4, atol=1e-6)
    assert checked == 14
    assert differs == 8          # o, gate, up, down of both blocks


def test_true_sequential_splits_where_a_layer_is_used_twice(monkeypatch):
    """A layer used twice keeps the layers between its uses in its stage; the others each get
    their own."""
    calib = [torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    cfg = {**_cfg("activation", "1x1"), "block_batch_tokens": 0, "op_names": ["layers"],
           "true_sequential": True}
    once, _, _ = _stages(monkeypatch, _Stack(False), cfg, calib, (calib[0],))
    twice, _, out = _stages(monkeypatch, _Stack(True), cfg, calib, (calib[0],))
    assert [s for i, s in once if i == 0] == [["a"], ["b"], ["c"]]
    assert [s for i, s in twice if i == 0] == [["a"], ["b", "c"]]
    assert all(layer.zeros == layer.numel // 2 for layer in fxprune.sparsity_report(out).layers
               if layer.status == "pruned")


def test_true_sequential_with_dense_propagation_passes_on_the_dense_block():
    """With dense propagation the first stage's recording forward runs whole (its outputs, the
    dense block's, are the next block's inputs); the later stages' forwards stop early. Block
    1's first stage (q/k/v) therefore sees what it sees without true_sequential."""
    model, calib = _llama(2), _calib(3)
    cfg = _cfg("sparse_gpt", "2:4", block_propagation="dense", block_batch_tokens=0)
    on = fxprune.transform(model, {**cfg, "true_sequential": True}, EXAMPLE, calibration=calib)
    off = fxprune.transform(model, cfg, EXAMPLE, calibration=calib)
    info = fxprune.sparsity_report(on).calibration
    assert (info["block_forwards"], info["stopped_early"], info["stages"]) == (2 * 4 * 3, 2 * 3 * 3, 8)
    a, b = _weights(on), _weights(off)
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        assert torch.equal(a[n], b[n]), n
    assert not torch.equal(a["model.layers.0.mlp.down_proj.weight"], b["model.layers.0.mlp.down_proj.weight"])


def test_true_sequential_must_be_a_bool():
    with pytest.raises(ConfigError, match="true_sequential"):
        _prune(_llama(2), _cfg("sparse_gpt", "2:4", true_sequential="yes"), _calib())


def test_true_sequential_on_the_whole_model_path_warns():
    model, calib = _llama(2), _calib()
    with pytest.warns(UserWarning, match=r"true_sequential .*pruning_configs\[0\].*block_sequential is false"):
        _prune(model, _cfg("activation", "2:4", true_sequential=True, block_sequential=False), calib)


def test_true_sequential_recording_forwards_run_only_up_to_their_stage():
    """Block 0's linear products with 3 block batches: the discovery run (7); stage q/k/v: the
    first batch runs to o_proj's pre-hook (3), the others stop at q_proj's (0: k/v share its
    input); stage o: 4 then 3 + 3; stage gate/up: 6 then 4 + 4 (up shares gate's input); stage
    down: 6 x 3; then the pruned block propagates (7 x 3)."""
    model = _llama(2)
    runs = []
    for m in model.model.layers[0].modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda *a: runs.append(1))
    cfg = _cfg("sparse_gpt", "2:4", true_sequential=True, block_batch_tokens=0)
    fxprune.transform(model, cfg, EXAMPLE, calibration=_calib(3), inplace=True)
    assert len(runs) == 7 + 3 + (4 + 3 + 3) + (6 + 4 + 4) + 6 * 3 + 7 * 3


def _block0_inputs(model, calib):
    """Every block-0 Linear's calibration inputs in the dense model, [tokens, in]."""
    xs, handles = {}, []
    for name, m in model.model.layers[0].named_modules():
        if isinstance(m, torch.nn.Linear):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: xs.setdefault(name, []).append(
                    args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for ids in calib:
            model(input_ids=ids)
    for h in handles:
        h.remove()
    return {n: torch.cat(v).double() for n, v in xs.items()}


@pytest.mark.parametrize("pattern,block_sequential", [("1x1", True), ("2:4", False)])
def test_sparse_gpt_refine_steps_keep_masks_and_lower_the_layer_error(pattern, block_sequential):
    """``sparse_gpt_refine_steps`` re-fits the kept weights once the masks are chosen: block 0's
    masks are those of plain SparseGPT (its inputs are the dense model's either way), every
    layer keeps its exact count, and each block-0 layer's error on its calibration inputs,
    ||(W' - W) X||, is lower than plain SparseGPT's."""
    model, calib = _llama(2), _calib()
    xs = _block0_inputs(model, calib)
    dense = {n: m.weight.detach().double() for n, m in model.model.layers[0].named_modules()
             if isinstance(m, torch.nn.Linear)}
    cfg = _cfg("sparse_gpt", pattern, block_sequential=block_sequential)
    plain = _prune(model, cfg, calib)
    refined = _prune(model, {**cfg, "sparse_gpt_refine_steps": 30}, calib)
    assert model.model.layers[0].self_attn.q_proj.weight.count_nonzero() == \
        model.model.layers[0].self_attn.q_proj.weight.numel()          # the caller's model untouched
    for name, m in refined.model.layers.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        w = m.weight.detach()
        if pattern == "2:4":
            assert torch.equal((w.reshape(-1, 4) == 0).sum(1), torch.full((w.numel() // 4,), 2)), name
        else:
            assert int((w == 0).sum()) == w.numel() // 2, name
        if name.startswith("0."):
            base = plain.model.layers.get_submodule(name).weight.detach()
            assert torch.equal(w == 0, base == 0), name
            x, w0 = xs[name[2:]], dense[name[2:]]
            err = lambda v: float(((v.double() - w0) @ x.T).pow(2).sum())
            assert err(w) < err(base), name
    with pytest.raises(ConfigError, match="sparse_gpt_refine_steps"):
        _prune(model, {**cfg, "sparse_gpt_refine_steps": -1}, calib)


def test_hessian_sums_and_means_by_chunks_equal_whole_tensor_operations():
    """The float64 running sum and its float32 mean, formed piece by piece (no float64 copy of
    a whole product), have the bits of the whole-tensor ``add_`` and ``div``."""
    from fxprune.passes import sequential as ps

    g = torch.Generator().manual_seed(0)
    n = 300                          # 90000 entries: not a multiple of the chunk
    assert (n * n) % ps.CONVERT_CHUNK
    parts = [torch.randn(n, n, generator=g) * 10 ** k for k in (-3, 0, 4)]
    total, whole = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    for p in parts:
        ps.add_in_chunks_(total, p)
        whole.add_(p)
    assert torch.equal(total, whole)

    class _Stats(ps.BlockInputStats):
        def __init__(self):             # only what hessian() reads
            self.stat_of = {"w": ps._InputStat()}

    stats = _Stats()
    stats.stat_of["w"].hessian, stats.stat_of["w"].count = total, 1536
    mean = stats.hessian(type("T", (), {"param": "w"})())
    assert mean.dtype == torch.float32 and torch.equal(mean, (whole / 1536).to(torch.float32))
