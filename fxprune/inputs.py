"""Example inputs and model outputs, the shapes they come in (shared by capture, calibration,
compaction, export and the CLI)."""
from __future__ import annotations

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
