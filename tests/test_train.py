"""layerwise.train: the training loop, its JSON record, the LR rule and the trust-ratio watch.

Runs are a few steps long (``max_steps``) on the real data of each task.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import layerwise as lw
from layerwise.tasks import UnknownTaskError, get_task, task_names
from layerwise.train import (default_warmup, lr_factor, lr_rule_for, parse_hyper, plan_run,
                             scaled_lr, train, with_trust_watch, write_record)

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

STEPS = 3


@pytest.fixture(scope="module")
def tasks():
    return {name: get_task(name) for name in task_names()}


# ---------------------------------------------------------------- the record
@pytest.mark.parametrize("task_name", ["digits", "charlm"])
@pytest.mark.parametrize("optimizer", ["lamb", "sgd"])
def test_record_fields(tasks, task_name, optimizer, tmp_path):
    task = tasks[task_name]
    rec = train(task, optimizer, batch_size=8, max_steps=STEPS, progress=False)
    assert set(rec) >= {"task", "optimizer", "config", "steps", "loss", "lr", "evals", "final",
                        "trust_ratios", "wall_time_s", "train_time_s", "versions"}
    assert rec["task"]["name"] == task_name and rec["task"]["n_train"] == task.data().n_train
    cfg = rec["config"]
    assert cfg["batch_size"] == 8 and cfg["total_steps"] == STEPS and cfg["seed"] == 0
    assert cfg["lr_rule"] == ("linear" if optimizer == "sgd" else "sqrt")
    assert cfg["lr"] == pytest.approx(scaled_lr(task.base_lr[optimizer], 8,
                                                task.base_batch_size, cfg["lr_rule"]))
    assert rec["optimizer"]["name"] == optimizer
    assert rec["steps"] == STEPS and len(rec["loss"]) == STEPS and len(rec["lr"]) == STEPS
    assert all(isinstance(x, float) and math.isfinite(x) for x in rec["loss"])
    # the LR follows the schedule: warm-up of 1 step (10% of 3, rounded up), then decay
    assert rec["lr"] == pytest.approx([cfg["lr"] * lr_factor(s, cfg["warmup_steps"], STEPS)
                                       for s in range(STEPS)], rel=1e-5)
    # evaluations of the test split every eval_every steps and at the end
    assert cfg["eval_every"] == 1
    assert [e["step"] for e in rec["evals"]] == list(range(1, STEPS + 1))
    final = rec["final"]
    assert final["metric"] == task.metric and final["diverged"] is False
    assert final["value"] == rec["evals"][-1][task.metric]
    assert final["loss"] == rec["evals"][-1]["loss"]
    # the val split is another split: its numbers differ from the test split's
    assert math.isfinite(final["val_value"]) and final["val_loss"] != final["loss"]
    assert rec["wall_time_s"] > 0
    trust = rec["trust_ratios"]
    names = [n for n, _ in task.build_model().named_parameters()]
    if optimizer == "lamb":       # lamb watches nothing: the step is restated to watch tr
        assert "restated" in trust["source"]
        assert list(trust["values"]["tr"]) == names
        assert all(len(v) == STEPS and all(x > 0 for x in v)
                   for v in trust["values"]["tr"].values())
    else:
        assert trust["source"] is None and trust["values"] == {}
    path = write_record(rec, tmp_path / "sub" / "run.json")
    assert json.loads(path.read_text()) == rec


def test_same_seed_same_run(tasks):
    a = train(tasks["digits"], "adamw", batch_size=16, max_steps=STEPS, progress=False)
    b = train(tasks["digits"], "adamw", batch_size=16, max_steps=STEPS, progress=False)
    c = train(tasks["digits"], "adamw", batch_size=16, max_steps=STEPS, progress=False, seed=1)
    assert a["loss"] == b["loss"] and a["final"] == b["final"]
    assert a["loss"] != c["loss"]


def test_watched_program_is_recorded_as_is(tasks):
    rec = train(tasks["digits"], "lars", batch_size=8, max_steps=2, progress=False)
    assert rec["trust_ratios"]["source"] == "watched by the program: tr"
    assert len(rec["trust_ratios"]["values"]["tr"]) == 8


def test_divergence_is_recorded(tasks):
    boom = lw.parse("optimizer boom\nhyper lr = 1\nstep {\n  w = w + lr * log(0 * g)\n}\n")
    rec = train(tasks["digits"], boom, batch_size=8, max_steps=STEPS, progress=False)
    assert rec["final"]["diverged"] is True and rec["final"]["value"] is None
    assert rec["loss"][-1] is None
    json.dumps(rec, allow_nan=False)


def test_explicit_lr_hypers_and_warmup(tasks):
    rec = train(tasks["digits"], "sgd", batch_size=8, max_steps=4, lr=0.5, warmup_steps=2,
                hypers={"momentum": 0.5, "weight_decay": 1e-4}, progress=False)
    cfg = rec["config"]
    assert cfg["lr"] == 0.5 and cfg["lr_source"] == "given" and cfg["warmup_steps"] == 2
    assert cfg["hypers"] == {"momentum": 0.5, "weight_decay": 1e-4}
    assert rec["lr"] == pytest.approx([0.25, 0.5, 0.5, 0.25])   # warm-up 2, then decay


# ---------------------------------------------------------------- LR rule and schedule
def test_lr_rule():
    assert lr_rule_for(lw.load("sgd")) == "linear" and lr_rule_for(lw.load("lars")) == "linear"
    assert lr_rule_for(lw.load("lamb")) == "sqrt" and lr_rule_for(lw.load("adamw")) == "sqrt"
    assert scaled_lr(0.1, 128, 32, "linear") == pytest.approx(0.4)
    assert scaled_lr(0.1, 128, 32, "sqrt") == pytest.approx(0.2)
    assert scaled_lr(0.1, 128, 32, "none") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown LR rule"):
        scaled_lr(0.1, 128, 32, "cubic")


def test_schedule():
    assert default_warmup(3) == 1 and default_warmup(100) == 10 and default_warmup(101) == 11
    f = [lr_factor(s, 4, 10) for s in range(10)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4:] == pytest.approx([1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert all(x > 0 for x in f)


# ---------------------------------------------------------------- trust-ratio watch
def _run(spec, steps=4):
    torch.manual_seed(0)
    params = [torch.randn(5, 3, dtype=torch.float64, requires_grad=True),
              torch.randn(7, dtype=torch.float64, requires_grad=True)]
    opt = lw.Optimizer(params, spec, compile=False, lr=0.05, record=("every", 1))
    for s in range(steps):
        opt.zero_grad()
        sum(((p - s) ** 2).sum() * (i + 1) for i, p in enumerate(params)).backward()
        opt.step()
    return [p.detach().clone() for p in params], opt.watched


@pytest.mark.parametrize("override", [None, "def phi(z) = min(z, 0.5)",
                                      "def phi(z) = clip(z, 0.01, 10)"])
def test_trust_watch_is_the_same_computation(override):
    spec = lw.load("lamb")
    if override:
        spec = spec.override(override)
    watched_spec, note = with_trust_watch(spec)
    # the lamb preset's last line calls trust(predecay(w), u) (predecay: its
    # hook for weight decay outside the trust ratio, the identity in lamb)
    assert watched_spec.program.watches == ("tr",) and "tr = trust(predecay(w), u)" in note
    base, _ = _run(spec)
    new, watched = _run(watched_spec)
    for a, b in zip(base, new):
        assert torch.equal(a, b)
    assert set(watched["tr"]) == {"param0", "param1"}
    assert all(len(v) == 4 for v in watched["tr"].values())
    # the watched value is the trust ratio of the first step, checked by hand
    torch.manual_seed(0)
    w = torch.randn(5, 3, dtype=torch.float64)
    g = 2 * w                                   # gradient of sum(w^2) at step 0
    u = g.sign() + 0.01 * w                     # Adam's first step: m/(sqrt(v)+eps) ~ sign(g)
    phi = {None: lambda z: z, "def phi(z) = min(z, 0.5)": lambda z: min(z, 0.5),
           "def phi(z) = clip(z, 0.01, 10)": lambda z: min(max(z, 0.01), 10)}[override]
    assert watched["tr"]["param0"][0] == pytest.approx(phi(w.norm().item()) / u.norm().item(),
                                                       rel=1e-5)


def test_trust_watch_cases():
    for name in ("lars", "lambc", "nvlamb"):
        spec = lw.load(name)
        same, note = with_trust_watch(spec)
        assert same is spec and note.startswith("watched by the program")
    for name in ("adamw", "sgd", "adam"):
        spec = lw.load(name)
        assert with_trust_watch(spec) == (spec, None)
    # a local called tr already: a fresh name is used
    spec = lw.parse("optimizer x extends lamb\nstep {\n  tr = 1\n  u = g + 0 * tr\n"
                    "  w = w - lr * trust(w, u) * u\n}\n", filename="x.lw")
    watched, note = with_trust_watch(spec)
    assert watched.program.watches == ("tr_",)


# ---------------------------------------------------------------- bad input
def test_bad_input(tasks):
    digits = tasks["digits"]
    with pytest.raises(ValueError, match="larger than the digits training set"):
        plan_run(digits, lw.load("lamb"), batch_size=100000)
    with pytest.raises(ValueError, match="unknown hyper 'betta1'.*did you mean 'beta1'"):
        plan_run(digits, lw.load("lamb"), hypers={"betta1": 0.5})
    with pytest.raises(ValueError, match=r"outside its range \[0, 1\)"):
        plan_run(digits, lw.load("lamb"), hypers={"beta1": 1.5})
    with pytest.raises(ValueError, match="no 'lr' hyper"):
        plan_run(digits, lw.parse("optimizer nolr\nhyper eta = 1\nstep {\n  w = w - eta * g\n}\n"))
    with pytest.raises(ValueError, match="not both"):
        plan_run(digits, lw.load("lamb"), lr=0.1, hypers={"lr": 0.2})
    with pytest.raises(UnknownTaskError, match="unknown task 'mnist'; known tasks: digits"):
        get_task("mnist")
    with pytest.raises(FileNotFoundError):
        train(digits, "no_such_file.lw", max_steps=1, progress=False)
    assert parse_hyper("beta1=0.8") == ("beta1", 0.8)
    for bad in ("beta1", "=3", "beta1=x"):
        with pytest.raises(ValueError):
            parse_hyper(bad)
