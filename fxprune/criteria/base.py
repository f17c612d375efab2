"""The criterion interface."""
from __future__ import annotations

from torch import Tensor


class Criterion:
    """Scores weights; subclasses implement :meth:`view_scores`.

    ``needs_data`` criteria collect statistics in :meth:`prepare` (calibration batches, gradients)
    before any layer is scored.
    """

    name: str = ""
    needs_data: bool = False
    # True when a zero weight always scores 0 (magnitude): the score pass can skip forcing it.
    zero_weights_score_zero: bool = False

    def __init__(self, group=None):
        self.group = group

    def prepare(self, ctx) -> None:
        """Collect what scoring needs (nothing for magnitude)."""

    def view_scores(self, param_name: str, weight_view: Tensor) -> Tensor:
        """float32 scores shaped like ``weight_view`` (finite, >= 0)."""
        raise NotImplementedError
