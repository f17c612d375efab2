"""A name -> class registry filled by a class decorator (the pattern and criterion registries)."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", bound=type)


class Registry(dict):
    """``name -> class``; :meth:`decorator` makes the ``@register_...(name)`` decorator, which
    checks the class derives from ``base`` and stores the name on it as ``name_attr``."""

    def __init__(self, base: type, decorator_name: str, name_attr: str, example: str):
        super().__init__()
        self.base, self.decorator_name, self.name_attr, self.example = base, decorator_name, name_attr, example

    def decorator(self, name: str) -> Callable[[T], T]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.decorator_name} needs a non-empty name, e.g. "
                             f"@{self.decorator_name}({self.example!r})")

        def decorate(cls: T) -> T:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"@{self.decorator_name}({name!r}) must decorate a subclass of "
                                f"fxprune.{self.base.__name__}")
            setattr(cls, self.name_attr, name)
            self[name] = cls
            return cls

        return decorate
