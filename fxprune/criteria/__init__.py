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

from typing import Callable, TypeVar

from ..errors import ConfigError
from .activation import ActivationCriterion
from .base import Criterion
from .gradient import GradientCriterion, SnipCriterion, SnipMomentumCriterion
from .magnitude import MagnitudeCriterion
from .pattern_lock import PatternLockCriterion
from .sparse_gpt import SparseGPTCriterion

CRITERIA: dict[str, type[Criterion]] = {}

T = TypeVar("T", bound=type)


def register_criterion(name: str) -> Callable[[T], T]:
    def decorate(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, Criterion)):
            raise TypeError(f"@register_criterion({name!r}) must decorate a subclass of fxprune.criteria.Criterion")
        cls.name = name
        CRITERIA[name] = cls
        return cls
    return decorate


def get_criterion_class(name: str, where: str = "config") -> type[Criterion]:
    if name not in CRITERIA:
        raise ConfigError(f"{where}: unknown pruning_type {name!r}; available: {', '.join(CRITERIA)}")
    return CRITERIA[name]


register_criterion("magnitude")(MagnitudeCriterion)
register_criterion("activation")(ActivationCriterion)
register_criterion("sparse_gpt")(SparseGPTCriterion)
register_criterion("gradient")(GradientCriterion)
register_criterion("snip")(SnipCriterion)
register_criterion("snip_momentum")(SnipMomentumCriterion)
register_criterion("pattern_lock")(PatternLockCriterion)

__all__ = ["CRITERIA", "ActivationCriterion", "Criterion", "GradientCriterion", "MagnitudeCriterion",
           "PatternLockCriterion", "SnipCriterion", "SnipMomentumCriterion", "SparseGPTCriterion",
           "get_criterion_class", "register_criterion"]
