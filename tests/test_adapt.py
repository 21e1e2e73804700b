"""Adaptations (LANGUAGE.md section 12): ``adapt NAME`` in programs and ``lw.adapt`` in Python.

Checked against the NumPy references (``reference.ADAPTATIONS``: the trust
ratio applied to a base reference) and against the ``lamb`` preset, which
is AdamW's update adapted by the trust ratio: ``lamb_from_parts`` (the
contract's program) to 1e-12 in float64, ``lw.adapt(torch.optim.AdamW,
"trust")`` to 1e-6 in float32 and 1e-10 in float64, over 10 steps.
"""
from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
import torch

import layerwise as lw
from layerwise.cli import main
from reference import ADAPTATIONS, AdamW, Lion
from reference.problem import make_problem, rel_err

PROGRAMS = pathlib.Path(__file__).parent / "programs"
STEPS = 10
LAMB = {"lr": 0.01, "weight_decay": 0.01, "eps": 1e-6}


def named(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)))
            for n, s in (("a", (5, 7)), ("b", (7,)), ("c", (3, 4, 2)), ("z", ()))]


def train(params, opt, steps=STEPS, start=0, dtype=None):
    for k in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + k)
        for _, p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def worst(a, b) -> float:
    return max(rel_err(x.detach().double().numpy(), y.detach().double().numpy())
               for (_, x), (_, y) in zip(a, b))


def test_lamb_from_parts_equals_lamb():
    """The contract's ``optimizer lamb_from_parts extends adamw / hyper eps = 1e-6
    / adapt trust``: AdamW's update is w - lr * (weight_decay * w + r), so u is
    that direction exactly and the trust ratio makes it LAMB (Algorithm 2)."""
    runs = []
    for spec in ("lamb", PROGRAMS / "lamb_from_parts.lw"):
        params = named(torch.float64)
        train(params, lw.Optimizer(params, lw.load(spec), compile=False, lr=0.01))
        runs.append(params)
    assert worst(*runs) <= 1e-12


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-10)])
def test_adapting_torch_adamw_gives_lamb(dtype, tol):
    lamb, adapted = named(dtype), named(dtype)
    train(lamb, lw.Optimizer(lamb, "lamb", compile=False, **LAMB))
    opt = lw.adapt(torch.optim.AdamW([p for _, p in adapted], lr=0.01, eps=1e-6,
                                     weight_decay=0.01), "trust", compile=False,
                   record=("every", 1))
    assert isinstance(opt, torch.optim.Optimizer)
    train(adapted, opt)
    assert worst(lamb, adapted) <= tol
    assert len(opt.watched["tr"]["param0"]) == STEPS


def test_adapted_torch_optimizer_compiled_matches_eager():
    runs = []
    for compile in (False, True):
        params = named(torch.float32)
        train(params, lw.adapt(torch.optim.AdamW([p for _, p in params], lr=0.01),
                               "trust", compile=compile))
        runs.append(params)
    assert worst(*runs) <= 1e-5


@pytest.mark.parametrize("base, reference", [("adamw", AdamW), ("lion", Lion)])
def test_adapted_presets_match_the_numpy_reference(base, reference):
    """``optimizer X extends BASE / adapt trust`` against the reference of BASE
    adapted by the trust ratio, on the shared problem (a zero parameter, a
    zero gradient, a gradient missing every third step), float64."""
    params, grads = make_problem(seed=0, steps=STEPS)
    ref_params = {n: np.array(v) for n, v in params.items()}
    ref = ADAPTATIONS["trust"](reference)(ref_params, lr=0.01)
    tensors = {n: torch.nn.Parameter(torch.tensor(v)) for n, v in params.items()}
    spec = lw.parse(f"optimizer {base}_trust extends {base}\nadapt trust\n")
    opt = lw.Optimizer(list(tensors.items()), spec, compile=False, lr=0.01,
                       record=("every", 1))
    for g in grads:
        ref.step(g)
        for n, p in tensors.items():
            p.grad = None if g[n] is None else torch.tensor(g[n])
        opt.step()
    for n, p in tensors.items():
        assert rel_err(p.detach().numpy(), ref_params[n]) <= 1e-12, n
        np.testing.assert_allclose(opt.watched["tr"][n], ref.watched["tr"][n], rtol=1e-12)


def test_adapting_a_layerwise_optimizer_composes_the_programs():
    """lw.adapt(lw.Optimizer(..., "lion"), "trust") is the program ``lion`` with
    ``adapt trust`` (the update taken symbolically)."""
    a, b = named(torch.float64), named(torch.float64)
    train(a, lw.adapt(lw.Optimizer(a, "lion", compile=False, lr=0.01), "trust"))
    spec = lw.parse("optimizer lion_trust extends lion\nadapt trust\n")
    train(b, lw.Optimizer(b, spec, compile=False, lr=0.01))
    assert worst(a, b) == 0


def test_state_dict_round_trips_bit_for_bit_and_schedulers_act_on_the_base():
    def make(params):
        opt = lw.adapt(torch.optim.AdamW([p for _, p in params], lr=0.01), "trust",
                       compile=False)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)

    straight = named(torch.float32)
    opt, sched = make(straight)
    for k in range(10):
        train(straight, opt, 1, k)
        sched.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 3)
    first = named(torch.float32)
    opt, sched = make(first)
    for k in range(5):
        train(first, opt, 1, k)
        sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in first]
    opt2, sched2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    for k in range(5, 10):
        train(resumed, opt2, 1, k)
        sched2.step()
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(straight, resumed))


ADAPT_SCALED = """adaptation scaled
hyper k = 1 in (0, inf)
step {
  w = w - k * lr * u
}
"""


def test_a_base_not_linear_in_lr_takes_the_difference_and_check_says_so(tmp_path, capsys):
    """LARS's momentum buffer carries earlier learning rates: u is the difference
    (w - w_base) / lr, and ``layerwise check`` prints a note. With k = 1 the
    scaled adaptation gives LARS back (to the rounding of the difference)."""
    (tmp_path / "scaled.lw").write_text(ADAPT_SCALED)
    program = tmp_path / "lars_scaled.lw"
    program.write_text('optimizer lars_scaled extends lars\nadapt "scaled.lw"\n')
    assert main(["check", str(program)]) == 0
    out = capsys.readouterr().out
    assert f"{program}:2:1: note: 'lars_scaled' does not update w as w - lr * E" in out
    a, b = named(torch.float64), named(torch.float64)
    train(a, lw.Optimizer(a, "lars", compile=False, lr=0.5))
    train(b, lw.Optimizer(b, lw.load(program), compile=False, lr=0.5))
    assert worst(a, b) <= 1e-10
    # the same through lw.adapt of a torch optimizer declared not linear
    c, d = named(torch.float64), named(torch.float64)
    train(c, torch.optim.SGD([p for _, p in c], lr=0.1, momentum=0.9))
    train(d, lw.adapt(torch.optim.SGD([p for _, p in d], lr=0.1, momentum=0.9),
                      lw.load(tmp_path / "scaled.lw"), linear=False, compile=False))
    assert worst(c, d) <= 1e-10


def test_bad_adaptations_are_refused():
    params = named(torch.float32)
    with pytest.raises(ValueError, match="'trust' is an adaptation, not an optimizer"):
        lw.Optimizer(params, "trust")
    with pytest.raises(lw.SpecError, match="'lamb' is an optimizer, not an adaptation"):
        lw.parse("optimizer x extends adamw\nadapt lamb\n")
    with pytest.raises(lw.SpecError, match="'lr' is predefined in an adaptation"):
        lw.parse("adaptation a\nhyper lr = 1\nstep {\n  w = w - lr * u\n}\n")
    with pytest.raises(lw.SpecError, match="'u' is read-only in an adaptation"):
        lw.parse("adaptation a\nstep {\n  u = 2 * u\n  w = w - lr * u\n}\n")
    with pytest.raises(lw.SpecError, match="an adaptation cannot adapt another"):
        lw.parse("adaptation a extends trust\nadapt trust\n")
    with pytest.raises(ValueError, match="adapt an lw.Optimizer before its first step"):
        opt = lw.Optimizer(params, "lion", compile=False)
        train(params, opt, 1)
        lw.adapt(opt, "trust")
    with pytest.raises(ValueError, match="'lamb' is an optimizer, not an adaptation"):
        lw.adapt(torch.optim.SGD([p for _, p in params], lr=0.1), "lamb")


def test_an_adaptation_on_a_base_that_watches_the_same_name():
    """lars and trust both watch 'tr' (section 12 names lars as a base): the
    adaptation's local becomes 'adapt_tr', both series are recorded, lars's is
    the plain lars trust ratio, and the step is trust applied to lars's
    update, u = (w - w_lars) / lr."""
    spec = lw.parse("optimizer lars_trust extends lars\nadapt trust\n")
    assert spec.program.watches == ("tr", "adapt_tr")
    assert any("difference of two weights" in n.message for n in spec.program.notes)
    params, plain = named(torch.float64), named(torch.float64)
    opt = lw.Optimizer(params, spec, compile=False, lr=0.5)
    lars = lw.Optimizer(plain, "lars", compile=False, lr=0.5)
    gen = torch.Generator().manual_seed(3)
    for (_, p), (_, q) in zip(params, plain):
        q.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.grad = q.grad.clone()
    before = {n: p.detach().clone() for n, p in params}
    opt.step()
    lars.step()
    for (n, p), (_, q) in zip(params, plain):
        assert opt.watched["tr"][n] == pytest.approx(lars.watched["tr"][n], rel=1e-12)
        u = (before[n] - q.detach()) / 0.5
        wn, un = before[n].norm().item(), u.norm().item()
        tr = wn / un if wn > 0 and un > 0 else 1.0
        assert opt.watched["adapt_tr"][n][0] == pytest.approx(tr, rel=1e-10)
        torch.testing.assert_close(p.detach(), before[n] - 0.5 * tr * u, rtol=1e-10, atol=1e-12)
