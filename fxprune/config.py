"""Pruning config: parsing, defaults, validation and group inheritance, all in one place.

Key names follow Intel Neural Compressor's ``WeightPruningConfig`` so an INC config can be pasted
as is. Unlike INC, an unknown key is an error that names the closest valid key.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import re
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

# Keys a pruning group may set; each group inherits the global value of a key it does not set.
GROUP_DEFAULTS: dict[str, Any] = {
    "target_sparsity": 0.9,
    "pattern": "4x1",
    "pruning_type": "magnitude",
    "pruning_scope": "global",
    "op_names": [],
    "excluded_op_names": [],
    "pruning_op_types": ["Conv", "Linear"],
    "max_sparsity_ratio_per_op": 0.98,
    "min_sparsity_ratio_per_op": 0.0,
    "criterion_reduce_type": "mean",
    # INC's training-schedule keys: accepted so an INC config pastes as is; they only matter for
    # gradual pruning during training, not for the one-shot transform.
    "start_step": 0,
    "end_step": 0,
    "pruning_frequency": 1,
    "sparsity_decay_type": "exp",
    "reg_type": None,
    "resume_from_pruned_checkpoint": False,
    "low_memory_usage": False,
}
SCHEDULE_KEYS = ("start_step", "end_step", "pruning_frequency", "sparsity_decay_type", "reg_type",
                 "resume_from_pruned_checkpoint", "low_memory_usage")

# Keys that only exist at the top level.
GLOBAL_DEFAULTS: dict[str, Any] = {
    "pruning_configs": [{}],
    # INC excludes the last linear layer (the classifier / lm_head); so do we, and this turns it off.
    "exclude_last_linear": True,
    # Physically remove pruned channels (channel patterns only).
    "compact": False,
    # With compact: keep a multiple of this many channels in every compacted channel group
    # (rounding the kept count up: dense kernels run fastest on multiples of 8 or 16).
    "round_channels_to": 1,
}

ALL_KEYS = tuple(GROUP_DEFAULTS) + tuple(GLOBAL_DEFAULTS)
SCOPES = ("global", "local")
REDUCE_TYPES = ("mean", "sum", "max")


@dataclass(frozen=True)
class GroupConfig:
    """One pruning group with every key resolved (own value, else the global one, else default)."""

    index: int
    target_sparsity: float
    pattern: str
    pruning_type: str
    pruning_scope: str
    op_names: tuple[str, ...]
    excluded_op_names: tuple[str, ...]
    pruning_op_types: tuple[str, ...]
    max_sparsity_ratio_per_op: float
    min_sparsity_ratio_per_op: float
    criterion_reduce_type: str
    schedule: Mapping[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"pruning_configs[{self.index}]"


@dataclass
class PruningConfig:
    """The typed config. Build it directly, or with :meth:`from_any` from a dict or YAML/JSON file."""

    target_sparsity: float = GROUP_DEFAULTS["target_sparsity"]
    pattern: str = GROUP_DEFAULTS["pattern"]
    pruning_type: str = GROUP_DEFAULTS["pruning_type"]
    pruning_scope: str = GROUP_DEFAULTS["pruning_scope"]
    op_names: list = field(default_factory=list)
    excluded_op_names: list = field(default_factory=list)
    pruning_op_types: list = field(default_factory=lambda: list(GROUP_DEFAULTS["pruning_op_types"]))
    max_sparsity_ratio_per_op: float = GROUP_DEFAULTS["max_sparsity_ratio_per_op"]
    min_sparsity_ratio_per_op: float = GROUP_DEFAULTS["min_sparsity_ratio_per_op"]
    criterion_reduce_type: str = GROUP_DEFAULTS["criterion_reduce_type"]
    start_step: int = GROUP_DEFAULTS["start_step"]
    end_step: int = GROUP_DEFAULTS["end_step"]
    pruning_frequency: int = GROUP_DEFAULTS["pruning_frequency"]
    sparsity_decay_type: str = GROUP_DEFAULTS["sparsity_decay_type"]
    reg_type: Any = GROUP_DEFAULTS["reg_type"]
    resume_from_pruned_checkpoint: bool = GROUP_DEFAULTS["resume_from_pruned_checkpoint"]
    low_memory_usage: bool = GROUP_DEFAULTS["low_memory_usage"]
    pruning_configs: list = field(default_factory=lambda: copy.deepcopy(GLOBAL_DEFAULTS["pruning_configs"]))
    exclude_last_linear: bool = GLOBAL_DEFAULTS["exclude_last_linear"]
    compact: bool = GLOBAL_DEFAULTS["compact"]
    round_channels_to: int = GLOBAL_DEFAULTS["round_channels_to"]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_any(cls, config: "PruningConfig | Mapping | str | Path | None") -> "PruningConfig":
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
    def groups(self) -> list[GroupConfig]:
        """Resolve each entry of ``pruning_configs`` against the global keys."""
        resolved = []
        for i, own in enumerate(self.pruning_configs):
            merged = {k: getattr(self, k) for k in GROUP_DEFAULTS} | dict(own)
            resolved.append(GroupConfig(
                index=i,
                target_sparsity=merged["target_sparsity"],
                pattern=str(merged["pattern"]),
                pruning_type=merged["pruning_type"],
                pruning_scope=merged["pruning_scope"],
                op_names=tuple(_as_list(merged["op_names"])),
                excluded_op_names=tuple(_as_list(merged["excluded_op_names"])),
                pruning_op_types=tuple(_as_list(merged["pruning_op_types"])),
                max_sparsity_ratio_per_op=merged["max_sparsity_ratio_per_op"],
                min_sparsity_ratio_per_op=merged["min_sparsity_ratio_per_op"],
                criterion_reduce_type=merged["criterion_reduce_type"],
                schedule={k: merged[k] for k in SCHEDULE_KEYS},
            ))
        return resolved

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the key (and group) for anything invalid."""
        if not isinstance(self.pruning_configs, list) or not self.pruning_configs:
            raise ConfigError("pruning_configs must be a non-empty list of dicts "
                              "(use [{}] to prune with the global keys only)")
        for i, own in enumerate(self.pruning_configs):
            if not isinstance(own, Mapping):
                raise ConfigError(f"pruning_configs[{i}] must be a dict of keys, got {type(own).__name__}")
            _check_keys(own, tuple(GROUP_DEFAULTS), f"pruning_configs[{i}]")
        for key in ("exclude_last_linear", "compact"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        r = self.round_channels_to
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError(f"round_channels_to must be an integer >= 1, got {r!r}")
        for group in self.groups():
            _validate_group(group)

    def warn_unused_schedule(self) -> None:
        """The one-shot transform ignores INC's training-schedule keys: say so instead of silently."""
        set_keys = sorted({k for g in self.groups() for k, v in g.schedule.items()
                           if v != GROUP_DEFAULTS[k]})
        if set_keys:
            warnings.warn(
                f"config keys {set_keys} set a training schedule; fxprune.transform prunes in one "
                f"shot and does not use them", stacklevel=3)


def _validate_group(g: GroupConfig) -> None:
    from .registry import get_pattern_class  # late: the registry imports the patterns
    from .criteria import get_criterion_class

    where = g.where
    t = g.target_sparsity
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 <= t < 1.0) or math.isnan(t):
        raise ConfigError(f"{where}: target_sparsity must be a number in [0, 1), got {t!r}")
    for key in ("max_sparsity_ratio_per_op", "min_sparsity_ratio_per_op"):
        v = getattr(g, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= v <= 1.0):
            raise ConfigError(f"{where}: {key} must be a number in [0, 1], got {v!r}")
    if g.min_sparsity_ratio_per_op > g.max_sparsity_ratio_per_op:
        raise ConfigError(
            f"{where}: min_sparsity_ratio_per_op ({g.min_sparsity_ratio_per_op}) is above "
            f"max_sparsity_ratio_per_op ({g.max_sparsity_ratio_per_op}); lower the min or raise the max")
    if g.pruning_scope not in SCOPES:
        raise ConfigError(f"{where}: pruning_scope must be one of {list(SCOPES)}, got {g.pruning_scope!r}")
    if g.criterion_reduce_type not in REDUCE_TYPES:
        raise ConfigError(f"{where}: criterion_reduce_type must be one of {list(REDUCE_TYPES)}, "
                          f"got {g.criterion_reduce_type!r}")
    for key in ("op_names", "excluded_op_names"):
        for rx in getattr(g, key):
            if not isinstance(rx, str):
                raise ConfigError(f"{where}: {key} must be a list of regex strings, got {rx!r}")
            try:
                re.compile(rx)
            except re.error as e:
                raise ConfigError(f"{where}: {key} entry {rx!r} is not a valid regex: {e}") from None
    for t_ in g.pruning_op_types:
        if not isinstance(t_, str):
            raise ConfigError(f"{where}: pruning_op_types must be a list of strings such as "
                              f"['Conv', 'Linear'], got {t_!r}")
    get_criterion_class(g.pruning_type, where=where)
    pattern_cls = get_pattern_class(g.pattern, where=where)
    pattern_cls.check_config(g)


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
            if key in GLOBAL_DEFAULTS and source.startswith("pruning_configs"):
                extra = f" ({key!r} is a top-level key; move it out of the group)"
            raise ConfigError(f"{source}: unknown key {key!r}{extra}; {hint}")


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file; the error names the file and what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass a dict or the path of a "
                          f"YAML/JSON file")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
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

