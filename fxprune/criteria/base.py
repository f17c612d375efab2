"""The criterion interface: what fxprune calls on a criterion, and the criterion registry.

A criterion scores the weights of the selected layers of one pruning group; the group's pattern
turns the scores into masks (global or local). The hooks, in the order the callers use them:

- one-shot (``fxprune.transform``): ``prepare(ctx)`` once (collect calibration statistics or
  gradients), ``view_scores`` per layer, and after the masks are known ``update_weights(ctx,
  targets)`` (SparseGPT updates the kept weights there; every other criterion leaves them alone);
- training (``fxprune.Pruner``): ``bind(targets)`` once, ``observe_gradients(params)`` before each
  optimizer step for the criteria that score from gradients, ``has_scores()`` before a pruning
  step, then ``view_scores`` at each pruning step; ``state_dict`` / ``load_state_dict`` for the
  Pruner's checkpoints.

The class flags (``needs_data``, ``needs_gradients``, ``one_shot_only``, ``training_only``,
``zero_weights_score_zero``) tell the callers what a criterion needs; see :class:`Criterion`.
"""
from __future__ import annotations

from typing import Callable, Mapping

from torch import Tensor, nn

from ..errors import ConfigError
from ..registration import Registry, T


class Criterion:
    """Scores weights; subclasses implement :meth:`view_scores`.

    ``needs_data`` criteria collect statistics in :meth:`prepare` (calibration batches, gradients)
    before any layer is scored. ``needs_gradients`` criteria score from loss gradients (``loss_fn``
    over the calibration batches in ``transform``, the training loop's gradients in ``Pruner``).
    ``one_shot_only`` criteria work in ``transform`` only, ``training_only`` ones in ``Pruner`` only.
    ``zero_weights_score_zero``: the scores of zero weights are already +0.0, so the score pass
    need not force them.
    """

    name: str = ""
    needs_data: bool = False
    needs_gradients: bool = False
    one_shot_only: bool = False
    training_only: bool = False
    zero_weights_score_zero: bool = False

    def __init__(self, group=None):
        self.group = group

    def prepare(self, ctx) -> None:
        """Collect what scoring needs (nothing for magnitude)."""

    def observe_gradients(self, params: Mapping[str, nn.Parameter]) -> None:
        """Training time: read ``param.grad`` of the selected weights (gradient criteria)."""

    def lazy_scores(self, param_name: str, weight: Tensor, geometry):
        """Scores that can be recomputed cheaply from the weight alone, as a
        :class:`~fxprune.selection.LazyScores`; ``None`` (the default) to compute them once."""
        return None

    def view_scores(self, param_name: str, weight_view: Tensor) -> Tensor:
        """float32 scores shaped like ``weight_view`` (finite, >= 0)."""
        raise NotImplementedError

    def bind(self, targets) -> None:
        """Training time: the Pruner's selected targets of this group, once (their geometry)."""

    def has_scores(self) -> bool:
        """Whether :meth:`view_scores` can score now (gradient criteria: once gradients were seen)."""
        return True

    def state_dict(self) -> dict[str, Tensor]:
        """What to save with a Pruner checkpoint (``snip_momentum``'s momentum); default nothing."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state_dict`."""

    def update_weights(self, ctx, targets) -> None:
        """After masking, before the rewrite zeroes the pruned weights: adjust the kept weights
        of ``targets`` in place (``ctx.masks`` holds their keep-masks). Default: leave them."""


# ---------------------------------------------------------------------- the registry
CRITERIA = Registry(Criterion, "register_criterion", "name", "mine")


def register_criterion(name: str, *, override: bool = False) -> Callable[[T], T]:
    """Class decorator: make a :class:`Criterion` subclass usable as ``pruning_type: name``.
    Replacing a built-in criterion needs ``override=True``."""
    return CRITERIA.decorator(name, override=override)


def get_criterion_class(name: str, where: str = "config") -> type[Criterion]:
    """The class registered as ``pruning_type: name``; ConfigError listing the registered names."""
    if not isinstance(name, str) or name not in CRITERIA:
        raise ConfigError(f"{where}: unknown pruning_type {name!r}; available: {', '.join(CRITERIA)}")
    return CRITERIA[name]
