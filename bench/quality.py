"""Quality of one-shot and gradual pruning: digits CNN accuracy and a small GPT-2's perplexity.

    python bench/quality.py [--quick] [--only digits|gpt2] [--markdown docs/quality_table.md]

Everything is trained here, from data that ships on the machine (no downloads):

1. **digits**: a small CNN (two 3x3 convs, two linears) on scikit-learn's bundled 8x8 digits
   (1797 images; stratified 70/30 split); metric: held-out accuracy (%).
2. **gpt2**: a byte-level GPT-2 (``GPT2Config(vocab_size=256, n_embd=128, n_layer=4, n_head=4,
   n_positions=128)``, random init, ``GPT2LMHeadModel``) trained for 600 steps of 16 x 128 bytes
   (``--quick``: 200) on the Python standard library's source files (every 10th file held out);
   metric: held-out perplexity per byte.

For each model: dense; one-shot ``magnitude`` / ``activation`` (Wanda) / ``sparse_gpt`` at 50 %
unstructured (1x1), 50 % 2:4 and 70 % 4x1 (scope ``local``, as in the Wanda and SparseGPT
papers; calibration: 4 training batches); and gradual pruning with fine-tuning
(``fxprune.Pruner``, ``snip_momentum``, INC's ``exp`` schedule) to the same targets, next to the
same fine-tuning without pruning (its reference). The last linear layer (classifier /
``lm_head``) stays dense, as by default. Seeds are fixed; the numbers can differ in the last
digits with the thread count. About 3 minutes on 2 idle cores.
"""
from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.pruner import Pruner

PATTERNS = [("1x1", 0.5), ("2:4", 0.5), ("4x1", 0.7)]
ONE_SHOT = ["magnitude", "activation", "sparse_gpt"]
GRADUAL = "snip_momentum"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _config(pruning_type: str, pattern: str, target: float, **schedule) -> dict:
    return {"pruning_type": pruning_type, "pattern": pattern, "target_sparsity": target,
            "pruning_scope": "local", **schedule}


# ====================================================================== digits CNN
class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def digits_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=0.3, random_state=0, stratify=d.target)
    return x[tr], y[tr], x[te], y[te]


def digits_batches(x, y, batch: int, epochs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - batch + 1, batch):
            idx = order[i:i + batch]
            yield x[idx], y[idx]


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def train_digits(model, x, y, epochs: int, lr: float = 2e-3, seed: int = 0, pruner=None):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if pruner is not None:
        pruner = pruner(model, opt)
    model.train()
    for xb, yb in digits_batches(x, y, 64, epochs, seed):
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
        if pruner is not None:
            pruner.step()
    return pruner.finalize() if pruner is not None else model


def bench_digits(quick: bool) -> dict:
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits_data()
    start = time.time()
    dense = train_digits(DigitsCNN(), xtr, ytr, epochs=15 if quick else 30).eval()
    results = {"dense": accuracy(dense, xte, yte)}
    log(f"digits: dense {results['dense']:.2f}% ({time.time() - start:.1f}s)")
    calib = [xtr[i:i + 128] for i in range(0, 512, 128)]
    for pattern, target in PATTERNS:
        for crit in ONE_SHOT:
            pruned = fxprune.transform(dense, _config(crit, pattern, target), calibration=calib)
            results[(crit, pattern)] = accuracy(pruned, xte, yte)
            log(f"digits: {crit:10s} {pattern} {target:.0%}: {results[(crit, pattern)]:.2f}%")
    steps_per_epoch = len(ytr) // 64
    epochs = 10 if quick else 20
    end = steps_per_epoch * epochs // 2
    tuned = train_digits(_copy(dense), xtr, ytr, epochs=epochs, lr=1e-3, seed=1)
    results["dense+ft"] = accuracy(tuned, xte, yte)
    log(f"digits: dense + same fine-tuning {results['dense+ft']:.2f}%")
    for pattern, target in PATTERNS:
        start = time.time()
        cfg = _config(GRADUAL, pattern, target, start_step=0, end_step=end,
                      pruning_frequency=max(1, end // 10))
        model = _copy(dense)
        final = train_digits(model, xtr, ytr, epochs=epochs, lr=1e-3, seed=1,
                             pruner=lambda m, opt: Pruner(m, cfg, optimizer=opt))
        results[("gradual", pattern)] = accuracy(final, xte, yte)
        log(f"digits: gradual    {pattern} {target:.0%}: {results[('gradual', pattern)]:.2f}% "
            f"(sparsity {fxprune.sparsity_report(final).sparsity:.3f}, {time.time() - start:.1f}s)")
    return results


def _copy(model):
    import copy
    return copy.deepcopy(model)


# ====================================================================== byte-level GPT-2
SEQ = 128


def stdlib_corpus(max_train: int, max_heldout: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "lib2to3", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    train, held = bytearray(), bytearray()
    for i, path in enumerate(files):
        data = path.read_bytes()
        if i % 10 == 0:
            if len(held) < max_heldout:
                held += data
        elif len(train) < max_train:
            train += data
        if len(train) >= max_train and len(held) >= max_heldout:
            break
    as_tensor = lambda b: torch.frombuffer(bytes(b), dtype=torch.uint8).long()
    return as_tensor(train[:max_train]), as_tensor(held[:max_heldout])


def gpt2_model():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = GPT2Config(vocab_size=256, n_positions=SEQ, n_embd=128, n_layer=4, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                     eos_token_id=0, loss_type="ForCausalLM")
    return GPT2LMHeadModel(cfg)


def lm_batch(data: torch.Tensor, batch: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - SEQ - 1, (batch,), generator=g)
    return torch.stack([data[s:s + SEQ] for s in starts.tolist()])


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def perplexity(model, held: torch.Tensor, windows: int) -> float:
    model.eval()
    n = min(windows, len(held) // SEQ)
    ids = held[: n * SEQ].reshape(n, SEQ)
    total = 0.0
    with torch.no_grad():
        for chunk in ids.split(32):
            total += float(lm_loss(model, chunk)) * len(chunk)
    return math.exp(total / n)


def train_lm(model, data, steps: int, lr: float, seed: int, pruner=None, warmup: int = 50,
             batch: int = 16, log_every: int = 0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    if pruner is not None:
        pruner = pruner(model, opt)
    model.train()
    for step in range(steps):
        loss = lm_loss(model, lm_batch(data, batch, g))
        loss.backward()
        if log_every and (step + 1) % log_every == 0:
            log(f"  step {step + 1}/{steps}: loss {float(loss):.3f}")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        if pruner is not None:
            pruner.step()
    return pruner.finalize() if pruner is not None else model


def bench_gpt2(quick: bool) -> dict:
    torch.manual_seed(0)
    train, held = stdlib_corpus(4_000_000, 400_000)
    windows = 96 if quick else 256
    start = time.time()
    dense = train_lm(gpt2_model(), train, steps=200 if quick else 600, lr=3e-3, seed=0).eval()
    results = {"dense": perplexity(dense, held, windows)}
    log(f"gpt2: dense ppl {results['dense']:.3f} ({time.time() - start:.1f}s)")
    g = torch.Generator().manual_seed(123)
    calib = [lm_batch(train, 8, g) for _ in range(4)]
    example = (calib[0],)
    for pattern, target in PATTERNS:
        for crit in ONE_SHOT:
            start = time.time()
            pruned = fxprune.transform(dense, _config(crit, pattern, target), example,
                                       calibration=calib)
            results[(crit, pattern)] = perplexity(pruned, held, windows)
            log(f"gpt2: {crit:10s} {pattern} {target:.0%}: ppl {results[(crit, pattern)]:.3f} "
                f"({time.time() - start:.1f}s)")
    steps = 60 if quick else 150
    end = steps * 5 // 8
    tuned = train_lm(_copy(dense), train, steps=steps, lr=1e-3, seed=1, warmup=1)
    results["dense+ft"] = perplexity(tuned, held, windows)
    log(f"gpt2: dense + same fine-tuning ppl {results['dense+ft']:.3f}")
    for pattern, target in PATTERNS:
        start = time.time()
        cfg = _config(GRADUAL, pattern, target, start_step=0, end_step=end,
                      pruning_frequency=max(1, end // 10))
        final = train_lm(_copy(dense), train, steps=steps, lr=1e-3, seed=1, warmup=1,
                         pruner=lambda m, opt: Pruner(m, cfg, optimizer=opt, example_inputs=example))
        results[("gradual", pattern)] = perplexity(final, held, windows)
        log(f"gpt2: gradual    {pattern} {target:.0%}: ppl {results[('gradual', pattern)]:.3f} "
            f"(sparsity {fxprune.sparsity_report(final).sparsity:.3f}, {time.time() - start:.1f}s)")
    return results


# ====================================================================== table
def table(results: dict) -> str:
    cols = [(model, p, t) for model in results for p, t in PATTERNS]
    head = ["method"] + [f"{'digits acc %' if m == 'digits' else 'GPT-2 ppl'} {t:.0%} {p}"
                         for m, p, t in cols]
    rows = []
    labels = {"dense": "dense", "dense+ft": "dense + the same fine-tuning (reference for gradual)",
              "gradual": f"gradual ({GRADUAL}, INC exp schedule) + fine-tuning",
              **{c: f"one-shot {c}" for c in ONE_SHOT}}
    for method in ["dense", *ONE_SHOT, "dense+ft", "gradual"]:
        cells = [labels[method]]
        for m, p, _ in cols:
            r = results[m]
            v = r.get(method) if method.startswith("dense") else r.get((method, p))
            cells.append("-" if v is None else (f"{v:.2f}" if m == "digits" else f"{v:.3f}"))
        rows.append(cells)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer training steps (about 1.5 minutes)")
    ap.add_argument("--only", choices=["digits", "gpt2"])
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    start = time.time()
    results = {}
    if args.only in (None, "digits"):
        results["digits"] = bench_digits(args.quick)
    if args.only in (None, "gpt2"):
        results["gpt2"] = bench_gpt2(args.quick)
    text = table(results)
    print(text)
    print(f"\n(total {time.time() - start:.0f}s, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads{', --quick' if args.quick else ''})")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
