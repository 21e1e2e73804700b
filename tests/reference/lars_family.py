"""LARS and its variants: LARS (paper), LARS as stated in the LAMB paper, LARC (apex), timm's LARS."""
from __future__ import annotations

import numpy as np

from .base import ReferenceOptimizer, l2norm
from .classic import sgd_direction

__all__ = ["Lars", "LarsLambPaper", "Larc", "TimmLars"]


class Lars(ReferenceOptimizer):
    """LARS, You, Gitman and Ginsburg 2017, "Large Batch Training of
    Convolutional Networks" (arXiv:1708.03888), Algorithm 1, per layer l:

        lambda^l = eta * ||w^l|| / (||g^l|| + beta ||w^l||)     (local LR, eq. 6)
        v^l     <- m v^l + gamma * lambda^l * (g^l + beta w^l)  (v starts at 0)
        w^l     <- w^l - v^l

    with eta = trust_coefficient, beta = weight_decay, m = momentum and a
    constant global LR gamma = lr. lambda^l is 1 when ||w^l|| or ||g^l|| is
    zero (timm's Lars, apex's LARC). With nesterov, the applied step is
    ``m * v_new + gamma * lambda * (g + beta w)`` (torch SGD's nesterov rule
    applied to the scaled update). Records lambda^l as ``tr``.
    """

    defaults = {"lr": 1.0, "momentum": 0.9, "weight_decay": 0.0,
                "trust_coefficient": 0.001, "nesterov": 0}
    watch = ("tr",)

    def update(self, w, g, state, t, h, context, name):
        buf = state.setdefault("buf", np.zeros_like(w))
        wd = h["weight_decay"]
        w_norm, g_norm = l2norm(w), l2norm(g)
        if w_norm > 0 and g_norm > 0:
            local_lr = h["trust_coefficient"] * w_norm / (g_norm + wd * w_norm)
        else:
            local_lr = 1.0
        direction = g + wd * w
        self.last_direction[name] = direction
        d = h["lr"] * local_lr * direction
        buf[...] = h["momentum"] * buf + d
        step = h["momentum"] * buf + d if h["nesterov"] else buf
        w[...] = w - step
        return {"tr": local_lr}


class LarsLambPaper(ReferenceOptimizer):
    """LARS as written in You et al. 2019, "Large Batch Optimization for Deep
    Learning: Training BERT in 76 minutes" (arXiv:1904.00962), Algorithm 1:

        m_t = beta1 m_{t-1} + (1 - beta1)(g_t + lambda x_t),    m_0 = 0
        x_{t+1}^(i) = x_t^(i) - eta_t phi(||x_t^(i)||) / ||m_t^(i)|| m_t^(i)

    with phi the identity; the ratio is 1 when ||x_t|| or ||m_t|| is zero.
    Records the ratio as ``tr``.
    """

    defaults = {"lr": 1e-3, "beta1": 0.9, "weight_decay": 0.01}
    watch = ("tr",)

    def update(self, w, g, state, t, h, context, name):
        m = state.setdefault("m", np.zeros_like(w))
        m[...] = h["beta1"] * m + (1 - h["beta1"]) * (g + h["weight_decay"] * w)
        w_norm, m_norm = l2norm(w), l2norm(m)
        tr = w_norm / m_norm if w_norm > 0 and m_norm > 0 else 1.0
        self.last_direction[name] = m.copy()
        w[...] = w - h["lr"] * tr * m
        return {"tr": tr}


class Larc(ReferenceOptimizer):
    """LARC in clip mode: apex.parallel.LARC (NVIDIA/apex, apex/parallel/LARC.py,
    ``LARC.step``) wrapped around torch.optim.SGD (torch/optim/sgd.py):

        if ||p|| != 0 and ||g|| != 0:
            adaptive_lr = trust_coefficient * ||p|| / (||g|| + ||p|| * weight_decay + eps)
            adaptive_lr = min(adaptive_lr / lr, 1)            # clip=True
            g = (g + weight_decay * p) * adaptive_lr
        (else g is unchanged and no weight decay is added: LARC has set the
        group's weight_decay to 0 for the inner SGD)
        SGD: buf = g at the first step, else momentum * buf + (1 - dampening) g;
             d = g if momentum == 0, g + momentum * buf if nesterov, else buf;
             p -= lr * d

    Records the (clipped) adaptive_lr as ``tr`` (1 when it is not applied).
    """

    defaults = {"lr": 1e-3, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0,
                "nesterov": 0, "trust_coefficient": 0.02, "eps": 1e-8}
    watch = ("tr",)

    def update(self, w, g, state, t, h, context, name):
        wd, lr = h["weight_decay"], h["lr"]
        w_norm, g_norm = l2norm(w), l2norm(g)
        adaptive_lr = 1.0
        if w_norm != 0 and g_norm != 0:
            adaptive_lr = h["trust_coefficient"] * w_norm / (g_norm + w_norm * wd + h["eps"])
            adaptive_lr = min(adaptive_lr / lr, 1.0)
            g = (g + wd * w) * adaptive_lr
        w[...] = w - lr * sgd_direction(g, state, h)
        return {"tr": adaptive_lr}


class TimmLars(ReferenceOptimizer):
    """LARS as timm computes it: timm.optim.Lars (timm 1.0.31,
    timm/optim/lars.py, ``_single_tensor_lars`` and ``_lars_trust_ratio``),
    after arXiv:1708.03888, Algorithm 1:

        if weight_decay != 0 or always_adapt:
            r = trust_coeff * ||p|| / (||g|| + weight_decay * ||p|| + eps)
                (1 when ||p|| or ||g|| is zero)
            if trust_clip: r = min(r / lr, 1)
            g = (g + weight_decay * p) * r
        SGD (torch.optim.SGD's rule, weight decay already in g): p -= lr * d

    Records r as ``tr`` (computed even where it is not applied, as the
    program does).
    """

    defaults = {"lr": 1.0, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                "nesterov": 0, "trust_coeff": 0.001, "eps": 1e-8, "trust_clip": 0,
                "always_adapt": 0}
    watch = ("tr",)

    def update(self, w, g, state, t, h, context, name):
        wd, lr = h["weight_decay"], h["lr"]
        w_norm, g_norm = l2norm(w), l2norm(g)
        r = 1.0
        if w_norm > 0 and g_norm > 0:
            r = h["trust_coeff"] * w_norm / (g_norm + wd * w_norm + h["eps"])
        if h["trust_clip"]:
            r = min(r / lr, 1.0)
        if wd != 0 or h["always_adapt"]:
            g = (g + wd * w) * r
        w[...] = w - lr * sgd_direction(g, state, h)
        return {"tr": r}
