"""Data-aware criteria (``activation`` = Wanda, ``sparse_gpt``) on a checkpoint: calibration token
ids, checked against the model's config before anything is written."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .shards import CheckpointError

# config keys that bound the sequence length, by model family
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def load_calibration(calibration: Any, hf_config, groups) -> list[torch.Tensor]:
    """Batches of token ids ``[batch, seq]`` (int64) from a tensor, a list of tensors or a ``.pt``
    file holding either; checked against the vocabulary and the longest sequence the model takes."""
    where = "calibration"
    if calibration is None:
        names = ", ".join(f"{g.where} ({g.pruning_type})" for g in groups)
        raise ConfigError(f"{names} scores from calibration data; pass calibration=token ids "
                          f"(CLI: --calibration ids.pt, a [N, seq] tensor of token ids)")
    if isinstance(calibration, (str, Path)):
        path = Path(calibration)
        where = f"calibration file {path}"
        if not path.is_file():
            raise CheckpointError(f"{where} does not exist")
        try:
            calibration = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:
            raise CheckpointError(f"{where} could not be loaded ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); "
                                  f"save token ids with torch.save(ids, path)") from None
    batches = [calibration] if isinstance(calibration, torch.Tensor) else calibration
    if not isinstance(batches, (list, tuple)) or not batches:
        raise CheckpointError(f"{where} holds {type(calibration).__name__}; expected a [N, seq] "
                              f"tensor of token ids or a non-empty list of them")
    vocab = getattr(hf_config, "vocab_size", None)
    saved = hf_config.to_dict()  # the keys as config.json spells them (GPT-2: n_positions)
    max_key = next((k for k in _MAX_LEN_KEYS if isinstance(saved.get(k), int)), None)
    max_len = saved[max_key] if max_key else None
    out = []
    for i, ids in enumerate(batches):
        item = f"{where}, batch {i}"
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise CheckpointError(f"{item} is {getattr(ids, 'dtype', type(ids).__name__)}; token ids "
                                  f"are an integer tensor [N, seq]")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.numel() == 0:
            raise CheckpointError(f"{item} has shape {list(ids.shape)}; expected [N, seq] token ids")
        if max_len is not None and ids.shape[1] > max_len:
            raise CheckpointError(f"{item} has sequences of {ids.shape[1]} tokens; the model takes at "
                                  f"most {max_len} ({max_key} in config.json); cut them shorter")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (vocab is not None and high >= vocab):
            raise CheckpointError(f"{item} holds token ids in [{low}, {high}]; the vocabulary is "
                                  f"[0, {vocab}) (vocab_size in config.json)")
        out.append(ids.long())
    return out


def check_block_sequential(job) -> None:
    """Every data-aware group must run block by block (a checkpoint is never whole in memory), and
    the config may not mix them with magnitude groups (those stream layer by layer separately)."""
    from ..passes.sequential import plan

    if job.plain_groups:
        g = job.plain_groups[0]
        raise ConfigError(f"{g.where}: a checkpoint config mixes {g.pruning_type!r} with data-aware "
                          f"groups; prune a checkpoint with one kind per run (e.g. magnitude "
                          f"first, then activation/sparse_gpt on its output)")
    block_plan = plan(job.ctx)
    if block_plan.blocks is None or block_plan.whole_model:
        why = "; ".join(f"pruning_configs[{i}]: {r}" for i, r in block_plan.whole_model.items())
        raise ConfigError(f"on a checkpoint, activation/sparse_gpt run one decoder block at a time, "
                          f"and {why or 'no group can'}; use local scope (pruning_scope: local) on the layers inside the "
                          f"blocks (lm_head stays dense)")
    job.block_plan = block_plan


def prune_calibrated(job) -> None:
    """The block-sequential pass over the skeleton: each block's weights are read from the shards
    just before it runs, and written to the output and released right after it is pruned. The
    parameters outside the blocks (embeddings, final norm, lm_head) are loaded for the whole run."""
    from ..passes.sequential import BlockSequentialPass

    ctx, blocks = job.ctx, job.block_plan.blocks
    in_blocks = {id(p) for p in blocks.modules.parameters()}
    _load(job, ctx.model, "", skip=in_blocks)
    targets_of: dict[int, list] = {}
    for t in ctx.selected():
        targets_of.setdefault(blocks.index_of(t.param), []).append(t)

    def on_block_start(index: int, name: str, block: nn.Module) -> None:
        _load(job, block, name + ".")

    def on_block_end(index: int, name: str, block: nn.Module) -> None:
        for t in targets_of.get(index, []):
            job.write_block_target(t, ctx.model.get_parameter(t.param).detach(), ctx.masks.pop(t.param, None))
        _release(block)   # the runner then hands the freed memory back (release_free_memory)

    ctx.calibration = job.calibration
    ctx.on_block_start, ctx.on_block_end = on_block_start, on_block_end
    ctx.progress = job.progress
    try:
        BlockSequentialPass()(ctx)
    finally:
        _release(ctx.model)


def _load(job, module: nn.Module, prefix: str, skip=frozenset()) -> None:
    """Read ``module``'s parameters (and saved buffers) from the shards; tied ones once."""
    loaded: dict[int, nn.Parameter] = {}
    for owner_name, owner in module.named_modules(prefix=prefix.rstrip(".")):
        for attr, p in list(owner._parameters.items()):
            if p is None or id(p) in skip:
                continue
            if id(p) in loaded:
                owner._parameters[attr] = loaded[id(p)]
                continue
            full = f"{owner_name}.{attr}" if owner_name else attr
            key = job.keys.find([full, *job.aliases_of(full)])
            if key is None:
                raise CheckpointError(f"{job.src}: the shards hold no tensor {full!r}, which the "
                                      f"model of config.json has")
            value = nn.Parameter(job.shards.read(key), requires_grad=False)
            loaded[id(p)] = owner._parameters[attr] = value
        for attr, b in list(owner._buffers.items()):
            full = f"{owner_name}.{attr}" if owner_name else attr
            key = job.keys.find([full]) if b is not None else None
            if key is not None:
                owner._buffers[attr] = job.shards.read(key)


def _release(module: nn.Module) -> None:
    """Back to the meta device: the values are in the output shards now."""
    for owner in module.modules():
        for attr, p in list(owner._parameters.items()):
            if p is not None and not p.is_meta:
                owner._parameters[attr] = nn.Parameter(p.to("meta"), requires_grad=False)
