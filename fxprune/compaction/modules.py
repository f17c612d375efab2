"""Modules compaction swaps in where the original cannot run, or cannot stay exact, at the
compacted sizes: torch's ``nn.MultiheadAttention`` (below), and *compact classes* registered for
modules whose ``forward`` writes a constant that must change with the channel count.

Compact classes (:func:`register_compact_class`): a module whose code adds a literal epsilon to a
statistic averaged over the channels (Hugging Face's ``ConvNextV2GRN``: ``g / (g.mean() + 1e-6)``)
cannot be folded, since the epsilon must be rescaled with the channels kept. A subclass whose
``forward`` computes the same thing but reads that constant from a class attribute (``eps =
1e-6``) can stand in for it: compaction sets the instance's ``__class__`` to it and gives the
instance its rescaled ``eps``. It is never constructed: it must subclass the original (so the
parameters, buffers, state-dict keys and ``isinstance`` stay) and its class attributes hold the
original's constants (so it computes exactly what the original does until compaction changes
them). Built-in compact classes for optional libraries are imported only when a module of theirs
is compacted (:mod:`.hf_modules`).

``nn.MultiheadAttention`` ties its query width, its heads' total width and its output width to one
``embed_dim`` (its packed in-projection is split as ``(3, embed_dim)`` of the *query's* width, its
fast path asserts ``num_heads * head_dim == embed_dim``). After whole heads or input channels are
removed these differ, so a compacted instance gets the class :class:`CompactMultiheadAttention`: a
subclass with the same parameters, buffers and attributes (``isinstance(m, nn.MultiheadAttention)``
stays true, the state dict keys are the same), whose ``forward`` computes the same attention from
the parameters' shapes: ``num_heads`` heads of ``head_dim``, the query width read from the input.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class CompactMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with ``num_heads * head_dim`` (the in-projection's rows) free of
    the query width ``embed_dim``. Built by compaction (``__class__`` of a compacted instance);
    not meant to be constructed directly."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if self.bias_k is not None or self.add_zero_attn:
            raise NotImplementedError("CompactMultiheadAttention: add_bias_kv / add_zero_attn are not "
                                      "supported (compaction never removes heads of such a module)")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # (L, B, E) from here on, as torch's functional path
        heads, dim = self.num_heads, self.head_dim
        inner = heads * dim
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.split(inner)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.split(inner)
        length, batch, _ = query.shape
        source = key.shape[0]

        def heads_of(x, w, b, n):  # [n, B, E] -> [B, heads, n, dim]
            return F.linear(x, w, b).view(n, batch, heads, dim).permute(1, 2, 0, 3)

        q, k, v = heads_of(query, wq, bq, length), heads_of(key, wk, bk, source), heads_of(value, wv, bv, source)
        mask = self._mask(attn_mask, key_padding_mask, is_causal, batch, length, source, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * dim ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            out = F.dropout(weights, dropout, self.training) @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = out.permute(2, 0, 1, 3).reshape(length, batch, inner)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _mask(self, attn_mask, key_padding_mask, is_causal, batch, length, source, dtype):
        """One additive float mask [B or 1, heads or 1, L, S] (torch's bool masks: True = ignore)."""
        def additive(m):
            if m is None:
                return None
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            return m.to(dtype)

        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool).triu(1)
        mask = additive(attn_mask)
        if mask is not None:
            mask = mask.view(1, 1, length, source) if mask.dim() == 2 else mask.view(batch, self.num_heads, length, source)
        pad = additive(key_padding_mask)
        if pad is not None:
            pad = pad.view(batch, 1, 1, source)
            mask = pad if mask is None else mask + pad
        return mask


def compact_multihead_attention(module: nn.MultiheadAttention, undo) -> None:
    """Give a sliced ``nn.MultiheadAttention`` its sizes (``head_dim``, ``embed_dim``, ``kdim``,
    ``vdim`` from the projections) and, when torch's forward cannot run them, the class
    :class:`CompactMultiheadAttention`."""
    packed = module._qkv_same_embed_dim
    w = module.in_proj_weight if packed else module.q_proj_weight
    inner = w.shape[0] // (3 if packed else 1)
    undo.set_attr(module, "head_dim", inner // module.num_heads)
    undo.set_attr(module, "embed_dim", w.shape[1])
    undo.set_attr(module, "kdim", w.shape[1] if packed else module.k_proj_weight.shape[1])
    undo.set_attr(module, "vdim", w.shape[1] if packed else module.v_proj_weight.shape[1])
    torch_runs_it = inner == module.embed_dim == module.out_proj.out_features
    if not torch_runs_it and type(module) is nn.MultiheadAttention:
        undo.set_attr(module, "__class__", CompactMultiheadAttention)


# original class -> its compact class
COMPACT_CLASSES: dict[type, type] = {}
# built-in compact classes of optional libraries, imported on first use:
# "module.qualname" of the original -> the module that registers its compact class
_BUILTIN_COMPACT_CLASSES = {
    "transformers.models.convnextv2.modeling_convnextv2.ConvNextV2GRN": "fxprune.compaction.hf_modules",
}


def register_compact_class(original: type) -> Callable[[type], type]:
    """Decorator: the class it decorates stands in for ``original`` when compaction must change a
    constant that ``original.forward`` writes in its code (the epsilon of a norm over the
    channels)::

        @register_compact_class(MyGRN)
        class CompactMyGRN(MyGRN):
            eps = 1e-6                        # the literal MyGRN.forward adds
            def forward(self, x):             # MyGRN.forward with self.eps for the literal
                g = x.norm(dim=(1, 2), keepdim=True)
                return self.gamma * (x * (g / (g.mean(-1, keepdim=True) + self.eps))) + x

    The compact class must subclass ``original`` and is never constructed: a compacted instance
    gets it as its ``__class__`` and its own rescaled attribute. Registering again replaces."""
    if not isinstance(original, type) or not issubclass(original, nn.Module):
        raise TypeError(f"register_compact_class needs the nn.Module class the compact class stands in "
                        f"for, e.g. @register_compact_class(MyGRN); got {original!r}")

    def register(compact: type) -> type:
        if not isinstance(compact, type) or not issubclass(compact, original) or compact is original:
            raise TypeError(f"@register_compact_class({original.__qualname__}) must decorate a subclass of "
                            f"{original.__qualname__} (so parameters, state-dict keys and isinstance stay); "
                            f"got {compact!r}")
        COMPACT_CLASSES[original] = compact
        return compact
    return register


def compact_class_of(module: nn.Module) -> type | None:
    """The compact class registered for ``module``'s exact class (a subclass may compute something
    else), importing a built-in one on first use; ``module``'s own class when it already is one."""
    cls = type(module)
    if cls in COMPACT_CLASSES.values():
        return cls
    if cls not in COMPACT_CLASSES:
        where = _BUILTIN_COMPACT_CLASSES.get(f"{cls.__module__}.{cls.__qualname__}")
        if where is not None:
            importlib.import_module(where)
    return COMPACT_CLASSES.get(cls)


class ConfigView:
    """A module's own view of a shared (Hugging Face) config: the attributes set on it are its
    own, every other one is read from the shared config. Compaction gives one to an attention
    module that reads a head count from the config at run time, so that each layer keeps its own
    count (Phi-3's packed ``qkv_proj`` is sliced at ``config.num_attention_heads * head_dim``)."""

    def __init__(self, config):
        self.__dict__["shared"] = config

    def __getattr__(self, name):
        if name.startswith("__") or name == "shared":  # copy / pickle probe before __init__
            raise AttributeError(name)
        return getattr(self.shared, name)

    def __repr__(self) -> str:
        own = {k: v for k, v in vars(self).items() if k != "shared"}
        return f"ConfigView({type(self.shared).__name__}, own={own})"
