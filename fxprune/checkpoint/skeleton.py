"""The model of a checkpoint directory without its weights, and where its weights live in the shards.

The skeleton is built from ``config.json`` (``AutoModelForCausalLM.from_config``) with every
parameter on the meta device: no memory, no initialisation cost. Buffers are created for real,
since the non-persistent ones (rotary ``inv_freq``...) are computed in ``__init__`` and never
saved. The skeleton is captured and its targets discovered and attached by the same passes as
``fxprune.transform``, so the targets, their order and the config's semantics (``op_names``,
``excluded_op_names``, the last linear layer, tied weights, HF ``Conv1D``) are the in-memory ones.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .shards import CheckpointError, ShardSet

CONFIG_FILE = "config.json"
EXAMPLE_SEQ_LEN = 8   # token ids the skeleton is captured with; the graph does not depend on it


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Parameters registered inside the block are moved to the meta device as they are created
    (buffers stay real). Large ``torch.empty`` storages are never touched, so never resident."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param) -> None:
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_config(directory: Path):
    """The transformers config of ``directory`` (a local directory; nothing is downloaded)."""
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; pass a Hugging Face model directory "
                              f"(config.json and safetensors shards)")
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a Hugging Face model directory: it has no "
                              f"{CONFIG_FILE}; save the model with save_pretrained()")
    try:
        json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: transformers cannot read it ({type(e).__name__}: "
                              f"{_first_line(e)}); check model_type and the transformers version") from None


def build_skeleton(config) -> nn.Module:
    """``AutoModelForCausalLM.from_config(config)`` with meta parameters, in eval mode."""
    from transformers import AutoModelForCausalLM
    try:
        with empty_parameters():
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise CheckpointError(f"{CONFIG_FILE}: AutoModelForCausalLM cannot build model_type "
                              f"{getattr(config, 'model_type', '?')!r} ({type(e).__name__}: "
                              f"{_first_line(e)}); fxprune prunes causal language models") from None
    return model.eval()


def example_inputs(config) -> tuple[torch.Tensor]:
    return (torch.zeros(1, EXAMPLE_SEQ_LEN, dtype=torch.long),)


class KeyMap:
    """Model parameter names -> checkpoint tensor names. Checkpoints may store names without the
    base model's prefix (``h.0.attn...`` for ``transformer.h.0.attn...``) or with it, and a tied
    weight under any of its names."""

    def __init__(self, shards: ShardSet, prefix: str):
        self.shards, self.prefix = shards, prefix

    def candidates(self, name: str) -> list[str]:
        out = [name]
        if self.prefix:
            head = self.prefix + "."
            out.append(name[len(head):] if name.startswith(head) else head + name)
        return out

    def find(self, names: list[str]) -> str | None:
        for name in names:
            for key in self.candidates(name):
                if key in self.shards:
                    return key
        return None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else "(no message)"
