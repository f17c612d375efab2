"""Physical channel removal on the user's modules, with undo.

Parameters and buffers are replaced by sliced copies (new ``nn.Parameter`` objects: the shapes
change), on every module that holds them (tied weights stay tied), and the modules' size
attributes follow (``in_features``, ``out_channels``, ``groups`` of a grouped or depthwise conv, BatchNorm
``num_features``, GroupNorm ``num_groups``, attention head counts), so the model keeps its class
and runs with its own ``forward``. Everything changed is recorded, so a slicing that fails
verification can be undone exactly.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import nn

from ..aten import ModuleLookup, is_conv, is_hf_conv1d
from .folds import eps_attribute, fold_factors
from .modules import ConfigView, compact_multihead_attention
from .values import ALL_HEADS_WIDTH_ATTRS, HEAD_COUNT_ATTRS

# widths of all heads together, rewritten with the head count


class Undo:
    def __init__(self):
        self.steps: list[tuple[object, str, str, object]] = []  # (owner, kind, name, old)

    def set_tensor(self, module: nn.Module, name: str, kind: str, value) -> None:
        store = module._parameters if kind == "param" else module._buffers
        self.steps.append((module, kind, name, store[name]))
        store[name] = value

    def set_attr(self, module: nn.Module, name: str, value) -> None:
        old = getattr(module, name)
        if old != value:
            self.steps.append((module, "attr", name, old))
            setattr(module, name, value)

    def restore(self) -> None:
        for owner, kind, name, old in reversed(self.steps):
            if kind == "attr":
                setattr(owner, name, old)
            elif kind == "new_attr":
                delattr(owner, name)
            else:
                (owner._parameters if kind == "param" else owner._buffers)[name] = old
        self.steps.clear()


def holders(model: nn.Module, lookup: ModuleLookup | None = None) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """id(tensor) -> every (module, attribute name, param/buffer) that holds it."""
    out: dict[int, list] = defaultdict(list)
    for module in (model.modules() if lookup is None else lookup.modules()):
        for kind, store in (("param", module._parameters), ("buffer", module._buffers)):
            for name, t in store.items():
                if t is not None:
                    out[id(t)].append((module, name, kind))
    return out


def replace_tensor(held: dict, old: torch.Tensor, new: torch.Tensor, undo: Undo | None = None) -> list[nn.Module]:
    """Put ``new`` wherever ``old`` is held (``held``: :func:`holders`), recorded in ``undo`` when
    given (tied weights stay tied); returns the modules that held it."""
    owners = []
    for module, name, kind in held[id(old)]:
        if undo is not None:
            undo.set_tensor(module, name, kind, new)
        else:
            (module._parameters if kind == "param" else module._buffers)[name] = new
        owners.append(module)
    return owners


def cut_plan(plan, spaces: set[int]) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """fqn -> [(dim, kept indices)] for the dims that lose entries when ``spaces`` are compacted."""
    cuts: dict[str, list] = defaultdict(list)
    # one index tensor per kept set: a BatchNorm's four tensors and its conv's rows share one
    kept_indices: dict[bytes, torch.Tensor] = {}
    for (fqn, dim), ax in plan.analysis.axes.items():
        dead = plan.dead_mask(ax.atoms, spaces)
        if dead.any():
            keep = kept_indices.get(dead.tobytes())
            if keep is None:
                keep = kept_indices[dead.tobytes()] = torch.from_numpy(np.flatnonzero(~dead))
            cuts[fqn].append((dim, keep))
    return cuts


def slice_model(model: nn.Module, plan, spaces: set[int], lookup: ModuleLookup | None = None) -> Undo:
    """Remove the dead channels of ``spaces``; returns the Undo (raises on an empty dim).
    ``lookup``: a :class:`~fxprune.aten.ModuleLookup` of ``model``."""
    undo = Undo()
    lookup = ModuleLookup(model) if lookup is None else lookup
    held = holders(model, lookup)
    touched: dict[int, nn.Module] = {}
    tensor = lookup.tensor
    try:
        with torch.no_grad():
            for fqn, cuts in cut_plan(plan, spaces).items():
                old = new = tensor(fqn)
                for dim, keep in cuts:
                    if keep.numel() == 0:
                        raise RuntimeError(f"compaction would remove every entry of dim {dim} of {fqn}")
                    new = new.index_select(dim, keep.to(new.device))
                new = new.contiguous()
                if isinstance(old, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=old.requires_grad)
                for module in replace_tensor(held, old, new, undo):
                    touched[id(module)] = module
            _conv_groups(lookup, plan, spaces, undo)  # before sync_sizes: in_channels reads groups
            for module in touched.values():
                sync_sizes(module, undo)
            _heads(lookup, plan, spaces, undo)
            for module in touched.values():  # after _heads: reads num_heads
                if isinstance(module, nn.MultiheadAttention):
                    compact_multihead_attention(module, undo)
            _norm_groups(lookup, plan, spaces, undo)
            _scale_folds(lookup, plan, spaces, undo)
    except Exception:
        undo.restore()
        raise
    return undo


def tensor_getter(model: nn.Module, lookup: ModuleLookup | None = None):
    """``tensor(fqn)``: the parameter or buffer ``fqn`` of ``model``, for many names, the modules
    looked up once (``get_submodule`` walks and checks every step of a path), or from
    ``lookup``; for loops that replace tensors, not modules."""
    return (ModuleLookup(model) if lookup is None else lookup).tensor


def sync_sizes(module: nn.Module, undo: Undo) -> None:
    """Set a module's size attributes from its (sliced) tensors."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        undo.set_attr(module, "out_features", w.shape[0])
        undo.set_attr(module, "in_features", w.shape[1])
    elif is_conv(module):
        undo.set_attr(module, "in_channels", w.shape[1] * module.groups)
        undo.set_attr(module, "out_channels", w.shape[0])
    elif isinstance(module, nn.modules.batchnorm._NormBase):  # BatchNorm, InstanceNorm
        t = w if w is not None else module.running_mean
        if t is not None:
            undo.set_attr(module, "num_features", t.shape[0])
    elif isinstance(module, nn.Embedding):
        undo.set_attr(module, "embedding_dim", w.shape[1])
    elif isinstance(module, nn.GroupNorm) and w is not None:
        undo.set_attr(module, "num_channels", w.shape[0])
    elif is_hf_conv1d(module):  # Hugging Face: weight [nx, nf]
        if hasattr(module, "nf"):
            undo.set_attr(module, "nf", w.shape[1])
        if hasattr(module, "nx"):
            undo.set_attr(module, "nx", w.shape[0])


def _kept_units(plan, atoms: np.ndarray, spaces) -> int:
    """Rows of ``atoms`` [units, ...] that survive (a unit goes as a whole)."""
    return int((~plan.dead_mask(atoms[:, 0], spaces)).sum())


def _heads(lookup: ModuleLookup, plan, spaces, undo: Undo) -> None:
    """Rewrite the head counts (and widths) a module records, for every head split it makes:
    queries and keys/values (grouped-query attention) are separate splits of one module."""
    done = set()
    for split in plan.analysis.head_splits:
        heads, width = split.atoms.shape
        kept = _kept_units(plan, split.atoms, spaces)
        if kept == heads:
            continue
        module = lookup.submodule(split.module)
        for name in HEAD_COUNT_ATTRS:
            if (split.module, name) not in done and getattr(module, name, None) == heads:
                done.add((split.module, name))
                undo.set_attr(module, name, kept)
                break
        else:
            _config_head_count(module, split.module, heads, kept, plan.analysis.packed_modules, done, undo)
        for name in ALL_HEADS_WIDTH_ATTRS:
            if (split.module, name) not in done and getattr(module, name, None) == heads * width:
                done.add((split.module, name))
                undo.set_attr(module, name, kept * width)


def _config_head_count(module, name: str, heads: int, kept: int, packed: set, done: set, undo: Undo) -> None:
    """A head count an attention module that slices a packed projection reads from its config at
    run time (Phi-3: ``qkv[..., :config.num_attention_heads * head_dim]``): the module gets its own
    :class:`~.modules.ConfigView` of the shared config with that count, so that every layer keeps
    its own (the shared config is updated afterwards, when the layers agree)."""
    config = getattr(module, "config", None)
    if name not in packed or config is None:
        return
    for attr in HEAD_COUNT_ATTRS:
        if (name, "config", attr) not in done and getattr(config, attr, None) == heads:
            done.add((name, "config", attr))
            if not isinstance(config, ConfigView):
                undo.set_attr(module, "config", ConfigView(config))
            view = module.config
            undo.steps.append((view, "new_attr", attr, None))
            setattr(view, attr, kept)
            return


def _conv_groups(lookup: ModuleLookup, plan, spaces, undo: Undo) -> None:
    done = set()
    for conv in plan.analysis.conv_groups:
        kept = _kept_units(plan, conv.atoms, spaces)
        if kept == conv.num_groups or conv.module in done:
            continue
        done.add(conv.module)
        module = lookup.submodule(conv.module)
        if not is_conv(module) or module.groups != conv.num_groups:
            raise RuntimeError(f"{conv.module} is not a convolution module with groups={conv.num_groups}; "
                               f"its groups cannot be rewritten")
        undo.set_attr(module, "groups", kept)


def _norm_groups(lookup: ModuleLookup, plan, spaces, undo: Undo) -> None:
    for norm in plan.analysis.norm_groups:
        kept = _kept_units(plan, norm.atoms, spaces)
        if kept != norm.num_groups and norm.module:
            undo.set_attr(lookup.submodule(norm.module), "num_groups", kept)


def _scale_folds(lookup: ModuleLookup, plan, spaces, undo: Undo) -> None:
    """Norms over the channels (RMSNorm, GRN): epsilon and weight rescaled for the channels kept."""
    held = None
    eps_set: dict[tuple[str, str], float] = {}
    for fold in plan.analysis.scale_folds:
        total = fold.atoms.size
        kept = int((~plan.dead_mask(fold.atoms, spaces)).sum())
        if kept == total:
            continue
        if kept == 0:
            raise RuntimeError(f"compaction would remove every channel normalized by {fold.module}")
        scale, eps_scale = fold_factors(total, kept, fold)
        module = lookup.submodule(fold.module)
        if fold.eps is not None and fold.eps != 0:
            if fold.compact_class is not None and type(module) is not fold.compact_class:
                undo.set_attr(module, "__class__", fold.compact_class)  # its epsilon is an attribute
            attr = fold.eps_attr or eps_attribute(module, fold.eps)
            if attr is None:
                raise RuntimeError(f"the epsilon {fold.eps:g} of {fold.module} is not a module attribute")
            eps = fold.eps * eps_scale
            if eps_set.setdefault((fold.module, attr), eps) != eps:
                raise RuntimeError(f"{fold.module} normalizes channels that lose different counts")
            if attr not in vars(module):  # a compact class's default: the instance gets its own
                undo.steps.append((module, "new_attr", attr, None))
            undo.set_attr(module, attr, eps)
        shape = getattr(module, "normalized_shape", None)
        if isinstance(shape, tuple) and len(shape) == 1 and shape[0] == total:
            undo.set_attr(module, "normalized_shape", (kept,))
        if fold.new_weight:  # nn.RMSNorm without affine: the factor becomes its weight
            weight = torch.full((kept,), scale, dtype=fold.dtype or torch.float32)
            undo.set_tensor(module, "weight", "param", nn.Parameter(weight))
            undo.set_attr(module, "elementwise_affine", True)
            continue
        if held is None:
            held = holders(lookup.model, lookup)
        old = lookup.tensor(fold.scale)
        new = old.detach() * scale if not fold.offset else (old.detach() + fold.offset) * scale - fold.offset
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        replace_tensor(held, old, new, undo)


def count_params(model: nn.Module, lookup: ModuleLookup | None = None) -> int:
    return sum(p.numel() for p in (model.parameters() if lookup is None else lookup.parameters()))
