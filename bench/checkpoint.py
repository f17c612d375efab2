"""Out-of-core pruning of a checkpoint larger than the memory it is pruned in.

    python bench/checkpoint.py [--cache DIR] [--layers 32] [--repeat 1]

1. Writes (once, cached in ``--cache``, outside the repository) a random-init Llama-architecture
   checkpoint: hidden 2048, FFN 5632, 32 layers, vocab 32000, float32, ~7.1 GB in 2 GB shards.
   It is generated tensor by tensor straight into the shard files, never whole in memory.
2. Prunes it 2:4 with magnitude and with Wanda (``activation``, local scope, calibration from
   random token ids), each run in its own subprocess, alternating when ``--repeat`` > 1; each
   child reports its peak RSS (``ru_maxrss``) and wall time. Target: peak RSS < 2.5 GB.
3. Checks on a small model that the checkpoint path gives the in-memory result bit for bit.

Prints a table. Two threads (``torch.set_num_threads(2)``); run it with ``nice``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARD_BYTES = 2 << 30
DTYPE, DTYPE_CODE = torch.float32, "F32"


def llama_config(layers: int):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                       max_position_embeddings=2048, tie_word_embeddings=False)


# ---------------------------------------------------------------------------- writing the model
def write_random_checkpoint(directory: Path, config) -> None:
    """A safetensors checkpoint of ``config``'s Llama, random normal(0, 0.02) weights, ones for
    the norms, written one tensor at a time (headers first: every shape is known up front)."""
    from fxprune.checkpoint.skeleton import build_skeleton

    skeleton = build_skeleton(config)
    entries = [(name, tuple(p.shape)) for name, p in skeleton.state_dict().items()
               if not name.endswith("inv_freq")]
    shards, current, size = [], [], 0
    for name, shape in entries:
        nbytes = torch.Size(shape).numel() * DTYPE.itemsize
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, nbytes))
        size += nbytes
    shards.append(current)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=directory.parent))
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, nbytes in shard:
            header[name] = {"dtype": DTYPE_CODE, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(tmp / file, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape, _ in shard:
                if name.endswith("norm.weight"):
                    t = torch.ones(shape, dtype=DTYPE)
                else:
                    t = torch.empty(shape, dtype=DTYPE).normal_(0, 0.02, generator=gen)
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
                total += t.numel() * t.element_size()
                del t
        print(f"  wrote {file} ({offset / 1e9:.2f} GB)", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.to_json_file(str(tmp / "config.json"))
    os.rename(tmp, directory)


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


# ---------------------------------------------------------------------------- one pruning run
CONFIGS = {
    "magnitude": {"target_sparsity": 0.5, "pattern": "2:4", "pruning_scope": "local"},
    "wanda": {"target_sparsity": 0.5, "pattern": "2:4", "pruning_scope": "local",
              "pruning_type": "activation"},
}


def child(method: str, src: str, out: str, calibration: str | None) -> None:
    torch.set_num_threads(2)
    import fxprune

    start = time.perf_counter()
    blocks = []
    report = fxprune.prune_checkpoint(src, CONFIGS[method], out, calibration=calibration,
                                      progress=lambda stage, done, total: blocks.append(done))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: kB
    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss": peak, "sparsity": report.sparsity,
                                  "pruned_layers": len(report.pruned_layers),
                                  "progress_ticks": len(blocks)}))


def run_child(method: str, src: Path, out: Path, calibration: Path | None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", method, "--src", str(src), "--out", str(out)]
    if calibration is not None:
        cmd += ["--calibration", str(calibration)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} run failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["out_bytes"] = dir_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------- small-model equality
def small_model_equality() -> dict[str, bool]:
    import transformers

    import fxprune

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=500)
    ids = torch.randint(0, 500, (8, 32))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(src, max_shard_size="1MB")
        for method, cfg in CONFIGS.items():
            calibration = [ids] if method == "wanda" else None
            fxprune.prune_checkpoint(src, cfg, Path(tmp) / method, calibration=calibration)
            model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
            want = fxprune.transform(model, cfg, example_inputs=(ids[:1],), calibration=calibration,
                                     inplace=True).state_dict()
            got = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / method).state_dict()
            out[method] = set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=os.environ.get("FXPRUNE_BENCH_CACHE",
                                                          str(Path.home() / ".cache" / "fxprune-bench")))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--calibration-seqs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--child")
    parser.add_argument("--src")
    parser.add_argument("--out")
    parser.add_argument("--calibration")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.src, args.out, args.calibration)
        return
    torch.set_num_threads(2)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    config = llama_config(args.layers)
    src = cache / f"llama-random-{args.layers}l-f32"
    if not src.is_dir():
        print(f"writing the checkpoint to {src} (once)", flush=True)
        start = time.perf_counter()
        write_random_checkpoint(src, config)
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    size = dir_bytes(src)
    n_shards = len(list(src.glob("*.safetensors")))
    calibration = cache / f"ids-{args.calibration_seqs}x{args.seq_len}.pt"
    torch.save(torch.randint(0, config.vocab_size, (args.calibration_seqs, args.seq_len),
                             generator=torch.Generator().manual_seed(0)), calibration)
    print(f"checkpoint: {src} ({size / 1e9:.2f} GB, {n_shards} shards, {args.layers} blocks); "
          f"calibration {args.calibration_seqs}x{args.seq_len} random token ids", flush=True)
    rows = []
    for r in range(args.repeat):
        for method in ("magnitude", "wanda") if r % 2 == 0 else ("wanda", "magnitude"):
            result = run_child(method, src, cache / f"pruned-{method}", calibration if method == "wanda" else None)
            rows.append((method, result))
            print(f"  {method}: {result['seconds']:.1f} s, peak RSS {result['peak_rss'] / 2**30:.2f} GiB",
                  flush=True)
    equal = small_model_equality()
    print()
    print(f"| method (2:4, local) | checkpoint | time | peak RSS | RSS / checkpoint | < 2.5 GB | sparsity | pruned layers |")
    print("|---|---|---|---|---|---|---|---|")
    for method, res in rows:
        print(f"| {method} | {size / 1e9:.2f} GB, {n_shards} shards | {res['seconds']:.1f} s | "
              f"{res['peak_rss'] / 1e9:.2f} GB | {res['peak_rss'] / size:.2f} | "
              f"{'yes' if res['peak_rss'] < 2.5e9 else 'NO'} | {res['sparsity']:.4f} | {res['pruned_layers']} |")
    print()
    for method, ok in equal.items():
        print(f"small Llama (4 blocks), {method}: checkpoint output equals in-memory transform: "
              f"{'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
