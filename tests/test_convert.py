"""lw.convert_state_dict: a torch.optim run continued by a preset.

5 steps of torch.optim, its state converted and loaded into lw.Optimizer,
5 more steps: equal (float64, 1e-12) to 10 steps of torch.optim.
"""
from __future__ import annotations

import copy

import pytest
import torch

import layerwise as lw

SHAPES = [(5, 4), (4,), (3, 2, 2, 2), ()]


def _grads(steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
            for _ in range(steps)]


def _params():
    gen = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64))
            for s in SHAPES]


def _steps(opt, params, grads):
    for g in grads:
        for p, x in zip(params, g):
            p.grad = x.clone()
        opt.step()


CASES = [
    ("AdamW", lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=False), "adamw"),
    ("Adam", lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1, foreach=False), "adam"),
    ("SGD", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                       weight_decay=1e-3, foreach=False), "sgd"),
]


@pytest.mark.parametrize("name, make, preset", CASES, ids=[c[0] for c in CASES])
def test_torch_run_continues_as_a_preset(name, make, preset):
    grads = _grads(10, seed=len(name))
    straight = _params()
    _steps(make(straight), straight, grads)

    resumed = _params()
    first = make(resumed)
    _steps(first, resumed, grads[:5])
    saved = first.state_dict()
    before = copy.deepcopy(saved)
    converted = lw.convert_state_dict(saved, preset)
    opt = lw.Optimizer(resumed, preset, compile=False)
    opt.load_state_dict(converted)
    _steps(opt, resumed, grads[5:])
    for a, b in zip(resumed, straight):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # the torch state dict was not changed or aliased
    for pid, entry in before["state"].items():
        for k, v in entry.items():
            assert torch.equal(saved["state"][pid][k], v)


def test_refusals_name_the_problem():
    params = _params()
    opt = torch.optim.Adam(params, amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad=True changes the update"):
        lw.convert_state_dict(opt.state_dict(), "adam")
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    _steps(sgd, params, _grads(1, seed=0))
    with pytest.raises(ValueError, match="parameter 0: state entry 'momentum_buffer' has no "
                                         "counterpart in 'adamw'"):
        lw.convert_state_dict(sgd.state_dict(), "adamw")
    # a state dict of torch's own is refused by load_state_dict, naming what was expected
    adamw = torch.optim.AdamW(params)
    _steps(adamw, params, _grads(1, seed=0))
    with pytest.raises(ValueError, match="this program's state is: m, step, v"):
        lw.Optimizer(params, "adamw", compile=False).load_state_dict(adamw.state_dict())
