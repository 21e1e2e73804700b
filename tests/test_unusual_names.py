"""Any name the language accepts works as a hyper or state (LANGUAGE.md
section 2: Unicode letters such as ``β1``; issue 14: Python keywords,
``self``, built-ins), on the eager and compiled paths: the graphs use
generated placeholder names for those fx cannot keep
(``Lowered.placeholders``), and the runtime maps them back."""
from __future__ import annotations

import pytest
import torch

import layerwise as lw

# lamb with its hypers and states renamed; a global reduction (nvlamb-style
# clipping) and a layer state too, so every pass binds renamed inputs
TEMPLATE = """optimizer renamed
hyper {lr} = 1e-2
hyper {b1} = 0.9 in [0, 1)
hyper beta2 = 0.999 in [0, 1)
hyper {eps} = 1e-6 in (0, inf)
state {m} = 0
state v = 0
state {calls} : layer = 0
watch tr
step {{
  gn = global_norm(g)
  g = g / max(gn, 1)
  {m} = {b1} * {m} + (1 - {b1}) * g
  v = beta2 * v + (1 - beta2) * g^2
  {calls} = {calls} + 1
  u = ({m} / (1 - {b1}^t)) / (sqrt(v / (1 - beta2^t)) + {eps})
  tr = where(norm(w) > 0 and norm(u) > 0, norm(w) / norm(u), 1)
  w = w - {lr} * tr * u
}}
"""
PLAIN = dict(lr="lr", b1="beta1", eps="eps", m="m", calls="calls")
ODD = [dict(lr="lambda", b1="β1", eps="self", m="class", calls="print"),
       dict(lr="torch", b1="η", eps="None", m="φ", calls="def_")]


def _run(names, compile, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype))
              for s in [(4, 3), (3,), ()]]
    # and a non-contiguous (transposed) parameter
    params.append(torch.nn.Parameter(torch.randn(5, 4, generator=gen, dtype=dtype).t()))
    opt = lw.Optimizer(params, lw.parse(TEMPLATE.format(**names)), compile=compile,
                       record=("every", 1))
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
        opt.step()
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    return [p.detach().clone() for p in params], state, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("names", ODD, ids=["keywords", "unicode"])
def test_odd_names_update_like_plain_names_eager(names, dtype):
    want, want_state, _ = _run(PLAIN, False, dtype)
    got, got_state, opt = _run(names, False, dtype)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for s, t in zip(got_state, want_state):
        assert torch.equal(s[names["m"]], t["m"]) and torch.equal(s[names["calls"]], t["calls"])
    assert set(opt.defaults) >= {names["lr"], names["b1"], names["eps"]}
    assert opt.param_groups[0][names["lr"]] == 1e-2


def test_odd_names_compiled_equal_eager():
    names = ODD[0]
    want, _, _ = _run(names, False)
    got, _, _ = _run(names, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
