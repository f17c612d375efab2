"""Data-aware criteria (``activation`` = Wanda, ``sparse_gpt``) on a checkpoint: calibration token
ids, checked against the model's config before anything is written."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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


def prune_calibrated(job) -> None:
    raise ConfigError("data-aware criteria on checkpoints are not available yet")
