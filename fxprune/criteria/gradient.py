"""Gradient criteria: ``gradient`` (|G|), ``snip`` (|W x G|, Lee et al. 2019) and ``snip_momentum``
(INC's form: ``score = 0.9 * score + 1.0 * |W x G|`` at every step).

One-shot (``transform``): the gradients come from ``loss_fn(model, batch).backward()`` over the
calibration batches, in eval mode. ``gradient`` and ``snip`` use the gradient of the summed loss
(the gradients of all batches accumulated, i.e. one large batch); ``snip_momentum`` updates its
momentum once per batch, as INC does once per training step. Only the selected weights get
gradients; the model's own ``requires_grad`` flags and ``.grad`` tensors are restored afterwards.

Training (``Pruner``): :meth:`observe_gradients` reads the training loop's gradients before each
optimizer step; ``gradient`` and ``snip`` keep the latest step's scores, ``snip_momentum`` its
momentum over all steps.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..checks import nonfinite_tensors
from ..errors import CaptureError, ExtensionError, FxPruneError, WeightError, describe
from ..geometry import to_view_2d
from ..progress import progress
from .base import Criterion, register_criterion
from ..inputs import eval_mode
from .calibration import require_data


@register_criterion("gradient")
class GradientCriterion(Criterion):
    """``gradient``: |G|. Subclasses change :meth:`_update` (and ``per_batch``)."""

    needs_data = True
    needs_gradients = True
    per_batch = False   # one-shot: observe each batch's gradient (True) or their sum (False)

    def __init__(self, group=None):
        super().__init__(group)
        self.scores: dict[str, Tensor] = {}   # weight-shaped float32
        self.geometry = {}

    def bind(self, targets: Iterable) -> None:
        self.geometry.update({t.param: t.geometry for t in targets})

    def prepare(self, ctx) -> None:
        require_data(ctx, self.name, loss=True)
        targets = ctx.selected(self.group)
        self.bind(targets)
        model = ctx.model
        params = {t.param: model.get_parameter(t.param) for t in targets}
        with _gradients_only_for(model, params.values()), eval_mode(model):
            batches = 0
            for batch in progress(ctx.calibration, f"{self.name}: calibration"):
                try:
                    loss = ctx.loss_fn(model, batch)
                except FxPruneError:
                    raise
                except Exception as e:
                    raise ExtensionError(f"loss_fn {_callable_name(ctx.loss_fn)} raised "
                                         f"{describe(e)} on calibration batch {batches}; it is "
                                         f"called as loss_fn(model, batch)") from e
                if not (isinstance(loss, Tensor) and loss.numel() == 1 and loss.requires_grad):
                    raise ExtensionError(
                        f"loss_fn {_callable_name(ctx.loss_fn)} must return a scalar loss tensor "
                        f"that depends on the model's weights, got {type(loss).__name__}"
                        f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}"
                        f"{'' if not isinstance(loss, Tensor) or loss.requires_grad else ' without grad'}")
                if not bool(torch.isfinite(loss.detach()).all()):
                    sources = nonfinite_tensors(model)
                    raise WeightError(
                        f"loss_fn returned {float(loss.detach().reshape(()))} on calibration batch "
                        f"{batches}: " + (f"the model's {', '.join(sources)} hold NaN/inf" if sources
                                          else "the batch or the loss overflows; check the data"))
                try:
                    loss.reshape(()).backward()
                except Exception as e:   # the model's autograd graph (in-place ops, hooks...)
                    raise CaptureError(f"backward of loss_fn's loss failed on calibration batch "
                                       f"{batches} ({describe(e)}); gradient criteria need a loss "
                                       f"that autograd can differentiate") from e
                batches += 1
                if self.per_batch:
                    self.observe_gradients(params)
                    for p in params.values():
                        p.grad = None
            if batches == 0:
                raise FxPruneError("calibration is empty: pass at least one batch")
            if not self.per_batch:
                self.observe_gradients(params)

    def observe_gradients(self, params: Mapping[str, nn.Parameter]) -> None:
        with torch.no_grad():
            for name, p in params.items():
                if p.grad is None:
                    raise FxPruneError(
                        f"{name} has no gradient: the loss does not depend on it (or backward was "
                        f"not called before the optimizer step)")
                self.scores[name] = self._update(self.scores.get(name), p.detach().float(),
                                                 p.grad.detach().float())

    def _update(self, prev: Tensor | None, w: Tensor, g: Tensor) -> Tensor:
        return g.abs()

    def view_scores(self, param_name: str, weight_view: Tensor) -> Tensor:
        if param_name not in self.scores:
            raise FxPruneError(f"criterion {self.name!r} has no gradients for {param_name} yet")
        s = to_view_2d(self.scores[param_name], self.geometry[param_name])
        return s.to(device=weight_view.device, dtype=torch.float32).contiguous()

    def has_scores(self) -> bool:
        return bool(self.scores)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.scores.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.scores = dict(state)


@register_criterion("snip")
class SnipCriterion(GradientCriterion):
    """``snip``: |W x G|."""

    def _update(self, prev, w, g):
        return (w * g).abs()


@register_criterion("snip_momentum")
class SnipMomentumCriterion(GradientCriterion):
    """``snip_momentum``: ``score = alpha * score + beta * |W x G|`` (INC: alpha 0.9, beta 1.0)."""

    per_batch = True
    alpha = 0.9
    beta = 1.0

    def _update(self, prev, w, g):
        new = (w * g).abs()
        if self.beta != 1.0:
            new.mul_(self.beta)
        return new if prev is None else prev.mul_(self.alpha).add_(new)


@contextlib.contextmanager
def _gradients_only_for(model: nn.Module, params: Iterable[nn.Parameter]):
    """Gradients for ``params`` only; every parameter's ``requires_grad`` and ``.grad`` restored."""
    wanted = {id(p) for p in params}
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        for p, _, _ in saved:
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        with torch.enable_grad():
            yield
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad


def _callable_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__
