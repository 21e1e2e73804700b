"""The latest watched values of a layerwise optimizer as flat scalar metrics,
for trainers' loggers (shared by the Hugging Face and Lightning adapters)."""
from __future__ import annotations

from typing import Any

__all__ = ["find_watching", "latest_values"]

# attributes under which trainers keep the optimizer they wrap
# (accelerate's AcceleratedOptimizer: .optimizer; Lightning's LightningOptimizer: ._optimizer)
_WRAPPED = ("optimizer", "_optimizer")


def _unwrapped(optimizer: Any) -> list[Any]:
    """``optimizer`` and what it wraps, outermost first (``.optimizer`` /
    ``._optimizer`` attributes)."""
    chain: list[Any] = []
    while optimizer is not None and all(o is not optimizer for o in chain):
        chain.append(optimizer)
        optimizer = next((getattr(optimizer, a) for a in _WRAPPED
                          if getattr(optimizer, a, None) is not None), None)
    return chain


def find_watching(optimizer: Any) -> Any | None:
    """The layerwise optimizer (one with ``watched``) that ``optimizer`` is or
    wraps, unwrapping ``.optimizer`` / ``._optimizer`` attributes; ``None``
    if there is none."""
    return next((o for o in _unwrapped(optimizer)
                 if isinstance(getattr(type(o), "watched", None), property)), None)


def latest_values(optimizer: Any, prefix: str = "layerwise") -> dict[str, float]:
    """``{"<prefix>/<watched name>/<parameter name>": float}``: the last
    recorded value of every watched series of ``optimizer`` (a layerwise
    optimizer or a wrapper of one, see :func:`find_watching`).

    A trust ratio is a dimensionless float; other watched names have the
    unit of their expression. Reading ``watched`` moves the values held on
    the device to the host (one transfer per recorded step still held), so
    call this only when logging. Non-finite values are kept (a logger shows
    them; dropping them would hide a diverging layer).

    Raises:
        ValueError: ``optimizer`` is not a layerwise optimizer, or it
            watches nothing (construct it with ``watch=["trust"]``, for
            instance).
    """
    opt = find_watching(optimizer)
    if opt is None:
        inner = (_unwrapped(optimizer) or [None])[-1]
        raise ValueError(f"{type(inner).__name__} is not a layerwise optimizer (lw.Optimizer "
                         "or lw.adapt): it has no watched values to log")
    watched = opt.watched
    if not watched:
        raise ValueError("the optimizer watches nothing: construct it with watch=[...] "
                         "(watch=['trust'] for the trust ratio of lamb, lars, ...)")
    out = {}
    for name, per in watched.items():
        for param, series in per.items():
            if series:
                out[f"{prefix}/{name}/{param}"] = float(series[-1])
    return out

