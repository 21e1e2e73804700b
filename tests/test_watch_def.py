"""``watch NAME`` of a ``def`` (issue 13, point 1): trust ratios observable
for every preset that has one, through the public API.

``watch trust`` where ``trust`` is a def records the value of its call in the
step, when the step (after inlining defs) calls it exactly once and the value
is one number per parameter; the checked step computes that call into a local
named after the def just before the statement that holds it, so the updates
are the same bit for bit. From Python: ``spec.override("watch trust")`` or
``spec.watching("trust")``. Compared here with the NumPy references
(tests/reference/) that record the trust ratio as ``tr``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import layerwise as lw
from layerwise.errors import SpecError
from reference import Lamb
from reference.problem import SOMETIMES, make_problem, rel_err
from test_presets import run_reference

STEPS = 12
TOL = 1e-10


def run(spec, params, grads, dtype=torch.float64, **hypers):
    """``lw.Optimizer`` (eager) on the problem; returns (final tensors, optimizer)."""
    tensors = {n: torch.nn.Parameter(torch.tensor(v, dtype=dtype)) for n, v in params.items()}
    opt = lw.Optimizer(list(tensors.items()), spec, compile=False, record=("history", 10 * STEPS),
                       **hypers)
    for g in grads:
        for n, p in tensors.items():
            p.grad = None if g[n] is None else torch.tensor(g[n], dtype=dtype)
        opt.step()
    return tensors, opt


def series(opt, key, name) -> np.ndarray:
    return np.array([float(x) for x in opt.watched[key][name]], dtype=np.float64)


def problem():
    return make_problem(seed=0, steps=STEPS)


def compare(opt, key, ref_values, params, tol=TOL):
    """``opt.watched[key]`` against per-parameter reference series (the
    parameter whose gradient is sometimes missing is skipped, as in
    test_presets)."""
    for n in params:
        if n == SOMETIMES:
            continue
        got, want = series(opt, key, n), np.asarray(ref_values[n], dtype=np.float64)
        assert got.shape == want.shape, f"watched {key}[{n}]: {len(got)} values"
        assert rel_err(got, want) <= tol, f"watched {key}[{n}]"


# --------------------------------------------------------------------------- lamb
@pytest.mark.parametrize("how", ["override", "watching"])
def test_lamb_trust_is_watched_and_equals_the_reference(how):
    base = lw.load("lamb")
    spec = base.override("watch trust") if how == "override" else base.watching("trust")
    assert spec.program.watches == ("trust",)
    params, grads = problem()
    _, ref = run_reference("lamb", params, grads)
    _, opt = run(spec, params, grads)
    assert set(opt.watched) == {"trust"}
    compare(opt, "trust", ref.watched["tr"], params)


def test_lamb_watch_trust_is_a_local_before_the_update():
    """The checked step: the call is computed into a local ``trust`` just
    before the statement that holds it; the flat text checks to the same
    program."""
    spec = lw.load("lamb").watching("trust")
    step = spec.program.step
    assert [a.target for a in step] == ["m", "v", "r", "u", "trust", "w"]
    assert "trust" in {getattr(n, "id", None) for n in _walk(step[-1].value)}
    again = lw.parse(spec.to_text())
    assert again.program.watches == ("trust",)
    assert again.program.step == spec.program.step


def _walk(e):
    from layerwise.syntax import children
    yield e
    for c in children(e):
        yield from _walk(c)


@pytest.mark.parametrize("name, watch", [("lamb", "trust"), ("lamb", "phi"),
                                         ("lambc", "trust"), ("lambc", "clip_ratio"),
                                         ("nvlamb", "ratio"), ("lars", "local_lr")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_watching_a_def_leaves_the_updates_bit_identical(name, watch, dtype):
    params, grads = problem()
    plain, _ = run(lw.load(name), params, grads, dtype)
    watched, opt = run(lw.load(name).watching(watch), params, grads, dtype)
    for n in plain:
        assert torch.equal(plain[n], watched[n]), n
    assert len(series(opt, watch, "layer1.weight")) == STEPS


# --------------------------------------------------------------------------- the lamb family
def test_lambc_trust_and_its_clipped_value():
    """lambc watches ``tr`` (the clipped ratio); ``trust`` is the ratio before
    clipping and ``clip_ratio`` the clipped one."""
    params, grads = problem()
    _, ref = run_reference("lambc", params, grads)
    _, opt = run(lw.load("lambc").watching("trust", "clip_ratio"), params, grads)
    assert set(opt.watched) == {"tr", "trust", "clip_ratio"}
    compare(opt, "clip_ratio", ref.watched["tr"], params)
    compare(opt, "tr", ref.watched["tr"], params)
    clipped = {n: np.minimum(series(opt, "trust", n), 1.0) for n in params if n != SOMETIMES}
    compare(opt, "tr", clipped, params, tol=0.0)
    # the unclipped ratio is the LAMB ratio of lambc's own iterates
    assert any((series(opt, "trust", n) > 1).any() for n in clipped)


def test_nvlamb_ratio_is_its_trust_ratio():
    """nvlamb watches ``tr``; with weight decay its trust ratio is ``ratio``."""
    params, grads = problem()
    _, ref = run_reference("nvlamb", params, grads)
    _, opt = run(lw.load("nvlamb").watching("ratio"), params, grads)
    compare(opt, "ratio", ref.watched["tr"], params)
    compare(opt, "tr", ref.watched["tr"], params)


def test_lars_local_lr_is_its_trust_ratio():
    params, grads = problem()
    _, ref = run_reference("lars", params, grads, weight_decay=1e-2)
    _, opt = run(lw.load("lars").watching("local_lr"), params, grads, weight_decay=1e-2)
    compare(opt, "tr", ref.watched["tr"], params)
    compare(opt, "local_lr", ref.watched["tr"], params)


def test_lamb_rowwise_trust_is_refused():
    """A per-row trust ratio is not one number per parameter."""
    with pytest.raises(SpecError) as info:
        lw.load("lamb_rowwise").watching("trust")
    message = str(info.value)
    assert "cannot watch def 'trust'" in message
    assert "row-kind (one per row), not one number per parameter" in message


# --------------------------------------------------------------------------- extends
class CappedLamb(Lamb):
    """LAMB with the trust ratio capped at ``cap``."""
    defaults = {**Lamb.defaults, "cap": 1.2}

    def trust_ratio(self, w_norm, u_norm, h):
        return min(super().trust_ratio(w_norm, u_norm, h), h["cap"])


CAPPED = """optimizer lamb_capped extends lamb
hyper cap = 1.2 in (0, inf)
def trust(w, u) = min(ratio(phi(norm(w)), norm(u)), cap)
watch trust
"""


def test_a_child_that_replaces_the_watched_def():
    params, grads = problem()
    ref = CappedLamb({n: np.array(v, dtype=np.float64) for n, v in params.items()})
    for g in grads:
        ref.step(g)
    final, opt = run(lw.parse(CAPPED, "lamb_capped.lw"), params, grads)
    compare(opt, "trust", ref.watched["tr"], params)
    for n, p in final.items():
        assert rel_err(p.detach().numpy(), ref.params[n]) <= TOL, n
    assert any((series(opt, "trust", n) == 1.2).any() for n in params)


def test_a_parent_watch_of_a_def_follows_a_replaced_def():
    """``watch trust`` inherited from a parent names the child's ``trust``."""
    child = lw.parse(CAPPED, "lamb_capped.lw").override("def trust(w, u) = ratio(norm(w), norm(u))")
    params, grads = problem()
    _, ref = run_reference("lamb", params, grads)
    _, opt = run(child, params, grads, cap=1.2)
    compare(opt, "trust", ref.watched["tr"], params)


# --------------------------------------------------------------------------- adaptations
TRUST_WATCHED = "adaptation trust_watched extends trust\nwatch ratio\n"


def test_an_adaptation_that_watches_a_def(tmp_path):
    """``adapt`` of an adaptation that watches its def ``ratio``: the same as
    its ``tr``, and as LAMB's trust ratio (adamw + trust is lamb)."""
    (tmp_path / "trust_watched.lw").write_text(TRUST_WATCHED)
    (tmp_path / "lamb_from_parts.lw").write_text(
        "optimizer lamb_from_parts extends adamw\nhyper eps = 1e-6 in (0, inf)\n"
        "adapt ./trust_watched.lw\n")
    spec = lw.load(tmp_path / "lamb_from_parts.lw")
    assert set(spec.program.watches) == {"tr", "ratio"}
    params, grads = problem()
    _, ref = run_reference("lamb", params, grads)
    _, opt = run(spec, params, grads)
    compare(opt, "ratio", ref.watched["tr"], params, tol=1e-9)
    compare(opt, "tr", {n: series(opt, "ratio", n) for n in params}, params, tol=0.0)


def test_base_and_adaptation_both_watch_a_def_of_the_same_name(tmp_path):
    """The base's watched def call and the adaptation's are both kept, the
    adaptation's renamed ``adapt_ratio`` (as for watched locals)."""
    (tmp_path / "trust_watched.lw").write_text(TRUST_WATCHED)
    (tmp_path / "both.lw").write_text("optimizer both extends lamb\nwatch ratio\n"
                                      "adapt ./trust_watched.lw\n")
    spec = lw.load(tmp_path / "both.lw")
    assert set(spec.program.watches) == {"ratio", "tr", "adapt_ratio"}
    params, grads = problem()
    _, ref = run_reference("lamb", params, grads)
    _, opt = run(spec, params, grads)
    compare(opt, "ratio", ref.watched["tr"], params)
    for n in params:
        assert np.isfinite(series(opt, "adapt_ratio", n)).all()


def test_lw_adapt_with_a_spec_that_watches_a_def():
    params, grads = problem()
    tensors = {n: torch.nn.Parameter(torch.tensor(v)) for n, v in params.items()}
    base = torch.optim.AdamW(list(tensors.values()), lr=1e-3, eps=1e-6, weight_decay=0.01)
    opt = lw.adapt(base, lw.load("trust").watching("ratio"), compile=False,
                   record=("history", 10 * STEPS))
    for g in grads:
        for n, p in tensors.items():
            p.grad = None if g[n] is None else torch.tensor(g[n])
        opt.step()
    assert set(opt.watched) == {"tr", "ratio"}
    for n, values in opt.watched["ratio"].items():
        assert [float(x) for x in values] == [float(x) for x in opt.watched["tr"][n]]


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("names, phrase", [
    (("nope",), "cannot watch unknown name 'nope'"),
    (("debias",), "'debias' is called 2 times in the step"),
    (("precondition",), "cannot watch def 'precondition'"),
    (("step_size",), None),          # const: allowed (one number)
])
def test_watching_errors(names, phrase):
    spec = lw.load("lamb")
    if phrase is None:
        assert spec.watching(*names).program.watches == names
        return
    with pytest.raises(SpecError) as info:
        spec.watching(*names)
    assert phrase in str(info.value)
    assert info.value.problems[0].span.line == 1


def test_watching_needs_names():
    with pytest.raises(ValueError):
        lw.load("lamb").watching()
    with pytest.raises(ValueError):
        lw.load("lamb").watching("a b")


def test_watch_argument_of_the_optimizer_and_of_adapt():
    """lw.Optimizer(..., watch=["trust"]) is spec.watching("trust"); lw.adapt
    passes watch= to the adaptation; a name that cannot be watched is a
    SpecError before anything is built."""
    torch.manual_seed(0)
    params = [("w", torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)))]
    a = lw.Optimizer(params, "lamb", compile=False, watch=["trust"])
    b = lw.Optimizer(params, lw.load("lamb").watching("trust"), compile=False)
    assert a.program.watches == b.program.watches
    assert "trust" in a.program.watches
    opt = lw.adapt(torch.optim.AdamW([p for _, p in params], lr=0.01), "trust", watch=["ratio"])
    params[0][1].grad = torch.randn(4, 3, dtype=torch.float64)
    opt.step()
    assert set(opt.watched) == {"tr", "ratio"}
    with pytest.raises(lw.SpecError, match="cannot watch unknown name 'nope'"):
        lw.Optimizer(params, "lamb", compile=False, watch=["nope"])
