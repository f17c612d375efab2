"""Applying a channel plan to the model: zero, slice, verify, undo what fails, report.

1. :func:`zero_removed` zeroes every per-channel tensor of a removed class that the rewrite did
   not (a BatchNorm after an activation, an added per-channel parameter, GroupNorm affine), so
   the masked model is exactly the function the compacted one computes;
2. :func:`compact_model` runs the masked model once on the example inputs (its outputs),
   slices the parameters and module attributes (:mod:`.slicing`), and runs it again: the outputs
   must match (rtol 1e-4). If they do not, or the forward fails (a view in the user's code with
   a hard-coded channel count, ...), every slicing is undone and each *space* (the channels
   sliced together) is retried alone; the spaces that fail stay masked, uncompacted, and are
   reported; a Hugging Face model's config gets the new sizes (:mod:`.hf_config`). FLOPs
   before and after are read from the captured graph's shapes and the sliced ones
   (:class:`fxprune.flops.GraphFlops`), not counted on these forwards;
3. :func:`summary` is the report's ``compaction`` entry: parameters and FLOPs before and after,
   and per space the layers, the units (channels, heads, norm groups) removed, and what blocked
   the rest.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import torch

from ..aten import ModuleLookup, shape_of
from ..flops import GraphFlops, flop_counter
from ..inputs import eval_mode, output_tensors, split_inputs
from ..report import count_zeros
from .classes import sorted_unique
from .hf_config import update_hf_configs, warn_not_described
from .slicing import Undo, count_params, slice_model, tensor_getter
from .values import Chan, ParamRef

RTOL = 1e-4


def compact_model(model, plan, example_inputs, lookup: ModuleLookup | None = None) -> dict:
    """Slice the plan's removed classes out of ``model`` (in place), keeping only the spaces whose
    outputs still match; returns the figures :func:`summary` reports. ``lookup``: a
    :class:`~fxprune.aten.ModuleLookup` of ``model`` (the module tree is not changed)."""
    args, kwargs = split_inputs(example_inputs)
    lookup = ModuleLookup(model) if lookup is None else lookup
    params = lookup.named_parameters()
    params_before = sum(p.numel() for _, p in params)
    shapes_before = {n: list(p.shape) for n, p in params}
    graph = GraphFlops(plan.analysis.gm)
    flops_before = graph.count()
    on_forward = flops_before is None  # a graph the shapes cannot count: count on the forwards
    reference, counted = forward(model, args, kwargs, count_flops=on_forward, lookup=lookup)
    if on_forward:
        flops_before = counted
    spaces = sorted({plan.space[r] for r in plan.dead})
    offsets = {f.scale: f.offset for f in plan.analysis.scale_folds if f.scale}
    failed: dict[int, str] = {}
    good = set(spaces)
    # the configs are updated with the slicing, so one forward checks both
    why, flops_after, config = _try(model, plan, good, args, kwargs, reference, count_flops=on_forward,
                                    norm_offsets=offsets, lookup=lookup)
    if why is not None:  # find the spaces that break the model; keep the others
        for s in spaces:
            reason, _, _ = _try(model, plan, {s}, args, kwargs, reference, keep=False, lookup=lookup)
            if reason is not None:
                failed[s] = reason
        good = set(spaces) - set(failed)
        why, flops_after, _ = _try(model, plan, good, args, kwargs, reference, count_flops=on_forward,
                                   lookup=lookup)
        if why is not None:
            failed.update({s: why for s in good})
            good, flops_after = set(), flops_before
        config = _update_configs(model, args, kwargs, reference, offsets, lookup)
    if not on_forward:
        flops_after = graph.count(compacted_shapes(model, plan, good, lookup)) if good else flops_before
        if flops_after is None:
            _, flops_after = forward(model, args, kwargs, count_flops=True, lookup=lookup)
    return {"failed": failed, "params_before": params_before, "params_after": count_params(model, lookup),
            "flops_before": flops_before, "flops_after": flops_after, "shapes_before": shapes_before,
            "config": config}


def compacted_shapes(model, plan, spaces: set[int], lookup: ModuleLookup | None = None):
    """``shape(node)``: the shape a node of the analysed graph has in ``model`` once the removed
    classes of ``spaces`` are sliced out (a parameter's as ``model`` now holds it; a tensor's
    channel dims keep the indices not all of whose atoms are removed; any other value as
    recorded), for :class:`~fxprune.flops.GraphFlops`."""
    an = plan.analysis
    cache: dict = {}
    kept_of: dict[int, tuple] = {}   # id(atoms) -> (atoms, kept per channel dim): values share atoms
    tensor = tensor_getter(model, lookup)

    def shape(node):
        if node in cache:
            return cache[node]
        recorded = shape_of(node)
        v = an.values.get(node)
        out = recorded
        if isinstance(v, ParamRef):
            now = tuple(tensor(v.fqn).shape)
            out = tuple(now[p] if p >= 0 else recorded[i] for i, p in enumerate(v.perm))
        elif isinstance(v, Chan) and recorded is not None:
            known = kept_of.get(id(v.atoms))
            if known is None:
                dead = plan.dead_mask(v.atoms.ravel(), spaces).reshape(v.atoms.shape)
                known = kept_of[id(v.atoms)] = (v.atoms, kept_per_dim(dead))
            out = list(recorded)
            for d, kept in zip(v.dims, known[1]):
                out[d] = kept
            out = tuple(out)
        cache[node] = out
        return out
    return shape


def kept_per_dim(dead: np.ndarray) -> list[int]:
    """For each dim of ``dead`` (whether each atom is removed), how many of its indices keep an
    atom (an index goes only when all its atoms do)."""
    if dead.ndim == 1:
        return [int(dead.size - np.count_nonzero(dead))]
    return [int((~np.moveaxis(dead, k, 0).reshape(dead.shape[k], -1).all(axis=1)).sum()) for k in range(dead.ndim)]


def _update_configs(model, args, kwargs, reference, norm_offsets, lookup: ModuleLookup | None = None) -> dict:
    """Hugging Face configs follow the compacted sizes; a model whose forward reads a size from
    its config (Gemma scales its embeddings by sqrt(hidden_size)) would then compute something
    else: checked on the example inputs, and left as it was with a warning if so."""
    undo = Undo()
    info = update_hf_configs(model, undo, norm_offsets, lookup)
    mismatch = None
    if undo.steps:
        mismatch, _, error = _check(model, args, kwargs, reference, lookup=lookup)
        if mismatch is not None:
            mismatch = mismatch if error is None else f"the model fails: {error}"
            undo.restore()
    return _configs_checked(info, mismatch)


def _configs_checked(info: dict, mismatch: str | None) -> dict:
    """The report's config entry (and its warning) once the configs were checked: with a
    ``mismatch``, the new sizes were left out of the configs (the model computes something else
    with them)."""
    why = ""
    if mismatch is not None:
        info = {"updated": {}, "not_described": {k: [new] for k, (_, new) in info["updated"].items()}
                | info["not_described"]}
        why = f"; with these sizes in its config the model computes something else: {mismatch}"
    warn_not_described(info, why)
    return info


def nothing_to_compact(model, plan) -> dict:
    """The report entry when no group removes output channels."""
    n = count_params(model)
    return {"params_before": n, "params_after": n, "flops_before": None, "flops_after": None,
            "groups": [], "layers": {}, "not_compacted": dict(plan.notes),
            "config": {"updated": {}, "not_described": {}}}


def zero_removed(model, plan, lookup: ModuleLookup | None = None) -> None:
    """Zero the removed classes' entries of every source/zero-role tensor (biases, norm affine).
    ``lookup``: a :class:`~fxprune.aten.ModuleLookup` of ``model``."""
    axes = [(key, ax.atoms.ravel()) for key, ax in plan.analysis.axes.items() if ax.roles & {"source", "zero"}]
    if not axes:
        return
    # one lookup for the atoms of every axis, then each axis's removed entries
    ends = np.cumsum([atoms.size for _, atoms in axes])
    hit = np.flatnonzero(plan.dead_mask(np.concatenate([atoms for _, atoms in axes])))
    owner = np.searchsorted(ends, hit, side="right")             # the axis of each removed entry
    bounds = np.searchsorted(owner, np.arange(len(axes) + 1))
    tensor = tensor_getter(model, lookup)
    with torch.no_grad():
        for i in np.flatnonzero(bounds[1:] > bounds[:-1]).tolist():
            (fqn, dim), start = axes[i][0], int(ends[i] - axes[i][1].size)
            t = tensor(fqn)
            t.index_fill_(dim, torch.as_tensor(hit[bounds[i]:bounds[i + 1]] - start, device=t.device), 0)


def forward(model, args, kwargs, count_flops: bool = False, lookup: ModuleLookup | None = None):
    """The model's output tensors on the example inputs, in eval mode (every module's mode
    restored), and FLOPs."""
    with eval_mode(model, None if lookup is None else lookup.modules()), torch.no_grad():
        if count_flops:
            with flop_counter() as counter:
                out = model(*args, **kwargs)
            return [t.detach() for t in output_tensors(out)], int(counter.get_total_flops())
        return [t.detach() for t in output_tensors(model(*args, **kwargs))], None


def _try(model, plan, spaces: set[int], args, kwargs, reference, keep: bool = True,
         count_flops: bool = False, norm_offsets: dict | None = None, lookup: ModuleLookup | None = None):
    """Slice ``spaces`` and check the outputs: (None, FLOPs if ``count_flops``, config entry)
    when they match (undone unless ``keep``), else (why not, None, None), undone. With
    ``norm_offsets``, the Hugging Face configs are updated too (:func:`_update_configs`) and
    checked by the same forward: if only they make it differ, they are left as they were."""
    try:
        undo = slice_model(model, plan, spaces, lookup)
    except Exception as e:
        return f"slicing failed: {type(e).__name__}: {_first_line(e)}", None, None
    configs, info = Undo(), None
    if norm_offsets is not None:
        info = update_hf_configs(model, configs, norm_offsets, lookup)
    why, flops, error = _check(model, args, kwargs, reference, count_flops, lookup)
    config = None
    if why is None:
        config = None if info is None else _configs_checked(info, None)
    elif configs.steps:  # the configs' doing, or the slicing's?
        configs.restore()
        mismatch = why if error is None else f"the model fails: {error}"
        why, flops, error = _check(model, args, kwargs, reference, count_flops, lookup)
        if why is None:
            config = _configs_checked(info, mismatch)
    if why is not None or not keep:
        configs.restore()
        undo.restore()
    return why, flops, config


def _check(model, args, kwargs, reference, count_flops: bool = False, lookup: ModuleLookup | None = None):
    """(why the compacted model's outputs differ from ``reference`` or None, FLOPs if
    ``count_flops``, the error it raised or None)."""
    try:
        out, flops = forward(model, args, kwargs, count_flops=count_flops, lookup=lookup)
        return _mismatch(out, reference), flops, None
    except Exception as e:
        error = f"{type(e).__name__}: {_first_line(e)}"
        return f"the compacted model fails: {error}", None, error


def _mismatch(out, reference) -> str | None:
    if len(out) != len(reference):
        return f"the compacted model returns {len(out)} tensors instead of {len(reference)}"
    for i, (a, b) in enumerate(zip(out, reference)):
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(a.shape)} instead of {tuple(b.shape)}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"output {i} differs"
            continue
        scale = float(b.abs().max()) if b.numel() else 0.0
        rtol = max(RTOL, 16 * torch.finfo(b.dtype).eps)  # fp16/bf16 sum in another order too
        if not torch.allclose(a.float(), b.float(), rtol=rtol, atol=rtol * max(scale, 1e-6)):
            err = float((a.float() - b.float()).abs().max())
            return f"output {i} differs from the masked model's by {err:.3g} (max |output| {scale:.3g})"
    return None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else "(no message)"


def summary(model, targets, plan, figures: dict, lookup: ModuleLookup | None = None) -> dict:
    """The ``compaction`` entry of the report: one record per space holding pruned layers.
    ``targets``: param -> Target, in graph order; ``figures``: what :func:`compact_model` returned;
    ``lookup``: a :class:`~fxprune.aten.ModuleLookup` of ``model``."""
    failed, shapes_before = figures["failed"], figures["shapes_before"]
    names = {t.param: t.name for t in targets.values()}
    position = {p: i for i, p in enumerate(names)}
    classes = plan.classes
    dead, space = plan.of_classes()
    is_blocked = classes.member(plan.blocked)
    by_space = np.argsort(space, kind="stable")                   # each space's classes, in class order
    cuts = np.flatnonzero(np.diff(space[by_space])) + 1
    span = max(len(classes.params), 1)
    layers_of = defaultdict(list)                                 # space -> its layers
    for key in sorted_unique(space[classes.link_class] * span + classes.link_layer).tolist():
        layers_of[key // span].append(classes.params[key % span])
    groups = []
    for members in sorted(np.split(by_space, cuts) if by_space.size else [], key=lambda m: m[0]):
        sid = int(space[members[0]])                              # spaces in order of their first class
        layers = sorted(layers_of[sid], key=position.__getitem__)
        blocked = Counter(plan.blocked[r] for r in classes.roots[members[is_blocked[members]]].tolist())
        removed = int(dead[members].sum())
        entry = {"layers": [names[p] for p in layers], "units": int(members.size),
                 "removed": 0 if sid in failed else removed, "blocked_units": sum(blocked.values()),
                 "blocked": [{"reason": why, "units": n} for why, n in blocked.most_common()]}
        if sid in failed:
            entry["blocked"].insert(0, {"reason": f"not compacted: {failed[sid]}", "units": removed})
        groups.append(entry)
    current = dict(model.named_parameters() if lookup is None else lookup.named_parameters())
    layers = {n: {"shape_before": shape, "shape_after": list(current[n].shape),
                  "zeros_after": count_zeros(current[n])}
              for n, shape in shapes_before.items() if n in current and list(current[n].shape) != shape}
    return {"params_before": figures["params_before"], "params_after": figures["params_after"],
            "flops_before": figures["flops_before"], "flops_after": figures["flops_after"],
            "groups": groups, "layers": layers, "not_compacted": dict(plan.notes),
            "config": figures.get("config") or {"updated": {}, "not_described": {}}}
