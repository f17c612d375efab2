"""capture: the model as an FX graph, and which graph nodes stand for which parameters.

With ``example_inputs``: ``torch.export.export(..., strict=False)``, which handles Hugging Face
transformers models; parameters are placeholders named in the graph signature. Without:
``torch.fx.symbolic_trace``; parameters are ``get_attr`` nodes and modules ``call_module`` nodes.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from ..errors import CaptureError
from ..inputs import output_tensors, split_inputs
from .base import Pass
from .context import PruneContext


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Every parameter/buffer name (tied aliases included) -> the first name of that tensor."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False),
                    *model.named_buffers(remove_duplicate=False)]:
        out[name] = first.setdefault(id(t), name)
    return out


class CapturePass(Pass):
    name = "capture"

    def call(self, ctx: PruneContext) -> None:
        model = ctx.model
        canon = canonical_names(model)
        if ctx.example_inputs is not None:
            args, kwargs = split_inputs(ctx.example_inputs)
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
            ctx.exported = ep
            ctx.graph_module = ep.graph_module
            ctx.capture_method = "torch.export"
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
            ctx.capture_method = "symbolic_trace"
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
