"""Criteria: how each weight is scored before a pattern turns scores into masks.

A criterion returns one float32 score per weight on the layer's 2-D view (finite, >= 0); lower
scores are pruned first. Register a new one with ``@register_criterion(name)``; its name is the
``pruning_type`` config key.

Built in: ``magnitude`` (|W|); with calibration data (``transform(..., calibration=...)``):
``activation`` (Wanda), ``sparse_gpt`` (SparseGPT, also updates the kept weights); with
``loss_fn`` too: ``gradient`` (|G|), ``snip`` (|W x G|), ``snip_momentum`` (INC's momentum
form); for ``fxprune.Pruner`` only: ``pattern_lock``.
"""
from __future__ import annotations

from .base import CRITERIA, Criterion, get_criterion_class, register_criterion
from .magnitude import MagnitudeCriterion
from .activation import ActivationCriterion
from .sparse_gpt import SparseGPTCriterion
from .gradient import GradientCriterion, SnipCriterion, SnipMomentumCriterion
from .pattern_lock import PatternLockCriterion

__all__ = ["CRITERIA", "ActivationCriterion", "Criterion", "GradientCriterion", "MagnitudeCriterion",
           "PatternLockCriterion", "SnipCriterion", "SnipMomentumCriterion", "SparseGPTCriterion",
           "get_criterion_class", "register_criterion"]
