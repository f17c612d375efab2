"""Atoms (removable channels) and their union-find, vectorised.

The channel analysis ties atoms together thousands of times per model (a residual add ties every
channel of its two inputs), so the union-find only records the ties as edge arrays; the classes
(connected components) are computed in numpy when asked for (:meth:`AtomSet.roots`), by
min-label hooking and pointer jumping. The root of a class is its smallest (oldest) atom.
"""
from __future__ import annotations

import math

import numpy as np


class AtomSet:
    """Union-find over atom ids (ints): record ties with ``union*``, read classes with ``roots``."""

    def __init__(self):
        self.size = 0
        self._edges: list[tuple[np.ndarray, np.ndarray]] = []
        self._roots: np.ndarray | None = np.zeros(0, dtype=np.int64)

    def new(self, shape) -> np.ndarray:
        """Fresh atoms, one per entry of ``shape``."""
        n = math.prod(shape) if isinstance(shape, (tuple, list)) else int(shape)
        start, self.size = self.size, self.size + n
        self._roots = None
        return np.arange(start, start + n, dtype=np.int64).reshape(shape)

    def union(self, a: int, b: int) -> None:
        self.union_arrays(np.array([a], dtype=np.int64), np.array([b], dtype=np.int64))

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie ``a[i]`` with ``b[i]`` for every i (same shape)."""
        a, b = np.asarray(a, dtype=np.int64).ravel(), np.asarray(b, dtype=np.int64).ravel()
        if a.size != b.size:
            raise ValueError(f"union_arrays needs arrays of one size, got {a.size} and {b.size}")
        if a.size:
            self._edges.append((a, b))
            self._roots = None

    def union_all(self, a: np.ndarray) -> None:
        """Tie every atom of ``a`` together."""
        flat = np.asarray(a, dtype=np.int64).ravel()
        if flat.size > 1:
            self._edges.append((np.full(flat.size - 1, flat[0]), flat[1:]))
            self._roots = None

    def union_rows(self, a: np.ndarray) -> None:
        """Tie the atoms of each row of ``a`` (its last axis) together, every row at once."""
        rows = np.asarray(a, dtype=np.int64)
        rows = rows.reshape(-1, rows.shape[-1]) if rows.ndim else rows.reshape(1, 1)
        if rows.shape[1] > 1 and rows.shape[0]:
            first = np.broadcast_to(rows[:, :1], (rows.shape[0], rows.shape[1] - 1))
            self._edges.append((first.ravel(), rows[:, 1:].ravel()))
            self._roots = None

    def roots(self) -> np.ndarray:
        """The root (smallest atom) of every atom's class, indexed by atom id."""
        if self._roots is None:
            self._roots = components(self.size, self._edges)
            if self._edges:  # later calls start from the classes found so far
                keep = np.flatnonzero(self._roots != np.arange(self.size))
                self._edges = [(keep, self._roots[keep])]
        return self._roots


def components(n: int, edges: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Connected components of ``n`` nodes: ``label[i]`` is the smallest node of i's component."""
    if not edges:
        return np.arange(n, dtype=np.int64)
    # worked in int32 where the ids fit (half the memory to write and fault in: the temporaries
    # are as large as the edge list), returned as int64
    dtype = np.int32 if n <= np.iinfo(np.int32).max else np.int64
    label = np.arange(n, dtype=dtype)
    u = np.concatenate([e[0] for e in edges], dtype=dtype, casting="same_kind")
    v = np.concatenate([e[1] for e in edges], dtype=dtype, casting="same_kind")
    lu, lv = u, v                       # the labels of the ends (each node its own at first)
    while True:
        differ = lu != lv
        if not differ.any():
            return label.astype(np.int64, copy=False)
        u, v, lu, lv = u[differ], v[differ], lu[differ], lv[differ]
        np.minimum.at(label, np.maximum(lu, lv), np.minimum(lu, lv))   # hook each root under the smaller one
        while True:                     # pointer jumping: every node points at its root again
            nxt = label[label]
            if np.array_equal(nxt, label):
                break
            label = nxt
        lu, lv = label[u], label[v]
