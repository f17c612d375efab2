"""``pattern_lock``: keep a model's existing zeros while fine-tuning (INC's pattern-lock pruner).

Training only (``fxprune.Pruner``): every zero of a selected weight at the start stays zero, with
its gradient masked, and nothing new is pruned (``target_sparsity`` and the schedule are not
used; the pattern only decides which layers are selected). ``fxprune.transform`` prunes in one
shot and has nothing to lock, so it refuses this pruning_type.
"""
from __future__ import annotations

from torch import Tensor

from ..errors import ConfigError
from .base import Criterion, register_criterion


@register_criterion("pattern_lock")
class PatternLockCriterion(Criterion):
    training_only = True

    def prepare(self, ctx) -> None:
        raise ConfigError(
            f"{self.group.where if self.group else 'config'}: pruning_type 'pattern_lock' keeps an "
            f"existing sparsity pattern while fine-tuning; use fxprune.Pruner(model, config, "
            f"optimizer) for it (fxprune.transform prunes in one shot)")

    def view_scores(self, param_name: str, weight_view: Tensor) -> Tensor:
        """The lock as scores: 0 for a zero weight, 1 for the others."""
        return (weight_view.detach() != 0).float()
