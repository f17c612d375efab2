"""Compaction speed: ONNX Runtime CPU latency of dense vs compacted models (docs/compact.md).

    python bench/compact_speed.py                       # ResNet-50 (batch 1, 8), BERT-base FFN (seq 128)
    python bench/compact_speed.py --models resnet50 --runs 20 --sparsities 0.5

For each model and channel sparsity (``1xchannel``, ``pruning_scope: local``: every pruned layer
loses that fraction of its output channels; ``--round 16`` adds variants with
``round_channels_to: 16``), prune with ``fxprune.transform(..., compact=True)``, export with
``torch.onnx.export(dynamo=True)``, and time ONNX Runtime CPU inferences: the median of ``runs``
after ``warmup``, every variant timed once per round, rounds interleaved, so load from other
processes hits all alike; ``--threads`` intra-op threads, 1 by default. Parameters are counted
on the model, FLOPs with ``fxprune.flops.flop_counter`` (per forward, fused attention included). The figure to watch is
``speedup / FLOP cut``: how much of the FLOP reduction becomes latency (the target is >= 0.7).

Models are built here (random weights, never downloaded): ResNet-50 (torchvision's layout), and
BERT-base (``BertConfig()`` defaults: 12 layers, hidden 768, FFN 3072) with only the FFN
intermediate channels pruned (``op_names: intermediate.dense``); on request (``--models``) also
the models of ``bench/coverage_models.py`` with every layer pruned: ConvNeXt-V2 nano, ViT-B/16
(``nn.MultiheadAttention``), the Hugging Face ViT-S, on 224x224 images, and the 4-layer Llama
on 128 tokens.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import fxprune
from fxprune.examples import ResNet


def _randomize_bn(model):
    """Trained-looking BatchNorm statistics, so magnitudes are not all equal."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def resnet50_case():
    torch.manual_seed(0)
    model = _randomize_bn(ResNet()).eval()
    return model, {}, (lambda b: (torch.randn(b, 3, 224, 224),))


def bert_case():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    return model, {"op_names": ["intermediate.dense"]}, (lambda b: (torch.randint(0, 30522, (b, 128)),))


def coverage_case(name: str, image: int = 224, seq: int = 128):
    """A model of ``bench/coverage_models.py`` at a latency-sized input (224x224 images, 128
    tokens), every layer pruned (the default config: the last linear excluded)."""
    def make():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import coverage_models
        coverage_models.IMAGE, coverage_models.SEQ = image, seq
        model, inputs = coverage_models.build(name)
        first = inputs["input_ids"] if isinstance(inputs, dict) else inputs[0]
        return model, {}, (lambda b: (first.expand(b, *first.shape[1:]).clone(),))
    return make


CASES = {"resnet50": (resnet50_case, (1, 8)), "bert-base-ffn": (bert_case, (1,)),
         "convnextv2": (coverage_case("convnextv2"), (1,)), "vit_b_16": (coverage_case("vit_b_16"), (1,)),
         "vit_hf": (coverage_case("vit_hf"), (1,)), "llama": (coverage_case("llama"), (1,))}
DEFAULT = ["resnet50", "bert-base-ffn"]


# ---------------------------------------------------------------------- export and timing
def export(model, inputs, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, str(path), dynamo=True, verbose=False)
    return path


def latencies_ms(paths, inputs, runs: int, warmup: int, threads: int) -> list[float]:
    """Median latency of each model, timed in interleaved rounds (one run of each model per
    round), so load from other processes hits every model alike."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sessions = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in paths]
    feeds = [{i.name: t.numpy() for i, t in zip(s.get_inputs(), inputs)} for s in sessions]
    times = [[] for _ in sessions]
    for round_ in range(warmup + runs):
        for s, f, t in zip(sessions, feeds, times):
            start = time.perf_counter()
            s.run(None, f)
            if round_ >= warmup:
                t.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def count(model, inputs) -> tuple[int, int]:
    from fxprune.flops import flop_counter
    with torch.no_grad(), flop_counter() as counter:
        model(*inputs)
    return sum(p.numel() for p in model.parameters()), int(counter.get_total_flops())


def run_case(name, sparsities, rounds, runs, warmup, threads, workdir: Path, log):
    make, batches = CASES[name]
    model, extra, inputs_for = make()
    rows = []
    variants = [("dense", model, None)]
    for s in sparsities:
        for r in rounds:
            cfg = {"pattern": "1xchannel", "target_sparsity": s, "pruning_scope": "local",
                   "round_channels_to": r, **extra}
            label = f"{s:.0%}" + (f" (x{r})" if r > 1 else "")
            start = time.perf_counter()
            pruned = fxprune.transform(model, cfg, inputs_for(1), compact=True).eval()
            log(f"{name}: pruned and compacted at {label} in {time.perf_counter() - start:.1f}s")
            log(f"  {str(fxprune.sparsity_report(pruned)).splitlines()[-1]}")
            variants.append((label, pruned, None))
    counts = [count(m, inputs_for(1)) for _, m, _ in variants]  # FLOPs are linear in the batch
    for batch in batches:
        inputs = inputs_for(batch)
        paths = []
        for s, m, _ in variants:
            start = time.perf_counter()
            paths.append(export(m, inputs, workdir / f"{name}_{len(paths)}_b{batch}.onnx"))
            log(f"{name} b{batch} {s}: exported in {time.perf_counter() - start:.1f}s")
        times = latencies_ms(paths, inputs, runs, warmup, threads)
        (base_params, base_flops), base_ms = counts[0], times[0]
        for (s, _, _), (params, flops), ms in zip(variants, counts, times):
            flops *= batch
            rows.append({"model": name, "batch": batch, "sparsity": s, "params": params,
                         "flops": flops, "ms": ms, "speedup": base_ms / ms,
                         "flop_cut": base_flops * batch / flops, "param_cut": base_params / params})
            log(f"{name} b{batch} {s}: {ms:.1f} ms, {flops / 1e9:.2f} GFLOPs, {params / 1e6:.2f} M params")
        for path in paths:
            path.unlink(missing_ok=True)
            Path(str(path) + ".data").unlink(missing_ok=True)
    return rows


def table(rows) -> str:
    head = ("model", "batch", "channel sparsity", "params (M)", "GFLOPs", "ORT latency (ms)",
            "speedup", "FLOP cut", "speedup / FLOP cut")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        dense = r["sparsity"] == "dense"
        lines.append("| " + " | ".join([
            r["model"], str(r["batch"]), r["sparsity"],
            f"{r['params'] / 1e6:.2f}", f"{r['flops'] / 1e9:.2f}", f"{r['ms']:.1f}",
            f"{r['speedup']:.2f}x", f"{r['flop_cut']:.2f}x",
            "-" if dense else f"{r['speedup'] / r['flop_cut']:.2f}"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT, choices=list(CASES))
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    ap.add_argument("--round", nargs="+", type=int, default=[1, 16], dest="rounds",
                    help="round_channels_to values to compare (1: exact channel counts)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="ORT intra-op threads (1 by default: steadiest on a shared machine)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    import onnxruntime
    log(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} threads, "
        f"{args.runs} runs (median) after {args.warmup} warmup")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fxprune_compact_") as tmp:
        for name in args.models:
            rows += run_case(name, args.sparsities, args.rounds, args.runs, args.warmup, args.threads,
                             Path(tmp), log)
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
