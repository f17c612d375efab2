"""Compaction coverage against Torch-Pruning: how much of a model channel compaction removes, and
how fast (docs/compact.md, "Coverage").

    python bench/compact_coverage.py                                  # every model, with the peer if found
    python bench/compact_coverage.py --models llama t5 --reps 3
    python bench/compact_coverage.py --peer-python /path/to/venv/bin/python   # or make bench-compact-peer

Every model of ``bench/coverage_models.py`` (random weights, mid sizes said there) is pruned with
``1xchannel`` at ``--sparsity`` (0.3, ``pruning_scope: local``, ``exclude_last_linear`` as by
default) and ``compact=True``, and reported:

- params kept (whole model; for models with a ``layers`` stack, also the layers alone: a
  decoder's parameters without embeddings and head),
- coupled channel units (one class of channels removed together: a channel, a head, a group),
  how many are blocked (% of all units) apart from those under a LayerNorm (whose channels reach
  a ``layer_norm``, whatever blocked them first), which stay blocked for exactness and are
  counted alone, with every reason,
- whether the compacted model equals the masked one (``compact=False``, same masks) on fresh
  inputs (rtol 1e-4 of the output's largest magnitude),
- FLOPs before and after (``fxprune.flops``) and any FLOP-bearing op the counter does not count,
- transform time: CPU time (``time.process_time``) with one thread, from the same starting point
  on both sides (the model built and in eval mode, its example inputs at hand) to a pruned model:

  - fxprune: ``fxprune.transform(model, config, inputs, inplace=True, compact=True)``, all of it:
    the capture (one recorded eager forward), discovery, channel analysis, scores, the coupled
    class selection, the rewrite (the masked model), the sparsity report, then the slicing, the
    exactness check (one plain forward each of the masked and the compacted model, compared),
    the FLOPs before and after, the Hugging Face config update, and the report's ``compaction``
    entry. ``inplace=True`` because Torch-Pruning prunes in place; the default copy of the model
    is not timed.
  - Torch-Pruning: ``MetaPruner(model, inputs, ...)`` (its ``DependencyGraph``, built by tracing
    one eager forward's autograd graph) and ``pruner.step()`` (magnitude importance and the
    physical pruning), ``local`` at the same ratio, magnitude importance, last linear ignored,
    heads declared as its examples do. It makes no exactness check, counts no FLOPs and writes
    no report; the head attributes its examples fix by hand afterwards are not timed.

  Each job is its own process and prunes two copies of the model: the first run is *cold* (one
  call in a fresh process, after the imports: the modules torch.export loads on first use, about
  3 s, are imported beforehand as ``torch_pruning`` is), the second *warm*. The two tools
  alternate (fxprune first in odd repetitions, the peer in even ones); the coverage table shows
  the fastest of ``--reps``, and the time table every run, the fastest and the median, with the
  load average before and after (``--time-only`` prints the time table alone, without the
  coverage checks).

Torch-Pruning is an optional bench extra in its own virtual environment (``make
bench-compact-peer``: torch 2.13.0 first, then torch-pruning 1.6.1 and transformers). Without it
(or ``--no-peer``) the peer columns say so.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
RTOL = 1e-4
# op-name fragments of ops that do multiply-accumulates (everything else the counter leaves out
# on purpose: elementwise ops, norms, softmax, as torch.utils.flop_counter does)
FLOP_BEARING = re.compile(r"conv|mm|matmul|linear|einsum|attention|dot|mv\b|addr|lstm|gru|rnn|bilinear|tensordot")


# ---------------------------------------------------------------------- workers (one per process)
def _outputs(out) -> list:
    import torch
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        out = out.to_tuple() if hasattr(out, "to_tuple") else tuple(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _outputs(o)]
    return []


def _run(model, inputs):
    import torch
    with torch.no_grad():
        return _outputs(model(**inputs) if isinstance(inputs, dict) else model(*inputs))


def _decoder_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".layers." in f".{n}")


def _mismatch(a_list, b_list) -> float | None:
    """Largest |a - b| relative to max |b| over the outputs; None when shapes differ."""
    worst = 0.0
    for a, b in zip(a_list, b_list):
        if a.shape != b.shape:
            return None
        if a.is_floating_point():
            worst = max(worst, float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12))
    return worst


def uncounted_ops(model, inputs) -> list[str]:
    """FLOP-bearing ops the model runs that ``fxprune.flops.flop_counter`` has no formula for."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from fxprune.flops import flop_counter

    seen: set = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func._overloadpacket)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record():
        _run(model, inputs)
    counted = set(flop_counter().flop_registry)
    return sorted(str(op) for op in seen if op not in counted and FLOP_BEARING.search(str(op).split(".")[-1]))


def fxprune_worker(job: dict) -> dict:
    import torch
    torch.set_num_threads(1)
    import torch.export._trace  # noqa: F401  (its imports, ~3 s, are not pruning: like import torch_pruning)

    import fxprune
    from coverage_models import MODELS, build

    name = job["model"]
    model, inputs = build(name)
    params = sum(p.numel() for p in model.parameters())
    decoder = _decoder_params(model)
    config = {"pattern": "1xchannel", "target_sparsity": job["sparsity"], "pruning_scope": "local"}
    subjects = [_copy(model), _copy(model)]  # the first run is cold (one-time set-up), the second warm
    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the target-missed warning: the table says it
        for subject in subjects:
            start = time.process_time()
            compacted = fxprune.transform(subject, config, inputs, inplace=True, compact=True)
            times.append(time.process_time() - start)
    result = {"seconds": times[0], "warm": times[1]}
    if not job["full"]:
        return result
    c = fxprune.sparsity_report(compacted).compaction
    masked, plan = _masked(model, config, inputs)
    layer_norm_roots = _roots_under(plan, "layer_norm")
    blocked = {r: why for r, why in plan.blocked.items() if r in plan.classes}
    ln = {r for r in blocked if r in layer_norm_roots}
    reasons = Counter(_short(why) for r, why in blocked.items() if r not in ln)
    ln_reasons = Counter(_short(why) for r, why in blocked.items() if r in ln)
    fresh = MODELS[name][1](1)
    mismatch = _mismatch(_run(compacted.eval(), fresh), _run(masked.eval(), fresh))
    failed = [b["reason"] for g in c["groups"] for b in g["blocked"] if b["reason"].startswith("not compacted")]
    result.update({
        "params": params, "kept": c["params_after"] / params,
        "decoder_kept": _decoder_params(compacted) / decoder if decoder else None,
        "units": len(plan.classes), "blocked": len(blocked) - len(ln), "layer_norm": len(ln),
        "removed": sum(g["removed"] for g in c["groups"]),
        "reasons": reasons.most_common(), "ln_reasons": ln_reasons.most_common(3), "failed": failed,
        "mismatch": mismatch, "flops": [c["flops_before"], c["flops_after"]],
        "uncounted": sorted(set(uncounted_ops(model, inputs)) | set(uncounted_ops(compacted, fresh)))})
    return result


def _copy(model):
    import copy
    return copy.deepcopy(model)


def _masked(model, config, inputs):
    """The masked model (same masks as compact=True) and the channel plan behind it."""
    from fxprune.passes import CAPTURE_PASSES, PRUNE_PASSES, PassManager
    from fxprune.transform import _context

    ctx = _context(model, config, inputs, inplace=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PassManager([p() for p in (*CAPTURE_PASSES, *PRUNE_PASSES)]).run(ctx)
    return ctx.model, ctx.compaction


def _roots_under(plan, op: str) -> set[int]:
    """Class roots whose channels reach an op named ``op`` (a LayerNorm): the first channel-
    carrying values on each path back from its input, whatever blocked them first."""
    import numpy as np
    from torch import fx

    from fxprune.aten import op_name
    from fxprune.compaction import Chan

    an, roots = plan.analysis, set()
    for node in an.gm.graph.nodes:
        if node.op != "call_function" or op not in op_name(node) or not node.args:
            continue
        stack, seen = [(node.args[0], 0)], set()
        while stack:
            n, depth = stack.pop()
            if not isinstance(n, fx.Node) or n in seen or depth > 8:
                continue
            seen.add(n)
            v = an.values.get(n)
            if isinstance(v, Chan):
                roots.update(np.unique(an.roots(v.atoms)).tolist())
            else:
                stack += [(a, depth + 1) for a in n.all_input_nodes]
    return roots


def _short(reason: str) -> str:
    """A reason without the layer names that make every block's reason unique."""
    reason = re.sub(r"\([^()]*\)", "(...)", reason)
    reason = re.sub(r"\b[\w]+(\.[\w]+)+\b", "<name>", reason)
    return reason[:160]


def peer_worker(job: dict) -> dict:
    import torch
    torch.set_num_threads(1)
    import torch_pruning as tp
    from coverage_models import MODELS, build

    name = job["model"]
    model, inputs = build(name)
    family = MODELS[name][2]
    params, decoder = sum(p.numel() for p in model.parameters()), _decoder_params(model)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    kwargs = {"ignored_layers": [last], "num_heads": {}}
    for m in model.modules():  # heads declared as Torch-Pruning's examples do
        if family == "mha" and isinstance(m, torch.nn.MultiheadAttention):
            kwargs["num_heads"][m] = m.num_heads
        elif family == "vit_hf" and hasattr(m, "attention_head_size"):
            kwargs["num_heads"].update({m.query: m.num_attention_heads, m.key: m.num_attention_heads,
                                        m.value: m.num_attention_heads})
        elif family == "decoder" and hasattr(m, "q_proj"):
            cfg = model.config
            kwargs["num_heads"].update({m.q_proj: cfg.num_attention_heads, m.k_proj: cfg.num_key_value_heads,
                                        m.v_proj: cfg.num_key_value_heads})
        elif family == "t5" and hasattr(m, "relative_attention_num_buckets"):
            kwargs["num_heads"].update({m.q: m.n_heads, m.k: m.n_heads, m.v: m.n_heads})
    if family == "decoder":  # prune_llm.py's setting: whole heads (RoPE needs head_dim), round to 4
        kwargs.update(prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=job["sparsity"], round_to=4)
    if family in ("decoder", "t5", "vit_hf"):
        kwargs["output_transform"] = lambda out: out.logits
    result = {"version": tp.__version__}
    times = []
    for subject in (_copy(model), model):  # cold, then warm; the warm run prunes the model itself
        start = time.process_time()
        try:
            pruner = tp.pruner.MetaPruner(subject, inputs, importance=tp.importance.MagnitudeImportance(p=1),
                                          global_pruning=False, pruning_ratio=job["sparsity"],
                                          **_for(subject, model, kwargs))
            pruner.step()
        except Exception as e:
            result.update(seconds=time.process_time() - start, error=f"{type(e).__name__}: {str(e)[:200]}")
            return result
        times.append(time.process_time() - start)
    result.update(seconds=times[0], warm=times[1])
    if not job["full"]:
        return result
    _fix_heads(model, family)
    result.update(kept=sum(p.numel() for p in model.parameters()) / params,
                  decoder_kept=_decoder_params(model) / decoder if decoder else None)
    try:
        _run(model, MODELS[name][1](1))
        result["forward"] = "ok"
    except Exception as e:
        result["forward"] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return result


def _for(subject, model, kwargs: dict) -> dict:
    """``kwargs`` (which name modules of ``model``) for a deep copy of it."""
    if subject is model:
        return kwargs
    same = dict(zip(model.modules(), subject.modules()))
    return {**kwargs, "ignored_layers": [same[m] for m in kwargs["ignored_layers"]],
            "num_heads": {same[m]: n for m, n in kwargs["num_heads"].items()}}


def _fix_heads(model, family) -> None:
    """The module attributes Torch-Pruning's examples update by hand after pruning."""
    for m in model.modules():
        if family == "decoder" and hasattr(m, "q_proj"):
            heads, kv = m.q_proj.out_features // m.head_dim, m.k_proj.out_features // m.head_dim
            m.num_key_value_groups = max(heads // max(kv, 1), 1)
            model.config.num_attention_heads, model.config.num_key_value_heads = heads, kv
        elif family == "vit_hf" and hasattr(m, "attention_head_size"):
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features
        elif family == "t5" and hasattr(m, "relative_attention_num_buckets"):
            m.key_value_proj_dim = m.q.out_features // m.n_heads
            m.inner_dim = m.q.out_features


# ---------------------------------------------------------------------- driver
def _spawn(python: str, job: dict, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        res = subprocess.run([python, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                             capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {timeout:.0f} s"}
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"worker failed: {tail[:200]}"}
    return json.loads(lines[-1])


def peer_python(args) -> str | None:
    if args.no_peer:
        return None
    for candidate in (args.peer_python, os.environ.get("FXPRUNE_BENCH_TP_PYTHON"), str(ROOT / ".venv-tp/bin/python")):
        if candidate and Path(candidate).exists():
            probe = subprocess.run([candidate, "-c", "import torch_pruning"], capture_output=True)
            if probe.returncode == 0:
                return candidate
    return None


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def main(argv=None) -> int:
    from coverage_models import MODELS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--reps", type=int, default=2, help="timed runs of each tool (alternating)")
    ap.add_argument("--peer-python", default=None, help="an interpreter with torch_pruning")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--timeout", type=float, default=300, help="seconds a worker may run (wall)")
    ap.add_argument("--time-only", action="store_true", help="the transform time table alone")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        out = (peer_worker if job["tool"] == "peer" else fxprune_worker)(job)
        print(json.dumps(out))
        return 0
    peer = peer_python(args)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    log(f"peer: {peer or 'none (make bench-compact-peer or --peer-python)'}")
    rows, load = [], os.getloadavg()
    for name in args.models:
        runs = {"fxprune": [], "peer": []}
        for rep in range(args.reps):
            order = ["fxprune", "peer"] if rep % 2 == 0 else ["peer", "fxprune"]
            for tool in order:
                if tool == "peer" and not peer:
                    continue
                job = {"tool": tool, "model": name, "sparsity": args.sparsity,
                       "full": rep == 0 and not args.time_only}
                out = _spawn(peer if tool == "peer" else sys.executable, job, args.timeout)
                runs[tool].append(out)
                log(f"{name} {tool} rep {rep}: " + (out.get("error") or f"{out['seconds']:.2f}s / {out['warm']:.2f}s CPU"))
        rows.append((name, runs))
    if not args.time_only:
        print(table(rows, args.sparsity))
        print()
    print(time_table(rows, args.sparsity, load, os.getloadavg()))
    return 0


def time_table(rows, sparsity, load_before, load_after) -> str:
    """Every timed run of both tools, cold and warm, with the fastest and the median."""
    import statistics

    def runs(results, key):  # runs that finished (a crashed peer run has a time, not a warm one)
        return [r[key] for r in results if "warm" in r]

    def cell(values):
        if not values:
            return "-"
        return (" ".join(f"{v:.2f}" for v in values)
                + f" (min {min(values):.2f}, median {statistics.median(values):.2f})")

    def ratio(a, b, f):
        return f"{f(a) / f(b):.2f}" if a and b else "-"

    head = ("model", "fxprune cold", "tp cold", "fxprune warm", "tp warm",
            "fxprune / tp cold (min, median)", "fxprune / tp warm (min, median)")
    lines = [f"transform time, 1xchannel at {sparsity}, local: CPU s with 1 thread, every run in "
             f"the order made (tools alternating); load average {load_before[0]:.1f} before, "
             f"{load_after[0]:.1f} after",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows:
        fc, fw = runs(r["fxprune"], "seconds"), runs(r["fxprune"], "warm")
        tc, tw = runs(r["peer"], "seconds"), runs(r["peer"], "warm")
        med = statistics.median
        lines.append("| " + " | ".join([
            name, cell(fc), cell(tc), cell(fw), cell(tw),
            f"{ratio(fc, tc, min)}, {ratio(fc, tc, med)}", f"{ratio(fw, tw, min)}, {ratio(fw, tw, med)}"]) + " |")
    return "\n".join(lines)


def table(rows, sparsity) -> str:
    head = ("model", "params (M)", "params kept", "tp kept", "units", "blocked (excl. LN)",
            "LN-blocked", "removed", "compacted == masked", "GFLOPs before -> after", "uncounted FLOP ops",
            "fxprune CPU s (cold / warm)", "tp CPU s (cold / warm)", "fxprune / tp (cold / warm)", "tp result")
    lines = [f"1xchannel at {sparsity}, local; CPU seconds with 1 thread, fastest run",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for name, runs in rows:
        fx, tp = runs["fxprune"][0], (runs["peer"][0] if runs["peer"] else None)
        if "error" in fx:
            lines.append(f"| {name} | fxprune: {fx['error']} |")
            continue
        fx_s = min(r["seconds"] for r in runs["fxprune"] if "seconds" in r)
        fx_w = min(r["warm"] for r in runs["fxprune"] if "warm" in r)
        tp_s = min((r["seconds"] for r in runs["peer"] if "warm" in r), default=None)
        tp_w = min((r["warm"] for r in runs["peer"] if "warm" in r), default=None)
        kept = _pct(fx["kept"]) + (f" (layers {_pct(fx['decoder_kept'])})" if fx["decoder_kept"] else "")
        if tp is None:
            tp_kept, tp_result = "-", "no peer"
        elif "error" in tp:
            tp_kept, tp_result = "-", f"crashes: {tp['error'][:80]}"
        else:
            tp_kept = _pct(tp["kept"]) + (f" (layers {_pct(tp['decoder_kept'])})" if tp["decoder_kept"] else "")
            tp_result = "forward ok" if tp["forward"] == "ok" else f"forward {tp['forward'][:80]}"
        eq = "shape differs" if fx["mismatch"] is None else (
            f"yes ({fx['mismatch']:.1e})" if fx["mismatch"] <= RTOL else f"NO ({fx['mismatch']:.1e})")
        flops = fx["flops"]
        lines.append("| " + " | ".join([
            name, f"{fx['params'] / 1e6:.2f}", kept, tp_kept, str(fx["units"]),
            f"{fx['blocked']} ({fx['blocked'] / max(fx['units'], 1):.1%})",
            f"{fx['layer_norm']} ({fx['layer_norm'] / max(fx['units'], 1):.1%})", str(fx["removed"]), eq,
            f"{flops[0] / 1e9:.3f} -> {flops[1] / 1e9:.3f}", ", ".join(fx["uncounted"]) or "none",
            f"{fx_s:.2f} / {fx_w:.2f}", "-" if tp_s is None else f"{tp_s:.2f} / {tp_w:.2f}",
            "-" if tp_s is None else f"{fx_s / tp_s:.1f} / {fx_w / tp_w:.1f}", tp_result]) + " |")
        for why, n in fx["reasons"]:
            notes.append(f"- {name}: {n} blocked: {why}")
        for why, n in fx["ln_reasons"]:
            notes.append(f"- {name}: {n} under LayerNorm, blocked by: {why}")
        for why in fx["failed"]:
            notes.append(f"- {name}: {why}")
    return "\n".join(lines + ([""] + notes if notes else []))


if __name__ == "__main__":
    raise SystemExit(main())
