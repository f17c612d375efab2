"""One-shot LLM pruning: fxprune beside llm-compressor, on the same Llama models and calibration.

    python bench/llm.py [--quick] [--only trained|depth] [--reps 2] [--peer-python PATH | --no-peer]
                        [--cache-dir DIR] [--markdown FILE] [--profile]

Two parts, every run in its own subprocess, fxprune and llm-compressor alternating (fxprune first
in odd repetitions, the peer first in even ones), same thread count (``--threads``, 2):

1. **trained**: a small Llama (``LlamaConfig`` hidden 256, FFN 688, 8 heads, 4 blocks, byte-level
   vocabulary of 256) trained here for 300 steps of 8 x 128 bytes on the Python standard library's
   sources with ``bench/quality.py``'s corpus and training loop (once: the model is cached as
   safetensors). Methods: SparseGPT 2:4, SparseGPT 50 % unstructured, Wanda
   2:4, on every decoder Linear (not the embeddings, not ``lm_head``), local scope, 16 calibration
   sequences of 128 bytes from the training text. Measured: wall time of the pruning call, peak
   RSS above the loaded model, block forwards (calls of the decoder layers' forward, counted with
   hooks: load-independent; calls made while tracing with fake tensors are counted apart), and
   perplexity per byte on held-out files (evaluated afterwards in this process, the same code for
   both tools' outputs). Targets: fxprune time <= 0.5 x the peer's, RSS <= the peer's, perplexity
   <= the peer's.
2. **depth**: random-init Llama from ``LlamaConfig(hidden_size=512, intermediate_size=1376,
   num_attention_heads=8, vocab_size=8000)`` at 4 and 16 blocks (``--quick``: 2 and 8), 16 random
   sequences of 128 tokens, SparseGPT and Wanda 2:4: time at the deep model / time at the shallow
   one (target <= 4.5: linear in depth), with block forwards.

fxprune gets ``calibration=`` 16 batches of one sequence (``--fx-calib-batch`` changes it), the
peer a DataLoader of the same 16 sequences with batch size 1 (``oneshot``'s default);
fxprune runs ``transform(..., inplace=True)``, llm-compressor
``oneshot(model, dataset=loader, recipe=[SparseGPTModifier | WandaPruningModifier])`` with
``targets=["LlamaDecoderLayer"]`` (its default pipeline: sequential, layer by layer).

Models and calibration are cached under ``--cache-dir`` (default ``$FXPRUNE_BENCH_CACHE``, else
``~/.cache/fxprune-bench``); they are made only when missing. ``--profile`` runs fxprune once per
case under cProfile instead of the tables and prints the top functions.

**The peer** (llm-compressor) is optional and lives in its own virtual environment, never in
fxprune's (it pins its own transformers)::

    make bench-llm-peer        # python3 -m venv .venv-llmc; pip install torch==2.13.0 (first, so
                               # pip keeps the CPU build); pip install llmcompressor==0.14.0.1

The bench uses ``--peer-python``, else ``$FXPRUNE_BENCH_PEER_PYTHON``, else
``.venv-llmc/bin/python`` when it exists; without one (or with ``--no-peer``) the peer columns
say so and only fxprune runs.

On a shared, loaded machine wall times are noise: ``--threads 1 --time cpu`` compares the CPU
time of the pruning calls instead (one thread: what each call takes alone on one core).

``--fx-variant KEY=VALUE[,KEY=VALUE]`` adds fxprune with those config keys as one more tool in
the alternation (e.g. ``true_sequential=true``); ``--calib-seeds 1 2 3`` runs the trained part
once per calibration draw (16 x 128 bytes of the training text drawn with that seed), to tell a
difference in perplexity from the noise of one draw.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SEQ = 128                 # calibration and evaluation sequence length (tokens)
CALIB_SEQUENCES = 16
CALIB_SEED = 123          # the trained model's calibration draw
TARGET = 0.5

# The trained model: small enough to train in minutes on 2 cores, shaped like the depth models
# (FFN / hidden = 1376 / 512, 8 heads), byte-level so no tokenizer is needed.
TRAINED = dict(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=SEQ,
               tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
TRAINING = dict(steps=300, batch=8, lr=3e-3, seed=0)
HELD_OUT_WINDOWS = 128    # held-out windows of SEQ bytes for perplexity
DEPTH = dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=SEQ, tie_word_embeddings=False)

# label -> (fxprune pruning_type, fxprune pattern, peer modifier, peer mask_structure)
METHODS = {
    "SparseGPT 2:4": ("sparse_gpt", "2:4", "SparseGPTModifier", "2:4"),
    "SparseGPT 50%": ("sparse_gpt", "1x1", "SparseGPTModifier", "0:0"),
    "Wanda 2:4": ("activation", "2:4", "WandaPruningModifier", "2:4"),
}
DEPTH_METHODS = ["SparseGPT 2:4", "Wanda 2:4"]
PEER = "llm-compressor"
BASELINE = "fxprune (baseline)"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ====================================================================== worker (one run)
# Runs in fxprune's interpreter or in the peer's: imports nothing from fxprune or the other bench
# scripts at module level.
def worker(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    sys.path.insert(0, str(BENCH_DIR))
    from measure import Phase, proc_status

    prune = _peer_runner(job) if job["tool"] == PEER else _fxprune_runner(job)
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = LlamaForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    # from_pretrained maps the safetensors file: a weight's pages become resident only when first
    # read. Read every weight now, so "loaded" holds the whole model and the peak above it is
    # the tool's own work, not the page-in of weights it happens to read first.
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    calib = torch.load(job.get("calibration") or Path(job["model_dir"]) / "calibration.pt")
    counts = {"real": 0, "traced": 0}

    def count(module, args, kwargs):
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        counts["real" if type(x) is torch.Tensor else "traced"] += 1

    for layer in model.model.layers:
        layer.register_forward_pre_hook(count, with_kwargs=True)
    run = prune(model, calib)   # builds its inputs; the pruning itself runs in run()
    loaded = proc_status("VmRSS:")
    profiler = None
    if job.get("profile"):
        import cProfile
        profiler = cProfile.Profile()
    with Phase() as phase:
        cpu0 = time.process_time()
        if profiler is not None:
            profiler.enable()
        run()
        if profiler is not None:
            profiler.disable()
        cpu = time.process_time() - cpu0
    result = {"seconds": phase.seconds, "cpu_s": cpu, "peak_mb": phase.peak / 2**20,
              "loaded_mb": loaded / 2**20,
              "forwards": counts["real"], "traced_forwards": counts["traced"],
              **sparsity_stats(model, job["pattern_check"])}
    if profiler is not None:
        profiler.dump_stats(job["profile"])
    if job.get("save"):
        from safetensors.torch import save_file
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, job["save"])
    return result


def _fxprune_runner(job):
    import fxprune

    crit, pattern = METHODS[job["method"]][:2]
    config = {"pruning_type": crit, "pattern": pattern, "target_sparsity": TARGET,
              "pruning_scope": "local", **job.get("fx_config", {})}

    def prepare(model, calib):
        b = job["fx_calib_batch"]
        batches = [calib[i:i + b] for i in range(0, len(calib), b)]
        return lambda: fxprune.transform(model, config, (batches[0],), inplace=True,
                                         calibration=batches)
    return prepare


def _peer_runner(job):
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    _, _, modifier, structure = METHODS[job["method"]]
    modifier = {"SparseGPTModifier": SparseGPTModifier,
                "WandaPruningModifier": WandaPruningModifier}[modifier]

    def prepare(model, calib):
        rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in calib]
        loader = torch.utils.data.DataLoader(rows, batch_size=1)
        # oneshot insists on a processor whenever a dataset is given, even a tokenized
        # DataLoader that it passes through untouched: a one-token stand-in.
        stand_in = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
        recipe = [modifier(sparsity=TARGET, mask_structure=structure,
                           targets=["LlamaDecoderLayer"])]
        return lambda: oneshot(model=model, dataset=loader, recipe=recipe, processor=stand_in,
                               num_calibration_samples=len(calib), max_seq_length=SEQ)
    return prepare


def sparsity_stats(model, pattern: str | None) -> dict:
    """Zeros of the decoder Linears (all, least and most pruned layer), N:M validity, and the
    zeros of the weights that must stay dense (embeddings, lm_head)."""
    import torch

    zeros = total = 0
    per_layer, nm_ok = [], True
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.detach()
            z = int((w == 0).sum())
            zeros, total = zeros + z, total + w.numel()
            per_layer.append(z / w.numel())
            if pattern:
                n, m = map(int, pattern.split(":"))
                nm_ok &= bool(((w.reshape(-1, m) != 0).sum(1) <= m - n).all())
    dense = [model.model.embed_tokens.weight, model.lm_head.weight]
    return {"sparsity": zeros / max(total, 1), "layer_min": min(per_layer), "layer_max": max(per_layer),
            "nm_ok": nm_ok if pattern else None,
            "dense_zeros": sum(int((w == 0).sum()) for w in dense)}


# ====================================================================== models and calibration
def cache_root(arg: str | None) -> Path:
    return Path(arg or os.environ.get("FXPRUNE_BENCH_CACHE") or
                Path.home() / ".cache" / "fxprune-bench").expanduser()


def _tag(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def _write_model_dir(final: Path, model, calibration) -> None:
    """Save the model (safetensors) and its calibration ids, all or nothing."""
    import torch

    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        torch.save(calibration, tmp / "calibration.pt")
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _llama(cfg: dict, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def trained_model(cache: Path):
    """The trained byte-level Llama (trained now if not cached), the held-out text and the dense
    perplexity on it."""
    import quality
    import torch

    path = cache / f"llama-stdlib-{_tag(TRAINED, TRAINING, SEQ, CALIB_SEQUENCES)}"
    train, held = quality.stdlib_corpus(4_000_000, 400_000)
    if not (path / "model.safetensors").exists():
        log(f"training the Llama ({TRAINING['steps']} steps of {TRAINING['batch']} x {SEQ} bytes; "
            f"once, cached in {path})")
        start = time.time()
        model = _llama(TRAINED, TRAINING["seed"])
        quality.train_lm(model, train, steps=TRAINING["steps"], lr=TRAINING["lr"],
                         seed=TRAINING["seed"], batch=TRAINING["batch"], log_every=25)
        g = torch.Generator().manual_seed(CALIB_SEED)
        calib = quality.lm_batch(train, CALIB_SEQUENCES, g)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_model_dir(path, model.eval(), calib)
        log(f"trained in {time.time() - start:.0f}s")
    return path, held, perplexity_of(path, None, held)


def trained_calibration(cache: Path, seed: int | None) -> Path | None:
    """The trained model's calibration drawn with ``seed`` (None: the one saved with the model)."""
    import quality
    import torch

    if seed is None:
        return None
    path = cache / "calibration" / f"stdlib-{_tag(TRAINED, TRAINING, SEQ, CALIB_SEQUENCES)}-{seed}.pt"
    if not path.exists():
        train, _ = quality.stdlib_corpus(4_000_000, 400_000)
        ids = quality.lm_batch(train, CALIB_SEQUENCES, torch.Generator().manual_seed(seed))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ids, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    return path


def random_model(cache: Path, blocks: int) -> Path:
    import torch

    cfg = {**DEPTH, "num_hidden_layers": blocks}
    path = cache / f"llama-random-{blocks}b-{_tag(cfg, SEQ, CALIB_SEQUENCES)}"
    if not (path / "model.safetensors").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(1)
        calib = torch.randint(0, DEPTH["vocab_size"], (CALIB_SEQUENCES, SEQ), generator=g)
        _write_model_dir(path, _llama(cfg, 0).eval(), calib)
    return path


def perplexity_of(model_dir: Path, weights: Path | None, held) -> float:
    import quality
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if weights is not None:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(weights))
    return quality.perplexity(model, held, HELD_OUT_WINDOWS)


# ====================================================================== running the jobs
def peer_python(args) -> tuple[str | None, str]:
    """The peer's interpreter and its versions, or None and why not."""
    if args.no_peer:
        return None, "--no-peer"
    candidates = [args.peer_python, os.environ.get("FXPRUNE_BENCH_PEER_PYTHON"),
                  str(REPO / ".venv-llmc" / "bin" / "python")]
    explicit = args.peer_python or os.environ.get("FXPRUNE_BENCH_PEER_PYTHON")
    exe = next((c for c in candidates if c and Path(c).exists()), None)
    if exe is None:
        why = (f"{explicit} does not exist" if explicit else
               "no peer interpreter (make bench-llm-peer, or --peer-python)")
        return None, why
    probe = ("import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' for p in "
             "('llmcompressor', 'compressed-tensors', 'transformers', 'torch')))")
    res = subprocess.run([exe, "-c", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return None, f"{exe} cannot import llmcompressor: {res.stderr.strip().splitlines()[-1:]}"
    return exe, res.stdout.strip()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in name.replace("%", "pct"))


def run_job(python: str, job: dict, logs: Path) -> dict:
    logs.mkdir(parents=True, exist_ok=True)
    name = _slug(f"{job['model']}-{job['method']}-{job['tool']}")
    errfile = logs / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": job["fxprune_path"], "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"])}
    start = time.time()
    with open(errfile, "w") as err:
        res = subprocess.run([python, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                             stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    lines = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        tail = errfile.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"{job['tool']} {job['method']} on {job['model']} failed "
                           f"(exit {res.returncode}, log {errfile}): " + " | ".join(tail))
    out = json.loads(lines[-1][len("RESULT "):])
    out["process_s"] = time.time() - start
    return out


class Runner:
    def __init__(self, args, peer: str | None, cache: Path):
        self.args, self.peer, self.cache = args, peer, cache
        self.logs = cache / "logs"

    def tools(self) -> dict:
        """tool -> (interpreter, fxprune source tree)."""
        tools = {"fxprune": (sys.executable, self.args.fxprune_path)}
        for spec in self.args.fx_variant or []:
            tools[f"fxprune {spec}"] = (sys.executable, self.args.fxprune_path)
        if self.args.baseline_path:
            tools[BASELINE] = (sys.executable, self.args.baseline_path)
        if self.peer:
            tools[PEER] = (self.peer, self.args.fxprune_path)
        return tools

    def alternate(self, model_label: str, model_dir: Path, method: str, save: bool,
                  calibration: Path | None = None) -> dict:
        """``reps`` runs of each tool, alternating (the order turns by one tool per repetition);
        results[tool] is a list of run dicts."""
        tools = self.tools()
        order = list(tools)
        results = {tool: [] for tool in order}
        pattern = METHODS[method][1] if ":" in METHODS[method][1] else None
        for rep in range(self.args.reps):
            shift = rep % len(order)
            for tool in order[shift:] + order[:shift]:
                job = {"tool": tool, "method": method, "model": model_label,
                       "model_dir": str(model_dir), "threads": self.args.threads,
                       "fxprune_path": tools[tool][1],
                       "fx_calib_batch": self.args.fx_calib_batch, "pattern_check": pattern,
                       "fx_config": fx_config(tool)}
                if calibration is not None:
                    job["calibration"] = str(calibration)
                if save:
                    job["save"] = str(self.cache / "out" / _slug(f"{model_label}-{method}-{tool}-{rep}-{os.getpid()}.safetensors"))
                    Path(job["save"]).parent.mkdir(parents=True, exist_ok=True)
                r = run_job(tools[tool][0], job, self.logs)
                r["time"] = r["cpu_s"] if self.args.time == "cpu" else r["seconds"]
                log(f"  {model_label:>10} {method:14} {tool:18} {r['seconds']:7.2f}s "
                    f"(cpu {r['cpu_s']:6.1f}s)  +{r['peak_mb']:5.0f} MB  {r['forwards']:5d} block "
                    f"fwd (+{r['traced_forwards']} traced)  sparsity {r['sparsity']:.3f}")
                if save:
                    r["weights"] = job["save"]
                results[tool].append(r)
        return results


def fx_config(tool: str) -> dict:
    """The config keys a ``--fx-variant`` tool ("fxprune key=value,key=value") adds (values
    read as JSON, else as strings)."""
    if not tool.startswith("fxprune ") or tool == BASELINE:
        return {}
    out = {}
    for item in tool[len("fxprune "):].split(","):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


# ====================================================================== tables
def _span(values, fmt="{:.1f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("meets" if ok else "**misses**")


def _markdown(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def trained_table(results: dict, dense_ppl: float, basis: str) -> str:
    head = ["method", "tool", f"{basis} s", "peak RSS MB", "block fwd", "ppl", "sparsity",
            "time / peer (<= 0.5)", "RSS <= peer", "ppl <= peer"]
    rows = [["dense", "", "", "", "", f"{dense_ppl:.4f}", "0", "", "", ""]]
    for method, per_tool in results.items():
        peer = per_tool.get(PEER)
        for tool, runs in per_tool.items():
            cells = [method, tool, _span([r["time"] for r in runs], "{:.2f}"),
                     _span([r["peak_mb"] for r in runs], "{:.0f}"),
                     _span([r["forwards"] for r in runs], "{:d}"),
                     _span([r["ppl"] for r in runs], "{:.4f}"), _sparsity_cell(runs)]
            if tool != PEER and tool != BASELINE and peer:
                ratio = min(r["time"] for r in runs) / min(r["time"] for r in peer)
                rss_ok = min(r["peak_mb"] for r in runs) <= min(r["peak_mb"] for r in peer)
                ppl_ok = max(r["ppl"] for r in runs) <= min(r["ppl"] for r in peer)
                cells += [f"{ratio:.2f} {_verdict(ratio <= 0.5)}", _verdict(rss_ok), _verdict(ppl_ok)]
            else:
                cells += ["", "", ""]
            rows.append(cells)
    return _markdown(head, rows)


def _sparsity_cell(runs: list[dict]) -> str:
    cell = _span([r["sparsity"] for r in runs], "{:.3f}")
    if runs[0]["nm_ok"] is not None:
        cell += " 2:4 ok" if all(r["nm_ok"] for r in runs) else " **not 2:4**"
    if any(r["dense_zeros"] for r in runs):
        cell += f" ({max(r['dense_zeros'] for r in runs)} zeros outside the decoder)"
    return cell


def depth_table(results: dict, depths: tuple[int, int], basis: str) -> str:
    shallow, deep = depths
    head = ["method", "tool", *(f"{b} blocks: {basis} s, +MB, fwd" for b in depths),
            f"time {deep}/{shallow} (<= 4.5)"]
    rows = []
    for method, per_depth in results.items():
        for tool in per_depth[shallow]:
            cells = [method, tool]
            for b in depths:
                runs = per_depth[b][tool]
                cells.append(f"{_span([r['time'] for r in runs], '{:.2f}')} s, "
                             f"+{_span([r['peak_mb'] for r in runs], '{:.0f}')}, "
                             f"{_span([r['forwards'] for r in runs], '{:d}')}")
            ratio = (min(r["time"] for r in per_depth[deep][tool]) /
                     min(r["time"] for r in per_depth[shallow][tool]))
            cells.append(f"{ratio:.2f}" + (f" {_verdict(ratio <= 4.5)}" if tool != PEER else ""))
            rows.append(cells)
    return _markdown(head, rows)


# ====================================================================== profile mode
def profile(runner: Runner, cases: list[tuple[str, Path, str]], top: int = 25) -> str:
    import pstats

    out = []
    for label, model_dir, method in cases:
        prof = runner.cache / "profiles" / _slug(f"{label}-{method}.prof")
        prof.parent.mkdir(parents=True, exist_ok=True)
        pattern = METHODS[method][1] if ":" in METHODS[method][1] else None
        job = {"tool": "fxprune", "method": method, "model": label, "model_dir": str(model_dir),
               "threads": runner.args.threads, "fx_calib_batch": runner.args.fx_calib_batch,
               "fxprune_path": runner.args.fxprune_path,
               "pattern_check": pattern, "profile": str(prof)}
        r = run_job(sys.executable, job, runner.logs)
        out.append(f"## {label} {method}: {r['seconds']:.2f}s under cProfile, +{r['peak_mb']:.0f} MB, "
                   f"{r['forwards']} block forwards ({r['traced_forwards']} traced); {prof}")
        for key in ("tottime", "cumulative"):
            import io
            buf = io.StringIO()
            pstats.Stats(str(prof), stream=buf).strip_dirs().sort_stats(key).print_stats(top)
            text = buf.getvalue()
            out.append(f"### by {key}\n" + text[text.find("   ncalls"):].rstrip())
    return "\n\n".join(out)


# ====================================================================== main
def versions(peer_versions: str | None) -> str:
    import importlib.metadata as md

    import torch
    import transformers

    import fxprune
    line = (f"fxprune {fxprune.__version__} ({Path(fxprune.__file__).parent}), torch {torch.__version__}, "
            f"transformers {transformers.__version__}")
    try:
        line += f", safetensors {md.version('safetensors')}"
    except md.PackageNotFoundError:
        pass
    return line + (f"; peer: {peer_versions}" if peer_versions else "")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="one repetition, depth 2 -> 8 blocks instead of 4 -> 16")
    ap.add_argument("--only", choices=["trained", "depth"])
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), help="a subset of the methods")
    ap.add_argument("--reps", type=int, help="runs per tool and case (default 2; --quick 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fx-calib-batch", type=int, default=1,
                    help="sequences per calibration batch given to fxprune (the peer: 1)")
    ap.add_argument("--cache-dir", help="models, calibration, logs (default $FXPRUNE_BENCH_CACHE "
                                         "or ~/.cache/fxprune-bench)")
    ap.add_argument("--peer-python", help="interpreter with llmcompressor installed "
                                          "(default $FXPRUNE_BENCH_PEER_PYTHON, .venv-llmc)")
    ap.add_argument("--no-peer", action="store_true", help="fxprune only")
    ap.add_argument("--fx-variant", action="append", metavar="KEY=VALUE[,KEY=VALUE]",
                    help="also run fxprune with these config keys (JSON values), as one more tool "
                         "in the alternation, e.g. true_sequential=false; repeatable")
    ap.add_argument("--calib-seeds", type=int, nargs="+", metavar="SEED",
                    help="trained part: run every method once per calibration draw (16 x 128 "
                         "bytes of the training text drawn with this seed; the default draw is "
                         f"seed {CALIB_SEED})")
    ap.add_argument("--baseline-path", help="also run the fxprune of this source tree (e.g. an "
                                            "export of main), as a third tool in the alternation")
    ap.add_argument("--time", choices=["wall", "cpu"], default="wall",
                    help="what the tables and ratios compare: wall time of the pruning call, or "
                         "its CPU time (all threads; on a loaded machine with --threads 1 it is "
                         "what the call would take alone on one core)")
    ap.add_argument("--fxprune-path", default=str(REPO),
                    help="the source tree whose fxprune the workers import (default: this one), "
                         "e.g. an export of another branch to compare with")
    ap.add_argument("--profile", action="store_true",
                    help="run fxprune once per case under cProfile and print the top functions")
    ap.add_argument("--markdown", help="also write the tables to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        import warnings
        warnings.filterwarnings("ignore")
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    args.reps = args.reps or (1 if args.quick else 2)
    args.fxprune_path = str(Path(args.fxprune_path).resolve())
    if args.baseline_path:
        args.baseline_path = str(Path(args.baseline_path).resolve())
    basis = {"wall": "wall", "cpu": "CPU"}[args.time]
    sys.path[:0] = [args.fxprune_path, str(BENCH_DIR)]   # the workers' fxprune
    import torch
    torch.set_num_threads(args.threads)
    import warnings
    warnings.filterwarnings("ignore")

    start = time.time()
    cache = cache_root(args.cache_dir)
    peer, peer_info = (None, "--profile") if args.profile else peer_python(args)
    if peer is None and not args.profile:
        log(f"llm-compressor: not run ({peer_info})")
    runner = Runner(args, peer, cache)
    methods = args.methods or list(METHODS)
    depths = (2, 8) if args.quick else (4, 16)
    sections = []
    trained_dir = dense_ppl = held = None
    if args.only in (None, "trained"):
        trained_dir, held, dense_ppl = trained_model(cache)
        log(f"trained Llama: {trained_dir}, dense ppl {dense_ppl:.3f}")
    depth_dirs = {b: random_model(cache, b) for b in depths} if args.only in (None, "depth") else {}

    if args.profile:
        cases = [("trained", trained_dir, m) for m in methods if trained_dir]
        cases += [(f"{b}-block", d, m) for b, d in depth_dirs.items()
                  for m in methods if m in DEPTH_METHODS]
        print(profile(runner, cases))
        return

    if trained_dir:
        results = {}
        for method in methods:
            for seed in args.calib_seeds or [None]:
                key = method if seed is None else f"{method}, calibration seed {seed}"
                results[key] = runner.alternate("trained", trained_dir, method, save=True,
                                                calibration=trained_calibration(cache, seed))
                for runs in results[key].values():
                    for r in runs:
                        r["ppl"] = perplexity_of(trained_dir, Path(r["weights"]), held)
                        Path(r["weights"]).unlink()
        sections.append(f"### Trained Llama ({TRAINED['num_hidden_layers']} blocks, hidden "
                        f"{TRAINED['hidden_size']}, FFN {TRAINED['intermediate_size']}, byte "
                        f"vocabulary), {CALIB_SEQUENCES} x {SEQ} calibration, local scope, "
                        f"{args.threads} threads, {args.reps} alternating run(s) per tool\n\n"
                        + trained_table(results, dense_ppl, basis))
    if depth_dirs:
        results = {}
        for method in [m for m in methods if m in DEPTH_METHODS]:
            results[method] = {b: runner.alternate(f"{b}-block", d, method, save=False)
                               for b, d in depth_dirs.items()}
        if results:
            sections.append(f"### Depth: random-init Llama (hidden 512, FFN 1376, 8 heads, vocab "
                            f"8000), 2:4 at 0.5, {CALIB_SEQUENCES} x {SEQ} random ids, "
                            f"{args.threads} threads, {args.reps} alternating run(s) per tool\n\n"
                            + depth_table(results, depths, basis))
    text = "\n\n".join(sections)
    text += (f"\n\nTimes: {basis} time of the pruning call, min-max over the runs (ratios use "
             f"the fastest run of each); peak RSS above the loaded model."
             + (f" Baseline: the fxprune of {args.baseline_path}." if args.baseline_path else "")
             + f" {versions(peer_info if peer else None)}. "
             f"Total {time.time() - start:.0f}s.")
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
