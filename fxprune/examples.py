"""Built-in example models, for the demo, the CLI and the benchmarks (random weights, no download).

``EXAMPLES[name]()`` returns ``(model, example_inputs)``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, sizes=(256, 512, 512, 10)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = torch.relu(x) if i < len(self.layers) - 1 else x
        return x


class BasicBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class SmallResNet(nn.Module):
    """A ResNet-style CNN: stem, residual blocks with BatchNorm, global pool, classifier."""

    def __init__(self, width: int = 32, blocks: int = 2, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(*[BasicBlock(width) for _ in range(blocks)])
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


def mlp():
    return MLP().eval(), (torch.randn(8, 256),)


def resnet():
    return SmallResNet().eval(), (torch.randn(1, 3, 32, 32),)


def bert_tiny():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=512, vocab_size=1000)
    return BertForSequenceClassification(cfg).eval(), (torch.randint(0, 1000, (1, 32)),)


EXAMPLES: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "mlp": mlp, "resnet": resnet, "bert-tiny": bert_tiny,
}
