"""LAMB and its variants: LAMB, LAMBC, NVIDIA's LAMB (apex FusedLAMB).

Notation as in You et al., "Large Batch Optimization for Deep Learning:
Training BERT in 76 minutes", arXiv:1904.00962: ``w`` the layer's weights
(x_t in the paper), ``g`` its gradient, ``u = r + lambda * w`` the Adam-style
update, ``phi`` the scaling function (the identity here), and the layerwise
trust ratio ``phi(||w||) / ||u||``, taken as 1 when either norm is zero.
"""
from __future__ import annotations

import math

import numpy as np

from .base import ReferenceOptimizer, l2norm

__all__ = ["Lamb", "LambC", "NvLamb"]


def _ratio(a: float, b: float) -> float:
    """a / b, or 1 when a or b is zero (the convention of every LAMB implementation)."""
    return a / b if a > 0 and b > 0 else 1.0


class Lamb(ReferenceOptimizer):
    """LAMB, You et al. 2019 (arXiv:1904.00962), Algorithm 2, per layer:

        m_t = beta1 m_{t-1} + (1 - beta1) g_t
        v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
        m_hat = m_t / (1 - beta1^t),  v_hat = v_t / (1 - beta2^t)
        r_t = m_hat / (sqrt(v_hat) + eps)
        x_{t+1} = x_t - eta_t * phi(||x_t||) / ||r_t + lambda x_t|| * (r_t + lambda x_t)

    with phi the identity and the ratio 1 when ||x_t|| or ||r_t + lambda x_t||
    is zero. Records the trust ratio as ``tr``.
    """

    defaults = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.01}
    watch = ("tr",)

    def trust_ratio(self, w_norm: float, u_norm: float, h) -> float:
        return _ratio(w_norm, u_norm)

    def direction(self, w, g, state, t, h):
        """LAMB's update direction u (Algorithm 2): the bias-corrected Adam
        ratio plus weight decay; updates the moments m and v in ``state``."""
        m = state.setdefault("m", np.zeros_like(w))
        v = state.setdefault("v", np.zeros_like(w))
        b1, b2 = h["beta1"], h["beta2"]
        m[...] = b1 * m + (1 - b1) * g
        v[...] = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        r = m_hat / (np.sqrt(v_hat) + h["eps"])
        return r + h["weight_decay"] * w

    def update(self, w, g, state, t, h, context, name):
        u = self.direction(w, g, state, t, h)
        tr = self.trust_ratio(l2norm(w), l2norm(u), h)
        self.last_direction[name] = u
        w[...] = w - h["lr"] * tr * u
        return {"tr": tr}


class LambC(Lamb):
    """LAMBC, Fong, Chen and Chen 2020, "Improving Layer-wise Adaptive Rate
    Methods using Trust Ratio Clipping" (arXiv:2011.13584): LAMB (Algorithm 2
    of arXiv:1904.00962) with the trust ratio clipped from above,

        trust = min(phi(||w||) / ||u||, trust_clip)

    (the paper's best bound is 1; timm's ``Lamb(trust_clip=True)`` clamps the
    ratio at 1.0 after setting it to 1 where a norm is zero, and so does this).
    """

    defaults = {**Lamb.defaults, "trust_clip": 1.0}

    def trust_ratio(self, w_norm, u_norm, h):
        return min(_ratio(w_norm, u_norm), h["trust_clip"])


class NvLamb(ReferenceOptimizer):
    """NVIDIA's LAMB as apex.optimizers.FusedLAMB computes it (NVIDIA/apex,
    apex/optimizers/fused_lamb.py, and csrc/multi_tensor_lamb.cu,
    ``multi_tensor_lamb_cuda``, ``LAMBStage1Functor``, ``LAMBStage2Functor``):

    * FusedLAMB.step: ``global_grad_norm`` is the L2 norm of the gradients of
      all parameters (of every group) that have one;
    * stage 1: ``clipped = gn > max_grad_norm ? gn / max_grad_norm : 1`` and
      ``scaled_grad = g / clipped``; in L2 mode (adam_w_mode = 0)
      ``scaled_grad += decay * p`` before the moments;
      ``m = beta1 m + beta3 scaled_grad`` with ``beta3 = 1 - beta1`` if
      grad_averaging else 1; ``v = beta2 v + (1 - beta2) scaled_grad^2``;
      ``update = (m / bc1) / (sqrt(v / bc2) + eps)`` with
      ``bc = 1 - beta^step`` if bias_correction else 1; in decoupled mode
      (adam_w_mode = 1) ``update += decay * p``;
    * stage 2: ``ratio = lr * ||p|| / ||update||`` if (use_nvlamb or
      decay != 0) and both norms are non-zero, else ``lr``;
      ``p -= ratio * update``.

    Defaults are FusedLAMB's constructor defaults (eps 1e-6 in the code). Here
    ``t`` is the parameter's own step count (apex counts per group, the same
    when every parameter has a gradient at every step). Records the trust
    ratio (``ratio / lr``) as ``tr``.
    """

    defaults = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.01,
                "max_grad_norm": 1.0, "adam_w_mode": 1, "grad_averaging": 1,
                "bias_correction": 1, "use_nvlamb": 0}
    watch = ("tr",)

    def prepare(self, grads):
        return math.sqrt(sum(l2norm(g) ** 2 for g in grads.values()))

    def update(self, w, g, state, t, h, global_grad_norm, name):
        m = state.setdefault("m", np.zeros_like(w))
        v = state.setdefault("v", np.zeros_like(w))
        b1, b2, decay = h["beta1"], h["beta2"], h["weight_decay"]
        max_norm = h["max_grad_norm"]
        clipped = global_grad_norm / max_norm if global_grad_norm > max_norm else 1.0
        scaled = g / clipped
        if not h["adam_w_mode"]:
            scaled = scaled + decay * w
        beta3 = 1 - b1 if h["grad_averaging"] else 1.0
        m[...] = m * b1 + beta3 * scaled
        v[...] = v * b2 + (1 - b2) * scaled * scaled
        bc1, bc2 = (1 - b1 ** t, 1 - b2 ** t) if h["bias_correction"] else (1.0, 1.0)
        u = (m / bc1) / (np.sqrt(v / bc2) + h["eps"])
        if h["adam_w_mode"]:
            u = u + decay * w
        tr = 1.0
        if h["use_nvlamb"] or decay != 0:
            tr = _ratio(l2norm(w), l2norm(u))
        self.last_direction[name] = u
        w[...] = w - h["lr"] * tr * u
        return {"tr": tr}
