"""Block-sequential calibration: run the calibration once, one repeated block at a time.

Large language models are a stack of identical blocks (Hugging Face decoder layers). The data-aware
criteria need each layer's inputs; the cheap way to get them is the one SparseGPT's and Wanda's
reference code use: run the calibration up to the first block once, keep the block inputs, then
for each block record its layers' inputs, prune the block, and run the *pruned* block over the
kept inputs to make the next block's inputs. About one forward over the calibration in all
(two block forwards per block and batch: one to record, one to propagate), linear in depth,
with one block's statistics and one block's hidden states in memory.

The engine knows nothing about pruning: :class:`BlockSequentialRunner` calls ``process(step)``
for every block, and ``process`` runs :meth:`BlockStep.record` (a forward of the dense block over
every cached input, with the caller's hooks installed) and changes the block's weights. Hooks
``on_block_start(index, name, block)`` / ``on_block_end(index, name, block)`` run just before a
block is first used and right after its outputs are computed, so a checkpoint streamer can
materialise one block's weights from disk and release them afterwards; the part of the model
before the first block (embeddings, rotary embeddings, mask construction) runs with only its own
weights loaded: during the capture the first block is replaced by a stand-in that keeps its
inputs and stops the forward (the real block, and any hook on it, is not called).

Assumptions (those of the peers): every block receives the same extra inputs (attention mask,
position ids and embeddings), captured once at the first block; a block returns its hidden states
(a tensor, or a tuple whose first element is the tensor). KV caches are turned off: a
``Cache`` argument is replaced by ``None`` and ``use_cache`` by ``False``.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from .errors import ConfigError, FxPruneError
from .inputs import eval_mode

BlockHook = Callable[[int, str, nn.Module], None]

DEFAULT_CACHE_BYTES = 1 << 30   # RAM for cached hidden states (inputs + outputs of one block)
DEFAULT_BATCH_TOKENS = 512      # calibration batches are merged into block batches of this size


# ---------------------------------------------------------------------------- block detection
@dataclass(frozen=True)
class BlockList:
    """The repeated blocks of a model: ``name`` is the ``ModuleList``'s FQN (``model.layers``)."""

    name: str
    modules: nn.ModuleList

    def __len__(self) -> int:
        return len(self.modules)

    def block_name(self, index: int) -> str:
        return f"{self.name}.{index}" if self.name else str(index)

    def index_of(self, param_name: str) -> int | None:
        """The block holding parameter ``param_name`` (an FQN of the whole model), else None."""
        prefix = f"{self.name}." if self.name else ""
        if not param_name.startswith(prefix):
            return None
        head = param_name[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() and int(head) < len(self.modules) else None


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_block(module: nn.Module) -> bool:
    """A container of layers (a decoder layer), not a layer: no weights of its own, and at least
    two sub-modules with a matrix weight. A ``ModuleList`` of bare ``nn.Linear`` is not a stack of
    blocks: the model may apply anything between them."""
    if any(True for _ in module.parameters(recurse=False)):
        return False
    layers = sum(1 for m in module.modules() if m is not module
                 and isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() >= 2)
    return layers >= 2


def find_blocks(model: nn.Module, name: str | None = None) -> BlockList | None:
    """The model's repeated blocks: the ``ModuleList`` of at least two modules of one class, each
    a container of at least two weight layers, that holds the most parameters (meta parameters
    count: a skeleton works). ``name`` forces one (a clear error if it is not a ``ModuleList``).
    None when the model has none.

    Block-sequential calibration assumes the blocks run in order, each on the previous block's
    output (as decoder layers do); a model that transforms the hidden states between its blocks
    needs ``block_sequential: false``."""
    if name is not None:
        try:
            found = model.get_submodule(name)
        except AttributeError:
            found = None
        if not isinstance(found, nn.ModuleList) or len(found) < 1:
            lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
            raise ConfigError(f"block_list {name!r} is not a ModuleList of {type(model).__name__}; "
                              f"its ModuleLists are {lists[:8] or 'none'}")
        return BlockList(name, found)
    best, best_size = None, 0
    for mod_name, m in model.named_modules():
        if (not isinstance(m, nn.ModuleList) or len(m) < 2 or len({type(c) for c in m}) != 1
                or not _is_block(m[0])):
            continue
        size = _numel(m)
        if size > best_size:
            best, best_size = BlockList(mod_name, m), size
    return best


# ---------------------------------------------------------------------------- activation cache
class _Budget:
    def __init__(self, max_bytes: int, spill_dir: str | None):
        self.max_bytes, self.used = int(max_bytes), 0
        self.spill_parent = spill_dir
        self.dir: str | None = None
        self.files = 0

    def spill_path(self) -> str:
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="fxprune-activations-", dir=self.spill_parent)
        self.files += 1
        return os.path.join(self.dir, f"{self.files}.pt")

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


class ActivationCache:
    """One hidden-state tensor per calibration batch. Tensors stay in RAM while the shared budget
    allows; beyond it they are written to a temporary directory and memory-mapped back on use."""

    def __init__(self, budget: _Budget):
        self.budget = budget
        self.items: list[Tensor | str] = []

    def append(self, t: Tensor) -> None:
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        if self.budget.used + nbytes <= self.budget.max_bytes or t.device.type != "cpu":
            self.budget.used += nbytes
            self.items.append(t)
        else:
            path = self.budget.spill_path()
            torch.save(t.contiguous(), path)
            self.items.append(path)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tensor:
        item = self.items[i]
        if isinstance(item, str):
            return torch.load(item, mmap=True, weights_only=True)
        return item

    @property
    def spilled(self) -> int:
        return sum(isinstance(x, str) for x in self.items)

    def clear(self) -> None:
        for item in self.items:
            if isinstance(item, str):
                with contextlib.suppress(OSError):
                    os.remove(item)
            else:
                self.budget.used -= item.numel() * item.element_size()
        self.items = []


# ---------------------------------------------------------------------------- the runner
class _StopAtBlock(Exception):
    pass


class BlockStandIn(nn.Module):
    """Base of the modules put in a block's place for one run. The real block is held outside the
    module tree (the model's parameters are unchanged), and attributes the model reads from its
    blocks (``attention_type``...) come from it. ``fields`` are plain attributes of the stand-in."""

    def __init__(self, block: nn.Module, **fields):
        super().__init__()
        object.__setattr__(self, "block", block)
        for key, value in fields.items():
            object.__setattr__(self, key, value)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "block"), name)


class _FirstBlockCatcher(BlockStandIn):
    """Stands in for the first block during the capture: keeps its inputs and stops the forward."""

    def __init__(self, block: nn.Module, runner: "BlockSequentialRunner"):
        super().__init__(block, runner=runner)

    def forward(self, *args, **kwargs):
        self.runner.keep_block_inputs(args, kwargs)
        raise _StopAtBlock


@dataclass
class BlockCall:
    """How one batch calls the blocks: the positional / keyword inputs besides the hidden states."""

    hidden_pos: int | str           # index in args, or the kwarg name, of the hidden states
    args: tuple
    kwargs: dict

    def call(self, block: nn.Module, hidden: Tensor):
        args, kwargs = list(self.args), dict(self.kwargs)
        if isinstance(self.hidden_pos, int):
            args.insert(self.hidden_pos, hidden)
        else:
            kwargs[self.hidden_pos] = hidden
        return block(*args, **kwargs)


def _strip_cache(kwargs: dict) -> dict:
    out = {}
    for k, v in kwargs.items():
        if type(v).__name__.endswith("Cache") and not isinstance(v, Tensor):
            v = None            # a Hugging Face Cache object: no KV cache while calibrating
        elif k == "use_cache":
            v = False
        out[k] = v
    return out


def hidden_of(out) -> Tensor:
    """The hidden states a block returned: the tensor, or the first element of a tuple/list."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise FxPruneError(f"a block returned {type(out).__name__}; block-sequential calibration needs "
                       f"the hidden states as a tensor or as the first element of a tuple "
                       f"(set block_sequential: false to use the whole-model path)")


@dataclass
class RunStats:
    """What the runner did, in load-independent units."""

    batches: int = 0                 # calibration batches
    block_batches: int = 0           # after merging (each block runs once per block batch)
    block_forwards: int = 0          # calls of a block's forward (stopped ones too)
    stopped_early: int = 0           # recording forwards ended after their last recorded input
    spilled: int = 0                 # hidden-state tensors written to disk (all blocks)
    peak_cached_bytes: int = 0


class BlockStep:
    """One block, handed to ``process``: record its inputs, then change its weights."""

    def __init__(self, runner: "BlockSequentialRunner", index: int, block: nn.Module):
        self.runner, self.index, self.block = runner, index, block
        self.name = runner.blocks.block_name(index)
        self.recorded = False
        self._deferred: list[tuple[Callable[[], None], Callable[[], None] | None]] = []

    def defer(self, finish: Callable[[], None], cleanup: Callable[[], None] | None = None) -> None:
        """Run ``finish()`` once the block's pruned forward has made the next block's inputs
        (right after ``process`` when there is none: the last block, dense propagation), before
        ``on_block_end``; ``cleanup()`` runs after it, or instead of it when the block fails.
        For work ``process`` may leave to the forward (weights written by hooks as it reaches
        them) and must finish before the block is handed back."""
        self._deferred.append((finish, cleanup))

    def finish(self) -> None:
        """The deferred work (:meth:`defer`), in order; then every cleanup."""
        try:
            for fn, _ in self._deferred:
                fn()
        finally:
            self.close()

    def close(self) -> None:
        deferred, self._deferred = self._deferred, []
        for _, cleanup in deferred:
            if cleanup is not None:
                cleanup()

    @property
    def outputs_needed(self) -> bool:
        """Whether the next :meth:`record`'s outputs are the next block's inputs: with dense
        propagation, those of the first record (the dense block's). When they are not, a hook
        may end a recording forward early."""
        return self.runner.propagation == "dense" and not self.recorded

    def record(self, context: Callable[[], Any] | None = None,
               on_batch: Callable[[int], None] | None = None) -> None:
        """Run the block over every cached input (no gradients, eval mode). ``on_batch(b)``
        is called before batch ``b``; ``context()``, when given, is entered around each batch's
        forward (e.g. a dispatch-mode recorder); forward pre-hooks installed by the caller see
        every layer call. With dense propagation the first record's outputs (the dense block's)
        are kept as the next block's inputs, so no second forward is needed.

        May be called more than once (the block's layers pruned in stages, each recorded with
        the earlier ones pruned). When :attr:`outputs_needed` is false the outputs are thrown
        away, so a hook that has seen everything it records in a batch may raise
        :class:`~fxprune.criteria.calibration.StopForward`: that batch's forward ends there
        (the layers after the last recorded input never run)."""
        from .criteria.calibration import StopForward

        r = self.runner
        keep = self.outputs_needed
        for b in range(len(r.inputs)):
            if on_batch is not None:
                on_batch(b)
            r.stats.block_forwards += 1
            try:
                with (context() if context is not None else contextlib.nullcontext()):
                    out = r.calls[b].call(self.block, r.inputs[b])
            except StopForward:
                if keep:
                    raise FxPruneError(f"block {self.name}: a hook stopped a recording forward "
                                       f"whose outputs are the next block's inputs (dense "
                                       f"propagation)") from None
                r.stats.stopped_early += 1
                continue
            if keep:
                r.outputs.append(hidden_of(out))
        self.recorded = True


class BlockSequentialRunner:
    """Runs the calibration block by block; see the module docstring.

    Args:
        model: the whole model (its blocks may be on the meta device until ``on_block_start``).
        blocks: the repeated blocks (:func:`find_blocks`).
        calibration: an iterable of batches, in the forms ``transform`` takes.
        propagation: ``"pruned"`` (the next block's inputs come from the pruned block, as the
            peers do) or ``"dense"`` (from the dense block: the statistics equal the whole-model
            path's, at one block forward per batch).
        cache_bytes: RAM for the cached hidden states (one block's inputs and outputs together);
            the rest is spilled to files under ``spill_dir`` (default: the system temp dir).
        batch_tokens: consecutive calibration batches are concatenated into one block batch of
            up to this many tokens (rows of the hidden states) when their other inputs allow it
            (see :func:`merge_calls`); 0 keeps the batches as given.
        on_block_start / on_block_end: ``hook(index, name, block)``, see the module docstring.
        progress: ``progress(stage, done, total)`` once per block.
        keep_batches: ``keep_batches(n) -> indices``: the block batches (after merging, out of
            ``n``) this process keeps and runs; the others are dropped after the capture
            (data-parallel calibration: each rank carries its share).
    """

    def __init__(self, model: nn.Module, blocks: BlockList, calibration: Iterable, *,
                 propagation: str = "pruned", cache_bytes: int = DEFAULT_CACHE_BYTES,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, spill_dir: str | None = None, on_block_start: BlockHook | None = None,
                 on_block_end: BlockHook | None = None, progress: Callable | None = None,
                 keep_batches: Callable[[int], list[int]] | None = None):
        if propagation not in ("pruned", "dense"):
            raise ConfigError(f"block_propagation must be 'pruned' or 'dense', got {propagation!r}")
        self.model, self.blocks, self.calibration = model, blocks, calibration
        self.propagation = propagation
        self.batch_tokens = int(batch_tokens)
        self.budget = _Budget(cache_bytes, spill_dir)
        self.on_block_start, self.on_block_end = on_block_start, on_block_end
        self.progress = progress
        self.keep_batches = keep_batches
        self.inputs = ActivationCache(self.budget)
        self.outputs = ActivationCache(self.budget)
        self.calls: list[BlockCall] = []
        self.stats = RunStats()

    # -------------------------------------------------------------- capture
    def capture(self) -> None:
        """Run each batch up to the first block; keep its hidden states and the other inputs."""
        from .criteria.calibration import run_batch

        catcher = _FirstBlockCatcher(self.blocks.modules[0], self)
        self.blocks.modules[0] = catcher    # the real block is not called (nor its hooks)
        try:
            for batch in self.calibration:
                try:
                    run_batch(self.model, batch)
                except _StopAtBlock:
                    pass
                else:
                    raise FxPruneError(f"a calibration batch ran the model without calling its "
                                       f"first block {self.blocks.block_name(0)}")
                self.stats.batches += 1
        finally:
            self.blocks.modules[0] = catcher.block
        if not self.stats.batches:
            raise ConfigError("calibration is empty: pass at least one batch")
        if self.batch_tokens > 0 and len(self.calls) > 1:
            hidden = [self.inputs[b] for b in range(len(self.inputs))]
            merged = merge_calls(self.calls, hidden, self.batch_tokens)
            if len(merged) < len(self.calls):
                self.inputs.clear()
                self.calls = []
                for call, h in merged:
                    self.calls.append(call)
                    self.inputs.append(h)
            del hidden, merged
        if self.keep_batches is not None:
            kept = [(self.calls[b], self.inputs[b]) for b in self.keep_batches(len(self.calls))]
            self.inputs.clear()
            self.calls = [call for call, _ in kept]
            for _, h in kept:
                self.inputs.append(h)
            del kept
        self.stats.block_batches = len(self.calls)
        self._note_cache()

    def keep_block_inputs(self, args: tuple, kwargs: dict) -> None:
        """The first block's call for one batch: keep its hidden states and other inputs."""
        hidden_pos: int | str
        if args:
            hidden, hidden_pos, rest = args[0], 0, tuple(args[1:])
        elif "hidden_states" in kwargs:
            hidden, hidden_pos, rest = kwargs["hidden_states"], "hidden_states", ()
        else:
            raise FxPruneError(f"block {self.blocks.block_name(0)} was called without a "
                               f"positional input or hidden_states=...; block-sequential "
                               f"calibration cannot find its hidden states")
        kw = {k: v for k, v in kwargs.items() if k != hidden_pos}
        self.inputs.append(hidden)
        self.calls.append(BlockCall(hidden_pos, rest, _strip_cache(kw)))

    def _note_cache(self) -> None:
        self.stats.peak_cached_bytes = max(self.stats.peak_cached_bytes, self.budget.used)

    # -------------------------------------------------------------- blocks
    def run(self, process: Callable[[BlockStep], None]) -> RunStats:
        """Capture, then ``process`` every block in order; returns the counts."""
        try:
            with eval_mode(self.model), torch.no_grad():
                self.capture()
                n = len(self.blocks)
                for i, block in enumerate(self.blocks.modules):
                    name = self.blocks.block_name(i)
                    if self.on_block_start is not None:
                        self.on_block_start(i, name, block)
                    step = BlockStep(self, i, block)
                    try:
                        process(step)
                        if i + 1 < n:
                            self._propagate(step)
                        step.finish()
                    finally:
                        step.close()
                    self._swap()
                    if self.on_block_end is not None:
                        self.on_block_end(i, name, block)
                    release_free_memory()
                    if self.progress is not None:
                        self.progress("blocks", i + 1, n)
        finally:
            self.inputs.clear()
            self.outputs.clear()
            self.budget.close()
        return self.stats

    def _propagate(self, step: BlockStep) -> None:
        if self.propagation == "dense":
            if not step.recorded:       # nothing recorded this block: run it once
                step.record()
            return
        self.outputs.clear()            # a dense record's outputs are not the next inputs
        for b in range(len(self.inputs)):
            out = self.calls[b].call(step.block, self.inputs[b])
            self.stats.block_forwards += 1
            self.outputs.append(hidden_of(out))

    def _swap(self) -> None:
        self._note_cache()
        self.stats.spilled += self.outputs.spilled
        self.inputs.clear()
        self.inputs, self.outputs = self.outputs, self.inputs


def _same(a, b) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return a is b


def _merge_value(values: list, batch_sizes: list[int]):
    """One extra input for a merged block batch: the value when every batch has the same one
    (broadcast over the merged batch, e.g. rotary embeddings of one sequence length), else the
    batches' values concatenated along dim 0 when that is their batch dim; None if neither."""
    first = values[0]
    if all(_same(first, v) for v in values[1:]):
        return first, True
    if isinstance(first, (tuple, list)) and all(isinstance(v, type(first)) and len(v) == len(first)
                                                for v in values):
        parts = [_merge_value([v[i] for v in values], batch_sizes) for i in range(len(first))]
        if all(ok for _, ok in parts):
            return type(first)(p for p, _ in parts), True
        return None, False
    if (all(isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == n and v.shape[1:] == first.shape[1:]
            for v, n in zip(values, batch_sizes))):
        return torch.cat(values), True
    return None, False


def _merge_group(calls: list[BlockCall], hidden: list[Tensor]):
    sizes = [h.shape[0] for h in hidden]
    args, kwargs = [], {}
    for i in range(len(calls[0].args)):
        v, ok = _merge_value([c.args[i] for c in calls], sizes)
        if not ok:
            return None
        args.append(v)
    for k in calls[0].kwargs:
        v, ok = _merge_value([c.kwargs[k] for c in calls], sizes)
        if not ok:
            return None
        kwargs[k] = v
    return BlockCall(calls[0].hidden_pos, tuple(args), kwargs), torch.cat(hidden)


def merge_calls(calls: list[BlockCall], hidden: list[Tensor], max_tokens: int
                ) -> list[tuple[BlockCall, Tensor]]:
    """Concatenate consecutive calibration batches into block batches of at most ``max_tokens``
    rows of hidden states (batch x sequence), so each block runs a few large forwards instead of
    many small ones. Batches join when their hidden states differ only in the batch dim, they
    pass the same kinds of extra inputs, and each extra input is either the same in every batch
    or has that batch's size in dim 0 (then it is concatenated too)."""
    def tokens(h: Tensor) -> int:
        return h.numel() // max(1, h.shape[-1])

    def compatible(a: int, b: int) -> bool:
        ca, cb, ha, hb = calls[a], calls[b], hidden[a], hidden[b]
        return (ca.hidden_pos == cb.hidden_pos and len(ca.args) == len(cb.args)
                and ca.kwargs.keys() == cb.kwargs.keys() and ha.dim() >= 2
                and ha.shape[1:] == hb.shape[1:] and ha.dtype == hb.dtype)

    out: list[tuple[BlockCall, Tensor]] = []
    group: list[int] = []

    def flush() -> None:
        if len(group) == 1:
            out.append((calls[group[0]], hidden[group[0]]))
        elif group:
            merged = _merge_group([calls[i] for i in group], [hidden[i] for i in group])
            if merged is None:  # the extra inputs do not merge: keep the batches as they are
                out.extend((calls[i], hidden[i]) for i in group)
            else:
                out.append(merged)
        group.clear()

    for b in range(len(calls)):
        if group and (not compatible(group[0], b)
                      or sum(tokens(hidden[i]) for i in group) + tokens(hidden[b]) > max_tokens):
            flush()
        group.append(b)
    flush()
    return out


_malloc_trim = None


def release_free_memory() -> None:
    """Give the heap's free memory back to the system (glibc only; elsewhere nothing). After large
    frees glibc raises its mmap threshold, so the next block's multi-MB temporaries come from the
    heap and stay mapped once freed: without a trim between blocks, resident memory creeps up with
    depth although nothing is alive."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
    if _malloc_trim:
        _malloc_trim(0)


def iter_blocks(blocks: BlockList) -> Iterator[tuple[int, str, nn.Module]]:
    for i, m in enumerate(blocks.modules):
        yield i, blocks.block_name(i), m


__all__ = ["ActivationCache", "BlockCall", "BlockHook", "BlockList", "BlockSequentialRunner",
           "BlockStep", "DEFAULT_BATCH_TOKENS", "DEFAULT_CACHE_BYTES", "RunStats", "find_blocks",
           "hidden_of", "iter_blocks", "merge_calls"]
