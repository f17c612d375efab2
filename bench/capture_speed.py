"""Capture time: the recorded ATen trace (fxprune's default capture with example inputs) against
``torch.export.export(..., strict=False)`` (its fallback), on the models of
``bench/coverage_models.py`` (docs/compact.md, "Where the time goes").

    python bench/capture_speed.py                       # ResNet-50, MobileNetV2, ViT-B/16, Llama
    python bench/capture_speed.py --models resnet50 t5 --reps 7

CPU time (``time.process_time``) of the capture pass alone, one thread. Warm: in one process, after
one call of each, the two captures alternate ``--reps`` times (the trace first in odd repetitions);
the table shows the fastest and the median. Cold: the first call in a fresh process (after the
imports and building the model), where torch.export also loads the modules it needs on first use.
Both captures are checked to give the same ops in the same order.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

DEFAULT = ["resnet50", "mobilenet_v2", "vit_b_16", "llama"]


def _capture(model, inputs, trace: bool):
    from fxprune.config import PruningConfig
    from fxprune.passes.capture import CapturePass
    from fxprune.passes.context import PruneContext
    ctx = PruneContext(model=model, config=PruningConfig.from_any({}), example_inputs=inputs)
    start = time.process_time()
    CapturePass(aten_trace=trace)(ctx)
    return time.process_time() - start, ctx


def _ops(ctx) -> list[str]:
    return [str(n.target) for n in ctx.graph_module.graph.nodes
            if n.op == "call_function" and "_assert_tensor_metadata" not in str(n.target)]


def warm(name: str, reps: int) -> dict:
    import torch
    torch.set_num_threads(1)
    import coverage_models
    model, inputs = coverage_models.build(name)
    _, a = _capture(model, inputs, True)
    _, b = _capture(model, inputs, False)
    assert a.capture_method == "aten_trace", a.capture_method
    same = _ops(a) == _ops(b)
    times = {True: [], False: []}
    for rep in range(reps):
        for trace in ((True, False) if rep % 2 == 0 else (False, True)):
            times[trace].append(_capture(model, inputs, trace)[0])
    return {"trace": times[True], "export": times[False], "same_ops": same, "ops": len(_ops(a))}


def cold(name: str, trace: bool) -> float:
    import torch
    torch.set_num_threads(1)
    import coverage_models
    import fxprune  # noqa: F401  (imported before the clock, as a user's script has it)
    model, inputs = coverage_models.build(name)
    return _capture(model, inputs, trace)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-cold", action="store_true", help="skip the fresh-process runs")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        out = warm(job["model"], job["reps"]) if job["kind"] == "warm" else cold(job["model"], job["trace"])
        print(json.dumps(out))
        return

    def run(job: dict):
        p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                           capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{job}: {p.stderr[-2000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    print(f"capture CPU seconds, 1 thread; warm: fastest / median of {args.reps}, alternating")
    head = ("model", "ops", "same ops", "trace warm", "export warm", "ratio", "trace cold", "export cold")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in args.models:
        w = run({"kind": "warm", "model": name, "reps": args.reps})
        t, e = min(w["trace"]), min(w["export"])
        row = [name, str(w["ops"]), "yes" if w["same_ops"] else "NO",
               f"{t:.3f} / {statistics.median(w['trace']):.3f}",
               f"{e:.3f} / {statistics.median(w['export']):.3f}", f"{t / e:.2f}"]
        if args.no_cold:
            row += ["-", "-"]
        else:
            row += [f"{run({'kind': 'cold', 'model': name, 'trace': tr}):.2f}" for tr in (True, False)]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
