"""docs/migrating.md: each row that names an installable library runs both
optimizers on the same problem and compares them (float64, 10 steps).

torch_optimizer.Lamb and torch.optim are installed with the ``test`` extra.
Parameters include a 0-d tensor and a zero tensor (the ratio-1 rule).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import layerwise as lw

ROOT = Path(__file__).parents[1]
STEPS = 10
SHAPES = [(5, 4), (4,), (3, 2, 2, 2), (), (6,)]


def _problem(seed: int):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    params[-1].zero_()
    grads = [[0.1 * torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
             for _ in range(STEPS)]
    return params, grads


def _run(make, params, grads):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = make(ps)
    for g in grads:
        for p, x in zip(ps, g):
            p.grad = x.clone()
        opt.step()
    return [p.detach() for p in ps]


def _program(name: str) -> lw.Spec:
    return lw.load(ROOT / "examples" / "migrating" / f"{name}.lw")


def _torch_optimizer_lamb(**kw):
    torch_optimizer = pytest.importorskip("torch_optimizer")
    return lambda ps: torch_optimizer.Lamb(ps, **kw)


def _pytorch_optimizer_lamb(**kw):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    return lambda ps: pytorch_optimizer.Lamb(ps, **kw)


# (row id, theirs, program or preset, our hypers)
ROWS = [
    ("torch_optimizer.Lamb()", _torch_optimizer_lamb(), "torch_optimizer_lamb", {}),
    ("torch_optimizer.Lamb(weight_decay=0.01, clamp_value=0.5)",
     _torch_optimizer_lamb(weight_decay=0.01, clamp_value=0.5), "torch_optimizer_lamb",
     {"weight_decay": 0.01, "clamp_value": 0.5}),
    ("torch_optimizer.Lamb(debias=True, weight_decay=0.01)",
     _torch_optimizer_lamb(debias=True, weight_decay=0.01), "torch_optimizer_lamb_debias",
     {"weight_decay": 0.01}),
    ("pytorch_optimizer.Lamb()", _pytorch_optimizer_lamb(), "pytorch_optimizer_lamb", {}),
    ("pytorch_optimizer.Lamb(weight_decay=0.01, lr=0.01)",
     _pytorch_optimizer_lamb(weight_decay=0.01, lr=0.01), "pytorch_optimizer_lamb",
     {"weight_decay": 0.01, "lr": 0.01}),
    ("torch.optim.AdamW()", lambda ps: torch.optim.AdamW(ps, foreach=False), "adamw", {}),
    ("torch.optim.SGD(momentum=0.9, nesterov=True)",
     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, foreach=False), "sgd",
     {"lr": 0.1, "momentum": 0.9, "nesterov": 1}),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_migration_row_reproduces_the_library(row):
    _, theirs, ours, hypers = row
    spec = _program(ours) if (ROOT / "examples" / "migrating" / f"{ours}.lw").exists() \
        else lw.load(ours)
    params, grads = _problem(seed=len(ours))
    want = _run(theirs, params, grads)
    got = _run(lambda ps: lw.Optimizer(ps, spec, compile=False, **hypers), params, grads)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_every_row_of_the_guide_is_tested():
    """Each library call in the guide's tables is a row here, and back."""
    text = (ROOT / "docs" / "migrating.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([^`]+)` \|", text, re.M))
    assert documented == {r[0] for r in ROWS}
