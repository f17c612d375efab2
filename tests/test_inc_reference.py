"""Sanity tests of the INC reference itself (pure torch, no fxprune)."""
import math

import pytest
import torch

try:
    from inc_reference import inc_masks
except ImportError:  # tests/ imported as a package
    from tests.inc_reference import inc_masks


def _weights(seed=0, shapes=((16, 32), (32, 64), (8, 24))):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": torch.randn(*s, generator=g) for i, s in enumerate(shapes)}


def _pruned_blocks(mask, n, m):
    r, c = mask.shape
    blocks = mask.reshape(r // n, n, c // m, m)
    # every block is all-kept or all-pruned
    assert torch.equal(blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3)))
    return int((blocks.amax(dim=(1, 3)) == 0).sum())


def _inc_loop(scores, k, max_ratio):
    """Literal transcription of INC's get_masks_global loop (max cap only) -> block keep masks."""
    residual, frozen, keep, layers = k, set(), {}, []
    while True:
        new_layers = [n for n in scores if n not in frozen]
        if new_layers == layers or not new_layers:
            break
        layers = new_layers
        thr = torch.kthvalue(torch.cat([scores[n].flatten() for n in layers]), residual).values
        for n in layers:
            mask = scores[n] > thr
            if (mask == 0).sum().item() / mask.numel() > max_ratio:
                frozen.add(n)
                kk = int(max_ratio * scores[n].numel())
                keep[n] = scores[n] > torch.kthvalue(scores[n].flatten(), kk).values
                residual -= int((keep[n] == 0).sum())
            else:
                keep[n] = mask
    return keep


@pytest.mark.parametrize("pattern,n,m", [("4x1", 4, 1), ("1x4", 1, 4), ("2x2", 2, 2), ("1x1", 1, 1)])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.9])
def test_global_exact_count_and_ranking(pattern, n, m, target):
    w = _weights()
    masks = inc_masks(w, pattern=pattern, target=target)
    total = sum(x.numel() // (n * m) for x in w.values())
    assert sum(_pruned_blocks(masks[k], n, m) for k in w) == int(total * target)
    # one global threshold: every pruned block scores below every kept block
    pruned, kept = [], []
    for k, x in w.items():
        s = x.abs().reshape(x.shape[0] // n, n, x.shape[1] // m, m).mean((1, 3)).flatten()
        b = masks[k][::n, ::m].flatten().bool()
        pruned.append(s[~b])
        kept.append(s[b])
    assert torch.cat(pruned).max() < torch.cat(kept).min()


@pytest.mark.parametrize("pattern,n,m", [("4x1", 4, 1), ("1x4", 1, 4), ("1x1", 1, 1)])
def test_local_exact_count_per_layer(pattern, n, m):
    w = _weights(1)
    masks = inc_masks(w, pattern=pattern, target=0.7, scope="local")
    for k, x in w.items():
        assert _pruned_blocks(masks[k], n, m) == int(x.numel() // (n * m) * 0.7)


def test_invalid_layer_left_dense_and_out_of_ranking():
    w = _weights(2, shapes=((16, 32), (6, 10)))  # 6 rows not divisible by 4
    masks = inc_masks(w, pattern="4x1", target=0.5)
    assert torch.equal(masks["l1"], torch.ones(6, 10))
    assert _pruned_blocks(masks["l0"], 4, 1) == int(128 * 0.5)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_2in4_full_target(scope):
    w = _weights(3)
    masks = inc_masks(w, pattern="2:4", target=0.5, scope=scope)
    for k, x in w.items():
        g = masks[k].reshape(x.shape[0], -1, 4)
        assert torch.equal((g == 0).sum(-1), torch.full(g.shape[:2], 2))
        # the two zeros are the two smallest |w| of the group
        a = x.abs().reshape(g.shape)
        assert (a * (1 - g)).amax(-1).le((a + 1e9 * (1 - g)).amin(-1)).all()


def test_nm_below_full_target_prunes_whole_groups():
    w = _weights(4)
    masks = inc_masks(w, pattern="2:4", target=0.3)
    groups = sum(x.numel() // 4 for x in w.values())
    zeros = torch.cat([(m.reshape(-1, 4) == 0).sum(-1) for m in masks.values()])
    assert set(zeros.tolist()) <= {0, 2}
    assert int((zeros == 2).sum()) == int(groups * (0.3 * 4 / 2))
    local = inc_masks(w, pattern="1:4", target=0.2, scope="local")
    for k, x in w.items():
        z = (local[k].reshape(-1, 4) == 0).sum(-1)
        assert set(z.tolist()) <= {0, 1} and int(z.sum()) == int(x.numel() // 4 * (0.2 * 4 / 1))


def test_max_ratio_cap_redistributes():
    w = _weights(5)
    w["l0"] = w["l0"] * 1e-3  # would be pruned entirely by the global ranking
    masks = inc_masks(w, pattern="4x1", target=0.5, max_ratio=0.6)
    counts = {k: _pruned_blocks(masks[k], 4, 1) for k in w}
    assert counts["l0"] == int(0.6 * 128)
    assert all(counts[k] <= int(0.6 * w[k].numel() // 4) for k in w)
    assert sum(counts.values()) == int(sum(x.numel() for x in w.values()) // 4 * 0.5)


def test_max_ratio_unreachable_target_caps_every_layer():
    w = _weights(6)
    masks = inc_masks(w, pattern="1x1", target=0.9, max_ratio=0.5)
    for k, x in w.items():
        assert int((masks[k] == 0).sum()) == int(0.5 * x.numel())


def _layered(seed):
    g = torch.Generator().manual_seed(seed)
    # 4 layers of different widths and random scales, so caps bind on some layers and not others
    return {f"l{i}": torch.randn(8, 16 * (i + 1), generator=g) * torch.rand(1, generator=g) ** 3
            for i in range(4)}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_ratio", [0.65, 0.75, 0.98])
def test_nxm_matches_literal_inc_iteration(seed, max_ratio):
    w = _layered(seed)
    ref = inc_masks(w, pattern="2x2", target=0.6, max_ratio=max_ratio)
    scores = {k: x.abs().reshape(4, 2, -1, 2).mean(-1).mean(1) for k, x in w.items()}
    keep = _inc_loop(scores, int(sum(s.numel() for s in scores.values()) * 0.6), max_ratio)
    for k in w:
        assert torch.equal(ref[k], keep[k].repeat_interleave(2, 0).repeat_interleave(2, 1).float())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_ratio", [0.3, 0.35, 0.4, 0.98])
def test_2in4_matches_literal_inc_iteration(seed, max_ratio):
    w = _layered(seed)
    ref = inc_masks(w, pattern="2:4", target=0.3, max_ratio=max_ratio)
    a = {k: x.abs().reshape(8, -1, 4) for k, x in w.items()}
    cand = {k: a[k] <= a[k].kthvalue(2, -1, True).values for k in w}
    scores = {k: (a[k] * cand[k]).mean(-1) for k in w}
    keep = _inc_loop(scores, int(sum(s.numel() for s in scores.values()) * (0.3 * 4 / 2)), max_ratio * 4 / 2)
    for k, x in w.items():
        assert torch.equal(ref[k], (keep[k].unsqueeze(-1) | ~cand[k]).reshape(x.shape).float())


def test_min_ratio_clamp():
    w = _weights(7)
    w["l2"] = w["l2"] * 1e3  # would keep everything under the global ranking
    masks = inc_masks(w, pattern="1x1", target=0.5, min_ratio=0.3)
    counts = {k: int((masks[k] == 0).sum()) for k in w}
    assert counts["l2"] == math.ceil(0.3 * w["l2"].numel())
    assert sum(counts.values()) == int(sum(x.numel() for x in w.values()) * 0.5)
    local = inc_masks(w, pattern="1x1", target=0.1, scope="local", min_ratio=0.25)
    assert all(int((local[k] == 0).sum()) == math.ceil(0.25 * w[k].numel()) for k in w)


@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_reduce_types_rank_blocks(reduce):
    w = _weights(8)
    masks = inc_masks(w, pattern="1x4", target=0.4, scope="local", reduce=reduce)
    for k, x in w.items():
        a = x.abs().reshape(x.shape[0], -1, 4)
        s = a.sum(-1) if reduce == "sum" else a.amax(-1)
        b = masks[k][:, ::4].bool()
        assert s[~b].max() < s[b].min()


def test_errors():
    w = _weights()
    with pytest.raises(ValueError):
        inc_masks(w, pattern="2:4", target=0.6)
    with pytest.raises(ValueError):
        inc_masks(w, pattern="4y1", target=0.5)
    with pytest.raises(ValueError):
        inc_masks(w, pattern="4x1", target=0.5, scope="layer")
