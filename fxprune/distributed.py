"""Pruning on several processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU; ``torchrun``).

Every rank runs the same call (``fxprune.transform``, ``fxprune.prune_checkpoint`` or the CLI under
``torchrun``) on the same model and config; a :class:`Distributed` wraps the process group and
holds the few collective steps fxprune needs. What is split and what is replicated:

- block-sequential calibration (``activation`` = Wanda, ``sparse_gpt``): the calibration batches
  are run up to the first block and merged into block batches on every rank (that part is cheap
  and makes the same block batches as one process); then each rank keeps block batch ``i`` when
  ``i % world == rank`` and carries only those hidden states from block to block. After each
  block's dense forward, the statistics are summed over the ranks before any mask is chosen:
  Wanda's per-feature sums of squares are gathered per batch and added in the single-process
  batch order; SparseGPT's sample counts are all-reduced and each Hessian (float64 sums of
  float32 products, see ``BlockInputStats.add_hessian``) is summed on the one rank computing its
  factor. Both give one process's masks. The SparseGPT work of one block (an inverse factor per
  distinct input, then the OBS update of the rows) is planned by :func:`plan_sparse_gpt`: each
  factor on one rank, sent point-to-point to the ranks that need it as soon as it is computed,
  rows in ranges, each range sent to every other rank as soon as it is solved, so every rank
  holds the same weights;
- whole-model data-aware groups (global scope, gradient criteria) and everything else are
  replicated: every rank computes the same result from the full calibration;
- checkpoints: see :mod:`fxprune.checkpoint.sharded`.

Errors: fxprune's collective steps start with a status exchange (an all-gather of one flag per
rank; the messages follow only when one is set), except the SparseGPT step, whose row messages
carry each rank's flag. A rank that fails takes part in the next exchange with its
one-line message instead, so every rank raises :class:`DistributedError` naming the failed rank
and its message; a rank that dies or hangs makes the others' collective fail after the process
group's timeout (``init_process_group(timeout=...)``; the CLI's ``--timeout``), reported as a
:class:`DistributedError` too. Only rank 0 reports progress.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .errors import ConfigError, FxPruneError


class DistributedError(FxPruneError, RuntimeError):
    """Another rank failed (its rank and message are in the text), or a collective timed out."""


def _dist():
    import torch.distributed as dist
    return dist


def resolve(group: Any = None) -> "Distributed | None":
    """The :class:`Distributed` of ``group`` (a ``ProcessGroup``), or of the default process group
    when ``group`` is None and one is initialised; None when there is one process only."""
    if isinstance(group, Distributed):
        return group if group.world > 1 else None
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ConfigError("group= was given but torch.distributed is not initialised; call "
                              "torch.distributed.init_process_group() first (torchrun sets it up)")
        return None
    d = Distributed(group)
    return d if d.world > 1 else None


class Distributed:
    """fxprune's collective steps on one process group (all ranks call them in the same order)."""

    def __init__(self, group: Any = None):
        dist = _dist()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        backend = dist.get_backend(group)
        # NCCL collectives run on the GPU of this rank; gloo on the CPU
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if backend == "nccl" else torch.device("cpu"))
        self.steps = 0
        self.batch_index: list[int] = []       # global index of each local calibration batch
        # SparseGPT steps: this rank's CPU time per group (not yet shared with the other ranks),
        # and per step geometry the measured / modelled cost ratios the next plans use
        self.measured: list[tuple[tuple, list[float], list[float]]] = []
        self.scales: dict[tuple, tuple[list[float], list[float]]] = {}
        self.cost_sums: dict[tuple, tuple[list[float], list[float]]] = {}   # times, modelled
        self.zero_shares: dict[str, int] = {}   # zeros counted in this rank's rows, per weight
        self.pending_sends: list = []       # point-to-point sends not waited yet (see drain)
        self.unread: list = []              # SolvedRows with pieces not received yet (see drain)

    # ------------------------------------------------------------------ errors
    def check(self, stage: str, error: str | None = None) -> None:
        """The status exchange every collective step starts with: raises on every rank when any
        rank reports an error (``error``), naming the ranks and their messages. One all-gather
        of a flag per rank; the messages follow only when a flag is set."""
        self.steps += 1
        dist = _dist()
        try:
            flags = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
            dist.all_gather(flags, torch.tensor([int(error is not None)], device=self.device),
                            group=self.group)
            if not any(int(f) for f in flags):
                return
            statuses = self.all_gather_objects(error)
        except Exception as e:   # a dead or hung rank: the process group's timeout fired
            raise DistributedError(
                f"rank {self.rank}: lost the other ranks at {stage} ({_one_line(e)}); another "
                f"rank stopped without reporting (see its output) or is stuck longer than the "
                f"process group's timeout") from None
        failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
        raise DistributedError("; ".join(f"rank {r} failed: {s}" for r, s in failed))

    @contextlib.contextmanager
    def guard(self, stage: str = "the end"):
        """Run a whole collective job: an exception on this rank is reported to the others at
        their next collective step (and re-raised here); at the end, every rank checks in."""
        try:
            yield self
        except DistributedError:
            raise
        except Exception as e:
            self._report(stage, e)
            raise
        self.check(stage)

    def run(self, stage: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` on this rank, then a status exchange: any rank's error stops all ranks."""
        with self.guard(stage):
            return fn()

    def _report(self, stage: str, e: BaseException) -> None:
        """This rank's error, at the status exchange the other ranks are waiting in (once: an
        error already reported by an inner step is not reported again)."""
        if getattr(e, "_fxprune_reported", False):
            return
        try:
            e._fxprune_reported = True
        except AttributeError:
            pass
        with contextlib.suppress(DistributedError):   # this rank raises its own error
            self.check(stage, _describe(e))

    # ------------------------------------------------------------------ calibration
    def block_batch_share(self, n: int) -> list[int]:
        """This rank's block batches (calibration batches merged as one process merges them,
        ``block_batch_tokens``): every ``world``-th, from its rank on. Records their indices, the
        single-process order of the ordered reductions."""
        if n < self.world:
            raise ConfigError(
                f"the calibration makes {n} block batch(es) for {self.world} ranks (batches are "
                f"merged up to block_batch_tokens tokens); each rank needs at least one: pass at "
                f"least {self.world} calibration batches and set block_batch_tokens to at most "
                f"the tokens of one batch")
        self.batch_index = list(range(self.rank, n, self.world))
        return self.batch_index

    # ------------------------------------------------------------------ collectives
    def all_gather_objects(self, obj: Any) -> list:
        out: list[Any] = [None] * self.world
        _dist().all_gather_object(out, obj, group=self.group)
        return out

    def all_reduce_sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Sums over the ranks, through one flat buffer per dtype (one collective each)."""
        dist = _dist()
        out: list[Tensor | None] = [None] * len(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            flat = torch.cat([tensors[i].reshape(-1) for i in idx]).to(self.device)
            dist.all_reduce(flat, group=self.group)
            flat = flat.to(tensors[idx[0]].device)
            for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
                out[i] = part.view(tensors[i].shape)
        return out  # type: ignore[return-value]

    def _peer(self, rank: int) -> int:
        """The global rank of ``rank`` of this group (point-to-point calls take global ranks)."""
        return _dist().get_global_rank(self.group, rank) if self.group is not None else rank

    # ------------------------------------------------------------------ block-sequential hooks
    def block_input_stats(self, model, targets):
        return _RankInputStats(model, targets, self)

    def split_sparse_gpt(self, shared_groups: Sequence[list], factor: Callable,
                         solve: Callable, cuts: Callable, stats: Any) -> "SolvedRows":
        """The SparseGPT solves of one block's layers, divided among the ranks; every rank
        gets every group's ``(new float32 rows, pruned mask)`` from the returned
        :class:`SolvedRows`, group by group as the other ranks' rows arrive.

        ``factor(shared)``: the inverse Hessian factor of layers sharing one input;
        ``solve(shared, u, r0, r1)``: rows ``[r0, r1)`` of their stacked 2-D views, updated;
        ``cuts(shared)``: where their rows may be split; ``stats``: the block's input statistics
        (:meth:`block_input_stats`), whose Hessians may still be this rank's partial sums.
        :func:`plan_sparse_gpt` gives each factor to one rank and each rank row ranges so that
        the ranks' costs are even. Everything travels point-to-point in the background while the
        ranks compute: the partial Hessians to the rank computing their factor, each factor to the
        ranks solving rows with it as soon as it is computed, each solved row range to every other
        rank as soon as it is solved (with an error flag: a rank's error stops every rank with
        its message, without a status exchange per step when all goes well). Each rank computes
        its factors first, then solves its rows in group order (the forward's: the other ranks'
        next forward needs the first layers first). It returns once its own solves are done and
        sent: the other ranks' rows may still be on their way (:meth:`SolvedRows.get` waits for
        a group's)."""
        dist = _dist()
        self.drain()
        cols = [shared[0].geometry.view_shape[1] for shared in shared_groups]
        rows = [sum(t.geometry.view_shape[0] for t in shared) for shared in shared_groups]
        key = tuple(zip(cols, rows))
        factor_scale, solve_scale = self.scales.get(key, (None, None))
        plan = plan_sparse_gpt(cols, rows, [cuts(shared) for shared in shared_groups], self.world,
                               factor_scale=factor_scale, solve_scale=solve_scale)
        spent = [0.0] * (2 * len(cols))     # this rank's CPU s per group: factor, then solves
        name = shared_groups[0][0].name if shared_groups else ""
        stage = f"the sparse_gpt solves near {name}"
        pieces = [(g, r, r0, r1) for g in range(len(cols)) for r, r0, r1 in plan.ranges[g]]
        # post every receive first: the other ranks' rows and the factors this rank needs. A row
        # range comes as three messages (error flag, float32 rows, mask bytes) received straight
        # into the result tensors: no packing on either side
        incoming = {}
        for k, (g, r, r0, r1) in enumerate(pieces):
            if r != self.rank:
                parts = (torch.empty(1, dtype=torch.int64, device=self.device),
                         torch.empty(r1 - r0, cols[g], dtype=torch.float32, device=self.device),
                         torch.empty(r1 - r0, cols[g], dtype=torch.uint8, device=self.device))
                incoming[k] = (parts, [dist.irecv(x, self._peer(r), group=self.group, tag=_tag(kind, k))
                                       for kind, x in zip(_ROW_KINDS, parts)])
        sends = []
        gather = stats.send_hessians(shared_groups, plan.owner, sends)
        recvs = {}
        for g, owner in enumerate(plan.owner):
            if owner != self.rank and any(r == self.rank for r, _, _ in plan.ranges[g]):
                wire = torch.empty(cols[g], cols[g], device=self.device)
                recvs[g] = (wire, dist.irecv(wire, self._peer(owner), group=self.group, tag=_tag(_FACTOR, g)))
        error: BaseException | None = None
        factors: dict[int, Tensor] = {}
        for g, owner in enumerate(plan.owner):     # this rank's factors, sent as soon as ready
            if owner != self.rank:
                continue
            try:
                # the factor's time includes summing the other ranks' partial Hessians: work
                # only the factor's owner does
                start = time.thread_time()
                if g in gather:
                    gather[g](lambda work: self._wait(work, stage))
                if error is None:
                    factors[g] = factor(shared_groups[g])
                    spent[g] += time.thread_time() - start
            except DistributedError:
                raise
            except Exception as e:            # reported with the results below
                error = e
            users = {r for r, _, _ in plan.ranges[g]} - {owner}
            # a failed factor goes out as NaN: its users skip their rows (the owner reports)
            u = factors.get(g)
            wire = (u if u is not None else torch.full((cols[g], cols[g]), float("nan"))
                    ).to(self.device).contiguous()
            sends += [dist.isend(wire, self._peer(r), group=self.group, tag=_tag(_FACTOR, g))
                      for r in sorted(users)]
        # in the order of the forward (groups come first-seen): the other ranks write and use
        # the first layers' rows in their next forward while this rank solves the later ones
        mine = [k for k, (g, r, _, _) in enumerate(pieces) if r == self.rank]
        solved: dict[int, tuple[Tensor, Tensor]] = {}
        owner_failed = False        # a NaN factor: its owner failed (and may send no rows)
        for k in mine:
            g, _, r0, r1 = pieces[k]
            if g in recvs:
                wire, work = recvs.pop(g)
                self._wait(work, stage)
                factors[g] = wire.to("cpu") if wire.device.type != "cpu" else wire
            u = factors.get(g)
            failed_factor = u is not None and bool(torch.isnan(u[0, 0]))
            owner_failed = owner_failed or failed_factor
            if error is None and u is not None and not failed_factor:
                try:
                    start = time.thread_time()
                    solved[k] = solve(shared_groups[g], u, r0, r1)
                    spent[len(cols) + g] += time.thread_time() - start
                except Exception as e:
                    error = e
            # per row range: an error flag, then the rows' float32 weights and mask bytes (zeros
            # of the same sizes after an error: the receives are posted already)
            if k in solved:
                new, pruned = (x.contiguous() for x in solved[k])
            else:
                new = torch.zeros(r1 - r0, cols[g], dtype=torch.float32)
                pruned = torch.zeros(r1 - r0, cols[g], dtype=torch.bool)
            # flagged too when the factor's owner failed: these zeros are not rows
            parts = [torch.tensor([int(error is not None or failed_factor)], dtype=torch.int64), new,
                     pruned.view(torch.uint8)]
            parts = [x.to(self.device) for x in parts]
            sends += [dist.isend(x, self._peer(r), group=self.group, tag=_tag(kind, k))
                      for r in range(self.world) if r != self.rank
                      for kind, x in zip(_ROW_KINDS, parts)]
        # this rank's sends complete in the background (waited at the next collective step):
        # what follows (writing rows, the next forward) does not wait for the transfers
        self.pending_sends += sends
        if self.device.type == "cpu":   # GPU kernels run asynchronously: CPU time says nothing
            modelled = [factor_cost(c) for c in cols] + [
                sum(solve_cost(r1 - r0, cols[g]) for _, r0, r1 in plan.ranges[g]) for g in range(len(cols))]
            self.measured.append((key, spent, modelled))
        arriving = SolvedRows(self, stage, cols, rows, pieces, solved, incoming)
        if error is not None or owner_failed:
            self.drain(stage)
            arriving.receive_all(check_flags=False)
            if error is not None:
                self._report(stage, error)
                raise error
            self.check(stage)           # raises: the failed ranks' messages
        self.unread.append(arriving)
        return arriving

    def learn_costs(self, measured: list, spent: list[float]) -> None:
        """Add the last SparseGPT steps' times (``spent``: summed over the ranks, each piece being
        timed on the one rank that computed it, in the order of ``measured``) and modelled costs
        (``measured``: ``(key, this rank's times, modelled costs)`` per step, per group: factors,
        then solves) to those of the earlier steps of the same geometry, and keep the
        :func:`learned_scales` of the sums for the next plans. A step with an untimed group (a
        failed factor) adds nothing.
        On a shared machine the same solve's time varies from one block to the next (measured
        in docs/distributed.md): a plan following the last block's ratios alone moves whole
        groups back and forth after that noise, one following the ratios of all the blocks so
        far settles. The sums last as long as this object: one transform call (``resolve``
        makes one per call), or several when the caller passes the same ``Distributed`` as
        ``group=``."""
        at = 0
        for key, mine, modelled in measured:
            times = spent[at:at + len(mine)]
            at += len(mine)
            if not all(t > 0 for t in times) or not all(m > 0 for m in modelled):
                continue                # an untimed group (a failed step): nothing to learn
            earlier = self.cost_sums.get(key)
            if earlier is not None:
                times = [a + b for a, b in zip(earlier[0], times)]
                modelled = [a + b for a, b in zip(earlier[1], modelled)]
            self.cost_sums[key] = (list(times), list(modelled))
        self.scales.update(learned_scales(self.cost_sums))

    def drain(self, stage: str = "the sparse_gpt solves") -> None:
        """Wait for this rank's point-to-point sends still in flight (a step's sends complete in
        the background; every collective step waits for them first), then receive the rows of
        earlier steps not read yet: a piece flagged by a failed rank raises its message here, on
        every rank, before any other exchange could wait for that rank."""
        sends, self.pending_sends = self.pending_sends, []
        for work in sends:
            self._wait(work, stage)
        unread, self.unread = self.unread, []
        for arriving in unread:
            arriving.receive_all()

    def forget_pending(self) -> None:
        """Drop what a failed earlier run left (a ``group=`` reused after an error starts afresh)."""
        self.pending_sends.clear()
        self.unread.clear()
        self.zero_shares.clear()

    def _wait(self, work, stage: str) -> None:
        try:
            work.wait()
        except Exception as e:
            raise DistributedError(f"rank {self.rank}: lost the other ranks at {stage} "
                                   f"({_one_line(e)}); another rank stopped or is stuck longer "
                                   f"than the process group's timeout") from None

    def count_zeros_share(self, param: str, weight: Tensor) -> None:
        """Count the zeros of this rank's share of ``weight``'s rows (dim 0, ``world`` even
        ranges); :meth:`total_stats` sums the shares into the zero counts (every rank holds the
        same weights: one rank counting all of them repeats the others' work)."""
        from .report import count_zeros

        n = weight.shape[0]
        self.zero_shares[param] = count_zeros(weight[n * self.rank // self.world:n * (self.rank + 1) // self.world])

    def total_stats(self, stats, zero_counts: dict[str, int] | None = None) -> None:
        """A block-sequential run's counts (``RunStats``) summed over the ranks, in place: block
        batches, block forwards (stopped early or not) and spilled tensors (every rank captured
        every batch); and into ``zero_counts``, the zeros each rank counted in its share of the
        pruned weights (:meth:`count_zeros_share`), in the same all-reduce."""
        self.drain()
        self.check("the end of the block-sequential calibration")
        shares, self.zero_shares = self.zero_shares, {}
        (total,) = self.all_reduce_sum([torch.tensor(
            [stats.block_batches, stats.block_forwards, stats.stopped_early, stats.spilled,
             *shares.values()], dtype=torch.int64)])
        total = [int(x) for x in total.tolist()]
        stats.block_batches, stats.block_forwards, stats.stopped_early, stats.spilled = total[:4]
        if zero_counts is not None:
            zero_counts.update(zip(shares, total[4:]))

    def reduce_block_stats(self, stats, block_name: str) -> None:
        """Sum one block's input statistics over the ranks (every rank ends with the same)."""
        self.drain()
        self.check(f"block {block_name}")
        stats.reduce()


class SolvedRows:
    """The rows of one SparseGPT step (:meth:`Distributed.split_sparse_gpt`): this rank's own,
    and the other ranks' as they arrive. :meth:`get` waits for one group's pieces only, so a
    rank can write and use the layers whose rows are in while the others' are still on their
    way; :meth:`receive_all` waits for everything left. A piece flagged by a failed rank makes
    every rank raise with that rank's message (a status exchange the failed rank joins)."""

    def __init__(self, d: Distributed, stage: str, cols, rows, pieces, solved, incoming):
        self.d, self.stage = d, stage
        self.cols, self.rows, self.pieces = cols, rows, pieces
        self.solved, self.incoming = solved, incoming
        self.received: dict[int, tuple[Tensor, Tensor]] = {}

    def _receive(self, k: int, check_flag: bool = True) -> tuple[Tensor, Tensor]:
        if k in self.solved:
            return self.solved[k]
        if k not in self.received:
            parts, works = self.incoming.pop(k)
            for work in works:
                self.d._wait(work, self.stage)
            flag, new, pruned = (x.cpu() for x in parts)
            if check_flag and int(flag):
                self.d.check(self.stage)        # raises: the failed ranks' messages
                raise DistributedError(f"rank {self.d.rank}: rows flagged as failed at {self.stage}, "
                                       f"but no rank reported an error")
            self.received[k] = (new, pruned.view(torch.bool))
        return self.received[k]

    def receive_all(self, check_flags: bool = True) -> None:
        """Receive every piece not read yet, checking each one's flag unless ``check_flags`` is
        False (a rank that failed itself only waits for them before it reports)."""
        for k in list(self.incoming):
            self._receive(k, check_flags)

    def ready(self, g: int) -> bool:
        """Whether group ``g``'s rows are all here (solved on this rank or received)."""
        return all(k in self.solved or k in self.received
                   for k, p in enumerate(self.pieces) if p[0] == g)

    def get(self, g: int) -> tuple[Tensor, Tensor]:
        """Group ``g``'s ``(new float32 rows, pruned mask)``, once all its pieces are in."""
        ks = [k for k, p in enumerate(self.pieces) if p[0] == g]
        if len(ks) == 1:                # one range: its tensors as they are, no copy
            return self._receive(ks[0])
        new = torch.empty(self.rows[g], self.cols[g], dtype=torch.float32)
        pruned = torch.empty(self.rows[g], self.cols[g], dtype=torch.bool)
        for k in ks:
            r0, r1 = self.pieces[k][2:]
            new[r0:r1], pruned[r0:r1] = self._receive(k)
        return new, pruned


def init_from_env(timeout_s: float) -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment): initialise the default process
    group (NCCL when CUDA is available, else gloo) with a ``timeout_s`` collective timeout.
    Returns whether it did (the caller then destroys it at the end)."""
    import datetime
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist = _dist()
    if dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    dist = _dist()
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def assign(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each item: largest first, each to the least loaded rank (ties: lowest rank);
    deterministic, so every rank computes the same assignment."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


# Relative costs of the SparseGPT work (units of ~25 ps of one CPU thread), fitted to its CPU
# times in the block-sequential pass (hidden 512 and 1376 columns): the n^3 and rows x cols^2
# terms are the FLOPs; a solve also pays per column, whatever its rows (the column loop and the
# N:M selection), which makes splitting a small layer's rows cost more than it saves.
def factor_cost(cols: int) -> float:
    """Cost of one inverse Hessian factor (Cholesky and triangular inverse)."""
    return 0.3 * float(cols) ** 3 + 1000.0 * float(cols) ** 2


def solve_cost(rows: int, cols: int) -> float:
    """Cost of SparseGPT's OBS update of ``rows`` weight rows with ``cols`` columns."""
    return 1.8e6 * cols + rows * (float(cols) ** 2 + 665.0 * cols)


@dataclass
class SparseGPTPlan:
    """Who does what in one block's SparseGPT solves (the same on every rank)."""

    owner: list[int]                               # rank computing each group's inverse factor
    ranges: list[list[tuple[int, int, int]]]       # per group: (rank, r0, r1), in row order
    load: list[float]                              # estimated cost per rank (waits excluded)


def plan_sparse_gpt(cols: Sequence[int], rows: Sequence[int], cuts: Sequence[Sequence[int]],
                    world: int, *, factor_scale: Sequence[float] | None = None,
                    solve_scale: Sequence[float] | None = None) -> SparseGPTPlan:
    """Start from whole groups (a group's factor and all its rows on one rank), placed largest
    first on the least loaded rank; then split the costliest piece in two at the allowed cut
    (``cuts[g]``) that evens its halves (the half with the factor stays with it, and may have no
    rows), re-place, and keep the placement that ends first (the largest rank load, plus any
    wait for a factor computed on another rank). Last, single factors move to other ranks than
    their rows (no extra compute: one matrix sent) while that ends sooner. Costs are
    :func:`factor_cost` and :func:`solve_cost` times group ``g``'s ``factor_scale[g]`` and
    ``solve_scale[g]`` (time measured / cost modelled on the earlier blocks, see
    :func:`learned_scales`; 1 when not given). Deterministic: every rank plans the same."""
    n = len(cols)
    fs = list(factor_scale) if factor_scale is not None else [1.0] * n
    ss = list(solve_scale) if solve_scale is not None else [1.0] * n

    def cost(piece) -> float:
        g, r0, r1, with_factor = piece
        return ((factor_cost(cols[g]) * fs[g] if with_factor else 0.0)
                + (solve_cost(r1 - r0, cols[g]) * ss[g] if r1 > r0 else 0.0))

    def finish(pieces, owners) -> float:
        # when the last rank is done, computing as split_sparse_gpt does: its factors in group
        # order, then its rows in group order (the forward's), each once its factor is ready
        owner = {g: r for (g, _, _, with_factor), r in zip(pieces, owners) if with_factor}
        ready, clock = {}, [0.0] * world
        for g in sorted(owner):
            clock[owner[g]] += factor_cost(cols[g]) * fs[g]
            ready[g] = clock[owner[g]]
        for g, r0, r1, r in sorted((g, r0, r1, r) for (g, r0, r1, _), r in zip(pieces, owners) if r1 > r0):
            clock[r] = max(clock[r], ready[g]) + solve_cost(r1 - r0, cols[g]) * ss[g]
        return max(clock)

    def placed(pieces, owners):
        load = [0.0] * world
        for p, r in zip(pieces, owners):
            load[r] += cost(p)
        return finish(pieces, owners), len(pieces), pieces, owners, load

    def place(pieces):
        return placed(pieces, assign([cost(p) for p in pieces], world))

    pieces = [(g, 0, rows[g], True) for g in range(n)]
    best = place(pieces)
    for _ in range(4 * world if world > 1 else 0):
        for p in sorted(pieces, key=lambda p: (-cost(p), p[0], p[1])):
            g, r0, r1, with_factor = p
            # the factor may also go alone (a piece of no rows)
            inside = [c for c in cuts[g] if r0 < c < r1 or (with_factor and c == r0 < r1)]
            if inside:
                mid = min(inside, key=lambda c: (abs(cost((g, r0, c, with_factor)) - cost((g, c, r1, False))), c))
                i = pieces.index(p)
                pieces = pieces[:i] + [(g, r0, mid, with_factor), (g, mid, r1, False)] + pieces[i + 1:]
                break
        else:
            break
        trial = place(pieces)
        if trial[0] < best[0] * 0.999:
            best = trial
    # then move single factors to other ranks (away from their rows: one matrix sent, no
    # extra compute) while that ends the step sooner
    for _ in range(n if world > 1 else 0):
        _, _, pieces, owners, _ = best
        found = best
        for i, (g, r0, r1, with_factor) in enumerate(pieces):
            for r in range(world) if with_factor else ():
                if r == owners[i]:
                    continue
                if r1 > r0:         # the factor leaves its rows' piece
                    trial = placed(pieces[:i] + [(g, r0, r0, True), (g, r0, r1, False)] + pieces[i + 1:],
                                   owners[:i] + [r, owners[i]] + owners[i + 1:])
                else:
                    trial = placed(pieces, owners[:i] + [r] + owners[i + 1:])
                if trial[0] < found[0] * 0.999:
                    found = trial
        if found is best:
            break
        best = found
    _, _, pieces, owners, load = best
    owner = [0] * len(cols)
    ranges: list[list[tuple[int, int, int]]] = [[] for _ in cols]
    for (g, r0, r1, with_factor), r in sorted(zip(pieces, owners), key=lambda x: (x[0][0], x[0][1])):
        if with_factor:
            owner[g] = r
        if r1 == r0:
            continue
        if ranges[g] and ranges[g][-1][0] == r and ranges[g][-1][2] == r0:    # adjacent: merge
            ranges[g][-1] = (r, ranges[g][-1][1], r1)
        else:
            ranges[g].append((r, r0, r1))
    return SparseGPTPlan(owner, ranges, load)


def learned_scales(cost_sums: dict[tuple, tuple[list[float], list[float]]]
                   ) -> dict[tuple, tuple[list[float], list[float]]]:
    """Per SparseGPT step geometry, ``cost_sums[key] = (times, modelled)``: the CPU time the work
    took and the cost model's estimate, per group (factors, then solves), both positive (see
    :meth:`Distributed.learn_costs`); returns the ratio of time to estimate, for factors and for
    solves. The next plan for that geometry (the next block's) uses the ratios, so the split
    follows what the work costs on this machine; every rank gets the same numbers."""
    out = {}
    for key, (times, modelled) in cost_sums.items():
        ratios = [t / m for t, m in zip(times, modelled)]
        n = len(ratios) // 2
        out[key] = (ratios[:n], ratios[n:])
    return out


# point-to-point message kinds of the SparseGPT step; tags are unique per kind and index
_FACTOR, _HESSIAN, _ROWS_FLAG, _ROWS_NEW, _ROWS_MASK = range(5)
_KINDS = 5
_ROW_KINDS = (_ROWS_FLAG, _ROWS_NEW, _ROWS_MASK)


def _tag(kind: int, index: int) -> int:
    return _KINDS * index + kind


def _describe(e: BaseException) -> str:
    """One line for the other ranks: fxprune's own messages as they are, others with their type."""
    return _one_line(e) if isinstance(e, FxPruneError) else f"{type(e).__name__}: {_one_line(e)}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:500] if text else type(e).__name__


def _rank_stats_class():
    from .passes.sequential import BlockInputStats, add_in_chunks_

    class RankInputStats(BlockInputStats):
        """One block's input statistics over this rank's batches, reducible over the ranks.

        Each Wanda sum-of-squares contribution is kept with its global batch index, so the sum
        over all ranks is formed in the single-process order (bit-identical); Hessians and sample
        counts are all-reduced."""

        def __init__(self, model, targets, d: Distributed):
            super().__init__(model, targets)
            self.d = d
            self.batch = 0
            self.parts: dict[int, list[tuple[int, int, Tensor]]] = {}
            self.partial: dict[int, torch.dtype] = {}   # Hessians still partial: their wire dtype
            self.means: dict[int, Tensor] = {}     # summed over the ranks: the float32 mean

        def new_batch(self, b: int) -> None:
            super().new_batch(b)
            self.batch = self.d.batch_index[b]

        def add_sumsq(self, stat, s: Tensor) -> None:
            parts = self.parts.setdefault(id(stat), [])
            parts.append((self.batch, len(parts), s))
            super().add_sumsq(stat, s)

        def hessian(self, t) -> Tensor:
            mean = self.means.pop(id(self.stat_of[t.param]), None)
            return mean if mean is not None else super().hessian(t)

        def add_hessian(self, stat, h: Tensor) -> None:
            """This rank's partial Hessian: its first float32 product as it is (it travels as
            float32, exactly, when every rank has one), the float64 sum from the second on (the
            same bits as the single-process sum: a float32 product is exact in float64). A
            float64 buffer per input would cost a rank that does not compute its factor one
            allocation, fill and conversion per block for nothing."""
            if stat.hessian is None:
                stat.hessian = h        # the base _gram's product is fresh: kept as it is
            else:
                stat.hessian = add_in_chunks_(stat.hessian if stat.hessian.dtype == torch.float64
                                              else stat.hessian.to(torch.float64), h)

        def reduce(self) -> None:
            stats = []
            for t in self.targets:
                stat = self.stat_of[t.param]
                if all(stat is not s for s in stats):
                    stats.append(stat)
            # Wanda: every rank's contributions, summed in global batch order
            want = [s for s in stats if s.sumsq is not None]
            if want:
                gathered = self.d.all_gather_objects([self.parts.get(id(s), []) for s in want])
                for j, stat in enumerate(want):
                    parts = sorted((p for rank_parts in gathered for p in rank_parts[j]),
                                   key=lambda p: (p[0], p[1]))
                    total = None
                    for _, _, s in parts:
                        s = s.to(stat.sumsq.device)
                        total = s if total is None else total + s
                    stat.sumsq = total
            # SparseGPT: the sample counts are all-reduced (exact in float64). A Hessian (float64
            # sum of float32 products) is needed by the rank computing its factor only: it stays
            # partial here and goes there point-to-point (send_hessians), as float32 when every
            # rank's partial is one float32 product (exact), else as float64. A Hessian feeding
            # layers of several pruning groups is all-reduced now instead.
            hess = [s for s in stats if s.hessian is not None]
            shared = [s for s in hess if len({id(m.group) for m in s.members}) > 1]
            defer = [s for s in hess if all(s is not x for x in shared)]
            # (with the CPU times of the ranks' last SparseGPT steps: every piece was timed on
            # the one rank that computed it, so the sum is each piece's time)
            measured, self.d.measured = self.d.measured, []
            counts = torch.tensor([s.count for s in stats] + [float(s.hessian.dtype == torch.float64) for s in defer]
                                  + [x for _, spent, _ in measured for x in spent], dtype=torch.float64)
            summed = self.d.all_reduce_sum([s.hessian.to(torch.float64) for s in shared] + [counts])
            total = summed[-1].tolist()
            self.d.learn_costs(measured, total[len(stats) + len(defer):])
            for stat, h in zip(shared, summed):
                stat.hessian = h
            for stat, c in zip(stats, total):
                stat.count = int(c)
            for stat, several in zip(defer, total[len(stats):]):
                self.partial[id(stat)] = torch.float64 if several else torch.float32

        def send_hessians(self, shared_groups, owners: Sequence[int], sends: list) -> dict:
            """Start moving the partial Hessians of ``shared_groups`` to the rank computing each
            one's factor (``owners``): this rank's partials go out (``sends`` gets the requests;
            the partial is dropped here), and for its own groups the first receive is posted.
            Returns per own group ``finish(wait)``, which waits for the other ranks' partials
            and sums them, in rank order, into the Hessian."""
            dist, d = _dist(), self.d
            finish = {}
            for g, group in enumerate(shared_groups):
                stat = self.stat_of[group[0].param]
                wire = self.partial.pop(id(stat), None)
                if wire is None:                    # summed already
                    continue
                if owners[g] != d.rank:
                    part = stat.hessian.to(device=d.device, dtype=wire).contiguous()
                    sends.append(dist.isend(part, d._peer(owners[g]), group=d.group, tag=_tag(_HESSIAN, g)))
                    stat.hessian = None
                    continue
                peers = [r for r in range(d.world) if r != d.rank]

                def post(r, stat=stat, wire=wire, g=g):
                    buf = torch.empty(stat.hessian.shape, dtype=wire, device=d.device)
                    return buf, dist.irecv(buf, d._peer(r), group=d.group, tag=_tag(_HESSIAN, g))

                first = post(peers[0])

                def done(wait, stat=stat, peers=peers, first=first, post=post):
                    # summed in float64, in rank order as they arrive: at most two receive
                    # buffers at a time (float32 ones are added as they are: exact in float64);
                    # the last addition is fused with the mean (mean_of_sum)
                    total, nxt, i = None, first, 0
                    for r in range(d.world):
                        if r == d.rank:
                            h = stat.hessian
                        else:
                            buf, work = nxt
                            i += 1
                            if i < len(peers):
                                nxt = post(peers[i])
                            wait(work)
                            h = buf.to(stat.hessian.device)
                        if total is None:
                            total = h
                        elif r < d.world - 1:       # every buffer here is this rank's to change
                            total = add_in_chunks_(
                                total if total.dtype == torch.float64 else total.to(torch.float64), h)
                        else:
                            self.means[id(stat)] = mean_of_sum(total, h, max(stat.count, 1))
                    stat.hessian = None
                finish[g] = done
            return finish

    return RankInputStats


def mean_of_sum(a: Tensor, b: Tensor, count: int) -> Tensor:
    """``((a + b) / count)`` rounded to float32, the sum and the division in float64: the same
    bits as ``BlockInputStats.hessian`` of the float64 sum ``a + b``, without that sum's
    full-size float64 buffer (chunk by chunk through a small one; the result is written over a
    float32 operand when there is one: both are consumed)."""
    out = a if a.dtype == torch.float32 else b if b.dtype == torch.float32 else torch.empty(
        a.shape, dtype=torch.float32, device=a.device)
    from .passes.sequential import conversion_step
    fa, fb, fo = a.reshape(-1), b.reshape(-1), out.view(-1)
    step = conversion_step(fa)
    tmp = torch.empty(min(step, fa.numel()), dtype=torch.float64, device=a.device)
    for s in range(0, fa.numel(), step):
        e = min(s + step, fa.numel())
        t = tmp[:e - s]
        t.copy_(fa[s:e])
        t.add_(fb[s:e])
        torch.div(t, count, out=fo[s:e])
    return out


_RANK_STATS = None


def _RankInputStats(model, targets, d):
    global _RANK_STATS
    if _RANK_STATS is None:
        _RANK_STATS = _rank_stats_class()
    return _RANK_STATS(model, targets, d)


__all__ = ["Distributed", "DistributedError", "SolvedRows", "SparseGPTPlan", "assign", "factor_cost", "init_from_env",
           "learned_scales", "mean_of_sum", "plan_sparse_gpt", "rank", "resolve", "solve_cost"]
