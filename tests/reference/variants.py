"""References of the five variants in ``examples/variants/`` (issue 12).

Each is written from its paper or from the source file of the implementation
it follows, cited in its docstring, independently of the ``.lw`` text (and
of the ``lamb`` preset's defs the text overrides): a full per-layer update in
the notation of its source. Notation as in lamb_family.py: ``w`` the layer's
weights, ``g`` its gradient, ``t`` this parameter's step count (1 at its
first step), the trust ratio taken as 1 where a norm is zero.
"""
from __future__ import annotations

import math

import numpy as np

from .base import ReferenceOptimizer, l2norm
from .lars_family import Lars

__all__ = ["LambNoBiasCorrection", "KerasLamb", "DeepSpeedLamb", "RAdamLamb", "LarsClipped",
           "radam_rho"]

_LAMB_DEFAULTS = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.01}


def _moments(state, w, g, b1, b2):
    """Adam's moving averages, updated in place: m = b1 m + (1 - b1) g,
    v = b2 v + (1 - b2) g^2 (both start at 0)."""
    m = state.setdefault("m", np.zeros_like(w))
    v = state.setdefault("v", np.zeros_like(w))
    m[...] = b1 * m + (1 - b1) * g
    v[...] = b2 * v + (1 - b2) * g * g
    return m, v


def _ratio(w_norm: float, u_norm: float) -> float:
    return w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0


class LambNoBiasCorrection(ReferenceOptimizer):
    """LAMB (You et al. 2019, arXiv:1904.00962, Algorithm 2) without bias
    correction, per layer:

        r = m_t / (sqrt(v_t) + eps)
        x_{t+1} = x_t - eta * ||x_t|| / ||r + lambda x_t|| * (r + lambda x_t)

    (apex FusedLAMB with bias_correction=False, apex/optimizers/fused_lamb.py,
    when its gradient pre-normalization is off and weight_decay != 0).
    """

    defaults = dict(_LAMB_DEFAULTS)

    def update(self, w, g, state, t, h, context, name):
        m, v = _moments(state, w, g, h["beta1"], h["beta2"])
        u = m / (np.sqrt(v) + h["eps"]) + h["weight_decay"] * w
        w[...] = w - h["lr"] * _ratio(l2norm(w), l2norm(u)) * u


class KerasLamb(ReferenceOptimizer):
    """Keras 3's LAMB: ``keras.optimizers.Lamb`` (keras-team/keras,
    keras/src/optimizers/lamb.py, ``update_step``) after the base optimizer's
    decoupled weight decay (keras/src/optimizers/base_optimizer.py:
    ``apply`` calls ``_apply_weight_decay`` before the update step):

        variable = variable - variable * weight_decay * lr
        m_t_hat  = m / (1 - beta_1^t)
        v_sqrt   = sqrt(v / (1 - beta_2^t)) + epsilon
        update   = m_t_hat / v_sqrt
        ratio    = ||variable|| / ||update||  (1 where either norm is 0)
        variable = variable - ratio * lr * update

    Keras accumulates ``m += (g - m) * (1 - beta_1)``, the same number as
    ``beta_1 m + (1 - beta_1) g`` up to rounding. Defaults: the lamb preset's,
    with Keras's epsilon 1e-7.
    """

    defaults = {**_LAMB_DEFAULTS, "eps": 1e-7}

    def update(self, w, g, state, t, h, context, name):
        lr, b1, b2 = h["lr"], h["beta1"], h["beta2"]
        w[...] = w - w * h["weight_decay"] * lr
        m = state.setdefault("m", np.zeros_like(w))
        v = state.setdefault("v", np.zeros_like(w))
        m += (g - m) * (1 - b1)
        v += (g * g - v) * (1 - b2)
        update = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + h["eps"])
        w[...] = w - _ratio(l2norm(w), l2norm(update)) * lr * update


class DeepSpeedLamb(ReferenceOptimizer):
    """DeepSpeed's FusedLamb (microsoft/DeepSpeed, deepspeed/ops/lamb/fused_lamb.py,
    kernel csrc/lamb/fused_lamb_cuda_kernel.cu: ``fused_lamb_cuda``,
    ``lamb_cuda_kernel_part1``, ``lamb_cuda_kernel_part3``) with
    eps_inside_sqrt=False (eps mode 1), bias_correction=True, no gradient
    scaling and max_grad_norm = 0:

        step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)
        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        update = m / (sqrt(v) + eps) + decay * p
        lamb_coeff = 1; if ||p|| != 0 and ||update|| != 0:
            lamb_coeff = ||p|| / ||update||, then min(., max_coeff), then max(., min_coeff)
        p = p - step_size * lamb_coeff * update

    with FusedLamb's default max_coeff = 10 and min_coeff = 0.01, and the
    lamb preset's other defaults.
    """

    defaults = dict(_LAMB_DEFAULTS)
    max_coeff, min_coeff = 10.0, 0.01

    def update(self, w, g, state, t, h, context, name):
        b1, b2 = h["beta1"], h["beta2"]
        step_size = h["lr"] * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        m, v = _moments(state, w, g, b1, b2)
        update = m / (np.sqrt(v) + h["eps"]) + h["weight_decay"] * w
        reg_w, reg_u = l2norm(w), l2norm(update)
        lamb_coeff = 1.0
        if reg_w != 0 and reg_u != 0:
            lamb_coeff = reg_w / reg_u
            if lamb_coeff > self.max_coeff:
                lamb_coeff = self.max_coeff
            if lamb_coeff < self.min_coeff:
                lamb_coeff = self.min_coeff
        w[...] = w - step_size * lamb_coeff * update


def radam_rho(beta2: float, t: int) -> tuple[float, float]:
    """(rho_inf, rho_t) of Liu et al. 2019 (arXiv:1908.03265), Algorithm 2."""
    rho_inf = 2 / (1 - beta2) - 1
    return rho_inf, rho_inf - 2 * t * beta2 ** t / (1 - beta2 ** t)


class RAdamLamb(ReferenceOptimizer):
    """RAdam's rectification (Liu et al. 2019, "On the Variance of the Adaptive
    Learning Rate and Beyond", arXiv:1908.03265, Algorithm 2) as LAMB's
    update direction (You et al. 2019, arXiv:1904.00962, Algorithm 2):

        m_hat = m_t / (1 - beta1^t),  v_hat = v_t / (1 - beta2^t)
        if rho_t > 4 (the paper's threshold):
            r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
            d = r_t * m_hat / (sqrt(v_hat) + eps)    (the paper's l_t, with LAMB's eps)
        else:
            d = m_hat                                (un-adapted momentum)
        u = d + lambda x_t
        x_{t+1} = x_t - eta * ||x_t|| / ||u|| * u
    """

    defaults = dict(_LAMB_DEFAULTS)

    def update(self, w, g, state, t, h, context, name):
        b1, b2 = h["beta1"], h["beta2"]
        m, v = _moments(state, w, g, b1, b2)
        m_hat = m / (1 - b1 ** t)
        rho_inf, rho_t = radam_rho(b2, t)
        if rho_t > 4:
            r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                            / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            d = r_t * m_hat / (np.sqrt(v / (1 - b2 ** t)) + h["eps"])
        else:
            d = m_hat
        u = d + h["weight_decay"] * w
        w[...] = w - h["lr"] * _ratio(l2norm(w), l2norm(u)) * u


class LarsClipped(Lars):
    """LARS (You, Gitman and Ginsburg 2017, arXiv:1708.03888, Algorithm 1: the
    ``Lars`` reference) on gradients first clipped by their global norm as
    ``torch.nn.utils.clip_grad_norm_`` does (torch/nn/utils/clip_grad.py):

        total_norm = sqrt(sum over every parameter with a gradient of ||g||^2)
        g = g * min(max_grad_norm / (total_norm + 1e-6), 1)

    Records LARS's local LR (of the clipped gradient) as ``tr``.
    """

    defaults = {**Lars.defaults, "max_grad_norm": 1.0}

    def prepare(self, grads):
        return math.sqrt(sum(l2norm(g) ** 2 for g in grads.values()))

    def update(self, w, g, state, t, h, total_norm, name):
        coef = min(h["max_grad_norm"] / (total_norm + 1e-6), 1.0)
        return super().update(w, g * coef, state, t, h, None, name)
