"""compile=True agrees with compile=False (float32, mixed shapes, three steps).

Both paths run the same ``torch.fx`` graphs; the compiled one goes through
inductor, which fuses, reorders reductions and may contract into FMAs, so
float32 results differ by rounding only. Tolerance: ``rtol=1e-5,
atol=1e-6`` (about 100 float32 ulps relative), far below any semantic
difference. Cold compiles cost ~20 s each on a 2-core CPU, so this file
compiles two programs only: the ``lamb`` preset (its compiled runner is
cached and shared with other tests in the same session) and one program
with global reductions (of an elem and of a layer value), ``g`` rebinding,
a layer state, comparisons and watches. Shapes cover 0-d, one element,
empty and ordinary parameters, a zero parameter and a zero gradient.
"""
from __future__ import annotations

import pytest
import torch

import layerwise as lw

RTOL, ATOL = 1e-5, 1e-6

GLOBAL_PROGRAM = """optimizer compiled_vs_eager
hyper lr       = 0.05 in (0, inf)
hyper beta     = 0.9  in [0, 1)
hyper max_norm = 1    in (0, inf)
state m = 0
state gn : layer = norm(w)
watch scale, trust, gn
step {
  scale = min(1, max_norm / (global_norm(g) + 1e-12))
  avg = global_sum(sum(g)) / max(global_sum(numel(w)), 1)
  g = (g - avg) * scale
  m = beta * m + (1 - beta) * g
  gn = beta * gn + (1 - beta) * norm(g)
  trust = where(norm(w) > 0 and norm(m) > 0, norm(w) / norm(m), 1)
  w = w - lr * trust * m / (1 - beta^t) - lr * 0.01 * sign(w) * max(gn, rms(g) * 0)
}
"""

SHAPES = [(3, 4), (7,), (1,), (), (0,), (2, 3, 5)]


def make_params(seed: int):
    gen = torch.Generator().manual_seed(seed)
    params = [(f"p{i}", torch.randn(s, generator=gen)) for i, s in enumerate(SHAPES)]
    params.append(("zero", torch.zeros(4)))
    return params


def run_both(spec, **hypers):
    """Three steps of the compiled and the eager optimizer on equal params and grads."""
    results = []
    for compile in (True, False):
        params = [(n, p.clone()) for n, p in make_params(0)]
        opt = lw.Optimizer(params, spec, compile=compile, **hypers)
        gen = torch.Generator().manual_seed(1)
        for step in range(3):
            for n, p in params:
                p.grad = torch.randn(p.shape, generator=gen)
                if n == "p1" and step == 1:
                    p.grad.zero_()
            opt.step()
        results.append((params, opt))
    return results


def assert_agree(compiled, eager):
    (cparams, copt), (eparams, eopt) = compiled, eager
    for (n, cp), (_, ep) in zip(cparams, eparams):
        torch.testing.assert_close(cp, ep, rtol=RTOL, atol=ATOL, equal_nan=True, msg=n)
        cstate, estate = copt.state[cp], eopt.state[ep]
        assert set(cstate) == set(estate)
        for k in estate:
            torch.testing.assert_close(cstate[k], estate[k], rtol=RTOL, atol=ATOL,
                                       equal_nan=True, msg=f"{n}: state {k}")
    assert copt.watched.keys() == eopt.watched.keys()
    for name, per_param in eopt.watched.items():
        assert copt.watched[name].keys() == per_param.keys()
        for p, values in per_param.items():
            torch.testing.assert_close(torch.tensor(copt.watched[name][p]), torch.tensor(values),
                                       rtol=RTOL, atol=ATOL, equal_nan=True,
                                       msg=f"watched {name} of {p}")


@pytest.mark.parametrize("spec", ["lamb", GLOBAL_PROGRAM], ids=["lamb", "global_norm"])
def test_compiled_step_agrees_with_eager(spec):
    spec = lw.load(spec) if spec == "lamb" else lw.parse(spec, filename="compiled_vs_eager.lw")
    compiled, eager = run_both(spec, lr=0.01)
    assert_agree(compiled, eager)
    # the program really moved the parameters (a test of nothing would also agree)
    start = dict(make_params(0))
    moved = [n for n, p in eager[0] if p.numel() and not torch.equal(p, start[n])]
    assert len(moved) >= 4, moved
