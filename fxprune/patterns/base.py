"""BasePattern: how a pattern cuts a weight into blocks, and the global/local split of masking.

A pattern answers three questions about one layer, on its 2-D view ``[rows, cols]``:

1. ``block_layout(geom)``: how the view is cut into blocks (or why it cannot be: a skip reason);
2. ``block_scores(view_scores, layout)``: one score per block (the reduce of its element scores);
3. ``expand(pruned_blocks, layout, view_shape, view_scores=None)``: the element mask of the
   chosen blocks (``view_scores`` only for a pattern with ``expand_needs_scores``, e.g. N:M).

Masking (``get_masks``) is shared: ``global`` ranks the blocks of all layers of the group in one
ranking, ``local`` ranks each layer by itself; both count the target in *weights*, not blocks,
and enforce ``max/min_sparsity_ratio_per_op``. Masks are keep-masks (True = kept), as in INC and
torch.ao: ``weight.mul_(mask)``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import Tensor

from ..config import GroupConfig, PruningConfig
from ..errors import ConfigError, FxPruneError
from ..extensions import (calling, check_block_scores, check_expanded, check_pruned_blocks,
                          is_user_code)
from ..geometry import WeightGeometry
from ..registration import Registry, T
from ..selection import LayerPlan, LazyScores, budget, ceil_budget, materialize, plan_global, select_local


@dataclass(frozen=True)
class BlockLayout:
    """How one layer's 2-D view is cut into blocks.

    The view is reshaped to ``shape``; the dims in ``reduce_dims`` lie inside a block, the others
    index the blocks. ``block_weights`` is how many weights one pruned block zeroes.
    """

    shape: tuple[int, ...]
    reduce_dims: tuple[int, ...]
    block_weights: int
    block_shape: str  # for the report, e.g. "4x1", "1x768", "2:4"

    @property
    def num_blocks(self) -> int:
        return math.prod(s for d, s in enumerate(self.shape) if d not in self.reduce_dims)

    @property
    def numel(self) -> int:
        """Weights in the layer (not blocks x block_weights: an N:M group holds M, prunes N)."""
        return math.prod(self.shape)

    @property
    def kept_shape(self) -> tuple[int, ...]:
        return tuple(1 if d in self.reduce_dims else s for d, s in enumerate(self.shape))


class BasePattern:
    """Base of every pattern; subclass it and decorate with ``@fxprune.register_pattern(name)``.

    The contract, what fxprune calls and reads:

    - ``block_layout(geom)`` (required): the layer's :class:`BlockLayout`, or a string saying why
      the pattern does not fit the layer (the layer is then skipped and reported).
    - ``block_scores`` / ``expand``: override for blocks that are not a plain reshape of the view
      (N:M); ``expand_needs_scores`` when ``expand`` needs the element scores.
    - ``get_masks(scores, layouts, *, consume=False, target_sparsity=None)``: keep-masks (bool,
      view-shaped) for all layers of a group; the base version ranks the blocks (global or local)
      through ``get_masks_global`` / ``get_masks_local``. An override that does not take
      ``target_sparsity`` works with ``fxprune.transform`` but not with ``fxprune.Pruner``.
    - ``matches(pattern)`` / ``check_config(group)``: optional class hooks (which strings a family
      takes; a ConfigError for a config the pattern cannot honour).
    - Channel capabilities, for channel zeroing and compaction: a pattern whose blocks are whole
      output channels (whole rows of the 2-D view) sets ``prunes_output_channels = True``, and
      ``output_channel_block`` to the number of consecutive output channels one block holds.
      Then a pruned channel's bias and BatchNorm entries are zeroed with it; with example inputs
      its masks come from the coupled channel classes of :mod:`fxprune.compaction` (channels
      tied by a residual add, attention heads... selected as one), and ``compact=True`` removes
      them. A user pattern opts in by setting these two attributes.
    """

    registered_name: str = ""
    prunes_output_channels: bool = False
    output_channel_block: int = 1

    def __init__(self, config: GroupConfig | Mapping[str, Any], modules: Mapping[str, Any] | None = None):
        if not isinstance(config, GroupConfig):
            config = PruningConfig.from_any(dict(config)).groups()[0]
        self.config = config
        self.pattern = config.pattern
        self.is_global = config.pruning_scope == "global"
        self.target_sparsity = float(config.target_sparsity)
        self.max_sparsity_ratio_per_op = float(config.max_sparsity_ratio_per_op)
        self.min_sparsity_ratio_per_op = float(config.min_sparsity_ratio_per_op)
        self.reduce_type = config.criterion_reduce_type
        self.modules = dict(modules or {})

    def __repr__(self) -> str:
        scope = "global" if self.is_global else "local"
        return f"{type(self).__name__}({self.pattern!r}, {scope}, target={self.target_sparsity})"

    # ------------------------------------------------------------------ hooks
    @classmethod
    def matches(cls, pattern: str) -> bool:
        """Whether this class handles the pattern string (exact registered name by default)."""
        return pattern == cls.registered_name

    @classmethod
    def check_config(cls, group: GroupConfig) -> None:
        """Raise ConfigError for a config this pattern cannot honour (e.g. 2:4 above 50 %)."""

    def block_layout(self, geom: WeightGeometry) -> BlockLayout | str:
        """The layer's block layout, or a string saying why the pattern does not fit it."""
        raise NotImplementedError

    def block_scores(self, view_scores: Tensor, layout: BlockLayout) -> Tensor:
        """1-D float32 block scores: ``criterion_reduce_type`` over each block's element scores."""
        if all(layout.shape[d] == 1 for d in layout.reduce_dims):
            return view_scores.reshape(-1)  # 1x1 blocks: the element scores themselves, no copy
        return self._reduce(view_scores.reshape(layout.shape), layout.reduce_dims).reshape(-1)

    def _reduce(self, scores: Tensor, dims: tuple[int, ...]) -> Tensor:
        """``criterion_reduce_type`` (mean / sum / max) of ``scores`` over ``dims``."""
        if self.reduce_type == "mean":
            return scores.mean(dim=dims)
        if self.reduce_type == "sum":
            return scores.sum(dim=dims)
        return scores.amax(dim=dims)

    # Whether ``expand`` needs the element scores (N:M picks the lowest elements of a group);
    # without it, the mask pass frees each layer's scores once its block scores exist.
    expand_needs_scores: bool = False

    def expand(self, pruned_blocks: Tensor, layout: BlockLayout, view_shape: tuple[int, int],
               view_scores: Tensor | None = None) -> Tensor:
        """Element-level pruned mask (``view_shape``, bool) of the pruned blocks."""
        return pruned_blocks.reshape(layout.kept_shape).expand(layout.shape).reshape(view_shape)

    # ------------------------------------------------------------------ masks
    def block_bounds(self, layout: BlockLayout) -> tuple[int, int]:
        """(min, max) pruned blocks for one layer from the per-op ratios, in whole blocks."""
        n = layout.numel
        hi = min(budget(self.max_sparsity_ratio_per_op, n) // layout.block_weights, layout.num_blocks)
        lo = min(-(-ceil_budget(self.min_sparsity_ratio_per_op, n) // layout.block_weights), hi)
        return lo, hi

    def get_masks(self, scores: Mapping[str, Tensor | LazyScores], layouts: Mapping[str, BlockLayout],
                  *, consume: bool = False, target_sparsity: float | None = None) -> dict[str, Tensor]:
        """Keep-masks (view-shaped, bool) for every layer in ``scores``, global or local.

        A score may be a :class:`~fxprune.selection.LazyScores`, recomputed when needed.

        ``consume=True`` (the mask pass) lets the pattern pop each layer's element scores from
        ``scores`` as soon as it is done with them: they are as large as the weights.
        ``target_sparsity`` overrides the config's (the Pruner's scheduled sparsity).
        """
        target = self.target_sparsity if target_sparsity is None else float(target_sparsity)
        names = list(scores)
        shapes = {name: tuple(scores[name].shape) for name in names}
        block_scores = {}
        for name in names:
            layout, source = layouts[name], scores[name]
            if isinstance(source, LazyScores) and self._blocks_are_elements(layout):
                block_scores[name] = source.map(lambda t: t.reshape(-1), (layout.num_blocks,))
            else:  # block scores are a fraction of the element scores: keep those
                with calling(self, "block_scores", f"for {name}"):
                    block_scores[name] = self.block_scores(materialize(source), layout)
                if is_user_code(type(self).block_scores):
                    check_block_scores(self, name, block_scores[name], layout)
            if consume and not self.expand_needs_scores:
                del scores[name]
        method = "get_masks_global" if self.is_global else "get_masks_local"
        select = getattr(self, method)
        if target != self.target_sparsity:
            if "target_sparsity" not in inspect.signature(select).parameters:
                raise FxPruneError(
                    f"pattern {self.pattern!r} ({type(self).__name__}.{method}) does not take "
                    f"target_sparsity=, which pruning at a sparsity other than the config's "
                    f"(fxprune.Pruner's schedule) needs; add `target_sparsity=None` to its signature")
            with calling(self, method, f"for {', '.join(names[:3])}"):
                pruned = select(block_scores, layouts, target_sparsity=target)
        else:
            with calling(self, method, f"for {', '.join(names[:3])}"):
                pruned = select(block_scores, layouts)
        if is_user_code(select):
            check_pruned_blocks(self, method, pruned, names, layouts)
        del block_scores
        masks = {}
        for name in names:
            view = (scores.pop(name) if consume else scores[name]) if self.expand_needs_scores else None
            view = None if view is None else materialize(view)
            with calling(self, "expand", f"for {name}"):
                pruned_mask = self.expand(pruned.pop(name), layouts[name], shapes[name], view)
            if is_user_code(type(self).expand):
                check_expanded(self, name, pruned_mask, shapes[name])
            masks[name] = ~pruned_mask
        return masks

    def _blocks_are_elements(self, layout: BlockLayout) -> bool:
        """1x1 blocks scored by the base reduce: the block scores are the element scores, and may
        stay lazy as long as the base selection (which knows LazyScores) ranks them."""
        cls = type(self)
        return (all(getattr(cls, m) is getattr(BasePattern, m)
                    for m in ("block_scores", "get_masks_global", "get_masks_local"))
                and all(layout.shape[d] == 1 for d in layout.reduce_dims))

    def get_masks_global(self, block_scores: Mapping[str, Tensor], layouts: Mapping[str, BlockLayout],
                         target_sparsity: float | None = None) -> dict[str, Tensor]:
        """Pruned-block masks from one ranking over all layers of the group."""
        plans = self.plan_global(block_scores, layouts, target_sparsity)
        return {name: plan.pruned(block_scores[name]) for name, plan in plans.items()}

    def plan_global(self, block_scores: Mapping[str, Tensor | LazyScores],
                    layouts: Mapping[str, BlockLayout],
                    target_sparsity: float | None = None) -> dict[str, LayerPlan]:
        """The global ranking of :meth:`get_masks_global` as per-layer plans: each layer's pruned
        blocks are ``plan.pruned(its block scores)``, made when that layer's turn comes (pruning a
        checkpoint layer by layer holds no mask for the layers not being written)."""
        target = self.target_sparsity if target_sparsity is None else target_sparsity
        names = list(block_scores)
        bounds = [self.block_bounds(layouts[n]) for n in names]
        total = sum(layouts[n].numel for n in names)
        plans = plan_global([block_scores[n] for n in names],
                            [layouts[n].block_weights for n in names],
                            budget(target, total),
                            [lo for lo, _ in bounds], [hi for _, hi in bounds])
        return dict(zip(names, plans))

    def layers_are_independent(self) -> bool:
        """Whether each layer's mask depends on that layer's scores alone (local scope, or a
        pattern that needs no ranking at its target), so layers can be masked one at a time."""
        return not self.is_global

    def get_masks_local(self, block_scores: Mapping[str, Tensor], layouts: Mapping[str, BlockLayout],
                        target_sparsity: float | None = None) -> dict[str, Tensor]:
        """Pruned-block masks with every layer reaching the target by itself."""
        target = self.target_sparsity if target_sparsity is None else target_sparsity
        out = {}
        for name, s in block_scores.items():
            layout = layouts[name]
            lo, hi = self.block_bounds(layout)
            k = budget(target, layout.numel) // layout.block_weights
            out[name] = select_local(s, min(max(k, lo), hi))
        return out


# ---------------------------------------------------------------------- the registry
PATTERNS = Registry(BasePattern, "register_pattern", "registered_name", "myblock")


# Pattern strings the built-in families handle, probed when a user class registers: a user
# family whose ``matches`` takes one of them would silently replace the built-in for it.
BUILTIN_EXAMPLES = ("1x1", "4x1", "1x4", "2x2", "8x8", "1xchannel", "channelx1", "4xchannel",
                    "channelx4", "2:4", "1:4", "4:8")


def register_pattern(name: str, *, override: bool = False) -> Callable[[T], T]:
    """Class decorator: make a :class:`BasePattern` subclass usable as ``pattern: name``.

    A registered name is either an exact pattern string (``"myblock"``) or a family that parses
    many strings (``"NxM"`` takes ``"4x1"``, ``"1xchannel"``...; ``"N:M"`` takes ``"2:4"``); a
    family class says which strings it takes through its ``matches`` classmethod. Replacing a
    built-in pattern (its name, or strings a built-in family takes) needs ``override=True``.
    """
    return PATTERNS.decorator(name, override=override)


def _builtin_strings_taken(name: str, cls: type) -> list[tuple[type, str]]:
    """(built-in class, pattern string) pairs that registering ``cls`` as ``name`` would take."""
    from ..extensions import calling, is_user_code
    builtins = [c for c in PATTERNS.values() if not is_user_code(c) and c is not cls]
    own_matches = getattr(cls.matches, "__func__", None) is not BasePattern.matches.__func__
    taken = []
    for s in dict.fromkeys((name, *BUILTIN_EXAMPLES)):
        owner = next((b for b in builtins if b.matches(s)), None)
        if owner is None:
            continue
        with calling(cls, "matches", f"for {s!r}"):
            if s == name or (own_matches and cls.matches(s)):
                taken.append((owner, s))
    return taken


PATTERNS.claims = _builtin_strings_taken


def get_pattern_class(pattern: str, where: str = "config") -> type[BasePattern]:
    """The class registered for ``pattern``: an exact name first, then the families."""
    if not isinstance(pattern, str):
        raise ConfigError(f"{where}: pattern must be a string such as '4x1' or '2:4', got {pattern!r}")
    from ..extensions import calling
    candidates = ([PATTERNS[pattern]] if pattern in PATTERNS else []) + list(reversed(PATTERNS.values()))
    for cls in candidates:  # an exact name first, then user registrations before built-ins
        with calling(cls, "matches", f"for {pattern!r}"):
            if cls.matches(pattern):
                return cls
    raise ConfigError(f"{where}: unknown pattern {pattern!r}; registered patterns: "
                      f"{', '.join(PATTERNS)} (e.g. '4x1', '1x1', '1xchannel', 'channelx1', '2:4'); "
                      f"register your own with @fxprune.register_pattern(name)")
