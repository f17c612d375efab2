"""Calibration plumbing shared by the data-aware criteria.

- :func:`require_data`: a clear ``ConfigError`` when a criterion that needs data gets none;
- :func:`reusable`: calibration batches that can be iterated more than once;
- :func:`run_batch`: ``model(*batch)`` for a tuple, ``model(**batch)`` for a dict, ``model(batch)``
  for a tensor (the same forms as ``example_inputs``);
- :class:`WeightInputRecorder`: while the *eager* model runs, every ATen op that uses one of the
  selected weights (``mm`` / ``addmm`` / ``bmm`` with it as ``mat2``, ``convolution``) reports its
  input. The weight is matched by parameter identity (then followed through views and copies) with
  a ``TorchDispatchMode``, so module calls (``nn.Linear``, ``nn.ConvNd``, Hugging Face ``Conv1D``),
  functional ones (``F.linear(x, W)``, ``x @ W.t()``) and uses nested in Python functions
  (``nn.MultiheadAttention``) are all seen, a tied weight collects the inputs of all its uses, and
  the batches may have any shape (the captured graph is not re-run, so a graph specialised to
  ``example_inputs``' shapes does not constrain calibration).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..aten import CONVOLUTION_ARGS, GENERAL_CONVOLUTIONS, LINEAR_WEIGHT_ARGS
from ..checks import nonfinite_count, nonfinite_input_message
from ..errors import CaptureError, ConfigError, FxPruneError, WeightError, describe
from ..inputs import eval_mode, split_inputs


def require_data(ctx, pruning_type: str, *, loss: bool = False) -> None:
    """Raise a ConfigError naming ``pruning_type`` and what to pass when data is missing."""
    if ctx.calibration is None:
        extra = (" and loss_fn=lambda model, batch: <scalar loss tensor>" if loss else "")
        raise ConfigError(
            f"pruning_type {pruning_type!r} needs calibration data: pass "
            f"fxprune.transform(model, config, example_inputs, calibration=[batch, ...]{extra}), "
            f"where each batch is what the model takes (a tuple of positional inputs, a dict of "
            f"keyword inputs or one tensor)")
    if loss and ctx.loss_fn is None:
        raise ConfigError(
            f"pruning_type {pruning_type!r} scores weights from loss gradients: pass "
            f"loss_fn=lambda model, batch: <scalar loss tensor> to fxprune.transform along with "
            f"calibration=...")
    if isinstance(ctx.calibration, (Tensor, dict)) or not callable(getattr(ctx.calibration, "__iter__", None)):
        raise ConfigError(f"calibration must be an iterable of batches (a list or a DataLoader), "
                          f"got {type(ctx.calibration).__name__}; wrap a single batch in a list: "
                          f"calibration=[batch]")


def reusable(calibration: Iterable) -> Sequence | Iterable:
    """Calibration that can be iterated again: a one-shot iterator (a generator) is kept as a list."""
    if iter(calibration) is calibration:
        return list(calibration)
    return calibration


def run_batch(model: nn.Module, batch: Any):
    args, kwargs = split_inputs(batch)
    return model(*args, **kwargs)


@dataclass
class WeightCall:
    """One use of a selected weight during a forward pass."""

    target: Any                         # the passes' Target
    x: Tensor                           # linear kinds: [..., in]; conv: [N, Cin, *spatial]
    conv: dict | None = None            # stride, padding, dilation, groups of a convolution


class StopForward(Exception):
    """Raised by the recorder once every call a pass needs has been seen (skips the rest)."""


class _NoFusedFastPaths(TorchFunctionMode):
    """Pass-through torch-function mode. While one is active ``has_torch_function`` is true, so
    modules with fused inference fast paths (``nn.MultiheadAttention``,
    ``nn.TransformerEncoderLayer``) take their decomposed path, whose ATen ops the recorder sees."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class WeightInputRecorder(TorchDispatchMode):
    """Reports the input of every ATen op that uses one of ``targets``' weights to ``observe``.

    Works below autograd, on ATen ops, so uses nested in Python functions
    (``F.multi_head_attention_forward``) are seen too. A weight is matched by identity, then
    followed through views and copies (``W.t()``, expand, ``.to(dtype)``...): a linear use is the
    weight (or such a derivative) as ``mat2`` of ``mm`` / ``addmm`` / ``bmm``, with the input
    features in the last dim of ``mat1``; a conv use is ``aten.convolution``.

    With ``stop_after`` (param FQN -> uses per forward), the forward is cut short with
    :class:`StopForward` once each of those weights has been used that many times.
    """

    def __init__(self, model: nn.Module, targets: Sequence, observe: Callable[[WeightCall], None],
                 stop_after: dict[str, int] | None = None):
        super().__init__()
        self.by_id = {id(model.get_parameter(t.param)): t for t in targets}
        self.observe = observe
        self.stop_after = stop_after
        self.derived: dict[int, tuple[Tensor, Any]] = {}   # views / copies of a weight
        self.seen: dict[str, int] = {}

    def reset(self) -> None:
        self.derived.clear()
        self.seen.clear()

    def _target_of(self, w) -> Any:
        if not isinstance(w, Tensor):
            return None
        t = self.by_id.get(id(w))
        if t is None and id(w) in self.derived:
            tensor, t = self.derived[id(w)]
            t = t if tensor is w else None
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _LINEAR_USES:
            w_pos, x_pos = _LINEAR_USES[packet]
            t = self._target_of(args[w_pos]) if len(args) > w_pos else None
            if t is not None:
                self._record(WeightCall(t, args[x_pos]))
        elif packet in _CONV_USES and len(args) > C["groups"] and not args[C["transposed"]]:
            t = self._target_of(args[C["weight"]])
            if t is not None:
                self._record(WeightCall(t, args[C["input"]], conv={
                    k: args[C[k]] for k in ("stride", "padding", "dilation", "groups")}))
        out = func(*args, **kwargs)
        if packet in _FOLLOW and args and isinstance(out, Tensor):
            t = self._target_of(args[0])
            if t is not None:
                self.derived[id(out)] = (out, t)
        return out

    def _record(self, call: WeightCall) -> None:
        self.observe(call)
        param = call.target.param
        self.seen[param] = self.seen.get(param, 0) + 1
        if self.stop_after and all(self.seen.get(p, 0) >= n for p, n in self.stop_after.items()):
            raise StopForward


_aten = torch.ops.aten
_LINEAR_USES = {getattr(_aten, name): LINEAR_WEIGHT_ARGS[name] for name in ("mm", "addmm", "bmm")}
_CONV_USES = tuple(getattr(_aten, name) for name in GENERAL_CONVOLUTIONS)
C = CONVOLUTION_ARGS
_FOLLOW = (_aten.t, _aten.transpose, _aten.permute, _aten.expand, _aten.view, _aten._unsafe_view,
           _aten.reshape, _aten.alias, _aten.detach, _aten.clone, _aten._to_copy)


def record_inputs(ctx, targets: Sequence, observe: Callable[[WeightCall], None], desc: str,
                  batches: Iterable | None = None, stop_early: bool = False) -> None:
    """One pass over the calibration batches, reporting the inputs of ``targets``' weights.

    Runs in eval mode without gradients. Raises when a target's weight was never used (the
    calibration did not reach it), naming the layer.
    """
    from ..progress import progress

    model = ctx.model
    stop_after = {t.param: t.uses_per_forward for t in targets} if stop_early else None
    used: set[str] = set()
    n_batches = 0

    def checked(call: WeightCall) -> None:
        # A NaN input is a symptom: name the layer it reached and where it comes from, before a
        # statistic of it fails as a singular Hessian or non-finite scores.
        if nonfinite_count(call.x):
            raise WeightError(nonfinite_input_message(model, call.target.name,
                                                      f"calibration batch {n_batches}"))
        try:
            observe(call)
        except FxPruneError as e:  # e.g. an input of the wrong width: say which batch
            if e.args and isinstance(e.args[0], str):
                e.args = (f"calibration batch {n_batches}: {e.args[0]}", *e.args[1:])
            raise

    recorder = WeightInputRecorder(model, targets, checked, stop_after)
    with eval_mode(model), torch.no_grad():
        for batch in progress(ctx.calibration if batches is None else batches, desc):
            recorder.reset()
            try:
                with _NoFusedFastPaths(), recorder:
                    run_batch(model, batch)
            except StopForward:
                pass
            except FxPruneError:
                raise
            except Exception as e:
                raise CaptureError(f"calibration batch {n_batches}: {type(model).__name__} cannot run "
                                   f"on it ({describe(e)}); each batch must be what the model "
                                   f"takes, like example_inputs (a tuple, a dict or one tensor)") from e
            used.update(recorder.seen)
            n_batches += 1
    if n_batches == 0:
        raise ConfigError("calibration is empty: pass at least one batch")
    missing = [t.name for t in targets if t.param not in used]
    if missing:
        raise FxPruneError(
            f"the calibration batches never ran layer(s) {missing[:5]}: their weights were not used "
            f"as the weight of a linear/conv/matmul call in the eager forward; check that the "
            f"batches reach these layers")
    recorder.reset()
