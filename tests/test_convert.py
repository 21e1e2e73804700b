"""lw.convert_state_dict: a torch.optim run continued by a preset.

5 steps of torch.optim (or timm's Lamb / Lars), its state converted and
loaded into lw.Optimizer, 5 more steps: equal (float64, 1e-12) to 10 steps
of the original.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import layerwise as lw
from timm_optim import timm_optim

SHAPES = [(5, 4), (4,), (3, 2, 2, 2), ()]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "migrating"


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


def _split(ps):
    """Two param groups, the second without weight decay (timm: no trust ratio there)."""
    return [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}]


CASES = [
    ("AdamW", lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=False), "adamw"),
    ("Adam", lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1, foreach=False), "adam"),
    ("SGD", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                       weight_decay=1e-3, foreach=False), "sgd"),
    ("timm Lamb", lambda ps: timm_optim("lamb").Lamb(_split(ps), lr=0.01), "nvlamb"),
    ("timm Lamb trust_clip", lambda ps: timm_optim("lamb").Lamb(
        ps, lr=0.01, trust_clip=True, always_adapt=True, max_grad_norm=None),
     EXAMPLES / "timm_lamb.lw"),
    ("timm Lars", lambda ps: timm_optim("lars").Lars(
        _split(ps), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
     "timm_lars"),
]


SPLIT = {"timm Lamb", "timm Lars"}


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
    # the same param groups as the original (weight decay comes with the state dict)
    opt = lw.Optimizer(_split(resumed) if name in SPLIT else resumed, preset, compile=False)
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


def test_timm_flags_without_a_hyper_are_refused():
    params = _params()
    lamb = timm_optim("lamb").Lamb(params, trust_clip=True)
    _steps(lamb, params, _grads(1, seed=0))
    with pytest.raises(ValueError, match="param group 0: trust_clip=True changes the update and "
                                         "'nvlamb' has no hyper 'trust_clip'"):
        lw.convert_state_dict(lamb.state_dict(), "nvlamb")
    decoupled = timm_optim("lamb").Lamb(params, decoupled_decay=True)
    with pytest.raises(ValueError, match="decoupled_decay=True"):
        lw.convert_state_dict(decoupled.state_dict(), EXAMPLES / "timm_lamb.lw")
    # off, the same flags are dropped: nothing to reproduce
    plain = timm_optim("lamb").Lamb(params)
    groups = lw.convert_state_dict(plain.state_dict(), "nvlamb")["param_groups"]
    assert "trust_clip" not in groups[0] and groups[0]["use_nvlamb"] == 0.0
