"""The pattern registry: ``@register_pattern(name)`` and ``get_pattern(config, modules)``.

A registered name is either an exact pattern string (``"myblock"``) or a family that parses many
strings (``"NxM"`` takes ``"4x1"``, ``"1xchannel"``...; ``"N:M"`` takes ``"2:4"``); a family class
says which strings it takes through its ``matches`` classmethod.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, TypeVar

from .errors import ConfigError

PATTERNS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register_pattern(name: str) -> Callable[[T], T]:
    """Class decorator: make a :class:`~fxprune.BasePattern` subclass usable as ``pattern: name``."""
    if not isinstance(name, str) or not name:
        raise ValueError("register_pattern needs a non-empty pattern name, e.g. @register_pattern('myblock')")

    def decorate(cls: T) -> T:
        from .patterns.base import BasePattern

        if not (isinstance(cls, type) and issubclass(cls, BasePattern)):
            raise TypeError(f"@register_pattern({name!r}) must decorate a subclass of fxprune.BasePattern")
        cls.registered_name = name
        PATTERNS[name] = cls
        return cls

    return decorate


def get_pattern_class(pattern: str, where: str = "config") -> type:
    """The class registered for ``pattern``: an exact name first, then the families."""
    _load_builtin_patterns()
    if not isinstance(pattern, str):
        raise ConfigError(f"{where}: pattern must be a string such as '4x1' or '2:4', got {pattern!r}")
    if pattern in PATTERNS and PATTERNS[pattern].matches(pattern):
        return PATTERNS[pattern]
    for cls in reversed(list(PATTERNS.values())):  # user registrations win over built-ins
        if cls.matches(pattern):
            return cls
    raise ConfigError(f"{where}: unknown pattern {pattern!r}; registered patterns: "
                      f"{', '.join(PATTERNS)} (e.g. '4x1', '1x1', '1xchannel', 'channelx1', '2:4'); "
                      f"register your own with @fxprune.register_pattern(name)")


def get_pattern(config: Any, modules: Mapping[str, Any] | None = None):
    """Build the pattern object for one pruning group (INC's signature).

    ``config`` is a resolved group (``GroupConfig``), a dict of config keys or a pattern string.
    """
    from .config import GroupConfig, PruningConfig

    if isinstance(config, str):
        config = {"pattern": config}
    if not isinstance(config, GroupConfig):
        config = PruningConfig.from_any(dict(config)).groups()[0]
    cls = get_pattern_class(config.pattern, where=config.where)
    return cls(config, modules)


def _load_builtin_patterns() -> None:
    from . import patterns  # noqa: F401  (registers NxM and N:M on import)
