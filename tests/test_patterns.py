"""Pattern semantics on the 2-D view (docs/design.md, "Patterns"), exact counts ("Exactness") and
equality with INC."""
import pytest
import torch

import fxprune
from fxprune.config import PruningConfig
from fxprune.geometry import WeightGeometry, from_view_2d, to_view_2d, view_rows
from inc_reference import inc_masks


def _pattern(**keys):
    return fxprune.get_pattern(PruningConfig.from_any(keys).groups()[0])


def _masks(pattern, views):
    """Keep-masks from a pattern object for {name: 2-D weight} (magnitude scores)."""
    geoms = {n: WeightGeometry("out_in", tuple(v.shape)) for n, v in views.items()}
    layouts = {n: pattern.block_layout(g) for n, g in geoms.items()}
    return pattern.get_masks({n: v.abs() for n, v in views.items()}, layouts)


def _views(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(32, 64, generator=g), "b": torch.randn(64, 48, generator=g),
            "c": torch.randn(16, 128, generator=g) * 0.5}


def test_view_2d_round_trip_and_conv_layout():
    w = torch.randn(8, 3, 2, 5)  # Conv2d [Cout, Cin, kh, kw]
    geom = WeightGeometry("conv", tuple(w.shape))
    view = to_view_2d(w, geom)
    assert view.shape == (8, 2 * 5 * 3)
    # input channels are the innermost column index: column (kh*5 + kw)*3 + c
    assert torch.equal(view[:, (1 * 5 + 4) * 3 + 2], w[:, 2, 1, 4])
    assert torch.equal(from_view_2d(view, geom), w)
    lin = torch.randn(5, 7)
    assert torch.equal(from_view_2d(to_view_2d(lin, WeightGeometry("in_out", (5, 7))), WeightGeometry("in_out", (5, 7))), lin)


@pytest.mark.parametrize("layout, shape", [("out_in", (6, 5)), ("in_out", (5, 6)), ("conv", (6, 3, 2, 5))])
def test_view_rows_are_the_views_rows(layout, shape):
    w = torch.randn(shape)
    geom = WeightGeometry(layout, shape)
    view = to_view_2d(w, geom)
    for start, stop in ((0, 6), (1, 4), (5, 6), (3, 3)):
        assert torch.equal(view_rows(w, geom, start, stop), view[start:stop])


@pytest.mark.parametrize("pattern,block", [("4x1", (4, 1)), ("1x4", (1, 4)), ("2x2", (2, 2)),
                                           ("8x8", (8, 8)), ("1x1", (1, 1))])
@pytest.mark.parametrize("scope", ["global", "local"])
def test_nxm_whole_blocks_and_exact_counts(pattern, block, scope):
    views = _views()
    masks = _masks(_pattern(pattern=pattern, target_sparsity=0.7, pruning_scope=scope), views)
    n, m = block
    total_pruned = 0
    for name, keep in masks.items():
        r, c = keep.shape
        blocks = keep.reshape(r // n, n, c // m, m)
        # a block is kept or pruned as a whole
        assert torch.equal(blocks.all(dim=3).all(dim=1), blocks.any(dim=3).any(dim=1))
        pruned_blocks = int((~blocks.any(dim=3).any(dim=1)).sum())
        if scope == "local":
            assert pruned_blocks == int(0.7 * keep.numel()) // (n * m)
        total_pruned += pruned_blocks * n * m
    if scope == "global":
        total = sum(v.numel() for v in views.values())
        assert total_pruned == (int(0.7 * total) // (n * m)) * n * m


@pytest.mark.parametrize("pattern", ["4x1", "1x4", "2x2", "1x1", "2:4", "1:4", "4:8"])
@pytest.mark.parametrize("scope", ["global", "local"])
@pytest.mark.parametrize("reduce", ["mean", "sum", "max"])
def test_masks_equal_inc_on_random_weights(pattern, scope, reduce):
    views = _views(seed=3)
    target = 0.2 if ":" in pattern else 0.75
    ours = _masks(_pattern(pattern=pattern, target_sparsity=target, pruning_scope=scope,
                           criterion_reduce_type=reduce), views)
    inc = inc_masks(views, pattern=pattern, target=target, scope=scope, reduce=reduce)
    for name in views:
        assert torch.equal(ours[name], inc[name].bool()), name


@pytest.mark.parametrize("pattern", ["4x1", "1x1", "2:4"])
def test_max_ratio_per_op_equals_inc_and_redistributes(pattern):
    views = _views(seed=5)
    views["c"] = views["c"] * 0.01  # layer c scores lowest: a global ranking would empty it
    target = 0.4 if ":" in pattern else 0.6
    ours = _masks(_pattern(pattern=pattern, target_sparsity=target, max_sparsity_ratio_per_op=0.45
                           if ":" in pattern else 0.7), views)
    inc = inc_masks(views, pattern=pattern, target=target, max_ratio=0.45 if ":" in pattern else 0.7)
    for name in views:
        assert torch.equal(ours[name], inc[name].bool()), name
    cap = 0.45 if ":" in pattern else 0.7
    block_weights = {"4x1": 4, "1x1": 1, "2:4": 2}[pattern]  # the cap is in whole blocks
    assert (~ours["c"]).sum() == int(cap * ours["c"].numel()) // block_weights * block_weights
    total = sum(v.numel() for v in views.values())
    assert sum(int((~k).sum()) for k in ours.values()) == int(target * total) // block_weights * block_weights


def test_min_ratio_per_op_raises_low_layers():
    views = _views()
    views["a"] = views["a"] * 100  # layer a scores highest: a global ranking would leave it dense
    masks = _masks(_pattern(pattern="1x1", target_sparsity=0.5, min_sparsity_ratio_per_op=0.25), views)
    assert int((~masks["a"]).sum()) == 0.25 * masks["a"].numel()
    total = sum(v.numel() for v in views.values())
    assert sum(int((~k).sum()) for k in masks.values()) == total // 2


def test_two_in_four_full_target():
    w = torch.randn(16, 32)
    keep = _masks(_pattern(pattern="2:4", target_sparsity=0.5), {"w": w})["w"]
    groups, kept = w.abs().reshape(-1, 4), keep.reshape(-1, 4)
    assert (kept.sum(dim=1) == 2).all()
    # the two pruned are the two smallest of each group
    assert torch.equal(~kept, groups <= groups.sort(dim=1).values[:, 1:2])


def test_n_in_m_below_full_target_prunes_whole_groups():
    w = torch.randn(16, 32)
    keep = _masks(_pattern(pattern="2:4", target_sparsity=0.25, pruning_scope="local"), {"w": w})["w"]
    zeros_per_group = (~keep.reshape(-1, 4)).sum(dim=1)
    assert set(zeros_per_group.tolist()) == {0, 2}
    assert int((zeros_per_group == 2).sum()) == 64  # 25 % of 512 weights = 128 = 64 groups x 2


def test_channel_patterns_on_linear():
    w = torch.randn(12, 20)
    keep = _masks(_pattern(pattern="1xchannel", target_sparsity=0.5, pruning_scope="local"), {"w": w})["w"]
    rows = keep.all(dim=1)
    assert torch.equal(rows, keep.any(dim=1)) and int((~rows).sum()) == 6
    # the pruned rows are those with the lowest mean |w|
    assert set((~rows).nonzero().flatten().tolist()) == set(w.abs().mean(1).argsort()[:6].tolist())
    keep = _masks(_pattern(pattern="channelx1", target_sparsity=0.5, pruning_scope="local"), {"w": w})["w"]
    cols = keep.all(dim=0)
    assert torch.equal(cols, keep.any(dim=0)) and int((~cols).sum()) == 10
    keep = _masks(_pattern(pattern="3xchannel", target_sparsity=0.5, pruning_scope="local"), {"w": w})["w"]
    dead = (~keep.any(dim=1)).reshape(4, 3)
    assert torch.equal(dead.all(dim=1), dead.any(dim=1)) and int(dead.sum()) == 6


def _conv_keep(pattern, w, groups=1, target=0.5):
    p = _pattern(pattern=pattern, target_sparsity=target, pruning_scope="local")
    geom = WeightGeometry("conv", tuple(w.shape), groups)
    layout = p.block_layout(geom)
    keep_view = p.get_masks({"w": to_view_2d(w.abs(), geom)}, {"w": layout})["w"]
    return from_view_2d(keep_view, geom)


def test_channel_patterns_on_conv_are_real_channels():
    w = torch.randn(8, 6, 3, 3)
    keep = _conv_keep("1xchannel", w)  # whole filters
    filt = keep.flatten(1)
    assert torch.equal(filt.all(1), filt.any(1)) and int((~filt.all(1)).sum()) == 4
    keep = _conv_keep("channelx1", w)  # input channel c across all filters and kernel positions
    per_in = keep.transpose(0, 1).flatten(1)
    assert torch.equal(per_in.all(1), per_in.any(1)) and int((~per_in.all(1)).sum()) == 3
    assert set((~per_in.all(1)).nonzero().flatten().tolist()) == set(w.abs().mean((0, 2, 3)).argsort()[:3].tolist())
    keep = _conv_keep("channelx2", w)  # pairs of input channels
    dead = ~keep.transpose(0, 1).flatten(1).any(1)
    assert dead.reshape(3, 2).all(1).tolist().count(True) == int(dead.sum()) // 2 and int(dead.sum()) == 2


def test_channelx1_on_grouped_conv_prunes_input_channels_within_their_group():
    w = torch.randn(8, 2, 3, 3)  # groups=4: 8 input channels, 2 per group, 2 filters per group
    keep = _conv_keep("channelx1", w, groups=4)
    # input channel j = group j // 2, local index j % 2; its weights: filters of that group
    dead = []
    for j in range(8):
        g, c = divmod(j, 2)
        block = keep[2 * g: 2 * g + 2, c]
        assert bool(block.all()) or not bool(block.any())
        dead.append(not bool(block.any()))
    assert sum(dead) == 4
    assert (~keep).sum() == 4 * 2 * 9


def test_skip_reasons():
    p = _pattern(pattern="4x1")
    assert "not divisible" in p.block_layout(WeightGeometry("out_in", (10, 8)))
    p = _pattern(pattern="2:4", target_sparsity=0.5)
    assert "M=4" in p.block_layout(WeightGeometry("conv", (8, 3, 3, 3)))


def test_registry_lists_patterns_for_unknown_names():
    with pytest.raises(fxprune.ConfigError, match=r"unknown pattern '3y3'.*NxM.*N:M"):
        _pattern(pattern="3y3")
    assert {"NxM", "N:M"} <= set(fxprune.PATTERNS)


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("4:16", 4, 16)])
def test_n_in_m_ties_go_to_the_lowest_column_and_counts_are_exact(pattern, n, m):
    w = torch.ones(4, 32)
    w[:, 1::m] = 0.5  # one clear lowest per group, the rest tie
    keep = _masks(_pattern(pattern=pattern, target_sparsity=n / m), {"w": w})["w"]
    pruned = (~keep).reshape(-1, m)
    expected = torch.zeros(m, dtype=torch.bool)
    expected[1] = True
    expected[[c for c in range(m) if c != 1][: n - 1]] = True
    assert (pruned == expected).all()
    w = torch.randn(8, 64)
    keep = _masks(_pattern(pattern=pattern, target_sparsity=n / m), {"w": w})["w"]
    groups, pruned = w.abs().reshape(-1, m), (~keep).reshape(-1, m)
    assert (pruned.sum(1) == n).all()
    assert torch.equal(pruned, groups <= groups.sort(dim=1).values[:, n - 1: n])
