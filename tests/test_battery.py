"""The bad-input battery: each row is one malformed config, model, input, user extension, file or
command line, and must fail with a clear, short error that names the culprit, leaving the
caller's model and files exactly as they were (see ``battery.py`` for what is compared).

Categories: ``config`` (Python API config values), ``inputs`` (example inputs, calibration,
arguments), ``weights`` (the model's weights), ``pruner`` (gradual pruning), ``extensions`` (user
patterns, criteria, callbacks and registrations), ``files`` (config files, reports, ONNX and
export paths) and ``cli`` (real ``python -m fxprune`` subprocesses).
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import fxprune
from battery import Bad, assert_same_state, check_message, files_state, model_state, registries, write_files
from conftest import MLP, SmallCNN
from fxprune.export import ExportError, read_report, to_onnx, validate_onnx

CE, WE, XE, FE, RE = (fxprune.ConfigError, fxprune.WeightError, fxprune.ExtensionError,
                      fxprune.FxPruneError, fxprune.ReportError)
CAP = fxprune.CaptureError
X = torch.randn(4, 32)


def prune(config=None, **kw):
    return lambda model, d: fxprune.transform(model, config, **kw)


def cfg(config, **kw):
    """A config case on the MLP."""
    return prune(config, **kw)


# ---------------------------------------------------------------------------------------- config
CONFIG = [
    Bad("target-string", cfg({"target_sparsity": "0.5"}), CE, r"target_sparsity must be a number in \[0, 1\), got '0.5'"),
    Bad("target-one", cfg({"target_sparsity": 1.0}), CE, r"target_sparsity must be a number in \[0, 1\), got 1.0"),
    Bad("target-negative", cfg({"target_sparsity": -0.1}), CE, r"target_sparsity .* got -0.1"),
    Bad("target-nan", cfg({"target_sparsity": float("nan")}), CE, r"target_sparsity .* got nan"),
    Bad("target-bool", cfg({"target_sparsity": True}), CE, r"target_sparsity .* got True"),
    Bad("target-list", cfg({"target_sparsity": [0.5]}), CE, r"target_sparsity .* got \[0.5\]"),
    Bad("group-target", cfg({"pruning_configs": [{}, {"op_names": ["layers.1"], "target_sparsity": "x"}]}), CE,
        r"pruning_configs\[1\]: target_sparsity must be a number in \[0, 1\), got 'x'"),
    Bad("pattern-int", cfg({"pattern": 4}), CE, r"pattern must be a registered pattern name .* got 4"),
    Bad("pattern-empty", cfg({"pattern": ""}), CE, r"pattern must be a registered pattern name .* got ''"),
    Bad("pattern-unknown", cfg({"pattern": "5y5"}), CE, r"unknown pattern '5y5'"),
    Bad("pattern-zero-block", cfg({"pattern": "0x4"}), CE, r"pattern '0x4' needs block sides >= 1"),
    Bad("pattern-n-above-m", cfg({"pattern": "4:2"}), CE, r"pattern '4:2' needs 1 <= N < M"),
    Bad("pattern-2in4-above-half", cfg({"pattern": "2:4", "target_sparsity": 0.75}), CE,
        r"target_sparsity .* above what pattern '2:4' can reach"),
    Bad("pattern-fits-nothing", cfg({"pattern": "7x1"}), CE, r"pattern '7x1' fits none of the 2 selected layers"),
    Bad("type-int", cfg({"pruning_type": 3}), CE, r"pruning_type must be a registered criterion name .* got 3"),
    Bad("type-unknown", cfg({"pruning_type": "Magnitude"}), CE, r"unknown pruning_type 'Magnitude'; available: magnitude"),
    Bad("type-training-only", cfg({"pruning_type": "pattern_lock"}), CE, r"pruning_type 'pattern_lock'.*fxprune.Pruner"),
    Bad("scope-list", cfg({"pruning_scope": ["global"]}), CE, r"pruning_scope must be one of \['global', 'local'\], got \['global'\]"),
    Bad("scope-typo", cfg({"pruning_scope": "globl"}), CE, r"pruning_scope must be one of .* got 'globl'"),
    Bad("reduce-none", cfg({"criterion_reduce_type": None}), CE, r"criterion_reduce_type must be one of \['mean', 'sum', 'max'\], got None"),
    Bad("op-names-int", cfg({"op_names": 3}), CE, r"op_names must be a list of regex strings, got 3"),
    Bad("op-names-entry", cfg({"op_names": ["layers.0", None]}), CE, r"op_names must be a list of regex strings, .*entry 1: None"),
    Bad("op-names-dict", cfg({"excluded_op_names": {"layers.0": 1}}), CE, r"excluded_op_names must be a list of regex strings, got \{"),
    Bad("op-names-regex", cfg({"op_names": ["(unclosed"]}), CE, r"op_names entry '\(unclosed' is not a valid regex"),
    Bad("op-names-no-match", cfg({"op_names": ["encoder.*"]}), CE, r"op_names regex 'encoder\.\*' matches no prunable layer"),
    Bad("op-types-int", cfg({"pruning_op_types": 5}), CE, r"pruning_op_types must be a list of strings .* got 5"),
    Bad("op-types-none-selected", cfg({"pruning_op_types": ["Conv"]}), CE, r"pruning_configs\[0\] selects no layer"),
    Bad("max-string", cfg({"max_sparsity_ratio_per_op": "1"}), CE, r"max_sparsity_ratio_per_op must be a number in \[0, 1\], got '1'"),
    Bad("min-nan", cfg({"min_sparsity_ratio_per_op": float("nan")}), CE, r"min_sparsity_ratio_per_op .* got nan"),
    Bad("min-above-max", cfg({"min_sparsity_ratio_per_op": 0.6, "max_sparsity_ratio_per_op": 0.5}), CE,
        r"min_sparsity_ratio_per_op \(0.6\) is above max_sparsity_ratio_per_op \(0.5\)"),
    Bad("start-step-string", cfg({"start_step": "a"}), CE, r"start_step must be an integer >= 0, got 'a'"),
    Bad("end-step-negative", cfg({"end_step": -3}), CE, r"end_step must be an integer >= 0, got -3"),
    Bad("frequency-zero", cfg({"pruning_frequency": 0}), CE, r"pruning_frequency must be an integer >= 1, got 0"),
    Bad("decay-unknown", cfg({"sparsity_decay_type": "foo"}), CE, r"sparsity_decay_type must be one of \['exp'.* got 'foo'"),
    Bad("reg-type-int", cfg({"reg_type": 3}), CE, r"reg_type must be null or a string .* got 3"),
    Bad("resume-string", cfg({"resume_from_pruned_checkpoint": "x"}), CE, r"resume_from_pruned_checkpoint must be true or false"),
    Bad("exclude-last-string", cfg({"exclude_last_linear": "yes"}), CE, r"exclude_last_linear must be true or false, got 'yes'"),
    Bad("compact-int", cfg({"compact": 1}), CE, r"compact must be true or false, got 1"),
    Bad("round-channels-zero", cfg({"round_channels_to": 0}), CE, r"round_channels_to must be an integer >= 1, got 0"),
    Bad("round-channels-float", cfg({"round_channels_to": 8.0}), CE, r"round_channels_to must be an integer >= 1, got 8.0"),
    Bad("groups-dict", cfg({"pruning_configs": {}}), CE, r"pruning_configs must be a non-empty list of dicts"),
    Bad("groups-empty", cfg({"pruning_configs": []}), CE, r"pruning_configs must be a non-empty list of dicts"),
    Bad("groups-entry-int", cfg([1, 2]), CE, r"pruning_configs\[0\] must be a dict of keys, got int"),
    Bad("group-global-key", cfg({"pruning_configs": [{"compact": True}]}), CE,
        r"pruning_configs\[0\]: unknown key 'compact' \('compact' is a top-level key"),
    Bad("unknown-key", cfg({"target_sparsty": 0.5}), CE, r"unknown key 'target_sparsty'; did you mean 'target_sparsity'"),
    Bad("unknown-key-int", cfg({1: 2}), CE, r"unknown key 1"),
    Bad("config-float", cfg(0.5), CE, r"config must be a dict, a list of pruning groups, a YAML/JSON file path"),
    Bad("config-object", lambda m, d: fxprune.transform(m, fxprune.PruningConfig(pattern="4x1", op_names=7)), CE,
        r"op_names must be a list of regex strings, got 7"),
    Bad("last-linear-only", cfg({"op_names": ["layers.2"]}), CE, r"layers.2 is the last linear layer, excluded by default"),
    Bad("compact-without-inputs", cfg({"compact": True, "pattern": "1xchannel", "target_sparsity": 0.5}), FE,
        r"compact=True needs example_inputs"),
    Bad("get-pattern-int", lambda m, d: fxprune.get_pattern(5), CE, r"get_pattern takes a pattern name, a dict .* got int"),
]


# ---------------------------------------------------------------------------------------- inputs
def calib(batches, **kw):
    return prune({"pruning_type": "activation", "target_sparsity": 0.5, "pattern": "1x1"}, example_inputs=(X,),
                 calibration=batches, **kw)


INPUTS = [
    Bad("inputs-int64", prune({}, example_inputs=(torch.randint(0, 5, (4, 32)),)), CAP,
        r"MLP cannot run on example_inputs \(RuntimeError: mat1 and mat2 must have the same dtype"),
    Bad("inputs-float64", prune({}, example_inputs=(X.double(),)), CAP, r"MLP cannot run on example_inputs .*Double"),
    Bad("inputs-float16", prune({}, example_inputs=(X.half(),)), CAP, r"MLP cannot run on example_inputs .*Half"),
    Bad("inputs-shape", prune({}, example_inputs=(torch.randn(4, 31),)), CAP, r"cannot run on example_inputs .*4x31"),
    Bad("inputs-too-many", prune({}, example_inputs=(X, X)), CAP, r"takes 2 positional arguments but 3 were given.*MLP.forward\(x\)"),
    Bad("inputs-wrong-keyword", prune({}, example_inputs={"y": X}), CAP, r"unexpected keyword argument 'y'"),
    Bad("inputs-string", prune({}, example_inputs=("abc",)), CAP, r"must be Tensor, not str"),
    Bad("inputs-int", prune({}, example_inputs=3), CAP, r"example_inputs is a int; example_inputs must be"),
    Bad("inputs-capture-inplace", prune({}, example_inputs=(X.double(),), inplace=True), CAP, r"cannot run on example_inputs"),
    Bad("capture-inputs", lambda m, d: fxprune.capture(m, (X.long(),)), CAP, r"cannot run on example_inputs"),
    Bad("calibration-missing", prune({"pruning_type": "sparse_gpt"}, example_inputs=(X,)), CE,
        r"pruning_type 'sparse_gpt' needs calibration data"),
    Bad("calibration-tensor", calib(X), CE, r"calibration must be an iterable of batches .* got Tensor"),
    Bad("calibration-int", calib(5), CE, r"calibration must be an iterable of batches .* got int"),
    Bad("calibration-empty", calib([]), CE, r"calibration is empty"),
    Bad("calibration-batch-shape", calib([(X,), (torch.randn(4, 7),)]), FE,
        r"calibration batch 1: layer layers.0: a call used its weight on an input of shape \(4, 7\), expected the last "
        r"dim 32"),
    Bad("calibration-batch-keyword", calib([(X,), {"y": X}]), CAP,
        r"calibration batch 1: MLP cannot run on it \(TypeError: MLP.forward\(\) got an unexpected keyword argument 'y'\)"),
    Bad("calibration-nan-batch", calib([(torch.full((4, 32), float("nan")),)]), WE,
        r"the input of layer layers.0 holds NaN/inf on calibration batch 0: no parameter or buffer"),
    Bad("loss-missing", prune({"pruning_type": "snip", "target_sparsity": 0.5}, example_inputs=(X,), calibration=[(X,)]), CE,
        r"pruning_type 'snip' scores weights from loss gradients: pass loss_fn="),
    Bad("loss-not-callable", prune({}, loss_fn="mse"), FE, r"loss_fn must be a callable .* got str"),
    Bad("progress-not-callable", prune({}, progress=True), FE, r"progress must be a callable .* got bool"),
    Bad("inplace-string", prune({}, inplace="yes"), FE, r"inplace must be True or False, got 'yes'"),
    Bad("compact-argument-string", prune({}, compact="no"), FE, r"compact must be True, False or None"),
    Bad("model-int", lambda m, d: fxprune.transform(3, {}), FE, r"model must be a torch.nn.Module, got int"),
]


# ---------------------------------------------------------------------------------------- weights
def with_weight(change, make=MLP):
    def build():
        model = make().eval()
        with torch.no_grad():
            change(model)
        return model
    return build


def nan_at(layer, where=(3, 4), value=float("nan")):
    def change(model):
        model.layers[layer].weight[where] = value
    return change


class Uncopyable(MLP):
    def __deepcopy__(self, memo):
        raise RuntimeError("holds a file handle")


def _complex_mlp():
    model = MLP().eval()
    model.layers[1].weight = nn.Parameter(model.layers[1].weight.detach().to(torch.complex64), requires_grad=False)
    return model


def _int_mlp():
    model = MLP().eval()
    model.layers[0].weight = nn.Parameter(torch.randint(-3, 3, (64, 32)), requires_grad=False)
    return model


def _meta_mlp():
    with torch.device("meta"):
        return MLP()


SPARSE_GPT = {"pruning_type": "sparse_gpt", "target_sparsity": 0.5, "pattern": "1x1", "pruning_scope": "local"}

WEIGHTS = [
    Bad("nan-layer1", prune({}), WE, r"layer layers.1 \(layers.1.weight\) has 1 NaN/inf weight values",
        model=with_weight(nan_at(1))),
    Bad("inf-layer0-inplace", prune({}, inplace=True), WE, r"layer layers.0 \(layers.0.weight\) has 1 NaN/inf",
        model=with_weight(nan_at(0, value=float("inf")))),
    Bad("nan-second-layer-sparse-gpt", prune(SPARSE_GPT, example_inputs=(X,), calibration=[(X,)], inplace=True), WE,
        r"layer layers.1 \(layers.1.weight\) has 1 NaN/inf", model=with_weight(nan_at(1))),
    Bad("nan-bias-sparse-gpt", prune(SPARSE_GPT, calibration=[(X,)], inplace=True), WE,
        r"the input of layer layers.1 holds NaN/inf on calibration batch 0: the model's layers.0.bias",
        model=with_weight(lambda m: m.layers[0].bias.__setitem__(2, float("nan")))),
    Bad("nan-bias-activation", prune({"pruning_type": "activation", "target_sparsity": 0.5}, calibration=[(X,)]), WE,
        r"the input of layer layers.1 holds NaN/inf .*layers.0.bias", model=with_weight(lambda m: m.layers[0].bias.fill_(float("inf")))),
    Bad("nan-excluded-layer-snip", prune({"pruning_type": "snip", "target_sparsity": 0.5, "op_names": ["layers.0"]},
                                         calibration=[(X,)], loss_fn=lambda m, b: m(*b).sum()), WE,
        r"loss_fn returned nan on calibration batch 0: the model's layers.1.weight", model=with_weight(nan_at(1))),
    Bad("complex-weight", prune({}), WE, r"layer layers.1 \(layers.1.weight\) has dtype complex64; fxprune ranks real",
        model=_complex_mlp),
    Bad("integer-weight", prune({}), WE, r"layer layers.0 \(layers.0.weight\) has dtype int64", model=_int_mlp),
    Bad("meta-weights", prune({}), WE, r"layer layers.0 \(layers.0.weight\) is on the meta device", model=_meta_mlp),
    Bad("nan-conv", prune({"pattern": "1xchannel", "target_sparsity": 0.5}), WE, r"layer conv2 \(conv2.weight\) has 1 NaN/inf",
        model=with_weight(lambda m: m.conv2.weight.__setitem__((0, 0, 0, 0), float("nan")), SmallCNN)),
    Bad("no-prunable-weights", prune({}), FE, r"found no prunable weights in Sequential",
        model=lambda: nn.Sequential(nn.ReLU(), nn.Tanh())),
    Bad("uncopyable", prune({}), FE, r"could not copy Uncopyable to prune it \(holds a file handle\); pass inplace=True",
        model=Uncopyable),
]


# ---------------------------------------------------------------------------------------- pruner
PRUNER_CFG = {"pattern": "1x1", "target_sparsity": 0.5, "start_step": 1, "end_step": 3}


def pruner(config=PRUNER_CFG, optimizer=None, **kw):
    def call(model, d):
        opt = optimizer(model) if callable(optimizer) else optimizer
        return fxprune.Pruner(model, config, optimizer=opt, **kw)
    return call


def _finalized_then(action):
    def call(model, d):
        p = fxprune.Pruner(copy.deepcopy(model), PRUNER_CFG)   # a copy: the caller's model stays
        p.finalize()
        action(p)
    return call


PRUNER = [
    Bad("pruner-optimizer-string", pruner(optimizer="adam"), FE, r"optimizer must be a torch.optim.Optimizer .* got str"),
    Bad("pruner-optimizer-list", pruner(optimizer=lambda m: list(m.parameters())), FE,
        r"optimizer must be a torch.optim.Optimizer .* got list"),
    Bad("pruner-optimizer-other-model", pruner(optimizer=lambda m: torch.optim.SGD(MLP().parameters(), lr=0.1)), FE,
        r"the optimizer \(SGD\) holds none of the weights to prune \(e.g. layers.0.weight\)"),
    Bad("pruner-nan-weight", pruner(optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1)), WE,
        r"layer layers.1 \(layers.1.weight\) has 1 NaN/inf", model=with_weight(nan_at(1))),
    Bad("pruner-one-shot-criterion", pruner({"pruning_type": "sparse_gpt", "target_sparsity": 0.5}), CE,
        r"pruning_type 'sparse_gpt' prunes in one shot from calibration data; use fxprune.transform"),
    Bad("pruner-gradients-at-step-0", pruner({"pruning_type": "snip_momentum", "target_sparsity": 0.5}), CE,
        r"pruning_type 'snip_momentum' scores from gradients, which do not exist yet at step 0"),
    Bad("pruner-end-before-start", pruner({"start_step": 5, "end_step": 2}), CE, r"end_step \(2\) is before start_step \(5\)"),
    Bad("pruner-inputs-wrong-dtype", pruner(example_inputs=(X.long(),)), CAP, r"MLP cannot run on example_inputs"),
    Bad("pruner-load-garbage", lambda m, d: fxprune.Pruner(copy.deepcopy(m), PRUNER_CFG).load_state_dict({"x": 1}), FE,
        r"load_state_dict takes the dict of Pruner.state_dict\(\) \(keys global_step, groups, masks\), got \['x'\]"),
    Bad("pruner-load-wrong-state", lambda m, d: fxprune.Pruner(copy.deepcopy(m), PRUNER_CFG).load_state_dict([1]), FE,
        r"load_state_dict takes the dict of Pruner.state_dict\(\) .* got list"),
    Bad("pruner-step-after-finalize", _finalized_then(lambda p: p.step()), FE, r"this Pruner was finalized"),
    # both groups prune at step 0, when the Pruner is built: the second fails, the first is not applied
    Bad("pruner-second-group-fails", pruner({"pruning_configs": [
        {"op_names": ["layers.0"], "pattern": "1x1", "target_sparsity": 0.5},
        {"op_names": ["layers.1"], "pattern": "p_fail", "target_sparsity": 0.5}]}), XE,
        r"pattern 'p_fail' \(User_p_fail.get_masks\) raised RuntimeError: no masks today for pruning_configs\[1\]",
        register=lambda: _pattern("p_fail", get_masks=_raise(RuntimeError("no masks today")))()),
]


# ---------------------------------------------------------------------------------------- extensions
def _pattern(name, raw=False, **methods):
    """Register a user pattern ``name`` (whole rows of 2 by default) overriding ``methods``
    (``raw``: straight into the registry, past the registration checks)."""
    def layout(self, geom):
        rows, cols = geom.view_shape
        return fxprune.BlockLayout((rows // 2, 2, 1, cols), (1, 3), 2 * cols, f"2x{cols}")
    body = {"block_layout": layout, **methods}
    cls = type(f"User_{name}", (fxprune.BasePattern,), body)
    cls.__module__ = __name__
    if raw:
        return lambda: fxprune.PATTERNS.__setitem__(name, cls)
    return lambda: fxprune.register_pattern(name)(cls)


def _criterion(name, scores):
    cls = type(f"User_{name}", (fxprune.Criterion,),
               {"view_scores": lambda self, param, view: scores(view)})
    cls.__module__ = __name__
    return lambda: fxprune.register_criterion(name)(cls)


def uses(name, **extra):
    return prune({"pattern": name, "target_sparsity": 0.5, **extra})


def scored(name):
    return prune({"pruning_type": name, "target_sparsity": 0.5, "pattern": "4x1"})


def _raise(exc):
    def method(*args, **kwargs):
        raise exc
    return method


L = fxprune.BlockLayout


def _register_over(name, kind="pattern", **kw):
    def call(model, d):
        base = fxprune.BasePattern if kind == "pattern" else fxprune.Criterion
        cls = type("Mine", (base,), {"block_layout": lambda self, g: "never"} if kind == "pattern" else {})
        getattr(fxprune, f"register_{kind}")(name, **kw)(cls)
    return call


def _family_taking(strings):
    def call(model, d):
        cls = type("Greedy", (fxprune.BasePattern,), {"matches": classmethod(lambda c, p: p in strings),
                                                     "block_layout": lambda self, g: "never"})
        fxprune.register_pattern("greedy")(cls)
    return call


EXTENSIONS = [
    Bad("layout-none", uses("x_none"), XE, r"pattern 'x_none' \(User_x_none.block_layout\) returned NoneType None for layer "
        r"layers.0 \(layers.0.weight\)", register=_pattern("x_none", block_layout=lambda self, g: None)),
    Bad("layout-tuple", uses("x_tuple"), XE, r"User_x_tuple.block_layout\) returned tuple .* must return a fxprune.BlockLayout",
        register=_pattern("x_tuple", block_layout=lambda self, g: (2, 2))),
    Bad("layout-empty-reason", uses("x_blank"), XE, r"User_x_blank.block_layout\) returned an empty skip reason",
        register=_pattern("x_blank", block_layout=lambda self, g: "  ")),
    Bad("layout-wrong-size", uses("x_size"), XE, r"returned a BlockLayout of shape \(2, 2\) \(4 weights\) for a view of 2048",
        register=_pattern("x_size", block_layout=lambda self, g: L((2, 2), (1,), 2, "1x2"))),
    Bad("layout-reduce-dim", uses("x_dim"), XE, r"reduce_dims \(1, 5\) are not distinct dims of its shape",
        register=_pattern("x_dim", block_layout=lambda self, g: L((g.view_shape[0], g.view_shape[1]), (1, 5), 1, "x"))),
    Bad("layout-zero-weights", uses("x_zero"), XE, r"block_weights 0 is not an integer in \[1, 2\]",
        register=_pattern("x_zero", block_layout=lambda self, g: L((g.view_shape[0] // 2, 2, g.view_shape[1]), (1,), 0, "2x1"))),
    Bad("layout-float-weights", uses("x_float"), XE, r"block_weights 2.0 is not an integer",
        register=_pattern("x_float", block_layout=lambda self, g: L((g.view_shape[0] // 2, 2, g.view_shape[1]), (1,), 2.0, "2x1"))),
    Bad("layout-negative-shape", uses("x_neg"), XE, r"shape \(-64, -32\) is not a tuple of positive integers",
        register=_pattern("x_neg", block_layout=lambda self, g: L((-64, -32), (), 1, "1x1"))),
    Bad("layout-raises", uses("x_div"), XE, r"pattern 'x_div' \(User_x_div.block_layout\) raised ZeroDivisionError: integer "
        r"division or modulo by zero for layer layers.0", register=_pattern("x_div", block_layout=lambda self, g: 1 // 0)),
    Bad("block-scores-length", uses("x_bs"), XE, r"User_x_bs.block_scores\) returned \(3,\) float32 for layers.0.weight; expected "
        r"1-D float scores, one per block \(32,\)", register=_pattern("x_bs", block_scores=lambda self, s, l: torch.zeros(3))),
    Bad("block-scores-list", uses("x_bsl"), XE, r"User_x_bsl.block_scores\) returned list",
        register=_pattern("x_bsl", block_scores=lambda self, s, l: [0.0] * l.num_blocks)),
    Bad("block-scores-nan", uses("x_bsn"), XE, r"User_x_bsn.block_scores\) returned NaN block scores for layers.0.weight",
        register=_pattern("x_bsn", block_scores=lambda self, s, l: torch.full((l.num_blocks,), float("nan")))),
    Bad("expand-shape", uses("x_ex"), XE, r"User_x_ex.expand\) returned \(2, 2\) bool for layers.0.weight; expected .*\(64, 32\)",
        register=_pattern("x_ex", expand=lambda self, p, l, v, s=None: torch.zeros(2, 2, dtype=torch.bool))),
    Bad("expand-float", uses("x_exf"), XE, r"User_x_exf.expand\) returned \(64, 32\) float32",
        register=_pattern("x_exf", expand=lambda self, p, l, v, s=None: torch.zeros(v))),
    Bad("select-missing-layer", uses("x_sel"), XE, r"User_x_sel.get_masks_global\) returned nothing for layers.0.weight",
        register=_pattern("x_sel", get_masks_global=lambda self, b, l, target_sparsity=None: {})),
    Bad("get-masks-list", uses("x_gm"), XE, r"User_x_gm.get_masks\) returned list; expected a dict",
        register=_pattern("x_gm", get_masks=lambda self, s, l, **kw: [])),
    Bad("get-masks-float", uses("x_gmf"), XE, r"x_gmf' \(User_x_gmf.get_masks\) gave Tensor torch.float32 \(64, 32\) for layers.0.weight",
        register=_pattern("x_gmf", get_masks=lambda self, s, l, **kw: {p: torch.ones(64, 32) for p in s})),
    Bad("channels-partial-rows", uses("x_rows"), XE, r"declares prunes_output_channels but its mask for layers.0.weight prunes "
        r"part of output channel", register=_pattern("x_rows", prunes_output_channels=True,
                                                      block_layout=lambda self, g: L(tuple(g.view_shape), (), 1, "1x1"))),
    Bad("channels-flag-string", uses("x_flag"), XE, r"User_x_flag.prunes_output_channels\) is 'yes'; it must be True or False",
        register=_pattern("x_flag", prunes_output_channels="yes")),
    Bad("channel-block-zero", uses("x_cb"), XE, r"output_channel_block\) is 0; it must be an integer >= 1",
        register=_pattern("x_cb", output_channel_block=0)),
    Bad("check-config-raises", uses("x_cc"), XE, r"User_x_cc.check_config\) raised ValueError: no odd targets for pruning_configs\[0\]",
        register=_pattern("x_cc", check_config=classmethod(_raise(ValueError("no odd targets"))))),
    Bad("init-raises", uses("x_init"), XE, r"User_x_init.__init__\) raised KeyError: 'rows' for pruning_configs\[0\]",
        register=_pattern("x_init", __init__=_raise(KeyError("rows")))),
    Bad("matches-raises", prune({"pattern": "4x1"}), XE, r"User_x_m.matches\) raised AttributeError: boom for '4x1'",
        register=_pattern("x_m", raw=True, matches=classmethod(_raise(AttributeError("boom"))))),
    Bad("scores-shape", scored("c_shape"), XE, r"criterion 'c_shape' \(User_c_shape.view_scores\) returned scores of shape \(3,\) / "
        r"torch.float32 for layer layers.0 \(layers.0.weight\)", register=_criterion("c_shape", lambda v: torch.zeros(3))),
    Bad("scores-float64", scored("c_f64"), XE, r"User_c_f64.view_scores\) returned scores of shape \(64, 32\) / torch.float64",
        register=_criterion("c_f64", lambda v: v.abs().double())),
    Bad("scores-negative", scored("c_neg"), XE, r"User_c_neg.view_scores\) gave layer layers.0 \(layers.0.weight\) scores that are "
        r"not finite and >= 0 \(min -", register=_criterion("c_neg", lambda v: -v.abs().float() - 1)),
    Bad("scores-nan", scored("c_nan"), XE, r"User_c_nan.view_scores\) gave layer layers.0 .* not finite",
        register=_criterion("c_nan", lambda v: torch.full(v.shape, float("nan")))),
    Bad("scores-list", scored("c_list"), XE, r"User_c_list.view_scores\) returned scores of shape list",
        register=_criterion("c_list", lambda v: v.tolist())),
    Bad("scores-raise", scored("c_raise"), XE, r"User_c_raise.view_scores\) raised IndexError: out of range for layer layers.0",
        register=_criterion("c_raise", _raise(IndexError("out of range")))),
    Bad("loss-raises", prune({"pruning_type": "snip", "target_sparsity": 0.5}, example_inputs=(X,), calibration=[(X,)],
                             loss_fn=lambda m, b: m(*b)["logits"]), XE,
        r"loss_fn <lambda> raised IndexError: .* on calibration batch 0; it is called as loss_fn\(model, batch\)"),
    Bad("loss-not-scalar", prune({"pruning_type": "snip", "target_sparsity": 0.5}, calibration=[(X,)],
                                 loss_fn=lambda m, b: m(*b)), XE, r"loss_fn <lambda> must return a scalar loss tensor .* got Tensor\(4, 10\)"),
    Bad("loss-float", prune({"pruning_type": "gradient", "target_sparsity": 0.5}, calibration=[(X,)],
                            loss_fn=lambda m, b: 1.0), XE, r"loss_fn <lambda> must return a scalar loss tensor .* got float"),
    Bad("progress-raises", prune({}, progress=_raise(OSError("terminal gone"))), XE,
        r"the progress callback .* raised OSError: terminal gone at score 1/2"),
    Bad("register-over-builtin-pattern", _register_over("NxM"), XE,
        r"@register_pattern\('NxM'\): 'NxM' is fxprune's built-in NxMPattern; .* override=True"),
    Bad("register-builtin-string", _register_over("4x1"), XE,
        r"@register_pattern\('4x1'\): Mine would take '4x1', which fxprune's built-in NxMPattern handles"),
    Bad("register-greedy-family", _family_taking({"2:4", "mine"}), XE, r"Greedy would take '2:4', which fxprune's built-in NInMPattern"),
    Bad("register-over-builtin-criterion", _register_over("magnitude", "criterion"), XE,
        r"@register_criterion\('magnitude'\): 'magnitude' is fxprune's built-in MagnitudeCriterion"),
    Bad("register-not-a-pattern", lambda m, d: fxprune.register_pattern("plain")(dict), XE,
        r"@register_pattern\('plain'\) must decorate a subclass of fxprune.BasePattern, got dict"),
    Bad("register-not-a-criterion", lambda m, d: fxprune.register_criterion("plain")(fxprune.BasePattern), XE,
        r"must decorate a subclass of fxprune.Criterion, got BasePattern"),
    Bad("register-empty-name", lambda m, d: fxprune.register_pattern(""), XE, r"register_pattern needs a non-empty name"),
]


# ---------------------------------------------------------------------------------------- files
def _onnx_file(metadata: dict[str, str] | None):
    """A tiny valid ONNX model (Identity) with ``metadata`` in metadata_props."""
    def write(path: Path):
        node = helper.make_node("Identity", ["x"], ["y"])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph)
        for k, v in (metadata or {}).items():
            model.metadata_props.add(key=k, value=v)
        onnx.save(model, str(path))
    return write


LAYER = {"name": "fc", "param": "fc.weight", "module_type": "Linear", "weight_shape": [4, 4], "view_shape": [4, 4],
         "pattern": "4x1", "block_shape": "4x1", "scope": "global", "criterion": "magnitude",
         "requested_sparsity": 0.5, "achieved_sparsity": 0.5, "numel": 16, "zeros": 8, "status": "pruned"}


def _report(**layer_changes):
    layer = {k: v for k, v in {**LAYER, **layer_changes}.items() if v is not ...}
    return json.dumps({"layers": [layer]})


def _read(name):
    return lambda m, d: read_report(d / name)


def _validate(name):
    return lambda m, d: validate_onnx(d / name, m, (X,))


FILES = [
    Bad("config-missing", prune("missing.yaml"), CE, r"config file 'missing.yaml' does not exist"),
    Bad("yaml-syntax", prune("bad.yaml"), CE, r"config file 'bad.yaml' is not valid YAML: line 3, column 1: expected ',' or "
        r"'\]'.*flow sequence that starts at line 2, column 10", files={"bad.yaml": "target_sparsity: 0.5\npattern: [4x1\n"}),
    Bad("yaml-indent", prune("indent.yaml"), CE, r"'indent.yaml' is not valid YAML: line 2, column 10: mapping values are not allowed",
        files={"indent.yaml": "target_sparsity: 0.5\n  pattern: 4x1\n"}),
    Bad("json-syntax", prune("bad.json"), CE, r"config file 'bad.json' is not valid JSON: Expecting property name",
        files={"bad.json": '{"target_sparsity": 0.5,}'}),
    Bad("config-file-scalar", prune("scalar.json"), CE, r"'scalar.json' must hold a mapping of keys, got float", files={"scalar.json": "0.5"}),
    Bad("config-file-wrong-type", prune("types.yaml"), CE, r"op_names must be a list of regex strings, got 3",
        files={"types.yaml": "op_names: 3\n"}),
    Bad("config-file-group-type", prune("groups.yaml"), CE, r"pruning_configs\[0\]: pruning_scope must be one of .* got 7",
        files={"groups.yaml": "pruning_configs:\n  - pruning_scope: 7\n"}),
    Bad("config-not-utf8", prune("latin.yaml"), CE, r"config file 'latin.yaml' is not UTF-8 text \(byte 14\)",
        files={"latin.yaml": "op_names: [caf\xe9]\n".encode("latin-1")}),
    Bad("config-directory", prune("conf.yaml"), CE, r"config file 'conf.yaml' is a directory", files={"conf.yaml/x": "a"}),
    Bad("yaml-duplicate-key", prune("dup.yaml"), CE, r"'dup.yaml' is not valid YAML: line 3, column 1: key 'pattern' appears twice",
        files={"dup.yaml": "pattern: 4x1\ntarget_sparsity: 0.5\npattern: 2:4\n"}),
    Bad("yaml-octal-looking-string", prune("oct.yaml"), CE, r"round_channels_to must be an integer >= 1, got '1_6'",
        files={"oct.yaml": "round_channels_to: 1_6\n"}),
    Bad("report-json-garbage", lambda m, d: fxprune.SparsityReport.from_json(d / "r.json"), RE,
        r"not a valid fxprune sparsity report: Expecting value", files={"r.json": "not json"}),
    Bad("report-json-missing-field", lambda m, d: fxprune.SparsityReport.from_json(_report(numel=...)), RE,
        r"layers\[0\] has no field 'numel'"),
    Bad("report-json-bad-type", lambda m, d: fxprune.SparsityReport.from_json(_report(zeros="8")), RE,
        r"layers\[0\].zeros must be an integer >= 0, got '8'"),
    Bad("report-json-layers-dict", lambda m, d: fxprune.SparsityReport.from_json('{"layers": {"fc": 1}}'), RE,
        r"'layers' must be a list of layer records, got dict"),
    Bad("onnx-report-not-json", _read("m.onnx"), RE, r"m.onnx: metadata 'fxprune.report' is not a valid fxprune sparsity report "
        r"\(Expecting property name", files={"m.onnx": _onnx_file({"fxprune.report": "{{{"})}),
    Bad("onnx-report-bad-layer", _read("m.onnx"), RE, r"metadata 'fxprune.report' .*layers\[0\].weight_shape must be a list of integers",
        files={"m.onnx": _onnx_file({"fxprune.report": _report(weight_shape="4x4")})}),
    Bad("onnx-report-list", _validate("m.onnx"), RE, r"m.onnx: metadata 'fxprune.report' .*a sparsity report is a JSON object, got list",
        files={"m.onnx": _onnx_file({"fxprune.report": "[1, 2]"})}),
    Bad("onnx-no-report", _read("m.onnx"), ExportError, r"m.onnx has no 'fxprune.report' metadata", files={"m.onnx": _onnx_file(None)}),
    Bad("onnx-not-onnx", _read("m.onnx"), ExportError, r"m.onnx is not an ONNX model", files={"m.onnx": b"\x00garbage"}),
    Bad("onnx-missing", _read("none.onnx"), ExportError, r"none.onnx: no such file"),
    Bad("onnx-path-int", lambda m, d: read_report(123), ExportError, r"path must be the path of an .onnx file, got int"),
    Bad("validate-model-string", lambda m, d: validate_onnx(d / "m.onnx", "model.pt2", (X,)), ExportError,
        r"model must be the torch.nn.Module the file was exported from, got str", files={"m.onnx": _onnx_file(None)}),
    Bad("report-write-missing-dir", lambda m, d: fxprune.sparsity_report(fxprune.transform(m, {})).to_json(d / "no" / "r.json"), FE,
        r"cannot write the report to '.*no/r.json': No such file or directory"),
    Bad("onnx-write-missing-dir", lambda m, d: to_onnx(m, (X,), d / "no" / "m.onnx"), ExportError, r"directory .*no does not exist"),
    Bad("onnx-write-to-dir", lambda m, d: to_onnx(m, (X,), d / "sub"), ExportError, r"sub is a directory",
        files={"sub/keep.txt": "x"}),
    Bad("onnx-wrong-inputs", lambda m, d: to_onnx(m, (X.double(),), d / "m.onnx"), ExportError, r"the model fails on example_inputs"),
]

API = {"config": CONFIG, "inputs": INPUTS, "weights": WEIGHTS, "pruner": PRUNER, "extensions": EXTENSIONS,
       "files": FILES}
API_CASES = [pytest.param(case, id=f"{category}-{case.id}") for category, cases in API.items() for case in cases]


@pytest.fixture
def restore_registries():
    patterns, criteria = registries()
    yield
    fxprune.PATTERNS.clear()
    fxprune.PATTERNS.update(patterns)
    fxprune.CRITERIA.clear()
    fxprune.CRITERIA.update(criteria)


@pytest.mark.parametrize("case", API_CASES)
def test_bad_input(case: Bad, tmp_path, monkeypatch, restore_registries):
    monkeypatch.chdir(tmp_path)
    write_files(tmp_path, case.files)
    if case.register is not None:
        case.register()
    model = (case.model or MLP)()   # in training mode: flags must come back as they were
    before, files, regs = model_state(model), files_state(tmp_path), registries()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # warnings are not what this battery checks
        with pytest.raises(case.error) as info:
            case.call(model, tmp_path)
    assert isinstance(info.value, fxprune.FxPruneError)
    check_message(str(info.value), case.names)
    assert_same_state(before, model_state(model))
    assert registries() == regs
    assert files_state(tmp_path) == files


def test_the_battery_is_large_and_distinct():
    ids = [p.id for p in API_CASES] + [p.id for p in CLI_CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 100


def test_yaml_numbers_and_patterns_read_as_written(tmp_path, mlp):
    """YAML 1.2 scalars: an unquoted 2:4 is the pattern (not sexagesimal 124), 5e-1 a number,
    016 the integer 16."""
    path = tmp_path / "prune.yaml"
    path.write_text("pattern: 2:4\ntarget_sparsity: 5e-1\nround_channels_to: 016\nop_names: [layers.0]\n")
    cfg = fxprune.PruningConfig.from_any(path)
    assert (cfg.pattern, cfg.target_sparsity, cfg.round_channels_to) == ("2:4", 0.5, 16)
    pruned = fxprune.transform(mlp, path)
    assert int((pruned.layers[0].weight == 0).sum()) == 64 * 32 // 2


def test_the_report_field_table_covers_every_layer_field():
    from dataclasses import fields
    from fxprune.report import _LAYER_FIELDS
    assert list(_LAYER_FIELDS) == [f.name for f in fields(fxprune.LayerReport)]


# ---------------------------------------------------------------------------------------- cli
USER_MODULE = '''
import warnings
import torch
from torch import nn


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def boom():
    raise ValueError("my factory broke")


def needs_arg(x):
    return mlp()


def gives_int():
    return 3


def nan_model():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    return model


def bad_pair():
    return mlp(), (torch.randn(2, 9),)


class CumMax(nn.Module):
    """Prunes and exports with torch.export, but the ONNX exporter has no cummax."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.cummax(self.fc1(x), 1)[0])


def cummax():
    return CumMax()


def noisy():
    warnings.warn("third-party deprecation noise", DeprecationWarning)
    warnings.warn("third-party user noise", UserWarning)
    return mlp()
'''

OK_YAML = "target_sparsity: 0.5\npattern: 4x1\n"


def _cli_base(root: Path) -> None:
    (root / "userfac.py").write_text(USER_MODULE)
    (root / "broken_import.py").write_text('raise RuntimeError("module level failure")\n')
    (root / "ok.yaml").write_text(OK_YAML)
    (root / "bad.yaml").write_text("target_sparsity: 0.5\npattern: [4x1\n")
    (root / "bad.json").write_text('{"target_sparsity": 0.5,}')
    (root / "types.yaml").write_text("target_sparsity: 0.5\nop_names: 3\n")
    (root / "corrupt.pt2").write_bytes(b"not a zip archive")
    (root / "garbage.pt").write_bytes(b"\x80\x04garbage")
    (root / "garbage.onnx").write_bytes(b"\x00not onnx")
    _onnx_file({"fxprune.report": '{"layers": [{"name": 1}]}'})(root / "badmeta.onnx")
    model = MLP().eval()
    torch.export.save(torch.export.export(model, (torch.randn(2, 32),)), root / "mlp.pt2")
    torch.export.save(torch.export.export(model, (torch.randn(2, 32),)), root / "badreport.pt2",
                      extra_files={"fxprune.report.json": "{broken"})


# (id, argv, expected exit code, substring of the one-line error)
CLI = [
    ("factory-raises", ["prune", "userfac:boom", "--config", "ok.yaml"], 2,
     "MODEL 'userfac:boom': userfac.boom() raised ValueError: my factory broke"),
    ("factory-needs-argument", ["prune", "userfac:needs_arg", "--config", "ok.yaml"], 2,
     "userfac.needs_arg() raised TypeError: needs_arg() missing 1 required positional argument"),
    ("factory-import-raises", ["prune", "broken_import:make", "--config", "ok.yaml"], 2,
     "importing 'broken_import' raised RuntimeError: module level failure"),
    ("factory-module-missing", ["inspect", "nosuchmodule:make"], 2, "cannot import 'nosuchmodule'"),
    ("factory-attribute-missing", ["prune", "userfac:nope", "--config", "ok.yaml"], 2, "userfac has no callable 'nope'"),
    ("factory-returns-int", ["prune", "userfac:gives_int", "--config", "ok.yaml"], 2, "userfac:gives_int returned int, not an nn.Module"),
    ("factory-pair-bad-inputs", ["prune", "userfac:bad_pair", "--config", "ok.yaml"], 2,
     "Sequential cannot run on example_inputs (RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    ("model-nan-weight", ["prune", "userfac:nan_model", "--config", "ok.yaml"], 2, "layer 2 (2.weight) has 1 NaN/inf weight values"),
    ("model-unknown", ["prune", "nosuch", "--config", "ok.yaml"], 2, "is not a .pt2 file, a pkg.module:factory or a built-in"),
    ("pt2-corrupt", ["prune", "corrupt.pt2", "--config", "ok.yaml"], 2, "MODEL file 'corrupt.pt2' is not a torch.export archive"),
    ("pt2-corrupt-report", ["prune", "badreport.pt2", "--config", "ok.yaml"], 2,
     "MODEL file 'badreport.pt2': its fxprune.report.json is not a valid fxprune sparsity report"),
    ("config-yaml-syntax", ["prune", "mlp.pt2", "--config", "bad.yaml"], 2,
     "config file 'bad.yaml' is not valid YAML: line 3, column 1: expected ',' or ']'"),
    ("config-json-syntax", ["prune", "mlp.pt2", "--config", "bad.json"], 2, "config file 'bad.json' is not valid JSON"),
    ("config-wrong-type", ["prune", "mlp.pt2", "--config", "types.yaml"], 2, "op_names must be a list of regex strings, got 3"),
    ("config-missing", ["prune", "mlp.pt2", "--config", "none.yaml"], 2, "config file 'none.yaml' does not exist"),
    ("inputs-syntax", ["prune", "mlp.pt2", "--config", "ok.yaml", "--example-inputs", "float32[4,"], 2,
     "--example-inputs 'float32[4,' is not DTYPE[D0,D1,...]"),
    ("inputs-empty-range", ["prune", "mlp.pt2", "--config", "ok.yaml", "--example-inputs", "int64[2,32]{5,3}"], 2,
     "the range {5,3} is empty"),
    ("inputs-huge", ["prune", "mlp.pt2", "--config", "ok.yaml", "--example-inputs", "float32[99999999999,99999999]"], 2,
     "example inputs need one small batch"),
    ("inputs-wrong-dtype", ["prune", "mlp.pt2", "--config", "ok.yaml", "--example-inputs", "int64[2,32]", "--save", "out.pt2"], 2,
     "cannot run on example_inputs"),
    ("inputs-pt-garbage", ["prune", "mlp.pt2", "--config", "ok.yaml", "--example-inputs", "garbage.pt"], 2,
     "--example-inputs file 'garbage.pt' could not be loaded"),
    ("output-dir-missing", ["prune", "mlp.pt2", "--config", "ok.yaml", "--onnx", "x/y.onnx"], 2, "directory 'x' does not exist"),
    ("output-suffix", ["prune", "mlp.pt2", "--config", "ok.yaml", "--report", "out.txt"], 2, "--report 'out.txt' should end in .json"),
    ("onnx-fails-after-report-and-save", ["prune", "userfac:cummax", "--config", "ok.yaml", "--example-inputs", "float32[2,8]",
                                          "--report", "r.json", "--save", "s.pt2", "--onnx", "m.onnx"], 2,
     "torch.onnx.export could not export CumMax"),
    ("validate-not-onnx", ["validate", "garbage.onnx", "--model", "mlp.pt2"], 2, "garbage.onnx is not an ONNX model"),
    ("validate-inputs-wrong-shape", ["validate", "badmeta.onnx", "--model", "userfac:mlp", "--example-inputs", "float32[2,9]"], 2,
     "Sequential cannot run on example_inputs (RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x9 and 8x16))"),
    ("validate-corrupt-metadata", ["validate", "badmeta.onnx", "--model", "mlp.pt2"], 2,
     "badmeta.onnx: metadata 'fxprune.report' is not a valid fxprune sparsity report (layers[0].name must be a string, got 1)"),
]
CLI_CASES = [pytest.param(case, id=f"cli-{case[0]}") for case in CLI]


def _run_cli(base: Path, root: Path, case) -> dict:
    case_id, argv, _, _ = case
    work = root / case_id
    work.mkdir()
    for f in base.iterdir():
        (work / f.name).write_bytes(f.read_bytes())
    before = files_state(work)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), str(work)]))
    env.pop("PYTHONWARNINGS", None)
    env.pop("FORCE_COLOR", None)
    proc = subprocess.run([sys.executable, "-m", "fxprune", *argv], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    return {"proc": proc, "before": before, "after": files_state(work)}


@pytest.fixture(scope="module")
def cli_results(request, tmp_path_factory):
    """Run the selected CLI cases, two processes at a time; each test then checks its own result."""
    selected = {item.callspec.params["cli_case"][0] for item in request.session.items
                if getattr(item, "callspec", None) and "cli_case" in item.callspec.params}
    root = tmp_path_factory.mktemp("cli")
    base = root / "_base"
    base.mkdir()
    _cli_base(base)
    cases = [c for c in CLI if c[0] in selected]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip([c[0] for c in cases], pool.map(lambda c: _run_cli(base, root, c), cases)))
    return results


@pytest.mark.parametrize("cli_case", CLI_CASES)
def test_bad_command_line(cli_case, cli_results):
    case_id, argv, code, message = cli_case
    result = cli_results[case_id]
    proc = result["proc"]
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, err)
    assert err.count("\n") == 0, err                          # one line, no warnings around it
    assert err.startswith("fxprune: error: ") and "\x1b[" not in err, err
    assert message in err, err
    assert proc.stdout == "", proc.stdout
    assert result["after"] == result["before"]                # inputs untouched, nothing left behind


def test_a_successful_command_hides_third_party_warnings(tmp_path):
    """The factory and torch.export warn; only fxprune's own warning (schedule keys unused) shows."""
    _cli_base(tmp_path)
    (tmp_path / "sched.yaml").write_text(OK_YAML + "start_step: 2\nend_step: 2\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), str(tmp_path)]))
    env.pop("PYTHONWARNINGS", None)
    run = lambda *extra: subprocess.run([sys.executable, "-m", "fxprune", "prune", "userfac:noisy", "--config", "sched.yaml",
                                         "--example-inputs", "float32[2,8]", "--report", "r.json", "-q", *extra],
                                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    quiet = run()
    assert quiet.returncode == 0 and quiet.stdout == "", quiet.stderr
    warned = [line for line in quiet.stderr.splitlines() if "Warning" in line]
    assert len(warned) == 1 and "['end_step', 'start_step'] set a training schedule" in warned[0], quiet.stderr
    assert "noise" not in quiet.stderr and "\x1b[" not in quiet.stderr
    assert json.loads((tmp_path / "r.json").read_text())["totals"]["pruned_layers"] == 2
    assert not [p.name for p in tmp_path.iterdir() if "fxprune-tmp" in p.name]
    debug = run("--debug")
    assert debug.returncode == 0 and "third-party user noise" in debug.stderr


def test_outputs_move_into_place_only_when_the_whole_command_succeeds(tmp_path, monkeypatch, capsys):
    """In process: the ONNX step fails after the report and the archive were written."""
    from fxprune import cli
    from fxprune.export import onnx_export
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.yaml").write_text(OK_YAML)
    (tmp_path / "r.json").write_text("old")   # an existing output stays as it was
    seen = {}

    def failing_to_onnx(model, inputs, path, **kw):
        seen["staged"] = sorted(p.name for p in tmp_path.rglob("*") if "fxprune-tmp" in p.parent.name)
        raise ExportError(f"could not write {path}: disk full")
    monkeypatch.setattr(onnx_export, "to_onnx", failing_to_onnx)
    monkeypatch.setattr("fxprune.export.to_onnx", failing_to_onnx)
    code = cli.main(["prune", "mlp", "--config", "ok.yaml", "--report", "r.json", "--save", "s.pt2", "--onnx", "m.onnx"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "fxprune: error: could not write m.onnx: disk full"   # the user's path
    assert seen["staged"] == ["r.json", "s.pt2"]                 # both were written before the failure...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.yaml", "r.json"]   # ...and none moved in
    assert (tmp_path / "r.json").read_text() == "old"


def test_error_lines_are_plain_off_a_terminal_and_coloured_on_one(monkeypatch):
    from fxprune import cli
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(cli, "_stderr_is_terminal", lambda: False)
    assert cli._error_line("error", "\x1b[96mstep 3/3\x1b[0m failed\n  detail") == "fxprune: error: step 3/3 failed detail"
    monkeypatch.setattr(cli, "_stderr_is_terminal", lambda: True)
    assert cli._error_line("error", "x") == "fxprune: \x1b[1;31merror:\x1b[0m x"
    monkeypatch.setenv("NO_COLOR", "1")
    assert cli._error_line("error", "x") == "fxprune: error: x"
    assert len(cli._error_line("error", "y" * 5000)) < cli.MAX_ERROR_CHARS + 20


def test_pruner_with_a_bad_optimizer_leaves_no_hook():
    model = MLP()
    before = model_state(model)
    for optimizer in ("adam", torch.optim.SGD(MLP().parameters(), lr=0.1)):
        with pytest.raises(fxprune.FxPruneError):
            fxprune.Pruner(model, PRUNER_CFG, optimizer=optimizer)
    assert_same_state(before, model_state(model))
    pruner = fxprune.Pruner(model, PRUNER_CFG, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert sum(len(p._backward_hooks or {}) for p in model.parameters()) == 2   # the two selected weights
    pruner.finalize()
    assert sum(len(p._backward_hooks or {}) for p in model.parameters()) == 0


def test_override_replaces_a_builtin_and_the_registry_check_is_exact(restore_registries):
    class Everything(fxprune.BasePattern):
        def block_layout(self, geom):
            return "user replacement"
    with pytest.raises(fxprune.ExtensionError, match="override=True"):
        fxprune.register_pattern("4x1")(Everything)
    fxprune.register_pattern("4x1", override=True)(Everything)    # asked for: the exact string is now ours
    assert fxprune.PATTERNS["4x1"] is Everything
    with pytest.raises(fxprune.ConfigError, match="fits none of the 2 selected layers .*user replacement"):
        fxprune.transform(MLP(), {"pattern": "4x1"})
    assert fxprune.transform(MLP(), {"pattern": "2x1", "target_sparsity": 0.5}) is not None   # the family still
    # re-registering one's own name is fine (a notebook cell run twice)
    fxprune.register_pattern("mine")(Everything)
    fxprune.register_pattern("mine")(Everything)
    assert math.isclose(fxprune.get_pattern({"pattern": "2:4", "target_sparsity": 0.5}).target_sparsity, 0.5)
