"""The one score path (``score_targets``) and mask path (``mask_group``) shared by the mask pass,
the compaction run and the Pruner: any subset of a group's targets, checks and warnings."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fxprune
from fxprune.errors import FxPruneError, WeightError
from fxprune.passes import AttachPass, CapturePass, DiscoverPass, PassManager, PruneContext
from fxprune.passes.mask import mask_group
from fxprune.passes.score import score_targets
from fxprune.criteria import get_criterion_class
from fxprune.config import PruningConfig
from conftest import MLP


def _attached(model, config):
    ctx = PruneContext(model=model, config=PruningConfig.from_any(config))
    PassManager([CapturePass(), DiscoverPass(), AttachPass()]).run(ctx)
    return ctx


def test_a_subset_of_targets_is_scored_and_masked_alone(mlp):
    ctx = _attached(mlp, {"pattern": "1x1", "target_sparsity": 0.5, "exclude_last_linear": False})
    group = ctx.groups[0]
    subset = ctx.selected(group)[1:]          # layers.1 and layers.2: what a block-wise caller does
    criterion = get_criterion_class(group.pruning_type)(group)
    with torch.no_grad():
        mlp.layers[1].weight[0, :5] = 0.0
    scores = score_targets(mlp, subset, criterion)
    assert set(scores) == {"layers.1.weight", "layers.2.weight"}
    s = scores["layers.1.weight"]
    assert s.dtype == torch.float32 and torch.equal(s, mlp.layers[1].weight.detach().abs())
    assert torch.equal(s[0, :5].view(torch.int32), torch.zeros(5, dtype=torch.int32))  # +0.0
    masks = mask_group(group, subset, dict(scores))
    total = sum(t.geometry.numel for t in subset)
    assert sum(int((~m).sum()) for m in masks.values()) == math.floor(0.5 * total)
    # one ranking over the subset: everything pruned scores at most what is kept
    flat_scores = torch.cat([scores[p].reshape(-1) for p in masks])
    flat_keep = torch.cat([masks[p].reshape(-1) for p in masks])
    assert flat_scores[~flat_keep].max() <= flat_scores[flat_keep].min()
    # a sparsity other than the config's, passed in (the pattern object is not patched)
    masks = mask_group(group, subset, dict(scores), target_sparsity=0.25)
    assert sum(int((~m).sum()) for m in masks.values()) == math.floor(0.25 * total)
    assert subset[0].pattern.target_sparsity == 0.5


def test_score_path_names_the_layer_and_when(mlp):
    ctx = _attached(mlp, {"pattern": "1x1"})
    group = ctx.groups[0]
    with torch.no_grad():
        mlp.layers[0].weight[1, 1] = float("nan")
    with pytest.raises(WeightError, match=r"layer layers.0 \(layers.0.weight\) has 1 NaN/inf weight values at "
                                          r"step 7; check the training"):
        score_targets(mlp, ctx.selected(group), get_criterion_class("magnitude")(group),
                      when=" at step 7", fix="check the training")


def test_compact_run_masks_other_groups_with_the_checks_and_warnings():
    model = MLP((16, 8, 8, 2)).eval()
    config = {"pruning_configs": [{"op_names": ["layers.0"], "pattern": "1xchannel", "target_sparsity": 0.5},
                                  {"op_names": ["layers.1"], "pattern": "1x1", "target_sparsity": 0.9,
                                   "max_sparsity_ratio_per_op": 0.5}]}
    with pytest.warns(UserWarning, match=r"pruning_configs\[1\] \(pattern '1x1', 1 layers\): achieved sparsity "
                                         r"0\.5000, target_sparsity 0\.9: max_sparsity_ratio_per_op 0\.5"):
        pruned = fxprune.transform(model, config, (torch.randn(2, 16),), compact=True)
    report = fxprune.sparsity_report(pruned)
    assert report.layer("layers.1").zeros == 32                      # half of 8x8, before compaction
    assert pruned.layers[1].weight.shape == (8, 4)                   # its inputs went with layers.0


def test_pruner_masks_through_the_same_path_and_warns_at_the_last_step():
    model = MLP((16, 8, 8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = {"pattern": "4x1", "target_sparsity": 0.01, "start_step": 0, "end_step": 2,
           "pruning_frequency": 1, "sparsity_decay_type": "linear"}
    pruner = fxprune.Pruner(model, cfg, optimizer=opt)
    x, y = torch.randn(4, 16), torch.randint(0, 2, (4,))
    for step in range(3):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            pruner.step()          # begins step + 1: step 2 is the last pruning step
        missed = [str(w.message) for w in seen if "achieved sparsity" in str(w.message)]
        if step + 1 == 2:
            assert len(missed) == 1 and ("achieved sparsity 0.0000, target_sparsity 0.01: the target rounds "
                                         "down to zero whole blocks") in missed[0]
        else:
            assert missed == []
    assert pruner.sparsity() == 0.0


def test_user_get_masks_without_target_sparsity_is_refused_by_the_pruner(mlp):
    @fxprune.register_pattern("qa_oldsig")
    class OldSignature(fxprune.BasePattern):
        def block_layout(self, geom):
            return fxprune.BlockLayout(tuple(geom.view_shape), (), 1, "1x1")

        def get_masks(self, scores, layouts):
            return {name: torch.ones(s.shape, dtype=torch.bool) for name, s in scores.items()}

    try:
        with pytest.raises(FxPruneError, match=r"OldSignature.get_masks\) does not take target_sparsity="):
            fxprune.Pruner(MLP(), {"pattern": "qa_oldsig", "target_sparsity": 0.5, "start_step": 0,
                                   "end_step": 2, "sparsity_decay_type": "linear"})
    finally:
        fxprune.PATTERNS.pop("qa_oldsig")
