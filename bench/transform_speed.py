"""Speed and memory of fxprune.transform on BERT-base, beside a naive reference in the same run.

    python bench/transform_speed.py [--layers 12] [--patterns 4x1 1x1 2:4]

BERT-base is built from ``BertConfig()`` with random weights (no download): 85.5M prunable linear
weights. For each pattern (global magnitude, target 0.8; 2:4 at 0.5) it prints the wall time and
the peak RSS above the start of each phase (capture, mask = score + mask, rewrite), and a naive
reference: abs, block mean, one ``torch.kthvalue`` over all scores, multiply. Peak memory is read
from /proc (VmHWM, reset through /proc/self/clear_refs) on Linux.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from fxprune.config import PruningConfig
from fxprune.passes import (AttachPass, CapturePass, DiscoverPass, MaskPass, PruneContext,
                            RecordPass, RewritePass, ScorePass)
from measure import Phase


def naive_reference(model, pattern: str, target: float) -> float:
    """abs, block mean, one kthvalue over all block scores, multiply; returns seconds."""
    weights = [m.weight for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "pooler.dense"]
    start = time.perf_counter()
    with torch.no_grad():
        if ":" in pattern:
            n, m = map(int, pattern.split(":"))
            for w in weights:  # no global ranking needed at the full N:M target
                groups = w.abs().reshape(-1, m)
                idx = groups.topk(n, dim=1, largest=False).indices
                mask = torch.ones_like(groups).scatter_(1, idx, 0.0)
                w.mul_(mask.reshape(w.shape))
        else:
            bn, bm = map(int, pattern.split("x"))
            scores = [w.abs().reshape(w.shape[0] // bn, bn, w.shape[1] // bm, bm).mean(dim=(1, 3))
                      for w in weights]
            flat = torch.cat([s.reshape(-1) for s in scores])
            threshold = torch.kthvalue(flat, int(target * flat.numel())).values
            del flat
            for w, s in zip(weights, scores):
                keep = (s > threshold).repeat_interleave(bn, 0).repeat_interleave(bm, 1)
                w.mul_(keep)
    return time.perf_counter() - start


def run_fxprune(model, example_inputs, config):
    ctx = PruneContext(model=model, config=PruningConfig.from_any(config), example_inputs=example_inputs)
    phases = {}
    with Phase() as phases["capture"]:
        CapturePass()(ctx)
        DiscoverPass()(ctx)
        AttachPass()(ctx)
    with Phase() as phases["mask"]:
        ScorePass()(ctx)
        MaskPass()(ctx)
    with Phase() as phases["rewrite"]:
        RewritePass()(ctx)
    RecordPass()(ctx)
    return phases, ctx.report


def measure(pattern: str, layers: int, repeats: int = 2) -> None:
    """One pattern, in a fresh process: its peak RSS is not hidden by memory an earlier pattern
    left in the allocator. fxprune and the naive reference alternate ``repeats`` times on the same
    weights; times are the best of the repeats (the first also pays for fresh pages), peaks the
    largest."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=layers)).eval()
    prunable = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    target = 0.5 if ":" in pattern else 0.8
    config = {"target_sparsity": target, "pattern": pattern}
    runs, naive_runs = [], []
    for _ in range(repeats):
        model.load_state_dict(state)
        runs.append(run_fxprune(model, (torch.randint(0, 1000, (1, 16)),), config))
        model.load_state_dict(state)
        with Phase() as naive:
            naive.seconds_inner = naive_reference(model, pattern, target)
        naive_runs.append(naive)
    report = runs[-1][1]
    for name in runs[0][0]:
        seconds = min(r[0][name].seconds for r in runs)
        peak = max(r[0][name].peak for r in runs)
        print(f"{pattern:8} {name:8} {seconds:10.3f} {peak / 2**20:9.0f} {peak / (prunable * 4):9.2f}")
    seconds = min(n.seconds_inner for n in naive_runs)
    peak = max(n.peak for n in naive_runs)
    fx_seconds = min(r[0]["mask"].seconds + r[0]["rewrite"].seconds for r in runs)
    print(f"{pattern:8} {'naive':8} {seconds:10.3f} {peak / 2**20:9.0f} {peak / (prunable * 4):9.2f}")
    print(f"{pattern:8} mask+rewrite {fx_seconds:.3f} s = {fx_seconds / seconds:.2f}x the naive reference "
          f"({seconds / fx_seconds:.1f}x faster); sparsity {report.sparsity:.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12, help="encoder layers (12 = BERT-base)")
    ap.add_argument("--patterns", nargs="+", default=["4x1", "1x1", "2:4"])
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one pattern in this process
    args = ap.parse_args()
    if args.one:
        measure(args.one, args.layers)
        return
    from transformers import BertConfig

    cfg = BertConfig(num_hidden_layers=args.layers)
    prunable = args.layers * (4 * cfg.hidden_size ** 2 + 2 * cfg.hidden_size * cfg.intermediate_size) \
        + cfg.hidden_size ** 2
    print(f"BERT ({args.layers} layers), {prunable / 1e6:.1f}M prunable linear weights "
          f"({prunable * 4 / 2**20:.0f} MiB), torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"peak = RSS above the phase's start, one process per pattern")
    print(f"{'pattern':8} {'phase':8} {'seconds':>10} {'peak MiB':>9} {'x weights':>9}")
    for pattern in args.patterns:
        subprocess.run([sys.executable, __file__, "--one", pattern, "--layers", str(args.layers)],
                       check=True)


if __name__ == "__main__":
    main()
