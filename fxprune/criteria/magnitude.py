"""Magnitude: |w|, computed in float32 whatever the weight dtype."""
from __future__ import annotations

from torch import Tensor

from .base import Criterion


class MagnitudeCriterion(Criterion):
    zero_weights_score_zero = True

    def view_scores(self, param_name: str, weight_view: Tensor) -> Tensor:
        return weight_view.detach().float().abs()
