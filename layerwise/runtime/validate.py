"""Checks that run before a step or a state load changes anything.

Every check here raises ``ValueError`` with a message naming the parameter
(and the state key) and changes nothing, so that ``lw.Optimizer.step`` and
``load_state_dict`` are atomic: either everything fits and the step runs,
or nothing the user owns is touched.
"""
from __future__ import annotations

import math

import torch

from .distributed import is_dtensor, local

__all__ = ["FLOAT_DTYPES", "check_param", "check_grad", "check_state_entry"]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_SPARSE = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr,
           torch.sparse_bsc)


def _plain_tensor_problem(t: torch.Tensor) -> str | None:
    """Why a state tensor cannot be read (None if it can): another layout,
    nested, or on the meta device (no values)."""
    if getattr(t, "is_nested", False):
        return "is a nested tensor"
    if t.layout != torch.strided:
        return f"has layout {t.layout}; it must be dense (strided)"
    if t.is_meta:
        return "is on the meta device (it holds no values)"
    return None


def _numpy_hint(value) -> str:
    """A hint for a NumPy value where a tensor or number is expected ('' otherwise)."""
    return (" (convert NumPy values with torch.as_tensor)"
            if type(value).__module__ == "numpy" else "")


def check_param(p: torch.Tensor, where: str) -> None:
    """Refuse a parameter the runtime cannot update correctly.

    Raises:
        ValueError: not a tensor; a nested, complex, integer, sparse (COO,
            CSR, CSC, BSR, BSC) or otherwise non-strided (MKL-DNN),
            meta-device or non-leaf parameter, or one whose elements overlap
            in memory (``expand``).
    """
    if not isinstance(p, torch.Tensor):
        raise ValueError(f"parameter {where} is a {type(p).__name__}, not a tensor")
    if getattr(p, "is_nested", False):
        raise ValueError(f"parameter {where} is a nested tensor; only dense (strided) "
                         "parameters are supported")
    if p.is_complex():
        raise ValueError(f"parameter {where} is complex ({p.dtype}); layerwise optimizers "
                         "need real parameters (view it as real with torch.view_as_real)")
    if p.dtype not in FLOAT_DTYPES:
        raise ValueError(f"parameter {where} has dtype {p.dtype}; supported: float32, "
                         "float64, bfloat16, float16")
    if p.layout != torch.strided:
        what = "sparse" if p.layout in _SPARSE else "not a dense (strided) tensor"
        raise ValueError(f"parameter {where} is {what} (layout {p.layout}); only dense "
                         "(strided) parameters are supported")
    if p.is_meta:
        raise ValueError(f"parameter {where} is on the meta device; materialise it "
                         "(e.g. module.to_empty(device=...)) before the step")
    if not p.is_leaf:
        raise ValueError(f"parameter {where} is not a leaf tensor (it has a grad_fn); "
                         "optimizers update leaf tensors")
    if torch._debug_has_internal_overlap(local(p)) == 1:
        raise ValueError(f"parameter {where} has elements that share memory (shape "
                         f"{tuple(p.shape)}, strides {tuple(local(p).stride())}, e.g. from "
                         "expand()); an in-place update of it is undefined")


def check_grad(p: torch.Tensor, g: torch.Tensor, where: str) -> None:
    """Refuse a gradient that does not fit its parameter.

    Raises:
        ValueError: a sparse gradient, one of another shape, dtype or device,
            or (DTensor parameters) one not sharded like the parameter.
    """
    if g.layout != torch.strided:
        raise ValueError(f"parameter {where} has a sparse gradient; layerwise "
                         "optimizers need dense gradients")
    if g.shape != p.shape:
        raise ValueError(f"parameter {where} has shape {tuple(p.shape)} but its "
                         f"gradient has shape {tuple(g.shape)}")
    if g.dtype != p.dtype or g.device != p.device:
        raise ValueError(f"parameter {where} is {p.dtype} on {p.device} but its gradient is "
                         f"{g.dtype} on {g.device}")
    if is_dtensor(p) and (not is_dtensor(g) or g.placements != p.placements
                          or local(g).shape != local(p).shape):
        raise ValueError(f"parameter {where} is a DTensor with placements "
                         f"{p.placements} but its gradient is not sharded the same way")


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise ValueError(f"{where} is {type(value).__name__} {value!r}, not a number or "
                         f"a tensor{_numpy_hint(value)}")
    if isinstance(value, torch.Tensor):
        problem = _plain_tensor_problem(value)
        if problem:
            raise ValueError(f"{where} {problem}")
        if value.numel() != 1:
            raise ValueError(f"{where} has shape {tuple(value.shape)}; it holds one number "
                             "per parameter (a 0-d tensor)")
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{where} has dtype {value.dtype}; it must be real")
        return float(local(value).detach().cpu().reshape(()))
    return float(value)


def check_state_entry(p: torch.Tensor, key: str, value, kind: str | None,
                      where: str, shape: tuple[int, ...] = ()) -> None:
    """Refuse a state value (from ``load_state_dict`` or assigned into
    ``optimizer.state[p]``) that does not fit the program and the parameter.

    ``kind``: ``"layer"``, ``"elem"``, ``"row"`` or ``"col"`` for a state
    of that kind, None for ``step``. A layer state or ``step`` may be a
    number or a one-element tensor; ``step`` must be a whole number >= 0; an
    elem state must be a real floating tensor shaped like the parameter (a
    DTensor laid out like it, if the parameter is one); a row or col state a
    real floating 1-D tensor of ``shape`` (``(rows,)`` or ``(cols,)``, after
    the parameter's ``row_block``; a row state of a DTensor parameter laid
    out like its dim 0, a col state a plain tensor).

    Raises:
        ValueError: naming the parameter and the key (also for a tensor
            that is sparse, nested or on the meta device, and for NumPy
            values, which ``load_state_dict`` converts before this check).
    """
    at = f"state '{key}' of parameter {where}"
    if kind is None or kind == "layer":
        x = _number(value, at)
        if kind is None and not (math.isfinite(x) and x >= 0 and x == int(x)):
            raise ValueError(f"{at} is {x!r}; the step count must be a whole number >= 0")
        return
    expected = tuple(p.shape) if kind == "elem" else tuple(shape)
    what = "the parameter" if kind == "elem" else f"one number per {kind}"
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{at} is {type(value).__name__}, not a tensor of shape {expected} "
                         f"({what}){_numpy_hint(value)}")
    problem = _plain_tensor_problem(value)
    if problem:
        raise ValueError(f"{at} {problem}")
    if not value.is_floating_point():
        raise ValueError(f"{at} has dtype {value.dtype}; it must be floating point")
    if tuple(value.shape) != expected:
        raise ValueError(f"{at} has shape {tuple(value.shape)}; it must be {expected} ({what})")
    if kind == "col":
        if is_dtensor(value):
            raise ValueError(f"{at} is a DTensor; a col state is the same on every rank: give "
                             "a plain tensor (value.full_tensor())")
        return
    if is_dtensor(p) != is_dtensor(value) or (
            is_dtensor(p) and tuple(value.placements) != tuple(p.placements)):
        raise ValueError(f"{at} is laid out as {getattr(value, 'placements', 'a plain tensor')}"
                         f", the parameter as {getattr(p, 'placements', 'a plain tensor')}; "
                         "load sharded state with torch.distributed.checkpoint")
