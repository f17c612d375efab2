"""1 process against 2 (torch.distributed, gloo, one thread each), alternating runs.

    python bench/distributed.py [--blocks 8] [--repeat 2] [--cache DIR] [--ceiling ROUNDS]

A. Block-sequential SparseGPT (2:4, local, every decoder Linear) on the LLM bench model's
   architecture: a random-init Llama (hidden 512, FFN 1376, 8 heads, vocab 8000), 16 calibration
   sequences of 128 tokens given as 16 batches, merged into block batches of 1024 tokens (two
   block batches, one per rank with 2 processes; the same merging with 1 process). Time of the
   calibration + update phase: from the end of the capture (the calibration run up to the first
   block) to the last block's end (``on_block_end``), the slowest rank's; the critical path (per
   block, the slowest rank's CPU, summed); per rank the page faults and bytes sent, and the
   SparseGPT step's FLOPs, planned and timed CPU. Also checks that both runs give the same
   masks, and reports the SparseGPT weight difference.
B. Global magnitude (1x1, 50 %) over a multi-shard checkpoint (random Llama, hidden 1024, FFN 2816,
   6 layers, vocab 8000, float32, 64 MB shards), 1 rank against 2 ranks: peak RSS per rank
   (``ru_maxrss``), its anonymous and file-backed parts, the RSS at the call, the RSS once the
   skeleton is built and its targets found (what every rank holds) and the peak's part above it
   (the tensor work), and the weight bytes each rank reads; the outputs must be equal.
C. (``--ceiling ROUNDS``) The machine's own 2-process scaling: a fixed single-threaded job
   shaped like a block's work, alone and then as two copies started together: how much two
   copies of this job gain here, now; a reference for A's speedup, not a bound on it.

The machine is shared: runs alternate (1, 2, 1, 2...) and the load average is printed with each.
"""
from __future__ import annotations

import argparse
import datetime
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SPARSE_GPT = {"pruning_type": "sparse_gpt", "pattern": "2:4", "target_sparsity": 0.5,
              "pruning_scope": "local", "block_batch_tokens": 1024}
MAGNITUDE = {"pruning_type": "magnitude", "pattern": "1x1", "target_sparsity": 0.5,
             "pruning_scope": "global"}


def llm_model(blocks: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=8000, num_hidden_layers=blocks,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _init(rank: int, world: int, store: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))


class Timeline:
    """Per-rank time by kind of work (``--timeline``): wraps the block forwards, the SparseGPT
    math and every ``torch.distributed`` call, summing wall time, this thread's CPU time and its
    run-queue wait (``/proc/thread-self/schedstat``: time ready to run but not running, i.e. the
    machine's load) per label; the rest of the phase is ``other``."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}
        self.depth = 0
        self.saved = []

    @staticmethod
    def now() -> tuple[float, float, float]:
        with open("/proc/thread-self/schedstat") as f:
            delay = int(f.read().split()[1]) / 1e9
        return time.perf_counter(), time.thread_time(), delay

    def wrap(self, owner, attr: str, label: str) -> None:
        fn = getattr(owner, attr)
        self.saved.append((owner, attr, fn))
        timeline = self

        def timed(*args, **kwargs):
            if timeline.depth:              # nested in another timed call: counted there
                return fn(*args, **kwargs)
            timeline.depth += 1
            t0 = timeline.now()
            try:
                return fn(*args, **kwargs)
            finally:
                t1 = timeline.now()
                timeline.depth -= 1
                acc = timeline.sums.setdefault(label, [0, 0.0, 0.0, 0.0])
                acc[0] += 1
                for k in range(3):
                    acc[k + 1] += t1[k] - t0[k]
        setattr(owner, attr, timed)

    def install(self) -> None:
        import torch.distributed as dist

        import fxprune.passes.sequential as seq
        import fxprune.sequential as engine
        for name in ("all_gather_object", "all_gather", "all_reduce", "broadcast", "barrier",
                     "broadcast_object_list", "all_gather_into_tensor"):
            self.wrap(dist, name, f"dist.{name}")
        self.wrap(dist.Work, "wait", "dist.Work.wait")
        self.wrap(engine.BlockStep, "record", "block forward + statistics")
        self.wrap(engine.BlockSequentialRunner, "_propagate", "block forward (pruned, next inputs)")
        for name in ("inverse_hessian_factor", "sparsegpt_prune"):
            if hasattr(seq, name):
                self.wrap(seq, name, f"sparse_gpt: {name}")

    def uninstall(self) -> None:
        for owner, attr, fn in reversed(self.saved):
            setattr(owner, attr, fn)


class Counters:
    """Per-rank, load-independent counts of the phase: minor page faults (``ru_minflt``: fresh
    memory touched, about 2 us of CPU each here), bytes sent (point-to-point and tensor
    collectives) and the SparseGPT plan of each block (its estimated cost and FLOPs per rank)."""

    def __init__(self):
        self.sent = {"p2p": 0, "collective": 0}
        self.plans = []
        self.spent = []
        self.saved = []

    def install(self) -> None:
        import torch.distributed as dist

        import fxprune.distributed as fd
        counters = self

        def counting(owner, attr, kind):
            fn = getattr(owner, attr)
            self.saved.append((owner, attr, fn))

            def counted(tensor, *args, **kwargs):
                for t in tensor if isinstance(tensor, (list, tuple)) else [tensor]:
                    counters.sent[kind] += t.numel() * t.element_size()
                return fn(tensor, *args, **kwargs)
            setattr(owner, attr, counted)
        counting(dist, "isend", "p2p")
        counting(dist, "send", "p2p")
        counting(dist, "all_reduce", "collective")
        plan = fd.plan_sparse_gpt
        self.saved.append((fd, "plan_sparse_gpt", plan))

        def planned(cols, rows, cuts, world, **scales):
            out = plan(cols, rows, cuts, world, **scales)
            counters.plans.append((list(cols), out, bool(scales.get("factor_scale"))))
            return out
        fd.plan_sparse_gpt = planned
        split = fd.Distributed.split_sparse_gpt
        self.saved.append((fd.Distributed, "split_sparse_gpt", split))

        def timed(d, *args, **kwargs):      # the CPU of this rank's factors and solves
            out = split(d, *args, **kwargs)
            measured = getattr(d, "measured", None)
            counters.spent.append(sum(measured[-1][1]) if measured else float("nan"))
            return out
        fd.Distributed.split_sparse_gpt = timed

    def uninstall(self) -> None:
        for owner, attr, fn in reversed(self.saved):
            setattr(owner, attr, fn)


def plan_work(plans, world: int) -> dict:
    """The SparseGPT step's FLOPs per rank over all blocks (an inverse factor ~ 2/3 n^3:
    Cholesky and triangular inverse; the OBS update of ``rows`` rows ~ rows x cols^2: each
    pruned column's error spread over the later columns), and the plan's cost per rank over the
    blocks planned with measured costs (from the second on; in CPU seconds predicted)."""
    flops, predicted = [0.0] * world, [0.0] * world
    for cols, plan, scaled in plans:
        for g, owner in enumerate(plan.owner):
            flops[owner] += 2 / 3 * cols[g] ** 3
            for r, r0, r1 in plan.ranges[g]:
                flops[r] += (r1 - r0) * cols[g] ** 2
        for r in range(world):
            predicted[r] += plan.load[r] if scaled else 0.0
    moved = sum(1 for _, plan, _ in plans for g, owner in enumerate(plan.owner)
                if any(r != owner for r, _, _ in plan.ranges[g]))
    return {"flops": flops, "predicted": predicted, "factors_sent": moved}


def sparse_gpt_worker(rank: int, world: int, store: str, blocks: int, out: str,
                      timeline: bool = False) -> None:
    import torch.distributed as dist

    import fxprune
    _init(rank, world, store)
    tl = Timeline() if timeline else None
    counters = Counters()
    model = llm_model(blocks)
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, 8000, (1, 128), generator=g) for _ in range(16)]
    marks = {"blocks": []}
    # the phase starts when the capture ends (not with an on_block_start hook: with one, the
    # pass checks the weights a streaming caller loaded, work a plain call does not do)
    from fxprune.sequential import BlockSequentialRunner
    capture = BlockSequentialRunner.capture

    def mark():     # wall, process CPU, minor page faults
        return (time.perf_counter(), time.process_time(),
                resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

    def captured(runner):
        capture(runner)
        marks["start"] = mark()
        marks["tl0"] = Timeline.now()
        counters.install()
        if tl is not None:
            tl.install()

    def end(i, name, block):
        marks["end"] = mark()
        marks["blocks"].append(marks["end"])
        marks["tl1"] = Timeline.now()

    BlockSequentialRunner.capture = captured
    dist.barrier()
    fxprune.transform(model, SPARSE_GPT, (calibration[0],), inplace=True, calibration=calibration,
                      on_block_end=end)
    BlockSequentialRunner.capture = capture
    counters.uninstall()
    if tl is not None:
        tl.uninstall()
    span = [b - a for a, b in zip(marks["tl0"], marks["tl1"])]
    ends = [marks["start"]] + marks["blocks"]
    per_block = [b[1] - a[1] for a, b in zip(ends, ends[1:])]     # process CPU of each block
    seconds = {"wall": marks["end"][0] - marks["start"][0], "cpu": marks["end"][1] - marks["start"][1],
               "span": span, "timeline": tl.sums if tl is not None else None,
               "block_cpu": per_block, "faults": marks["end"][2] - marks["start"][2],
               "sent": dict(counters.sent), "work": plan_work(counters.plans, world),
               "sparse_gpt_cpu": sum(counters.spent)}
    if rank == 0:
        weights = {n: p.detach().clone() for n, p in model.named_parameters()
                   if ".layers." in n and n.endswith("proj.weight")}
        torch.save(weights, out + ".result.pt")
    times = [None] * world
    dist.all_gather_object(times, seconds)
    if rank == 0:
        torch.save(times, out + ".times.pt")
    dist.destroy_process_group()


def _rss_parts() -> dict[str, int]:
    """Resident memory now: total, anonymous (heap, tensors) and file-backed (code, mapped files)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def magnitude_worker(rank: int, world: int, store: str, src: str, out: str, tag: str) -> None:
    import threading

    import torch.distributed as dist

    import fxprune
    from fxprune.checkpoint.shards import ShardSet
    _init(rank, world, store)
    from fxprune.checkpoint.prune import _Job
    read = [0]                  # weight bytes this rank reads from the shards
    plain_read, plain_init = ShardSet._read, _Job.__init__

    def counted(entry, begin, end):
        read[0] += end - begin
        return plain_read(entry, begin, end)

    def init(self, *args, **kwargs):   # what every rank holds: imports, the skeleton, its targets
        plain_init(self, *args, **kwargs)
        held.update(_rss_parts())
    ShardSet._read = staticmethod(counted)
    _Job.__init__ = init
    held: dict[str, int] = {}
    start_parts = _rss_parts()
    peak = dict(start_parts)
    stop = threading.Event()

    def sample():               # anonymous and file-backed peaks (ru_maxrss has the total only)
        while not stop.wait(0.002):
            for k, v in _rss_parts().items():
                peak[k] = max(peak[k], v)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    dist.barrier()
    start = time.perf_counter()
    fxprune.prune_checkpoint(src, MAGNITUDE, out)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    ShardSet._read, _Job.__init__ = staticmethod(plain_read), plain_init
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = [None] * world
    dist.all_gather_object(stats, (maxrss, seconds, peak, start_parts, read[0], held))
    if rank == 0:
        torch.save(stats, tag + ".rss.pt")
    dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    import torch.multiprocessing as mp
    store = tempfile.mktemp(prefix="fxprune-bench-store-")
    try:
        mp.spawn(fn, args=(world, store, *args), nprocs=world)
    finally:
        if os.path.exists(store):
            os.remove(store)


def ceiling_worker(queue, barrier, reps: int) -> None:
    """A fixed single-threaded job shaped like a block's work: matrix products of the bench
    model's sizes and a 4 MB buffer made and written per step. Copies start together (after
    their imports); each reports its wall time and minor page faults."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, w1, w2 = torch.randn(1024, 512), torch.randn(1376, 512), torch.randn(512, 1376)
    barrier.wait()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.linear(torch.nn.functional.silu(torch.nn.functional.linear(x, w1)), w2)
        torch.empty(1 << 20).fill_(1.0)
    queue.put((time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))


def machine_ceiling(rounds: int, reps: int = 150) -> None:
    """How much two copies of one fixed job gain over one on this machine, now: a reference for
    the 2-process speedup, not a bound on it."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    print(f"C. the machine's own 2-process scaling: a fixed single-threaded job ({reps} steps of the "
          f"bench model's matrix products and a 4 MB buffer) alone, then two copies started together")
    for r in range(rounds):
        walls, faults = {}, {}
        for n in (1, 2):
            queue, barrier = ctx.Queue(), ctx.Barrier(n)
            procs = [ctx.Process(target=ceiling_worker, args=(queue, barrier, reps)) for _ in range(n)]
            for p in procs:
                p.start()
            try:   # read before joining (a child with unread queue data does not exit)
                got = [queue.get(timeout=600) for _ in procs]
            finally:
                for p in procs:
                    p.join(timeout=60)
                    if p.is_alive():
                        p.kill()
            if any(p.exitcode != 0 for p in procs):
                raise RuntimeError(f"a ceiling job failed (exit codes {[p.exitcode for p in procs]})")
            walls[n], faults[n] = max(w for w, _ in got), [f for _, f in got]
        print(f"round {r + 1} (load {load()}): alone {walls[1]:.2f} s, two at once {walls[2]:.2f} s: "
              f"throughput x{2 * walls[1] / walls[2]:.2f} (minor faults per copy: {faults[1][0]}; "
              f"{', '.join(map(str, faults[2]))})")


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def make_checkpoint(directory: Path) -> None:
    import checkpoint as ckpt_bench
    from transformers import LlamaConfig
    if (directory / "config.json").is_file():
        return
    ckpt_bench.SHARD_BYTES = 64 << 20
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=8000,
                      max_position_embeddings=256, tie_word_embeddings=False)
    ckpt_bench.write_random_checkpoint(directory, cfg)


def same_checkpoints(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file
    for f in sorted(a.glob("*.safetensors")):
        x, y = load_file(f), load_file(b / f.name)
        if x.keys() != y.keys() or any(not torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def print_timelines(timelines) -> None:
    """Per run and rank: wall, thread CPU and run-queue wait (load) of each kind of work."""
    print("\nwhere the calibration + update phase goes (main thread; wall = CPU + run-queue wait "
          "+ blocked, blocked = waiting for the other rank or I/O)")
    print("| run | processes | rank | work | calls | wall s | CPU s | run-queue wait s | blocked s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r, world, times in timelines:
        for rank, t in enumerate(times):
            span, sums = t["span"], t["timeline"]
            rows = sorted(sums.items(), key=lambda kv: -kv[1][1])
            rest = [span[0] - sum(v[1] for v in sums.values()), span[1] - sum(v[2] for v in sums.values()),
                    span[2] - sum(v[3] for v in sums.values())]
            for label, (calls, w, c, q) in rows + [("other", (0, *rest)), ("phase total", (0, *span))]:
                print(f"| {r + 1} | {world} | {rank} | {label} | {calls or ''} | {w:.3f} | {c:.3f} | "
                      f"{q:.3f} | {w - c - q:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "fxprune-bench-dist"))
    parser.add_argument("--skip", choices=("A", "B"), action="append", default=[])
    parser.add_argument("--ceiling", type=int, default=0, metavar="ROUNDS",
                        help="C: also measure the machine's own 2-process scaling, ROUNDS times")
    parser.add_argument("--timeline", action="store_true",
                        help="A: per-rank time by kind of work (compute, each collective, run-queue wait)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fxprune-bench-dist-"))
    try:
        if "A" not in args.skip:
            print(f"A. block-sequential sparse_gpt 2:4, {args.blocks} blocks, 16 x 128 tokens, 1 thread per process")
            print("| run | processes | load avg (1/5/15 min) before | calibration + update: wall s, "
                  "slowest rank | run-queue wait s per rank | wall - run-queue wait s per rank | "
                  "CPU s per rank | critical path CPU s | minor faults per rank (k) | "
                  "MB sent per rank (p2p + collective) |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            wall = {1: [], 2: []}
            own = {1: [], 2: []}     # wall minus the time spent ready to run on a busy machine
            cpu = {1: [], 2: []}
            path = {1: [], 2: []}    # sum over blocks of the slowest rank's CPU in that block
            results = {}
            timelines = []
            for r in range(args.repeat):
                for world in (1, 2):
                    tag = str(work / f"sgpt{world}")
                    before = load()
                    spawn(sparse_gpt_worker, world, args.blocks, tag, args.timeline)
                    times = torch.load(tag + ".times.pt", weights_only=False)
                    wall[world].append(max(t["wall"] for t in times))
                    cpu[world].append(max(t["cpu"] for t in times))
                    own[world].append(max(t["span"][0] - t["span"][2] for t in times))
                    path[world].append(sum(max(b) for b in zip(*(t["block_cpu"] for t in times))))
                    if world == 2:
                        last2 = times
                    results[world] = torch.load(tag + ".result.pt")
                    def col(fn):
                        return ", ".join(fn(t) for t in times)
                    print(f"| {r + 1} | {world} | {before} | {wall[world][-1]:.2f} | "
                          f"{col(lambda t: format(t['span'][2], '.2f'))} | "
                          f"{col(lambda t: format(t['span'][0] - t['span'][2], '.2f'))} | "
                          f"{col(lambda t: format(t['cpu'], '.2f'))} | {path[world][-1]:.2f} | "
                          f"{col(lambda t: format(t['faults'] / 1e3, '.1f'))} | "
                          f"{col(lambda t: format(t['sent']['p2p'] / 1e6, '.1f') + ' + ' + format(t['sent']['collective'] / 1e6, '.3f'))} |",
                          flush=True)
                    timelines.append((r, world, times))
            if args.timeline:
                print_timelines(timelines)
            one, two = results[1], results[2]
            flips = sum(int(((one[n] == 0) != (two[n] == 0)).sum()) for n in one)
            total = sum(one[n].numel() for n in one)
            same = [n for n in one if torch.equal(one[n] == 0, two[n] == 0)]
            diff = max(float((one[n] - two[n]).abs().max()) for n in same) if same else float("nan")
            ratios = sorted(a / b for a, b in zip(wall[1], wall[2]))
            w2 = last2[0]["work"]
            flops = w2["flops"]
            pred = w2["predicted"]
            print(f"\nSparseGPT step, all blocks, 2 processes (last run): GFLOPs per rank "
                  f"{', '.join(f'{f / 1e9:.2f}' for f in flops)} (of {sum(flops) / 1e9:.2f}; largest / even "
                  f"share {max(flops) / (sum(flops) / 2):.3f}); factors computed on another rank than "
                  f"their rows: {w2['factors_sent']}; plan from the measured costs (blocks 2-{args.blocks}), "
                  f"CPU s predicted per rank {', '.join(f'{p:.3f}' for p in pred)}, timed per rank "
                  f"(all blocks) {', '.join(format(t['sparse_gpt_cpu'], '.3f') for t in last2)}")
            print(f"wall, best of {args.repeat}: 1 process {min(wall[1]):.2f} s, 2 processes "
                  f"{min(wall[2]):.2f} s: speedup {min(wall[1]) / min(wall[2]):.2f}x (target >= 1.6x); "
                  f"per pair {', '.join(f'{x:.2f}x' for x in ratios)}")
            print(f"wall minus run-queue wait (the main thread's time ready to run while other jobs "
                  f"held the cores), slowest rank, best: 1 process {min(own[1]):.2f} s, 2 processes "
                  f"{min(own[2]):.2f} s: {min(own[1]) / min(own[2]):.2f}x")
            print(f"CPU time of the slowest rank (load-independent), best: 1 process "
                  f"{min(cpu[1]):.2f} s, 2 processes {min(cpu[2]):.2f} s: {min(cpu[1]) / min(cpu[2]):.2f}x; "
                  f"per pair {', '.join(f'{a / b:.2f}x' for a, b in zip(cpu[1], cpu[2]))}")
            print(f"critical path (sum over blocks of the slowest rank's CPU in the block: the wall time "
                  f"on an idle machine if waiting cost nothing), best: 1 process {min(path[1]):.2f} s, "
                  f"2 processes {min(path[2]):.2f} s: {min(path[1]) / min(path[2]):.2f}x; per pair "
                  f"{', '.join(f'{a / b:.2f}x' for a, b in zip(path[1], path[2]))}")
            print(f"masks: {flips} of {total} entries differ ({len(same)} of {len(one)} layers "
                  f"identical); max |weight difference| on the identical layers {diff:.2e}\n")
        if "B" not in args.skip:
            src = Path(args.cache) / "llama-6x1024"
            src.parent.mkdir(parents=True, exist_ok=True)
            make_checkpoint(src)
            shards = len(list(src.glob("*.safetensors")))
            size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            print(f"B. global magnitude 1x1 50 % over {src.name}: {size / 1e6:.0f} MB in {shards} shards")
            print("per rank: peak RSS (ru_maxrss), its anonymous and file-backed parts (sampled every "
                  "2 ms from /proc/self/status), RSS at the call, RSS once the skeleton is built and "
                  "its targets found (what every rank holds), the peak's part above that (the "
                  "tensor work), weight bytes read from the shards")
            print("| run | ranks | load avg before | wall s | peak RSS per rank MB | peak anonymous MB | "
                  "peak file-backed MB | RSS at the call MB | RSS with the skeleton MB | "
                  "peak above it MB | weights read MB |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            outs = {}
            peaks = {1: [], 2: []}
            for r in range(args.repeat):
                for world in (1, 2):
                    out = work / f"mag{world}-{r}"
                    before = load()
                    spawn(magnitude_worker, world, str(src), str(out), str(work / f"mag{world}"))
                    stats = torch.load(work / f"mag{world}.rss.pt")
                    outs[world] = out
                    peaks[world].append(max(s[0] for s in stats))

                    above = ", ".join(f"{(s[0] - s[5]['VmRSS']) / 1e6:.0f}" for s in stats)

                    def col(i, part=None):
                        return ", ".join(f"{(s[i] if part is None else s[i][part]) / 1e6:.0f}" for s in stats)
                    print(f"| {r + 1} | {world} | {before} | {max(s[1] for s in stats):.1f} | {col(0)} | "
                          f"{col(2, 'RssAnon')} | {col(2, 'RssFile')} | {col(3, 'VmRSS')} | "
                          f"{col(5, 'VmRSS')} | {above} | "
                          f"{col(4)} |",
                          flush=True)
            print(f"\npeak RSS of the largest rank, per run: 1 rank {', '.join(f'{p / 1e6:.0f}' for p in peaks[1])} MB, "
                  f"2 ranks {', '.join(f'{p / 1e6:.0f}' for p in peaks[2])} MB")
            print(f"outputs identical (1 rank vs 2 ranks): {same_checkpoints(outs[1], outs[2])}")
        if args.ceiling > 0:
            print()
            machine_ceiling(args.ceiling)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
