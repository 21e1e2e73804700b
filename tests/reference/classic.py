"""Adam, AdamW and SGD as torch.optim computes them (the non-layerwise baselines)."""
from __future__ import annotations

import numpy as np

from .base import ReferenceOptimizer

__all__ = ["Adam", "AdamW", "Sgd", "Lion"]


class Adam(ReferenceOptimizer):
    """Adam, Kingma and Ba (arXiv:1412.6980), Algorithm 1, in the form of
    torch.optim.Adam with amsgrad=False (torch/optim/adam.py,
    ``_single_tensor_adam``):

        g = g + weight_decay * w                 (L2 penalty)
        m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
        w = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    defaults = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    decoupled = False

    def update(self, w, g, state, t, h, context, name):
        m = state.setdefault("m", np.zeros_like(w))
        v = state.setdefault("v", np.zeros_like(w))
        lr, wd, b1, b2 = h["lr"], h["weight_decay"], h["beta1"], h["beta2"]
        if self.decoupled:
            w[...] = w * (1 - lr * wd)
        else:
            g = g + wd * w
        m[...] = b1 * m + (1 - b1) * g
        v[...] = b2 * v + (1 - b2) * g * g
        denom = np.sqrt(v) / np.sqrt(1 - b2 ** t) + h["eps"]
        w[...] = w - (lr / (1 - b1 ** t)) * m / denom


class AdamW(Adam):
    """AdamW, Loshchilov and Hutter, "Decoupled Weight Decay Regularization"
    (arXiv:1711.05101), Algorithm 2, in the form of torch.optim.AdamW with
    amsgrad=False (torch/optim/adamw.py -> ``_single_tensor_adam`` with
    decoupled_weight_decay=True): first ``w = w * (1 - lr * weight_decay)``,
    then the Adam step of :class:`Adam` without the L2 term.
    """

    defaults = {**Adam.defaults, "weight_decay": 1e-2}
    decoupled = True


def sgd_direction(g: np.ndarray, state: dict, h: dict) -> np.ndarray:
    """torch.optim.SGD's step direction from gradient ``g`` (weight decay already added).

    With momentum, the buffer starts as ``g`` itself at the first step, then
    ``buf = momentum * buf + (1 - dampening) * g``; nesterov returns
    ``g + momentum * buf``, otherwise ``buf``. Without momentum, ``g``.
    Source: torch/optim/sgd.py, ``_single_tensor_sgd``.
    """
    momentum = h["momentum"]
    if momentum == 0:
        return g
    if "buf" not in state:
        state["buf"] = np.array(g, dtype=np.float64)
    else:
        state["buf"][...] = momentum * state["buf"] + (1 - h["dampening"]) * g
    buf = state["buf"]
    return g + momentum * buf if h["nesterov"] else buf


class Sgd(ReferenceOptimizer):
    """SGD with momentum, dampening and Nesterov momentum as torch.optim.SGD
    computes it (torch/optim/sgd.py, ``_single_tensor_sgd``; Nesterov after
    Sutskever et al. 2013):

        g = g + weight_decay * w
        if momentum != 0:
            buf = g (a copy) at the parameter's first step,
                  else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        w = w - lr * g
    """

    defaults = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                "nesterov": 0}

    def update(self, w, g, state, t, h, context, name):
        g = g + h["weight_decay"] * w
        w[...] = w - h["lr"] * sgd_direction(g, state, h)


class Lion(ReferenceOptimizer):
    """Lion, Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"
    (arXiv:2302.06675), Algorithm 2, with decoupled weight decay:

        c = beta1 * m + (1 - beta1) * g
        w = w - lr * (sign(c) + weight_decay * w)
        m = beta2 * m + (1 - beta2) * g
    """

    defaults = {"lr": 1e-4, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0}

    def update(self, w, g, state, t, h, context, name):
        m = state.setdefault("m", np.zeros_like(w))
        c = h["beta1"] * m + (1 - h["beta1"]) * g
        w[...] = w - h["lr"] * (np.sign(c) + h["weight_decay"] * w)
        m[...] = h["beta2"] * m + (1 - h["beta2"]) * g
