"""The boundary between fxprune and user extensions (registered patterns and criteria).

What a user class returns is checked where fxprune receives it, against the contract its base
class writes down (:class:`~fxprune.BasePattern`, :class:`~fxprune.Criterion`); an exception
raised inside user code is re-raised as an :class:`~fxprune.ExtensionError`. Either way the
message names the user class and method, the layer and what was wrong, instead of a raw
``IndexError`` from fxprune's internals later on. Built-in classes are trusted: an exception
from fxprune's own code is a bug and propagates as it is.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from .errors import ExtensionError, FxPruneError, describe


def is_user_code(fn: Any) -> bool:
    """Whether ``fn`` (a function, method or class) was defined outside the fxprune package."""
    fn = getattr(fn, "__func__", fn)
    module = getattr(fn, "__module__", None) or ""
    return not (module == "fxprune" or module.startswith("fxprune."))


def who(obj: Any, method: str) -> str:
    """``pattern '2:4' (MyPattern.block_layout)`` / ``criterion 'mine' (MyCriterion.view_scores)``."""
    cls = obj if isinstance(obj, type) else type(obj)
    if hasattr(cls, "view_scores"):   # a Criterion (no import: the criteria import this module)
        return f"criterion {getattr(cls, 'name', '') or cls.__name__!r} ({cls.__qualname__}.{method})"
    name = getattr(obj, "pattern", None) if not isinstance(obj, type) else None
    name = name or getattr(cls, "registered_name", "") or cls.__name__
    return f"pattern {name!r} ({cls.__qualname__}.{method})"


@contextlib.contextmanager
def calling(obj: Any, method: str, where: str = "") -> Iterator[None]:
    """Run user code: an exception from ``obj.method`` (when it is user code) becomes an
    ExtensionError naming the class, the method and ``where`` (e.g. "for layer fc1")."""
    try:
        yield
    except FxPruneError:
        raise
    except Exception as e:
        fn = getattr(obj if isinstance(obj, type) else type(obj), method, None)
        if fn is None or not is_user_code(fn):
            raise
        raise ExtensionError(f"{who(obj, method)} raised {describe(e)}{' ' + where if where else ''}; "
                             f"fix the extension (its traceback is chained to this error)") from e


def layer_of(t) -> str:
    return f"layer {t.name} ({t.param})"


# ---------------------------------------------------------------------- patterns
def check_block_layout(pattern, t, layout, layout_type: type) -> None:
    """``block_layout``'s answer for target ``t``: a non-empty skip reason, or a BlockLayout
    (``layout_type``) whose blocks tile the layer's 2-D view."""
    def bad(what: str) -> ExtensionError:
        return ExtensionError(f"{who(pattern, 'block_layout')} returned {what} for {layer_of(t)} "
                              f"(view {tuple(t.geometry.view_shape)}); it must return a "
                              f"fxprune.BlockLayout or a string saying why the pattern does not fit")

    if isinstance(layout, str):
        if not layout.strip():
            raise bad("an empty skip reason")
        return
    if not isinstance(layout, layout_type):
        raise bad(f"{type(layout).__name__} {_short(layout)}")
    shape, dims, weights = layout.shape, layout.reduce_dims, layout.block_weights
    if not (isinstance(shape, tuple) and shape and all(_positive_int(s) for s in shape)):
        raise bad(f"a BlockLayout whose shape {shape!r} is not a tuple of positive integers")
    view = tuple(t.geometry.view_shape)
    if math.prod(shape) != math.prod(view):
        raise bad(f"a BlockLayout of shape {shape} ({math.prod(shape)} weights) for a view of "
                  f"{math.prod(view)} weights")
    if not (isinstance(dims, tuple) and all(_int(d) and 0 <= d < len(shape) for d in dims)
            and len(set(dims)) == len(dims)):
        raise bad(f"a BlockLayout whose reduce_dims {dims!r} are not distinct dims of its shape "
                  f"{shape}")
    block = math.prod(shape[d] for d in dims)
    if not (_positive_int(weights) and weights <= block):
        raise bad(f"a BlockLayout whose block_weights {weights!r} is not an integer in [1, {block}] "
                  f"(the weights in one block)")
    if not isinstance(layout.block_shape, str):
        raise bad(f"a BlockLayout whose block_shape {layout.block_shape!r} is not a string")


def check_block_scores(pattern, name: str, scores, layout) -> None:
    if not (isinstance(scores, Tensor) and scores.is_floating_point()
            and tuple(scores.shape) == (layout.num_blocks,)):
        got = (f"{tuple(scores.shape)} {str(scores.dtype).removeprefix('torch.')}"
               if isinstance(scores, Tensor) else type(scores).__name__)
        raise ExtensionError(f"{who(pattern, 'block_scores')} returned {got} for {name}; expected "
                             f"1-D float scores, one per block ({layout.num_blocks},)")
    if bool(torch.isnan(scores).any()):
        raise ExtensionError(f"{who(pattern, 'block_scores')} returned NaN block scores for {name}; "
                             f"scores must be comparable numbers")


def check_pruned_blocks(pattern, method: str, pruned, names, layouts) -> None:
    """What ``get_masks_global`` / ``get_masks_local`` return: name -> bool tensor, one per block."""
    if not isinstance(pruned, dict):
        raise ExtensionError(f"{who(pattern, method)} returned {type(pruned).__name__}; expected a "
                             f"dict of layer name -> bool pruned-block tensor")
    for name in names:
        got = pruned.get(name)
        n = layouts[name].num_blocks
        if not (isinstance(got, Tensor) and got.dtype == torch.bool and got.numel() == n):
            what = ("nothing" if got is None else f"{type(got).__name__} "
                    f"{str(getattr(got, 'dtype', '')).removeprefix('torch.')} {tuple(getattr(got, 'shape', ()))}")
            raise ExtensionError(f"{who(pattern, method)} returned {what} for {name}; expected a "
                                 f"bool tensor with one entry per block ({n})")


def check_expanded(pattern, name: str, pruned, view_shape) -> None:
    if not (isinstance(pruned, Tensor) and pruned.dtype == torch.bool
            and tuple(pruned.shape) == tuple(view_shape)):
        got = (f"{tuple(pruned.shape)} {str(pruned.dtype).removeprefix('torch.')}"
               if isinstance(pruned, Tensor) else type(pruned).__name__)
        raise ExtensionError(f"{who(pattern, 'expand')} returned {got} for {name}; expected the "
                             f"bool pruned mask of the 2-D view, {tuple(view_shape)}")


def check_channel_capabilities(pattern) -> None:
    """The declared channel attributes have the types the rewrite and compaction read."""
    flag, block = pattern.prunes_output_channels, pattern.output_channel_block
    if not isinstance(flag, bool):
        raise ExtensionError(f"{who(pattern, 'prunes_output_channels')} is {flag!r}; it must be "
                             f"True or False")
    if not _positive_int(block):
        raise ExtensionError(f"{who(pattern, 'output_channel_block')} is {block!r}; it must be an "
                             f"integer >= 1 (output channels per block)")


# ---------------------------------------------------------------------- registration
def check_registration(kind: str, name: Any, cls: Any, base: type, registry: dict, override: bool,
                       claims: Callable[[type, type], list[str]] | None = None,
                       example: str = "mine") -> None:
    """A registration names a class of the right base under a non-empty name, and does not
    replace (or take strings from) a built-in unless ``override=True``."""
    deco = f"@register_{kind}({name!r})"
    if not isinstance(name, str) or not name.strip():
        raise ExtensionError(f"register_{kind} needs a non-empty name, e.g. "
                             f"@fxprune.register_{kind}({example!r}); got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ExtensionError(f"{deco} must decorate a subclass of fxprune.{base.__name__}, got "
                             f"{getattr(cls, '__qualname__', type(cls).__name__)}")
    if override or not is_user_code(cls):   # fxprune's own registrations (a module reload too)
        return
    current = registry.get(name)
    if current is not None and current is not cls and not is_user_code(current):
        raise ExtensionError(f"{deco}: {name!r} is fxprune's built-in {current.__qualname__}; "
                             f"choose another name, or pass override=True to replace it")
    for builtin, taken in (claims(cls, current) if claims else []):
        raise ExtensionError(f"{deco}: {cls.__qualname__} would take {taken!r}, which fxprune's "
                             f"built-in {builtin.__qualname__} handles; choose another name (or "
                             f"narrow matches()), or pass override=True")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(v) -> bool:
    return _int(v) and v >= 1


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
