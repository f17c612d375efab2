"""Where the two-process block-sequential SparseGPT time goes: per rank, per block, per phase.

    python bench/distributed_phases.py [--blocks 4] [--rounds 1] [--worlds 1,2] [--no-trim] [--events]

Runs ``bench/distributed.py``'s case A (random-init Llama of the LLM bench's size, 16 x 128
calibration tokens in 2 block batches, SparseGPT 2:4, one thread per process, gloo) with one
process and with two, alternating, and times each phase of the calibration + update phase with
exclusive times (a phase nested in another is taken out of the outer one): the block's recording
forward, the status exchange and statistics reduction, the point-to-point waits, the inverse
factors, the row solves, the rest of the SparseGPT step, the row writes, the zero counts, the
pruned forward that makes the next block's inputs, the heap release between blocks. Per phase
and rank: thread CPU, minor page faults of the main thread (fresh memory touched: about 2 us of
CPU each here), and ``blocked`` = wall - CPU - run-queue wait (``/proc/thread-self/schedstat``):
time spent waiting for the other rank or a message, not for a core. The machine is shared: CPU,
faults and ``blocked`` are the numbers to compare; wall times include the other jobs.

``--no-trim`` skips the heap release between blocks (``release_free_memory``) in both runs, to
see what its re-faults cost one process and each rank; ``--events`` prints each rank's phases
with wall-clock start and end (one clock for both processes).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import distributed as bench  # noqa: E402

SEQUENCE_PHASES = ("check", "reduce", "p2p wait", "factor", "solve", "sparse_gpt step, rest")


def now() -> list[float]:
    """Wall, this thread's CPU, its run-queue wait, its minor page faults."""
    with open("/proc/thread-self/schedstat") as f:
        delay = int(f.read().split()[1]) / 1e9
    return [time.perf_counter(), time.thread_time(), delay,
            resource.getrusage(resource.RUSAGE_THREAD).ru_minflt]


class Phases:
    """Exclusive sums per (block, phase): calls, wall, CPU, run-queue wait, minor faults."""

    def __init__(self):
        self.block = 0
        self.stack: list[list[float]] = []
        self.sums: dict[tuple[int, str], list[float]] = {}
        self.events: list[tuple[str, int, float, float]] = []
        self.saved = []

    def wrap(self, owner, attr: str, label: str) -> None:
        fn = getattr(owner, attr)
        self.saved.append((owner, attr, fn))
        phases = self

        def timed(*args, **kwargs):
            t0 = now()
            phases.stack.append([0.0] * 4)
            try:
                return fn(*args, **kwargs)
            finally:
                t1 = now()
                inner = phases.stack.pop()
                total = [b - a for a, b in zip(t0, t1)]
                if phases.stack:
                    for i in range(4):
                        phases.stack[-1][i] += total[i]
                acc = phases.sums.setdefault((phases.block, label), [0, 0.0, 0.0, 0.0, 0.0])
                acc[0] += 1
                for i in range(4):
                    acc[i + 1] += total[i] - inner[i]
                phases.events.append((label, phases.block, t0[0], t1[0]))
        setattr(owner, attr, timed)

    def install(self) -> None:
        import fxprune.distributed as fd
        import fxprune.passes.sequential as seq
        import fxprune.sequential as engine
        self.wrap(engine.BlockStep, "record", "recording forward")
        self.wrap(engine.BlockSequentialRunner, "_propagate", "pruned forward (next inputs)")
        self.wrap(engine, "release_free_memory", "heap release")
        self.wrap(seq, "_sparse_gpt", "sparse_gpt step, rest")
        self.wrap(seq, "_sparse_gpt_factor", "factor")
        self.wrap(seq, "_sparse_gpt_rows", "solve")
        self.wrap(seq, "record_inputs", "recording, rest")
        self.wrap(seq, "prune_block", "prune_block, rest")
        self.wrap(fd.Distributed, "split_sparse_gpt", "sparse_gpt step, rest")
        self.wrap(fd.Distributed, "_wait", "p2p wait")
        self.wrap(fd.Distributed, "check", "check")
        self.wrap(fd.Distributed, "reduce_block_stats", "reduce")
        self.wrap(fd.Distributed, "count_zeros_share", "zero counts")
        if hasattr(seq, "LateWrites"):
            self.wrap(seq.LateWrites, "write", "row writes")

    def uninstall(self) -> None:
        for owner, attr, fn in reversed(self.saved):
            setattr(owner, attr, fn)


def worker(rank: int, world: int, store: str, blocks: int, out: str, no_trim: bool) -> None:
    import torch.distributed as dist

    import fxprune
    import fxprune.sequential as engine
    from fxprune.sequential import BlockSequentialRunner
    bench._init(rank, world, store)
    model = bench.llm_model(blocks)
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, 8000, (1, 128), generator=g) for _ in range(16)]
    phases = Phases()
    trim = engine.release_free_memory
    if no_trim:
        engine.release_free_memory = lambda: None
    capture = BlockSequentialRunner.capture
    marks = {}

    def mark():
        return now() + [resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()]

    def captured(runner):       # the phase starts when the capture ends, as in bench A
        capture(runner)
        marks["start"] = mark()
        phases.install()

    def end(i, name, block):
        marks["end"] = mark()
        phases.block = i + 1    # what follows (the heap release) counts with the next block

    BlockSequentialRunner.capture = captured
    dist.barrier()
    try:
        fxprune.transform(model, bench.SPARSE_GPT, (calibration[0],), inplace=True,
                          calibration=calibration, on_block_end=end)
    finally:
        BlockSequentialRunner.capture = capture
        engine.release_free_memory = trim
        phases.uninstall()
    span = [b - a for a, b in zip(marks["start"], marks["end"])]
    gathered = [None] * world
    dist.all_gather_object(gathered, {"span": span, "sums": phases.sums, "events": phases.events,
                                      "t0": marks["start"][0]})
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def report(world: int, results: list[dict], blocks: int, events: bool) -> None:
    def col(i, scale=1.0, fmt=".3f"):
        return ", ".join(format(r["span"][i] * scale, fmt) for r in results)
    print(f"\n{world} process(es): wall {max(r['span'][0] for r in results):.3f} s; per rank: main "
          f"thread CPU {col(1)} s, process CPU {col(5)} s, run-queue wait {col(2)} s, minor faults "
          f"{col(4, 1e-3, '.1f')}k (main thread {col(3, 1e-3, '.1f')}k)")
    labels = list(dict.fromkeys(label for r in results for _, label in r["sums"]))
    print("| phase | " + " | ".join(f"rank {k}: calls, CPU ms, blocked ms, faults k" for k in range(world)) + " |")
    print("|---|" + "---|" * world)
    for label in labels:
        cells = []
        for r in results:
            tot = [0, 0.0, 0.0, 0.0, 0.0]
            for (_, lab), v in r["sums"].items():
                if lab == label:
                    tot = [a + b for a, b in zip(tot, v)]
            cells.append(f"{tot[0]}, {tot[2] * 1e3:.0f}, {(tot[1] - tot[2] - tot[3]) * 1e3:.0f}, {tot[4] / 1e3:.1f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("per block, CPU ms (blocked ms) per rank:")
    for b in range(blocks + 1):
        parts = []
        for label in labels:
            vals = [r["sums"].get((b, label)) for r in results]
            if any(vals):
                vals = [v or [0, 0.0, 0.0, 0.0, 0.0] for v in vals]
                parts.append(f"{label} " + "/".join(
                    f"{v[2] * 1e3:.0f}({(v[1] - v[2] - v[3]) * 1e3:.0f})" for v in vals))
        print(f"  block {b}: " + "; ".join(parts))
    if events and world > 1:
        t0 = min(r["t0"] for r in results)
        for k, r in enumerate(results):
            print(f"rank {k}, phases of 2 ms or more (ms from the phase start):")
            for label, b, s, e in sorted(r["events"], key=lambda x: x[2]):
                if e - s >= 0.002:
                    print(f"   block {b} {label:30s} {(s - t0) * 1e3:8.1f} -> {(e - t0) * 1e3:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--no-trim", action="store_true")
    parser.add_argument("--events", action="store_true")
    args = parser.parse_args()
    import tempfile
    with tempfile.TemporaryDirectory(prefix="fxprune-bench-phases-") as work:
        for r in range(args.rounds):
            for world in (int(w) for w in args.worlds.split(",")):
                out = str(Path(work) / f"phases{world}.pt")
                print(f"\nround {r + 1}, load average before: {bench.load()}")
                bench.spawn(worker, world, args.blocks, out, args.no_trim)
                report(world, torch.load(out, weights_only=False), args.blocks, args.events)


if __name__ == "__main__":
    main()
