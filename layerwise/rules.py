"""Per-parameter ``for`` rules (LANGUAGE.md sections 6, 10 and 11).

Which rules match a parameter is decided once, when its param group is
added, from the parameter's ``ndim``, ``numel``, ``rows``, ``cols`` (of its
plain matrix view: ``rows`` is the size of dim 0, 1 for a 0-d tensor, and
``cols = numel / rows``) and ``name``. Their values are evaluated for every
step from the group's current hyper values (:func:`hyper_values`), so a
scheduler's new ``lr`` reaches a rule such as ``lr = 0.1 * lr``. In file
order, and in order within a rule, each assignment of a matching rule either
transforms the parameter's current value (its right side names a hyper) or
overrides it (it names none; a value given explicitly in the parameter's
param group wins over an override). ``row_block`` is not a hyper: it lays the
parameter out (:func:`row_block`).

Arithmetic is IEEE float64, as the language's (``x / 0`` is ``+-inf``,
``0 / 0`` is NaN); ``min``, ``max`` and ``clip`` propagate NaN. Evaluation
never raises for a number: an overflow is ``+-inf`` (``numel ^ 1000``) and
a negative base with a fractional exponent is NaN (``(0 - ndim) ^ 0.5``),
as torch computes them.

``name ~ "regex"`` is a search with Python's ``re``; the checker admits only
patterns without nested repetition (``layerwise.check.regex_problem``), and
a name longer than :data:`MAX_NAME_CHARS` characters is not matched: a rule
that tests it raises ValueError naming the rule and the parameter. So
deciding a parameter's rules takes bounded time for any name.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .check import Rule
from .syntax import Binary, Call, Expr, Name, Num, Str, Unary

__all__ = ["ParamInfo", "param_info", "evaluate", "matching_rules", "hyper_values",
           "row_block", "MAX_NAME_CHARS"]

#: The longest parameter name a ``name ~ "regex"`` predicate is matched against.
MAX_NAME_CHARS = 1_000


@dataclass(frozen=True)
class ParamInfo:
    """What rules may test of a parameter: the numbers of its plain matrix view
    and its name (None if the parameters have no names)."""
    ndim: int
    numel: int
    rows: int
    cols: int
    name: str | None = None

    def env(self) -> dict[str, float]:
        return {"ndim": float(self.ndim), "numel": float(self.numel),
                "rows": float(self.rows), "cols": float(self.cols)}


def param_info(shape: Sequence[int], name: str | None) -> ParamInfo:
    """The :class:`ParamInfo` of a parameter of ``shape``."""
    shape = tuple(shape)
    numel = math.prod(shape)
    rows = shape[0] if shape else 1
    return ParamInfo(len(shape), numel, rows, math.prod(shape[1:]), name)


_UNARY = {"sqrt": np.sqrt, "rsqrt": lambda x: 1.0 / np.sqrt(x), "exp": np.exp, "log": np.log,
          "abs": np.abs, "sign": np.sign, "sin": np.sin, "cos": np.cos, "tanh": np.tanh}
_BINARY = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide, "^": np.power,
           "<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
           "==": np.equal, "!=": np.not_equal}


def _nan_min(a, b):
    return math.nan if math.isnan(a) or math.isnan(b) else min(a, b)


def _nan_max(a, b):
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def evaluate(e: Expr, env: Mapping[str, float], name: str | None = None) -> float:
    """The value of a checked rule predicate or value (non-zero means true).

    ``env`` gives the parameter's numbers and hyper values; ``name`` is the
    parameter's name, for ``~``.

    Raises:
        ValueError: ``~`` is evaluated and ``name`` is None, or ``name`` is
            longer than :data:`MAX_NAME_CHARS`.
    """
    with np.errstate(all="ignore"):
        return _eval(e, env, name)


def _float(x) -> float:
    """``x`` as a float; a number too large for one is +-inf."""
    try:
        return float(x)
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def _eval(e: Expr, env, name) -> float:
    if isinstance(e, Num):
        return _float(e.value)
    if isinstance(e, Name):
        return _float(env[e.id])
    if isinstance(e, Unary):
        x = _eval(e.operand, env, name)
        return float(x == 0) if e.op == "not" else (-x if e.op == "-" else x)
    if isinstance(e, Binary):
        if e.op == "~":
            assert isinstance(e.right, Str)
            if name is None:
                raise ValueError("needs parameter names")
            if len(name) > MAX_NAME_CHARS:
                raise ValueError(f"the name is longer than {MAX_NAME_CHARS} characters, the "
                                 "longest a name ~ \"regex\" rule matches")
            return float(re.search(e.right.value, name) is not None)
        a = _eval(e.left, env, name)
        if e.op == "and":
            return float(a != 0 and _eval(e.right, env, name) != 0)
        if e.op == "or":
            return float(a != 0 or _eval(e.right, env, name) != 0)
        return float(_BINARY[e.op](np.float64(a), np.float64(_eval(e.right, env, name))))
    assert isinstance(e, Call)
    args = [_eval(a, env, name) for a in e.args]
    if e.func in _UNARY:
        return float(_UNARY[e.func](np.float64(args[0])))
    if e.func == "min":
        return _nan_min(*args)
    if e.func == "max":
        return _nan_max(*args)
    if e.func == "clip":
        return _nan_min(_nan_max(args[0], args[1]), args[2])
    if e.func == "where":
        return args[1] if args[0] != 0 else args[2]
    raise AssertionError(f"{e.func}() should not reach a rule")


def matching_rules(rules: Sequence[Rule], info: ParamInfo) -> tuple[int, ...]:
    """Indices of the rules whose predicate holds for the parameter.

    Raises:
        ValueError: if a rule tests ``name`` but the parameter has no name
            (the message names the rule's file and line).
    """
    out = []
    for i, rule in enumerate(rules):
        if rule.uses_name and info.name is None:
            where = f"{rule.span.filename}:{rule.span.line}" if rule.span else "a for rule"
            raise ValueError(f"the for rule at {where} tests the parameter's name, but the "
                             "parameters have no names: pass model.named_parameters() "
                             "(or (name, tensor) pairs) to the optimizer, or "
                             "names_from=model when a trainer passes bare tensors")
        try:
            holds = evaluate(rule.predicate, info.env(), info.name) != 0
        except Exception as err:    # bounded, but name the rule and parameter
            where = f"{rule.span.filename}:{rule.span.line}" if rule.span else "a for rule"
            raise ValueError(f"the for rule at {where} cannot be decided for parameter "
                             f"{info.name or '(unnamed)'!r}: {err}") from None
        if holds:
            out.append(i)
    return tuple(out)


def hyper_values(rules: Sequence[Rule], matching: Sequence[int], info: ParamInfo,
                 group: Mapping[str, float], explicit: frozenset[str] | set[str]) -> dict:
    """The parameter's hyper values this step: its param group's ``group``
    values, then every assignment of its ``matching`` rules in order (an
    override is skipped for a hyper in ``explicit``, the keys given in the
    parameter's param group)."""
    values = dict(group)
    env = info.env()
    for i in matching:
        rule = rules[i]
        for (target, e), relative in zip(rule.assigns, rule.relative):
            if target == "row_block" or (not relative and target in explicit):
                continue
            values[target] = evaluate(e, {**env, **values})
    return values


def row_block(rules: Sequence[Rule], matching: Sequence[int], info: ParamInfo) -> int:
    """The parameter's ``row_block`` (1 unless a matching rule sets it; the
    last one wins).

    Raises:
        ValueError: if it is not a positive whole number dividing the size of
            dim 0 (the message says so; the caller names the parameter).
    """
    block = 1.0
    for i in matching:
        for target, e in rules[i].assigns:
            if target == "row_block":
                block = evaluate(e, info.env())
    if not (math.isfinite(block) and block >= 1 and block == int(block)) \
            or info.rows % int(block):
        raise ValueError(f"row_block {block:g} does not divide its dim 0 of size {info.rows}")
    return int(block)
