"""run_inputs: run the model once on ``example_inputs``, so that bad inputs fail early.

``torch.export`` traces with fake tensors and does not catch everything a real run would (a
float64 or int64 input to a float32 ``nn.Linear`` is captured without complaint), and a bad input
found after pruning (by compaction, the export) costs the whole run. One eager forward, without
gradients and in eval mode, turns such inputs into an error before anything is pruned. The
capture pass does this itself (its recorded trace is a real forward; before ``torch.export`` it
calls :func:`check_model_runs`); :class:`RunInputsPass` is the check alone, for a pipeline that
needs it without a capture.
"""
from __future__ import annotations


import torch
from torch import nn

from ..errors import CaptureError, describe
from ..inputs import INPUTS_HELP, eval_mode, forward_signature, split_inputs
from .base import Pass
from .context import PruneContext


class RunInputsPass(Pass):
    name = "inputs"
    keeps_module_tree = True

    def call(self, ctx: PruneContext) -> None:
        if ctx.example_inputs is None:
            return
        args, kwargs = split_inputs(ctx.example_inputs, CaptureError)
        check_model_runs(ctx.model, args, kwargs)


def check_model_runs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """``model(*args, **kwargs)`` in eval mode without gradients; a ``CaptureError`` with the
    model's signature when it fails. Every module's training flag is restored."""
    try:
        with eval_mode(model), torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:
        signature = forward_signature(model)
        raise CaptureError(f"{type(model).__name__} cannot run on example_inputs "
                           f"({describe(e)}); "
                           f"{INPUTS_HELP}, with the dtypes and shapes the model expects; here "
                           f"{signature}") from e
