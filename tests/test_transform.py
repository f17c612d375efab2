"""fxprune.transform end to end on plain models (symbolic_trace and torch.export)."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from conftest import MLP, SmallCNN, refuse_aten_trace


def _zeros(t):
    return int((t == 0).sum())


def test_mlp_global_4x1_exact_count_and_caller_untouched(mlp):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    pruned = fxprune.transform(mlp, {"target_sparsity": 0.8, "pattern": "4x1"})
    for k, v in mlp.state_dict().items():  # the caller's model is bit-identical
        assert torch.equal(v, before[k])
    assert type(pruned) is MLP and pruned is not mlp
    report = fxprune.sparsity_report(pruned)
    selected = [pruned.layers[0].weight, pruned.layers[1].weight]
    total = sum(w.numel() for w in selected)
    assert sum(_zeros(w) for w in selected) == int(0.8 * total) // 4 * 4
    assert _zeros(pruned.layers[2].weight) == 0  # the classifier is excluded
    assert report.layer("layers.2").status.startswith("excluded: last linear")
    assert [r.status for r in report.layers[:2]] == ["pruned", "pruned"]
    assert report.sparsity == pytest.approx(sum(_zeros(w) for w in selected) / total)


def test_inplace_prunes_the_callers_model(mlp):
    out = fxprune.transform(mlp, {"target_sparsity": 0.5, "pattern": "1x1"}, inplace=True)
    assert out is mlp and _zeros(mlp.layers[0].weight) > 0


def test_the_heap_is_frozen_for_the_collector_while_the_passes_run_and_unfrozen_after(mlp):
    import gc
    seen = []
    progress = lambda stage, done, total: seen.append(gc.get_freeze_count())  # noqa: E731
    assert gc.get_freeze_count() == 0
    fxprune.transform(mlp, {"target_sparsity": 0.5, "pattern": "1x1"}, progress=progress)
    assert seen and min(seen) > 0            # the objects that existed before are out of its walks
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    gc.freeze()                              # a caller that froze objects itself is left alone
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 1000                 # so that a reset (0) or a second freeze would show
        fxprune.transform(mlp, {"target_sparsity": 0.5, "pattern": "1x1"})
        # not unfrozen (0) nor frozen again (every object made since: thousands more); a frozen
        # object that dies meanwhile leaves the permanent generation, so the count may drop by a few
        assert frozen - 100 <= gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()


def test_parameters_keep_identity_dtype_and_requires_grad(mlp):
    pruned = fxprune.transform(mlp, {"target_sparsity": 0.5, "pattern": "1x1"}, inplace=True)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in pruned.parameters())


def test_exclude_last_linear_can_be_turned_off(mlp):
    pruned = fxprune.transform(mlp, {"target_sparsity": 0.5, "pattern": "1x1",
                                     "exclude_last_linear": False, "pruning_scope": "local"})
    assert _zeros(pruned.layers[2].weight) == 320


def test_cnn_channel_pruning_zeroes_bias_and_batchnorm(cnn):
    x = torch.randn(2, 3, 8, 8)
    pruned = fxprune.transform(cnn, {"target_sparsity": 0.5, "pattern": "1xchannel",
                                     "pruning_scope": "local", "op_names": ["conv1"]})
    dead = (pruned.conv1.weight.flatten(1) == 0).all(dim=1)
    assert int(dead.sum()) == 8
    assert (pruned.conv1.bias[dead] == 0).all() and (pruned.bn1.weight[dead] == 0).all()
    assert (pruned.bn1.bias[dead] == 0).all() and (pruned.bn1.running_mean[dead] == 0).all()
    # the pruned channels output exactly zero after BatchNorm (not a BN constant)
    act = pruned.bn1(pruned.conv1(x))
    assert (act[:, dead] == 0).all() and (act[:, ~dead] != 0).any()


def test_the_three_captures_prune_alike(cnn, monkeypatch):
    """symbolic_trace (no inputs), the recorded ATen trace and torch.export (the trace refused)."""
    config = {"target_sparsity": 0.6, "pattern": "4x1"}
    x = torch.randn(1, 3, 8, 8)
    a = fxprune.transform(cnn, config)
    b = fxprune.transform(cnn, config, example_inputs=(x,))
    refuse_aten_trace(monkeypatch)
    c = fxprune.transform(cnn, config, example_inputs=(x,))
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r), name
    ra, rb, rc = (fxprune.sparsity_report(m) for m in (a, b, c))
    assert (ra.capture, rb.capture, rc.capture) == ("symbolic_trace", "aten_trace", "torch.export")
    assert [r.status for r in ra.layers] == [r.status for r in rb.layers] == [r.status for r in rc.layers]


class Functional(nn.Module):
    """Weights used through F.linear, x @ W, addmm (HF Conv1D style) and F.conv1d / F.conv3d."""

    def __init__(self):
        super().__init__()
        self.w_lin = nn.Parameter(torch.randn(32, 16))
        self.w_mm = nn.Parameter(torch.randn(32, 32))      # [in, out]
        self.w_addmm = nn.Parameter(torch.randn(32, 24))   # [in, out]
        self.b_addmm = nn.Parameter(torch.randn(24))
        self.w_c1 = nn.Parameter(torch.randn(8, 4, 3))
        self.w_c3 = nn.Parameter(torch.randn(8, 4, 1, 2, 2))
        self.head = nn.Linear(24, 2)

    def forward(self, x, s, v):
        h = F.linear(x, self.w_lin)
        h = h @ self.w_mm
        h = torch.addmm(self.b_addmm, h, self.w_addmm)
        c = F.conv1d(s, self.w_c1).mean() + F.conv3d(v, self.w_c3).mean()
        return self.head(h) + c


@pytest.mark.parametrize("use_export", [False, True])
def test_functional_weights_are_discovered_with_their_layout(use_export):
    model = Functional()
    inputs = (torch.randn(2, 16), torch.randn(2, 4, 10), torch.randn(1, 4, 3, 4, 4))
    pruned = fxprune.transform(model, {"target_sparsity": 0.5, "pattern": "4x1", "pruning_scope": "local"},
                               example_inputs=inputs if use_export else None)
    report = fxprune.sparsity_report(pruned)
    by_name = {r.name: r for r in report.layers}
    assert by_name["w_mm"].view_shape == [32, 32] and by_name["w_addmm"].view_shape == [24, 32]
    assert by_name["w_c1"].view_shape == [8, 12] and by_name["w_c3"].view_shape == [8, 16]
    assert by_name["w_lin"].module_type == "Linear" and by_name["w_c3"].module_type == "Conv3d"
    # 4x1 on the [out, in] view of an [in, out] weight: blocks of 4 along dim 1 of the parameter
    w = pruned.w_addmm.detach()
    blocks = (w == 0).reshape(32, 6, 4)
    assert torch.equal(blocks.all(-1), blocks.any(-1)) and _zeros(w) == 32 * 24 // 2
    assert by_name["head"].status.startswith("excluded")


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16, bias=False)
        self.b = nn.Linear(16, 16, bias=False)
        self.b.weight = self.a.weight  # tied
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.b(torch.relu(self.a(x))))


def test_tied_weights_are_one_target_pruned_once():
    pruned = fxprune.transform(Tied(), {"target_sparsity": 0.5, "pattern": "1x1"})
    report = fxprune.sparsity_report(pruned)
    assert [r.param for r in report.layers] == ["a.weight", "out.weight"]
    assert pruned.a.weight is pruned.b.weight and _zeros(pruned.a.weight) == 128


def test_already_zero_weights_stay_pruned_and_are_pruned_first(mlp):
    with torch.no_grad():
        mlp.layers[0].weight[:8] = 0  # 8 whole rows = 64 4x1 blocks of zeros
    pruned = fxprune.transform(mlp, {"target_sparsity": 0.3, "pattern": "4x1", "pruning_scope": "local"})
    w = pruned.layers[0].weight
    assert (w[:8] == 0).all()
    assert _zeros(w) == int(0.3 * w.numel()) // 4 * 4


def test_ties_are_broken_by_lowest_index():
    model = MLP((8, 8, 2))
    with torch.no_grad():
        model.layers[0].weight.fill_(1.0)  # every score ties
    pruned = fxprune.transform(model, {"target_sparsity": 0.25, "pattern": "1x1"})
    w = pruned.layers[0].weight.flatten()
    assert (w[:16] == 0).all() and (w[16:] == 1).all()
    again = fxprune.transform(model, {"target_sparsity": 0.25, "pattern": "1x1"})
    assert torch.equal(again.layers[0].weight, pruned.layers[0].weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(dtype):
    model = MLP().to(dtype)
    ref = MLP()
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    pruned = fxprune.transform(model, {"target_sparsity": 0.5, "pattern": "4x1"})
    pruned_ref = fxprune.transform(ref, {"target_sparsity": 0.5, "pattern": "4x1"})
    for a, b in zip(pruned.parameters(), pruned_ref.parameters()):
        assert a.dtype == dtype
        assert torch.equal(a == 0, b == 0)  # masks computed in float32: the same as in float32


def test_groups_inherit_global_keys_and_first_group_wins(mlp):
    config = {"target_sparsity": 0.5, "pattern": "1x1", "pruning_scope": "local",
              "pruning_configs": [{"op_names": ["layers.0"], "pattern": "4x1"},
                                  {"op_names": ["layers\\.[01]"], "target_sparsity": 0.25}]}
    report = fxprune.sparsity_report(fxprune.transform(mlp, config))
    first, second = report.layer("layers.0"), report.layer("layers.1")
    assert (first.pattern, first.requested_sparsity, first.group) == ("4x1", 0.5, 0)
    assert (second.pattern, second.requested_sparsity, second.group) == ("1x1", 0.25, 1)
    assert second.zeros == 64 * 64 // 4


def test_excluded_op_names_and_op_types(cnn):
    report = fxprune.sparsity_report(fxprune.transform(
        cnn, {"target_sparsity": 0.5, "pattern": "1x1", "excluded_op_names": ["conv2"],
              "pruning_op_types": ["Conv"]}))
    assert report.layer("conv2").status == "excluded: excluded_op_names 'conv2'"
    assert report.layer("conv1").status == "pruned" and report.layer("conv3").status == "pruned"


def test_skipped_layer_is_reported_left_dense_and_out_of_the_ranking(cnn):
    pruned = fxprune.transform(cnn, {"target_sparsity": 0.5, "pattern": "2:4"})
    report = fxprune.sparsity_report(pruned)
    skipped = report.layer("conv1")  # 3 x 3 x 3 = 27 columns
    assert skipped.status == "skipped: 27 columns are not divisible by M=4"
    assert _zeros(pruned.conv1.weight) == 0
    for name in ("conv2", "conv3"):
        w = getattr(pruned, name).weight
        assert report.layer(name).zeros == w.numel() // 2


def test_report_serializes_and_prints(mlp, tmp_path):
    pruned = fxprune.transform(mlp, {"target_sparsity": 0.8, "pattern": "4x1"})
    report = fxprune.sparsity_report(pruned)
    path = tmp_path / "sparsity.json"
    report.to_json(path)
    data = json.loads(path.read_text())
    assert data["versions"]["fxprune"] == fxprune.__version__ and data["versions"]["torch"] == torch.__version__
    assert data["config"]["pattern"] == "4x1" and data["totals"]["pruned_layers"] == 2
    back = fxprune.SparsityReport.from_json(path)
    assert back.layers == report.layers
    text = str(report)
    assert "layers.0" in text and "pruned 2/3 layers" in text
    first = report.layers[0]
    assert (first.weight_shape, first.view_shape, first.block_shape, first.scope, first.criterion) == \
        ([64, 32], [64, 32], "4x1", "global", "magnitude")


def test_capture_annotates_nodes_without_touching_the_model(cnn):
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    gm = fxprune.capture(cnn, config={"pattern": "1xchannel"})
    annotated = {n.meta["fxprune"].param: n.meta["fxprune"] for n in gm.graph.nodes if "fxprune" in n.meta}
    assert list(annotated) == ["conv1.weight", "conv2.weight", "conv3.weight", "fc.weight"]
    assert annotated["conv2.weight"].geometry.groups == 4
    assert annotated["conv1.weight"].layout.block_shape == "1x27"
    assert annotated["conv1.weight"].channel_followers == ["bn1.weight", "bn1.bias", "bn1.running_mean"]
    for k, v in cnn.state_dict().items():
        assert torch.equal(v, before[k])


def test_custom_pattern_from_the_registry_is_usable_from_a_config(mlp):
    @fxprune.register_pattern("rows2")
    class EveryOtherRowBlock(fxprune.BasePattern):
        """2 rows x all columns, i.e. '2xchannel', written by a user."""

        def block_layout(self, geom):
            rows, cols = geom.view_shape
            if rows % 2:
                return "odd rows"
            return fxprune.BlockLayout((rows // 2, 2, 1, cols), (1, 3), 2 * cols, f"2x{cols}")

    try:
        pruned = fxprune.transform(mlp, {"target_sparsity": 0.5, "pattern": "rows2", "pruning_scope": "local"})
        w = pruned.layers[1].weight
        dead_rows = (w == 0).all(dim=1).reshape(-1, 2)
        assert torch.equal(dead_rows.all(1), dead_rows.any(1)) and int(dead_rows.all(1).sum()) == 16
        assert fxprune.sparsity_report(pruned).layer("layers.1").pattern == "rows2"
    finally:
        fxprune.PATTERNS.pop("rows2")


class SharedConvTwoNorms(nn.Module):
    """One conv applied twice, each use into its own BatchNorm; plus a use beside a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x, y):
        a = self.bn_a(self.conv(x))
        c = self.conv(y)
        return self.head((a + self.bn_b(c) + c).mean((2, 3)))


@pytest.mark.parametrize("use_export", [False, True])
def test_channel_pruning_zeroes_every_batchnorm_the_channel_feeds(use_export):
    model = SharedConvTwoNorms().eval()
    with torch.no_grad():
        for bn in (model.bn_a, model.bn_b):
            bn.running_mean.uniform_(-1, 1)
            bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 6, 6)
    pruned = fxprune.transform(model, {"target_sparsity": 0.5, "pattern": "1xchannel", "pruning_scope": "local"},
                               example_inputs=(x, x) if use_export else None)
    dead = (pruned.conv.weight.flatten(1) == 0).all(dim=1)
    assert int(dead.sum()) == 4
    for bn in (pruned.bn_a, pruned.bn_b):
        assert (bn(pruned.conv(x))[:, dead] == 0).all()


def test_weight_used_in_two_layouts_is_skipped():
    class TwoLayouts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))
            self.a = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.a(F.linear(x, self.w) + x @ self.w))

    pruned = fxprune.transform(TwoLayouts(), {"target_sparsity": 0.5, "pattern": "1xchannel"})
    report = fxprune.sparsity_report(pruned)
    assert report.layer("w").status == ("skipped: used as a weight in two layouts (out_in and in_out), "
                                        "so no block layout fits both")
    assert _zeros(pruned.w) == 0 and report.layer("a").zeros == 32


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_empty_weight_is_skipped():
    model = nn.Sequential(nn.Linear(4, 0), nn.Linear(0, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    report = fxprune.sparsity_report(fxprune.transform(model, {"target_sparsity": 0.5, "pattern": "1x1"}))
    assert [r.status for r in report.layers[:3]] == ["skipped: the weight is empty"] * 2 + ["pruned"]
    assert report.layer("2").zeros == 32


def test_unreachable_target_warns_with_what_was_achieved():
    model = MLP((16, 8, 8, 2))
    with pytest.warns(UserWarning, match=r"pruning_configs\[0\] \(pattern '1x1', 2 layers\): achieved sparsity "
                      r"0\.5000, target_sparsity 0\.9: max_sparsity_ratio_per_op 0\.5 lets each layer prune at "
                      r"most that fraction in whole blocks \(96 of 192 weights\)"):
        fxprune.transform(model, {"target_sparsity": 0.9, "pattern": "1x1", "max_sparsity_ratio_per_op": 0.5})
    with pytest.warns(UserWarning, match=r"achieved sparsity 0\.5000, target_sparsity 0\.1: "
                      r"min_sparsity_ratio_per_op 0\.5 makes every layer prune at least that fraction"):
        fxprune.transform(model, {"target_sparsity": 0.1, "pattern": "1x1", "min_sparsity_ratio_per_op": 0.5,
                                  "pruning_scope": "local"})
    with pytest.warns(UserWarning, match=r"achieved sparsity 0\.0000, target_sparsity 0\.01: the target rounds "
                      r"down to zero whole blocks"):
        fxprune.transform(model, {"target_sparsity": 0.01, "pattern": "4x1"})


def test_reachable_target_does_not_warn(mlp, recwarn):
    fxprune.transform(mlp, {"target_sparsity": 0.9, "pattern": "4x1"})
    fxprune.transform(mlp, {"target_sparsity": 0.0, "pattern": "4x1"})
    assert [str(w.message) for w in recwarn] == []


def test_bad_masks_from_a_user_pattern_leave_an_inplace_model_untouched():
    @fxprune.register_pattern("qa_halfmask")
    class HalfMask(fxprune.BasePattern):
        def block_layout(self, geom):
            return fxprune.BlockLayout(tuple(geom.view_shape), (), 1, "1x1")

        def get_masks(self, scores, layouts):  # a float mask would scale the weights by 0.5
            return {name: torch.full(s.shape, 0.5) for name, s in scores.items()}

    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = {"pruning_configs": [{"op_names": ["layers.0"], "pattern": "1x1"},
                                  {"op_names": ["layers.1"], "pattern": "qa_halfmask"}]}
    try:
        with pytest.raises(fxprune.FxPruneError, match=r"pattern 'qa_halfmask' \(HalfMask.get_masks\) gave Tensor "
                           r"torch.float32 \(64, 64\) for layers.1.weight; expected a bool keep-mask of the 2-D "
                           r"view's shape \(64, 64\)"):
            fxprune.transform(model, config, inplace=True)
    finally:
        fxprune.PATTERNS.pop("qa_halfmask")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_user_pattern_overriding_get_masks_without_consume(mlp):
    @fxprune.register_pattern("qa_firstrow")
    class FirstRow(fxprune.BasePattern):
        def block_layout(self, geom):
            return fxprune.BlockLayout(tuple(geom.view_shape), (), 1, "1x1")

        def get_masks(self, scores, layouts):  # the signature before `consume` existed
            # plain tensors, not LazyScores: tensor methods work
            masks = {name: torch.ones_like(s.abs(), dtype=torch.bool) for name, s in scores.items()}
            for mask in masks.values():
                mask[0] = False
            return masks

    try:
        pruned = fxprune.transform(mlp, {"pattern": "qa_firstrow"})
    finally:
        fxprune.PATTERNS.pop("qa_firstrow")
    assert [_zeros(layer.weight) for layer in pruned.layers] == [32, 64, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", [{"pattern": "4x1"}, {"pattern": "1x1", "min_sparsity_ratio_per_op": 0.1},
                                    {"pattern": "2:4", "target_sparsity": 0.5},
                                    {"pattern": "2:4", "target_sparsity": 0.3},
                                    {"pattern": "1xchannel"}, {"pattern": "channelx1", "pruning_scope": "local"}])
def test_cuda_model_is_pruned_on_its_device_like_on_cpu(mlp, config):
    config = {"target_sparsity": 0.6, **config}
    on_cpu = fxprune.transform(mlp, config)
    on_gpu = fxprune.transform(mlp.cuda(), config)
    for a, b in zip(on_cpu.parameters(), on_gpu.parameters()):
        assert b.is_cuda and torch.equal(a == 0, (b == 0).cpu())


def test_symbolic_trace_warns_about_weights_hidden_in_leaf_modules():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.proj = nn.Linear(16, 16)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            return self.head(self.proj(self.enc(x)))

    model, config = Encoder().eval(), {"target_sparsity": 0.5, "pattern": "4x1"}
    with pytest.warns(UserWarning, match=r"torch.fx.symbolic_trace keeps enc \(TransformerEncoderLayer\) as one "
                      r"opaque call: the linear/conv weights inside are not pruned; pass example_inputs"):
        traced = fxprune.transform(model, config)
    assert [r.name for r in fxprune.sparsity_report(traced).layers] == ["proj", "head"]
    exported = fxprune.transform(model, config, example_inputs=(torch.randn(2, 5, 16),))
    assert [r.name for r in fxprune.sparsity_report(exported).layers] == [
        "enc.self_attn.in_proj_weight", "enc.self_attn.out_proj", "enc.linear1", "enc.linear2", "proj", "head"]


@pytest.mark.parametrize("use_export", [False, True])
def test_transposed_weight_arguments_are_discovered_with_the_flipped_layout(use_export):
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4))   # [in, out], used as F.linear(x, w.t())
            self.v = nn.Parameter(torch.randn(6, 4))   # [out, in], used as addmm(b, x, v.t())
            self.b = nn.Parameter(torch.randn(6))
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(torch.addmm(self.b, F.linear(x, self.w.t()), self.v.t()))

    pruned = fxprune.transform(Transposed(), {"target_sparsity": 0.5, "pattern": "1xchannel", "pruning_scope": "local"},
                               example_inputs=(torch.randn(2, 8),) if use_export else None)
    report = fxprune.sparsity_report(pruned)
    assert [(r.name, r.view_shape, r.status) for r in report.layers[:2]] == [
        ("w", [4, 8], "pruned"), ("v", [6, 4], "pruned")]
    assert int((pruned.w == 0).all(dim=0).sum()) == 2       # whole output columns of an [in, out] weight
    dead = (pruned.v == 0).all(dim=1)
    assert int(dead.sum()) == 3 and (pruned.b[dead] == 0).all()


@pytest.mark.parametrize("pattern", ["1x1", "4x1", "2:4", "1xchannel"])
def test_recomputed_magnitude_scores_give_the_masks_of_stored_scores(cnn, monkeypatch, pattern):
    from fxprune.criteria import MagnitudeCriterion

    config = {"target_sparsity": 0.5, "pattern": pattern, "min_sparsity_ratio_per_op": 0.1}
    lazy = fxprune.transform(cnn, config)
    monkeypatch.setattr(MagnitudeCriterion, "lazy_scores", lambda self, *a: None)
    stored = fxprune.transform(cnn, config)
    for (name, p), (_, q) in zip(lazy.named_parameters(), stored.named_parameters()):
        assert torch.equal(p, q), name


def test_calibration_no_group_uses_is_warned_about(mlp):
    x = torch.randn(4, mlp.layers[0].in_features)
    cfg = {"target_sparsity": 0.5, "pattern": "1x1"}
    with pytest.warns(UserWarning, match=r"calibration is not used: .*pruning_type: magnitude"):
        plain = fxprune.transform(mlp, cfg, (x,), calibration=[(x,)])
    with pytest.warns(UserWarning, match=r"loss_fn is not used"):
        fxprune.transform(mlp, cfg, (x,), loss_fn=lambda m, b: m(*b).sum())
    # the warning changes nothing: the same masks as without calibration
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 fxprune.transform(mlp, cfg, (x,)).state_dict().values()))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fxprune.transform(mlp, {**cfg, "pruning_type": "activation"}, (x,), calibration=[(x,)])


def test_report_write_that_fails_midway_leaves_the_old_file(mlp, tmp_path, monkeypatch):
    report = fxprune.sparsity_report(fxprune.transform(mlp, {"target_sparsity": 0.5, "pattern": "1x1"}))
    path = tmp_path / "sparsity.json"
    path.write_text("old report\n")
    real_write = type(path).write_text

    def half_then_disk_full(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(path), "write_text", half_then_disk_full)
    with pytest.raises(fxprune.FxPruneError, match="cannot write the report to .*sparsity.json.*No space"):
        report.to_json(path)
    monkeypatch.undo()
    assert path.read_text() == "old report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sparsity.json"]   # no staging leftovers
    report.to_json(path)
    assert fxprune.SparsityReport.from_json(path).layers == report.layers


@pytest.mark.parametrize("how", ["compact", "activation"])
def test_each_modules_training_flag_is_kept(how):
    """A model in training with one submodule frozen in eval (a common fine-tuning setup) comes
    back so: the passes run it in eval mode and give every module its own flag back."""
    model = SmallCNN().train()
    model.bn1.eval()
    x = torch.randn(2, 3, 8, 8)
    if how == "compact":
        out = fxprune.transform(model, {"pattern": "1xchannel", "target_sparsity": 0.25,
                                        "op_names": ["conv3"]}, (x,), compact=True, inplace=True)
    else:
        out = fxprune.transform(model, {"pruning_type": "activation", "target_sparsity": 0.5},
                                (x,), calibration=[(x,)], inplace=True)
    assert out is model and model.training and model.conv1.training and model.fc.training
    assert not model.bn1.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_count_zeros_counts_signed_zeros_in_pieces_and_views(monkeypatch, dtype):
    from fxprune import report

    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 29, generator=g).to(dtype)
    w[torch.rand(37, 29, generator=g) < 0.4] = 0.0
    w[torch.rand(37, 29, generator=g) < 0.1] = -0.0
    w[0, :3] = float("nan")
    expected = sum(1 for x in w.flatten().tolist() if x == 0.0)
    assert expected > 400
    assert report.count_zeros(w) == expected
    assert report.count_zeros(torch.nn.Parameter(w.clone())) == expected   # a parameter (requires grad)
    assert report.count_zeros(w.neg()) == expected
    assert report.count_zeros(w._neg_view()) == expected  # lazy negation: numpy cannot view it
    assert report.count_zeros(w.t()) == expected          # a transposed (HF Conv1D) view
    assert report.count_zeros(w[0]) == sum(1 for x in w[0].tolist() if x == 0.0)
    assert report.count_zeros(torch.tensor(0.0)) == 1
    monkeypatch.setattr(report, "ZERO_COUNT_PIECE", 50)   # pieces of one row (29 entries) and of
    assert report.count_zeros(w) == expected               # one row (37 entries): every row counted
    assert report.count_zeros(w.t()) == expected
    monkeypatch.setattr(report, "ZERO_COUNT_PIECE", 100)  # pieces of 3 rows, the last one partial
    assert report.count_zeros(w) == expected


def test_count_zeros_of_integer_and_bool_tensors():
    from fxprune import report

    g = torch.Generator().manual_seed(1)
    for t in (torch.randint(-2, 3, (41, 13), generator=g, dtype=torch.int8),
              torch.randint(0, 2, (41, 13), generator=g).bool()):
        assert report.count_zeros(t) == sum(1 for x in t.flatten().tolist() if x == 0)
