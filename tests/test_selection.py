"""The selection math (fxprune/selection.py) against sorting, on random and tied scores."""
import pytest
import torch

from fxprune.selection import cut_k_smallest, keys_of, kth_key, prune_k_smallest, select_global


def _reference_k_smallest(scores, k):
    """Stable sort over the concatenation: ties go to the lowest global index."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[torch.sort(flat, stable=True).indices[:k]] = True
    return list(pruned.split([s.numel() for s in scores]))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 7, 500, 1999, 2000])
def test_prune_k_smallest_equals_stable_sort(ties, k):
    scores = [torch.rand(700), torch.rand(1300)]
    if ties:  # few distinct values: most of the selection is decided by the tie order
        scores = [(s * 5).floor() / 5 for s in scores]
    got = prune_k_smallest([keys_of(s) for s in scores], k)
    want = _reference_k_smallest(scores, k)
    assert sum(int(g.sum()) for g in got) == k
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_kth_key_matches_sorted_value():
    s = torch.rand(10_000) * 1e-30  # tiny floats: the low 16 bits decide
    for k in (1, 17, 5000, 10_000):
        key, n_less, n_equal = kth_key([keys_of(s)], k)
        value = torch.tensor([key], dtype=torch.int32).view(torch.float32).item()
        assert value == torch.sort(s).values[k - 1].item()
        assert n_less == int((s < value).sum()) and n_equal == [int((s == value).sum())]


def test_excluded_entries_are_never_chosen():
    s = torch.arange(100, dtype=torch.float32)
    excluded = s < 10  # the 10 lowest are excluded: the 5 lowest of the rest are 10..14
    pruned = prune_k_smallest([keys_of(s)], 5, [excluded])[0]
    assert pruned.nonzero().flatten().tolist() == [10, 11, 12, 13, 14]


def _water_fill(scores, weights, budget, lo, hi):
    """Brute force: add blocks in global (score, index) order, skipping a full layer, until the
    budget is spent, after forcing each layer's lo lowest."""
    n = len(scores)
    order = sorted(((float(s[j]), sum(x.numel() for x in scores[:i]) + j, i, j)
                    for i, s in enumerate(scores) for j in range(s.numel())))
    per_layer_rank = [torch.sort(s, stable=True).indices.tolist() for s in scores]
    pruned = [torch.zeros(s.numel(), dtype=torch.bool) for s in scores]
    for i in range(n):
        pruned[i][per_layer_rank[i][: lo[i]]] = True
    spent = sum(lo[i] * weights[i] for i in range(n))
    count = list(lo)
    for _, _, i, j in order:
        if pruned[i][j] or count[i] >= hi[i]:
            continue
        if spent + weights[i] > budget:
            break
        pruned[i][j] = True
        count[i] += 1
        spent += weights[i]
    return pruned


@pytest.mark.parametrize("weights", [(4, 4, 4), (3, 5, 2)])
def test_select_global_caps_and_floors_equal_water_filling(weights):
    scores = [torch.rand(40), torch.rand(30) * 0.3, torch.rand(50) + 0.5]
    total = sum(s.numel() * w for s, w in zip(scores, weights))
    lo, hi = [2, 0, 10], [35, 12, 45]  # layer 1 scores lowest but is capped at 12 blocks
    budget = int(0.6 * total)
    got = select_global(scores, weights, budget, lo, hi)
    want = _water_fill(scores, weights, budget, lo, hi)
    counts = [int(g.sum()) for g in got]
    assert counts[1] == 12 and counts[0] >= 2 and counts[2] >= 10
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    if len(set(weights)) == 1:  # uniform blocks: exactly budget // block weights
        assert sum(counts) == budget // weights[0]


def test_a_full_layer_does_not_end_the_walk_of_differing_blocks():
    # Layer 1 (5-weight blocks) scores lowest and reaches its cap of 2 blocks; its third block must
    # be passed over, not end the walk: the last weight of the budget goes to layer 0.
    scores = [torch.tensor([3.0, 0.5, 2.0]), torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0])]
    got = select_global(scores, [1, 5], 14, [2, 1], [3, 2])
    assert [g.nonzero().flatten().tolist() for g in got] == [[0, 1, 2], [1, 2]]
    assert torch.equal(got[0], _water_fill(scores, [1, 5], 14, [2, 1], [3, 2])[0])


def test_select_global_equals_water_filling_on_random_caps():
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        n = int(torch.randint(1, 5, (1,), generator=gen))
        sizes = torch.randint(1, 13, (n,), generator=gen).tolist()
        weights = torch.randint(1, 7, (n,), generator=gen).tolist()
        scores = [torch.randint(0, 4, (s,), generator=gen).float() for s in sizes]  # many ties
        hi = [int(torch.randint(0, s + 1, (1,), generator=gen)) for s in sizes]
        lo = [int(torch.randint(0, h + 1, (1,), generator=gen)) for h in hi]
        budget = int(torch.randint(0, sum(s * w for s, w in zip(sizes, weights)) + 1, (1,), generator=gen))
        got = select_global(scores, weights, budget, lo, hi)
        for g, w in zip(got, _water_fill(scores, weights, budget, lo, hi)):
            assert torch.equal(g, w)


def test_sampled_bracket_and_radix_select_agree_on_many_keys():
    # above the sampling threshold: the bracket path runs; the radix path is forced for reference
    scores = [torch.rand(700_000), (torch.rand(600_000) * 8).floor() / 8]  # the second one ties a lot
    keys = [keys_of(s) for s in scores]
    for k in (1, 123_457, 650_000, 1_299_999):
        assert kth_key(keys, k) == kth_key(keys, k, sample=False)


def test_lazy_scores_select_exactly_like_tensors():
    from fxprune.selection import LazyScores

    scores = [torch.rand(5000), (torch.rand(3000) * 4).floor()]
    lazy = [LazyScores(lambda s=s: s.clone(), s.shape) for s in scores]
    for k in (10, 4000, 7999):
        eager = prune_k_smallest([keys_of(s) for s in scores], k)
        got = prune_k_smallest([keys_of(s) for s in lazy], k)
        assert all(torch.equal(a, b) for a, b in zip(eager, got))
    got = select_global(lazy, [1, 1], 6000, [100, 0], [4000, 2500])
    want = select_global(scores, [1, 1], 6000, [100, 0], [4000, 2500])
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("k", [1, 333, 1000, 1500, 2000])
def test_a_cut_applied_in_parts_equals_the_whole_layer_mask(k):
    # few distinct values: the threshold is a tie that the parts must split in flat order
    gen = torch.Generator().manual_seed(k)
    scores = [(torch.rand(700, generator=gen) * 5).floor() / 5, (torch.rand(1300, generator=gen) * 5).floor() / 5]
    keys = [keys_of(s) for s in scores]
    cuts = cut_k_smallest(keys, k)
    assert k == 2000 or any(not c.all_ties for c in cuts)
    for cut, kk in zip(cuts, keys):
        whole = cut.pruned(kk)
        n = kk.numel()
        for bounds in ([0, n], [0, 1, 2, 100, 101, 650, n], list(range(0, n, 7)) + [n]):
            ties, parts = 0, []
            for a, b in zip(bounds, bounds[1:]):
                part, ties = cut.pruned_part(kk[a:b], ties)
                parts.append(part)
            assert torch.equal(torch.cat(parts), whole)
            if not cut.all_ties:
                assert ties == cut.ties


def test_sharded_cut_over_row_parts_equals_the_whole_selection():
    from fxprune.checkpoint.sharded import OneRank, sharded_cut
    gen = torch.Generator().manual_seed(0)
    scores = [(torch.rand(60, 10, generator=gen) * 7).floor() / 7, (torch.rand(40, 10, generator=gen) * 7).floor() / 7]
    keys = [keys_of(s).reshape(-1) for s in scores]
    for k in (1, 250, 500, 999):
        parts = {i: list(kk.split(130)) for i, kk in enumerate(keys)}
        assert sharded_cut(OneRank(), [0, 1], k, parts, {}) == cut_k_smallest(keys, k)


def test_row_pieces_cover_each_rank_share_in_order():
    from fxprune.checkpoint.sharded import row_pieces
    for rows, cols, world, limit in [(10, 4, 1, 100), (10, 4, 2, 9), (7, 3, 3, 1), (1, 8, 2, 4), (2816, 1024, 2, 1 << 24)]:
        shares = row_pieces(rows, cols, world, limit)
        assert len(shares) == world
        flat = [p for share in shares for p in share]
        assert [a for a, _ in flat] == [0] + [b for _, b in flat[:-1]] and flat[-1][1] == rows
        assert all(b > a and ((b - a) * cols <= limit or b - a == 1) for a, b in flat)
        sizes = [sum(b - a for a, b in share) for share in shares]   # even shares
        assert max(sizes) - min(sizes) <= 1
