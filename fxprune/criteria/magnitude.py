"""Magnitude: |w|, computed in float32 whatever the weight dtype."""
from __future__ import annotations

from torch import Tensor

from ..geometry import WeightGeometry, to_view_2d, view_rows
from ..selection import LazyScores
from .base import Criterion, register_criterion


@register_criterion("magnitude")
class MagnitudeCriterion(Criterion):
    zero_weights_score_zero = True

    def view_scores(self, param_name: str, weight_view: Tensor) -> Tensor:
        return weight_view.detach().float().abs()

    def lazy_scores(self, param_name: str, weight: Tensor, geometry: WeightGeometry) -> LazyScores:
        # |w| costs one cheap pass: recomputing it beats holding a float32 copy of every weight.
        return LazyScores(lambda: self.view_scores(param_name, to_view_2d(weight, geometry)),
                          geometry.view_shape, weight.device,
                          sample=lambda index: weight.reshape(-1)[index].float().abs(),
                          rows=lambda start, stop: self.view_scores(param_name, view_rows(weight, geometry, start, stop)))
