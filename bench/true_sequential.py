"""True sequential pruning inside a block: is the quality gain more than noise?

    python bench/true_sequential.py [--seeds 4] [--orders 2] [--methods ...] [--markdown FILE]

On ``bench/llm.py``'s trained Llama (4 blocks, hidden 256, trained on the standard library's
sources; trained and cached by that script when missing), for SparseGPT 2:4, SparseGPT 50 % and
Wanda 2:4 (local scope, every decoder Linear), with ``true_sequential`` off and on:

- several **calibration draws** (16 x 128 bytes of the training text per seed; the first seed
  is the one ``bench/llm.py`` uses), and for each draw, besides the given order, ``--orders - 1``
  **shuffled orders** of the same sequences (same data, another float summation order: the
  noise floor of the statistics);
- per run: held-out perplexity per byte (128 windows, as ``bench/llm.py``), the **layer-wise
  output error** ``sum ||W X - W' X||^2 / sum ||W X||^2`` of every decoder Linear on held-out
  inputs (32 windows; ``X`` the layer's input in the pruned model, ``W`` the dense weight, ``W'``
  the pruned one: what each layer's solve minimises on its calibration), the relative error of
  the last block's hidden states against the dense model's on the same held-out text, CPU time
  of the pruning call (one thread), block forwards and recording stages (the sparsity report).

Prints one table per method and a summary: the mean change of each measure, how many runs
improved, and the spread between orders (the noise floor).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import llm  # noqa: E402  (the trained model, its cache and the methods)
import quality  # noqa: E402

import fxprune  # noqa: E402

ERROR_WINDOWS = 32


def load(model_dir: Path):
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def calibration(train: torch.Tensor, seed: int, order: int) -> torch.Tensor:
    ids = quality.lm_batch(train, llm.CALIB_SEQUENCES, torch.Generator().manual_seed(seed))
    if order:
        ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(1000 + order))]
    return ids


def layer_errors(dense, pruned, held: torch.Tensor) -> tuple[dict[str, float], float]:
    """Per decoder Linear: sum ||(W - W') x||^2 / sum ||W x||^2 over the pruned model's inputs on
    held-out windows; and the last block's relative hidden-state error against the dense model."""
    n = min(ERROR_WINDOWS, len(held) // llm.SEQ)
    ids = held[: n * llm.SEQ].reshape(n, llm.SEQ)
    dense_w = {name: m.weight.detach() for name, m in dense.model.layers.named_modules()
               if isinstance(m, torch.nn.Linear)}
    num = dict.fromkeys(dense_w, 0.0)
    den = dict.fromkeys(dense_w, 0.0)
    handles = []
    for name, m in pruned.model.layers.named_modules():
        if name in dense_w:
            def hook(mod, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1])
                ref = x @ dense_w[name].T
                num[name] += float((ref - x @ mod.weight.T).pow(2).sum())
                den[name] += float(ref.pow(2).sum())
            handles.append(m.register_forward_pre_hook(hook))
    last = {}
    for model, key in ((dense, "dense"), (pruned, "pruned")):
        handles.append(model.model.layers[-1].register_forward_hook(
            lambda m, a, o, key=key: last.setdefault(key, []).append(o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        for chunk in ids.split(8):
            dense(input_ids=chunk)
            pruned(input_ids=chunk)
    for h in handles:
        h.remove()
    d, p = torch.cat(last["dense"]), torch.cat(last["pruned"])
    return {k: num[k] / den[k] for k in num}, float((d - p).pow(2).sum() / d.pow(2).sum())


def run(model_dir, method, calib, true_sequential, held) -> dict:
    crit, pattern = llm.METHODS[method][:2]
    config = {"pruning_type": crit, "pattern": pattern, "target_sparsity": llm.TARGET,
              "pruning_scope": "local", "true_sequential": true_sequential}
    dense = load(model_dir)
    model = copy.deepcopy(dense)
    batches = [calib[i:i + 1] for i in range(len(calib))]
    cpu0 = time.process_time()
    fxprune.transform(model, config, (batches[0],), inplace=True, calibration=batches)
    cpu = time.process_time() - cpu0
    info = fxprune.sparsity_report(model).calibration
    errors, hidden = layer_errors(dense, model, held)
    return {"ppl": quality.perplexity(model, held, llm.HELD_OUT_WINDOWS), "errors": errors,
            "hidden": hidden, "cpu": cpu, "forwards": info["block_forwards"], "stages": info["stages"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=4, help="calibration draws (the first: bench/llm.py's)")
    ap.add_argument("--orders", type=int, default=2, help="orders per draw (1: as drawn)")
    ap.add_argument("--methods", nargs="+", choices=list(llm.METHODS))
    ap.add_argument("--cache-dir")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import warnings
    warnings.filterwarnings("ignore")
    model_dir, held, dense_ppl = llm.trained_model(llm.cache_root(args.cache_dir))
    train, _ = quality.stdlib_corpus(4_000_000, 400_000)
    seeds = [llm.CALIB_SEED] + list(range(1, args.seeds))
    out = [f"Trained Llama {model_dir.name}, dense ppl {dense_ppl:.4f}; {len(seeds)} calibration "
           f"draws x {args.orders} order(s), 1 thread. Layer error: mean over the 28 decoder "
           f"Linears of ||WX - W'X||^2 / ||WX||^2 on {ERROR_WINDOWS} held-out windows; hidden: "
           f"the last block's relative error against the dense model."]
    summary = [["method", "runs", "ppl off -> on (mean)", "ppl better", "order spread (off)",
                "layer err off -> on", "layer err better", "hidden err off -> on",
                "CPU s off / on", "block fwd off / on", "stages off / on"]]
    def mean_err(r):
        return statistics.fmean(r["errors"].values())

    for method in args.methods or list(llm.METHODS):
        rows = [["seed", "order", "ppl off", "ppl on", "layer err off", "layer err on",
                 "hidden off", "hidden on", "CPU s off", "CPU s on"]]
        pairs = []
        for seed in seeds:
            for order in range(args.orders):
                calib = calibration(train, seed, order)
                # alternate which runs first (CPU times on a shared machine)
                flags = (False, True) if (seed + order) % 2 == 0 else (True, False)
                res = {flag: run(model_dir, method, calib, flag, held) for flag in flags}
                off, on = res[False], res[True]
                pairs.append((seed, order, off, on))
                rows.append([seed, order, f"{off['ppl']:.4f}", f"{on['ppl']:.4f}",
                             f"{mean_err(off):.5f}", f"{mean_err(on):.5f}",
                             f"{off['hidden']:.5f}", f"{on['hidden']:.5f}",
                             f"{off['cpu']:.2f}", f"{on['cpu']:.2f}"])
                print(f"{method} seed {seed} order {order}: " + " ".join(map(str, rows[-1][2:])),
                      file=sys.stderr, flush=True)
        out.append(f"### {method}\n\n" + _markdown(rows))
        spread = [abs(a[2]["ppl"] - b[2]["ppl"]) for a in pairs for b in pairs
                  if a[0] == b[0] and a[1] < b[1]]
        layer_better = sum(on["errors"][k] < off["errors"][k] for _, _, off, on in pairs
                           for k in off["errors"])
        summary.append([
            method, len(pairs),
            f"{statistics.fmean(p[2]['ppl'] for p in pairs):.4f} -> "
            f"{statistics.fmean(p[3]['ppl'] for p in pairs):.4f}",
            f"{sum(p[3]['ppl'] < p[2]['ppl'] for p in pairs)}/{len(pairs)}",
            f"{max(spread):.4f}" if spread else "-",
            f"{statistics.fmean(mean_err(p[2]) for p in pairs):.5f} -> "
            f"{statistics.fmean(mean_err(p[3]) for p in pairs):.5f}",
            f"{layer_better}/{len(pairs) * len(pairs[0][2]['errors'])} layers",
            f"{statistics.fmean(p[2]['hidden'] for p in pairs):.5f} -> "
            f"{statistics.fmean(p[3]['hidden'] for p in pairs):.5f}",
            f"{statistics.median(p[2]['cpu'] for p in pairs):.2f} / "
            f"{statistics.median(p[3]['cpu'] for p in pairs):.2f}",
            f"{pairs[0][2]['forwards']} / {pairs[0][3]['forwards']}",
            f"{pairs[0][2]['stages']} / {pairs[0][3]['stages']}"])
        # which layers gain: mean error per layer kind
        kinds = sorted({k.split(".")[-1] for k in pairs[0][2]["errors"]})
        krows = [["layer", "error off", "error on"]]
        for kind in kinds:
            sel = lambda r: statistics.fmean(v for k, v in r["errors"].items() if k.endswith(kind))
            krows.append([kind, f"{statistics.fmean(sel(p[2]) for p in pairs):.5f}",
                          f"{statistics.fmean(sel(p[3]) for p in pairs):.5f}"])
        out.append(f"{method}, layer error by kind (mean over runs and blocks)\n\n" + _markdown(krows))
    out.append("### Summary\n\n" + _markdown(summary))
    text = "\n\n".join(out)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


def _markdown(rows) -> str:
    head, *body = rows
    return "\n".join(["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in body])


if __name__ == "__main__":
    main()
