"""The safetensors shards of a Hugging Face model directory, read and rewritten one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header (dtype, shape and byte
range of every tensor) and the raw bytes. Tensors are read with ``readinto`` into a fresh buffer,
not through a memory map: pages of a mapped file count in the process's resident memory while
mapped, and a pruning run reads every weight, so a map would make the peak RSS the model's size.

Pruning keeps every tensor's dtype and shape, so a pruned shard has the source's header byte for
byte: the output shard starts as a copy of the source (``copyfile``: kernel-side, no user
memory) and each pruned weight is written over its own byte range.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FxPruneError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype codes torch reads (the float ones are the prunable ones)
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
PRUNABLE_DTYPES = ("F64", "F32", "F16", "BF16")


class CheckpointError(FxPruneError):
    """The model directory or one of its shards is not what fxprune can prune."""


@dataclass(frozen=True)
class TensorEntry:
    key: str
    file: Path                  # the shard that holds it
    dtype: str                  # safetensors code ("BF16")
    shape: tuple[int, ...]
    begin: int                  # absolute byte offsets in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def rows(self) -> int:
        """Length of the first dimension (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return (self.end - self.begin) // self.rows if self.rows else 0


class ShardSet:
    """Every tensor of a model directory's safetensors weights: sharded (``model.safetensors.index.json``
    and the shards it names) or one ``model.safetensors``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e}); "
                                      f"it should hold a 'weight_map' of tensor name -> shard file") from None
            self.index_file: Path | None = index
            files = list(dict.fromkeys(weight_map.values()))
        elif (self.directory / SINGLE_FILE).is_file():
            self.index_file, weight_map, files = None, None, [SINGLE_FILE]
        else:
            others = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.safetensors"))
            hint = (f"it holds {', '.join(others[:3])}; save it with save_pretrained(..., "
                    f"safe_serialization=True)") if others else "save the model with save_pretrained()"
            raise CheckpointError(f"{self.directory} has no {INDEX_FILE} nor {SINGLE_FILE}: fxprune "
                                  f"prunes safetensors checkpoints; {hint}")
        self.files = [self.directory / name for name in files]
        self.entries: dict[str, TensorEntry] = {}
        for path in self.files:
            if not path.is_file():
                raise CheckpointError(f"shard {path.name} named in {INDEX_FILE} is missing from "
                                      f"{self.directory}; copy it there or re-save the model")
            for entry in _read_header(path):
                self.entries[entry.key] = entry
        if weight_map is not None:
            for key, name in weight_map.items():
                entry = self.entries.get(key)
                if entry is None or entry.file.name != name:
                    raise CheckpointError(f"{INDEX_FILE} maps {key!r} to {name}, which does not hold "
                                          f"it; the index and the shards do not match")

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key``, read into fresh memory."""
        entry = self.entries[key]
        return self._read(entry, entry.begin, entry.end).reshape(entry.shape)

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the tensor ``key`` (its first dimension), read into fresh
        memory: a row range is one contiguous byte range of the shard."""
        entry = self.entries[key]
        row = entry.row_bytes
        return self._read(entry, entry.begin + start * row, entry.begin + stop * row).reshape(
            stop - start, *entry.shape[1:])

    @staticmethod
    def _read(entry: TensorEntry, begin: int, end: int) -> torch.Tensor:
        dtype = DTYPES.get(entry.dtype)
        if dtype is None:
            raise CheckpointError(f"{entry.file.name}: tensor {entry.key!r} has dtype {entry.dtype!r}, "
                                  f"which torch cannot read")
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with open(entry.file, "rb") as f:
            f.seek(begin)
            if f.readinto(buffer.numpy()) != buffer.numel():
                raise CheckpointError(f"{entry.file.name} is truncated: tensor {entry.key!r} ends past "
                                      f"the end of the file; re-copy the shard")
        return buffer.view(dtype)


def _read_header(path: Path) -> list[TensorEntry]:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} is past the end of the file")
            header = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a safetensors file ({e}); re-save or re-copy it") from None
    start = 8 + length
    out = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if start + end > size:
            raise CheckpointError(f"{path.name} is truncated: tensor {key!r} ends past the end of "
                                  f"the file; re-copy the shard")
        out.append(TensorEntry(key, path, info["dtype"], tuple(info["shape"]), start + begin, start + end))
    return out


class ShardWriter:
    """The output shards: the source's bytes, with pruned tensors written over their own ranges.

    Each output shard is laid out like its source (same header, same offsets). The header and
    every tensor that will not be rewritten are copied by the kernel (``copy_file_range``); the
    ranges of the tensors in ``rewritten`` are left as holes until :meth:`write` fills them.
    ``files``: the shard files to write (default all; one rank's share when several processes
    write); ``index``: whether to copy the index file too."""

    def __init__(self, shards: ShardSet, out_dir: Path, rewritten: set[str] = frozenset(),
                 files=None, index: bool = True):
        self.shards, self.out_dir = shards, out_dir
        self.pending = set(rewritten)
        by_file: dict[Path, list[TensorEntry]] = {}
        for entry in shards.entries.values():
            by_file.setdefault(entry.file, []).append(entry)
        for path in shards.files:
            if files is not None and path not in files:
                continue
            keep = sorted((e for e in by_file.get(path, []) if e.key not in rewritten),
                          key=lambda e: e.begin)
            first = min((e.begin for e in by_file.get(path, [])), default=path.stat().st_size)
            with open(path, "rb") as src, open(out_dir / path.name, "wb") as dst:
                ranges = [(0, first)] + [(e.begin, e.end) for e in keep]
                for begin, end in ranges:
                    _copy_range(src, dst, begin, end)
                dst.truncate(path.stat().st_size)
        if index and shards.index_file is not None:
            shutil.copyfile(shards.index_file, out_dir / shards.index_file.name)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        entry = self.shards.entries[key]
        if DTYPES[entry.dtype] != tensor.dtype or entry.shape != tuple(tensor.shape):
            raise FxPruneError(f"internal: {key} would change from {entry.dtype} {entry.shape} to "
                               f"{tensor.dtype} {tuple(tensor.shape)}")
        self._write(entry, entry.begin, tensor)
        self.pending.discard(key)

    def write_rows(self, key: str, start: int, rows: torch.Tensor, last: bool) -> None:
        """Rows ``start...`` of the tensor ``key`` (``rows``: some of its first-dimension rows);
        ``last``: the tensor's final piece (every row is then written)."""
        entry = self.shards.entries[key]
        if DTYPES[entry.dtype] != rows.dtype or entry.shape[1:] != tuple(rows.shape[1:]) \
                or start + rows.shape[0] > entry.rows:
            raise FxPruneError(f"internal: rows {start}+{rows.shape[0]} of {key} ({entry.dtype} "
                               f"{entry.shape}) given as {rows.dtype} {tuple(rows.shape)}")
        self._write(entry, entry.begin + start * entry.row_bytes, rows)
        if last:
            self.pending.discard(key)

    def _write(self, entry: TensorEntry, offset: int, tensor: torch.Tensor) -> None:
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        with open(self.out_dir / entry.file.name, "r+b") as f:
            f.seek(offset)
            f.write(data.numpy().data)

    def finish(self) -> None:
        """Every tensor announced as rewritten was written (else its bytes would be a hole)."""
        if self.pending:
            raise FxPruneError(f"internal: {len(self.pending)} pruned tensors were never written, "
                               f"e.g. {sorted(self.pending)[:3]}")


def _copy_range(src, dst, begin: int, end: int) -> None:
    """Bytes [begin, end) of ``src`` to the same offsets of ``dst``, without passing through Python."""
    while begin < end:
        try:
            n = os.copy_file_range(src.fileno(), dst.fileno(), end - begin, begin, begin)
        except (AttributeError, OSError):  # no copy_file_range (platform, file system): copy in chunks
            src.seek(begin)
            dst.seek(begin)
            n = dst.write(src.read(min(end - begin, 64 << 20)))
        if n <= 0:
            raise CheckpointError(f"{Path(src.name).name} ended early while copying it")
        begin += n
