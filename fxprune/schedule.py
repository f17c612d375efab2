"""INC's pruning schedule: at which training steps to prune, and to which sparsity.

Keys (per pruning group, INC's names and semantics, ``neural_compressor/compression/pruner``):

- ``start_step`` / ``end_step``: pruning happens at the steps ``start_step + i * pruning_frequency``
  that are ``<= end_step``. ``start_step == end_step`` is one-shot: the target at ``start_step``.
- ``pruning_frequency``: steps between two pruning steps.
- ``sparsity_decay_type``: how the sparsity grows from the initial ratio ``s0`` (0) to the target
  ``s_T`` over the ``n`` pruning steps after the first (``n = (end - start + freq) // freq - 1``;
  when that is 0, the single pruning step goes straight to the target). At the ``c``-th pruning
  step (``c = 0`` at ``start_step``), with ``s_a = min(max_sparsity_ratio_per_op, s_T)``:

  - ``linear``: ``(s_a - s0) * c / n + s0``
  - ``cos``:    ``(s_a - s0) * (1 - cos(c / n * pi / 2)) + s0``
  - ``cube``:   ``(s_a - s0) * (c / n) ** 3 + s0``
  - ``exp``:    ``1 - (1 - s0) * ((1 - s_a) / (1 - s0)) ** (c / n)``

  each capped at ``s_T``. At ``c = 0`` every curve is ``s0`` (nothing pruned at ``start_step``),
  at ``c = n`` it is the target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

DECAY_TYPES = ("exp", "cos", "linear", "cube")


@dataclass(frozen=True)
class Schedule:
    start_step: int
    end_step: int
    pruning_frequency: int
    sparsity_decay_type: str
    target_sparsity: float
    max_sparsity_ratio_per_op: float = 0.98

    @classmethod
    def from_group(cls, group) -> "Schedule":
        """The schedule of a resolved pruning group; ConfigError naming the key if invalid."""
        # Each key's type and range were checked with the config (fxprune.config.KEYS); the
        # rule across keys is checked here, where the schedule is used.
        s = group.schedule
        if s["end_step"] < s["start_step"]:
            raise ConfigError(f"{group.where}: end_step ({s['end_step']}) is before start_step "
                              f"({s['start_step']}); set end_step >= start_step (equal: one-shot)")
        return cls(s["start_step"], s["end_step"], s["pruning_frequency"], s["sparsity_decay_type"],
                   float(group.target_sparsity), float(group.max_sparsity_ratio_per_op))

    @property
    def one_shot(self) -> bool:
        return self.start_step == self.end_step

    @property
    def _raw_count(self) -> int:
        f = self.pruning_frequency
        return (self.end_step - self.start_step + f) // f - 1   # INC: "not pruning at step 0"

    @property
    def total_prune_count(self) -> int:
        """INC's ``total_prune_cnt``: the ``n`` of the formulas."""
        return max(self._raw_count, 1)

    @property
    def first_count(self) -> int:
        """INC's initial ``completed_pruned_cnt``: 1 when there is a single pruning step."""
        return 1 if self._raw_count == 0 else 0

    def is_pruning_step(self, step: int) -> bool:
        if step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.pruning_frequency == 0

    def pruning_steps(self) -> list[int]:
        return list(range(self.start_step, self.end_step + 1, self.pruning_frequency))

    def sparsity(self, count: int, init: float = 0.0) -> float:
        """Target sparsity of the ``count``-th pruning step (INC's ``update_sparsity_ratio``)."""
        target = self.target_sparsity
        if self.one_shot:
            return target
        n = self.total_prune_count
        aggressive = min(self.max_sparsity_ratio_per_op, target)
        kind = self.sparsity_decay_type
        if kind == "cos":
            s = (aggressive - init) * (1.0 - math.cos(float(count) / n * (math.pi / 2))) + init
        elif kind == "exp":
            ratio = ((1.0 - aggressive) / (1.0 - init)) ** (1 / n)
            s = 1.0 - (1.0 - init) * ratio ** count
        elif kind == "linear":
            s = (aggressive - init) * float(count) / n + init
        else:  # cube
            s = (aggressive - init) * ((float(count) / n) ** 3) + init
        return min(target, s)
