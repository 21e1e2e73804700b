"""The variants of examples/variants/ and the presets' design-choice defs (issue 12).

Each example is at most three declarations on top of a shipped preset
(counted with the project's parser) and computes what its independent NumPy
reference (tests/reference/variants.py, written from the cited paper or
source file) computes: 10 steps on parameters of mixed shapes (a 0-d and a
1-element tensor, a conv weight, a parameter that starts at zero, one whose
gradient is always zero, one whose gradient is missing every third step),
float64 to 1e-12 relative (w and the displacement w - w0) and float32 to
5e-5 (w, against the float64 reference from the same float32 start;
measured at most ~7e-6), on the eager path, and one variant compiled.

The comparisons are made to fail on a wrong program: each variant is checked
to differ from its parent preset by far more than the tolerance, and the
problem to reach each variant's special case (DeepSpeed's clamp at both
bounds, both branches of RAdam's rectification, an active gradient clip).

The restructuring itself is checked too: with the defs inlined, the lamb,
lambc and lars presets are exactly the programs they replace (lamb is the
LAMB of LANGUAGE.md section 1), lamb's w equals the reference LAMB's to 1e-15, and
every design-choice def of lamb is used by its step.
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import layerwise as lw
from layerwise.syntax import DefDecl, OptimizerDecl, StepDecl, parse_text
from reference import VARIANTS, Lamb, NvLamb
from reference.problem import SHAPES, SOMETIMES, make_problem, rel_err
from reference.variants import DeepSpeedLamb, radam_rho
from test_presets import run_layerwise

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "variants"
PROGRAMS = Path(__file__).resolve().parent / "programs"
STEPS = 10
VARIANT_SHAPES = {**SHAPES, "one": (1,)}
TOL = {torch.float64: 1e-12, torch.float32: 5e-5}

# (example, hypers): the example's defaults, and a second set of hypers
CASES = [
    ("lamb_no_bias_correction", {}),
    ("lamb_no_bias_correction", {"lr": 1e-2, "beta1": 0.5, "weight_decay": 0.0}),
    ("lamb_keras", {}),
    ("lamb_keras", {"lr": 1e-2, "weight_decay": 0.1}),
    ("lamb_deepspeed", {}),
    ("lamb_deepspeed", {"eps": 1e-8, "weight_decay": 0.0}),    # FusedLamb's own defaults
    ("lamb_radam", {}),
    ("lamb_radam", {"beta2": 0.99, "weight_decay": 0.0}),
    ("lars_clipped", {}),
    ("lars_clipped", {"max_grad_norm": 5.0, "nesterov": 1, "weight_decay": 5e-4, "lr": 0.5}),
]
# the compiled path for one variant (RAdam: a where() whose unused branch is
# NaN at steps 3 and 4: the square root of a negative number)
COMPILED = "lamb_radam"


def _case_id(name, hypers):
    return "-".join([name] + [f"{k}={v}" for k, v in hypers.items()])


def _params():
    out = []
    for name, hypers in CASES:
        for dtype in (torch.float64, torch.float32):
            out.append(pytest.param(name, hypers, dtype, False,
                                    id=f"{_case_id(name, hypers)}-{str(dtype)[6:]}-eager"))
        if name == COMPILED and not hypers:
            out.append(pytest.param(name, hypers, torch.float32, True,
                                    id=f"{_case_id(name, hypers)}-float32-compiled"))
    return out


def _spec(name):
    return lw.load(EXAMPLES / f"{name}.lw")


# --------------------------------------------------------------------------- runners
def problem(dtype=torch.float64, seed=0):
    """make_problem's parameters and gradients, rounded to ``dtype`` (as float64)."""
    params, grads = make_problem(seed=seed, steps=STEPS, shapes=VARIANT_SHAPES)
    np_dtype = {torch.float64: np.float64, torch.float32: np.float32}[dtype]

    def r(x):
        return None if x is None else np.asarray(x).astype(np_dtype).astype(np.float64)
    return {n: r(v) for n, v in params.items()}, [{n: r(x) for n, x in g.items()} for g in grads]


def run_reference(cls, params, grads, **hypers):
    """A reference class on float64 copies: (params after each step, optimizer)."""
    params = {n: np.array(v, dtype=np.float64) for n, v in params.items()}
    opt = cls(params, **hypers)
    history = []
    for g in grads:
        opt.step(g)
        history.append(copy.deepcopy(params))
    return history, opt


def assert_close(actual, expected, start, tol, displacement=True):
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        for n in e:
            err = rel_err(a[n], e[n])
            assert err <= tol, f"step {step}, {n}: relative error {err:.3g} > {tol:g}"
            if displacement:
                err = rel_err(a[n] - start[n], e[n] - start[n])
                assert err <= tol, (f"step {step}, {n}: relative error of w - w0 "
                                    f"{err:.3g} > {tol:g}")


# --------------------------------------------------------------------------- the files
def test_every_variant_has_a_reference():
    assert {p.stem for p in EXAMPLES.glob("*.lw")} == set(VARIANTS)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_is_at_most_three_declarations_on_a_preset(name):
    """Counted with the parser: after the first line, at most three declarations
    (hyper, state, def, for, watch, adapt or step: each counts one), none of
    them a restated step; the parent is a shipped preset."""
    path = EXAMPLES / f"{name}.lw"
    decls = parse_text(path.read_text(encoding="utf-8"), str(path)).decls
    head, rest = decls[0], decls[1:]
    assert isinstance(head, OptimizerDecl) and head.name == name
    assert head.parent in lw.presets() and head.parent in ("lamb", "lars")
    assert 1 <= len(rest) <= 3, f"{name}: {len(rest)} declarations after the first line"
    assert not any(isinstance(d, StepDecl) for d in rest), f"{name} restates the step"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_reference_defaults_are_the_variant_defaults(name):
    assert _spec(name).hypers == dict(VARIANTS[name].defaults)


# --------------------------------------------------------------------------- against the references
@pytest.mark.parametrize("name, hypers, dtype, compiled", _params())
def test_variant_matches_reference(name, hypers, dtype, compiled):
    params, grads = problem(dtype)
    expected, ref = run_reference(VARIANTS[name], params, grads, **hypers)
    actual, opt = run_layerwise(_spec(name), params, grads, dtype, compiled, **hypers)
    assert_close(actual, expected, params, TOL[dtype], displacement=dtype == torch.float64)
    for key in _spec(name).program.watches:      # lars_clipped: the local LR tr
        for n in params:
            if n == SOMETIMES:
                continue
            got, want = np.array(opt.watched[key][n]), np.array(ref.watched[key][n])
            assert got.shape == want.shape == (STEPS,), f"watched {key}[{n}]"
            assert rel_err(got, want) <= TOL[dtype], f"watched {key}[{n}]"


@pytest.mark.parametrize("name, hypers", CASES, ids=[_case_id(*c) for c in CASES])
def test_variant_differs_from_its_parent(name, hypers):
    """So that agreeing with the reference to 1e-12 says something: the variant
    moves the parameters differently from the preset it extends."""
    parent = parse_text((EXAMPLES / f"{name}.lw").read_text(encoding="utf-8")).decls[0].parent
    params, grads = problem()
    parent_hypers = {k: v for k, v in hypers.items() if k in lw.load(parent).hypers}
    a, _ = run_layerwise(_spec(name), params, grads, **hypers)
    b, _ = run_layerwise(parent, params, grads, **parent_hypers)
    assert max(rel_err(a[-1][n] - params[n], b[-1][n] - params[n]) for n in params) > 1e-3


@pytest.mark.parametrize("name, hypers", CASES, ids=[_case_id(*c) for c in CASES])
def test_problem_reaches_the_special_case(name, hypers):
    """On the reference alone: the test problem exercises what each variant changes."""
    params, grads = problem()
    h = {**VARIANTS[name].defaults, **hypers}
    if name == "lamb_radam":
        rho = [radam_rho(h["beta2"], t)[1] for t in range(1, STEPS + 1)]
        assert min(rho) <= 4 < max(rho)            # both branches of Algorithm 2
    elif name == "lars_clipped":
        norms = [math.sqrt(sum(float(np.sum(x * x)) for x in g.values() if x is not None))
                 for g in grads]
        assert min(norms) > h["max_grad_norm"]     # the clip is active at every step
    elif name == "lamb_deepspeed" and not hypers:
        # each bound of the clamp changes the result (zero_grad's ratio is
        # 1 / weight_decay = 100 > 10; zero_param's falls below 0.01)
        clamped, _ = run_reference(DeepSpeedLamb, params, grads)
        for bound in ({"max_coeff": math.inf}, {"min_coeff": 0.0}):
            free, _ = run_reference(type("Free", (DeepSpeedLamb,), bound), params, grads)
            assert max(rel_err(free[-1][n], clamped[-1][n]) for n in params) > 1e-3, bound


def test_no_bias_correction_is_apex_fused_lamb_without_it():
    """A second, independent reference: apex FusedLAMB (the NvLamb reference)
    with bias_correction=False, no gradient pre-normalization and a non-zero
    weight decay is LAMB without bias correction."""
    params, grads = problem()
    expected, _ = run_reference(NvLamb, params, grads, bias_correction=0,
                                max_grad_norm=math.inf, weight_decay=0.01)
    actual, _ = run_layerwise(_spec("lamb_no_bias_correction"), params, grads)
    assert_close(actual, expected, params, TOL[torch.float64])


def test_radam_rectification_starts_at_the_papers_threshold():
    """rho_t > 4 (the paper), not > 5 (torch.optim.RAdam) or >= 5 (the authors'
    code): with beta2 = 0.999, rho_5 = 4.996 is rectified; a program with the
    threshold 5 differs at step 5."""
    assert 4 < radam_rho(0.999, 5)[1] < 5
    params, grads = problem()
    actual, _ = run_layerwise(_spec("lamb_radam"), params, grads)
    five = _spec("lamb_radam").override(
        "def precondition(m, v) = where(rho() > 5, sqrt((rho() - 4) * (rho() - 2) * rho_inf()"
        " / ((rho_inf() - 4) * (rho_inf() - 2) * rho())) * m / (sqrt(v) + eps), m)")
    other, _ = run_layerwise(five, params, grads)
    assert max(rel_err(other[4][n], actual[4][n]) for n in params) > 1e-6


# --------------------------------------------------------------------------- the restructured presets
# The lars and lambc presets before the restructuring (issue 12), their steps
# written out; the lamb one is the LAMB of LANGUAGE.md section 1 (tests/programs/lamb.lw).
LARS_BEFORE = """optimizer lars
hyper lr                = 1.0    in [0, inf)
hyper momentum          = 0.9    in [0, 1)
hyper weight_decay      = 0      in [0, inf)
hyper trust_coefficient = 0.001  in (0, inf)
hyper nesterov          = 0      in [0, 1]
state buf = 0
def local_lr(w, g) = where(norm(w) > 0 and norm(g) > 0,
                           trust_coefficient * norm(w) / (norm(g) + weight_decay * norm(w)),
                           1)
watch tr
step {
  tr = local_lr(w, g)
  d = lr * tr * (g + weight_decay * w)
  buf = momentum * buf + d
  w = w - where(nesterov > 0, momentum * buf + d, buf)
}
"""
LAMBC_BEFORE = """optimizer lambc extends lamb
hyper trust_clip = 1.0 in (0, inf]
def trust(w, u) = min(ratio(phi(norm(w)), norm(u)), trust_clip)
watch tr
step {
  m = beta1 * m + (1 - beta1) * g
  v = beta2 * v + (1 - beta2) * g^2
  r = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
  u = r + weight_decay * w
  tr = trust(w, u)
  w = w - lr * tr * u
}
"""


def test_restructured_presets_are_the_programs_they_replace():
    assert lw.load("lamb").program == lw.load(PROGRAMS / "lamb.lw").program
    assert lw.load("lars").program == lw.parse(LARS_BEFORE, "lars_before.lw").program
    lambc = lw.parse(LAMBC_BEFORE, str(ROOT / "presets" / "lambc_before.lw")).program
    assert lw.load("lambc").program == lambc


def test_lamb_preset_equals_the_reference_lamb():
    """w to 1e-15 relative (measured <= 2.2e-16: a rounding or two), and the
    displacement w - w0, about 1e-3 of w, to 1e-12 (measured <= 4e-14)."""
    params, grads = problem()
    expected, _ = run_reference(Lamb, params, grads)
    actual, _ = run_layerwise("lamb", params, grads)
    assert_close(actual, expected, params, 1e-15, displacement=False)
    assert_close(actual, expected, params, 1e-12)


# each design choice of LAMB (issue 12) and an override of it that changes the step
DESIGN_CHOICES = {
    "debias": "def debias(x, beta) = x",                               # bias correction
    "precondition": "def precondition(m, v) = m / sqrt(v + eps)",      # eps placement
    "decay_term": "def decay_term(w) = 0",                             # weight decay inside
    "predecay": "def predecay(w) = w - lr * weight_decay * w",         # ... or outside
    "phi": "def phi(z) = min(z, 10)",                                  # scaling function
    "ratio": "def ratio(a, b) = where(b > 0, a / b, 0)",               # zero-norm rule
    "trust": "def trust(w, u) = 1",                                    # the trust ratio
    "clip_ratio": "def clip_ratio(x) = clip(x, 0.01, 10)",             # clipping of it
    "step_size": "def step_size() = lr * sqrt(1 - beta2^t)",           # step-size correction
}


def test_each_design_choice_is_a_def_of_lamb_used_by_its_step():
    lamb = lw.load("lamb")
    text = (ROOT / "presets" / "lamb.lw").read_text(encoding="utf-8")
    defs = {d.name for d in parse_text(text).decls if isinstance(d, DefDecl)}
    assert set(DESIGN_CHOICES) <= defs
    for name, override in DESIGN_CHOICES.items():
        assert lamb.override(override).program.step != lamb.program.step, name
    lars = lw.load("lars")
    assert lars.override("def clip_grad(g) = 2 * g").program.step != lars.program.step


def test_readme_shows_the_lamb_preset_as_shipped():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"exactly as shipped in\s+`presets/lamb\.lw`.*?```\n(.*?)```", readme,
                      re.S).group(1)
    assert block == (ROOT / "presets" / "lamb.lw").read_text(encoding="utf-8")
