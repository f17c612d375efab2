import warnings

import pytest
import torch
from torch import nn

from fxprune import examples


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)


class MLP(examples.MLP):
    """The example MLP, small: 32 -> 64 -> 64 -> 10."""

    def __init__(self, sizes=(32, 64, 64, 10)):
        super().__init__(sizes)


class SmallCNN(nn.Module):
    """Conv -> BN -> ReLU, a grouped conv with a residual add, a 1-D and a 3-D conv, a classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.conv3 = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x)) + x
        x = self.conv3(x)
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture
def mlp():
    return MLP().eval()


@pytest.fixture
def cnn():
    model = SmallCNN().eval()
    with torch.no_grad():  # non-trivial BN statistics, so a pruned channel's BN constant is visible
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
        model.bn1.bias.uniform_(-1, 1)
    return model


def refuse_aten_trace(patch) -> None:
    """Make the recorded ATen trace refuse every model, so the capture falls back to torch.export
    (``patch``: ``monkeypatch`` or one of its contexts)."""
    from fxprune.passes import aten_trace

    def refuse(*args):
        raise aten_trace.TraceRefused("refused by the test")
    patch.setattr(aten_trace, "trace_aten", refuse)
