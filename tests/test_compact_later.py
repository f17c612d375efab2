"""Channel masks do not depend on ``compact``, and ``fxprune.compact`` removes the channels of an
already-pruned model (from ``transform`` or ``Pruner.finalize()``) with the same equality check."""
import copy

import pytest
import torch
from torch import nn

import fxprune
from test_compact import CHANNEL, MLP, InvertedResidual, assert_same_function, masked_and_compacted, randomize_bn


def test_masks_are_the_coupled_ones_with_or_without_compact():
    model = randomize_bn(InvertedResidual().eval())
    x = (torch.randn(2, 3, 8, 8),)
    masked, compacted, report = masked_and_compacted(model, CHANNEL, x)
    plain = fxprune.transform(model, CHANNEL, x)                      # compact=False, same inputs
    for (name, p), (_, q) in zip(plain.named_parameters(), masked.named_parameters()):
        assert torch.equal(p, q), name                                  # same masks, same zeroed entries
    later = fxprune.compact(plain, x)
    assert [p.shape for p in later.parameters()] == [p.shape for p in compacted.parameters()]
    assert_same_function(plain, later, x)
    c = fxprune.sparsity_report(later).compaction
    assert c["params_after"] == report.compaction["params_after"] < c["params_before"]
    # the same units removed (the later report also lists the spaces of layers nothing was removed from)
    removed = [(g["layers"], g["removed"]) for g in c["groups"] if g["removed"]]
    assert removed == [(g["layers"], g["removed"]) for g in report.compaction["groups"] if g["removed"]]
    assert all(p.shape == q.shape for p, q in zip(model.parameters(), plain.parameters()))  # untouched


def test_compact_after_the_pruner():
    model = MLP()                              # fc1 32 -> 64, fc2 64 -> 48, fc3 48 -> 10 (left dense)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = fxprune.Pruner(model, {"pattern": "1xchannel", "target_sparsity": 0.5, "pruning_scope": "local",
                                    "start_step": 1, "end_step": 1}, optimizer=opt)
    x = torch.randn(8, 32)
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    model = pruner.finalize().eval()
    smaller = fxprune.compact(model, (x,))
    assert smaller.fc1.weight.shape == (32, 32) and smaller.fc2.weight.shape == (24, 32)
    assert smaller.fc3.weight.shape == (10, 24)
    assert_same_function(model, smaller, (x,))
    report = fxprune.sparsity_report(smaller)
    assert report.compaction["params_before"] == sum(p.numel() for p in model.parameters())
    assert report.compaction["params_after"] == sum(p.numel() for p in smaller.parameters())
    assert report.layer("fc1").status == "pruned"


def test_compact_of_a_dense_model_removes_nothing_and_needs_inputs():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    same = fxprune.compact(model, (torch.randn(2, 8),))
    assert [p.shape for p in same.parameters()] == [p.shape for p in model.parameters()]
    report = fxprune.sparsity_report(same)
    assert report.compaction["params_after"] == report.compaction["params_before"]
    assert all(r.status == "excluded: no zero weights" for r in report.layers)
    try:
        fxprune.compact(model, None)
    except fxprune.FxPruneError as e:
        assert "needs example_inputs" in str(e)
    else:
        raise AssertionError("no error without example inputs")


def test_blocked_channels_are_kept_with_a_warning_that_names_the_op():
    from test_compact import LayerNormMLP

    x = (torch.randn(2, 16),)
    with pytest.warns(UserWarning, match=r"pruning_configs\[0\] \(pattern '1xchannel', 2 layers\): achieved sparsity "
                      r"0\.3333, target_sparsity 0\.5: 32 of 64 coupled channel units cannot be removed exactly "
                      r"and are kept \(e\.g\. layer_norm \(norm\): normalizes over the channel dim"):
        pruned = fxprune.transform(LayerNormMLP(), CHANNEL, x)
    assert int((pruned.fc1.weight == 0).all(1).sum()) == 0 and int((pruned.fc2.weight == 0).all(1).sum()) == 16


def test_pruner_with_example_inputs_selects_coupled_classes():
    model = randomize_bn(InvertedResidual().eval())
    x = (torch.randn(2, 3, 8, 8),)
    _, compacted, _ = masked_and_compacted(model, CHANNEL, x)
    trained = copy.deepcopy(model)
    opt = torch.optim.SGD(trained.parameters(), lr=0.0)     # weights unchanged: transform's scores
    pruner = fxprune.Pruner(trained, dict(CHANNEL, start_step=1, end_step=1), optimizer=opt, example_inputs=x)
    for _ in range(2):
        trained(*x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    trained = pruner.finalize().eval()
    plain = fxprune.transform(model, CHANNEL, x)              # the coupled masks of transform
    for (name, p), (_, q) in zip(trained.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), name
    later = fxprune.compact(trained, x)
    assert [p.shape for p in later.parameters()] == [p.shape for p in compacted.parameters()]
    assert_same_function(trained, later, x)


class ReluThenNorm(nn.Module):
    """A BatchNorm after the activation: not a direct follower of the conv, zeroed with the class."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2, self.fc = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.c2(self.bn(torch.relu(self.c1(x)))).mean((2, 3)))


def test_a_resumed_pruner_keeps_zeroing_the_removed_classes():
    model = randomize_bn(ReluThenNorm().eval())
    x = (torch.randn(2, 3, 8, 8),)
    cfg = dict(CHANNEL, start_step=0, end_step=0)
    first = fxprune.Pruner(copy.deepcopy(model), cfg, example_inputs=x)      # prunes at step 0
    dead = ~first.masks["c1.weight"].any(dim=1)
    assert int(dead.sum()) == 4 and (first.model.bn.bias[dead] == 0).all()
    resumed_model = copy.deepcopy(model)
    resumed = fxprune.Pruner(resumed_model, dict(cfg, start_step=5, end_step=5), example_inputs=x)
    resumed.load_state_dict(first.state_dict())
    assert resumed.groups[0].plan.dead == first.groups[0].plan.dead
    with torch.no_grad():
        resumed_model.bn.bias.add_(1.0)              # an optimizer step revives the norm's entries
    resumed.apply_masks()
    assert (resumed_model.bn.bias[dead] == 0).all() and (resumed_model.bn.bias[~dead] != 0).all()
