"""Pruning config: parsing, defaults, validation and group inheritance, all in one place.

Key names follow Intel Neural Compressor's ``WeightPruningConfig`` so an INC config can be pasted
as is. Unlike INC, an unknown key is an error that names the closest valid key.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import functools
import re
import warnings
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError
from .schedule import DECAY_TYPES

GROUP, GLOBAL = "group", "global"


@dataclass(frozen=True)
class Key:
    """One config key, declared once: its default, where it may be set and the form it takes.

    ``scope``: ``group`` keys may be set per pruning group (each group inherits the global value
    of a key it does not set); ``global`` keys only at the top level. ``form`` is the expected
    form in words, as error messages show it; ``check(value)`` says whether a value has that form
    (for a list key with ``each``, whether one entry has it); ``None``: no check here (a key
    checked where it is used, such as the schedule keys in :mod:`fxprune.schedule`, or a name
    checked against a registry by :mod:`fxprune.registry`). ``schedule``: an INC training-schedule
    key, used by :class:`fxprune.Pruner` only.
    """

    name: str
    default: Any
    scope: str
    form: str
    check: Callable[[Any], bool] | None = None
    each: bool = False
    schedule: bool = False
    doc: str = ""


def _number(lo: float, hi: float, hi_open: bool = False) -> Callable[[Any], bool]:
    def check(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            return False
        return lo <= v < hi if hi_open else lo <= v <= hi
    return check


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda v: v in choices


def _is_bool(v) -> bool:
    return isinstance(v, bool)


def _int_at_least_one(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= 1


def _is_str(v) -> bool:
    return isinstance(v, str)


def _name(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _int_at_least_zero(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= 0


def _str_or_none(v) -> bool:
    return v is None or isinstance(v, str)


def _groups(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(g, Mapping) for g in v)


SCOPES = ("global", "local")
REDUCE_TYPES = ("mean", "sum", "max")

# Every config key, in the order the docs list them.
KEYS: tuple[Key, ...] = (
    Key("target_sparsity", 0.9, GROUP, "a number in [0, 1)", _number(0.0, 1.0, hi_open=True),
        doc="fraction of the selected weights to zero"),
    Key("pattern", "4x1", GROUP, "a registered pattern name such as '4x1' or '2:4'", _name,
        doc="how weights are grouped into blocks (checked against the pattern registry)"),
    Key("pruning_type", "magnitude", GROUP, "a registered criterion name such as 'magnitude'", _name,
        doc="the criterion that scores weights (checked against the criterion registry)"),
    Key("pruning_scope", "global", GROUP, f"one of {list(SCOPES)}", _one_of(*SCOPES),
        doc="global: one ranking over the group's layers; local: each layer reaches the target"),
    Key("op_names", [], GROUP, "a list of regex strings", _is_str, each=True,
        doc="regexes, re.search against the module name; empty selects all"),
    Key("excluded_op_names", [], GROUP, "a list of regex strings", _is_str, each=True,
        doc="regexes; exclusion wins"),
    Key("pruning_op_types", ["Conv", "Linear"], GROUP, "a list of strings such as ['Conv', 'Linear']",
        _is_str, each=True, doc="substrings of the module class name"),
    Key("max_sparsity_ratio_per_op", 0.98, GROUP, "a number in [0, 1]", _number(0.0, 1.0),
        doc="no layer goes above it"),
    Key("min_sparsity_ratio_per_op", 0.0, GROUP, "a number in [0, 1]", _number(0.0, 1.0),
        doc="no selected layer stays below it"),
    Key("criterion_reduce_type", "mean", GROUP, f"one of {list(REDUCE_TYPES)}", _one_of(*REDUCE_TYPES),
        doc="block score = mean / sum / max of its element scores"),
    Key("sparse_gpt_refine_steps", 0, GROUP, "an integer >= 0", _int_at_least_zero,
        doc="sparse_gpt: conjugate-gradient steps that re-fit each layer's kept weights to its "
            "calibration error once the mask is chosen (0: SparseGPT as published)"),
    Key("sparse_gpt_act_order", True, GROUP, "true or false", _is_bool,
        doc="sparse_gpt, unstructured masks chosen block by block (local 1x1): process the "
            "columns by descending input energy diag(H) (GPTQ's act order) instead of left to "
            "right; N:M, fixed masks and the whole-model path (block_sequential: false) keep "
            "the original order"),
    # INC's training-schedule keys: accepted so an INC config pastes as is; they only matter for
    # gradual pruning during training (fxprune.Pruner), not for the one-shot transform.
    Key("start_step", 0, GROUP, "an integer >= 0", _int_at_least_zero, schedule=True,
        doc="first pruning step"),
    Key("end_step", 0, GROUP, "an integer >= 0", _int_at_least_zero, schedule=True,
        doc="last pruning step"),
    Key("pruning_frequency", 1, GROUP, "an integer >= 1", _int_at_least_one, schedule=True,
        doc="steps between pruning steps"),
    Key("sparsity_decay_type", "exp", GROUP, f"one of {list(DECAY_TYPES)}", _one_of(*DECAY_TYPES),
        schedule=True, doc="how the sparsity grows over the pruning steps"),
    # Accepted so INC configs paste, not used: only their form is checked.
    Key("reg_type", None, GROUP, "null or a string such as 'group_lasso' (accepted, not used)",
        _str_or_none, schedule=True, doc="INC's regularisation"),
    Key("resume_from_pruned_checkpoint", False, GROUP, "true or false (accepted, not used)", _is_bool,
        schedule=True, doc="INC's resume flag"),
    Key("low_memory_usage", False, GROUP, "true or false (accepted, not used)", _is_bool, schedule=True,
        doc="INC's memory flag"),
    Key("pruning_configs", [{}], GLOBAL, "a non-empty list of dicts (use [{}] to prune with the "
        "global keys only)", _groups,
        doc="the pruning groups; each inherits the global keys it does not set"),
    # INC excludes the last linear layer (the classifier / lm_head); so do we, and this turns it off.
    Key("exclude_last_linear", True, GLOBAL, "true or false", _is_bool,
        doc="leave the graph's last linear layer dense"),
    Key("compact", False, GLOBAL, "true or false", _is_bool,
        doc="physically remove pruned output channels (channel patterns)"),
    # Dense kernels run fastest on multiples of 8 or 16 channels.
    Key("round_channels_to", 1, GLOBAL, "an integer >= 1", _int_at_least_one,
        doc="with compact: keep a multiple of this many channels in every compacted channel group"),
    # Block-sequential calibration of the data-aware criteria (docs/llm.md).
    Key("block_sequential", "auto", GLOBAL, "'auto', true or false",
        lambda v: isinstance(v, bool) or v == "auto",
        doc="auto: calibrate activation / sparse_gpt groups block by block when the model has "
            "repeated blocks and the group allows it; true: require it; false: whole-model path"),
    Key("block_propagation", "pruned", GLOBAL, "one of ['pruned', 'dense']", _one_of("pruned", "dense"),
        doc="where a block's calibration inputs come from: the previous block after pruning (as "
            "SparseGPT, Wanda and llm-compressor) or before (the whole-model statistics)"),
    Key("block_list", None, GLOBAL, "the name of a ModuleList (e.g. 'model.layers') or null",
        lambda v: v is None or isinstance(v, str),
        doc="the ModuleList of repeated blocks; null finds the largest one"),
    Key("activation_cache_mb", 1024, GLOBAL, "a number >= 0 (MiB)", _number(0.0, float("inf")),
        doc="RAM for the hidden states cached between blocks; beyond it they spill to temp files"),
    Key("true_sequential", False, GLOBAL, "true or false", _is_bool,
        doc="block by block: prune a block's layers in stages in forward order (q/k/v; o; "
            "gate/up; down), each stage's inputs recorded with the earlier stages pruned"),
    Key("block_batch_tokens", 512, GLOBAL, "an integer >= 0", lambda v: not isinstance(v, bool)
        and isinstance(v, int) and v >= 0,
        doc="calibration batches are concatenated into block batches of up to this many tokens "
            "(0: as given)"),
)

KEY = {k.name: k for k in KEYS}
GROUP_KEYS = tuple(k.name for k in KEYS if k.scope == GROUP)
GLOBAL_KEYS = tuple(k.name for k in KEYS if k.scope == GLOBAL)
SCHEDULE_KEYS = tuple(k.name for k in KEYS if k.schedule)
ALL_KEYS = GROUP_KEYS + GLOBAL_KEYS


def default(name: str) -> Any:
    """A fresh copy of the key's default (lists are not shared between configs)."""
    return copy.deepcopy(KEY[name].default)


def _field(key: Key):
    if isinstance(key.default, (list, dict)):
        return field(default_factory=functools.partial(default, key.name))
    return field(default=key.default)


class _GroupConfigMethods:
    @property
    def where(self) -> str:
        return f"pruning_configs[{self.index}]"


# One pruning group with every key resolved (own value, else the global one, else the default);
# list keys as tuples, the schedule keys in ``schedule``.
GroupConfig = make_dataclass(
    "GroupConfig",
    [("index", int)] + [(k.name, Any) for k in KEYS if k.scope == GROUP and not k.schedule]
    + [("schedule", Mapping, field(default_factory=dict))],
    bases=(_GroupConfigMethods,), frozen=True, namespace={"__module__": __name__})
GroupConfig.__doc__ = "One pruning group with every key resolved (own value, else global, else default)."

# Group checks added by the registries (pattern and criterion names): config.py does not import
# them, so there is no import cycle; fxprune's package import registers them.
_GROUP_CHECKS: list[Callable[[Any], None]] = []


def add_group_check(check: Callable[[Any], None]) -> None:
    """Run ``check(group)`` on every resolved group when a config is validated (raise ConfigError)."""
    if check not in _GROUP_CHECKS:
        _GROUP_CHECKS.append(check)


class _PruningConfigMethods:
    # ------------------------------------------------------------------ construction
    @classmethod
    def from_any(cls, config) -> "PruningConfig":
        """Accept a PruningConfig, a dict, or the path of a YAML/JSON file; validate it."""
        if config is None:
            config = {}
        if isinstance(config, PruningConfig):
            cfg = copy.deepcopy(config)
        elif isinstance(config, (str, Path)):
            cfg = cls.from_dict(load_config_file(config), source=str(config))
        elif isinstance(config, Mapping):
            cfg = cls.from_dict(config)
        elif isinstance(config, list):  # INC's template: WeightPruningConfig([{group}, ...])
            cfg = cls.from_dict({"pruning_configs": config})
        else:
            raise ConfigError(
                f"config must be a dict, a list of pruning groups, a YAML/JSON file path or "
                f"fxprune.PruningConfig, got {type(config).__name__}")
        cfg.validate()
        return cfg

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "config") -> "PruningConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(d).__name__}")
        # INC's YAML nests everything under `pruning: {approach: {weight_compression: ...}}`
        # in 1.x; 2.x's WeightPruningConfig is flat, which is what we take.
        _check_keys(d, ALL_KEYS, source)
        kwargs = {k: copy.deepcopy(v) for k, v in d.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    # ------------------------------------------------------------------ groups
    def groups(self) -> list:
        """Resolve each entry of ``pruning_configs`` against the global keys."""
        resolved = []
        for i, own in enumerate(self.pruning_configs):
            merged = {k: getattr(self, k) for k in GROUP_KEYS} | dict(own)
            values = {}
            for name in GROUP_KEYS:
                if KEY[name].schedule:
                    continue
                v = merged[name]
                values[name] = (tuple(_as_list(v)) if isinstance(KEY[name].default, list)
                                else str(v) if name == "pattern" else v)
            resolved.append(GroupConfig(index=i, **values,
                                        schedule={k: merged[k] for k in SCHEDULE_KEYS}))
        return resolved

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the key (and group), the value and the expected form for
        anything invalid. Every value is checked against its key's declaration as written (top
        level, then each group's own), before groups are resolved; then each resolved group's
        cross-key rules and registered names."""
        if isinstance(self.pruning_configs, list):
            for i, own in enumerate(self.pruning_configs):
                if not isinstance(own, Mapping):
                    raise ConfigError(f"pruning_configs[{i}] must be a dict of keys, got "
                                      f"{type(own).__name__}")
        for key in KEYS:
            check_value(key, getattr(self, key.name))
        for i, own in enumerate(self.pruning_configs):
            _check_keys(own, GROUP_KEYS, f"pruning_configs[{i}]")
            for name, value in own.items():
                check_value(KEY[name], value, f"pruning_configs[{i}]")
        for group in self.groups():
            _validate_group(group)

    def warn_ignored_keys(self) -> None:
        """Say so, instead of silently, where a one-shot run ignores a key that was set: INC's
        training-schedule keys, and ``sparse_gpt_refine_steps`` on a group of another criterion."""
        groups = self.groups()
        set_keys = sorted({k for g in groups for k, v in g.schedule.items() if v != KEY[k].default})
        if set_keys:
            warnings.warn(
                f"config keys {set_keys} set a training schedule; fxprune.transform prunes in one "
                f"shot and does not use them", stacklevel=3)
        for g in groups:
            if g.sparse_gpt_refine_steps and g.pruning_type != "sparse_gpt":
                warnings.warn(f"{g.where}: sparse_gpt_refine_steps applies to pruning_type "
                              f"sparse_gpt only; this group's is {g.pruning_type}, so it is not used",
                              stacklevel=3)


# The typed config: one field per key of KEYS. Build it directly (``PruningConfig(pattern="2:4")``)
# or with ``PruningConfig.from_any`` from a dict or a YAML/JSON file.
PruningConfig = make_dataclass(
    "PruningConfig", [(k.name, Any, _field(k)) for k in KEYS],
    bases=(_PruningConfigMethods,), namespace={"__module__": __name__})
PruningConfig.__doc__ = ("The typed config, one field per key of ``fxprune.config.KEYS``. Build it "
                         "directly, or with :meth:`from_any` from a dict or YAML/JSON file.")


def check_value(key: Key, value: Any, where: str = "") -> None:
    """ConfigError naming the key, the value and the key's form when ``value`` does not have it.

    A list key (``each``) takes a list or tuple of entries of the form, a single entry (one
    string for a list of strings) or null (empty)."""
    if key.check is None:
        return
    prefix = f"{where}: " if where else ""
    if not key.each:
        if not key.check(value):
            raise ConfigError(f"{prefix}{key.name} must be {key.form}, got {_shown(value)}")
        return
    if value is None or isinstance(value, str):
        entries = [] if value is None else [value]
    elif isinstance(value, (list, tuple)):
        entries = value
    else:
        raise ConfigError(f"{prefix}{key.name} must be {key.form}, got {_shown(value)}")
    for i, v in enumerate(entries):
        if not key.check(v):
            raise ConfigError(f"{prefix}{key.name} must be {key.form}, got {_shown(value)} "
                              f"(entry {i}: {_shown(v)})")


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (an error message stays one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _validate_group(g) -> None:
    where = g.where
    for name in ("target_sparsity", "max_sparsity_ratio_per_op", "min_sparsity_ratio_per_op"):
        check_value(KEY[name], getattr(g, name), where)
    if g.min_sparsity_ratio_per_op > g.max_sparsity_ratio_per_op:
        raise ConfigError(
            f"{where}: min_sparsity_ratio_per_op ({g.min_sparsity_ratio_per_op}) is above "
            f"max_sparsity_ratio_per_op ({g.max_sparsity_ratio_per_op}); lower the min or raise the max")
    for name in ("pruning_scope", "criterion_reduce_type", "op_names", "excluded_op_names"):
        check_value(KEY[name], getattr(g, name), where)
    for key in ("op_names", "excluded_op_names"):
        for rx in getattr(g, key):
            try:
                re.compile(rx)
            except re.error as e:
                raise ConfigError(f"{where}: {key} entry {rx!r} is not a valid regex: {e}") from None
    check_value(KEY["pruning_op_types"], g.pruning_op_types, where)
    for check in _GROUP_CHECKS:
        check(g)


def _as_list(v) -> list:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    return list(v)


def _check_keys(d: Mapping, valid: tuple[str, ...], source: str) -> None:
    for key in d:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
            extra = ""
            if key in GLOBAL_KEYS and source.startswith("pruning_configs"):
                extra = f" ({key!r} is a top-level key; move it out of the group)"
            raise ConfigError(f"{source}: unknown key {key!r}{extra}; {hint}")


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file; the error names the file and what is wrong with it."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a directory; pass the path of a YAML/JSON file")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass a dict or the path of a "
                          f"YAML/JSON file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {e.start}); save it as "
                          f"UTF-8 YAML or JSON") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.load(text, Loader=_yaml_loader())
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        raise ConfigError(f"config file {str(p)!r} is not valid {p.suffix.lstrip('.').upper() or 'YAML'}: "
                          f"{_parse_error_line(e)}") from None
    if data is None:
        data = {}
    if isinstance(data, list):  # a list of pruning groups, as INC's WeightPruningConfig takes
        data = {"pruning_configs": data}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys, got {type(data).__name__}")
    # Accept INC 2.x style files that wrap the keys in a top-level `pruning:` / `WeightPruningConfig:`.
    for wrapper in ("pruning", "WeightPruningConfig"):
        if set(data) == {wrapper} and isinstance(data[wrapper], dict):
            data = data[wrapper]
    return data


@functools.lru_cache(maxsize=1)
def _yaml_loader():
    """PyYAML's safe loader with YAML 1.2 numbers and no duplicate keys.

    YAML 1.1 (PyYAML's default) reads an unquoted ``pattern: 2:4`` as the sexagesimal integer 124
    and ``target_sparsity: 5e-1`` as a string; a repeated key silently keeps the last value."""
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    int_tag, float_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
    ConfigLoader.yaml_implicit_resolvers = {
        first: [r for r in resolvers if r[0] not in (int_tag, float_tag)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    ConfigLoader.add_implicit_resolver(
        int_tag, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
    ConfigLoader.add_constructor(int_tag, lambda loader, node: _yaml12_int(loader.construct_scalar(node)))
    ConfigLoader.add_implicit_resolver(
        float_tag, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    return ConfigLoader


def _yaml12_int(text: str) -> int:
    """A YAML 1.2 integer: decimal (a leading zero is not octal), ``0o`` octal or ``0x`` hex."""
    return int(text, 0) if text[:2].lower() in ("0o", "0x") else int(text)


def _parse_error_line(e: Exception) -> str:
    """A YAML/JSON syntax error in one line: where, then what (PyYAML's own message spans 5-8
    lines with a snippet and a caret)."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        problem = getattr(e, "problem", None) or "syntax error"
        context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and start is not None:
            context += f" that starts at line {start.line + 1}, column {start.column + 1}"
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f" ({context})" if context else "")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__

