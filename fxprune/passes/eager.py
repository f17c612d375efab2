"""Discovery without a graph, for block-sequential calibration.

When every pruning group can run block by block (``activation`` / ``sparse_gpt``, local scope,
layers inside the repeated blocks), the pipeline needs the layer list, not the graph: capturing the
whole model with ``torch.export`` would cost more than the pruning of a small model, and memory.
:class:`EagerDiscoverPass` instead runs the model **once on** ``example_inputs``, eagerly, with the
first block real and every later block replaced by a stand-in that passes its hidden states
through, and watches the weight uses with a ``TorchFunctionMode``; the uses seen inside the first
block are repeated, renamed, for every later block (blocks of one class: same parameter names
and shapes, checked). The targets are built by the same function as the graph discovery's
(:func:`~fxprune.passes.discover.add_use`), in the same order, with the same names, aliases, types
and layouts, so attach and the report see what the graph path would give.

It only takes the plain case, where that is provably the same set of layers: every weight use is
an ``nn.Linear``-style ``F.linear(x, W, b)`` or a Hugging Face ``Conv1D``'s ``addmm(b, x, W)``
with a parameter as ``W``; embeddings only look their weight up. Any other use of a matrix
parameter (``x @ W.t()``, a convolution, ``.data``, a block touching a weight outside itself...),
an error in the run, blocks whose parameters differ, or a group that ends up on the whole-model
path (an ``lm_head`` selected, a channel pattern) falls back to the full capture
(:class:`~fxprune.passes.capture.CapturePass` and
:class:`~fxprune.passes.discover.DiscoverPass`), so no layer is ever missed. The run also checks
the example inputs as :func:`~fxprune.passes.run_inputs.check_model_runs` does, on everything but
the later blocks (which are of the first block's class).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..inputs import eval_mode, split_inputs
from ..registry import get_criterion_class
from ..sequential import BlockList, BlockStandIn, find_blocks, release_free_memory
from .attach import AttachPass
from .base import Pass
from .capture import CapturePass
from .context import EAGER_CAPTURE, PruneContext
from .discover import DiscoverPass, add_use, owner_type

log = logging.getLogger("fxprune")

# reading a weight's metadata is not a use
_METADATA = {"dtype", "device", "shape", "is_meta", "requires_grad", "is_cuda", "layout",
             "size", "dim", "ndim", "numel", "is_floating_point", "element_size", "is_sparse",
             "is_quantized", "names", "__get__"}


class _Fallback(Exception):
    """The eager discovery cannot vouch for the layer list: capture the graph instead."""


class _Use:
    __slots__ = ("param", "layout", "bias")

    def __init__(self, param: str, layout: str, bias: str | None):
        self.param, self.layout, self.bias = param, layout, bias


class _WeightUses(TorchFunctionMode):
    """Every use of a matrix parameter (dim >= 2) in the functions the run calls: the plain
    linear uses are recorded, anything else is a :class:`_Fallback`."""

    def __init__(self, model: nn.Module, canonical: dict[str, str]):
        super().__init__()
        self.names = {id(p): (p, canonical.get(n, n)) for n, p in model.named_parameters(remove_duplicate=False)}
        self.matrices = {i for i, (p, _) in self.names.items() if p.dim() >= 2}
        self.uses: list[_Use] = []

    def _param(self, x) -> str | None:
        hit = self.names.get(id(x)) if isinstance(x, Tensor) else None
        return hit[1] if hit is not None and hit[0] is x else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        matrices = [a for a in tree_leaves((args, kwargs)) if isinstance(a, Tensor)
                    and id(a) in self.matrices and self.names[id(a)][0] is a]
        if matrices:
            self._classify(func, args, kwargs, matrices)
        return func(*args, **kwargs)

    def _classify(self, func, args, kwargs, matrices) -> None:
        name = getattr(func, "__name__", "")
        if name in _METADATA:
            return
        if func in (F.embedding, torch.embedding):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if len(matrices) == 1 and matrices[0] is weight:
                return
        elif func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if len(matrices) == 1 and matrices[0] is weight and weight.dim() == 2:
                self.uses.append(_Use(self._param(weight), "out_in", self._param(bias)))
                return
        elif func is torch.addmm:
            bias = args[0] if args else kwargs.get("input")
            mat2 = args[2] if len(args) > 2 else kwargs.get("mat2")
            if len(matrices) == 1 and matrices[0] is mat2:
                self.uses.append(_Use(self._param(mat2), "in_out", self._param(bias)))
                return
        raise _Fallback(f"{name or func} uses {self._param(matrices[0])}")


class _FirstBlock(BlockStandIn):
    """Runs the real first block and notes which uses happened inside it and what it returned."""

    def __init__(self, block: nn.Module, recorder: _WeightUses):
        super().__init__(block, recorder=recorder, span=None, out=None)

    def forward(self, *args, **kwargs):
        if self.span is not None:
            raise _Fallback("the first block ran twice")
        start = len(self.recorder.uses)
        out = self.block(*args, **kwargs)
        object.__setattr__(self, "span", (start, len(self.recorder.uses)))
        object.__setattr__(self, "out", out)
        return out


class _LaterBlock(BlockStandIn):
    """Stands in for block ``index``: repeats the first block's uses under this block's names and
    returns its input hidden states in the first block's output structure."""

    def __init__(self, block: nn.Module, index: int, first: _FirstBlock, blocks: BlockList,
                 recorder: _WeightUses):
        super().__init__(block, index=index, first=first, blocks=blocks, recorder=recorder)

    def forward(self, *args, **kwargs):
        first = self.first
        if first.span is None:
            raise _Fallback(f"block {self.index} ran before the first block")
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, Tensor):
            raise _Fallback("a block's hidden states are not its first input")
        src, dst = f"{self.blocks.block_name(0)}.", f"{self.blocks.block_name(self.index)}."
        rename = lambda p: None if p is None else dst + p[len(src):]   # noqa: E731
        for use in self.recorder.uses[first.span[0]:first.span[1]]:
            self.recorder.uses.append(_Use(rename(use.param), use.layout, rename(use.bias)))
        out = first.out
        if isinstance(out, Tensor):
            return hidden
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            return type(out)((hidden, *out[1:]))
        raise _Fallback(f"the first block returned {type(out).__name__}")


def eligible(ctx: PruneContext) -> BlockList | None:
    """The blocks, when the config lets every group run block by block; else None."""
    from .sequential import BLOCK_CRITERIA

    cfg = ctx.config
    if (ctx.example_inputs is None or ctx.calibration is None or cfg.block_sequential is False
            or ctx.compact):
        return None
    for g in cfg.groups():
        if g.pruning_scope != "local" or not issubclass(
                get_criterion_class(g.pruning_type, g.where), BLOCK_CRITERIA):
            return None
    return find_blocks(ctx.model, cfg.block_list)


def _same_structure(blocks: BlockList) -> bool:
    """Every block has the first one's parameter names and shapes, none shared between blocks."""
    first = [(n, p.shape) for n, p in blocks.modules[0].named_parameters(remove_duplicate=False)]
    seen: set[int] = set()
    for block in blocks.modules:
        params = list(block.named_parameters(remove_duplicate=False))
        if [(n, p.shape) for n, p in params] != first:
            return False
        ids = {id(p) for _, p in params}
        if ids & seen:
            return False
        seen |= ids
    return True


def eager_uses(model: nn.Module, blocks: BlockList, example_inputs, canonical) -> list[_Use]:
    """The weight uses of one run of ``model`` on ``example_inputs`` with the later blocks
    standing in (see the module docstring); raises :class:`_Fallback`."""
    if not _same_structure(blocks):
        raise _Fallback("the blocks differ in their parameters")
    args, kwargs = split_inputs(example_inputs)
    recorder = _WeightUses(model, canonical)
    modules = blocks.modules
    real = list(modules)
    first = _FirstBlock(real[0], recorder)
    try:
        modules[0] = first
        for i in range(1, len(real)):
            modules[i] = _LaterBlock(real[i], i, first, blocks, recorder)
        with eval_mode(model), torch.no_grad(), recorder:
            model(*args, **kwargs)
    except _Fallback:
        raise
    except Exception as e:   # the full path runs the inputs again and says what is wrong
        raise _Fallback(f"the run failed ({type(e).__name__})") from e
    finally:
        for i, block in enumerate(real):
            modules[i] = block
        release_free_memory()
    if first.span is None:
        raise _Fallback("the model did not call its first block")
    for use in recorder.uses:
        if use.param is None:
            raise _Fallback("a weight that is not a parameter of the model")
    return recorder.uses


class EagerDiscoverPass(Pass):
    """Discover the targets from one eager run (see the module docstring), or, when that cannot
    vouch for them, with the full capture."""

    name = "discover"
    keeps_module_tree = True

    def call(self, ctx: PruneContext) -> None:
        blocks = eligible(ctx)
        reason = "no repeated blocks" if blocks is None else None
        if blocks is not None:
            # walked now, before the run below puts stand-ins in the block list; shared with
            # the passes after
            lookup = ctx.module_lookup()
            try:
                uses = eager_uses(ctx.model, blocks, ctx.example_inputs, lookup.canonical)
            except _Fallback as e:
                reason = str(e)
            else:
                ctx.targets = {}
                for position, use in enumerate(uses):
                    add_use(ctx, lookup, use.param, use.layout, "linear", 1, use.bias,
                            owner_type(lookup, use.param), f"call{position}", position)
                ctx.capture_method = EAGER_CAPTURE
                if not ctx.targets:
                    reason = "no linear layer seen"
        if reason is not None:
            log.info("fxprune: discovering the layers from the graph: %s", reason)
            full_capture(ctx)


class CaptureIfNeededPass(Pass):
    """After attach: when the eager discovery was used but some selected group will not run block
    by block (or its pattern selects coupled channels, which needs the graph), redo discovery and
    attach from the captured graph, as the standard pipeline does."""

    name = "capture"
    keeps_module_tree = True

    def call(self, ctx: PruneContext) -> None:
        if ctx.capture_method != EAGER_CAPTURE:
            return
        from .sequential import plan

        p = plan(ctx)
        whole = [t for t in ctx.selected() if p.blocks is None or t.group not in p.groups]
        channels = any(t.pattern.prunes_output_channels for t in ctx.selected())
        if whole or channels:
            log.info("fxprune: capturing the graph (%s)", "a group outside the blocks" if whole
                     else "a channel pattern")
            full_capture(ctx)
            AttachPass()(ctx)


def full_capture(ctx: PruneContext) -> None:
    ctx.targets = {}
    for p in (CapturePass(), DiscoverPass()):
        p(ctx)
