"""Coupled channel classes as arrays (:class:`ChannelClasses`), their scores and ranking.

The channel analysis merges the channels that must be removed together into classes (see
:mod:`.plan`); a mid-size CNN has thousands, so they are held as arrays, one entry per class, per
(class, layer) *link* and per layer row, and scored, ranked and selected with array operations.
"""
from __future__ import annotations

import numpy as np


class ChannelClasses:
    """The coupled channel classes of some layers, as arrays: a mid-size CNN has thousands, and one
    Python object each would cost more than selecting them.

    Class ``k`` is numbered by first appearance (layers in order, rows in order); the number
    also breaks score ties. A *link* is one (class, layer) pair: the rows of that layer the class
    holds. ``len``, ``in`` (a root) and iteration (the roots, in class order) work as on a dict
    keyed by root.
    """

    def __init__(self, params, cols, layer_groups, layer_roots, sums=None, maxes=None):
        """``params``: the layers, in order; ``cols``: each one's weights per row;
        ``layer_groups``: each one's pruning group index (-1: none); ``layer_roots``: each one's
        row roots; ``sums`` / ``maxes``: each one's row score sums and maxes (or None)."""
        self.params = tuple(params)
        sizes = np.array([r.size for r in layer_roots], dtype=np.int64)
        n_layers = len(self.params)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])     # layer l's rows: entries offsets[l]:offsets[l+1]
        entry_root = np.concatenate(layer_roots) if n_layers else np.zeros(0, dtype=np.int64)
        uniq, first_row, inverse = np.unique(entry_root, return_index=True, return_inverse=True)
        by_order = np.argsort(first_row, kind="stable")             # class ids in order of first appearance
        rank = np.empty_like(by_order)
        rank[by_order] = np.arange(by_order.size)
        self.entry_class = rank[inverse.ravel()]                    # each row's class
        self.roots = uniq[by_order]
        n = self.roots.size
        self.score_sum, self.score_max = np.zeros(n), np.zeros(n)
        if sums is not None and n:
            np.add.at(self.score_sum, self.entry_class, np.concatenate(sums))   # in entry order
            np.maximum.at(self.score_max, self.entry_class, np.concatenate(maxes))
        entry_layer = np.repeat(np.arange(n_layers, dtype=np.int64), sizes)
        by_class = np.argsort(self.entry_class, kind="stable")     # rows by class, then layer (rows are layer by layer)
        cls, layer = self.entry_class[by_class], entry_layer[by_class]
        link_row = np.flatnonzero(np.diff(cls, prepend=-1) | np.diff(layer, prepend=-1))   # each link's first row
        self.link_class, self.link_layer = cls[link_row], layer[link_row]   # links by class, then layer
        self.link_rows = np.diff(link_row, append=cls.size)
        self.link_weight = self.link_rows * np.asarray(cols, dtype=np.int64)[self.link_layer] if n_layers \
            else np.zeros(0, dtype=np.int64)
        self.link_start = np.searchsorted(self.link_class, np.arange(n + 1))   # class k: links link_start[k]:[k+1]
        self.size = np.add.reduceat(self.link_weight, self.link_start[:-1]) if n else np.zeros(0, dtype=np.int64)
        # the groups of each class's layers: one (the class's group), none or several (-1)
        link_group = np.asarray(layer_groups, dtype=np.int64)[self.link_layer] if n_layers else self.link_layer
        pair = sorted_unique(self.link_class[link_group >= 0] * _GROUP_SPAN + link_group[link_group >= 0])
        self.pair_class, self.pair_group = np.divmod(pair, _GROUP_SPAN)   # (class, group), sorted
        per_class = np.bincount(self.pair_class, minlength=n)
        self.group = np.full(n, -1, dtype=np.int64)
        single = per_class[self.pair_class] == 1
        self.group[self.pair_class[single]] = self.pair_group[single]
        self._index = None

    def __len__(self) -> int:
        return self.roots.size

    def __iter__(self):
        return iter(self.roots.tolist())

    def __contains__(self, root) -> bool:
        return bool(self.index(np.array([root], dtype=np.int64))[0] >= 0)

    def index(self, roots: np.ndarray) -> np.ndarray:
        """The class of each root in ``roots`` (-1: not a class's)."""
        roots = np.asarray(roots, dtype=np.int64)
        if not self.roots.size:
            return np.full(roots.shape, -1, dtype=np.int64)
        if self._index is None:
            self._index = np.argsort(self.roots)
        found = self._index[np.minimum(np.searchsorted(self.roots, roots, sorter=self._index), self.roots.size - 1)]
        return np.where(self.roots[found] == roots, found, -1)

    def links_of(self, chosen: np.ndarray) -> np.ndarray:
        """The links of classes ``chosen`` (class numbers), class after class."""
        count = self.link_start[chosen + 1] - self.link_start[chosen]
        return np.repeat(self.link_start[chosen] - np.cumsum(count) + count, count) + np.arange(count.sum())

    def member(self, roots) -> np.ndarray:
        """Whether each class's root is in ``roots`` (bool over classes)."""
        out = np.zeros(len(self), dtype=bool)
        k = self.index(np.fromiter(roots, dtype=np.int64))
        out[k[k >= 0]] = True
        return out

    def in_group(self, group: int) -> np.ndarray:
        """Whether each class has a layer in pruning group ``group``."""
        out = np.zeros(len(self), dtype=bool)
        out[self.pair_class[self.pair_group == group]] = True
        return out

    def several_groups(self) -> dict[int, list[int]]:
        """Class -> the pruning groups of its layers, for the classes whose layers are in more than one."""
        several = np.bincount(self.pair_class, minlength=len(self))[self.pair_class] > 1
        out: dict[int, list[int]] = {}
        for k, g in zip(self.pair_class[several].tolist(), self.pair_group[several].tolist()):
            out.setdefault(k, []).append(g)
        return out

    def scores(self, reduce_types: dict[int, str]) -> np.ndarray:
        """Each class's score under its group's ``criterion_reduce_type`` (mean without one)."""
        out = class_score(self.score_sum, self.score_max, self.size, "mean")
        for group, reduce_type in reduce_types.items():
            if reduce_type != "mean":
                mine = self.group == group
                out[mine] = class_score(self.score_sum, self.score_max, self.size, reduce_type)[mine]
        return out

    def rows(self, chosen: np.ndarray) -> dict[str, np.ndarray]:
        """param -> the rows of its 2-D view that the ``chosen`` classes (bool over classes) hold."""
        hit = chosen[self.entry_class]
        return {p: np.flatnonzero(hit[a:b]) for p, a, b in zip(self.params, self.offsets[:-1].tolist(),
                                                                 self.offsets[1:].tolist())}


_GROUP_SPAN = 1 << 20   # packs (class, group) into one int64 key; far more pruning groups than any config has


def class_score(score_sum: np.ndarray, score_max: np.ndarray, size: np.ndarray, reduce_type: str) -> np.ndarray:
    """Classes' scores under ``criterion_reduce_type``: the sum, the max, or the mean over the
    weights each masks (a float division, as ``sum / max(size, 1)`` in Python)."""
    if reduce_type == "sum":
        return score_sum.copy()
    if reduce_type == "max":
        return score_max.copy()
    return score_sum / np.maximum(size, 1)


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """The distinct values of an integer array, increasing: ``np.unique(values)`` by one sort
    (``np.unique`` without indices imports ``numpy.ma`` on first use, about 12 ms of a cold run)."""
    values = np.sort(values, axis=None)
    if values.size < 2:
        return values
    return values[np.concatenate(([True], values[1:] != values[:-1]))]


def ranked(score: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``candidates`` (class numbers, increasing) by ``(score, number)``, lowest first."""
    return candidates[np.argsort(score[candidates], kind="stable")]
