"""Coupled channel classes as arrays (fxprune/compaction/classes.py) and their selection: the
array walk must take exactly the classes the one-class-at-a-time greedy walk takes."""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from fxprune.compaction.classes import ChannelClasses, class_score, sorted_unique
from fxprune.compaction.plan import _select
from fxprune.selection import budget, ceil_budget


def _random_classes(rng: random.Random, n_layers: int):
    """Layers whose rows share roots at random: classes spanning layers, several rows of one
    layer in one class, classes of one row."""
    params = [f"layer{i}" for i in range(n_layers)]
    cols = [rng.choice((1, 3, 9, 16)) for _ in params]
    pool = rng.randrange(8, 40)
    roots = [np.array([rng.randrange(pool) for _ in range(rng.randrange(4, 24))], dtype=np.int64) for _ in params]
    sums = [np.array([rng.choice((0.0, 0.5, 1.0, rng.random())) for _ in r]) for r in roots]
    maxes = [s / 2 for s in sums]
    return ChannelClasses(params, cols, [0] * n_layers, roots, sums, maxes), cols, roots


def _one_at_a_time(targets, classes, free, group, target) -> set[int]:
    """The greedy walk written plainly: ranked classes one by one, lowest score first."""
    numel = {t.param: t.geometry.numel for t in targets}
    hi = {p: budget(group.max_sparsity_ratio_per_op, n) for p, n in numel.items()}
    lo = {p: ceil_budget(group.min_sparsity_ratio_per_op, n) for p, n in numel.items()}
    score = class_score(classes.score_sum, classes.score_max, classes.size, group.criterion_reduce_type)
    ranked = sorted(np.flatnonzero(free).tolist(), key=lambda k: (float(score[k]), k))
    weights = {k: {} for k in ranked}
    for k, layer, w in zip(classes.link_class.tolist(), classes.link_layer.tolist(), classes.link_weight.tolist()):
        if k in weights:
            weights[k][classes.params[layer]] = w
    pruned, chosen = dict.fromkeys(numel, 0), set()

    def take_if_fits(k):
        if any(pruned[p] + w > hi[p] for p, w in weights[k].items()):
            return False
        chosen.add(k)
        for p, w in weights[k].items():
            pruned[p] += w
        return True

    by_layer = {p: [(k, weights[k][p]) for k in ranked if p in weights[k]] for p in numel}
    for p in numel:
        for k, _ in by_layer[p]:
            if pruned[p] >= lo[p]:
                break
            if k not in chosen:
                take_if_fits(k)
    if group.pruning_scope == "local":
        for p in numel:
            goal = budget(target, numel[p])
            least = min((w for _, w in by_layer[p]), default=0)
            for k, w in by_layer[p]:
                if pruned[p] + least > goal:
                    break
                if k not in chosen and pruned[p] + w <= goal:
                    take_if_fits(k)
        return chosen
    left = budget(target, sum(numel.values())) - sum(pruned.values())
    for k in ranked:
        size = sum(weights[k].values())
        if k not in chosen and size <= left and take_if_fits(k):
            left -= size
    return chosen


@pytest.mark.parametrize("scope", ["local", "global"])
def test_array_walk_takes_what_the_one_at_a_time_walk_takes(scope):
    rng = random.Random(7 if scope == "local" else 8)
    capped = 0
    for case in range(300):
        classes, cols, roots = _random_classes(rng, rng.randrange(1, 5))
        targets = [SimpleNamespace(param=p, geometry=SimpleNamespace(numel=c * r.size))
                   for p, c, r in zip(classes.params, cols, roots)]
        group = SimpleNamespace(pruning_scope=scope, criterion_reduce_type=rng.choice(("mean", "sum", "max")),
                                max_sparsity_ratio_per_op=rng.choice((1.0, 0.98, 0.5, 0.3)),
                                min_sparsity_ratio_per_op=rng.choice((0.0, 0.0, 0.1, 0.3)))
        group.min_sparsity_ratio_per_op = min(group.min_sparsity_ratio_per_op, group.max_sparsity_ratio_per_op)
        free = np.array([rng.random() < 0.9 for _ in range(len(classes))], dtype=bool)
        target = rng.choice((0.1, 0.3, 0.5, 0.7, 0.9))
        expected = _one_at_a_time(targets, classes, free, group, target)
        taken = _select(targets, classes, free, group, target)
        assert set(np.flatnonzero(taken).tolist()) == expected, case
        capped += group.max_sparsity_ratio_per_op < target
    assert capped > 30  # the caps bind in many cases: the walk's one-at-a-time part is exercised


def test_classes_are_numbered_by_first_appearance_with_their_rows_and_weights():
    # layer a rows -> roots 5 5 2; layer b rows -> roots 2 9
    classes = ChannelClasses(["a", "b"], [3, 4], [0, 1], [np.array([5, 5, 2]), np.array([2, 9])],
                             [np.array([1.0, 2.0, 4.0]), np.array([8.0, 16.0])],
                             [np.array([1.0, 2.0, 4.0]), np.array([8.0, 16.0])])
    assert classes.roots.tolist() == [5, 2, 9] and list(classes) == [5, 2, 9]
    assert classes.size.tolist() == [6, 3 + 4, 4]
    assert classes.score_sum.tolist() == [3.0, 12.0, 16.0] and classes.score_max.tolist() == [2.0, 8.0, 16.0]
    assert classes.group.tolist() == [0, -1, 1] and classes.several_groups() == {1: [0, 1]}
    assert {p: r.tolist() for p, r in classes.rows(np.array([False, True, True])).items()} == {"a": [2], "b": [0, 1]}
    assert 9 in classes and 7 not in classes and classes.index(np.array([9, 7, 5])).tolist() == [2, -1, 0]
    assert classes.scores({0: "sum", 1: "max"}).tolist() == [3.0, 12.0 / 7, 16.0]


def test_kept_rows_cover_every_target_including_layers_without_classes():
    """A plan's row keep flags: the rows of removed classes go, every other row stays, and a
    target with no class at all (its output is not followed by the analysis) keeps all rows."""
    from fxprune.compaction.plan import CompactionPlan
    roots = [np.array([0, 1, 0, 2]), np.array([1, 3, 3])]
    sums = [np.ones(4), np.ones(3)]
    classes = ChannelClasses(["a", "b"], [1, 1], [0, 0], roots, sums, [s / 2 for s in sums])
    plan = CompactionPlan(None, classes, {}, {0, 3}, {})
    targets = [SimpleNamespace(param=p, geometry=SimpleNamespace(view_shape=(rows, 5)))
               for p, rows in (("a", 4), ("b", 3), ("outside", 6))]
    kept = plan.kept_rows(targets)
    assert kept["a"].tolist() == [False, True, False, True]
    assert kept["b"].tolist() == [True, False, False]
    assert kept["outside"].tolist() == [True] * 6


def test_sorted_unique_is_numpy_unique():
    rng = np.random.default_rng(0)
    for size in (0, 1, 2, 7, 500):
        for high in (1, 4, 1000):
            values = rng.integers(-3, high, size)
            expected = np.unique(values)
            got = sorted_unique(values)
            assert got.dtype == expected.dtype and got.tolist() == expected.tolist()
    assert sorted_unique(np.array([[3, 1], [1, 3]])).tolist() == [1, 3]   # any shape, flattened


def test_row_stats_are_the_float64_row_sums_and_maxes_with_or_without_the_shared_buffer():
    import torch

    from fxprune.compaction import plan
    from fxprune.selection import LazyScores

    torch.manual_seed(0)
    big = torch.randn(plan.ROW_STATS_BLOCK // 96 * 3 + 5, 96).abs()   # several blocks, the last partial
    strided = torch.randn(64, 40).abs().t()                            # not contiguous: no buffer
    lazy = LazyScores(lambda: big, big.shape, big.device, rows=lambda a, b: big[a:b])
    buffer = torch.full((plan.ROW_STATS_BLOCK,), float("nan"), dtype=torch.float64)
    results = []
    for scores, dense in ((big, big), (strided, strided), (lazy, big)):
        expect = (dense.double().sum(dim=1).numpy(), dense.amax(dim=1).double().numpy())
        for got in (plan._row_stats(scores), plan._row_stats(scores, buffer)):
            assert np.array_equal(got[0], expect[0]) and np.array_equal(got[1], expect[1])
        results.append((got, expect))
        if scores is big:   # the rows went through the buffer (its NaN overwritten)
            assert not torch.isnan(buffer[:plan.ROW_STATS_BLOCK // 96 * 96]).any()
    for got, expect in results:   # each result its own: not overwritten by the later layers'
        assert np.array_equal(got[0], expect[0]) and np.array_equal(got[1], expect[1])
