"""References for the programs with units (LANGUAGE.md section 10):
Adafactor and LAMB with a trust ratio per row or per block of rows.

A parameter is seen as a matrix as the language defines it: ``rows`` is the
size of dim 0 (1 for a 0-d tensor) divided by the block size, and each row
holds ``numel / rows`` consecutive elements of the row-major tensor (a conv
weight ``(out, in, kh, kw)`` is ``out`` rows of ``in * kh * kw``). Written
from the papers, not from the ``layerwise`` package.
"""
from __future__ import annotations

import math

import numpy as np

from .base import ReferenceOptimizer
from .lamb_family import Lamb

__all__ = ["Adafactor", "LambRowwise", "as_matrix"]


def as_matrix(w: np.ndarray, block: int = 1) -> np.ndarray:
    """``w`` as its ``(rows, cols)`` matrix: a view sharing its memory."""
    dim0 = w.shape[0] if w.ndim else 1
    rows = dim0 // block
    cols = int(np.prod(w.shape[1:], dtype=np.int64)) * block if w.ndim else 1
    return w.reshape(rows, cols)


def _rms(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64).ravel()
    return float(np.sqrt(np.mean(x * x)))


class Adafactor(ReferenceOptimizer):
    """Adafactor, Shazeer and Stern, "Adafactor: Adaptive Learning Rates with
    Sublinear Memory Cost", ICML 2018 (arXiv:1804.04235), with relative step
    size, update clipping and no momentum (beta1 = 0):

    Algorithm 4, for a parameter seen as an ``n x m`` matrix with ``m > 1``::

        alpha_t = max(eps2, RMS(X_{t-1})) * rho_t,  rho_t = min(1e-2, 1 / sqrt(t))
        beta2_t = 1 - t^(-decay)                             (Section 7.2; decay = 0.8)
        R_t = beta2_t R_{t-1} + (1 - beta2_t) (G^2 + eps1) 1_m
        C_t = beta2_t C_{t-1} + (1 - beta2_t) 1_n^T (G^2 + eps1)
        V_t = R_t C_t / (1_n^T R_t)
        U_t = G / sqrt(V_t)
        U_t = U_t / max(1, RMS(U_t) / d)                     (update clipping, Section 6)
        X_t = X_{t-1} - alpha_t U_t

    Algorithm 5 (unfactored ``V_t = beta2_t V_{t-1} + (1 - beta2_t)(G^2 +
    eps1)``) for a vector (a bias: ``m = 1``) and a 0-d parameter.
    """

    defaults = {"eps1": 1e-30, "eps2": 1e-3, "d": 1.0, "decay": 0.8}

    def update(self, w, g, state, t, h, context, name):
        x = as_matrix(w)
        gm = as_matrix(g)
        b2 = 1.0 - t ** (-h["decay"])
        rho = min(1e-2, 1.0 / math.sqrt(t))
        alpha = max(h["eps2"], _rms(x)) * rho
        sq = gm * gm + h["eps1"]
        if x.shape[1] > 1:                                  # Algorithm 4
            r = state.setdefault("r", np.zeros(x.shape[0]))
            c = state.setdefault("c", np.zeros(x.shape[1]))
            r[...] = b2 * r + (1 - b2) * sq.sum(axis=1)
            c[...] = b2 * c + (1 - b2) * sq.sum(axis=0)
            v = np.outer(r, c) / r.sum()
        else:                                               # Algorithm 5
            v_state = state.setdefault("v", np.zeros(x.shape))
            v_state[...] = b2 * v_state + (1 - b2) * sq
            v = v_state
        u = gm / np.sqrt(v)
        u = u / max(1.0, _rms(u) / h["d"])
        x[...] = x - alpha * u
        return None


class LambRowwise(Lamb):
    """LAMB (You et al. 2019, arXiv:1904.00962, Algorithm 2) with the trust
    ratio phi(||x_i||) / ||r_i + lambda x_i|| of each row i of the parameter's
    matrix (each block of ``block`` consecutive slices along dim 0, e.g. an
    attention head of a fused QKV weight), 1 where either norm is zero. The
    per-output-neuron granularity is that of LARS's and LAMB's "layer" taken
    to single neurons (You et al. 2017, arXiv:1708.03888, Section 3).
    ``blocks``: parameter name -> block size (default 1)."""

    watch = ()

    def __init__(self, params, overrides=None, blocks=None, **hypers):
        super().__init__(params, overrides, **hypers)
        self.blocks = dict(blocks or {})

    def update(self, w, g, state, t, h, context, name):
        u = self.direction(w, g, state, t, h)
        block = self.blocks.get(name, 1)
        x, um = as_matrix(w, block), as_matrix(u, block)
        wn = np.sqrt((x * x).sum(axis=1))
        un = np.sqrt((um * um).sum(axis=1))
        tr = np.where((wn > 0) & (un > 0), wn / np.where(un > 0, un, 1.0), 1.0)
        x[...] = x - h["lr"] * tr[:, None] * um
        return None
