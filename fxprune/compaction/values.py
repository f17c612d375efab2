"""The values of the channel analysis: atoms (removable channels), their union-find, and what
the analysis knows of each tensor (:class:`Chan`) or parameter (:class:`ParamRef`, :class:`Axis`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .atoms import AtomSet  # noqa: F401  (the union-find, re-exported)


@dataclass
class Chan:
    """The channel structure of one tensor: ``atoms[i, j, ...]`` is the atom at index i of
    ``dims[0]``, j of ``dims[1]``... (broadcast over the other dims)."""

    dims: tuple[int, ...]
    atoms: np.ndarray
    zero: bool = True          # pruned channels hold exact zeros here
    why: str = ""              # the op that made them nonzero, when not zero


@dataclass(frozen=True)
class ParamRef:
    """A parameter or buffer seen through transposes: dim i of this value is dim perm[i] of it."""

    fqn: str
    perm: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ShiftedParam:
    """A parameter plus a number (``1 + weight``: Gemma's RMSNorm scales by it). Multiplying
    channels by it ties the parameter's entries to them like the parameter itself (sliced with
    them); any other use blocks, as for a new tensor."""

    ref: ParamRef
    offset: float


@dataclass
class Axis:
    """Atoms bound to one dim of a parameter/buffer; ``roles``: source (a layer's output
    channels), zero (zeroed with a pruned channel: bias, norm affine), slice (cut only)."""

    atoms: np.ndarray
    roles: set = field(default_factory=set)


# Module attributes that count attention heads (Hugging Face, timm, torch), rewritten when whole
# heads go.
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head", "num_key_value_heads",
                    "num_kv_heads")
# Module attributes that record a width of the attention (embedding, all heads, one head).
ALL_HEADS_WIDTH_ATTRS = ("all_head_size", "inner_dim", "split_size")   # every head's width together
HEAD_WIDTH_ATTRS = (*ALL_HEADS_WIDTH_ATTRS, "embed_dim", "kdim", "vdim", "head_dim",
                    "attention_head_size", "hidden_size")


@dataclass
class HeadSplit:
    """A reshape that splits channels into (heads, head_dim): the module's head-count attributes
    change when whole heads go."""

    module: str
    atoms: np.ndarray          # [heads, head_dim]


@dataclass
class NormGroups:
    module: str
    num_groups: int
    atoms: np.ndarray          # [num_groups, channels_per_group]


@dataclass
class ConvGroups:
    """A grouped convolution whose groups go whole: ``atoms[g]`` holds group g's input and output
    channels (one class); the module's ``groups`` becomes the number of groups kept."""

    module: str
    num_groups: int
    atoms: np.ndarray          # [num_groups, in_per_group + out_per_group]


@dataclass
class ScaleFold:
    """A statistic averaged over the channels ``atoms`` (RMSNorm's mean square, GRN's mean norm)
    that compaction keeps exact by rescaling: with C channels of which C_kept stay, and r = C /
    C_kept, the module attribute ``eps_attr`` (its epsilon, added to the statistic raised to
    ``eps_power``) is multiplied by ``r ** eps_power`` and the tensor ``scale`` by ``r ** power``
    (``scale + offset`` when the norm multiplies by that sum)
    (see docs/compact.md, "Norms over the channels"). ``scale`` None with ``new_weight``: the
    module (``nn.RMSNorm`` without affine) gets a weight holding ``r ** power``."""

    module: str                # the module that holds the epsilon (and runs the norm)
    atoms: np.ndarray          # the channels averaged over
    power: float               # scale *= r ** power
    scale: str | None = None   # fqn of the parameter the factor is folded into
    eps: float | None = None   # the epsilon in the graph (None: no epsilon)
    eps_attr: str | None = None
    eps_power: float = 1.0
    new_weight: bool = False
    dtype: object = None       # the norm's dtype (for a new weight, or an epsilon left None)
    compact_class: type | None = None  # the class the module gets, whose ``eps_attr`` holds the epsilon
    offset: float = 0.0        # the norm multiplies by scale + offset (``1 + weight``): that sum is rescaled
