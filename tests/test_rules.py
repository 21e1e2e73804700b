"""``for`` rules whose values are expressions (LANGUAGE.md section 11), through lw.Optimizer.

A rule's value that names a hyper transforms the parameter's current value,
evaluated at every step from the group's values (so schedulers keep
working and rules compose); a value that names none is an override that an
explicit param-group value wins over. Plain SGD programs make the applied
learning rate readable from the update: ``w - w_new = lr * g``.
"""
from __future__ import annotations

import pytest
import torch

import layerwise as lw

PROGRAM = """optimizer relative_rules
hyper lr = 0.1 in (0, inf)
hyper wd = 0.5 in [0, 1]
for ndim <= 1 {
  lr = 0.1 * lr
}
for ndim >= 2 {
  lr = lr / cols
}
for name ~ "special" {
  lr = 0.1 * lr
  wd = 0.25
}
step {
  w = w - lr * g - wd * 0 * w
}
"""


def params():
    torch.manual_seed(0)
    return [("weight", torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))),
            ("bias", torch.nn.Parameter(torch.randn(3, dtype=torch.float64))),
            ("special_bias", torch.nn.Parameter(torch.randn(2, dtype=torch.float64)))]


def applied_lr(named, before) -> dict[str, float]:
    """The learning rate each parameter got this step (its grad is all ones)."""
    return {n: float((before[n] - p.detach())[0].item() if p.dim() == 1
                     else (before[n] - p.detach())[0, 0].item()) for n, p in named}


def step(named, opt):
    before = {n: p.detach().clone() for n, p in named}
    for _, p in named:
        p.grad = torch.ones_like(p)
    opt.step()
    return applied_lr(named, before)


def test_a_scheduler_acts_through_relative_rules_and_rules_compose():
    """LambdaLR halves the group's lr every step; each parameter's lr follows it,
    scaled by its rules: 1/cols for the matrix, 0.1 for a bias, 0.1 * 0.1 for
    the bias that two rules match."""
    named = params()
    opt = lw.Optimizer(named, lw.parse(PROGRAM), compile=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    for k in range(4):
        lr = 0.1 * 0.5 ** k
        got = step(named, opt)
        assert got["weight"] == pytest.approx(lr / 4, rel=1e-12)
        assert got["bias"] == pytest.approx(0.1 * lr, rel=1e-12)
        assert got["special_bias"] == pytest.approx(0.01 * lr, rel=1e-12)
        sched.step()


def test_explicit_group_values_win_over_overrides_not_over_relative_rules():
    """The special bias's group sets wd and lr explicitly: the override
    ``wd = 0.25`` does not apply, the relative ``lr = 0.1 * lr`` (twice) does."""
    named = params()
    groups = [{"params": [named[0], named[1]]},
              {"params": [named[2]], "lr": 0.2, "wd": 0.75}]
    opt = lw.Optimizer(groups, lw.parse(PROGRAM.replace("wd * 0 * w", "wd * 0.001 * g")),
                       compile=False)
    got = step(named, opt)
    # special_bias: lr 0.2 * 0.1 * 0.1 = 0.002, wd explicit 0.75: 0.002 + 0.00075
    assert got["special_bias"] == pytest.approx(0.002 + 0.00075, rel=1e-12)
    # bias (group 0, not special): lr 0.01, wd default 0.5: 0.01 + 0.0005
    assert got["bias"] == pytest.approx(0.01 + 0.0005, rel=1e-12)


def test_a_rule_pushing_a_value_out_of_range_fails_the_step_and_changes_nothing():
    text = PROGRAM.replace("  wd = 0.25\n", "  wd = wd * 4\n")
    named = params()
    opt = lw.Optimizer(named, lw.parse(text), compile=False)
    before = {n: p.detach().clone() for n, p in named}
    for _, p in named:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"parameter special_bias: wd=2\.0 after its for rules "
                                         r"is outside its range \[0, 1\]"):
        opt.step()
    assert all(torch.equal(before[n], p) for n, p in named)
    assert not any(opt.state.values())


def test_row_block_must_divide_dim_0():
    text = ("optimizer blocks\nhyper lr = 0.1\nfor ndim >= 2 {\n  row_block = 2\n}\n"
            "step {\n  w = w - lr * g\n}\n")
    ok = [("w", torch.nn.Parameter(torch.zeros(4, 3)))]
    lw.Optimizer(ok, lw.parse(text), compile=False)
    bad = [("odd", torch.nn.Parameter(torch.zeros(3, 4)))]
    with pytest.raises(ValueError, match=r"parameter odd: row_block 2 does not divide its dim 0 "
                                         r"of size 3"):
        lw.Optimizer(bad, lw.parse(text), compile=False)
