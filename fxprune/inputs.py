"""Example inputs and model outputs, the shapes they come in (shared by capture, calibration,
compaction, export and the CLI)."""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from typing import Iterator

import torch

from .errors import FxPruneError

INPUTS_HELP = ("example_inputs must be what model.forward accepts: a tensor, a tuple of "
               "positional arguments, or a dict of keyword arguments")


def forward_signature(model) -> str:
    """``Class.forward(signature)`` for error messages; the bare name when it cannot be read."""
    try:
        return f"{type(model).__name__}.forward{inspect.signature(model.forward)}"
    except (TypeError, ValueError):
        return f"{type(model).__name__}.forward"


def split_inputs(example_inputs, error: type[Exception] = FxPruneError) -> tuple[tuple, dict]:
    """``example_inputs`` as (positional args, keyword args)."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise error(f"example_inputs is a {type(example_inputs).__name__}; {INPUTS_HELP}")


def output_tensors(out) -> Iterator[torch.Tensor]:
    """The tensors of a model output, in order: tuples, lists, dicts and HF ``ModelOutput``."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, Mapping):  # includes Hugging Face ModelOutput
        for v in out.values():
            yield from output_tensors(v)
    elif isinstance(out, (tuple, list)):
        for v in out:
            yield from output_tensors(v)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module, modules=None) -> Iterator[torch.nn.Module]:
    """Eval mode inside (deterministic: no dropout, BatchNorm running statistics); after, every
    module gets its own training flag back (a submodule the caller froze in eval stays so). A
    module loaded from a ``.pt2`` archive (``ExportedProgram.module()``) has its mode fixed at
    export and refuses ``eval()``: it is used as it is. ``modules``: ``list(model.modules())`` if
    at hand."""
    flags = [(m, m.training) for m in (model.modules() if modules is None else modules)]
    if any(training for _, training in flags):  # else already in eval mode, as usual after a first call
        try:
            model.eval()
        except NotImplementedError:
            pass
    try:
        yield model
    finally:
        for m, training in flags:
            if m.training != training:  # nn.Module's __setattr__ is slow: only the flags that moved
                m.training = training
