"""The common shape of the NumPy reference optimizers.

Every reference is a small class over a ``dict`` of float64 NumPy arrays,
updated in place by :meth:`ReferenceOptimizer.step`. It follows the
conventions of the optimizers it is checked against (``torch.optim``): a
parameter whose gradient is ``None`` is skipped and keeps its state, and
``t`` counts the steps of each parameter separately (1 at its first step).

Nothing here imports ``layerwise``: the references are written from the
papers and source files cited in each class's docstring.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

__all__ = ["ReferenceOptimizer", "l2norm"]


def l2norm(x: np.ndarray) -> float:
    """The L2 norm of all elements of ``x`` (any shape, 0-d included)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    return float(np.sqrt(np.dot(x, x)))


class ReferenceOptimizer:
    """Base class: per-parameter hypers, state, step counts and watched values.

    Args:
        params: name -> float64 array; the arrays are updated in place.
        overrides: name -> {hyper: value}, per-parameter values (the analogue
            of a ``param_groups`` entry); they win over ``hypers``.
        **hypers: values for the class's ``defaults``; unknown names are a
            ``TypeError``.

    Subclasses set ``defaults`` and ``watch`` and implement :meth:`update`;
    one that needs a value over all parameters (a global gradient norm)
    overrides :meth:`prepare`.
    """

    defaults: Mapping[str, float] = {}
    #: names of the per-layer values recorded in ``watched`` at every step
    watch: tuple[str, ...] = ()

    def __init__(self, params: dict[str, np.ndarray],
                 overrides: Mapping[str, Mapping[str, float]] | None = None, **hypers: float):
        unknown = set(hypers) - set(self.defaults)
        for per_param in (overrides or {}).values():
            unknown |= set(per_param) - set(self.defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown hypers {sorted(unknown)}; "
                            f"known: {sorted(self.defaults)}")
        for name, p in params.items():
            if not (isinstance(p, np.ndarray) and p.dtype == np.float64):
                raise TypeError(f"parameter {name!r} must be a float64 numpy array")
        self.params = params
        self.hypers = {name: {**self.defaults, **hypers, **(overrides or {}).get(name, {})}
                       for name in params}
        self.state: dict[str, dict[str, Any]] = {name: {} for name in params}
        self.steps = {name: 0 for name in params}
        self.watched: dict[str, dict[str, list[float]]] = {
            w: {name: [] for name in params} for w in self.watch}
        #: per parameter, the last update direction before any layer scaling
        #: (LAMB's u, LARS's g + weight_decay * w), for step-length tests
        self.last_direction: dict[str, np.ndarray] = {}

    def step(self, grads: Mapping[str, np.ndarray | None]) -> None:
        """One step: update every parameter whose gradient is not ``None``."""
        active = {name: np.asarray(g, dtype=np.float64) for name, g in grads.items()
                  if g is not None}
        context = self.prepare(active)
        for name, w in self.params.items():
            if name not in active:
                continue
            self.steps[name] += 1
            h = self.hypers[name]
            record = self.update(w, active[name], self.state[name], self.steps[name], h,
                                 context, name) or {}
            for key in self.watch:
                self.watched[key][name].append(float(record[key]))

    def prepare(self, grads: Mapping[str, np.ndarray]) -> Any:
        """Values over all parameters with a gradient, computed before any update."""
        return None

    def update(self, w: np.ndarray, g: np.ndarray, state: dict, t: int,
               h: Mapping[str, float], context: Any, name: str) -> Mapping[str, float] | None:
        """Update ``w`` in place; return the watched values of this parameter."""
        raise NotImplementedError
