"""Compaction coverage: how much of a model channel compaction can remove (docs/compact.md).

    python bench/compact_coverage.py                     # ResNeXt-50 (32x4d), RegNetY-400MF
    python bench/compact_coverage.py --models regnet_y_400mf --sparsity 0.5

Each model is built here in torchvision's layout with random weights (never downloaded), pruned
with ``1xchannel`` at ``--sparsity`` (``pruning_scope: local``) and ``compact=True`` on one
``--size`` x ``--size`` image, and reported: parameters kept, coupled channel units, how many
are blocked (with the most common reasons), units removed, FLOPs before and after (per forward
on that image) and the transform's time. The count of blocked units is the figure to watch.
"""
from __future__ import annotations

import argparse
import time
import warnings
from collections import Counter

import torch
from torch import nn

import fxprune
from fxprune.examples import ResNet


def resnext50_32x4d() -> nn.Module:
    """torchvision's resnext50_32x4d: ResNet-50 with bottlenecks twice as wide, 3x3 in 32 groups."""
    model = ResNet()
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            width = block.conv1.out_channels * 2
            block.conv1 = nn.Conv2d(block.conv1.in_channels, width, 1, bias=False)
            block.bn1 = nn.BatchNorm2d(width)
            block.conv2 = nn.Conv2d(width, width, 3, block.conv2.stride, 1, groups=32, bias=False)
            block.bn2 = nn.BatchNorm2d(width)
            block.conv3 = nn.Conv2d(width, block.conv3.out_channels, 1, bias=False)
    return model


def _conv_bn(cin, cout, k, stride=1, groups=1, act=True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


class _SqueezeExcite(nn.Module):
    def __init__(self, channels, squeezed):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class _RegNetBlock(nn.Module):
    def __init__(self, w_in, w_out, stride, group_width=8):
        super().__init__()
        self.proj = _conv_bn(w_in, w_out, 1, stride, act=False) if (w_in != w_out or stride != 1) else None
        self.a, self.b = _conv_bn(w_in, w_out, 1), _conv_bn(w_out, w_out, 3, stride, w_out // group_width)
        self.se, self.c = _SqueezeExcite(w_out, int(round(0.25 * w_in))), _conv_bn(w_out, w_out, 1, act=False)

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return torch.relu(shortcut + self.c(self.se(self.b(self.a(x)))))


class RegNetY400MF(nn.Module):
    """torchvision's regnet_y_400mf: depths 1, 3, 6, 6; widths 48, 104, 208, 440; groups of 8; SE."""

    def __init__(self):
        super().__init__()
        self.stem = _conv_bn(3, 32, 3, 2)
        blocks, w_in = [], 32
        for depth, width in zip((1, 3, 6, 6), (48, 104, 208, 440)):
            for i in range(depth):
                blocks.append(_RegNetBlock(w_in, width, 2 if i == 0 else 1))
                w_in = width
        self.trunk, self.fc = nn.Sequential(*blocks), nn.Linear(440, 1000)

    def forward(self, x):
        return self.fc(self.trunk(self.stem(x)).mean((2, 3)))


MODELS = {"resnext50_32x4d": resnext50_32x4d, "regnet_y_400mf": RegNetY400MF}


def coverage(name: str, sparsity: float, size: int) -> dict:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    params = sum(p.numel() for p in model.parameters())
    config = {"pattern": "1xchannel", "target_sparsity": sparsity, "pruning_scope": "local"}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the target-missed warning: the table says it
        pruned = fxprune.transform(model, config, (torch.randn(1, 3, size, size),), compact=True)
    seconds = time.perf_counter() - start
    c = fxprune.sparsity_report(pruned).compaction
    reasons = Counter()
    for group in c["groups"]:
        for b in group["blocked"]:
            reasons[b["reason"].rpartition(": ")[2]] += b["units"]
    return {"model": name, "params": params, "kept": c["params_after"] / params,
            "units": sum(g["units"] for g in c["groups"]),
            "blocked": sum(g["blocked_units"] for g in c["groups"]),
            "removed": sum(g["removed"] for g in c["groups"]),
            "flops": (c["flops_before"], c["flops_after"]), "seconds": seconds, "reasons": reasons}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--size", type=int, default=64, help="input image side (64: fast; units do not depend on it)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | params (M) | params kept | channel units | blocked | removed | GFLOPs before -> after | transform (s) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [coverage(name, args.sparsity, args.size) for name in args.models]
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['kept']:.1%} | {r['units']} | "
              f"{r['blocked']} ({r['blocked'] / r['units']:.1%}) | {r['removed']} | "
              f"{r['flops'][0] / 1e9:.3f} -> {r['flops'][1] / 1e9:.3f} | {r['seconds']:.1f} |")
    for r in rows:
        for why, n in r["reasons"].most_common(5):
            print(f"{r['model']}: {n} units blocked: {why}")


if __name__ == "__main__":
    main()
