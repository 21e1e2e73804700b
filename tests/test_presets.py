"""Every shipped preset against its independent NumPy reference (tests/reference/).

Through the contract API only (LANGUAGE.md section 8): ``lw.Optimizer(named
parameters or param groups, preset name, compile=..., **hypers)``, set
``.grad``, call ``step()``. 20 steps on parameters of mixed shapes (a 0-d
tensor, a parameter that starts at zero, one whose gradient is always zero,
one whose gradient is missing every third step), in float64 (normwise
relative error <= 1e-10 per tensor, for w and for the displacement w - w0) and
float32 (<= 1e-4 for w against the float64 reference started from the same
float32 values: measured float32 drift over these 20 steps is at most ~3e-6),
on the eager path, and for a few
representative programs on the compiled path (float32 only, to keep the
suite within minutes).

Also: hypothesis tests of two defining properties of layerwise methods,
run on the reference and on ``lw.Optimizer`` (eager): LAMB's and LARS's
update does not change when the gradient is multiplied by a positive
constant, and each layer's step length is lr * trust ratio * ||u||.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import layerwise as lw
from reference import ADAPTATIONS, REFERENCES, Lamb, Lars
from reference.problem import SHAPES, SOMETIMES, ZERO_GRAD, ZERO_PARAM, make_problem, rel_err

STEPS = 20
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}

# (preset, hypers, groups): groups is a tuple of (parameter names, group overrides)
# for parameters put in their own param_groups entry; the rest share the first group.
NO_DECAY = (("layer1.bias", "scale"), {"weight_decay": 0.0})
CASES = [
    ("lamb", {}, ()),
    ("lamb", {"lr": 1e-2, "beta1": 0.5, "weight_decay": 0.0}, ()),
    ("lamb", {}, (NO_DECAY,)),
    ("lambc", {}, ()),
    ("lambc", {"trust_clip": 0.9, "lr": 1e-2}, ()),
    ("nvlamb", {}, ()),
    ("nvlamb", {}, (NO_DECAY,)),
    ("nvlamb", {"use_nvlamb": 1, "adam_w_mode": 0, "max_grad_norm": 0.5}, (NO_DECAY,)),
    ("nvlamb", {"grad_averaging": 0, "bias_correction": 0, "max_grad_norm": math.inf}, ()),
    ("lars", {}, ()),
    ("lars", {"nesterov": 1, "weight_decay": 5e-4, "lr": 0.5}, ()),
    ("lars", {"momentum": 0.0, "weight_decay": 1e-2}, (NO_DECAY,)),
    ("lars_lamb_paper", {}, ()),
    ("lars_lamb_paper", {"beta1": 0.0, "weight_decay": 0.1, "lr": 1e-2}, ()),
    ("larc", {}, ()),
    ("larc", {"lr": 0.1, "weight_decay": 1e-2}, ()),
    ("larc", {"lr": 0.1, "weight_decay": 1e-2, "nesterov": 1, "dampening": 0.0}, ()),
    ("larc", {"lr": 0.1, "momentum": 0.0}, ()),
    ("timm_lars", {}, ()),
    ("timm_lars", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}, (NO_DECAY,)),
    ("timm_lars", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2, "nesterov": 1,
                   "trust_clip": 1, "always_adapt": 1}, (NO_DECAY,)),
    ("timm_lars", {"lr": 0.5, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-3}, ()),
    ("adam", {}, ()),
    ("adam", {"weight_decay": 0.05, "lr": 3e-3}, ()),
    ("adamw", {}, ()),
    ("adamw", {"weight_decay": 0.1, "beta1": 0.8, "eps": 1e-6}, (NO_DECAY,)),
    ("sgd", {}, ()),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}, ()),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": 1, "weight_decay": 0.01}, ()),
    ("lion", {}, ()),
    ("lion", {"lr": 3e-3, "beta1": 0.8, "weight_decay": 0.1}, (NO_DECAY,)),
    ("adafactor", {}, ()),
    ("adafactor", {"d": 0.5, "decay": 0.6, "eps2": 1e-2}, ()),
    ("lamb_rowwise", {}, ()),
    ("lamb_rowwise", {"lr": 1e-2, "weight_decay": 0.0}, (NO_DECAY,)),
]
# the compiled path: a few representative programs (LAMB; LARS with momentum
# and nesterov; NVLAMB with its global reduction and param groups; SGD with
# where() on t; Adafactor's row and col states and reductions; per-row LAMB)
COMPILED = {"lamb", "lars-nesterov=1-weight_decay=0.0005-lr=0.5",
            "nvlamb-use_nvlamb=1-adam_w_mode=0-max_grad_norm=0.5-groups",
            "sgd-lr=0.05-momentum=0.9-nesterov=1-weight_decay=0.01", "adafactor",
            "lamb_rowwise"}

# Hypers added to a case in float32 only. Adafactor's eps1 = 1e-30 (the paper's,
# and the contract's default) is too small for float32 in the contract's
# formula r * c / sum(r): where a whole tensor's gradient is zero, r and c are
# each about 1e-30 and their product (1e-60) underflows float32 to 0, so the
# update is 0 / 0 (NaN); float64 and the reference are fine. README "Presets"
# says so; for float32 parameters a user sets eps1 >= 1e-15 as here.
FLOAT32_HYPERS = {"adafactor": {"eps1": 1e-15}}


def _case_id(case) -> str:
    name, hypers, groups = case
    parts = [name] + [f"{k}={v}" for k, v in hypers.items()] + (["groups"] if groups else [])
    return "-".join(parts)


def _params():
    out = []
    assert COMPILED <= {_case_id(case) for case in CASES}
    for case in CASES:
        for dtype in (torch.float64, torch.float32):
            out.append(pytest.param(*case, dtype, False,
                                    id=f"{_case_id(case)}-{str(dtype)[6:]}-eager"))
        if _case_id(case) in COMPILED:
            out.append(pytest.param(*case, torch.float32, True,
                                    id=f"{_case_id(case)}-float32-compiled"))
    return out


# --------------------------------------------------------------------------- runners
def run_reference(name, params, grads, groups=(), **hypers):
    """The reference on float64 copies; returns (params after each step, optimizer)."""
    params = {n: np.array(v, dtype=np.float64) for n, v in params.items()}
    overrides = {n: dict(over) for names, over in groups for n in names}
    opt = REFERENCES[name](params, overrides=overrides, **hypers)
    history = []
    for g in grads:
        opt.step(g)
        history.append(copy.deepcopy(params))
    return history, opt


def run_layerwise(name, params, grads, dtype=torch.float64, compile=False, groups=(), **hypers):
    """lw.Optimizer through the torch.optim API; returns (params after each step, optimizer)."""
    tensors = {n: torch.nn.Parameter(torch.tensor(v, dtype=dtype)) for n, v in params.items()}
    grouped = {n for names, _ in groups for n in names}
    if groups:
        param_groups = [{"params": [(n, p) for n, p in tensors.items() if n not in grouped]}]
        param_groups += [{"params": [(n, tensors[n]) for n in names], **over}
                         for names, over in groups]
    else:
        param_groups = list(tensors.items())
    opt = lw.Optimizer(param_groups, name, compile=compile, record=("every", 1), **hypers)
    history = []
    for g in grads:
        for n, p in tensors.items():
            p.grad = None if g[n] is None else torch.tensor(g[n], dtype=dtype)
        opt.step()
        history.append({n: p.detach().to(torch.float64).numpy().copy()
                        for n, p in tensors.items()})
    return history, opt


def as_dtype(params, grads, dtype):
    """The problem rounded to ``dtype`` (and back to float64 for the reference)."""
    np_dtype = {torch.float64: np.float64, torch.float32: np.float32}[dtype]

    def r(x):
        return None if x is None else np.asarray(x).astype(np_dtype).astype(np.float64)
    return ({n: r(v) for n, v in params.items()},
            [{n: r(x) for n, x in g.items()} for g in grads])


# --------------------------------------------------------------------------- the presets
def test_every_preset_has_a_reference():
    """Optimizer presets here; adaptation presets (``trust``) in test_adapt.py."""
    assert set(lw.presets()) == set(REFERENCES) | set(ADAPTATIONS)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_reference_defaults_are_the_preset_defaults(name):
    assert lw.load(name).hypers == dict(REFERENCES[name].defaults)


@pytest.mark.parametrize("name, hypers, groups, dtype, compiled", _params())
def test_preset_matches_reference(name, hypers, groups, dtype, compiled):
    if dtype == torch.float32:
        hypers = {**FLOAT32_HYPERS.get(name, {}), **hypers}
    params, grads = as_dtype(*make_problem(seed=0, steps=STEPS), dtype)
    expected, ref = run_reference(name, params, grads, groups, **hypers)
    actual, opt = run_layerwise(name, params, grads, dtype, compiled, groups, **hypers)
    tol = TOL[dtype]
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        for n in e:
            err = rel_err(a[n], e[n])
            assert err <= tol, f"step {step}, {n}: relative error {err:.3g} > {tol:g}"
            if dtype == torch.float64:
                # also the displacement w_t - w_0, so that an error in a small
                # update is not hidden by the size of w
                err = rel_err(a[n] - params[n], e[n] - params[n])
                assert err <= tol, (f"step {step}, {n}: relative error of w - w0 "
                                    f"{err:.3g} > {tol:g}")
    # watched values: compared for the parameters that had a gradient at every
    # step (what a skipped parameter records is not pinned down here)
    watches = lw.load(name).program.watches
    for key in watches:
        assert key in ref.watched, f"the reference of {name} does not record {key!r}"
        for n in params:
            if n == SOMETIMES:
                continue
            got, want = np.array(opt.watched[key][n]), np.array(ref.watched[key][n])
            assert got.shape == want.shape, f"watched {key}[{n}]: {len(got)} values"
            assert rel_err(got, want) <= tol, f"watched {key}[{n}]"


# --------------------------------------------------------------------------- invariances
# Two properties that define layerwise methods, each on the reference (checking
# the property itself) and on lw.Optimizer, eager, float64.
BACKENDS = ["reference", "layerwise"]
INV_SHAPES = {n: s for n, s in SHAPES.items() if n != SOMETIMES}


def _run(backend, name, params, grads, **hypers):
    if backend == "reference":
        return run_reference(name, params, grads, **hypers)
    return run_layerwise(name, params, grads, **hypers)


def _scaled(grads, c):
    return [{n: None if x is None else c * x for n, x in g.items()} for g in grads]


_seeds = st.integers(min_value=0, max_value=2**32 - 1)
_scales = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(seed=_seeds, c=_scales, steps=st.integers(1, 4))
def test_lamb_update_is_invariant_to_gradient_scale(backend, seed, c, steps):
    """m / sqrt(v) does not change when every gradient is multiplied by c > 0
    (eps = 1e-30 makes eps negligible); so neither do u, the trust ratio or
    the step. Holds with weight decay and for a zero parameter (ratio 1)."""
    params, grads = make_problem(seed, steps, shapes=INV_SHAPES)
    hypers = {"lr": 1e-2, "eps": 1e-30, "weight_decay": 0.01}
    a, _ = _run(backend, "lamb", params, grads, **hypers)
    b, _ = _run(backend, "lamb", params, _scaled(grads, c), **hypers)
    for n in params:
        assert rel_err(b[-1][n], a[-1][n]) <= 1e-9, n


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(seed=_seeds, c=_scales, steps=st.integers(1, 4), nesterov=st.sampled_from([0, 1]))
def test_lars_update_is_invariant_to_gradient_scale(backend, seed, c, steps, nesterov):
    """With weight_decay = 0, lr * eta * ||w|| / ||g|| * g does not change when g
    is scaled by c > 0. (With weight decay it does: the denominator
    ||g|| + wd ||w|| mixes scales. A zero parameter takes the ratio 1 and a raw
    lr * g step, which is not invariant either, so there is none here.)"""
    shapes = {n: s for n, s in INV_SHAPES.items() if n != ZERO_PARAM}
    params, grads = make_problem(seed, steps, shapes=shapes)
    hypers = {"lr": 0.5, "momentum": 0.9, "weight_decay": 0.0, "trust_coefficient": 0.01,
              "nesterov": nesterov}
    a, _ = _run(backend, "lars", params, grads, **hypers)
    b, _ = _run(backend, "lars", params, _scaled(grads, c), **hypers)
    for n in params:
        assert rel_err(b[-1][n], a[-1][n]) <= 1e-9, n


def _norm(x) -> float:
    return float(np.linalg.norm(np.ravel(x)))


@settings(max_examples=20, deadline=None)
@given(seed=_seeds, steps=st.integers(1, 4), wd=st.sampled_from([0.0, 0.01, 0.3]))
def test_lamb_step_length_is_lr_trust_norm_u_reference(seed, steps, wd):
    """||w_new - w_old|| = lr * trust * ||u|| for every layer, and
    trust * ||u|| = phi(||w_old||) = ||w_old|| wherever both norms are non-zero."""
    params, grads = make_problem(seed, steps, shapes=INV_SHAPES)
    lr = 1e-2
    opt = Lamb(copy.deepcopy(params), lr=lr, weight_decay=wd)
    for k, g in enumerate(grads):
        before = copy.deepcopy(opt.params)
        opt.step(g)
        for n in params:
            tr, u = opt.watched["tr"][n][k], opt.last_direction[n]
            step = _norm(opt.params[n] - before[n])
            assert step == pytest.approx(lr * tr * _norm(u), rel=1e-12, abs=1e-300)
            if _norm(before[n]) > 0 and _norm(u) > 0:
                assert step == pytest.approx(lr * _norm(before[n]), rel=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=_seeds, steps=st.integers(1, 4), wd=st.sampled_from([0.0, 0.01, 0.3]))
def test_lamb_step_length_is_lr_norm_w_layerwise(seed, steps, wd):
    """lw.Optimizer("lamb"): every layer with a non-zero weight and a non-zero
    update moves by exactly lr * ||w_old|| (trust * ||u|| = ||w_old||); a zero
    layer moves by lr * ||u||, which the preset comparison covers."""
    params, grads = make_problem(seed, steps, shapes=INV_SHAPES)
    lr = 1e-2
    history, _ = run_layerwise("lamb", params, grads, lr=lr, weight_decay=wd)
    before = params
    for after in history:
        for n in params:
            nonzero_update = n != ZERO_GRAD or wd > 0      # else u = m / sqrt(v) = 0
            if _norm(before[n]) > 0 and nonzero_update:
                assert _norm(after[n] - before[n]) == pytest.approx(lr * _norm(before[n]),
                                                                    rel=1e-10)
        before = after


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(seed=_seeds, steps=st.integers(1, 4), wd=st.sampled_from([0.0, 0.01, 0.3]))
def test_lars_step_length_is_lr_trust_norm_u(backend, seed, steps, wd):
    """LARS without momentum: ||w_new - w_old|| = lr * tr * ||g + wd * w_old||,
    with tr the watched local LR; and tr = eta ||w|| / (||g|| + wd ||w||), or 1
    where a norm is zero."""
    params, grads = make_problem(seed, steps, shapes=INV_SHAPES)
    lr, eta = 0.5, 0.01
    history, opt = _run(backend, "lars", params, grads, lr=lr, momentum=0.0, weight_decay=wd,
                        trust_coefficient=eta)
    before = params
    for k, after in enumerate(history):
        for n in params:
            g, w = grads[k][n], before[n]
            tr = opt.watched["tr"][n][k]
            expected_tr = (eta * _norm(w) / (_norm(g) + wd * _norm(w))
                           if _norm(w) > 0 and _norm(g) > 0 else 1.0)
            assert tr == pytest.approx(expected_tr, rel=1e-12)
            assert _norm(after[n] - w) == pytest.approx(lr * tr * _norm(g + wd * w),
                                                        rel=1e-10, abs=1e-300)
        before = after
