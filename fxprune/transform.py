"""``fxprune.transform``, ``fxprune.compact`` and ``fxprune.capture``: the public entry points over
the pass pipeline."""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import fx, nn

from .compaction import ChannelAnalysis, compact_model, plan_zero_channels, summary

from .config import PruningConfig
from .criteria.base import get_criterion_class
from .errors import FxPruneError
from .report import attach_report, count_zeros, sparsity_report
from .passes import CAPTURE_PASSES, TRANSFORM_PASSES, AttachPass, PassManager, PruneContext, RecordPass
from .passes.compact import compact_passes


def transform(model: nn.Module, config: Any = None, example_inputs: Any = None, *,
              inplace: bool = False, compact: bool | None = None, calibration: Any = None,
              loss_fn: Any = None, progress: Any = None, on_block_start: Any = None,
              on_block_end: Any = None, group: Any = None) -> nn.Module:
    """Prune ``model`` as ``config`` says and return the pruned model (same class).

    Args:
        model: any ``nn.Module``.
        config: a dict, a YAML/JSON file path or a :class:`PruningConfig` (INC's key names).
        example_inputs: a tuple of positional inputs or a dict of keyword inputs. Given, the model
            is captured with
            ``torch.export.export(strict=False)`` (needed for Hugging Face models); otherwise with
            ``torch.fx.symbolic_trace``.
        inplace: prune ``model`` itself instead of a copy. By default the caller's model is never
            modified.
        compact: physically remove pruned channels (channel patterns); defaults to the config's
            ``compact`` key.
        calibration: an iterable of input batches, for data-aware criteria (a ``UserWarning``
            says so when no group uses it; likewise ``loss_fn``).
        loss_fn: ``loss_fn(model, batch) -> loss``, for gradient-based criteria.
        progress: ``progress(stage, done, total)``, called per layer by the long passes (the CLI
            passes a progress bar); None for silence.
        on_block_start, on_block_end: ``hook(index, name, block)``, called around each repeated
            block (decoder layer) by block-sequential calibration (see ``docs/llm.md``): just
            before the block is first used, and right after it is pruned and its outputs for the
            next block are computed (a streaming caller loads / releases its weights there).

        group: a ``torch.distributed`` process group to prune with several processes (every
            rank calls ``transform`` with the same model, config and calibration; see
            ``docs/distributed.md``). By default the default process group is used when one is
            initialised with more than one process; a group of one process means no splitting.

    The report is available as ``fxprune.sparsity_report(pruned)``.
    """
    _check_arguments(inplace=inplace, compact=compact, loss_fn=loss_fn, progress=progress)
    dist = _distributed(group)
    if dist is None:
        return _transform(model, config, example_inputs, inplace, compact, calibration, loss_fn,
                          progress, on_block_start, on_block_end, None)
    with dist.guard("the end of transform"):   # one rank's error stops every rank
        return _transform(model, config, example_inputs, inplace, compact, calibration, loss_fn,
                          progress if dist.rank == 0 else None, on_block_start, on_block_end, dist)


def _distributed(group):
    """:func:`fxprune.distributed.resolve`; its module (collectives, the work split) is loaded only
    when there may be several processes: a group given, or torch.distributed's default one set up."""
    if group is None and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from .distributed import resolve
    return resolve(group)


def _transform(model, config, example_inputs, inplace, compact, calibration, loss_fn, progress,
               on_block_start, on_block_end, dist) -> nn.Module:
    ctx = _context(model, config, example_inputs, inplace=inplace)
    ctx.distributed = dist
    ctx.config.warn_ignored_keys()
    if calibration is not None or loss_fn is not None:
        _check_data_used(ctx.config, calibration, loss_fn)
    ctx.calibration, ctx.loss_fn, ctx.progress = calibration, loss_fn, progress
    ctx.on_block_start, ctx.on_block_end = on_block_start, on_block_end
    ctx.compact = ctx.config.compact if compact is None else bool(compact)
    passes = [p() for p in TRANSFORM_PASSES]
    if ctx.compact:  # coupled channels (selected as one by the mask pass) removed physically
        passes = compact_passes(passes)
    PassManager(passes).run(ctx)
    return ctx.model


def _check_data_used(config: PruningConfig, calibration, loss_fn) -> None:
    """Calibration or a loss that no group uses is most likely a mistake (a magnitude config meant
    to be Wanda, say): warn rather than silently prune by magnitude. Not an error, so one call
    can serve a sweep over criteria."""
    groups = config.groups()
    kinds = [get_criterion_class(g.pruning_type, g.where) for g in groups]
    used = ", ".join(sorted({g.pruning_type for g in groups}))
    if calibration is not None and not any(k.needs_data for k in kinds):
        warnings.warn(f"calibration is not used: no pruning group uses a data-aware criterion "
                      f"(pruning_type: {used}); set pruning_type to activation, sparse_gpt or a "
                      f"gradient criterion to use it", UserWarning, stacklevel=4)
    if loss_fn is not None and not any(k.needs_gradients for k in kinds):
        warnings.warn(f"loss_fn is not used: no pruning group uses a gradient criterion "
                      f"(pruning_type: {used}); set pruning_type to snip, snip_momentum... to "
                      f"use it", UserWarning, stacklevel=4)


def compact(model: nn.Module, example_inputs: Any, *, inplace: bool = False) -> nn.Module:
    """Remove the pruned output channels of an already-pruned model; return the smaller model.

    ``model`` is a model pruned by :func:`transform` (``compact=False``, with or without example
    inputs) or by :meth:`fxprune.Pruner.finalize`, or any model whose zero output channels should
    go. The graph is captured with ``example_inputs``, the same channel analysis as
    ``transform(..., compact=True)`` couples the channels (residual adds, attention heads...),
    and every coupled class none of whose channels carries anything (zero rows in every layer,
    zero bias and norm entries) is removed, with the same check: the compacted model's outputs on
    ``example_inputs`` must equal the given model's, space by space, and what fails or is blocked
    stays and is reported. The report's ``compaction`` entry says what was removed
    (``fxprune.sparsity_report``); a model without a report gets one. By default the caller's
    model is not modified (``inplace=True`` compacts it in place).
    """
    if example_inputs is None:
        raise FxPruneError("fxprune.compact needs example_inputs: compaction follows tensor shapes "
                           "through the graph, which only a capture with inputs records; pass "
                           "example_inputs=(x,)")
    ctx = _context(model, None, example_inputs, inplace=inplace)
    PassManager([p() for p in CAPTURE_PASSES]).run(ctx)
    if not ctx.shapes_known:
        raise FxPruneError("fxprune.compact could not capture the model's graph with its shapes")
    analysis = ChannelAnalysis(ctx.graph_module, ctx.param_of_node, ctx.model).run()
    plan = plan_zero_channels(ctx.model, ctx.targets.values(), analysis)
    try:
        report = sparsity_report(ctx.model)
    except FxPruneError:  # not pruned by fxprune: record what the weights hold
        for t in ctx.targets.values():
            w = ctx.model.get_parameter(t.param)
            t.status = "pruned" if count_zeros(w) else "excluded: no zero weights"
        RecordPass()(ctx)
        report = ctx.report
    figures = compact_model(ctx.model, plan, example_inputs)
    report.compaction = summary(ctx.model, ctx.targets, plan, figures)
    attach_report(ctx.model, report)
    return ctx.model


def capture(model: nn.Module, example_inputs: Any = None, config: Any = None) -> fx.GraphModule:
    """The captured, annotated graph, for inspection: every node that uses a prunable weight has
    ``node.meta["fxprune"]``, a :class:`~fxprune.passes.Target` (parameter, type, shapes; with a
    ``config``, also its group, pattern, block layout and status); ``gm.meta["fxprune_capture"]``
    says how it was captured (``"aten_trace"``, ``"torch.export"``, ``"symbolic_trace"``). The
    model is not modified."""
    ctx = _context(model, config, example_inputs, inplace=True)
    passes = [p() for p in CAPTURE_PASSES]
    if config is not None:
        passes.append(AttachPass())
    PassManager(passes).run(ctx)
    gm = ctx.graph_module
    gm.meta["fxprune_targets"] = ctx.targets
    gm.meta["fxprune_capture"] = ctx.capture_method
    return gm


def _check_arguments(*, inplace, compact, loss_fn, progress) -> None:
    """transform's keyword arguments, before anything is copied or captured."""
    if not isinstance(inplace, bool):
        raise FxPruneError(f"inplace must be True or False, got {inplace!r}")
    if compact is not None and not isinstance(compact, bool):
        raise FxPruneError(f"compact must be True, False or None (the config's compact key), got {compact!r}")
    for name, fn, form in (("loss_fn", loss_fn, "loss_fn(model, batch) -> scalar loss tensor"),
                           ("progress", progress, "progress(stage, done, total)")):
        if fn is not None and not callable(fn):
            raise FxPruneError(f"{name} must be a callable {form} or None, got {type(fn).__name__}")


def _context(model, config, example_inputs, *, inplace: bool) -> PruneContext:
    if not isinstance(model, nn.Module):
        raise FxPruneError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = PruningConfig.from_any(config)
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except Exception as e:
            raise FxPruneError(f"could not copy {type(model).__name__} to prune it ({e}); pass "
                               f"inplace=True to prune the model itself") from e
    return PruneContext(model=model, config=cfg, example_inputs=example_inputs)
