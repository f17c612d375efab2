"""The vectorised union-find of the channel analysis against a plain one."""
import random

import numpy as np

from fxprune.compaction.atoms import AtomSet, components


def _reference(n, pairs):
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


def test_components_match_a_plain_union_find():
    rng = random.Random(0)
    for n in (1, 2, 17, 300):
        for _ in range(20):
            pairs = [(rng.randrange(n), rng.randrange(n)) for _ in range(rng.randrange(2 * n))]
            edges = [(np.array([a for a, _ in pairs], dtype=np.int64),
                      np.array([b for _, b in pairs], dtype=np.int64))] if pairs else []
            assert np.array_equal(components(n, edges), _reference(n, pairs))


def test_atom_set_roots_are_the_oldest_atom_and_follow_later_unions():
    atoms = AtomSet()
    a, b, c = atoms.new(4), atoms.new((2, 2)), atoms.new(3)
    atoms.union_arrays(a, b)            # a[i] ~ b.flat[i]
    atoms.union_all(c)                  # c together
    roots = atoms.roots()
    assert roots.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 8, 8, 8]
    atoms.union(10, 3)                  # after roots(): a later union still counts
    atoms.union(b[0, 0], b[1, 1])       # 4 ~ 7, so 0 ~ 3
    assert atoms.roots().tolist() == [0, 1, 2, 0, 0, 1, 2, 0, 0, 0, 0]
    d = atoms.new(2)                    # new atoms after roots() are their own class
    assert atoms.roots()[d].tolist() == [11, 12]


def test_long_chains_resolve():
    atoms = AtomSet()
    x = atoms.new(10_000)
    atoms.union_arrays(x[1:], x[:-1])   # a chain: every atom with its predecessor
    assert (atoms.roots() == 0).all()


def test_union_rows_ties_each_row_as_union_all_does():
    rng = np.random.default_rng(0)
    for shape in ((5, 4), (3, 1), (1, 6), (2, 3, 4), (0, 3)):
        one, rows = AtomSet(), AtomSet()
        for s in (one, rows):
            s.new(60)
        arr = rng.integers(0, 60, size=shape)
        for row in arr.reshape(-1, shape[-1]):
            one.union_all(row)
        rows.union_rows(arr)
        assert np.array_equal(one.roots(), rows.roots()), shape


def test_classes_rank_by_score_then_order_as_a_sort_does():
    """Channel selection ranks classes with one numpy sort: the order of Python's sort on
    (score, order), ties and the mean's float division included."""
    from fxprune.compaction.classes import class_score, ranked

    rng = random.Random(1)
    sizes, sums, maxes = [], [], []
    for _ in range(400):
        sizes.append(sum(rng.choice((3, 6, 9)) for _ in range(rng.randrange(1, 4))))
        sums.append(rng.choice((0.5, 1.0, 1.0, 2.25, rng.random())))
        maxes.append(rng.choice((0.5, sums[-1])))
    candidates = np.array(sorted(rng.sample(range(400), 300)))
    python_score = {"sum": lambda k: sums[k], "max": lambda k: maxes[k],
                    "mean": lambda k: sums[k] / max(sizes[k], 1)}
    for reduce_type in ("mean", "sum", "max"):
        score = class_score(np.array(sums), np.array(maxes), np.array(sizes), reduce_type)
        expected = sorted(candidates.tolist(), key=lambda k: (python_score[reduce_type](k), k))
        assert ranked(score, candidates).tolist() == expected
