"""Adaptations as references: the LAMB trust ratio applied to any base reference.

``Trust(Base)`` is a reference optimizer that runs ``Base``'s update of each
parameter on a copy at ``lr = 1`` to read its direction ``u`` (the bases
here move ``w`` to ``w - lr * u`` with a state that does not depend on
``lr``), then applies the trust ratio of You et al. 2019 (arXiv:1904.00962,
Algorithm 2, last line): ``w = w - lr * phi(||w||) / ||u|| * u``, the ratio
taken as 1 where a norm is zero. It records the ratio as ``tr``.
"""
from __future__ import annotations

import numpy as np

from .base import ReferenceOptimizer, l2norm

__all__ = ["Trust"]


def Trust(base: type[ReferenceOptimizer]) -> type[ReferenceOptimizer]:
    """The reference of ``base`` adapted by the trust ratio (preset ``trust``)."""

    class Adapted(base):
        watch = ("tr",)

        def update(self, w, g, state, t, h, context, name):
            trial = np.array(w, dtype=np.float64)
            super().update(trial, g, state, t, {**h, "lr": 1.0}, context, name)
            u = w - trial
            wn, un = l2norm(w), l2norm(u)
            tr = wn / un if wn > 0 and un > 0 else 1.0
            w[...] = w - h["lr"] * tr * u
            return {"tr": tr}

    Adapted.__name__ = f"Trust{base.__name__}"
    return Adapted
