"""The language's built-in functions (LANGUAGE.md section 5): arity and kind rule.

Shared by the checker (names, arity, kinds) and the lowering (which torch
operation each becomes), so the two cannot disagree about what exists.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Builtin", "BUILTINS", "KINDS", "UNITS", "widest", "narrower", "PREDEFINED",
           "PARAM_NAMES", "PREDICATE_NAMES", "RULE_NAMES", "REDUCTIONS"]

#: Kinds from narrowest to widest (LANGUAGE.md sections 5 and 10):
#: ``const < global < layer < row < elem`` and ``layer < col < elem``; ``row``
#: and ``col`` are not ordered, and a value mixing them is ``elem`` (the
#: outer product).
KINDS = ("const", "global", "layer", "row", "col", "elem")

#: The units a reduction may take as its last argument (section 10).
UNITS = ("row", "col")

_RANK = {"const": 0, "global": 1, "layer": 2, "row": 3, "col": 3, "elem": 4}


def narrower(a: str, b: str) -> bool:
    """Whether a value of kind ``a`` may stand where kind ``b`` is expected
    (``a <= b`` in the order of :data:`KINDS`)."""
    return a == b or (_RANK[a] < _RANK[b])


def widest(*kinds: str) -> str:
    """The least kind every one of ``kinds`` is narrower than (``const`` for
    none): ``widest("row", "col")`` is ``elem``."""
    out = "const"
    for k in kinds:
        if narrower(k, out):
            continue
        out = k if narrower(out, k) else "elem"
    return out


@dataclass(frozen=True)
class Builtin:
    """A built-in function: ``category`` is 'elementwise', 'layer' or 'global'."""
    name: str
    arity: int
    category: str


BUILTINS: dict[str, Builtin] = {
    b.name: b for b in (
        *(Builtin(n, 1, "elementwise") for n in
          ("sqrt", "rsqrt", "exp", "log", "abs", "sign", "sin", "cos", "tanh")),
        Builtin("min", 2, "elementwise"), Builtin("max", 2, "elementwise"),
        Builtin("clip", 3, "elementwise"), Builtin("where", 3, "elementwise"),
        *(Builtin(n, 1, "layer") for n in ("norm", "sum", "mean", "rms", "max_abs", "numel")),
        Builtin("dot", 2, "layer"),
        Builtin("global_norm", 1, "global"), Builtin("global_sum", 1, "global"),
    )
}

#: Names every step block starts with, and what they are.
PREDEFINED = {"w": "the parameter", "g": "its gradient", "t": "this parameter's step count"}

#: The parameter's shape numbers steps and state inits may read (section 10):
#: layer-kind, read-only, following its ``row_block``. A program may not
#: declare a hyper, state or def of one of these names (it must rename it).
PARAM_NAMES = ("rows", "cols", "ndim")

#: The layer reductions: each takes an optional last argument, a unit.
REDUCTIONS = ("norm", "sum", "mean", "rms", "max_abs", "numel", "dot")

#: Names a ``for`` predicate may use (LANGUAGE.md sections 6 and 10).
PREDICATE_NAMES = ("ndim", "numel", "rows", "cols", "name")

#: The parameter's numbers a ``for`` rule's value may use besides hypers
#: (LANGUAGE.md section 11): those of its plain matrix view.
RULE_NAMES = ("ndim", "numel", "rows", "cols")
