"""The rules registry of the channel analysis: one rule per ATen op (by op name).

A rule is ``rule(an, node) -> value``: given the :class:`~.analysis.ChannelAnalysis` and a node,
it couples the atoms the op ties together (``an.atoms.union*``; ``an.bind`` for parameters),
blocks what it cannot follow (``an.block(value, reason)``), and returns what the analysis should
know of the node's output: a :class:`~.values.Chan` (which dims carry channels, which atom at
each index, whether pruned channels are still exact zeros), a list of them for an op with
several outputs, a :class:`~.values.ParamRef` for a parameter seen through a view, or ``None``
when no channel structure survives. ``an.value(arg)`` reads what is known of an argument.
An op without a rule blocks every channel that reaches it (:func:`unknown_op`).

Add a rule for your own op (as Torch-Pruning's customized pruners)::

    from fxprune.compaction import Chan, keep, register_rule

    @register_rule("my_scale")          # the ATen op name: torch.ops.mylib.my_scale -> "my_scale"
    def my_scale(an, node):
        x = an.value(node.args[0])
        return keep(x) if isinstance(x, Chan) else None   # channel-wise: channels pass through

A rule registered under a built-in name replaces it. The built-in rules are in :mod:`.ops`
(elementwise, weight layers, norms, attention) and :mod:`.layout` (pooling, reshape, cat...).
"""
from __future__ import annotations

import numbers
from typing import Any, Callable

import numpy as np

from torch import fx

from ..aten import module_of, op_name
from .values import Chan

Rule = Callable[[Any, fx.Node], object]   # (ChannelAnalysis, node) -> value
RULES: dict[str, Rule] = {}


def register_rule(*names: str) -> Callable[[Rule], Rule]:
    """Decorator: ``fn(an, node)`` is the channel-analysis rule of the ATen ops ``names``."""
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError("register_rule needs one or more op names, e.g. @register_rule('my_op')")

    def register(fn: Rule) -> Rule:
        if not callable(fn):
            raise TypeError(f"@register_rule({', '.join(map(repr, names))}) must decorate a function "
                            f"rule(an, node)")
        for name in names:
            RULES[name] = fn
        return fn
    return register


def find_rule(name: str) -> Rule | None:
    """The rule of op ``name``; an in-place op (``relu_``) uses its out-of-place rule."""
    return RULES.get(name) or (RULES.get(name[:-1]) if name.endswith("_") else None)


def where(node: fx.Node) -> str:
    """The op and the module that ran it, for a report: ``add (layer1.0)``."""
    module = module_of(node)
    return f"{op_name(node)} ({module or node.name})"


def unknown_op(an, node: fx.Node, why: str = "not understood by the channel analysis"):
    """Block every channel that reaches ``node``, with ``why``; the node's output carries none."""
    reason = f"{where(node)}: {why}"
    for a in node.all_input_nodes:
        an.block(an.values.get(a), reason)
    an.dead_ends[node] = reason
    return None


def keep(c: Chan, zero: bool | None = None, why: str = "", dims=None, atoms=None) -> Chan:
    """``c`` passed through an op: other ``dims`` / ``atoms`` if given; ``zero=False`` with ``why``
    when the op makes pruned channels nonzero (a bias, a sigmoid...)."""
    z = c.zero if zero is None else zero
    return Chan(c.dims if dims is None else tuple(dims), c.atoms if atoms is None else atoms,
                z, c.why if z == c.zero else why)


def whole_along(an, c: Chan, dim: int) -> bool:
    """Couple ``c``'s atoms along its channel dim ``dim`` (for every index of its other channel
    dims, all atoms along ``dim`` are one class), so ``dim`` never loses entries: an op that
    indexes, slices, concatenates or scales along it stays exact when whole units of the other
    dims go (RoPE's rotate-half on the head dim of whole heads). False, coupling nothing, when
    ``dim`` is ``c``'s only channel dim (every channel would become one class)."""
    if dim not in c.dims or len(c.dims) < 2:
        return False
    an.atoms.union_rows(np.moveaxis(c.atoms, c.dims.index(dim), -1))
    return True


def nonzero_reason(c: Chan, node: fx.Node) -> str:
    """Why ``node`` cannot slice ``c``'s channels away: an earlier op made them nonzero."""
    return f"{c.why} makes pruned channels nonzero before {where(node)}"


def param_plus_number(kind: str, operands, node: fx.Node, is_param: Callable[[int], bool]) -> tuple[int, float] | None:
    """(which operand is the parameter, the number added to it) when ``node`` (an ``add`` or
    ``sub``, ``kind``, of ``operands``) computes ``w + c``, ``c + w`` or ``w - c`` of a parameter
    ``w`` (``is_param(i)``: operand i is one) and a number ``c``; else None."""
    if kind not in ("add", "sub") or node.kwargs.get("alpha", 1) != 1 or len(operands) != 2:
        return None
    for i in (0, 1) if kind == "add" else (0,):
        c = operands[1 - i]
        if isinstance(c, numbers.Real) and not isinstance(c, bool) and is_param(i):
            return i, float(c) if kind == "add" else -float(c)
    return None
