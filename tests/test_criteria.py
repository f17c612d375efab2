"""Data-aware criteria (activation / sparse_gpt / gradient / snip / snip_momentum) against
independent computations: hand-written Wanda norms, a float64 OBS with explicit inverses, autograd
gradients, and stable-sort masks."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from conftest import MLP
from fxprune.criteria import CRITERIA, SparseGPTCriterion
from fxprune.criteria.features import conv_patches
from fxprune.errors import ConfigError, FxPruneError
from fxprune.geometry import WeightGeometry, to_view_2d
from fxprune.passes import CAPTURE_PASSES, AttachPass, PassManager, PruneContext
from fxprune.config import PruningConfig


def _prepared(model, config, calibration=None, loss_fn=None, example_inputs=None):
    """Capture + attach, then the group's criterion prepared (nothing rewritten)."""
    ctx = PruneContext(model=model, config=PruningConfig.from_any(config), example_inputs=example_inputs)
    ctx.calibration, ctx.loss_fn = calibration, loss_fn
    PassManager([p() for p in CAPTURE_PASSES] + [AttachPass()]).run(ctx)
    group = ctx.groups[0]
    crit = CRITERIA[group.pruning_type](group)
    crit.prepare(ctx)
    return ctx, crit


def _local_keep(scores, k):
    """Keep-mask pruning the k lowest scores (ties: lowest flat index), via a stable sort."""
    order = torch.sort(scores.flatten(), stable=True).indices
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    return keep.reshape(scores.shape)


def _nm_keep(scores, n, m):
    groups = scores.reshape(-1, m)
    idx = torch.sort(groups, dim=1, stable=True).indices[:, :n]
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(1, idx, False)
    return keep.reshape(scores.shape)


def _mlp_inputs(mlp, x):
    """Inputs of each linear layer of the conftest MLP, by hand."""
    ins = []
    for i, layer in enumerate(mlp.layers):
        ins.append(x)
        x = layer(x)
        if i < len(mlp.layers) - 1:
            x = torch.relu(x)
    return ins


# ---------------------------------------------------------------------------------- activation
@pytest.mark.parametrize("scope", ["local", "global"])
def test_activation_is_wanda_by_hand(mlp, scope):
    calib = [torch.randn(8, 32), torch.randn(5, 32), torch.randn(3, 32)]
    cfg = {"pruning_type": "activation", "pattern": "1x1", "target_sparsity": 0.6, "pruning_scope": scope}
    pruned = fxprune.transform(mlp, cfg, calibration=calib)
    with torch.no_grad():
        per_batch = [_mlp_inputs(mlp, x) for x in calib]
        scores = []
        for i in range(2):  # the classifier (layers.2) is excluded
            x = torch.cat([b[i] for b in per_batch])
            norm = x.pow(2).sum(0).sqrt()                   # L2 norm of each input feature
            scores.append(mlp.layers[i].weight.abs() * norm)
    if scope == "local":
        keeps = [_local_keep(s, math.floor(0.6 * s.numel())) for s in scores]
    else:
        flat = _local_keep(torch.cat([s.flatten() for s in scores]), math.floor(0.6 * sum(s.numel() for s in scores)))
        keeps = list(flat.split([s.numel() for s in scores]))
        keeps = [k.reshape(s.shape) for k, s in zip(keeps, scores)]
    for i, keep in enumerate(keeps):
        assert torch.equal(pruned.layers[i].weight != 0, keep)
        assert torch.equal(pruned.layers[i].weight[keep], mlp.layers[i].weight[keep])  # kept untouched


def test_activation_conv_channel_norm_broadcast_over_kernel_positions():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 3))
    calib = [torch.randn(2, 4, 5, 5), torch.randn(3, 4, 5, 5)]
    ctx, crit = _prepared(model, {"pruning_type": "activation", "pattern": "1x1"}, calib)
    x = torch.cat(calib)
    norm = x.pow(2).sum(dim=(0, 2, 3)).sqrt()                 # per input channel, over pixels
    w = model[0].weight                                       # [6, 2, 3, 3]
    by_hand = torch.empty_like(w)
    for o in range(6):
        g = o // 3                                            # 3 output channels per group
        for c in range(2):
            by_hand[o, c] = w[o, c].abs() * norm[g * 2 + c]
    t = ctx.targets["0.weight"]
    got = crit.view_scores("0.weight", to_view_2d(w.detach(), t.geometry))
    assert got.dtype == torch.float32
    assert torch.allclose(got, to_view_2d(by_hand.detach(), t.geometry), rtol=1e-6, atol=0)


class _Functional(nn.Module):
    """A weight used through F.linear and a tied one through ``x @ W.t()`` twice."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 8))
        self.w2 = nn.Parameter(torch.randn(16, 16))
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        h = torch.relu(F.linear(x, self.w1))
        h2 = torch.tanh(h @ self.w2.t())
        return self.head(h2 @ self.w2.t())


def test_activation_functional_and_reused_weights():
    model = _Functional()
    calib = [torch.randn(4, 8), torch.randn(6, 8)]
    ctx, crit = _prepared(model, {"pruning_type": "activation", "pattern": "1x1"}, calib)
    with torch.no_grad():
        x = torch.cat(calib)
        h = torch.relu(F.linear(x, model.w1))
        h2 = torch.tanh(h @ model.w2.t())
        n1 = x.pow(2).sum(0).sqrt()
        n2 = (h.pow(2).sum(0) + h2.pow(2).sum(0)).sqrt()     # both uses of w2
    assert torch.allclose(crit.view_scores("w1", model.w1.detach()), model.w1.abs() * n1, rtol=1e-6)
    assert torch.allclose(crit.view_scores("w2", model.w2.detach()), model.w2.abs() * n2, rtol=1e-6)


# ---------------------------------------------------------------------------------- sparse_gpt
def _obs_reference(W, H, pruned, percdamp=0.01):
    """OBS in float64 with explicit inverses of the remaining columns' Hessian, row by row."""
    W, H = W.double().clone(), H.double().clone()
    cols = H.shape[0]
    H += percdamp * H.diagonal().mean() * torch.eye(cols, dtype=H.dtype)
    inv = [torch.linalg.inv(H[j:, j:]) for j in range(cols)]
    for r in range(W.shape[0]):
        for j in range(cols):
            if pruned[r, j]:
                W[r, j:] -= W[r, j] / inv[j][0, 0] * inv[j][0, :]
                W[r, j] = 0.0
    saliency = torch.stack([inv[j][0, 0] for j in range(cols)])
    return W, saliency


class _TwoLinear(nn.Module):
    def __init__(self, d_in=16, d_hidden=12):
        super().__init__()
        self.fc = nn.Linear(d_in, d_hidden)
        self.out = nn.Linear(d_hidden, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)))


@pytest.mark.parametrize("pattern,target", [("1x1", 0.5), ("2:4", 0.5), ("1x1", 0.3)])
def test_sparse_gpt_matches_float64_obs_reference(pattern, target):
    torch.manual_seed(2)
    model = _TwoLinear()
    calib = [torch.randn(40, 16), torch.randn(24, 16)]
    cfg = {"pruning_type": "sparse_gpt", "pattern": pattern, "target_sparsity": target, "pruning_scope": "local"}
    pruned = fxprune.transform(model, cfg, calibration=calib)
    X = torch.cat(calib).double()
    H = X.T @ X / X.shape[0]
    W = model.fc.weight.detach()
    _, saliency = _obs_reference(W, H, torch.zeros_like(W, dtype=torch.bool))
    scores = (W.double() ** 2 / saliency).float()          # w^2 / [H_{j:,j:}^-1]_00
    keep = _nm_keep(scores, 2, 4) if pattern == "2:4" else _local_keep(scores, math.floor(target * W.numel()))
    expected, _ = _obs_reference(W, H, ~keep)
    got = pruned.fc.weight.detach()
    assert torch.equal(got != 0, keep)                    # the pattern's mask, exact count
    assert int((got == 0).sum()) == W.numel() - int(keep.sum())
    assert torch.allclose(got.double(), expected, atol=2e-5, rtol=1e-4)
    assert torch.equal(pruned.out.weight, model.out.weight)  # the classifier is left alone
    # The update compensates: the layer's output on the calibration data is closer than masking alone.
    def err(w):
        return float((X.float() @ (w - W).T).pow(2).sum())
    assert err(got) < err(W * keep)


def test_sparse_gpt_grouped_conv_exact_and_better_than_masking():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1),
                          nn.Flatten(), nn.Linear(8 * 16, 2))
    calib = [torch.randn(8, 4, 4, 4) for _ in range(3)]
    cfg = {"pruning_type": "sparse_gpt", "pattern": "4x1", "target_sparsity": 0.5}
    pruned = fxprune.transform(model, cfg, calibration=calib)
    report = fxprune.sparsity_report(pruned)
    total = sum(model[i].weight.numel() for i in (0, 2))
    assert sum(r.zeros for r in report.pruned_layers) == math.floor(0.5 * total) // 4 * 4
    x = torch.cat(calib)
    w0, new0 = model[0].weight.detach(), pruned[0].weight.detach()
    ref = F.conv2d(x, w0, None, 1, 1, 1, 2)
    masked = F.conv2d(x, w0 * (new0 != 0), None, 1, 1, 1, 2)
    updated = F.conv2d(x, new0, None, 1, 1, 1, 2)
    assert (updated - ref).pow(2).sum() < (masked - ref).pow(2).sum()


def test_sparse_gpt_memory_chunks_give_the_same_result(monkeypatch):
    torch.manual_seed(4)
    model = MLP().eval()
    calib = (torch.randn(16, 32) for _ in range(3))         # a generator: kept as a list
    calib = list(calib)
    cfg = {"pruning_type": "sparse_gpt", "pattern": "1x1", "target_sparsity": 0.5}
    one = fxprune.transform(model, cfg, calibration=calib)
    monkeypatch.setattr(SparseGPTCriterion, "max_hessian_bytes", 1)   # one layer per pass
    chunked = fxprune.transform(model, cfg, calibration=iter(calib))
    for a, b in zip(one.parameters(), chunked.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- gradients
def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("pruning_type", ["gradient", "snip", "snip_momentum"])
def test_gradient_criteria_by_hand(mlp, pruning_type):
    calib = [(torch.randn(8, 32), torch.randint(0, 10, (8,))) for _ in range(3)]
    for p in mlp.parameters():
        p.requires_grad_(False)                              # restored as it was afterwards
    ctx, crit = _prepared(mlp, {"pruning_type": pruning_type}, calib, loss_fn=_ce)
    assert all(not p.requires_grad and p.grad is None for p in mlp.parameters())
    ref = copy.deepcopy(mlp).requires_grad_(True)
    names = ["layers.0.weight", "layers.1.weight"]
    grads = []
    for batch in calib:
        ref.zero_grad()
        _ce(ref, batch).backward()
        grads.append({n: ref.get_parameter(n).grad.clone() for n in names})
    for n in names:
        w = ref.get_parameter(n).detach()
        total = sum(g[n] for g in grads)
        if pruning_type == "gradient":
            expected = total.abs()
        elif pruning_type == "snip":
            expected = (w * total).abs()
        else:
            expected = torch.zeros_like(w)
            for g in grads:
                expected = 0.9 * expected + (w * g[n]).abs()
        got = crit.view_scores(n, w)
        assert got.dtype == torch.float32 and bool((got >= 0).all())
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_snip_global_4x1_exact_count(cnn):
    calib = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(2)]
    pruned = fxprune.transform(cnn, {"pruning_type": "snip_momentum", "target_sparsity": 0.6},
                               calibration=calib, loss_fn=_ce)
    r = fxprune.sparsity_report(pruned)
    total = sum(x.numel for x in r.pruned_layers)
    assert sum(x.zeros for x in r.pruned_layers) == math.floor(0.6 * total) // 4 * 4


# ---------------------------------------------------------------------------------- plumbing
@pytest.mark.parametrize("pruning_type,needs", [("activation", "calibration="), ("sparse_gpt", "calibration="),
                                                ("snip", "loss_fn="), ("gradient", "loss_fn="),
                                                ("snip_momentum", "loss_fn=")])
def test_missing_data_is_a_clear_error(mlp, pruning_type, needs):
    with pytest.raises(ConfigError, match=pruning_type) as e:
        fxprune.transform(mlp, {"pruning_type": pruning_type})
    assert needs in str(e.value)
    if needs == "loss_fn=":  # calibration alone is not enough
        with pytest.raises(ConfigError, match="loss_fn="):
            fxprune.transform(mlp, {"pruning_type": pruning_type}, calibration=[torch.randn(2, 32)])


def test_calibration_that_is_one_tensor_is_refused(mlp):
    with pytest.raises(ConfigError, match=r"calibration=\[batch\]"):
        fxprune.transform(mlp, {"pruning_type": "activation"}, calibration=torch.randn(4, 32))


def test_pattern_lock_is_for_the_pruner(mlp):
    with pytest.raises(ConfigError, match="fxprune.Pruner"):
        fxprune.transform(mlp, {"pruning_type": "pattern_lock"})


def test_progress_bar_only_on_a_tty(mlp, capsys, monkeypatch):
    calib = [torch.randn(2, 32) for _ in range(3)]
    fxprune.transform(mlp, {"pruning_type": "activation"}, calibration=calib)
    assert capsys.readouterr().err == ""                   # not a TTY: silent
    import fxprune.progress as progress
    monkeypatch.setattr(progress, "_isatty", lambda: True)
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # the built-in bar
    fxprune.transform(mlp, {"pruning_type": "activation"}, calibration=calib)
    assert "activation: calibration" in capsys.readouterr().err


def test_layer_the_calibration_never_reaches_is_named():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x, use_b: bool = False):
            return self.head(self.b(x) if use_b else self.a(x))

    model = Branchy()
    with pytest.raises(FxPruneError, match="never ran layer"):
        fxprune.transform(model, {"pruning_type": "activation", "exclude_last_linear": False,
                                  "op_names": ["a", "b"]}, {"x": torch.randn(2, 8), "use_b": True},
                          calibration=[torch.randn(2, 8)])


def test_conv_patches_are_kernel_major_channel_minor():
    torch.manual_seed(5)
    for groups, stride, padding, dilation in [(1, 1, 1, 1), (2, 2, 0, 1), (4, 1, "same", 2)]:
        w = torch.randn(8, 8 // groups, 3, 2)
        x = torch.randn(2, 8, 7, 6)
        geom = WeightGeometry("conv", tuple(w.shape), groups)
        patches = conv_patches(x, geom, stride, padding, dilation, groups)   # [P, groups, k*cin_g]
        view = to_view_2d(w, geom).reshape(groups, 8 // groups, -1)
        out = torch.einsum("pgc,goc->pgo", patches, view).reshape(patches.shape[0], 8)
        ref = F.conv2d(x, w, None, stride, padding, dilation, groups).movedim(1, -1).reshape(-1, 8)
        assert torch.allclose(out, ref, atol=1e-5)


def test_hf_gpt2_conv1d_through_torch_export():
    transformers = pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    calib = [torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (3, 8))]   # any shape
    seen = []  # the independent computation: a forward pre-hook on the Conv1D module
    hook = model.transformer.h[0].mlp.c_fc.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for ids in calib:
            model(ids)
    hook.remove()
    ctx, crit = _prepared(model, {"pruning_type": "activation", "pattern": "2:4", "target_sparsity": 0.5}, calib,
                          example_inputs=(calib[0],))
    norm = torch.cat([s.reshape(-1, 32) for s in seen]).pow(2).sum(0).sqrt()
    w = model.transformer.h[0].mlp.c_fc.weight.detach()      # Conv1D: [in, out]
    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.allclose(crit.view_scores(name, w.t()), w.t().abs() * norm, rtol=1e-5)
    pruned = fxprune.transform(model, {"pruning_type": "sparse_gpt", "pattern": "2:4", "target_sparsity": 0.5},
                               (calib[0],), calibration=calib)
    r = fxprune.sparsity_report(pruned)
    assert r.pruned_layers and all(x.zeros == x.numel // 2 for x in r.pruned_layers)
