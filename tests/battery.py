"""Harness of the bad-input battery (``test_battery.py``): the state a failed call must leave
untouched, and the shape of the error it must raise.

A case runs in a fresh directory holding only its input files. After the error:

- the error is the declared type (an ``fxprune.FxPruneError``), its message matches the culprit
  (the key, layer, file or user class) and spans at most ``MAX_LINES`` lines;
- the caller's model is bit-identical: every parameter and buffer (bytes, dtype, device, the
  parameter objects themselves, ``requires_grad`` and ``.grad``), every module's training flag
  and attributes, and every hook (module forward/backward hooks, tensor hooks on parameters);
- the registries of patterns and criteria are as before;
- the directory holds exactly the files it held before, byte for byte: nothing half-written.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import fxprune

MAX_LINES = 2

_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                 "_state_dict_hooks", "_load_state_dict_pre_hooks")


@dataclass
class Bad:
    """One bad input: ``call(model, dir)`` must raise ``error`` with a message matching ``names``."""

    id: str
    call: Callable[[Any, Path], Any]
    error: type
    names: str                                     # regex, re.search'ed in the message
    model: Callable[[], Any] = None                # None: the small MLP
    files: dict[str, Any] = field(default_factory=dict)   # name -> str / bytes / callable(path)
    register: Callable[[], None] | None = None     # registers user extensions before the snapshot


def tensor_bytes(t: torch.Tensor) -> Any:
    if t.is_meta:
        return ("meta", tuple(t.shape), t.dtype)
    flat = t.detach().cpu().contiguous().reshape(-1)
    return (tuple(t.shape), t.dtype, str(t.device), flat.view(torch.uint8).clone() if flat.numel() else b"")


def model_state(model) -> dict:
    if not isinstance(model, nn.Module):
        return {"object": repr(model)}
    state = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        hooks = len(p._backward_hooks or {}) + len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
        state[f"param {name}"] = (id(p), p.requires_grad, tensor_bytes(p),
                                  None if p.grad is None else tensor_bytes(p.grad), hooks)
    for name, b in model.named_buffers(remove_duplicate=False):
        state[f"buffer {name}"] = (id(b), tensor_bytes(b))
    for name, m in model.named_modules(remove_duplicate=False):
        state[f"module {name}"] = (type(m), m.training, sorted(vars(m)),
                                   tuple(len(getattr(m, h)) for h in _MODULE_HOOKS))
    return state


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys(), set(before) ^ set(after)
    for key in before:
        a, b = before[key], after[key]
        assert _same(a, b), f"{key} changed"


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def files_state(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` (hidden ones too), files with their hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if "__pycache__" in rel:
            continue
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def registries() -> tuple[dict, dict]:
    return dict(fxprune.PATTERNS), dict(fxprune.CRITERIA)


def write_files(root: Path, files: dict[str, Any]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def check_message(message: str, names: str) -> None:
    assert re.search(names, message), f"{names!r} not in: {message}"
    assert len(message.splitlines()) <= MAX_LINES, f"{len(message.splitlines())} lines: {message}"
    assert "Traceback" not in message and "\x1b[" not in message, message
