"""The NumPy references (tests/reference/) are themselves right.

Each check here is independent of the reference it tests: other libraries
(torch.optim, torch_optimizer, pytorch_optimizer) where their options give
the same math, apex LARC's logic transcribed around torch.optim.SGD, or
numbers worked out by hand. ``layerwise`` is not used here at all.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from reference import REFERENCES, Adam, AdamW, Lamb, LambC, Larc, Lars, LarsLambPaper, NvLamb, Sgd
from reference.problem import SHAPES, ZERO_GRAD, ZERO_PARAM, make_problem, rel_err

STEPS = 20
TOL = 1e-12
NO_ZERO_PARAM = {n: s for n, s in SHAPES.items() if n != ZERO_PARAM}


# --------------------------------------------------------------------------- helpers
def run_reference(cls, params, grads, overrides=None, **hypers):
    params = copy.deepcopy(params)
    opt = cls(params, overrides=overrides, **hypers)
    for g in grads:
        opt.step(g)
    return params, opt


def run_torch(make_opt, params, grads):
    """Run a torch optimizer built by ``make_opt(list of tensors)`` in float64."""
    tensors = {n: torch.nn.Parameter(torch.tensor(p, dtype=torch.float64)) for n, p in params.items()}
    opt = make_opt(list(tensors.values()))
    for g in grads:
        for n, p in tensors.items():
            p.grad = None if g[n] is None else torch.tensor(g[n], dtype=torch.float64)
        opt.step()
    return {n: p.detach().numpy() for n, p in tensors.items()}


def assert_same(actual, expected, tol=TOL):
    assert actual.keys() == expected.keys()
    for n in expected:
        err = rel_err(actual[n], expected[n])
        assert err <= tol, f"{n}: relative error {err:.3g} > {tol:g}"


# --------------------------------------------------------------------------- torch.optim
TORCH_CASES = [
    (AdamW, torch.optim.AdamW, {}, {}),
    (AdamW, torch.optim.AdamW, {"lr": 1e-2, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6,
                                "weight_decay": 0.1},
     {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    (Adam, torch.optim.Adam, {}, {}),
    (Adam, torch.optim.Adam, {"lr": 3e-3, "weight_decay": 0.05}, {"lr": 3e-3, "weight_decay": 0.05}),
    (Sgd, torch.optim.SGD, {}, {}),
    (Sgd, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
     {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    (Sgd, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": 1, "weight_decay": 0.01},
     {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
]


@pytest.mark.parametrize("ref_cls, torch_cls, hypers, torch_hypers", TORCH_CASES,
                         ids=lambda x: getattr(x, "__name__", None) or str(x))
def test_matches_torch_optim(ref_cls, torch_cls, hypers, torch_hypers):
    """20 float64 steps on mixed shapes (0-d, zero parameter, zero and missing gradients)."""
    params, grads = make_problem(seed=1, steps=STEPS)
    expected = run_torch(lambda ps: torch_cls(ps, foreach=False, **torch_hypers), params, grads)
    actual, _ = run_reference(ref_cls, params, grads, **hypers)
    assert_same(actual, expected)


@pytest.mark.parametrize("ref_cls, torch_cls", [(AdamW, torch.optim.AdamW),
                                                (Adam, torch.optim.Adam),
                                                (Sgd, torch.optim.SGD)])
def test_defaults_are_torch_defaults(ref_cls, torch_cls):
    d = torch_cls([torch.nn.Parameter(torch.zeros(1))]).defaults
    expected = {"lr": d["lr"], "weight_decay": d["weight_decay"]}
    if "betas" in d:
        expected |= {"beta1": d["betas"][0], "beta2": d["betas"][1], "eps": d["eps"]}
    else:
        expected |= {"momentum": d["momentum"], "dampening": d["dampening"],
                     "nesterov": int(d["nesterov"])}
    assert dict(ref_cls.defaults) == expected


# --------------------------------------------------------------------------- LAMB
# torch_optimizer.Lamb (debias=False) and pytorch_optimizer.Lamb
# (weight_decouple=False, adam_debias=True, no pre_norm/rectify) both compute
#     u = m / (sqrt(v) + eps) + wd * w,   w -= lr * clamp(||w||) / ||u|| * u
# (pytorch_optimizer divides by ||u|| + eps). That is LAMB's Algorithm 2 without
# the bias corrections, so the same math as the paper holds in two settings:
#   * beta1 = beta2 = 0: both bias corrections are 1 - 0^t = 1, any eps, any wd;
#   * weight_decay = 0 and eps negligible (1e-300): the bias corrections scale
#     u by sqrt(1 - beta2^t) / (1 - beta1^t), which the trust ratio cancels
#     (except where the ratio is 1 because ||w|| = 0: no zero parameter then).
# The clamp on ||w|| (10 by default in both) is lifted.
LAMB_SAME_MATH = [
    pytest.param({"beta1": 0.0, "beta2": 0.0, "eps": 1e-6, "weight_decay": 0.01}, id="betas0-wd"),
    pytest.param({"beta1": 0.9, "beta2": 0.999, "eps": 1e-300, "weight_decay": 0.0}, id="wd0-eps0"),
]


@pytest.mark.parametrize("hypers", LAMB_SAME_MATH)
def test_lamb_matches_torch_optimizer(hypers):
    import torch_optimizer
    shapes = NO_ZERO_PARAM if hypers["beta1"] else SHAPES
    params, grads = make_problem(seed=2, steps=STEPS, shapes=shapes)
    expected = run_torch(lambda ps: torch_optimizer.Lamb(
        ps, lr=1e-2, betas=(hypers["beta1"], hypers["beta2"]), eps=hypers["eps"],
        weight_decay=hypers["weight_decay"], clamp_value=1e300, debias=False), params, grads)
    actual, _ = run_reference(Lamb, params, grads, lr=1e-2, **hypers)
    assert_same(actual, expected)


@pytest.mark.parametrize("hypers", [p for p in LAMB_SAME_MATH if p.id == "wd0-eps0"] + [
    pytest.param({"beta1": 0.0, "beta2": 0.0, "eps": 1e-300, "weight_decay": 0.01},
                 id="betas0-wd-eps0")])
def test_lamb_matches_pytorch_optimizer(hypers):
    """pytorch_optimizer adds eps to ||u|| in the trust ratio, hence eps = 1e-300 in both cases."""
    import pytorch_optimizer

    def make(ps):
        opt = pytorch_optimizer.Lamb(
            ps, lr=1e-2, betas=(hypers["beta1"], hypers["beta2"]), eps=hypers["eps"],
            weight_decay=hypers["weight_decay"], weight_decouple=False, adam_debias=True,
            rectify=False, pre_norm=False, grad_averaging=True, adam=False, foreach=False)
        opt.clamp = math.inf
        return opt

    shapes = NO_ZERO_PARAM if hypers["beta1"] else SHAPES
    params, grads = make_problem(seed=3, steps=STEPS, shapes=shapes)
    expected = run_torch(make, params, grads)
    actual, _ = run_reference(Lamb, params, grads, lr=1e-2, **hypers)
    assert_same(actual, expected)


def test_lamb_by_hand():
    """One step, t = 1: m_hat = g, v_hat = g^2, so r = g / (|g| + eps)."""
    params = {"w": np.array([3.0, 4.0]), "z": np.zeros(2)}
    opt = Lamb(params, lr=0.1, eps=0.0, weight_decay=0.1)
    opt.step({"w": np.array([2.0, -0.5]), "z": np.array([1.0, 1.0])})
    # w: r = [1, -1], u = [1.3, -0.6], trust = 5 / sqrt(2.05)
    u = np.array([1.3, -0.6])
    np.testing.assert_allclose(params["w"], [3, 4] - 0.1 * 5 / math.sqrt(2.05) * u, rtol=1e-15)
    # z: ||w|| = 0, so trust = 1 and the step is lr * r
    np.testing.assert_allclose(params["z"], [-0.1, -0.1], rtol=1e-15)


def test_lamb_zero_gradient_is_weight_decay_step():
    params = {"w": np.array([1.0, -2.0])}
    opt = Lamb(params, lr=0.1, weight_decay=0.1)
    opt.step({"w": np.zeros(2)})
    # u = wd * w, trust = ||w|| / (wd ||w||) = 1 / wd: w <- w - lr * w
    np.testing.assert_allclose(params["w"], [0.9, -1.8], rtol=1e-15)
    assert opt.watched["tr"]["w"] == [pytest.approx(10.0, rel=1e-15)]


# --------------------------------------------------------------------------- LAMBC
def test_lambc_unclipped_is_lamb_and_clip_bounds_the_ratio():
    params, grads = make_problem(seed=4, steps=STEPS)
    lamb, lamb_opt = run_reference(Lamb, params, grads)
    loose, _ = run_reference(LambC, params, grads, trust_clip=math.inf)
    assert_same(loose, lamb, tol=0.0)
    _, clipped = run_reference(LambC, params, grads, trust_clip=0.8)
    ratios = [r for rs in clipped.watched["tr"].values() for r in rs]
    assert max(ratios) == 0.8 and min(ratios) < 0.8
    # step 1 sees the same state in both runs: the clip is min(ratio, 0.8)
    for n, rs in lamb_opt.watched["tr"].items():
        if rs:
            assert clipped.watched["tr"][n][0] == min(rs[0], 0.8)


# --------------------------------------------------------------------------- NVLAMB
def test_nvlamb_by_hand():
    """Step 1 with eps ~ 0: the Adam step is sign(g) in every element.

    Gradients a = [0, 3], b = [4]: global norm 5 > max_grad_norm = 1, so they
    are divided by 5 (the sign does not change). Parameter b is in a group
    with weight_decay = 0: no trust ratio unless use_nvlamb.
    """
    def run(weight_decay=0.1, **hypers):
        params = {"a": np.array([3.0, 4.0]), "b": np.array([2.0])}
        opt = NvLamb(params, overrides={"b": {"weight_decay": 0.0}}, lr=0.1, eps=1e-300,
                     weight_decay=weight_decay, **hypers)
        opt.step({"a": np.array([0.0, 3.0]), "b": np.array([4.0])})
        return params, opt

    params, opt = run()
    u = np.array([0.0, 1.0]) + 0.1 * np.array([3.0, 4.0])
    tr = 5 / np.linalg.norm(u)
    np.testing.assert_allclose(params["a"], [3, 4] - 0.1 * tr * u, rtol=1e-15)
    np.testing.assert_allclose(params["b"], [2 - 0.1], rtol=1e-15)
    assert opt.watched["tr"]["b"] == [1.0]
    params, opt = run(use_nvlamb=1)
    np.testing.assert_allclose(params["b"], [2 - 0.1 * 2], rtol=1e-15)   # trust ||2|| / ||1||
    # L2 mode: wd enters the gradient: g' = [0, 0.6] + 0.1 [3, 4] = [0.3, 1.0]; u = [1, 1]
    params, opt = run(adam_w_mode=0)
    np.testing.assert_allclose(params["a"], [3, 4] - 0.1 * 5 / math.sqrt(2) * np.ones(2),
                               rtol=1e-15)
    # no bias correction, no grad averaging: m = g', v = (1 - 0.96) g'^2, u = 5 sign(g')
    params, opt = run(beta2=0.96, bias_correction=0, grad_averaging=0, weight_decay=0.0,
                      use_nvlamb=1)
    np.testing.assert_allclose(params["a"], [3, 4] - 0.1 * 5 / 5 * np.array([0.0, 5.0]),
                               rtol=1e-14)


def test_nvlamb_without_clipping_is_lamb():
    """adam_w_mode = 1 and a max_grad_norm above the global norm: LAMB, Algorithm 2
    (use_nvlamb = 1 so that the zero-decay case also gets a trust ratio)."""
    params, grads = make_problem(seed=5, steps=STEPS)
    for wd, use_nvlamb in ((0.01, 0), (0.0, 1)):
        lamb, _ = run_reference(Lamb, params, grads, weight_decay=wd)
        nv, _ = run_reference(NvLamb, params, grads, weight_decay=wd, use_nvlamb=use_nvlamb,
                              max_grad_norm=math.inf)
        assert_same(nv, lamb, tol=1e-14)


def test_nvlamb_prenormalization_is_division_by_global_norm():
    """Dividing every step's gradients by max(global norm / max_grad_norm, 1) by
    hand and switching the clip off gives the same run (eps large, so that
    the Adam step is not scale-invariant and the division matters)."""
    params, grads = make_problem(seed=6, steps=STEPS)
    clipped, _ = run_reference(NvLamb, params, grads, eps=0.5, max_grad_norm=2.0)
    by_hand = []
    for g in grads:
        gn = math.sqrt(sum(float(np.sum(x * x)) for x in g.values() if x is not None))
        assert gn > 2.0
        by_hand.append({n: None if x is None else x / (gn / 2.0) for n, x in g.items()})
    manual, _ = run_reference(NvLamb, params, by_hand, eps=0.5, max_grad_norm=math.inf)
    assert_same(clipped, manual, tol=1e-14)
    unclipped, _ = run_reference(NvLamb, params, grads, eps=0.5, max_grad_norm=math.inf)
    assert max(rel_err(unclipped[n], clipped[n]) for n in params) > 1e-3


def test_nvlamb_l2_mode_is_lamb_on_the_l2_gradient():
    """adam_w_mode = 0: the moments see g + wd * w; that is LAMB with wd = 0 fed
    the L2 gradient (use_nvlamb = 1: LAMB always applies the trust ratio)."""
    params, grads = make_problem(seed=7, steps=STEPS)
    wd = 0.05
    nv_params = copy.deepcopy(params)
    nv = NvLamb(nv_params, adam_w_mode=0, weight_decay=wd, use_nvlamb=1, max_grad_norm=math.inf)
    lamb_params = copy.deepcopy(params)
    lamb = Lamb(lamb_params, weight_decay=0.0)
    for g in grads:
        nv.step(g)
        lamb.step({n: None if x is None else x + wd * lamb_params[n] for n, x in g.items()})
    assert_same(nv_params, lamb_params, tol=1e-12)


# --------------------------------------------------------------------------- LARS
def test_lars_by_hand():
    """w = [3, 4] (norm 5), g = [0.6, 0.8] (norm 1), wd = 0.1, eta = 0.01, lr = 0.5.

    step 1: local = 0.01 * 5 / (1 + 0.1 * 5) = 1/30; g + wd w = [0.9, 1.2];
            v = 0.5 / 30 * [0.9, 1.2] = [0.015, 0.02]; w = [2.985, 3.98]
    step 2: g = 0, so local = 1 (zero-norm rule); d = 0.5 * 0.1 * w = [0.14925, 0.199];
            v = 0.9 * [0.015, 0.02] + d = [0.16275, 0.217]; w = [2.82225, 3.763]
    """
    params = {"w": np.array([3.0, 4.0])}
    opt = Lars(params, lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01)
    opt.step({"w": np.array([0.6, 0.8])})
    np.testing.assert_allclose(params["w"], [2.985, 3.98], rtol=1e-15)
    opt.step({"w": np.zeros(2)})
    np.testing.assert_allclose(params["w"], [2.82225, 3.763], rtol=1e-15)
    assert opt.watched["tr"]["w"] == [pytest.approx(1 / 30, rel=1e-15), 1.0]

    # nesterov, step 1: w -= momentum * v + d = 1.9 * [0.015, 0.02]
    params = {"w": np.array([3.0, 4.0])}
    opt = Lars(params, lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01,
               nesterov=1)
    opt.step({"w": np.array([0.6, 0.8])})
    np.testing.assert_allclose(params["w"], [2.9715, 3.962], rtol=1e-15)


@pytest.mark.parametrize("wd, nesterov, skip_zero_grad", [(0.0, False, False), (1e-2, False, True),
                                                          (1e-2, True, True)])
def test_lars_matches_pytorch_optimizer(wd, nesterov, skip_zero_grad):
    """pytorch_optimizer.LARS computes the same step for parameters with ndim > 1
    and dampening 0: its buffer is ours divided by lr (it multiplies by lr after
    the momentum), which is the same while lr is constant. Its ratio is 1 when
    ||w|| = 0 or ||g|| + wd ||w|| = 0, ours when ||w|| = 0 or ||g|| = 0: the same
    for a zero gradient only when wd = 0."""
    import pytorch_optimizer
    shapes = {n: s for n, s in SHAPES.items() if len(s) > 1 or n == "zero_param"}
    shapes["zero_param"] = (2, 3)
    if skip_zero_grad:
        del shapes[ZERO_GRAD]
    params, grads = make_problem(seed=8, steps=STEPS, shapes=shapes)
    hypers = dict(lr=0.5, momentum=0.9, weight_decay=wd, trust_coefficient=0.01)
    expected = run_torch(lambda ps: pytorch_optimizer.LARS(ps, dampening=0.0, nesterov=nesterov,
                                                           foreach=False, **hypers),
                         params, grads)
    actual, _ = run_reference(Lars, params, grads, nesterov=int(nesterov), **hypers)
    assert_same(actual, expected)


def test_lars_lamb_paper_by_hand():
    """beta1 = 0.5, wd = 0.1, lr = 0.1, w = [3, 4], g = [0.6, 0.8]:
    m = 0.5 * [0.9, 1.2] = [0.45, 0.6] (norm 0.75); w -= 0.1 * 5 / 0.75 * m = [0.3, 0.4]."""
    params = {"w": np.array([3.0, 4.0]), "z": np.zeros(2)}
    opt = LarsLambPaper(params, lr=0.1, beta1=0.5, weight_decay=0.1)
    opt.step({"w": np.array([0.6, 0.8]), "z": np.array([2.0, 0.0])})
    np.testing.assert_allclose(params["w"], [2.7, 3.6], rtol=1e-15)
    np.testing.assert_allclose(params["z"], [-0.1, 0.0], rtol=1e-15)   # ratio 1, m = [1, 0]
    assert opt.watched["tr"] == {"w": [pytest.approx(5 / 0.75, rel=1e-15)], "z": [1.0]}


# --------------------------------------------------------------------------- LARC
class ApexLARC:
    """apex/parallel/LARC.py ``LARC.step`` (clip and scale modes), transcribed
    line for line around a real torch.optim.SGD."""

    def __init__(self, optimizer, trust_coefficient=0.02, clip=True, eps=1e-8):
        self.optim, self.trust_coefficient, self.clip, self.eps = (
            optimizer, trust_coefficient, clip, eps)

    @torch.no_grad()
    def step(self):
        weight_decays = []
        for group in self.optim.param_groups:
            weight_decay = group["weight_decay"] if "weight_decay" in group else 0
            weight_decays.append(weight_decay)
            group["weight_decay"] = 0
            for p in group["params"]:
                if p.grad is None:
                    continue
                param_norm = torch.norm(p.data)
                grad_norm = torch.norm(p.grad.data)
                if param_norm != 0 and grad_norm != 0:
                    adaptive_lr = self.trust_coefficient * param_norm / (
                        grad_norm + param_norm * weight_decay + self.eps)
                    if self.clip:
                        adaptive_lr = min(adaptive_lr / group["lr"], 1)
                    p.grad.data += weight_decay * p.data
                    p.grad.data *= adaptive_lr
        self.optim.step()
        for i, group in enumerate(self.optim.param_groups):
            group["weight_decay"] = weight_decays[i]


@pytest.mark.parametrize("hypers", [
    {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2},
    {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2, "nesterov": 1},
    {"lr": 0.1, "momentum": 0.9, "dampening": 0.2},
    {"lr": 0.1, "momentum": 0.0, "weight_decay": 1e-2},
    {"lr": 1e-3},
], ids=str)
def test_larc_matches_apex_larc_around_torch_sgd(hypers):
    h = {**Larc.defaults, **hypers}
    params, grads = make_problem(seed=9, steps=STEPS)
    expected = run_torch(lambda ps: ApexLARC(
        torch.optim.SGD(ps, lr=h["lr"], momentum=h["momentum"], dampening=h["dampening"],
                        weight_decay=h["weight_decay"], nesterov=bool(h["nesterov"]),
                        foreach=False),
        trust_coefficient=h["trust_coefficient"], eps=h["eps"]), params, grads)
    actual, opt = run_reference(Larc, params, grads, **hypers)
    assert_same(actual, expected)
    if hypers["lr"] == 0.1:   # the clip is active for some layers and not for others
        ratios = [r for rs in opt.watched["tr"].values() for r in rs]
        assert min(ratios) < 1.0 and max(ratios) == 1.0


# --------------------------------------------------------------------------- all references
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_missing_gradient_keeps_state_and_step_count(name):
    params, grads = make_problem(seed=10, steps=6)
    _, opt = run_reference(REFERENCES[name], params, grads)
    assert opt.steps["sometimes"] == 4 and opt.steps["layer1.weight"] == 6
    for key, per_param in opt.watched.items():
        assert len(per_param["sometimes"]) == 4


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_unknown_hyper_is_an_error(name):
    with pytest.raises(TypeError, match="unknown hypers"):
        REFERENCES[name]({"w": np.zeros(2)}, learning_rate=0.1)
