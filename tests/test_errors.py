"""Bad input: a clear error naming the key/layer/file and the fix; the caller's model untouched."""
import pytest
import torch
from torch import nn

import fxprune
from conftest import MLP


def _raises(model, config, match, exc=fxprune.FxPruneError, **kw):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        fxprune.transform(model, config, **kw)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True, msg=f"{k} changed")


def test_unknown_key_names_the_closest(mlp):
    _raises(mlp, {"target_sparsty": 0.5}, r"unknown key 'target_sparsty'; did you mean 'target_sparsity'\?",
            fxprune.ConfigError)
    _raises(mlp, {"pruning_configs": [{"patern": "4x1"}]},
            r"pruning_configs\[0\]: unknown key 'patern'; did you mean 'pattern'\?")


def test_unknown_pattern_lists_registered(mlp):
    _raises(mlp, {"pattern": "5y5"}, r"unknown pattern '5y5'; registered patterns: NxM, N:M")


@pytest.mark.parametrize("target", [0.6, 0.75])
def test_two_in_four_above_half(mlp, target):
    _raises(mlp, {"pattern": "2:4", "target_sparsity": target},
            r"target_sparsity .* is above what pattern '2:4' can reach \(2/4 = 0.5\)")


@pytest.mark.parametrize("target", [1.0, -0.1, 1.5, "0.5", float("nan")])
def test_target_outside_range(mlp, target):
    _raises(mlp, {"target_sparsity": target}, r"target_sparsity must be a number in \[0, 1\)")


def test_min_above_max(mlp):
    _raises(mlp, {"min_sparsity_ratio_per_op": 0.6, "max_sparsity_ratio_per_op": 0.5},
            r"min_sparsity_ratio_per_op \(0.6\) is above max_sparsity_ratio_per_op \(0.5\)")


def test_regex_that_selects_nothing(mlp):
    _raises(mlp, {"op_names": ["encoder.*"]},
            r"op_names regex 'encoder\.\*' matches no prunable layer; prunable layers are layers.0, layers.1, layers.2")
    _raises(mlp, {"op_names": ["layers.0"], "excluded_op_names": ["layers.0"]},
            r"pruning_configs\[0\] selects no layer")
    _raises(mlp, {"op_names": ["(unclosed"]}, r"op_names entry '\(unclosed' is not a valid regex")


def test_config_that_fits_no_layer(mlp):
    _raises(mlp, {"pattern": "7x1"}, r"pattern '7x1' fits none of the 2 selected layers")


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: symbolic_trace cannot trace it
            return self.fc(x)
        return x


def test_capture_failure_says_why_and_suggests_example_inputs():
    _raises(Branchy(), {}, r"symbolic_trace could not trace Branchy: TraceError.*Pass example_inputs=",
            fxprune.CaptureError)


def test_inputs_the_model_cannot_run_are_an_error_before_capture(mlp):
    _raises(mlp, {}, r"MLP cannot run on example_inputs \(RuntimeError: mat1 and mat2 shapes cannot be "
            r"multiplied.*here MLP.forward\(x\)", fxprune.CaptureError, example_inputs=(torch.randn(2, 5),))


class Unexportable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum().item() > 0 else x   # runs eagerly; not capturable


def test_export_failure_names_the_inputs():
    _raises(Unexportable(), {}, r"torch.export could not capture Unexportable with the given example_inputs",
            fxprune.CaptureError, example_inputs=(torch.ones(2, 4),))


def test_nan_weight_names_the_layer():
    model = MLP()
    with torch.no_grad():
        model.layers[1].weight[3, 4] = float("nan")
        model.layers[1].weight[0, 0] = float("inf")
    _raises(model, {}, r"layer layers.1 \(layers.1.weight\) has 2 NaN/inf weight values", fxprune.WeightError)
    _raises(model, {}, r"layers.1", fxprune.WeightError, inplace=True)  # inplace: untouched too


def test_empty_model():
    _raises(nn.Sequential(), {}, r"found no prunable weights in Sequential")
    _raises(nn.Sequential(nn.ReLU(), nn.Tanh()), {}, r"found no prunable weights")


def test_config_file_errors(tmp_path, mlp):
    _raises(mlp, str(tmp_path / "missing.yaml"), r"config file '.*missing.yaml' does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pattern: [4x1\n")
    _raises(mlp, str(bad), r"config file '.*bad.yaml' is not valid YAML")
    scalar = tmp_path / "scalar.json"
    scalar.write_text("0.5")
    _raises(mlp, str(scalar), r"must hold a mapping of keys, got float")
    listy = tmp_path / "list.json"  # a list is INC's list of groups: each must be a dict
    listy.write_text("[1, 2]")
    _raises(mlp, str(listy), r"pruning_configs\[0\] must be a dict of keys, got int")


def test_config_files_yaml_and_json(tmp_path, mlp):
    y = tmp_path / "prune.yaml"
    y.write_text("target_sparsity: 0.5\npattern: 1x1\npruning_scope: local\n")
    j = tmp_path / "prune.json"
    j.write_text('{"target_sparsity": 0.5, "pattern": "1x1", "pruning_scope": "local"}')
    a, b = fxprune.transform(mlp, str(y)), fxprune.transform(mlp, j)
    assert torch.equal(a.layers[0].weight, b.layers[0].weight)
    assert int((a.layers[0].weight == 0).sum()) == 1024


def test_not_a_module_and_bad_config_type():
    with pytest.raises(fxprune.FxPruneError, match="model must be a torch.nn.Module, got int"):
        fxprune.transform(3, {})
    with pytest.raises(fxprune.ConfigError, match="config must be a dict"):
        fxprune.transform(MLP(), 0.5)


def test_schedule_keys_warn_in_one_shot(mlp):
    with pytest.warns(UserWarning, match=r"\['end_step', 'start_step'\] set a training schedule"):
        fxprune.transform(mlp, {"start_step": 1, "end_step": 10, "pattern": "1x1"})


def test_sparsity_report_of_a_plain_model(mlp):
    with pytest.raises(fxprune.FxPruneError, match="carries no fxprune report"):
        fxprune.sparsity_report(mlp)


def test_meta_weights_are_an_error_naming_the_layer():
    with torch.device("meta"):
        model = MLP()
    _raises(model, {"pattern": "4x1"}, r"layer layers.0 \(layers.0.weight\) is on the meta device and has no "
            r"values to prune; load the weights first", fxprune.WeightError)


def test_selecting_only_the_last_linear_says_it_is_excluded_by_default(mlp):
    _raises(mlp, {"op_names": ["layers.2"]}, r"selects no layer: .*; widen the selection\. layers.2 is the last "
            r"linear layer, excluded by default; set exclude_last_linear: false to prune it", fxprune.ConfigError)


def test_a_list_of_groups_is_incs_template(tmp_path, mlp):
    groups = [{"op_names": ["layers.0"], "pattern": "4x1", "target_sparsity": 0.5},
              {"op_names": ["layers.1"], "pattern": "1x1", "target_sparsity": 0.25}]
    path = tmp_path / "groups.yaml"
    path.write_text("- op_names: [layers.0]\n  pattern: 4x1\n  target_sparsity: 0.5\n"
                    "- op_names: [layers.1]\n  pattern: 1x1\n  target_sparsity: 0.25\n")
    for config in (groups, str(path)):
        report = fxprune.sparsity_report(fxprune.transform(mlp, config))
        assert [(r.group, r.pattern, r.zeros) for r in report.layers] == [(0, "4x1", 1024), (1, "1x1", 1024),
                                                                          (None, None, 0)]
