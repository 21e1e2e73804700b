"""The torch meaning of the language's operators and built-ins.

These functions are the call targets of the lowered ``torch.fx`` graphs
(``layerwise.lower``), so eager execution runs them directly and
``torch.compile`` traces through them. Conventions:

* An elem-kind value is a 1-D tensor (the parameter flattened); layer,
  global and const values are 0-d tensors or Python floats.
* Comparisons and ``and``/``or``/``not`` give 1.0 or 0.0 in the dtype of
  ``ref`` (the step's compute dtype), never bool tensors, so that their
  results can be summed or multiplied like any other value.
* ``numel`` is passed in as a 0-d tensor (the parameter's element count),
  so no graph depends on a concrete size.
* Every elementwise built-in propagates NaN (``sign(NaN)`` is NaN, as in
  the constant folding of ``layerwise.lower``, not 0 as ``torch.sign``).
* Reductions of an empty parameter: ``norm``, ``sum``, ``dot``,
  ``max_abs`` give 0; ``mean`` and ``rms`` give NaN (0 / 0).

Units (LANGUAGE.md section 10): in a program with row or col values, an
elem value is the parameter seen as its ``(rows, cols)`` matrix, a row
value is ``(rows, 1)`` and a col value ``(1, cols)``, so that arithmetic
broadcasts (a row value times a col value is their outer product). The
reductions along a unit (:func:`row_sum`, :func:`col_sum`,
:func:`row_max_abs`, :func:`col_max_abs`) keep that shape; a layer
reduction of a col value uses :func:`col_total` / :func:`col_max`, so that
the runtime knows it reads a value every rank holds whole.
"""
from __future__ import annotations

import operator

import torch

__all__ = [
    "as_tensor", "compare", "logical_and", "logical_or", "logical_not", "where",
    "minimum", "maximum", "clip", "rsqrt", "sign", "norm", "sumsq", "dot", "max_abs", "mean", "rms",
    "fill_like", "scalar", "row_sum", "col_sum", "row_max_abs", "col_max_abs", "col_total",
    "col_max", "row_fill", "col_fill",
]

_COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
            "==": operator.eq, "!=": operator.ne}


def as_tensor(x, ref: torch.Tensor) -> torch.Tensor:
    """``x`` as a tensor of ``ref``'s dtype and device (0-d if ``x`` is a float)."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.tensor(x, dtype=ref.dtype, device=ref.device)


def _truth(x):
    return x != 0


def compare(op: str, a, b, ref: torch.Tensor) -> torch.Tensor:
    """``a op b`` as 1.0 / 0.0 in ``ref``'s dtype; ``op`` is one of ``< <= > >= == !=``."""
    return as_tensor(_COMPARE[op](a, b), ref).to(ref.dtype)


def logical_and(a, b, ref: torch.Tensor) -> torch.Tensor:
    """1.0 where both ``a`` and ``b`` are non-zero, else 0.0."""
    return torch.logical_and(as_tensor(_truth(a), ref), as_tensor(_truth(b), ref)).to(ref.dtype)


def logical_or(a, b, ref: torch.Tensor) -> torch.Tensor:
    """1.0 where ``a`` or ``b`` is non-zero, else 0.0."""
    return torch.logical_or(as_tensor(_truth(a), ref), as_tensor(_truth(b), ref)).to(ref.dtype)


def logical_not(a, ref: torch.Tensor) -> torch.Tensor:
    """1.0 where ``a`` is zero, else 0.0."""
    return as_tensor(a == 0, ref).to(ref.dtype)


def where(cond, a, b, ref: torch.Tensor) -> torch.Tensor:
    """``a`` where ``cond`` is non-zero, else ``b`` (broadcast)."""
    return torch.where(as_tensor(_truth(cond), ref), as_tensor(a, ref), as_tensor(b, ref))


def minimum(a, b, ref: torch.Tensor) -> torch.Tensor:
    """Elementwise minimum (NaN if either is NaN)."""
    return torch.minimum(as_tensor(a, ref), as_tensor(b, ref))


def maximum(a, b, ref: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum (NaN if either is NaN)."""
    return torch.maximum(as_tensor(a, ref), as_tensor(b, ref))


def clip(x, lo, hi, ref: torch.Tensor) -> torch.Tensor:
    """``min(max(x, lo), hi)``."""
    return minimum(maximum(x, lo, ref), hi, ref)


def rsqrt(x: torch.Tensor) -> torch.Tensor:
    """``1 / sqrt(x)``."""
    return torch.rsqrt(x)


def sign(x: torch.Tensor) -> torch.Tensor:
    """-1, 0 or 1; NaN for NaN (``torch.sign`` gives 0, which would hide a NaN)."""
    return torch.where(torch.isnan(x), x, torch.sign(x))


def norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm over all elements (0 for an empty tensor)."""
    return torch.linalg.vector_norm(x)


def sumsq(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares over all elements (0 for an empty tensor): the partial
    of ``norm`` and ``rms`` that shards add up (``layerwise.split``)."""
    return torch.sum(x * x)


def dot(x: torch.Tensor, y) -> torch.Tensor:
    """Sum of the elementwise product."""
    return torch.sum(x * y)


def max_abs(x: torch.Tensor) -> torch.Tensor:
    """Largest absolute value (0 for an empty tensor)."""
    if x.numel() == 0:
        return x.new_zeros(())
    return torch.amax(torch.abs(x))


def mean(x: torch.Tensor, numel: torch.Tensor) -> torch.Tensor:
    """Mean over all elements (NaN for an empty tensor)."""
    return torch.sum(x) / numel


def rms(x: torch.Tensor, numel: torch.Tensor) -> torch.Tensor:
    """Root mean square over all elements (NaN for an empty tensor)."""
    return torch.sqrt(torch.sum(x * x) / numel)


def fill_like(value, ref: torch.Tensor) -> torch.Tensor:
    """``value`` (a float or 0-d tensor) broadcast to ``ref``'s shape, as a new tensor."""
    if isinstance(value, torch.Tensor):
        return value.expand_as(ref).clone()
    return torch.full_like(ref, value)


def scalar(value: float, ref: torch.Tensor) -> torch.Tensor:
    """A new 0-d tensor holding ``value`` in ``ref``'s dtype."""
    return torch.tensor(value, dtype=ref.dtype, device=ref.device)


def row_sum(x: torch.Tensor) -> torch.Tensor:
    """``(rows, cols) -> (rows, 1)``: the sum of each row."""
    return torch.sum(x, 1, keepdim=True)


def col_sum(x: torch.Tensor) -> torch.Tensor:
    """``(rows, cols) -> (1, cols)``: the sum of each column."""
    return torch.sum(x, 0, keepdim=True)


def row_max_abs(x: torch.Tensor) -> torch.Tensor:
    """``(rows, cols) -> (rows, 1)``: the largest absolute value of each row
    (0 for a row without elements; NaN propagates)."""
    if x.shape[1] == 0:
        return x.new_zeros((x.shape[0], 1))
    return torch.amax(torch.abs(x), 1, keepdim=True)


def col_max_abs(x: torch.Tensor) -> torch.Tensor:
    """``(rows, cols) -> (1, cols)``: the largest absolute value of each column."""
    if x.shape[0] == 0:
        return x.new_zeros((1, x.shape[1]))
    return torch.amax(torch.abs(x), 0, keepdim=True)


def col_total(x: torch.Tensor, cols) -> torch.Tensor:
    """Sum of a col value ``(1, cols)`` (``cols``: the parameter's, 0-d)."""
    return torch.sum(x)


def col_max(x: torch.Tensor, cols) -> torch.Tensor:
    """Largest absolute value of a col value ``(1, cols)`` (0 if empty)."""
    return max_abs(x)


def row_fill(value, ref: torch.Tensor) -> torch.Tensor:
    """A new row value ``(ref.shape[0], 1)`` holding ``value`` (a float, a
    0-d tensor or a row value), in ``ref``'s dtype."""
    return torch.zeros((ref.shape[0], 1), dtype=ref.dtype, device=ref.device) + value


def col_fill(value, ref: torch.Tensor) -> torch.Tensor:
    """A new col value ``(1, ref.shape[1])`` holding ``value``, in ``ref``'s dtype."""
    return torch.zeros((1, ref.shape[1]), dtype=ref.dtype, device=ref.device) + value
