"""One layer's SparseGPT solve: fxprune beside the authors' reference code and llm-compressor.

    python bench/sparse_gpt_math.py [--quick] [--shapes 512x512 1376x512 ...] [--reps 3]
                                    [--methods 2:4 50%] [--peer-python PATH | --no-peer]

For each layer shape (``rows x cols``: the weight's out x in features) and method (SparseGPT 2:4,
50 % unstructured; blocksize 128, dampening 0.01), on the same random weights and Hessian
``H = X^T X / n`` (2048 random input rows with per-feature scales), it times the whole per-layer
solve from ``H`` and ``W`` to the pruned, updated weights (the inverse-Hessian factor included):

- **fxprune**: ``inverse_hessian_factor`` + ``sparsegpt_prune`` (``fxprune/criteria/sparse_gpt.py``);
- **reference**: a faithful transcription of ``SparseGPT.fasterprune`` from the authors' code
  (github.com/IST-DASLab/sparsegpt, ``sparsegpt.py``; the quantizer and debug parts left out),
  run in this process;
- **llm-compressor** (optional, ``--peer-python`` as in ``bench/llm.py``): its
  ``sparsify_weight`` (``llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify``) in one
  long-lived worker process of the peer's interpreter, fed the same ``W`` and ``H`` per run.

Runs alternate (fxprune, reference, peer; the order rotates every repetition), one thread each,
and the table gives the CPU time (``time.process_time``) of the solve, the best of ``--reps``.
Quality, load-independent: the relative output error on the calibration inputs,
``tr(dW H dW^T) / tr(W H W^T)`` (SparseGPT's objective), and the pruned fraction.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
BLOCKSIZE = 128
PERCDAMP = 0.01
METHODS = {"2:4": (0.5, 2, 4), "50%": (0.5, 0, 0)}      # label -> (sparsity, prune_n, prune_m)
DEFAULT_SHAPES = ["512x512", "1376x512", "512x1376", "4096x4096"]


# ---------------------------------------------------------------------------- the three solves
def reference_fasterprune(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=.01):
    """``SparseGPT.fasterprune`` of the authors' code, on a weight ``W`` and Hessian ``H``
    (both changed in place, as there); returns the pruned weights."""
    rows, columns = W.shape
    W = W.float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Losses = torch.zeros(rows)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    mask = None
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            if mask is not None:
                mask1 = mask[:, i1:i2]
            else:
                tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        Losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def fxprune_solve(W, H, sparsity, prunen=0, prunem=0):
    from fxprune.criteria.sparse_gpt import inverse_hessian_factor, sparsegpt_prune

    U = inverse_hessian_factor(H.unsqueeze(0), PERCDAMP)[0]
    if prunen:
        return sparsegpt_prune(W, U, BLOCKSIZE, n_of_m=(prunen, prunem))[0]
    return sparsegpt_prune(W, U, BLOCKSIZE, counts=[int(sparsity * W.numel())],
                           rows=[W.shape[0]])[0]


def peer_solve(W, H, sparsity, prunen=0, prunem=0):
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(W)
    return sparsify_weight(layer, {layer: H}, sparsity, prunen, prunem, BLOCKSIZE, PERCDAMP,
                           False)[1]


def timed(solve, W, H, method):
    W, H = W.clone(), H.clone()
    sparsity, n, m = METHODS[method]
    start = time.process_time()
    with torch.no_grad():
        out = solve(W, H, sparsity, n, m)
    return time.process_time() - start, out


# ---------------------------------------------------------------------------- peer worker
def worker() -> None:
    """In the peer's interpreter: one job file per stdin line; answers ``RESULT {json}``."""
    torch.set_num_threads(1)
    for line in sys.stdin:
        job = json.loads(line)
        W, H = torch.load(job["inputs"])
        seconds, out = timed(peer_solve, W, H, job["method"])
        torch.save(out, job["output"])
        print("RESULT " + json.dumps({"cpu_s": seconds}), flush=True)


class PeerWorker:
    def __init__(self, python: str):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": str(BENCH_DIR)}
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)

    def run(self, inputs: str, method: str, output: str) -> float:
        self.proc.stdin.write(json.dumps({"inputs": inputs, "method": method, "output": output}) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the llm-compressor worker stopped (exit {self.proc.wait()})")
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])["cpu_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ---------------------------------------------------------------------------- main
def layer(rows: int, cols: int, seed: int = 0, tokens: int = 2048):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g) * (0.2 + torch.rand(cols, generator=g) * 2)
    W = torch.randn(rows, cols, generator=g) * cols ** -0.5
    return W, X.T @ X / tokens


def relative_error(W, new, H) -> float:
    dW = (new.double() - W.double())
    return float((dW @ H.double() * dW).sum() / ((W.double() @ H.double()) * W.double()).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=None, help="rows x cols, e.g. 512x1376")
    ap.add_argument("--quick", action="store_true", help="without the 4096 x 4096 layer")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peer-python")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker()
    torch.set_num_threads(1)
    sys.path.insert(0, str(BENCH_DIR))
    from llm import peer_python

    shapes = args.shapes or [s for s in DEFAULT_SHAPES if not (args.quick and s == "4096x4096")]
    exe, versions = peer_python(args)
    print(f"torch {torch.__version__}, 1 thread, CPU seconds (best of {args.reps}); "
          f"peer: {versions if exe else 'none (' + versions + ')'}", flush=True)
    peer = PeerWorker(exe) if exe else None
    tools = {"fxprune": fxprune_solve, "reference": reference_fasterprune}
    if peer:
        tools["llm-compressor"] = None
    rows_out = []
    try:
        with tempfile.TemporaryDirectory(prefix="fxprune-sgpt-") as tmp:
            for shape in shapes:
                r, c = (int(v) for v in shape.lower().split("x"))
                W, H = layer(r, c)
                inputs = os.path.join(tmp, "inputs.pt")
                torch.save((W, H), inputs)
                for method in args.methods:
                    times = {t: [] for t in tools}
                    outs = {}
                    order = list(tools)
                    for rep in range(args.reps):
                        for tool in order[rep % len(order):] + order[:rep % len(order)]:
                            if tool == "llm-compressor":
                                path = os.path.join(tmp, "peer_out.pt")
                                times[tool].append(peer.run(inputs, method, path))
                                outs[tool] = torch.load(path)
                            else:
                                seconds, outs[tool] = timed(tools[tool], W, H, method)
                                times[tool].append(seconds)
                    best = {t: min(v) for t, v in times.items()}
                    err = {t: relative_error(W, outs[t], H) for t in tools}
                    zeros = {t: float((outs[t] == 0).float().mean()) for t in tools}
                    rows_out.append((shape, method, best, err, zeros))
                    line = "  ".join(f"{t} {best[t]:.3f}s err {err[t]:.5f}" for t in tools)
                    print(f"{shape} {method}: {line}", flush=True)
    finally:
        if peer:
            peer.close()

    names = list(tools)
    head = ["layer (rows x cols)", "method"] + [f"{t} CPU s" for t in names] + \
        [f"fxprune / {t}" for t in names[1:]] + [f"rel. error {t}" for t in names] + ["zeros fxprune"]
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for shape, method, best, err, zeros in rows_out:
        cells = [shape, method] + [f"{best[t]:.3f}" for t in names]
        cells += [f"{best['fxprune'] / best[t]:.2f}" for t in names[1:]]
        cells += [f"{err[t]:.5f}" for t in names] + [f"{zeros['fxprune']:.4f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
