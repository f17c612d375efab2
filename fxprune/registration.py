"""A name -> class registry filled by a class decorator (the pattern and criterion registries)."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", bound=type)


class Registry(dict):
    """``name -> class``; :meth:`decorator` makes the ``@register_...(name)`` decorator, which
    checks the registration (:func:`fxprune.extensions.check_registration`: a subclass of
    ``base`` under a non-empty name, not replacing a built-in unless ``override=True``) and stores
    the name on the class as ``name_attr``. ``claims(name, cls)``, when set, lists the strings a
    built-in handles that registering ``cls`` would take (pattern families)."""

    def __init__(self, base: type, decorator_name: str, name_attr: str, example: str):
        super().__init__()
        self.base, self.decorator_name, self.name_attr, self.example = base, decorator_name, name_attr, example
        self.claims: Callable[[str, type], list] | None = None

    def decorator(self, name: str, override: bool = False) -> Callable[[T], T]:
        from .extensions import check_registration   # late: extensions reads the registries' classes
        kind = self.decorator_name.removeprefix("register_")
        if not isinstance(name, str) or not name.strip():
            check_registration(kind, name, None, self.base, self, override, example=self.example)

        def decorate(cls: T) -> T:
            claims = None if self.claims is None else (lambda c, _: self.claims(name, c))
            check_registration(kind, name, cls, self.base, self, override, claims=claims,
                               example=self.example)
            setattr(cls, self.name_attr, name)
            self[name] = cls
            return cls

        return decorate
