"""Hugging Face configs after compaction: the fields that describe a size that changed.

A compacted ``transformers`` model keeps its ``config``, which ``save_pretrained`` writes and
``from_pretrained`` builds the model from. :func:`update_hf_configs` sets the size fields from
the compacted modules' shapes (not from how the channels were chosen): the hidden size (the input
embedding's width), the FFN width, the attention and key/value head counts, the head width, and
the norms' epsilon when compaction rescaled it. A field is written only when every layer agrees;
when layers differ (e.g. ``pruning_scope: global``) no config can describe the model, and the
field is left as it was with a warning saying how to save and reload such a model instead; so
does a width no config field describes (found by building the model from the updated config on
the ``meta`` device and comparing the shapes). Gemma's ``sqrt(hidden_size)`` embedding scale, set
from the config when the model is built, is rescaled with the hidden size.
:func:`fit_hf_configs` runs when the channels are selected: it gives back removed hidden channels
until the config's own validation accepts the sizes kept (Llama requires ``hidden_size`` to be a
multiple of ``num_attention_heads``). transformers is never imported: a config is recognised by its ``to_dict`` and ``model_type``.
"""
from __future__ import annotations

import copy
import math
import warnings
from collections import defaultdict

import numpy as np
from torch import nn

from ..aten import is_hf_conv1d
from .classes import ranked, sorted_unique
from .modules import ConfigView
from .slicing import holders, replace_tensor, tensor_getter

# FFN: the module that widens the hidden state, by its name in the model, and the config field
FFN_UP = {"intermediate_size": ("mlp.up_proj", "mlp.gate_proj", "intermediate.dense", "mlp.fc1",
                                "feed_forward.w1", "feed_forward.w3"),
          "d_ff": ("DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1"),
          "n_inner": ("mlp.c_fc",)}
# an FFN whose one projection holds several of them (Phi-3's gate_up_proj: gate and up), and how many
FFN_UP_PACKED = {"intermediate_size": (("mlp.gate_up_proj",), 2)}
# attention: (query, key) projection names and the module attribute holding the head width
ATTENTION = ((("q_proj", "k_proj"), ("head_dim",)),
             (("q", "k"), ("key_value_proj_dim",)),
             (("query", "key"), ("attention_head_size",)))
# norms: the module attribute holding the epsilon, the config field it comes from
NORM_EPS = {"variance_epsilon": ("rms_norm_eps", "layer_norm_epsilon")}
# the same for RMSNorm classes (by name) that call it eps (Gemma); other modules' eps (LayerNorm) are not
RMS_NORM_EPS = {"eps": ("rms_norm_eps",)}

RELOAD_HINT = ("save it with torch.save(model) (or its state_dict) and reload it with torch.load "
               "(or load the state dict into the compacted object); pruning_scope 'local' removes the "
               "same share of every layer, which usually keeps the sizes equal")


def _is_config(obj) -> bool:
    return hasattr(obj, "to_dict") and hasattr(obj, "model_type")


def hf_models(model: nn.Module, lookup=None) -> list[tuple[str, nn.Module]]:
    """(name, module) of the outermost modules holding each distinct Hugging Face config
    (``lookup``: a :class:`~fxprune.aten.ModuleLookup` of ``model``)."""
    seen, out = set(), []
    for name, module in (model.named_modules() if lookup is None else lookup.named_modules()):
        config = getattr(module, "config", None)
        if _is_config(config) and not isinstance(config, ConfigView) and id(config) not in seen:
            seen.add(id(config))
            out.append((name, module))
    return out


def _input_embeddings(module: nn.Module) -> nn.Embedding | None:
    """The model's token embedding, if it has one (vision models raise NotImplementedError)."""
    try:
        embed = module.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return embed if isinstance(embed, nn.Embedding) else None


def _out_features(module) -> int | None:
    w = getattr(module, "weight", None)
    if w is None or w.dim() != 2:
        return None
    return int(w.shape[1] if is_hf_conv1d(module) else w.shape[0])


def read_sizes(module: nn.Module) -> dict[str, list]:
    """Field -> the values the compacted modules of one Hugging Face model hold (one per layer)."""
    sizes: dict[str, list] = defaultdict(list)
    embed = _input_embeddings(module)
    if embed is not None:
        sizes["hidden_size"].append(int(embed.weight.shape[1]))
    for name, sub in module.named_modules():
        for field, suffixes in FFN_UP.items():
            if name.endswith(suffixes) and (width := _out_features(sub)) is not None:
                sizes[field].append(width)
        for field, (suffixes, pieces) in FFN_UP_PACKED.items():
            if name.endswith(suffixes) and (width := _out_features(sub)) is not None:
                sizes[field].append(width // pieces)
        norm_eps = NORM_EPS | RMS_NORM_EPS if type(sub).__name__.endswith("RMSNorm") else NORM_EPS
        for attr, fields in norm_eps.items():
            eps = getattr(sub, attr, None)
            if isinstance(eps, float):
                for f in fields:
                    sizes[f].append(eps)
    for q, k, width in _attention_widths(module):
        sizes["head_dim"].append(width)
        sizes["num_attention_heads"].append(q.shape[0] // width)
        sizes["num_key_value_heads"].append(k.shape[0] // width)
    for heads, kv_heads, width in _packed_attention(module):
        sizes["head_dim"].append(width)
        sizes["num_attention_heads"].append(heads)
        sizes["num_key_value_heads"].append(kv_heads)
    return sizes


def _packed_attention(module: nn.Module):
    """(query heads, key/value heads, head width) of every attention whose q, k and v rows are one
    projection ``qkv_proj`` (Phi-3: the query heads, then as many key as value heads)."""
    for sub in module.modules():
        qkv, width, kv = getattr(sub, "qkv_proj", None), getattr(sub, "head_dim", None), getattr(sub, "num_key_value_heads", None)
        if isinstance(qkv, nn.Linear) and isinstance(width, int) and isinstance(kv, int) and width > 0:
            yield qkv.out_features // width - 2 * kv, kv, width


def update_hf_configs(model: nn.Module, undo=None, norm_offsets: dict[str, float] | None = None,
                      lookup=None) -> dict:
    """Write the compacted sizes into every Hugging Face config of ``model`` (recorded in
    ``undo``, a :class:`~.slicing.Undo`, when given). ``norm_offsets``: parameter name -> the
    number a norm adds to that weight before multiplying (Gemma's ``1 + weight``), as the
    channel analysis found it. Returns ``{"updated": {field: [old, new]}, "not_described":
    {field: [value per layer...]}}`` with fields named ``<module>.config.<name>``. ``lookup``: a
    :class:`~fxprune.aten.ModuleLookup` of ``model``."""
    updated, not_described = {}, {}
    set_attr = undo.set_attr if undo is not None else setattr
    for prefix, module in hf_models(model, lookup):
        config = module.config
        sizes = read_sizes(module)
        at = f"{prefix}.config." if prefix else "config."
        aliases = getattr(config, "attribute_map", {}) or {}
        for field, values in sizes.items():
            if not hasattr(config, field):
                continue
            name = aliases.get(field, field)
            old = getattr(config, field)
            distinct = sorted(set(values))
            if len(distinct) > 1:
                not_described[at + name] = list(values)
            elif distinct[0] != old:
                set_attr(config, name, distinct[0])
                updated[at + name] = [old, distinct[0]]
                if field == "hidden_size":
                    _decoder_output_scale(module, old, distinct[0], undo)
                    why = _embedding_scale(model, module, old, distinct[0], undo, norm_offsets or {})
                    if why:
                        not_described[at + "hidden_size"] = [distinct[0], why]
        width = sorted(set(sizes.get("head_dim", [])))
        if (len(width) == 1 and not hasattr(config, "head_dim") and hasattr(config, "num_attention_heads")
                and config.hidden_size // config.num_attention_heads != width[0]):
            # a config without head_dim derives it from hidden_size, which changed: write it
            # explicitly (the attention of Qwen2 and most others reads config.head_dim first)
            if undo is not None:
                undo.steps.append((config, "new_attr", "head_dim", None))
            config.head_dim = width[0]
            updated[at + "head_dim"] = [None, width[0]]
        if not any(k.startswith(at) for k in not_described):
            shapes = undescribed_shapes(module)
            if shapes:
                not_described[at + "<no field>"] = shapes
    return {"updated": updated, "not_described": not_described}


def undescribed_shapes(module: nn.Module) -> list[str]:
    """The parameters of ``module`` (a Hugging Face model) whose shapes a model built from its
    config would not have (a width the config has no field for: ConvNeXt's MLP is ``4 *
    hidden_sizes[i]`` in its code), as ``"name (shape), config builds (shape)"``; empty when the
    config describes every shape, or when the model cannot be built from its config alone."""
    import torch
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = type(module)(copy.deepcopy(module.config))
    except Exception:  # a model built from more than its config: nothing to compare with
        return []
    built = {n: tuple(p.shape) for n, p in fresh.named_parameters()}
    return [f"{n} {tuple(p.shape)}, config builds {built[n]}" for n, p in module.named_parameters()
            if n in built and built[n] != tuple(p.shape)]


def warn_not_described(info: dict, why: str = "") -> None:
    """The warning for sizes a Hugging Face config cannot describe."""
    if not info["not_described"]:
        return
    def values(v: list) -> str:
        v = sorted(set(v), key=str)
        return str(v) if len(v) <= 3 else f"{v[:3]} and {len(v) - 3} more"

    detail = "; ".join(f"{k}: {values(v)}" for k, v in info["not_described"].items())
    warnings.warn(f"the compacted model's sizes differ across layers or from what its Hugging Face config "
                  f"can describe ({detail}{why}): save_pretrained writes the weights but from_pretrained cannot "
                  f"rebuild the model from this config; {RELOAD_HINT}", stacklevel=4)


def _decoder_output_scale(module: nn.Module, old: int, new: int, undo=None) -> None:
    """T5 and its kin scale the decoder output by ``model_dim ** -0.5`` (``model_dim`` read from
    ``d_model`` when built): a model rebuilt from the new ``d_model`` scales by ``new ** -0.5``, so
    the ratio goes into the decoder's final norm weight and ``model_dim`` follows; the compacted
    model computes the same, and so does the reloaded one."""
    norm = getattr(getattr(module, "decoder", None), "final_layer_norm", None)
    if (getattr(module, "model_dim", None) != old or not getattr(module.config, "scale_decoder_outputs", False)
            or not isinstance(getattr(norm, "weight", None), nn.Parameter)):
        return
    weight = nn.Parameter(norm.weight.detach() * (new / old) ** 0.5, requires_grad=norm.weight.requires_grad)
    if undo is not None:
        undo.set_tensor(norm, "weight", "param", weight)
        undo.set_attr(module, "model_dim", new)
    else:
        norm.weight, module.model_dim = weight, new


def _embedding_scale(model: nn.Module, module: nn.Module, old: int, new: int, undo, norm_offsets) -> str:
    """Gemma multiplies its token embeddings by ``sqrt(hidden_size)``, a buffer (``embed_scale``)
    set from the config when the model is built, so a model rebuilt from the new ``hidden_size``
    multiplies by ``sqrt(new)``. The compacted model takes that scale and its embedding weight is
    multiplied by ``sqrt(old / new)``: the embeddings stay. An output head sharing that weight
    (tied) would then give logits ``sqrt(old / new)`` times larger, so the final norm's multiplier
    (its weight plus the offset the channel analysis found: ``1 + w`` for Gemma) is divided by that
    ratio. Checked with the other updates by one more run. Returns why it could not, or ''."""
    import torch
    embed = _input_embeddings(module)
    scale, buffer = getattr(embed, "scalar_embed_scale", None), getattr(embed, "embed_scale", None)
    if not (isinstance(scale, float) and isinstance(buffer, torch.Tensor) and buffer.numel() == 1
            and math.isclose(scale, old ** 0.5, rel_tol=1e-6)):
        return ""
    ratio = (old / new) ** 0.5
    changes = [(embed.weight, embed.weight.detach() * ratio)]
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is embed.weight:
        decoder = module.get_decoder() if hasattr(module, "get_decoder") else None
        weight = getattr(getattr(decoder, "norm", None), "weight", None)
        if not isinstance(weight, nn.Parameter):
            return (f"its embeddings are scaled by sqrt(hidden_size) ({scale:g}) and its output head shares "
                    f"their weight, with no final norm weight to take the ratio back")
        offset = norm_offsets.get(next(n for n, p in model.named_parameters() if p is weight), 0.0)
        changes.append((weight, (weight.detach() + offset) / ratio - offset))
    held = holders(model)
    with torch.no_grad():
        for old_t, value in changes:
            replace_tensor(held, old_t, nn.Parameter(value, requires_grad=old_t.requires_grad), undo)
        new_buffer = torch.full_like(buffer, new ** 0.5)
        if undo is not None:
            undo.set_tensor(embed, "embed_scale", "buffer", new_buffer)
            undo.set_attr(embed, "scalar_embed_scale", new ** 0.5)
        else:
            embed._buffers["embed_scale"], embed.scalar_embed_scale = new_buffer, new ** 0.5
    return ""


def _attention_widths(module: nn.Module):
    """(query weight, key weight, head width) of every attention module of a Hugging Face model."""
    for sub in module.modules():
        for (q_name, k_name), width_attrs in ATTENTION:
            q, k = getattr(sub, q_name, None), getattr(sub, k_name, None)
            width = next((getattr(sub, a) for a in width_attrs if isinstance(getattr(sub, a, None), int)), None)
            if isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and width:
                yield q.weight, k.weight, width
                break


def fit_hf_configs(model: nn.Module, an, classes, removed: np.ndarray, score: np.ndarray, lookup=None) -> None:
    """Give back removed channels of a Hugging Face model's hidden size until its config accepts
    the sizes kept (Llama, Qwen2, Mistral require hidden_size to be a multiple of
    num_attention_heads): the best-scoring removed hidden channels first. ``classes``: the
    :class:`~.classes.ChannelClasses`; ``removed`` (bool over them) is updated; ``score``: theirs.
    ``lookup``: a :class:`~fxprune.aten.ModuleLookup` of ``model``."""
    models = hf_models(model, lookup)
    if not models:
        return
    tensor, fqn_of = tensor_getter(model, lookup), {}
    for fqn, _ in an.axes:
        try:
            fqn_of[id(tensor(fqn))] = fqn
        except (AttributeError, KeyError):  # not a tensor of the model (any more)
            pass
    dead_root = np.zeros(an.atoms.size, dtype=bool)
    dead_root[classes.roots[removed]] = True

    def kept(fqn: str, dim: int) -> int | None:
        ax = an.axes.get((fqn, dim))
        if ax is None:
            return None
        return int((~dead_root[an.roots(ax.atoms)]).sum())

    for _, module in models:
        config = module.config
        embed = _input_embeddings(module)
        if embed is None or not hasattr(config, "validate_architecture"):
            continue
        stream = an.axes.get((fqn_of.get(id(embed.weight)), 1))
        if stream is None:
            continue
        heads, kv = set(), set()
        for q, k, width in _attention_widths(module):
            nq, nk = kept(fqn_of.get(id(q), ""), 0), kept(fqn_of.get(id(k), ""), 0)
            heads.add((q.shape[0] if nq is None else nq) // width)
            kv.add((k.shape[0] if nk is None else nk) // width)
        if len(heads) > 1 or len(kv) > 1:
            continue  # layers differ: no config describes them anyway
        of_channel = classes.index(an.roots(stream.atoms).ravel())   # each hidden channel's class, or -1
        dead_channel = (of_channel >= 0) & removed[np.maximum(of_channel, 0)]
        channels = np.bincount(of_channel[dead_channel], minlength=len(classes))  # per removed class
        back = ranked(score, sorted_unique(of_channel[dead_channel])).tolist()   # best last
        hidden = int(of_channel.size - dead_channel.sum())
        trial = copy.deepcopy(config)
        if heads:
            trial.num_attention_heads = heads.pop()
            if getattr(trial, "num_key_value_heads", None) is not None:
                trial.num_key_value_heads = kv.pop()
        while True:
            trial.hidden_size = hidden
            try:
                trial.validate_architecture()
                break
            except ValueError:
                if not back:
                    break
                k = back.pop()
                removed[k] = dead_root[classes.roots[k]] = False
                hidden += int(channels[k])


