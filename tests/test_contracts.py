"""The extension contracts: a user pattern opts into channel zeroing and compaction through the
channel capabilities BasePattern declares; the seed API's class names import."""
import torch
from torch import nn

import fxprune
from fxprune.patterns import NInMPattern, NxMPattern


def test_seed_api_class_names():
    assert fxprune.PatternNxM is NxMPattern and fxprune.PatternNInM is NInMPattern
    from fxprune.patterns import PatternNInM, PatternNxM  # noqa: F401  (INC's module layout)
    p = fxprune.get_pattern({"pattern": "2xchannel", "target_sparsity": 0.5})
    assert isinstance(p, fxprune.PatternNxM) and p.prunes_output_channels and p.output_channel_block == 2
    q = fxprune.get_pattern({"pattern": "4x1"})
    assert not q.prunes_output_channels and q.output_channel_block == 1
    assert fxprune.BasePattern.prunes_output_channels is False


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def _rows_pattern(name, opt_in):
    @fxprune.register_pattern(name)
    class WholeRows(fxprune.BasePattern):
        prunes_output_channels = opt_in

        def block_layout(self, geom):
            rows, cols = geom.view_shape
            return fxprune.BlockLayout((rows, 1, 1, cols), (1, 3), cols, f"1x{cols}")
    return WholeRows


def test_a_user_pattern_opts_into_channel_zeroing_and_compaction():
    model = ConvNet().eval()
    with torch.no_grad():
        model.bn.bias.uniform_(0.5, 1.0)  # a pruned channel left with its BN bias outputs a constant
    x = torch.randn(2, 3, 8, 8)
    config = {"pattern": "qa_rows_in", "target_sparsity": 0.5, "op_names": ["conv1"], "exclude_last_linear": False}
    _rows_pattern("qa_rows_in", True)
    _rows_pattern("qa_rows_out", False)
    try:
        masked = fxprune.transform(model, config)                       # no inputs: plain masks
        dead = (masked.conv1.weight == 0).flatten(1).all(1)
        assert int(dead.sum()) == 4
        assert torch.equal(masked.bn.bias[dead], torch.zeros(4))         # zeroed with the channel
        compacted = fxprune.transform(model, config, (x,), compact=True)
        assert compacted.conv1.weight.shape == (4, 3, 3, 3) and compacted.conv2.weight.shape == (4, 4, 1, 1)
        torch.testing.assert_close(compacted(x), masked(x), rtol=1e-4, atol=1e-5)
        # without the capability: masks only, BN untouched, nothing compacted
        plain = fxprune.transform(model, dict(config, pattern="qa_rows_out"), (x,), compact=True)
        assert plain.conv1.weight.shape == (8, 3, 3, 3)
        assert torch.equal(plain.bn.bias, model.bn.bias)
        report = fxprune.sparsity_report(plain)
        assert "does not remove output channels" in report.compaction["not_compacted"]["conv1.weight"]
    finally:
        fxprune.PATTERNS.pop("qa_rows_in")
        fxprune.PATTERNS.pop("qa_rows_out")
