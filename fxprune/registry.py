"""The registries in one place: patterns (``@register_pattern``) and criteria
(``@register_criterion``), looking names up, and checking a config's names against them.

Each registry lives beside its base class (:mod:`fxprune.patterns.base`,
:mod:`fxprune.criteria.base`); this module adds what needs both, and registers the name checks
with the config (so :mod:`fxprune.config` imports no registry: no import cycle).
"""
from __future__ import annotations

from typing import Any, Mapping

from .config import GroupConfig, PruningConfig, add_group_check
from .errors import ConfigError
from .extensions import calling, check_channel_capabilities
from .criteria.base import CRITERIA, get_criterion_class, register_criterion
from .patterns.base import PATTERNS, BasePattern, get_pattern_class, register_pattern

__all__ = ["CRITERIA", "PATTERNS", "check_names", "get_criterion_class", "get_pattern",
           "get_pattern_class", "register_criterion", "register_pattern", "registries"]


def get_pattern(config: Any, modules: Mapping[str, Any] | None = None) -> BasePattern:
    """Build the pattern object for one pruning group (INC's signature).

    ``config`` is a resolved group (``GroupConfig``), a dict of config keys or a pattern string.
    """
    if isinstance(config, str):
        config = {"pattern": config}
    if not isinstance(config, (GroupConfig, Mapping)):
        raise ConfigError(f"get_pattern takes a pattern name, a dict of config keys or a resolved "
                          f"group, got {type(config).__name__}")
    if not isinstance(config, GroupConfig):
        config = PruningConfig.from_any(dict(config)).groups()[0]
    cls = get_pattern_class(config.pattern, where=config.where)
    with calling(cls, "__init__", f"for {config.where}"):
        pattern = cls(config, modules)
    check_channel_capabilities(pattern)
    return pattern


def check_names(group: GroupConfig) -> None:
    """A group's ``pruning_type`` and ``pattern`` name registered classes, and the pattern takes
    the group's config (e.g. 2:4 above 50 % is an error); ConfigError naming the group otherwise."""
    get_criterion_class(group.pruning_type, where=group.where)
    cls = get_pattern_class(group.pattern, where=group.where)
    with calling(cls, "check_config", f"for {group.where}"):
        cls.check_config(group)


def registries() -> dict[str, dict[str, str]]:
    """What the registries hold, name -> ``module.Class`` (user registrations included)."""
    def describe(cls: type) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"
    return {"patterns": {name: describe(cls) for name, cls in PATTERNS.items()},
            "criteria": {name: describe(cls) for name, cls in CRITERIA.items()}}


add_group_check(check_names)
