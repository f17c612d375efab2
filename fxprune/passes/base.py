"""A pass is a small object with one job; a manager runs a list of them over one context.

Same shape as ``torch.fx.passes.infra`` (``requires`` / ``call`` / ``ensures``), but a pass works
on the shared :class:`~fxprune.passes.context.PruneContext` rather than on a GraphModule alone,
since pruning needs the model, the config and the masks as well as the graph.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import time
from typing import Sequence

from ..aten import ModuleLookup
from .context import PruneContext

log = logging.getLogger("fxprune")


class Pass:
    name: str = ""
    # True: the pass replaces no module of the model and runs no user code that could (criteria,
    # block hooks), so the manager's module walk stays valid across it; after any other pass
    # (a user's own pass included) the manager walks the modules afresh when next asked
    keeps_module_tree: bool = False

    def requires(self, ctx: PruneContext) -> None:
        """Check what this pass needs from earlier passes."""

    def call(self, ctx: PruneContext) -> None:
        raise NotImplementedError

    def ensures(self, ctx: PruneContext) -> None:
        """Check what this pass promises to later passes."""

    def __call__(self, ctx: PruneContext) -> None:
        self.requires(ctx)
        self.call(ctx)
        self.ensures(ctx)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PassManager:
    """Runs passes in order, timing each one into ``ctx.timings``."""

    def __init__(self, passes: Sequence[Pass]):
        self.passes = list(passes)

    def run(self, ctx: PruneContext) -> PruneContext:
        outer = ctx.lookup
        ctx.lookup = ModuleLookup(ctx.model)   # one walk of the modules, shared (on first use)
        try:
            with heap_frozen():
                for p in self.passes:
                    start = time.perf_counter()
                    p(ctx)
                    ctx.timings[p.name] = time.perf_counter() - start
                    if not p.keeps_module_tree:
                        ctx.lookup = ModuleLookup(ctx.model)
                    log.info("fxprune: %-8s %.3fs", p.name, ctx.timings[p.name])
        finally:
            ctx.lookup = outer
        return ctx


@contextlib.contextmanager
def heap_frozen():
    """Keep the objects that exist before the passes (torch, transformers, the model: often
    millions) out of the cyclic collector's walks while they run: a full collection would walk
    them all for nothing it can free, and cost more than a pass. Garbage made by the passes is
    collected as usual, so memory stays bounded; the heap is unfrozen after (``gc.freeze``, as
    servers do before forking). A caller that froze objects itself is left alone."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
