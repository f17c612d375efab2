"""fxprune.Pruner: INC's schedule, masks kept during training, pattern_lock, finalize."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fxprune
from conftest import MLP, SmallCNN
from fxprune.errors import ConfigError, FxPruneError
from fxprune.pruner import Pruner
from fxprune.schedule import Schedule


# ---------------------------------------------------------------------------------- INC's schedule
def _inc_schedule(target, start, end, freq, decay, max_ratio=0.98, init=0.0):
    """Literal transcription of INC (pruners/base.py __init__, basic.py update_masks,
    schedulers.py update_sparsity_ratio): {pruning step: sparsity}."""
    total = (end - start + freq) // freq
    completed = 0
    total -= 1
    if total == 0:
        total = 1
        completed = 1
    out = {}
    for step in range(0, end + 5):
        if step < start or step > end or (step - start) % freq != 0:
            continue
        if start == end:  # OneshotScheduler
            s = target
        else:
            aggressive = min(max_ratio, target)
            if decay == "cos":
                s = (aggressive - init) * (1.0 - math.cos(float(completed) / total * (math.pi / 2))) + init
            elif decay == "exp":
                r = ((1.0 - aggressive) / (1.0 - init)) ** (1 / total)
                s = 1.0 - (1.0 - init) * r ** completed
            elif decay == "linear":
                s = (aggressive - init) * float(completed) / total + init
            else:
                s = (aggressive - init) * ((float(completed) / total) ** 3) + init
            s = min(target, s)
        completed += 1
        out[step] = s
    return out


def _schedule(target, start, end, freq, decay, max_ratio=0.98):
    return Schedule(start, end, freq, decay, target, max_ratio)


@pytest.mark.parametrize("decay", ["exp", "cos", "linear", "cube"])
@pytest.mark.parametrize("start,end,freq", [(0, 100, 10), (3, 50, 7), (5, 5, 1), (0, 4, 10), (2, 40, 1)])
def test_schedule_equals_inc_formula(decay, start, end, freq):
    target = 0.8
    s = _schedule(target, start, end, freq, decay, max_ratio=0.75)
    count = s.first_count
    got = {}
    for step in range(end + 5):
        if s.is_pruning_step(step):
            got[step] = s.sparsity(count)
            count += 1
    assert got == _inc_schedule(target, start, end, freq, decay, max_ratio=0.75)
    assert list(got) == s.pruning_steps()


def test_schedule_endpoints():
    s = _schedule(0.9, 0, 100, 10, "exp")
    assert s.sparsity(0) == 0.0 and s.sparsity(s.total_prune_count) == pytest.approx(0.9)
    assert s.sparsity(5) == pytest.approx(1 - 0.1 ** 0.5)


# ---------------------------------------------------------------------------------- training
def _batches(n, seed=0, d=32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, d, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def _train(model, pruner, opt, batches, check=None):
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
        if check:
            check("grad")
        opt.step()
        opt.zero_grad()
        if check:
            check("step")
        pruner.step()


def test_local_counts_at_each_pruning_step_follow_the_schedule():
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = {"pruning_type": "magnitude", "pattern": "1x1", "pruning_scope": "local", "target_sparsity": 0.8,
           "start_step": 2, "end_step": 12, "pruning_frequency": 5, "sparsity_decay_type": "cos"}
    pruner = Pruner(model, cfg, optimizer=opt)
    expected = _inc_schedule(0.8, 2, 12, 5, "cos")        # {2: 0.0, 7: 0.4, 12: 0.8}
    layers = [model.layers[0].weight, model.layers[1].weight]
    for step, (x, y) in enumerate(_batches(16)):
        # on_step_begin(step) already ran (construction / previous pruner.step())
        ratio = max([v for s, v in expected.items() if s <= step], default=0.0)
        for w in layers:
            assert int((w == 0).sum()) == math.floor(ratio * w.numel()), (step, ratio)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()


def test_pruned_weights_stay_zero_and_their_gradients_are_masked():
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    cfg = {"pruning_type": "snip_momentum", "pattern": "4x1", "target_sparsity": 0.7,
           "start_step": 1, "end_step": 9, "pruning_frequency": 2}
    pruner = Pruner(model, cfg, optimizer=opt)
    names = ["layers.0.weight", "layers.1.weight"]
    history = []

    def check(when):
        for n in names:
            w = model.get_parameter(n)
            dead = ~pruner.masks[n]                         # Linear: the view is the weight
            if when == "grad":
                assert bool((w.grad[dead] == 0).all())
            else:
                assert bool((w[dead] == 0).all())           # despite momentum and weight decay
        history.append({n: (~pruner.masks[n]).clone() for n in names})

    _train(model, pruner, opt, _batches(14), check)
    for before, after in zip(history, history[1:]):       # masks only grow
        for n in names:
            assert bool((before[n] <= after[n]).all())
    total = sum(model.get_parameter(n).numel() for n in names)
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in names)
    assert zeros == math.floor(0.7 * total) // 4 * 4        # global 4x1: exact count


def test_callbacks_equal_step_with_optimizer_hooks():
    cfg = {"pruning_type": "snip_momentum", "pattern": "1x1", "target_sparsity": 0.6,
           "start_step": 1, "end_step": 7, "pruning_frequency": 3, "sparsity_decay_type": "linear"}
    torch.manual_seed(0)
    a = MLP()
    b = copy.deepcopy(a)
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2)
    pa = Pruner(a, cfg, optimizer=opt_a)
    _train(a, pa, opt_a, _batches(10))
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2)
    pb = Pruner(b, cfg)                                    # INC-style callbacks, no optimizer hooks
    for step, (x, y) in enumerate(_batches(10)):
        pb.on_step_begin(step)
        F.cross_entropy(b(x), y).backward()
        pb.on_before_optimizer_step()
        opt_b.step()
        pb.on_after_optimizer_step()
        opt_b.zero_grad()
    pb.on_step_begin(10)
    for pa_, pb_ in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa_, pb_)


def test_finalize_returns_a_plain_model_with_the_report():
    torch.manual_seed(0)
    model = SmallCNN()
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = {"pruning_type": "magnitude", "pattern": "1xchannel", "target_sparsity": 0.5,
           "start_step": 0, "end_step": 4, "pruning_frequency": 2}
    pruner = Pruner(model, cfg, optimizer=opt)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    final = pruner.finalize()
    assert final is model and type(final) is SmallCNN
    for p in final.parameters():                          # no hooks left behind
        assert not p._backward_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert list(final.state_dict()) == keys               # no extra parameters or buffers
    fresh = SmallCNN()
    fresh.load_state_dict(final.state_dict(), strict=True)
    report = fxprune.sparsity_report(final)
    for r in report.pruned_layers:                         # counted from the weights
        w = final.get_parameter(r.param)
        assert r.zeros == int((w == 0).sum()) and r.criterion == "magnitude"
    dead = (final.conv1.weight.flatten(1) == 0).all(dim=1)  # 1xchannel: bias and BN follow
    assert dead.any()
    assert bool((final.conv1.bias[dead] == 0).all()) and bool((final.bn1.bias[dead] == 0).all())
    with pytest.raises(FxPruneError, match="finalized"):
        pruner.step()


def test_pattern_lock_keeps_the_existing_zeros():
    torch.manual_seed(0)
    sparse = fxprune.transform(MLP(), {"pattern": "2:4", "target_sparsity": 0.5})
    zeros = {n: (p == 0) for n, p in sparse.named_parameters() if n.endswith("weight")}
    before = {n: p.clone() for n, p in sparse.named_parameters()}
    opt = torch.optim.Adam(sparse.parameters(), lr=1e-2)
    pruner = Pruner(sparse, {"pruning_type": "pattern_lock"}, optimizer=opt)  # any pattern: the lock is per weight
    _train(sparse, pruner, opt, _batches(5))
    final = pruner.finalize()
    for n in ["layers.0.weight", "layers.1.weight"]:
        w = final.get_parameter(n)
        assert torch.equal(w == 0, zeros[n])              # same zeros, nothing new pruned
        assert not torch.equal(w, before[n])              # but the kept weights trained
    r = fxprune.sparsity_report(final)
    assert r.sparsity == pytest.approx(0.5) and r.layer("layers.0").criterion == "pattern_lock"


def test_one_shot_schedule_prunes_at_start_step_only():
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = {"pattern": "1x1", "target_sparsity": 0.5, "start_step": 3, "end_step": 3, "pruning_type": "snip"}
    pruner = Pruner(model, cfg, optimizer=opt)
    seen = []
    for x, y in _batches(6):
        seen.append(pruner.sparsity())
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    assert seen == [0.0, 0.0, 0.0, 0.5, 0.5, 0.5]


@pytest.mark.parametrize("cfg,match", [
    ({"pruning_type": "activation"}, "one shot"),
    ({"pruning_type": "sparse_gpt"}, "one shot"),
    ({"pruning_type": "snip_momentum"}, "start_step"),                    # start=end=0
    ({"start_step": 5, "end_step": 2}, "end_step"),
    ({"pruning_frequency": 0, "end_step": 3}, "pruning_frequency"),
    ({"sparsity_decay_type": "step", "end_step": 3}, "sparsity_decay_type"),
])
def test_pruner_config_errors(cfg, match):
    with pytest.raises(ConfigError, match=match):
        Pruner(MLP(), cfg)


def test_gradient_criteria_without_gradients_say_what_to_do():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = Pruner(model, {"pruning_type": "snip", "start_step": 1, "end_step": 1})   # no optimizer
    x, y = _batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    with pytest.raises(FxPruneError, match="optimizer="):
        pruner.step()


def test_state_dict_resumes_the_same_run():
    cfg = {"pruning_type": "snip_momentum", "pattern": "1x1", "target_sparsity": 0.6,
           "start_step": 1, "end_step": 9, "pruning_frequency": 2}
    batches = _batches(12)
    torch.manual_seed(0)
    a = MLP()
    b = copy.deepcopy(a)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05)
    pa = Pruner(a, cfg, optimizer=opt_a)
    _train(a, pa, opt_a, batches)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05)
    pb = Pruner(b, cfg, optimizer=opt_b)
    _train(b, pb, opt_b, batches[:5])
    saved = copy.deepcopy((b.state_dict(), opt_b.state_dict(), pb.state_dict()))
    c = MLP()                                              # a fresh process: new model, optimizer, Pruner
    c.load_state_dict(saved[0])
    opt_c = torch.optim.SGD(c.parameters(), lr=0.05)
    opt_c.load_state_dict(saved[1])
    pc = Pruner(c, cfg, optimizer=opt_c)
    pc.load_state_dict(saved[2])
    _train(c, pc, opt_c, batches[5:])
    for x, y in zip(a.parameters(), c.parameters()):
        assert torch.equal(x, y)
