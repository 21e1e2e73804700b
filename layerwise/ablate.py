"""Large-batch ablations: an optimizer x adaptation x batch-size grid per task, a table and plots.

``layerwise ablate`` trains every cell of the grid (task x optimizer
variant x adaptation x batch size) with :func:`layerwise.train.train` for the same
number of epochs, so a larger batch means proportionally fewer steps (the
fixed-epoch budget of the LARS and LAMB papers). Each cell's peak learning
rate follows the rule of :mod:`layerwise.train`:

    lr(B) = base_lr * (B / B0) ** p,   p = 1 for sgd/lars/larc (Goyal et al. 2017),
                                       p = 1/2 otherwise (the LAMB paper's sqrt rule)

with ``base_lr`` tuned at the task's smallest default batch ``B0``
(``docs/lr_sweep.md``), linear warm-up over the first 10% of steps and
linear decay after it.

``--phi EXPR`` adds, for every optimizer of the grid whose program defines
``phi`` (LAMB's scaling function, ``trust = phi(||w||) / ||u||``), a
variant ``spec.override("def phi(z) = EXPR")`` labelled ``NAME[phi=EXPR]``.

``--adapt NAME...`` adds the adaptation axis (LANGUAGE.md section 12):
every optimizer of the grid runs once per adaptation, ``NAME`` being an
adaptation preset (``trust``), a ``.lw`` file that starts with
``adaptation NAME``, or ``none`` (the optimizer as it is; the only value
when ``--adapt`` is not given). An adapted cell trains the program
``lw.adapt`` makes of the optimizer and the adaptation (:func:`adapt_spec`),
labelled ``OPTIMIZER+ADAPTATION`` (``adamw+trust``), with the optimizer's
base LR and LR rule: the adaptation is the only change.

Outputs in ``DIR``: ``results.csv`` (one row per cell), ``results.md`` (per
task, a table optimizer (x adaptation) x batch size -> validation metric,
like the papers' tables), ``metric_vs_batch.png``, ``trust_ratios_TASK.png``
(the per-layer trust ratios of one run per task) and ``runs/*.json`` (every
run's full record: ``runs/TASK_OPTIMIZER_bN.json`` for an unadapted cell,
as before the adaptation axis, ``runs/TASK_OPTIMIZER+ADAPTATION_bN.json``
for an adapted one).

Cells run in ``jobs`` worker processes (spawned), each cell on
``threads`` torch threads (default 1), so results do not depend on
``jobs``.

Outputs are never half-written and an earlier grid's records are never
changed. Before any run, ``DIR`` is checked: it must be a directory (or
not exist yet) that can be written, and every ``runs/*.json`` already in it
must be the record of a cell of this grid with the same configuration
(task, program text, adaptation, batch size, epochs, seed, steps, learning
rate and its rule, warm-up, hypers). Such a cell is not run again: its
record is reused (an interrupted or failed grid resumes where it stopped,
and a grid that extends an earlier one adds only its new cells). Any other
record -- another grid's cell, the same cell with another configuration,
a file that is not a record -- refuses the whole grid with one message,
before anything is written. Each record, ``results.csv``, ``results.md``
and each plot is written to a temporary file beside it and renamed over it
(``os.replace``). If a cell fails, the grid stops (:class:`CellFailed`):
the records of the cells that finished stay (the same command resumes),
the tables and plots are not rewritten.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import stat
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .adapt import adapt
from .errors import SpecError
from .optimizer import Optimizer
from .spec import Spec, load, presets
from .tasks import Task, get_task, task_names
from .train import (atomic_output, available_cpus, check_count, check_threads,
                    nearest_directory, plan_run, resolve_spec, train, write_record)

__all__ = ["DEFAULT_OPTIMIZERS", "NONE", "Adaptation", "Variant", "CellFailed", "defines",
           "adapt_spec", "make_adaptations", "make_variants", "record_name", "max_jobs", "check_jobs",
           "check_out_dir",
           "run_ablation", "write_csv", "markdown_table", "plot_metric_vs_batch",
           "plot_trust_ratios"]

#: The default grid's optimizers.
DEFAULT_OPTIMIZERS = ("lamb", "lars", "adamw", "sgd")

#: The adaptation axis's value for an optimizer run as it is.
NONE = "none"

_FIELDS = ["task", "optimizer", "adaptation", "program", "batch_size", "epochs", "steps", "lr",
           "base_lr", "lr_rule", "warmup_steps", "metric", "value", "val_loss", "diverged",
           "train_time_s", "record"]


@dataclasses.dataclass(frozen=True)
class Adaptation:
    """A value of the grid's adaptation axis: a label and a checked adaptation program.

    ``label`` is the program's name (``trust``), made unique in the grid
    with ``#2``, ``#3`` when two files declare the same name.
    """
    label: str
    spec: Spec


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the grid: a label, a spec, optionally its base LR and LR rule, and
    optionally an adaptation applied to it.

    ``base_lr`` ``None`` means the task's tuned value for ``spec.name``, or
    else the program's default ``lr``; ``lr_rule`` ``None`` means
    :func:`layerwise.train.lr_rule_for`. With an ``adaptation`` the cell
    trains :func:`adapt_spec` of ``spec`` (the same program name, so the
    same tuned base LR and LR rule) and is named ``LABEL+ADAPTATION``.
    """
    label: str
    spec: Spec
    base_lr: float | None = None
    lr_rule: str | None = None
    adaptation: Adaptation | None = None

    @property
    def adaptation_label(self) -> str:
        """The adaptation's label, or ``"none"``."""
        return NONE if self.adaptation is None else self.adaptation.label

    @property
    def name(self) -> str:
        """The cell's name: ``label``, or ``label+adaptation`` for an adapted variant."""
        return self.label if self.adaptation is None else f"{self.label}+{self.adaptation.label}"

    def train_spec(self) -> Spec:
        """The program this variant trains: ``spec``, adapted if it has an adaptation.

        Raises:
            SpecError, ValueError: the adaptation cannot be applied to ``spec``
                (see :func:`adapt_spec`).
        """
        return self.spec if self.adaptation is None else adapt_spec(self.spec,
                                                                     self.adaptation.spec)


def defines(spec: Spec, name: str) -> bool:
    """Whether the program (with its parents) declares ``def NAME``.

    Reads ``Spec._declarations``: the checked program has its defs inlined.
    """
    decls = getattr(spec, "_declarations", None)
    return decls is not None and name in decls.defs


def adapt_spec(spec: Spec, adaptation: Spec | str) -> Spec:
    """The program ``lw.adapt`` makes of optimizer ``spec`` and ``adaptation``.

    ``lw.adapt(lw.Optimizer(params, spec), adaptation)`` with the
    adaptation's default hypers, as a spec that ``lw.Optimizer`` (and so
    :func:`layerwise.train.train`) accepts; its name is ``spec.name``.

    Raises:
        FileNotFoundError, SpecError: ``adaptation`` is missing or does not check.
        SpecError: it clashes with ``spec`` (a hyper or state of both), or ``spec``
            has no ``lr``.
        ValueError: ``adaptation`` is an optimizer, not an adaptation.
    """
    base = Optimizer([torch.zeros(1, requires_grad=True)], spec, compile=False)
    return adapt(base, adaptation, compile=False).spec


def _adaptation_presets() -> list[str]:
    """The shipped presets that are adaptations (for error messages)."""
    names = []
    for name in presets():
        try:
            if load(name).program.kind == "adaptation":
                names.append(name)
        except (SpecError, OSError):
            continue
    return names


def make_adaptations(names: Iterable[str | Spec | Adaptation | None] | None
                     ) -> list[Adaptation | None]:
    """The grid's adaptation axis from ``--adapt`` values, checked before any run.

    Each value is ``"none"`` or ``None`` (no adaptation: ``None`` in the
    result), an adaptation preset name, a path to a ``.lw`` file that starts
    with ``adaptation NAME``, a :class:`Spec` of one, or an
    :class:`Adaptation`. ``names`` empty or ``None``: ``[None]`` (the grid
    without the axis).

    Raises:
        ValueError: a value given twice, a name that is neither ``none``,
            a preset nor a file, or an optimizer program given as an
            adaptation; the message names the value.
        SpecError: an adaptation file that does not check.
    """
    out: list[Adaptation | None] = []
    seen: set = set()
    used: set[str] = set()
    for value in (list(names) if names else [NONE]):
        key = NONE if value is None or value == NONE else value
        if isinstance(key, Adaptation):
            key = key.spec
        if key in seen:
            raise ValueError(f"--adapt '{_text(key)}' is given twice")
        seen.add(key)
        if key == NONE:
            out.append(None)
            continue
        if isinstance(value, Adaptation):
            spec, label = value.spec, value.label
        else:
            try:
                spec = value if isinstance(value, Spec) else load(value)
            except FileNotFoundError:
                raise ValueError(
                    f"--adapt '{value}' is neither 'none', an adaptation preset "
                    f"({', '.join(_adaptation_presets()) or 'none shipped'}) nor a file"
                ) from None
            label = spec.name
        if spec.program.kind != "adaptation":
            raise ValueError(
                f"--adapt '{_text(value)}': '{spec.name}' is an optimizer, not an adaptation "
                f"(a program that starts with 'adaptation NAME'); adaptation presets: "
                f"{', '.join(_adaptation_presets()) or 'none shipped'}")
        unique, n = label, 1
        while unique in used or unique == NONE:
            n += 1
            unique = f"{label}#{n}"
        used.add(unique)
        out.append(Adaptation(unique, spec))
    return out


def _text(value) -> str:
    if isinstance(value, Adaptation):
        return value.label
    return value.name if isinstance(value, Spec) else str(value)


def make_variants(optimizers: Iterable[str | Spec], phis: Sequence[str] = (),
                  base_lrs: dict[str, float] | None = None,
                  lr_rule: str | None = None,
                  adaptations: Iterable[str | Spec | Adaptation | None] | None = None
                  ) -> list[Variant]:
    """The grid's rows: each optimizer, then each ``phi`` variant of each that defines
    ``phi``; each of them once per adaptation.

    ``optimizers`` are preset names, ``.lw`` paths or specs; labels are the
    program names (made unique with ``#2``, ``#3``). ``adaptations`` are
    the values of ``--adapt`` (:func:`make_adaptations`; default: none
    only, the grid without the axis); the rows of one optimizer are
    adjacent, in the order of ``adaptations``. ``base_lrs`` maps a cell
    name (``adamw+trust``), a label or a program name to a base LR (in
    that order of precedence).

    Raises:
        FileNotFoundError, SpecError: a SPEC that is missing or does not
            check, or a ``phi`` expression that does not check.
        ValueError: an optimizer SPEC that is an adaptation; ``phis`` given
            but no optimizer defines ``phi``; a ``base_lrs`` key that names
            no row; a bad adaptation (:func:`make_adaptations`); an
            adaptation that cannot be applied to an optimizer of the grid
            (every such pair named).
    """
    base_lrs = dict(base_lrs or {})
    adapts = make_adaptations(adaptations)
    plain: list[Variant] = []
    used: set[str] = set()

    def add(label: str, spec: Spec) -> None:
        unique, n = label, 1
        while unique in used:
            n += 1
            unique = f"{label}#{n}"
        used.add(unique)
        plain.append(Variant(unique, spec, None, lr_rule))

    optimizers = list(optimizers)
    specs = [resolve_spec(o) for o in optimizers]
    for o, spec in zip(optimizers, specs):
        if spec.program.kind == "adaptation":
            raise ValueError(f"--optimizer '{_text(o)}': '{spec.name}' is an adaptation, not an "
                             f"optimizer: give it with --adapt {spec.name}")
        add(spec.name, spec)
    bases = list(plain)
    for expr in phis:
        expr = " ".join(expr.split())
        targets = [v for v in bases if defines(v.spec, "phi")]
        if not targets:
            raise ValueError(f"--phi '{expr}': no optimizer of the grid defines phi "
                             f"(e.g. lamb); grid: {', '.join(v.label for v in bases)}")
        for v in targets:
            try:
                spec = v.spec.override(f"def phi(z) = {expr}", filename=f"<--phi {expr}>")
            except SpecError as err:
                raise ValueError(f"--phi '{expr}' for {v.label}: {err.message}") from None
            add(f"{v.label}[phi={expr}]", spec)
    variants = [dataclasses.replace(v, adaptation=a) for v in plain for a in adapts]
    clashes = []
    for v in variants:
        if v.adaptation is not None:
            try:
                v.train_spec()
            except (SpecError, ValueError) as err:
                message = err.message if isinstance(err, SpecError) else str(err)
                clashes.append(f"{v.adaptation.label} cannot be applied to {v.label}: {message}")
    if clashes:
        raise ValueError(f"--adapt {'; '.join(clashes)} (leave the optimizer out of "
                         "--optimizer or the adaptation out of --adapt)")
    variants = [dataclasses.replace(v, base_lr=base_lrs.get(
        v.name, base_lrs.get(v.label, base_lrs.get(v.spec.name)))) for v in variants]
    known = {v.name for v in variants} | {v.label for v in variants} | {v.spec.name
                                                                         for v in variants}
    unknown = [k for k in base_lrs if k not in known]
    if unknown:
        raise ValueError(f"--base-lr names no optimizer of the grid: {', '.join(unknown)}; "
                         f"grid: {', '.join(v.name for v in variants)}")
    return variants


# ---------------------------------------------------------------- running the grid
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


_TASKS: dict[str, Task] = {}


def _task(name: str) -> Task:
    if name not in _TASKS:
        _TASKS[name] = get_task(name)
    return _TASKS[name]


def record_name(task: str, variant: Variant, batch_size: int) -> str:
    """A cell's record path relative to the output folder.

    ``runs/TASK_LABEL_bN.json`` for an unadapted cell (the name it had
    before the adaptation axis), ``runs/TASK_LABEL+ADAPTATION_bN.json`` for
    an adapted one (``+`` never occurs in a slug, so the two cannot clash).
    """
    name = _slug(variant.label)
    if variant.adaptation is not None:
        name += "+" + _slug(variant.adaptation.label)
    return f"runs/{task}_{name}_b{batch_size}.json"


def _adaptation_entry(ad: Adaptation | None) -> dict | None:
    return None if ad is None else {"label": ad.label, "name": ad.spec.name,
                                    "file": ad.spec.filename, "program": ad.spec.to_text()}


def _row(record: dict, cell: dict) -> dict:
    """The CSV row of a cell from its record."""
    v: Variant = cell["variant"]
    cfg, final = record["config"], record["final"]
    return {"task": cell["task"], "optimizer": v.label, "adaptation": v.adaptation_label,
            "program": v.spec.name,
            "batch_size": cfg["batch_size"], "epochs": cfg["epochs"], "steps": record["steps"],
            "lr": cfg["lr"], "base_lr": cfg["base_lr"], "lr_rule": cfg["lr_rule"],
            "warmup_steps": cfg["warmup_steps"], "metric": final["metric"],
            "value": final["value"], "val_loss": final["loss"], "diverged": final["diverged"],
            "train_time_s": record["train_time_s"], "record": cell["record_rel"]}


def max_jobs() -> int:
    """The most worker processes ``run_ablation`` accepts: the CPUs this process
    may use, and at least 2 (the default of ``layerwise ablate --jobs``)."""
    return max(2, available_cpus())


def check_jobs(jobs: int, name: str = "jobs") -> int:
    """``jobs`` if it is an integer from 1 to :func:`max_jobs`.

    Raises:
        ValueError: naming ``name`` and the limit.
    """
    return check_count(jobs, name, max_jobs(), "the CPUs this process may use, at least 2")


def _run_cell(cell: dict) -> dict:
    """Run one grid cell (in a worker process or in-process); write its record; return its row."""
    task = _task(cell["task"])
    v: Variant = cell["variant"]
    record = train(task, cell["spec"], progress=False, threads=cell["threads"], label=v.name,
                   batch_size=cell["batch_size"], epochs=cell["epochs"], base_lr=v.base_lr,
                   lr_rule=v.lr_rule, seed=cell["seed"], max_steps=cell["max_steps"])
    record["adaptation"] = _adaptation_entry(v.adaptation)
    write_record(record, cell["record_path"])
    return _row(record, cell)


class CellFailed(RuntimeError):
    """A cell of the grid failed while training or writing its record; the grid stopped.

    The message names the cell and the cause, and says how many records
    were kept (they are reused when the same grid is run again).
    """


# ---------------------------------------------------------------- the output folder
_SUMMARIES = ("results.csv", "results.md", "metric_vs_batch.png")


def _differs(record: dict, cell: dict) -> str | None:
    """Why an existing record is not the record of ``cell`` (None: it is)."""
    if not isinstance(record, dict):
        return "it is not a run record"
    cfg, opt = record.get("config"), record.get("optimizer")
    if not isinstance(cfg, dict) or not isinstance(opt, dict) or not isinstance(
            record.get("final"), dict):
        return "it is not a run record"
    plan = dataclasses.asdict(cell["plan"])
    for key, value in plan.items():
        if key not in cfg:
            return f"it has no {key}"
        if cfg[key] != value:
            return f"its {key} is {cfg[key]!r}, this grid's {value!r}"
    if opt.get("program") != cell["spec"].to_text():
        return "its optimizer program differs"
    if record.get("adaptation") != _adaptation_entry(cell["variant"].adaptation):
        return "its adaptation differs"
    try:
        _row(record, cell)
    except (KeyError, TypeError):
        return "it is not a complete run record"
    return None


def check_out_dir(out_dir: str | Path, cells: Sequence[dict], tasks: Sequence[str]
                  ) -> dict[str, dict]:
    """Check the output folder before any run; return the records to reuse.

    ``cells`` are the grid's cells (``record_rel``, ``plan``, ``spec``,
    ``variant``); see the module docstring for what is accepted.

    Returns:
        ``{record_rel: record}`` of the cells whose record is already in
        ``out_dir`` with the same configuration.

    Raises:
        ValueError: one line starting ``--out DIR:`` -- not a directory,
            not writable, an output name taken by a directory or device, or
            a record in ``runs/`` that is not one of this grid's cells with
            the same configuration (the grid would change an earlier run's
            records, or leave ``results.csv`` inconsistent with ``runs/``).
    """
    out = Path(out_dir)
    label = f"--out {out}"
    try:
        st = os.stat(out)
    except FileNotFoundError:
        nearest_directory(out, label)
        return {}
    except (OSError, ValueError) as err:
        if isinstance(err, NotADirectoryError):
            nearest_directory(out, label)
        raise ValueError(f"{label}: cannot use it: "
                         f"{getattr(err, 'strerror', None) or err}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{label}: not a directory")
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"{label}: cannot write in it (permission denied)")
    names = [*_SUMMARIES, *(f"trust_ratios_{t}.png" for t in tasks)]
    for name in names:
        p = out / name
        if (p.exists() or p.is_symlink()) and not p.is_file():
            raise ValueError(f"{label}: {name} exists and is not a regular file")
    runs = out / "runs"
    if not runs.exists() and not runs.is_symlink():
        return {}
    if not runs.is_dir():
        raise ValueError(f"{label}: runs exists and is not a directory")
    if not os.access(runs, os.W_OK | os.X_OK):
        raise ValueError(f"{label}: cannot write in runs/ (permission denied)")
    by_rel = {c["record_rel"]: c for c in cells}
    reuse: dict[str, dict] = {}
    for p in sorted(runs.iterdir()):
        if not p.name.endswith(".json"):
            continue
        rel = f"runs/{p.name}"
        cell = by_rel.get(rel)
        if cell is None:
            raise ValueError(f"{label}: it holds records of another grid ({rel} is not a cell "
                             "of this one); give another --out, or move them away")
        if not p.is_file():
            raise ValueError(f"{label}: {rel} is not a regular file")
        try:
            record = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            why = "it is not a run record (not readable JSON)"
        else:
            why = _differs(record, cell)
        if why is not None:
            raise ValueError(f"{label}: {rel} is an earlier run of {_cell_name(cell)} with "
                             f"another configuration ({why}); give another --out, or move it "
                             "away")
        reuse[rel] = record
    return reuse


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def run_ablation(out_dir: str | Path, variants: Sequence[Variant],
                 tasks: Sequence[str] | None = None,
                 batch_sizes: Sequence[int] | None = None, epochs: int | None = None,
                 seed: int = 0, jobs: int = 2, threads: int = 1,
                 progress: bool = True, max_steps: int | None = None) -> list[dict]:
    """Run the grid, write ``results.csv``, ``results.md``, the plots and run records.

    Args:
        out_dir: output folder (created).
        variants: the rows (:func:`make_variants`; an adapted variant is the
            optimizer at one value of the adaptation axis).
        tasks: task names (default: every built-in task).
        batch_sizes: the columns, for every task (default: each task's
            ``ablate_batch_sizes``).
        epochs: epochs per run (default: each task's ``ablate_epochs``).
        seed: model-initialisation and batch-order seed of every run.
        jobs: worker processes (1: run in this process).
        threads: torch threads per run.
        progress: a tqdm bar over the grid's cells (stderr).
        max_steps: cut every run at this many steps (smoke tests).

    Returns:
        One row per cell (the CSV's rows), in grid order: task, then
        variant (an optimizer's adaptations adjacent), then batch size.
        Each row has the optimizer's label (``optimizer``), the adaptation's
        (``adaptation``, ``"none"`` for an unadapted cell) and the record's
        path (``record``, :func:`record_name`).

    A cell whose record is already in ``out_dir`` with the same
    configuration is not run again (:func:`check_out_dir`).

    Raises:
        UnknownTaskError, ValueError: bad input, found before any run
            and before anything is written (unknown task, batch size larger
            than a training set, an adaptation that does not apply, two
            cells with the same record path, a thread count above the
            CPUs, an output folder that cannot be used or holds records of
            another grid or configuration, ...).
        CellFailed: a cell failed; the records of finished cells are kept.
    """
    from tqdm.auto import tqdm

    check_threads(threads, "threads")
    check_jobs(jobs, "jobs")
    out = Path(out_dir)
    tasks = list(tasks) if tasks else task_names()
    specs = {}
    for v in variants:
        if v not in specs:
            specs[v] = v.train_spec()
    cells = []
    paths: dict[str, str] = {}
    for tname in tasks:
        task = _task(tname)
        sizes = list(batch_sizes) if batch_sizes else list(task.ablate_batch_sizes)
        n_epochs = epochs if epochs is not None else task.ablate_epochs
        for v in variants:
            for b in sizes:
                plan = plan_run(task, specs[v], batch_size=b, epochs=n_epochs,
                                base_lr=v.base_lr, lr_rule=v.lr_rule, seed=seed, label=v.name,
                                max_steps=max_steps)   # validate everything before any run
                rel = record_name(tname, v, b)
                if rel in paths:
                    raise ValueError(f"two cells would write {rel}: {paths[rel]} and "
                                     f"{tname} {v.name} b{b} (give the variants other labels, "
                                     "or a batch size once)")
                paths[rel] = f"{tname} {v.name} b{b}"
                cells.append({"task": tname, "variant": v, "spec": specs[v], "batch_size": b,
                              "epochs": n_epochs, "seed": seed, "threads": threads,
                              "max_steps": max_steps, "record_path": str(out / rel),
                              "record_rel": rel, "plan": plan})
    reuse = check_out_dir(out, cells, tasks)
    if reuse and progress:
        print(f"ablate: reusing {len(reuse)} of {len(cells)} records already in {out / 'runs'} "
              "(same configuration)", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    rows: list[dict | None] = [None] * len(cells)
    for i, cell in enumerate(cells):
        if cell["record_rel"] in reuse:
            rows[i] = _row(reuse[cell["record_rel"]], cell)
    # slowest first (small batches: most optimizer steps), so workers finish together
    order = sorted((i for i in range(len(cells)) if rows[i] is None),
                   key=lambda i: (-_task(cells[i]["task"]).relative_cost * cells[i]["epochs"],
                                  cells[i]["batch_size"]))
    started = time.perf_counter()
    bar = tqdm(total=len(order), disable=not progress, unit="run", file=sys.stderr,
               desc="ablate")

    def failed(i: int, err: BaseException) -> CellFailed:
        kept = sum(r is not None for r in rows)
        text = (str(err).strip().splitlines() or [""])[0]
        return CellFailed(f"{_cell_name(cells[i])} failed ({type(err).__name__}"
                          f"{': ' + text if text else ''}); the grid stopped; {kept} of "
                          f"{len(cells)} records are in {out / 'runs'} and are reused when the "
                          "same command runs again")

    try:
        if jobs <= 1 or len(order) <= 1:
            for i in order:
                bar.set_postfix_str(_cell_name(cells[i]))
                try:
                    rows[i] = _run_cell(cells[i])
                except Exception as err:
                    raise failed(i, err) from err
                bar.update(1)
        elif order:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(jobs, len(order)), mp_context=ctx) as pool:
                futures = {pool.submit(_run_cell, cells[i]): i for i in order}
                try:
                    for fut in as_completed(futures):
                        i = futures[fut]
                        try:
                            rows[i] = fut.result()
                        except Exception as err:
                            raise failed(i, err) from err
                        bar.set_postfix_str(_cell_name(cells[i]))
                        bar.update(1)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()
    done = [r for r in rows if r is not None]
    with atomic_output(out / "results.csv") as tmp:
        write_csv(done, tmp)
    _write_text(out / "results.md", markdown_table(done, wall_time_s=time.perf_counter()
                                                   - started))
    with atomic_output(out / "metric_vs_batch.png") as tmp:
        plot_metric_vs_batch(done, tmp)
    for tname in tasks:
        record = _trust_run(out, [r for r in done if r["task"] == tname])
        if record is not None:
            with atomic_output(out / f"trust_ratios_{tname}.png") as tmp:
                plot_trust_ratios(record, tmp)
    return done


def _cell_name(cell: dict) -> str:
    return f"{cell['task']} {cell['variant'].name} b{cell['batch_size']}"


def _adaptation(row: dict) -> str:
    """A row's adaptation; ``"none"`` for rows written before the adaptation axis."""
    return row.get("adaptation") or NONE


def _row_name(row: dict) -> str:
    ad = _adaptation(row)
    return row["optimizer"] if ad == NONE else f"{row['optimizer']}+{ad}"


def _trust_run(out: Path, rows: list[dict]) -> dict | None:
    """The record of the first row (optimizer and adaptation) with trust ratios, at its
    largest batch size."""
    by_name: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by_name.setdefault((r["optimizer"], _adaptation(r)), []).append(r)
    for rs in by_name.values():
        r = max(rs, key=lambda r: r["batch_size"])
        record = json.loads((out / r["record"]).read_text(encoding="utf-8"))
        if any(record["trust_ratios"]["values"].values()):
            return record
    return None


# ---------------------------------------------------------------- outputs
def write_csv(rows: list[dict], path: str | Path) -> None:
    """One line per grid cell with the columns of ``_FIELDS`` (empty for None)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in _FIELDS})


def _fmt_metric(metric: str, value: float | None) -> str:
    if value is None:
        return "diverged"
    return f"{100 * value:.1f}" if metric == "accuracy" else f"{value:.3f}"


_METRIC_TITLE = {"accuracy": "validation accuracy, % (higher is better)",
                 "bits_per_byte": "validation bits per byte (lower is better)"}


def markdown_table(rows: list[dict], wall_time_s: float | None = None) -> str:
    """The results as markdown: per task, optimizer (x adaptation) x batch size -> validation
    metric.

    Cells show the metric (accuracy in %, or bits per byte) and, in
    brackets, the validation cross-entropy in nats; the best cell of each
    column is bold; ``diverged`` marks a run whose loss became non-finite.
    A task whose rows have an adaptation other than ``none`` gets an
    ``adaptation`` column (one table row per optimizer and adaptation);
    without one the table is as before the adaptation axis. Rows without an
    ``adaptation`` key count as ``none``.
    """
    lines: list[str] = []
    for tname in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == tname]
        task = get_task(tname)
        metric = rs[0]["metric"]
        sizes = sorted({r["batch_size"] for r in rs})
        keys = list(dict.fromkeys((r["optimizer"], _adaptation(r)) for r in rs))
        adapted = any(ad != NONE for _, ad in keys)
        cell = {(r["optimizer"], _adaptation(r), r["batch_size"]): r for r in rs}
        best = {}
        for b in sizes:
            vals = [cell[(*k, b)]["value"] for k in keys
                    if (*k, b) in cell and cell[(*k, b)]["value"] is not None]
            if vals:
                best[b] = max(vals) if task.higher_is_better else min(vals)
        steps = {b: next(r["steps"] for r in rs if r["batch_size"] == b) for b in sizes}
        head = ["optimizer", *(["adaptation"] if adapted else []), "LR rule", "base LR"]
        lines.append(f"### {tname}: {_METRIC_TITLE.get(metric, metric)}")
        lines.append("")
        lines.append(f"{task.summary}; {rs[0]['epochs']} epoch(s) per run; "
                     "cells: metric (validation loss, nats).")
        lines.append("")
        lines.append("| " + " | ".join(head) + " | "
                     + " | ".join(f"B={b} ({steps[b]} steps)" for b in sizes) + " |")
        lines.append("| " + " | ".join("---" for _ in head) + " | "
                     + " | ".join("---" for _ in sizes) + " |")
        for key in keys:
            first = next(r for r in rs if (r["optimizer"], _adaptation(r)) == key)
            cells = []
            for b in sizes:
                r = cell.get((*key, b))
                if r is None:
                    cells.append("")
                    continue
                text = _fmt_metric(metric, r["value"])
                if r["value"] is not None:
                    text += f" ({r['val_loss']:.3f})"
                    if r["value"] == best.get(b):
                        text = f"**{text}**"
                cells.append(text)
            lead = [key[0], *([key[1]] if adapted else []), first["lr_rule"],
                    f"{first['base_lr']:g}"]
            lines.append("| " + " | ".join(lead) + " | " + " | ".join(cells) + " |")
        lines.append("")
    if wall_time_s is not None:
        lines.append(f"Wall time of the grid: {wall_time_s:.0f} s.")
        lines.append("")
    return "\n".join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_metric_vs_batch(rows: list[dict], path: str | Path) -> None:
    """PNG: validation metric against batch size (log scale), one line per optimizer and
    adaptation, one panel per task.

    An optimizer keeps its colour across adaptations; each adaptation has a
    line style (solid for ``none``) and its lines are labelled
    ``OPTIMIZER+ADAPTATION``. Diverged runs are left out of their line and
    named in the legend.
    """
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    styles = ["-", "--", ":", "-."]
    adaptations = list(dict.fromkeys([NONE, *(_adaptation(r) for r in rows)]))
    style = {ad: styles[i % len(styles)] for i, ad in enumerate(adaptations)}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    colour = {o: colours[i % len(colours)] for i, o in enumerate(optimizers)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4), squeeze=False)
    for ax, tname in zip(axes[0], tasks):
        rs = [r for r in rows if r["task"] == tname]
        metric = rs[0]["metric"]
        scale = 100.0 if metric == "accuracy" else 1.0
        for opt, ad in dict.fromkeys((r["optimizer"], _adaptation(r)) for r in rs):
            mine = [r for r in rs if (r["optimizer"], _adaptation(r)) == (opt, ad)]
            label = _row_name(mine[0])
            pts = sorted((r["batch_size"], r["value"] * scale) for r in mine
                         if r["value"] is not None)
            lost = sorted(r["batch_size"] for r in mine if r["value"] is None)
            if lost:
                label += f" (diverged at B={', '.join(map(str, lost))})"
            ax.plot(*(zip(*pts) if pts else ([], [])), marker="o", label=label,
                    color=colour[opt], linestyle=style[ad])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["batch_size"] for r in rs}))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("batch size")
        ax.set_ylabel(_METRIC_TITLE.get(metric, metric))
        ax.set_title(f"{tname} ({rs[0]['epochs']} epoch(s) per run)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_trust_ratios(record: dict, path: str | Path) -> None:
    """PNG: the per-layer trust ratios of one run (first watched name) over its steps, log scale.

    Raises:
        ValueError: if the record has no watched values.
    """
    plt = _pyplot()
    values = record["trust_ratios"]["values"]
    name = next((n for n, per in values.items() if per), None)
    if name is None:
        raise ValueError("the run recorded no trust ratios")
    per = values[name]
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, (param, xs) in enumerate(per.items()):
        ys = [float("nan") if x is None else x for x in xs]
        ax.plot(range(1, len(ys) + 1), ys, color=cmap(i / max(1, len(per) - 1)), lw=1,
                label=param)
    cfg = record["config"]
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"'{name}' per layer")
    ax.set_title(f"{record['task']['name']} {cfg['label']} batch {cfg['batch_size']}: "
                 f"per-layer trust ratio ({cfg['total_steps']} steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=1 if len(per) <= 12 else 2, loc="center left",
              bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
