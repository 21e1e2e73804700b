"""The language's built-in functions (LANGUAGE.md section 5): arity and kind rule.

Shared by the checker (names, arity, kinds) and the lowering (which torch
operation each becomes), so the two cannot disagree about what exists.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Builtin", "BUILTINS", "KINDS", "widest", "PREDEFINED", "PREDICATE_NAMES",
           "RULE_NAMES"]

#: Kinds from narrowest to widest (LANGUAGE.md section 5).
KINDS = ("const", "global", "layer", "elem")


def widest(*kinds: str) -> str:
    """The widest of some kinds (``const`` for none)."""
    return max(kinds, key=KINDS.index, default="const")


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

#: Names a ``for`` predicate may use (LANGUAGE.md sections 6 and 10).
PREDICATE_NAMES = ("ndim", "numel", "rows", "cols", "name")

#: The parameter's numbers a ``for`` rule's value may use besides hypers
#: (LANGUAGE.md section 11): those of its plain matrix view.
RULE_NAMES = ("ndim", "numel", "rows", "cols")
