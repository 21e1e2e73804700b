"""A small deterministic optimization problem shared by the reference and preset tests.

Parameters of mixed shapes, including a 0-d tensor, a parameter that starts
at zero, a parameter whose gradient is always zero, and one whose gradient is
missing (``None``) every third step. Gradient scales differ by layer so that
trust ratios differ, and the global gradient norm is above 1 (so NVLAMB's
pre-normalization is active at its default ``max_grad_norm``).
"""
from __future__ import annotations

import numpy as np

__all__ = ["SHAPES", "ZERO_PARAM", "ZERO_GRAD", "SOMETIMES", "make_problem", "rel_err"]

SHAPES: dict[str, tuple[int, ...]] = {
    "layer1.weight": (4, 3),
    "layer1.bias": (3,),
    "conv.weight": (2, 3, 2, 2),
    "scale": (),
    "zero_param": (5,),
    "zero_grad": (2, 2),
    "sometimes": (3,),
}
ZERO_PARAM, ZERO_GRAD, SOMETIMES = "zero_param", "zero_grad", "sometimes"
_GRAD_SCALE = {"layer1.weight": 1.0, "layer1.bias": 0.1, "conv.weight": 3.0, "scale": 0.5,
               "zero_param": 2.0, "zero_grad": 0.0, "sometimes": 0.3}


def make_problem(seed: int = 0, steps: int = 20, shapes=None):
    """(params, grads): name -> float64 array, and a list of ``steps`` dicts
    name -> float64 array or None."""
    shapes = SHAPES if shapes is None else shapes
    rng = np.random.default_rng(seed)
    params = {n: np.array(rng.normal(size=s), dtype=np.float64) for n, s in shapes.items()}
    if ZERO_PARAM in params:
        params[ZERO_PARAM][...] = 0.0
    grads = []
    for k in range(steps):
        step = {}
        for n, s in shapes.items():
            g = np.array(rng.normal(size=s) * _GRAD_SCALE.get(n, 1.0), dtype=np.float64)
            if n == ZERO_GRAD:
                g[...] = 0.0
            step[n] = None if (n == SOMETIMES and k % 3 == 1) else g
        grads.append(step)
    return params, grads


def rel_err(actual, expected) -> float:
    """Normwise relative error max|a - e| / max|e| (0 when both are all zero)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    diff = float(np.max(np.abs(actual - expected), initial=0.0))
    scale = float(np.max(np.abs(expected), initial=0.0))
    if scale == 0.0:
        return diff
    return diff / scale
