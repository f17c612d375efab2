"""Channel masks do not depend on ``compact``, and ``fxprune.compact`` removes the channels of an
already-pruned model (from ``transform`` or ``Pruner.finalize()``) with the same equality check."""
import torch
from torch import nn

import fxprune
from test_compact import CHANNEL, InvertedResidual, assert_same_function, masked_and_compacted, randomize_bn


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
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

        def forward(self, x):
            return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = fxprune.Pruner(model, {"pattern": "1xchannel", "target_sparsity": 0.5, "pruning_scope": "local",
                                    "start_step": 1, "end_step": 1}, optimizer=opt)
    x = torch.randn(8, 16)
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    model = pruner.finalize().eval()
    smaller = fxprune.compact(model, (x,))
    assert smaller.fc1.weight.shape == (16, 16) and smaller.fc2.weight.shape == (16, 16)
    assert smaller.head.weight.shape == (4, 16)
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
