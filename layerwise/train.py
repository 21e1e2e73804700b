"""Train a task with a layerwise program and keep a JSON record of the run.

The loop is an ordinary PyTorch loop around ``lw.Optimizer``::

    for epoch in range(epochs):
        for x, y in task.batches(batch_size, epoch, seed):
            opt.zero_grad(); task.loss(model, x, y).backward(); opt.step(); sched.step()
            every eval_every steps: task.evaluate_split(model, "test")
    at the end: task.evaluate_split(model, "val") as well

The test split is the reported one; the val split is only for selection
(``layerwise ablate --protocol tuned``).

Learning-rate rule (used by ``layerwise train`` when no ``--lr`` is given
and by ``layerwise ablate`` for every grid cell)::

    lr(B) = base_lr * (B / B0) ** p

with ``base_lr`` tuned at the task's ``base_batch_size`` ``B0``
(``docs/lr_sweep.md``) and

* ``p = 1`` ("linear") for SGD with momentum and LARS/LARC: the linear
  scaling rule of Goyal et al. 2017 ("Accurate, Large Minibatch SGD",
  arXiv:1706.02677, section 2.1), which the LARS paper (arXiv:1708.03888)
  starts from;
* ``p = 1/2`` ("sqrt") for everything else (LAMB, AdamW, Adam and their
  variants): the square-root rule (Krizhevsky 2014, arXiv:1404.5997) that
  the LAMB paper (You et al. 2019, arXiv:1904.00962, section 4) uses to
  scale LAMB's learning rate with the batch size without re-tuning.

Schedule: linear warm-up from ``lr / W`` to ``lr`` over the first ``W``
steps (Goyal et al. 2017, section 2.2, "gradual warmup"; the LAMB paper
warms up the same way), then linear decay to ``lr / (S - W)`` at the
last of ``S`` steps (polynomial decay of power 1). The default ``W`` is
10% of the run's steps, rounded up: warm-up takes a fixed fraction of a
fixed-epoch budget, so it is proportionally as long at every batch size.

Trust ratios: the record keeps every ``watch``ed value of the program
(``opt.watched``). A program that watches nothing but computes its update
through a ``def trust(...)`` in its ``w = ...`` statement (``lamb`` and its
``extends``/``--phi`` variants) is run with that step restated so that
the call's value is a local, ``tr = trust(...)``, and ``watch tr`` added
(:func:`with_trust_watch`); this is the same computation, in the same
order, as the original step. Other programs (``adamw``, ``sgd``) have no
trust ratio and the record says so.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import stat
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch

from .optimizer import Optimizer
from .spec import Spec, load
from .syntax import Assign, Binary, Call, Expr, Name, Unary, format_expr
from .tasks import Task, get_task

__all__ = ["LINEAR_RULE", "lr_rule_for", "scaled_lr", "lr_factor", "default_warmup",
           "with_trust_watch", "parse_hyper", "resolve_spec", "plan_run", "train",
           "available_cpus", "check_count", "check_threads", "check_seed", "check_record_path", "nearest_directory",
           "atomic_output", "json_safe", "write_record", "probe_parameters", "default_eval_every",
           "EVALS_PER_RUN"]

#: Presets whose learning rate is scaled linearly with the batch size (Goyal et al. 2017).
LINEAR_RULE = frozenset({"sgd", "lars", "larc"})
_RULE_POWER = {"linear": 1.0, "sqrt": 0.5, "none": 0.0}
WARMUP_FRACTION = 0.1
#: Evaluations of the test split per run when no interval is given.
EVALS_PER_RUN = 20


# ---------------------------------------------------------------- LR rule and schedule
def lr_rule_for(spec: Spec) -> str:
    """``"linear"`` for programs named ``sgd``, ``lars`` or ``larc``, else ``"sqrt"``."""
    return "linear" if spec.name in LINEAR_RULE else "sqrt"


def scaled_lr(base_lr: float, batch_size: int, base_batch_size: int, rule: str) -> float:
    """``base_lr * (batch_size / base_batch_size) ** p`` with ``p`` = 1 (``"linear"``),
    1/2 (``"sqrt"``) or 0 (``"none"``); see the module docstring for sources.

    Raises:
        ValueError: for an unknown rule.
    """
    if rule not in _RULE_POWER:
        raise ValueError(f"unknown LR rule '{rule}'; known: {', '.join(_RULE_POWER)}")
    return base_lr * (batch_size / base_batch_size) ** _RULE_POWER[rule]


def default_warmup(total_steps: int) -> int:
    """Warm-up steps when none are given: ``ceil(0.1 * total_steps)``, at least 1."""
    return max(1, math.ceil(WARMUP_FRACTION * total_steps))


def default_eval_every(total_steps: int) -> int:
    """Steps between evaluations when none are given: ``ceil(total_steps / 20)``, at
    least 1 (about 20 evaluations per run whatever the batch size, so steps to a
    target are resolved to about 5% of a run)."""
    return max(1, math.ceil(total_steps / EVALS_PER_RUN))


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak LR at 0-based ``step``: ``(step + 1) / warmup`` while
    ``step < warmup``, then ``(total - step) / (total - warmup)`` (linear decay,
    never 0 within the run)."""
    if step < warmup:
        return (step + 1) / warmup
    return (total - step) / max(1, total - warmup)


# ---------------------------------------------------------------- trust-ratio watch
def _replace(e: Expr, old: Expr, new: Expr) -> Expr:
    if e == old:
        return new
    if isinstance(e, Unary):
        return dataclasses.replace(e, operand=_replace(e.operand, old, new))
    if isinstance(e, Binary):
        return dataclasses.replace(e, left=_replace(e.left, old, new),
                                   right=_replace(e.right, old, new))
    if isinstance(e, Call):
        return dataclasses.replace(e, args=tuple(_replace(a, old, new) for a in e.args))
    return e


def _calls(e: Expr, func: str) -> list[Call]:
    out = [e] if isinstance(e, Call) and e.func == func else []
    children = ((e.operand,) if isinstance(e, Unary) else (e.left, e.right)
                if isinstance(e, Binary) else e.args if isinstance(e, Call) else ())
    for c in children:
        out.extend(_calls(c, func))
    return out


def with_trust_watch(spec: Spec) -> tuple[Spec, str | None]:
    """The spec to train with, so that it records a per-layer trust ratio if it has one.

    Returns ``(spec, note)``:

    * the program watches something: ``spec`` unchanged, note
      ``"watched by the program: NAMES"``;
    * it watches nothing, defines ``def trust(...)`` and its last ``w = ...``
      statement calls ``trust`` with one distinct argument list: a spec
      whose step is restated with ``tr = trust(...)`` just before that
      statement, the call replaced by ``tr``, and ``watch tr`` added (a
      ``def`` is inlined where it is called, so this computes the same
      values in the same order); note says so;
    * otherwise ``spec`` unchanged and note ``None`` (no trust ratio).

    Reads the spec's merged declarations (``Spec._declarations``): the
    public API has no other way to see the un-inlined step.
    """
    if spec.program.watches:
        return spec, "watched by the program: " + ", ".join(spec.program.watches)
    decls = getattr(spec, "_declarations", None)
    if decls is None or "trust" not in decls.defs or decls.step is None:
        return spec, None
    body = list(decls.step.body)
    last = max((i for i, a in enumerate(body) if a.target == "w"), default=None)
    if last is None:
        return spec, None
    calls = _calls(body[last].value, "trust")
    if not calls or any(c != calls[0] for c in calls):
        return spec, None
    taken = ({a.target for a in body} | set(decls.hypers) | set(decls.states)
             | set(decls.defs) | {"w", "g", "t"})
    local = "tr"
    while local in taken:
        local += "_"
    new_w = _replace(body[last].value, calls[0], Name(local))
    stmts = body[:last] + [Assign(local, calls[0]), Assign("w", new_w)] + body[last + 1:]
    text = (f"watch {local}\nstep {{\n"
            + "".join(f"  {a.target} = {format_expr(a.value)}\n" for a in stmts) + "}\n")
    try:
        watched = spec.override(text, filename=f"<trust watch of {spec.name}>")
    except ValueError:
        return spec, None
    return watched, (f"step restated with '{local} = {format_expr(calls[0])}' and "
                     f"'watch {local}' (same computation)")


# ---------------------------------------------------------------- inputs
def parse_hyper(text: str, option: str = "--hyper") -> tuple[str, float]:
    """``"NAME=VALUE"`` -> ``(NAME, float(VALUE))``; ``option`` names the
    command-line option in messages (``--hyper``, ``--base-lr``).

    Raises:
        ValueError: if there is no ``=``, no NAME, or VALUE is not a finite
            number (``nan``, ``inf`` are refused: a record must be valid JSON,
            and no hyper of a run is meant to be non-finite).
    """
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"{option} expects NAME=VALUE, not '{text}'")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{option} {name}: '{value.strip()}' is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{option} {name}={value.strip()}: not a finite number")
    return name, number


def resolve_spec(spec: Spec | str) -> Spec:
    """A :class:`Spec` from a spec, a preset name or a ``.lw`` path (``lw.load``).

    Raises:
        FileNotFoundError: neither a preset nor a file.
        SpecError: the program does not check.
    """
    return spec if isinstance(spec, Spec) else load(spec)


def _finite(name: str, value: Any) -> float:
    """``float(value)``, or a ValueError naming ``name`` if it is not a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{name}={value}: not a finite number")
    return number


def _check_hypers(spec: Spec, hypers: dict[str, float]) -> None:
    from .errors import suggest

    for name, value in hypers.items():
        if name not in spec.hypers:
            raise ValueError(f"unknown hyper '{name}' for optimizer '{spec.name}'"
                             f"{suggest(name, spec.hypers)} (known: {', '.join(spec.hypers)})")
        _finite(name, value)
        h = spec.program.hyper(name)
        if not h.admits(float(value)):
            raise ValueError(f"{name}={value:g} is outside its range {h.range} in optimizer "
                             f"'{spec.name}'")
    # and whatever else lw.Optimizer checks; the probe is named, so that a
    # program with a 'for name ~ ...' rule checks too (the rule matches or not)
    Optimizer(probe_parameters(), spec, compile=False, **hypers)


def probe_parameters() -> list[tuple[str, torch.Tensor]]:
    """One named float32 parameter of shape ``(1,)``, ``[("probe", tensor)]``, on which
    train and ablate check a program and its hyper values before any run
    (named, so that programs with ``for name ~ ...`` rules are accepted)."""
    return [("probe", torch.zeros(1, requires_grad=True))]


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Everything a run depends on, resolved and validated (see :func:`plan_run`)."""
    task: str
    label: str
    batch_size: int
    epochs: int
    steps_per_epoch: int
    total_steps: int
    lr: float
    base_lr: float
    base_batch_size: int
    lr_rule: str
    lr_source: str
    warmup_steps: int
    hypers: dict[str, float]
    seed: int
    compile: bool
    max_steps: int | None
    eval_every: int


def plan_run(task: Task, spec: Spec, *, batch_size: int | None = None,
             epochs: int | None = None, lr: float | None = None, base_lr: float | None = None,
             warmup_steps: int | None = None, hypers: dict[str, float] | None = None,
             lr_rule: str | None = None, seed: int = 0, compile: bool = False,
             label: str | None = None, max_steps: int | None = None,
             eval_every: int | None = None) -> RunPlan:
    """Resolve defaults and validate a run before any training.

    ``lr`` is the peak learning rate; when ``None`` it is
    ``scaled_lr(base_lr, batch_size, task.base_batch_size, rule)`` where
    ``base_lr`` defaults to the task's tuned value for ``spec.name``, or
    else the program's own ``lr`` default. ``hypers`` override the
    program's defaults and the task's ``base_hypers`` for ``spec.name``
    (an ``lr`` in ``hypers`` is the same as ``lr=``). ``max_steps`` cuts
    the run short (smoke tests); the schedule is planned for the cut run.
    ``eval_every`` is the number of steps between evaluations of the test
    split (default :func:`default_eval_every`); the last step is always
    evaluated, on the val split too.

    Raises:
        ValueError: batch size not positive or larger than the training
            set; epochs < 1; warm-up steps < 0; a program without an
            ``lr`` hyper; an unknown LR rule; unknown hyper names or values
            outside their range; an ``lr``, ``base_lr`` or hyper value that
            is not a finite number; a seed outside torch's 64-bit range;
            ``eval_every`` < 1.
    """
    hypers = dict(hypers or {})
    if "lr" in hypers:
        if lr is not None:
            raise ValueError("give the learning rate once: --lr or --hyper lr=..., not both")
        lr = hypers.pop("lr")
    if "lr" not in spec.hypers:
        raise ValueError(f"optimizer '{spec.name}' has no 'lr' hyper; train and ablate "
                         "schedule 'lr' (declare: hyper lr = ...)")
    batch_size = task.default_batch_size if batch_size is None else int(batch_size)
    epochs = task.default_epochs if epochs is None else int(epochs)
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, not {epochs}")
    steps_per_epoch = task.steps_per_epoch(batch_size)
    total = steps_per_epoch * epochs
    if max_steps is not None:
        if max_steps < 1:
            raise ValueError(f"max steps must be at least 1, not {max_steps}")
        total = min(total, int(max_steps))
    rule = lr_rule or lr_rule_for(spec)
    if base_lr is not None:
        source = "given base LR, scaled by the rule"
    elif spec.name in task.base_lr:
        base_lr = task.base_lr[spec.name]
        source = f"tuned base LR of '{spec.name}' on {task.name}, scaled by the rule"
    else:
        base_lr = spec.hypers["lr"]
        source = f"the program's default lr (no tuned value for '{spec.name}'), scaled by the rule"
    base_lr = _finite("base_lr", base_lr)
    if lr is None:
        lr = scaled_lr(base_lr, batch_size, task.base_batch_size, rule)
        if not math.isfinite(lr):
            raise ValueError(f"lr={lr} (base_lr={base_lr:g} scaled by the {rule} rule): "
                             "not a finite number")
    else:
        lr = _finite("lr", lr)
        scaled_lr(1.0, batch_size, task.base_batch_size, rule)   # validates the rule name
        source = "given"
    warmup = default_warmup(total) if warmup_steps is None else int(warmup_steps)
    if warmup < 0:
        raise ValueError(f"warm-up steps must be >= 0, not {warmup}")
    if not _seed_ok(seed):
        raise ValueError(f"seed {seed}: must be an integer from -2**63 to 2**64 - 1 "
                         "(torch's seed range)")
    if eval_every is None:
        eval_every = default_eval_every(total)
    elif isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every must be a positive integer, not {eval_every!r}")
    all_hypers = {**task.base_hypers.get(spec.name, {}), **hypers}
    _check_hypers(spec, {**all_hypers, "lr": lr})
    return RunPlan(task=task.name, label=label or spec.name, batch_size=batch_size,
                   epochs=epochs, steps_per_epoch=steps_per_epoch, total_steps=total,
                   lr=float(lr), base_lr=float(base_lr), base_batch_size=task.base_batch_size,
                   lr_rule=rule, lr_source=source, warmup_steps=min(warmup, total),
                   hypers=all_hypers, seed=int(seed), compile=bool(compile),
                   max_steps=None if max_steps is None else int(max_steps),
                   eval_every=int(eval_every))


# ---------------------------------------------------------------- the loop
def _round(x: float) -> float | None:
    return float(f"{x:.6g}") if math.isfinite(x) else None


def train(task: Task | str, spec: Spec | str, *, progress: bool = True,
          threads: int | None = None, trust_watch: bool = True, plan: RunPlan | None = None,
          **options: Any) -> dict:
    """Train ``task``'s model with ``spec`` and return the run's record (a JSON-able dict).

    Args:
        task: a :class:`~layerwise.tasks.Task` or a task name.
        spec: a :class:`~layerwise.Spec`, preset name or ``.lw`` path.
        progress: show a tqdm progress bar (on stderr).
        threads: ``torch.set_num_threads`` for the run (restored after);
            ``None`` leaves torch's setting; at most :func:`available_cpus`.
        trust_watch: record a trust ratio via :func:`with_trust_watch`.
        plan: a plan made by :func:`plan_run` for this task and spec (then no
            ``options`` may be given).
        **options: ``batch_size``, ``epochs``, ``lr``, ``base_lr``,
            ``warmup_steps``, ``hypers``, ``lr_rule``, ``seed``, ``compile``,
            ``label``, ``max_steps``: see :func:`plan_run`.

    Returns:
        ``{"task", "optimizer", "config", "loss", "lr", "evals", "final",
        "trust_ratios", "wall_time_s", "versions"}``: ``loss`` and ``lr``
        have one float per step (training cross-entropy in nats on that
        step's batch, before the update; the learning rate used by it);
        ``evals`` one entry ``{"step", "loss", METRIC}`` per evaluation of
        the test split (every ``eval_every`` steps and after the last step;
        ``step`` counts the updates made); ``final`` the last step's numbers:
        ``metric``, ``value`` and ``loss`` on the test split (reported),
        ``val_value`` and ``val_loss`` on the val split (selection), and
        ``diverged``; ``trust_ratios`` is
        ``{"source", "values": {watched name: {param name: [float per step]}}}``.
        Non-finite numbers are stored as ``None``. A run whose training
        loss becomes non-finite stops there and is marked ``diverged``.

    Raises:
        ValueError, FileNotFoundError, SpecError, UnknownTaskError: bad
            input, all found before training starts (see :func:`plan_run`
            and :func:`check_threads`).
    """
    started = time.perf_counter()
    if threads is not None:
        check_threads(threads)
    task = get_task(task) if isinstance(task, str) else task
    spec = resolve_spec(spec)
    if plan is None:
        plan = plan_run(task, spec, **options)
    elif options:
        raise ValueError(f"give a plan or run options, not both ({', '.join(options)})")
    run_spec, trust_note = with_trust_watch(spec) if trust_watch else (spec, None)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        record = _loop(task, spec, run_spec, plan, progress)
    finally:
        torch.set_num_threads(old_threads)
    record["trust_ratios"]["source"] = trust_note
    record["wall_time_s"] = round(time.perf_counter() - started, 3)
    return record


def _loop(task: Task, spec: Spec, run_spec: Spec, plan: RunPlan, progress: bool) -> dict:
    from tqdm.auto import tqdm

    task.data()         # loaded before seeding: a task's data never depends on the run's seed
    torch.manual_seed(plan.seed)
    model = task.build_model()
    model.train()
    opt = Optimizer(model.named_parameters(), run_spec, compile=plan.compile,
                    record=("every", 1), **{**plan.hypers, "lr": plan.lr})
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, plan.warmup_steps, plan.total_steps))
    losses: list[float | None] = []
    lrs: list[float] = []
    evals: list[dict] = []
    diverged = False

    def evaluate(which: str) -> dict:
        return {k: _round(v) for k, v in task.evaluate_split(model, which).items()}

    t0 = time.perf_counter()
    bar = tqdm(total=plan.total_steps, disable=not progress, unit="step", file=sys.stderr,
               desc=f"{plan.task} {plan.label} b{plan.batch_size}", leave=False)
    try:
        for epoch in range(plan.epochs):
            for x, y in task.batches(plan.batch_size, epoch, plan.seed):
                if len(losses) == plan.total_steps:
                    break
                opt.zero_grad(set_to_none=True)
                loss = task.loss(model, x, y)
                value = loss.item()
                losses.append(_round(value))
                lrs.append(_round(opt.param_groups[0]["lr"]))
                if not math.isfinite(value):
                    diverged = True
                    break
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                if len(losses) % 10 == 0:
                    bar.set_postfix(loss=f"{value:.3f}", refresh=False)
                if len(losses) % plan.eval_every == 0 or len(losses) == plan.total_steps:
                    evals.append({"step": len(losses), **evaluate("test")})
            if diverged or len(losses) == plan.total_steps:
                break
    finally:
        bar.close()
    train_time = time.perf_counter() - t0
    last = evals[-1] if evals and not diverged else None
    if last is None or last["loss"] is None:
        final = {"loss": None, "metric": task.metric, "value": None, "val_loss": None,
                 "val_value": None, "diverged": True}
    else:
        val = evaluate("val")
        final = {"loss": last["loss"], "metric": task.metric, "value": last[task.metric],
                 "val_loss": val["loss"], "val_value": val[task.metric],
                 "diverged": val["loss"] is None}
    trust = {name: {p: [_round(x) for x in xs] for p, xs in per.items()}
             for name, per in opt.watched.items()}
    return {
        "task": task.describe(),
        "optimizer": {"label": plan.label, "name": spec.name, "file": spec.filename,
                      "program": spec.to_text()},
        "config": {**dataclasses.asdict(plan),
                   "schedule": "linear warm-up over warmup_steps, then linear decay",
                   "threads": torch.get_num_threads()},
        "steps": len(losses) - (1 if diverged else 0),
        "loss": losses,
        "lr": lrs,
        "evals": evals,
        "final": final,
        "trust_ratios": {"source": None, "values": trust},
        "train_time_s": round(train_time, 3),
        "versions": {"layerwise": _version(), "torch": torch.__version__,
                     "python": platform.python_version()},
    }


def _version() -> str:
    from . import __version__
    return __version__


# ---------------------------------------------------------------- outputs
def available_cpus() -> int:
    """The number of CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_count(value: int, name: str, limit: int, why: str) -> int:
    """``value`` if it is an integer from 1 to ``limit``.

    Raises:
        ValueError: ``"NAME VALUE: must be from 1 to LIMIT (WHY)"``, or
            ``"NAME VALUE: not an integer"``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} {value!r}: not an integer")
    if not 1 <= value <= limit:
        raise ValueError(f"{name} {value}: must be from 1 to {limit} ({why})")
    return value


def check_threads(threads: int, name: str = "threads") -> int:
    """``threads`` if it is an integer from 1 to :func:`available_cpus`.

    More torch threads than CPUs only slows a run down, and an absurd count
    (100,000) exhausts memory inside torch; both are refused up front.

    Raises:
        ValueError: naming ``name`` and the limit (:func:`check_count`).
    """
    return check_count(threads, name, available_cpus(), "the CPUs this process may use")


def _seed_ok(seed: Any) -> bool:
    """Whether ``seed`` is an integer in torch's seed range, -2**63 to 2**64 - 1."""
    return not isinstance(seed, bool) and isinstance(seed, int) and -2**63 <= seed < 2**64


def check_seed(seed: int, name: str = "seed") -> int:
    """``seed`` (an integer from the command line) if it is in torch's seed range.

    Raises:
        ValueError: naming ``name`` and the range.
    """
    if not _seed_ok(seed):
        raise ValueError(f"{name} {seed}: must be from -2**63 to 2**64 - 1 (torch's seed range)")
    return seed


def nearest_directory(path: str | Path, what: str) -> Path:
    """The nearest existing ancestor of ``path`` (``path``'s parent first), checked
    to be a directory this process may create files in.

    Raises:
        ValueError: ``what: ...`` when an ancestor is not a directory or the
            directory is not writable.
    """
    path = Path(path)
    parent = path.parent
    while True:
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            if parent.parent == parent:
                raise ValueError(f"{what}: no existing folder to create it in") from None
            parent = parent.parent
            continue
        except (OSError, ValueError) as err:
            raise ValueError(f"{what}: cannot use '{parent}': "
                             f"{getattr(err, 'strerror', None) or err}") from None
        break
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{what}: '{parent}' is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: cannot write in '{parent}' (permission denied)")
    return parent


def _is_record(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and {"config", "optimizer", "final"} <= set(data)


def check_record_path(path: str | Path, what: str = "--out") -> Path:
    """Check, before a run, that a record can be written to ``path``.

    Accepted: a path that does not exist yet (its missing folders are
    created when the record is written) under a writable directory, or an
    existing regular file that holds a run record (``write_record``
    replaces it, atomically, once the new run is done). Refused: a
    directory, a device or other non-regular file (``/dev/full``,
    ``/dev/null``), a file that is not a record (it is the user's, not
    ours to overwrite), a path under a file, an unwritable directory.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: a one-line message starting ``what PATH:``.
    """
    path = Path(path)
    label = f"{what} {path}"
    if str(path) in ("", "."):
        raise ValueError(f"{what}: give a file name (FILE.json)")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        st = None            # a component is a file: nearest_directory says which
    except (OSError, ValueError) as err:
        raise ValueError(f"{label}: cannot use it: "
                         f"{getattr(err, 'strerror', None) or err}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise ValueError(f"{label}: is a directory (give a file name, FILE.json)")
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{label}: not a regular file")
        if not _is_record(path):
            raise ValueError(f"{label}: exists and is not a layerwise run record; "
                             "not overwriting it")
        target = Path(os.path.realpath(path))
        nearest_directory(target, label)
        return path
    nearest_directory(path, label)
    return path


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it replaces
    ``path`` with ``os.replace`` (atomic), on failure it is removed.

    So a reader (or a later run) sees the old file or the complete new one,
    never a half-written file, and a failed write leaves an earlier file
    as it was. A symlink at ``path`` is followed (its target is replaced).
    Missing parent folders are created. The temporary name keeps the
    suffix (``.png``, ``.json``), for writers that choose a format by it.
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    for n in range(100):
        candidate = path.with_name(f".{path.stem}.{os.getpid()}.{n}.tmp{path.suffix}")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        tmp = candidate
        break
    if tmp is None:
        raise FileExistsError(f"cannot create a temporary file beside {path}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf) replaced by ``None``, so
    that it is valid JSON (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_record(record: dict, path: str | Path) -> Path:
    """Write ``record`` as strict JSON to ``path``, creating folders.

    Non-finite floats are written as ``null`` (:func:`json_safe`; the
    record's losses already are). The file is written beside ``path`` and
    renamed over it (:func:`atomic_output`): a failure (disk full, ...)
    raises ``OSError`` and leaves any earlier file at ``path`` unchanged.
    """
    path = Path(path)
    text = json.dumps(json_safe(record), indent=1, allow_nan=False) + "\n"
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return path
