"""capture: the model as an FX graph, and which graph nodes stand for which parameters.

With ``example_inputs``: the ATen graph of one eager forward, recorded as it runs
(:mod:`fxprune.passes.aten_trace`: the graph ``torch.export`` would give, at a fraction of its
cost); where that trace refuses the model (control flow on tensor values) or fails, ``torch.export
.export(..., strict=False)``, which handles Hugging Face transformers models. Either way
parameters and buffers are placeholders (``param_of_node`` names them) and every node's
``meta["val"]`` holds its shape. The example inputs run for real once either way (the recorded
forward, or :func:`~fxprune.passes.run_inputs.check_model_runs` before ``torch.export``, whose
fake tensors accept inputs a real run rejects), so bad inputs are a ``CaptureError`` that says so. Without example inputs: ``torch.fx.symbolic_trace``; parameters
are ``get_attr`` nodes and modules ``call_module`` nodes. ``ctx.capture_method`` (the report's
``capture``) says which capture was used.
"""
from __future__ import annotations

import logging

import torch
from torch import fx, nn

from ..aten import ModuleLookup
from ..errors import CaptureError
from ..inputs import output_tensors, split_inputs
from . import aten_trace
from .base import Pass
from .context import ATEN_TRACE_CAPTURE, EXPORT_CAPTURE, SYMBOLIC_CAPTURE, PruneContext
from .run_inputs import check_model_runs

log = logging.getLogger("fxprune")


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Every parameter/buffer name (tied aliases included) -> the first name of that tensor."""
    return ModuleLookup(model).canonical


class CapturePass(Pass):
    """``aten_trace=False`` skips the recorded trace and captures with ``torch.export`` directly."""

    name = "capture"
    keeps_module_tree = True

    def __init__(self, aten_trace: bool = True):
        self.aten_trace = aten_trace

    def _trace(self, ctx: PruneContext, args: tuple, kwargs: dict, lookup: ModuleLookup) -> bool:
        """Capture with the recorded ATen trace; False (and nothing set) when it cannot."""
        try:
            trace = aten_trace.trace_aten(ctx.model, args, kwargs, lookup)
        except Exception as e:  # refused or failed: torch.export decides (and explains a failure)
            log.info("fxprune: capturing with torch.export (the ATen trace stopped: %s: %s)",
                     type(e).__name__, _first_line(e))
            return False
        ctx.graph_module = trace.graph_module
        ctx.capture_method = ATEN_TRACE_CAPTURE
        ctx.param_of_node = trace.param_of_node
        return True

    def call(self, ctx: PruneContext) -> None:
        model = ctx.model
        lookup = ctx.module_lookup()
        canon = lookup.canonical
        if ctx.example_inputs is not None:
            args, kwargs = split_inputs(ctx.example_inputs, CaptureError)
            if self.aten_trace and self._trace(ctx, args, kwargs, lookup):
                return   # the recorded forward ran the inputs for real
            # torch.export runs fake tensors, which accept inputs a real run rejects: check first
            check_model_runs(model, args, kwargs)
            try:
                ep = torch.export.export(_TensorOutputs(model), args, kwargs, strict=False)
            except Exception as e:
                raise CaptureError(
                    f"torch.export could not capture {type(model).__name__} with the given "
                    f"example_inputs: {type(e).__name__}: {_first_line(e)}. Check that "
                    f"model(*example_inputs) runs, and pass example_inputs as a tuple of positional inputs or a dict of keyword inputs") from e
            sig = ep.graph_signature
            names = {node: fqn.removeprefix("model.") for node, fqn in
                     {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items()}
            ctx.graph_module = ep.graph_module
            ctx.capture_method = EXPORT_CAPTURE
            ctx.param_of_node = {node: canon.get(fqn, fqn) for node, fqn in names.items()}
        else:
            try:
                gm = fx.symbolic_trace(model)
            except Exception as e:
                raise CaptureError(
                    f"torch.fx.symbolic_trace could not trace {type(model).__name__}: "
                    f"{type(e).__name__}: {_first_line(e)}. Pass example_inputs=(...) (a tuple of "
                    f"inputs the model accepts) so fxprune captures it with torch.export instead") from e
            ctx.graph_module = gm
            ctx.capture_method = SYMBOLIC_CAPTURE
            ctx.param_of_node = {n.name: canon.get(n.target, n.target) for n in gm.graph.nodes
                                 if n.op == "get_attr" and n.target in canon}

    def ensures(self, ctx: PruneContext) -> None:
        assert ctx.graph_module is not None


class _TensorOutputs(nn.Module):
    """Capture wrapper: returns only the tensors of the model's output.

    Pruning needs the graph, not the output structure, and some outputs (a Hugging Face
    ``DynamicCache``) are types torch.export cannot return. Parameters keep their names under
    the ``model.`` prefix, which capture strips.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return tuple(output_tensors(self.model(*args, **kwargs)))


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "(no message)"
