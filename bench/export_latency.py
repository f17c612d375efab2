"""Dense vs pruned (masked) onnxruntime CPU latency of the built-in example models.

    python bench/export_latency.py [--runs 100] [--rounds 5] [--threads 1] [--sparsity 0.5]

Each model is exported dense and after fxprune.transform with each pattern, and validated by
fxprune.export.to_onnx. Then the variants are timed in interleaved rounds (dense, 4x1, 2:4, ...,
dense, 4x1, ...) so machine load hits them alike; a round is the median of --runs onnxruntime
runs after warm-up (fxprune.export.ort_latency) and the table shows the median over rounds.

Pruning only writes zeros (compaction is a later step), so the ONNX graph is the same and
onnxruntime's dense kernels do the same work: expect ratios near 1.0x.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import fxprune
from fxprune.examples import EXAMPLES
from fxprune.export import ort_latency, to_onnx


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="timed runs per round (median)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime intra-op threads (0: onnxruntime's default)")
    parser.add_argument("--sparsity", type=float, default=0.5,
                        help="target_sparsity (2:4 allows at most 0.5)")
    parser.add_argument("--patterns", default="4x1,2:4,1xchannel")
    parser.add_argument("--models", default=",".join(EXAMPLES),
                        help=f"comma-separated, from {', '.join(EXAMPLES)}")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    print(f"fxprune {fxprune.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{args.threads or 'default'} ORT thread(s), median of {args.rounds} rounds x "
          f"{args.runs} runs, target_sparsity {args.sparsity}")
    print(f"{'model':<10} {'variant':<10} {'sparsity':>8} {'ORT ms':>9} {'vs dense':>8} "
          f"{'size KiB':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            torch.manual_seed(0)
            model, inputs = EXAMPLES[name]()
            variants = {"dense": (model, None)}
            for pattern in args.patterns.split(","):
                pruned = fxprune.transform(model, {"target_sparsity": args.sparsity,
                                                   "pattern": pattern}, inputs)
                variants[pattern] = (pruned, fxprune.sparsity_report(pruned).sparsity)
            exported = {}
            for variant, (m, sparsity) in variants.items():
                path = Path(tmp) / f"{name}-{variant.replace(':', '_')}.onnx"
                exported[variant] = (to_onnx(m, inputs, path, latency_runs=0), sparsity)
            times = {variant: [] for variant in exported}
            for _ in range(args.rounds):
                for variant, (result, _) in exported.items():
                    times[variant].append(ort_latency(result.path, inputs, runs=args.runs,
                                                      threads=args.threads))
            dense_ms = statistics.median(times["dense"])
            for variant, (result, sparsity) in exported.items():
                ms = statistics.median(times[variant])
                shown = "-" if sparsity is None else f"{sparsity:.3f}"
                print(f"{name:<10} {variant:<10} {shown:>8} {ms:>9.3f} {ms / dense_ms:>7.2f}x "
                      f"{result.size / 1024:>9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
