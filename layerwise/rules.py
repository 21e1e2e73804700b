"""Per-parameter ``for`` rules (LANGUAGE.md section 6): which hypers a rule sets.

Rules are decided once per parameter when the optimizer is built, from the
parameter's ``ndim``, ``numel`` and ``name``. They apply in file order (a
later rule wins); values given explicitly in a param group win over rules.
"""
from __future__ import annotations

import math
import operator
import re

from .check import Rule
from .syntax import Binary, Expr, Name, Num, Str, Unary

__all__ = ["rule_overrides", "evaluate_predicate"]

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "^": operator.pow,
        "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
        "==": operator.eq, "!=": operator.ne}


def evaluate_predicate(e: Expr, ndim: int, numel: int, name: str | None) -> float:
    """Value of a checked predicate for one parameter (non-zero means true).

    Raises:
        ValueError: if the predicate tests ``name`` and ``name`` is None.
    """
    if isinstance(e, Num):
        return e.value
    if isinstance(e, Name):
        return float(ndim if e.id == "ndim" else numel)
    if isinstance(e, Unary):
        x = evaluate_predicate(e.operand, ndim, numel, name)
        return float(x == 0) if e.op == "not" else (-x if e.op == "-" else x)
    assert isinstance(e, Binary)
    if e.op == "~":
        assert isinstance(e.right, Str)
        if name is None:
            raise ValueError("needs parameter names")
        return float(re.search(e.right.value, name) is not None)
    a = evaluate_predicate(e.left, ndim, numel, name)
    if e.op == "and":
        return float(a != 0 and evaluate_predicate(e.right, ndim, numel, name) != 0)
    if e.op == "or":
        return float(a != 0 or evaluate_predicate(e.right, ndim, numel, name) != 0)
    b = evaluate_predicate(e.right, ndim, numel, name)
    if e.op == "/":
        return a / b if b != 0 else (math.nan if a == 0 else math.copysign(math.inf, a))
    return float(_OPS[e.op](a, b))


def rule_overrides(rules: tuple[Rule, ...], ndim: int, numel: int, name: str | None,
                   explicit: set[str]) -> dict[str, float]:
    """Hyper values the rules set for one parameter, leaving out ``explicit`` ones.

    Raises:
        ValueError: if a rule tests ``name`` but the parameter has no name
            (the message names the rule's file and line).
    """
    out: dict[str, float] = {}
    for rule in rules:
        if rule.uses_name and name is None:
            where = f"{rule.span.filename}:{rule.span.line}" if rule.span else "a for rule"
            raise ValueError(f"the for rule at {where} tests the parameter's name, but the "
                             "parameters have no names: pass model.named_parameters() "
                             "(or (name, tensor) pairs) to the optimizer")
        if evaluate_predicate(rule.predicate, ndim, numel, name) != 0:
            out.update((k, v) for k, v in rule.overrides if k not in explicit)
    return out
