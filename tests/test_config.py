"""The config keys are declared once (``fxprune.config.KEYS``): the typed config, the resolved
groups, the defaults and the validation messages all come from that table."""
from dataclasses import fields

import pytest

import fxprune
from fxprune.config import GLOBAL_KEYS, GROUP_KEYS, KEY, KEYS, SCHEDULE_KEYS, GroupConfig, PruningConfig


def test_every_key_is_a_field_with_its_declared_default():
    cfg = PruningConfig()
    assert [f.name for f in fields(PruningConfig)] == [k.name for k in KEYS]
    for k in KEYS:
        assert getattr(cfg, k.name) == k.default
    cfg.op_names.append("x")           # list defaults are not shared between configs
    assert PruningConfig().op_names == [] and KEY["op_names"].default == []
    group_fields = [f.name for f in fields(GroupConfig)]
    assert group_fields == ["index", *[k for k in GROUP_KEYS if k not in SCHEDULE_KEYS], "schedule"]
    assert set(GLOBAL_KEYS) == {"pruning_configs", "exclude_last_linear", "compact", "round_channels_to",
                                "block_sequential", "block_propagation", "block_list", "activation_cache_mb",
                                "block_batch_tokens", "true_sequential"}


def test_groups_inherit_the_global_keys():
    cfg = PruningConfig.from_any({"target_sparsity": 0.5, "op_names": "fc",
                                  "pruning_configs": [{}, {"pattern": "2:4", "start_step": 3, "end_step": 3}]})
    a, b = cfg.groups()
    assert (a.target_sparsity, a.pattern, a.op_names, a.where) == (0.5, "4x1", ("fc",), "pruning_configs[0]")
    assert (b.pattern, b.schedule["start_step"], b.pruning_op_types) == ("2:4", 3, ("Conv", "Linear"))


@pytest.mark.parametrize("config,message", [
    # a value is named where it was written: top level, or the group that sets it
    ({"pruning_scope": "both"}, "pruning_scope must be one of ['global', 'local'], got 'both'"),
    ({"pruning_configs": [{}, {"pruning_scope": "both"}]},
     "pruning_configs[1]: pruning_scope must be one of ['global', 'local'], got 'both'"),
    ({"criterion_reduce_type": "median"},
     "criterion_reduce_type must be one of ['mean', 'sum', 'max'], got 'median'"),
    ({"pruning_op_types": ["Linear", 3]},
     "pruning_op_types must be a list of strings such as ['Conv', 'Linear'], got ['Linear', 3] (entry 1: 3)"),
    ({"max_sparsity_ratio_per_op": 1.5}, "max_sparsity_ratio_per_op must be a number in [0, 1], got 1.5"),
    ({"compact": "yes"}, "compact must be true or false, got 'yes'"),
    ({"round_channels_to": 0}, "round_channels_to must be an integer >= 1, got 0"),
    ({"pruning_type": "wanda2"}, "pruning_configs[0]: unknown pruning_type 'wanda2'; available: magnitude, activation"),
])
def test_messages_name_the_key_and_the_declared_form(config, message):
    with pytest.raises(fxprune.ConfigError) as e:
        PruningConfig.from_any(config)
    assert str(e.value).startswith(message)


def test_a_registered_criterion_is_a_valid_pruning_type():
    @fxprune.register_criterion("qa_ones")
    class Ones(fxprune.Criterion):
        def view_scores(self, param_name, weight_view):
            return weight_view.detach().float().abs() + 1.0

    try:
        assert PruningConfig.from_any({"pruning_type": "qa_ones"}).groups()[0].pruning_type == "qa_ones"
        assert fxprune.get_criterion_class("qa_ones") is Ones and Ones.name == "qa_ones"
    finally:
        fxprune.CRITERIA.pop("qa_ones")
    with pytest.raises(fxprune.ConfigError, match="unknown pruning_type 'qa_ones'"):
        PruningConfig.from_any({"pruning_type": "qa_ones"})


def test_every_key_is_documented_in_the_design_reference():
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    missing = [k.name for k in KEYS if f"`{k.name}`" not in text]
    assert missing == []


def test_refine_steps_on_a_group_of_another_criterion_warn_naming_the_group():
    import warnings
    cfg = PruningConfig.from_any({"pruning_configs": [
        {"op_names": ["fc1"], "pruning_type": "sparse_gpt", "sparse_gpt_refine_steps": 5},
        {"op_names": ["fc2"], "pruning_type": "magnitude", "sparse_gpt_refine_steps": 5}]})
    with pytest.warns(UserWarning, match=r"pruning_configs\[1\]: sparse_gpt_refine_steps applies to "
                                         r"pruning_type sparse_gpt only; this group's is magnitude"):
        cfg.warn_ignored_keys()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PruningConfig.from_any({"pruning_type": "sparse_gpt", "sparse_gpt_refine_steps": 5}).warn_ignored_keys()
