"""Large-batch ablations: a task x optimizer x adaptation x batch-size grid, several seeds,
two protocols, tables and plots.

``layerwise ablate`` trains every run of the grid with
:func:`layerwise.train.train` for the same number of epochs, so a larger
batch means proportionally fewer steps (the fixed-epoch budget of the LARS
and LAMB papers). The rows of the grid are :mod:`layerwise.variants`.

Seeds: ``seeds`` runs per cell with seeds ``seed, seed + 1, ...`` (model
initialisation and batch order); tables report mean +- sample standard
deviation.

Protocols (named, as reviewers of large-batch papers ask):

* ``scaled``: one peak learning rate per batch size, ``base_lr * (B / B0)
  ** p`` (:mod:`layerwise.train`: p = 1 for sgd/lars/larc, 1/2 otherwise)
  from a base LR tuned at the task's smallest batch ``B0``
  (``docs/lr_sweep.md``); warm-up 10% of the steps.
* ``tuned``: per-batch-size tuning (Nado et al. 2021, "A Large Batch
  Optimizer Reality Check", arXiv:2102.06356): every cell runs each
  learning rate of ``lr_grid`` (factors of the scaled LR) and each warm-up
  of ``warmup_grid`` (fractions of the run's steps; default the 10%
  warm-up), every seed; the candidate with the best mean metric on the val
  split is chosen and the tables report its test metric
  (:mod:`layerwise.report`).

Every run evaluates the test split every ``eval_every`` steps (default:
about 20 times a run), so the tables also give steps to a target
(Shallue et al. 2018) when the task has one or ``targets`` gives it.

Records and reuse (grids that grow and move). Each run has a digest: the
SHA-256 of its configuration -- the task's ref, the optimizer program's
text, the adaptation's program text and every resolved number of
:class:`layerwise.train.RunPlan` (batch size, epochs, seed, learning rate,
warm-up, hypers, evaluation interval, ...). Its record is
``runs/TASK_LABEL[+ADAPTATION]_bN_sSEED_DIGEST.json`` where ``DIGEST`` is
the digest's first 12 hex digits. A run whose record is already in ``DIR``
is not run again, so the same command does no training and prints the
same table, and a grid extended by a batch size, a seed or an optimizer
trains only the new runs. Records of other grids in ``DIR`` are left
alone. A file at a run's record path that is not that run's record
refuses the grid before anything runs; records are written atomically and
a failed run writes nothing, so no run ever rewrites another run's record.

``plan=True`` (``--plan``) writes nothing but the grid's runs that have no
record yet, one shell command per line (``layerwise run-cell --out DIR
'JSON'``), for any scheduler; :func:`run_cell_json` runs one; ``layerwise
report DIR`` (:func:`write_report`) rebuilds tables and plots from all the
records in ``DIR``.

Outputs in ``DIR``: ``results.csv`` (one row per run), ``summary.csv``
(one row per cell), ``results.md``, ``metric_vs_batch.png`` (error bars),
``steps_to_target.png`` (log-log, with perfect scaling),
``trust_ratios_TASK.png`` (lines and a layer x step heatmap) and
``runs/*.json``. Runs execute in ``jobs`` spawned worker processes, each on
``threads`` torch threads, so results do not depend on ``jobs``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import stat
import sys
from pathlib import Path
from typing import IO, Sequence

from .report import (read_records, run_row, summarize, markdown, write_cells_csv,
                     write_runs_csv)
from .spec import Spec, load
from .tasks import Task, get_task, task_names
from .train import (RunPlan, atomic_output, available_cpus, check_count, check_threads,
                    nearest_directory, plan_run, resolve_spec, train, write_record)
from .variants import (DEFAULT_OPTIMIZERS, NONE, Adaptation, Variant, adapt_spec, defines,
                       make_adaptations, make_variants)

__all__ = ["DEFAULT_OPTIMIZERS", "NONE", "PROTOCOLS", "DEFAULT_LR_GRID", "Adaptation", "Variant",
           "Run", "CellFailed", "defines", "adapt_spec", "make_adaptations", "make_variants",
           "plan_grid", "check_plan_path", "max_jobs", "check_jobs", "check_out_dir", "run_ablation",
           "run_cell_json", "write_plan", "write_report"]

#: The protocols of ``--protocol``.
PROTOCOLS = ("scaled", "tuned")

#: Learning-rate factors (of the scaled LR) of ``--protocol tuned`` when none are given.
DEFAULT_LR_GRID = (0.25, 0.5, 1.0, 2.0, 4.0)

_SUMMARIES = ("results.csv", "summary.csv", "results.md", "metric_vs_batch.png",
              "steps_to_target.png")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the grid: a cell at one learning rate, warm-up and seed.

    ``lr_factor`` multiplies the scaled LR (1 for ``scaled``);
    ``warmup_fraction`` ``None`` means the default warm-up. ``plan`` is the
    resolved configuration, ``digest`` its SHA-256 (module docstring),
    ``rel`` the record's path relative to the output folder.
    """
    task: str
    variant: Variant
    spec: Spec
    batch_size: int
    seed: int
    lr_factor: float
    warmup_fraction: float | None
    epochs: int | None
    max_steps: int | None
    eval_every: int | None
    plan: RunPlan
    digest: str
    rel: str

    @property
    def name(self) -> str:
        """``TASK LABEL bN seed S`` (and the LR factor / warm-up of a tuned candidate)."""
        extra = "" if self.lr_factor == 1 else f" lr x{self.lr_factor:g}"
        if self.warmup_fraction is not None:
            extra += f" warm-up {self.warmup_fraction:g}"
        return f"{self.task} {self.variant.name} b{self.batch_size} seed {self.seed}{extra}"


class CellFailed(RuntimeError):
    """A run of the grid failed while training or writing its record; the grid stopped.

    The message names the run and the cause, and says how many records are
    in the folder (they are reused when the same grid is run again).
    """


# ---------------------------------------------------------------- planning
_TASKS: dict[str, Task] = {}


def _task(ref: str) -> Task:
    if ref not in _TASKS:
        _TASKS[ref] = get_task(ref)
    return _TASKS[ref]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _adaptation_entry(ad: Adaptation | None) -> dict | None:
    return None if ad is None else {"label": ad.label, "name": ad.spec.name,
                                    "file": ad.spec.filename, "program": ad.spec.to_text()}


def _digest(task: Task, v: Variant, plan: RunPlan) -> str:
    ad = v.adaptation
    config = {"task": getattr(task, "ref", task.name), "program": v.spec.to_text(),
              "adaptation": None if ad is None else {"label": ad.label,
                                                     "program": ad.spec.to_text()},
              "plan": dataclasses.asdict(plan)}
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _make_run(task: Task, v: Variant, spec: Spec, batch_size: int, seed: int,
              lr_factor: float, warmup_fraction: float | None, epochs: int | None,
              max_steps: int | None, eval_every: int | None) -> Run:
    kw = dict(batch_size=batch_size, epochs=epochs, base_lr=v.base_lr, lr_rule=v.lr_rule,
              seed=seed, label=v.name, max_steps=max_steps, eval_every=eval_every)
    plan = plan_run(task, spec, **kw)
    if lr_factor != 1 or warmup_fraction is not None:
        warmup = (None if warmup_fraction is None
                  else int(round(warmup_fraction * plan.total_steps)))
        # a tuned candidate: a given LR (and warm-up); it keeps the scaled plan's base LR
        plan = dataclasses.replace(plan_run(task, spec, **{**kw, "lr": plan.lr * lr_factor,
                                                           "warmup_steps": warmup}),
                                   base_lr=plan.base_lr)
    digest = _digest(task, v, plan)
    name = _slug(v.label) + ("" if v.adaptation is None else "+" + _slug(v.adaptation.label))
    rel = f"runs/{task.name}_{name}_b{batch_size}_s{seed}_{digest[:12]}.json"
    return Run(getattr(task, "ref", task.name), v, spec, batch_size, seed, lr_factor,
               warmup_fraction, epochs, max_steps, eval_every, plan, digest, rel)


def _check_grid_numbers(protocol: str, seeds: int, lr_grid, warmup_grid) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol '{protocol}': known protocols: {', '.join(PROTOCOLS)}")
    check_count(seeds, "--seeds", 1000, "at most 1000")
    if protocol == "scaled" and (lr_grid or warmup_grid):
        raise ValueError("--lr-grid and --warmup-grid belong to --protocol tuned "
                         "(the scaled protocol runs one LR per batch size)")
    for f in lr_grid or ():
        if not (isinstance(f, (int, float)) and 0 < f < float("inf")):
            raise ValueError(f"--lr-grid {f}: factors must be positive finite numbers")
    for f in warmup_grid or ():
        if not (isinstance(f, (int, float)) and 0 <= f <= 1):
            raise ValueError(f"--warmup-grid {f}: fractions of the run's steps, from 0 to 1")
    for name, grid in (("--lr-grid", lr_grid), ("--warmup-grid", warmup_grid)):
        if grid and len(set(grid)) != len(grid):
            raise ValueError(f"{name}: a value is given twice")


def plan_grid(variants: Sequence[Variant],
              tasks: Sequence[str] | None = None, batch_sizes: Sequence[int] | None = None,
              epochs: int | None = None, seed: int = 0, seeds: int = 1,
              protocol: str = "scaled", lr_grid: Sequence[float] | None = None,
              warmup_grid: Sequence[float] | None = None, max_steps: int | None = None,
              eval_every: int | None = None) -> list[Run]:
    """Every run of the grid, resolved and checked, in grid order (task, variant, batch
    size, candidate, seed). See :func:`run_ablation` for the arguments.

    Raises:
        UnknownTaskError, ValueError, SpecError: bad input (unknown task, batch size
            larger than a training set, bad protocol options, a seed out of range,
            two runs with one record path, ...), before anything is written.
    """
    _check_grid_numbers(protocol, seeds, lr_grid, warmup_grid)
    factors = list(lr_grid or (DEFAULT_LR_GRID if protocol == "tuned" else (1.0,)))
    warmups = list(warmup_grid or (None,))
    specs: dict[Variant, Spec] = {}
    for v in variants:
        if v not in specs:
            specs[v] = v.train_spec()
    runs: list[Run] = []
    seen: dict[str, str] = {}
    for ref in (list(tasks) if tasks else task_names()):
        task = _task(ref)
        sizes = list(batch_sizes) if batch_sizes else list(task.ablate_batch_sizes)
        n_epochs = epochs if epochs is not None else task.ablate_epochs
        for v in variants:
            for b in sizes:
                for f in factors:
                    for w in warmups:
                        for s in range(seed, seed + seeds):
                            run = _make_run(task, v, specs[v], b, s, f, w, n_epochs, max_steps,
                                            eval_every)
                            if run.rel in seen:
                                raise ValueError(f"two runs would write {run.rel}: "
                                                 f"{seen[run.rel]} and {run.name} (give a "
                                                 "batch size, factor or variant once)")
                            seen[run.rel] = run.name
                            runs.append(run)
    return runs


# ---------------------------------------------------------------- the output folder
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


def _why_not(record, run: Run) -> str | None:
    """Why an existing file's content is not ``run``'s record (None: it is)."""
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict) or \
            not isinstance(record.get("final"), dict):
        return "it is not a run record"
    if (record.get("cell") or {}).get("digest") != run.digest:
        return "its configuration differs"
    plan = dataclasses.asdict(run.plan)
    if any(record["config"].get(k) != v for k, v in plan.items()):
        return "its configuration differs"
    try:
        run_row(record, run.rel)
    except (KeyError, TypeError, AttributeError):
        return "it is not a complete run record"
    return None


def _load_existing(path: Path) -> tuple[object, bool]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), True
    except (OSError, ValueError, RecursionError):
        return None, False


def check_out_dir(out_dir: str | Path, runs: Sequence[Run], tasks: Sequence[str]
                  ) -> dict[str, dict]:
    """Check the output folder before any run; return the records to reuse.

    Returns:
        ``{rel: record}`` of the runs whose record is already in ``out_dir``.

    Raises:
        ValueError: one line starting ``--out DIR:`` -- not a directory, not
            writable, an output name taken by a directory or device, or a
            file at a run's record path that is not that run's record.
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
    for name in (*_SUMMARIES, *(f"trust_ratios_{_task(t).name}.png" for t in tasks)):
        p = out / name
        if (p.exists() or p.is_symlink()) and not p.is_file():
            raise ValueError(f"{label}: {name} exists and is not a regular file")
    folder = out / "runs"
    if not folder.exists() and not folder.is_symlink():
        return {}
    if not folder.is_dir():
        raise ValueError(f"{label}: runs exists and is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{label}: cannot write in runs/ (permission denied)")
    reuse: dict[str, dict] = {}
    for run in runs:
        p = out / run.rel
        if not (p.exists() or p.is_symlink()):
            continue
        if not p.is_file():
            raise ValueError(f"{label}: {run.rel} is not a regular file")
        record, ok = _load_existing(p)
        why = _why_not(record, run) if ok else "it is not a run record (not readable JSON)"
        if why is not None:
            raise ValueError(f"{label}: {run.rel} is not the record of {run.name} ({why}); "
                             "move it away")
        reuse[run.rel] = record
    return reuse


# ---------------------------------------------------------------- running
def _run_one(run: Run, out: str, threads: int) -> dict:
    """Train one run (in a worker process or in-process) and write its record."""
    v = run.variant
    record = train(_task(run.task), run.spec, progress=False, threads=threads, plan=run.plan)
    record["adaptation"] = _adaptation_entry(v.adaptation)
    record["cell"] = {"digest": run.digest, "lr_factor": run.lr_factor,
                      "warmup_fraction": run.warmup_fraction}
    write_record(record, Path(out) / run.rel)
    return record


def run_ablation(out_dir: str | Path, variants: Sequence[Variant],
                 tasks: Sequence[str] | None = None,
                 batch_sizes: Sequence[int] | None = None, epochs: int | None = None,
                 seed: int = 0, jobs: int = 2, threads: int = 1,
                 progress: bool = True, max_steps: int | None = None, seeds: int = 1,
                 protocol: str = "scaled", lr_grid: Sequence[float] | None = None,
                 warmup_grid: Sequence[float] | None = None, eval_every: int | None = None,
                 targets: dict[str | None, float] | None = None) -> list[dict]:
    """Run the grid (reusing the records already in ``out_dir``), then write the
    tables and plots of its runs.

    Args:
        out_dir: output folder (created).
        variants: the rows (:func:`layerwise.variants.make_variants`).
        tasks: task refs (names, ``FILE.py[:FUNC]``, ``MODULE:FUNC``; default: every
            built-in task).
        batch_sizes: the columns, for every task (default: each task's
            ``ablate_batch_sizes``).
        epochs: epochs per run (default: each task's ``ablate_epochs``).
        seed, seeds: runs per cell with seeds ``seed .. seed + seeds - 1``.
        protocol: ``"scaled"`` or ``"tuned"`` (module docstring).
        lr_grid: LR factors of the tuned protocol (default :data:`DEFAULT_LR_GRID`).
        warmup_grid: warm-up fractions of the tuned protocol (default: 10%).
        eval_every: steps between test evaluations (default: about 20 a run).
        targets: steps-to-target targets, ``{task name or None (all): value}``;
            default: each task's ``target``.
        jobs: worker processes (1: run in this process).
        threads: torch threads per run.
        progress: a tqdm bar over the runs (stderr).
        max_steps: cut every run at this many steps (smoke tests).

    Returns:
        One row per run (``results.csv``'s rows, :func:`layerwise.report.run_row`),
        in grid order.

    Raises:
        UnknownTaskError, ValueError, SpecError: bad input, found before any run and
            before anything is written (see :func:`plan_grid`, :func:`check_out_dir`).
        CellFailed: a run failed; the records of finished runs are kept.
    """
    from tqdm.auto import tqdm

    check_threads(threads, "threads")
    check_jobs(jobs, "jobs")
    tasks = list(tasks) if tasks else task_names()
    runs = plan_grid(variants, tasks, batch_sizes, epochs, seed, seeds, protocol,
                     lr_grid, warmup_grid, max_steps, eval_every)
    out = Path(out_dir)
    reuse = check_out_dir(out, runs, tasks)
    if reuse and progress:
        print(f"ablate: reusing {len(reuse)} of {len(runs)} records already in "
              f"{out / 'runs'} (same configuration)", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    records: dict[str, dict] = dict(reuse)
    # slowest first (small batches: most optimizer steps), so workers finish together
    todo = sorted((r for r in runs if r.rel not in reuse),
                  key=lambda r: (-_task(r.task).relative_cost * r.plan.epochs, r.batch_size))
    bar = tqdm(total=len(todo), disable=not progress or not todo, unit="run", file=sys.stderr,
               desc="ablate")

    def failed(run: Run, err: BaseException) -> CellFailed:
        text = (str(err).strip().splitlines() or [""])[0]
        return CellFailed(f"{run.name} failed ({type(err).__name__}"
                          f"{': ' + text if text else ''}); the grid stopped; {len(records)} "
                          f"of {len(runs)} records are in {out / 'runs'} and are reused when "
                          "the same command runs again")

    try:
        if jobs <= 1 or len(todo) <= 1:
            for run in todo:
                bar.set_postfix_str(run.name)
                try:
                    records[run.rel] = _run_one(run, str(out), threads)
                except Exception as err:
                    raise failed(run, err) from err
                bar.update(1)
        elif todo:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx) as pool:
                futures = {pool.submit(_run_one, r, str(out), threads): r for r in todo}
                try:
                    for fut in as_completed(futures):
                        run = futures[fut]
                        try:
                            records[run.rel] = fut.result()
                        except Exception as err:
                            raise failed(run, err) from err
                        bar.set_postfix_str(run.name)
                        bar.update(1)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()
    return write_report(out, {r.rel: records[r.rel] for r in runs}, targets)


# ---------------------------------------------------------------- plan and run-cell
def _cell_json(run: Run) -> dict:
    v = run.variant
    ad = v.adaptation
    if v.source is None or (ad is not None and ad.source is None):
        raise ValueError(f"--plan: {run.name}: its program was given as a Spec, not a preset "
                         "name or file, so a command cannot rebuild it")
    return {"task": run.task, "optimizer": v.source, "phi": v.phi, "label": v.label,
            "adaptation": None if ad is None else ad.source,
            "adaptation_label": None if ad is None else ad.label,
            "base_lr": v.base_lr, "lr_rule": v.lr_rule, "batch_size": run.batch_size,
            "seed": run.seed, "lr_factor": run.lr_factor,
            "warmup_fraction": run.warmup_fraction, "epochs": run.epochs,
            "max_steps": run.max_steps, "eval_every": run.eval_every, "digest": run.digest}


def check_plan_path(path: str | Path) -> Path:
    """``path`` if a plan can be written there (a new file, or a regular file to replace).

    Raises:
        ValueError: ``--plan PATH: ...`` for a directory, device or unwritable folder.
    """
    p = Path(path)
    if (p.exists() or p.is_symlink()) and not p.is_file():
        raise ValueError(f"--plan {path}: not a regular file")
    nearest_directory(p, f"--plan {path}")
    return p


def write_plan(out_dir: str | Path, runs: Sequence[Run], stream: IO[str],
               threads: int = 1) -> int:
    """Write one ``layerwise run-cell`` command per run that has no record in ``out_dir``
    yet; return how many were written.

    Each line is ``layerwise run-cell --out DIR --threads N 'JSON'`` (shell-quoted),
    where JSON names the task, the optimizer (preset name or absolute path), its
    ``phi``, the adaptation, the batch size, seed, LR factor, warm-up and the run's
    digest; the command refuses to run if the program or the task now resolve to
    another configuration.

    Raises:
        ValueError: a variant made from a Spec object (nothing to name in a command).
    """
    reuse = check_out_dir(out_dir, runs, sorted({r.task for r in runs}))
    n = 0
    for run in runs:
        if run.rel in reuse:
            continue
        payload = json.dumps(_cell_json(run), sort_keys=True, separators=(",", ":"))
        stream.write(f"layerwise run-cell --out {shlex.quote(str(out_dir))} --threads "
                     f"{threads} {shlex.quote(payload)}\n")
        n += 1
    return n


def run_cell_json(out_dir: str | Path, text: str, threads: int = 1) -> tuple[str, bool]:
    """Run the run described by one ``--plan`` line's JSON; return ``(record path,
    trained)``; ``trained`` is False when its record was already there.

    Raises:
        ValueError: the JSON is malformed, or the run it names now resolves to
            another configuration than when the plan was written (digest differs).
        SpecError, FileNotFoundError, UnknownTaskError: the program, adaptation or
            task cannot be loaded.
    """
    try:
        cfg = json.loads(text)
        keys = {"task", "optimizer", "phi", "label", "adaptation", "adaptation_label",
                "base_lr", "lr_rule", "batch_size", "seed", "lr_factor", "warmup_fraction",
                "epochs", "max_steps", "eval_every", "digest"}
        if not isinstance(cfg, dict) or set(cfg) != keys:
            raise ValueError
    except ValueError:
        raise ValueError("run-cell: expects one JSON object as written by "
                         "'layerwise ablate --plan'") from None
    spec = resolve_spec(cfg["optimizer"])
    if cfg["phi"] is not None:
        spec = spec.override(f"def phi(z) = {cfg['phi']}", filename=f"<--phi {cfg['phi']}>")
    ad = None
    if cfg["adaptation"] is not None:
        ad = Adaptation(cfg["adaptation_label"], load(cfg["adaptation"]), cfg["adaptation"])
    v = Variant(cfg["label"], spec, cfg["base_lr"], cfg["lr_rule"], ad, cfg["optimizer"],
                cfg["phi"])
    task = _task(cfg["task"])
    run = _make_run(task, v, v.train_spec(), cfg["batch_size"], cfg["seed"], cfg["lr_factor"],
                    cfg["warmup_fraction"], cfg["epochs"], cfg["max_steps"], cfg["eval_every"])
    if run.digest != cfg["digest"]:
        raise ValueError(f"run-cell: {run.name} now resolves to another configuration than "
                         "when the plan was written (its program, task or their defaults "
                         "changed); write the plan again")
    reuse = check_out_dir(out_dir, [run], [cfg["task"]])
    path = Path(out_dir) / run.rel
    if run.rel in reuse:
        return str(path), False
    _run_one(run, str(out_dir), threads)
    return str(path), True


# ---------------------------------------------------------------- outputs
def write_report(out_dir: str | Path, records: dict[str, dict] | None = None,
                 targets: dict[str | None, float] | None = None) -> list[dict]:
    """Write ``results.csv``, ``summary.csv``, ``results.md`` and the plots of
    ``records`` (``{rel: record}``; default: every record in ``out_dir/runs``) into
    ``out_dir``, each atomically; return the run rows.

    Raises:
        ValueError: no records, or records that do not fit one table (runs of one
            cell with different lengths).
    """
    from .plots import plot_metric_vs_batch, plot_steps_to_target, plot_trust_ratios

    out = Path(out_dir)
    from_folder = records is None
    records = read_records(out) if records is None else records
    targets = targets or {}
    rows = []
    for rel, rec in records.items():
        name = rec["task"]["name"]
        rows.append(run_row(rec, rel, targets.get(name, targets.get(None))))
    if from_folder:      # no grid order: tasks, optimizers as found; "none" first; sizes up
        first = {}
        for r in rows:
            first.setdefault(r["task"], len(first))
            first.setdefault((r["task"], r["optimizer"]), len(first))
        rows.sort(key=lambda r: (first[r["task"]], first[(r["task"], r["optimizer"])],
                                 r["adaptation"] != NONE, r["adaptation"], r["batch_size"],
                                 r["lr"], r["warmup_steps"], r["seed"]))
    cells = summarize(rows)
    total = sum(r["train_time_s"] for r in rows)
    with atomic_output(out / "results.csv") as tmp:
        write_runs_csv(rows, tmp)
    with atomic_output(out / "summary.csv") as tmp:
        write_cells_csv(cells, tmp)
    with atomic_output(out / "results.md") as tmp:
        tmp.write_text(markdown(cells, train_time_s=total), encoding="utf-8")
    with atomic_output(out / "metric_vs_batch.png") as tmp:
        plot_metric_vs_batch(cells, tmp)
    try:
        with atomic_output(out / "steps_to_target.png") as tmp:
            if not plot_steps_to_target(cells, tmp):
                raise _NoPlot
    except _NoPlot:
        pass
    for tname in dict.fromkeys(c.task for c in cells):
        record = _trust_record(records, [c for c in cells if c.task == tname])
        if record is not None:
            with atomic_output(out / f"trust_ratios_{tname}.png") as tmp:
                plot_trust_ratios(record, tmp)
    return rows


class _NoPlot(Exception):
    """No steps-to-target plot to write (no task has a target)."""


def _trust_record(records: dict[str, dict], cells) -> dict | None:
    """The record of the first cell's row with trust ratios: its largest batch size,
    the chosen candidate's first seed."""
    by_key: dict[tuple, list] = {}
    for c in cells:
        by_key.setdefault((c.optimizer, c.adaptation), []).append(c)
    for cs in by_key.values():
        c = max(cs, key=lambda c: c.batch_size)
        rec = records[min(c.chosen.runs, key=lambda r: r["seed"])["record"]]
        if any(rec["trust_ratios"]["values"].values()):
            return rec
    return None
