"""Large-batch ablations: an optimizer x batch-size grid per task, a table and plots.

``layerwise ablate`` trains every cell of the grid (task x optimizer
variant x batch size) with :func:`layerwise.train.train` for the same
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

Outputs in ``DIR``: ``results.csv`` (one row per cell), ``results.md`` (per
task, a table optimizer x batch size -> validation metric, like the
papers' tables), ``metric_vs_batch.png``, ``trust_ratios_TASK.png`` (the
per-layer trust ratios of one run per task) and ``runs/*.json`` (every
run's full record).

Cells run in ``jobs`` worker processes (spawned), each cell on
``threads`` torch threads (default 1), so results do not depend on
``jobs``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

from .errors import SpecError
from .spec import Spec
from .tasks import Task, get_task, task_names
from .train import plan_run, resolve_spec, train, write_record

__all__ = ["DEFAULT_OPTIMIZERS", "Variant", "defines", "make_variants", "run_ablation",
           "write_csv", "markdown_table", "plot_metric_vs_batch", "plot_trust_ratios"]

#: The default grid's optimizers.
DEFAULT_OPTIMIZERS = ("lamb", "lars", "adamw", "sgd")

_FIELDS = ["task", "optimizer", "program", "batch_size", "epochs", "steps", "lr", "base_lr",
           "lr_rule", "warmup_steps", "metric", "value", "val_loss", "diverged",
           "train_time_s", "record"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the grid: a label, a spec, and optionally its base LR and LR rule.

    ``base_lr`` ``None`` means the task's tuned value for ``spec.name``, or
    else the program's default ``lr``; ``lr_rule`` ``None`` means
    :func:`layerwise.train.lr_rule_for`.
    """
    label: str
    spec: Spec
    base_lr: float | None = None
    lr_rule: str | None = None


def defines(spec: Spec, name: str) -> bool:
    """Whether the program (with its parents) declares ``def NAME``.

    Reads ``Spec._declarations``: the checked program has its defs inlined.
    """
    decls = getattr(spec, "_declarations", None)
    return decls is not None and name in decls.defs


def make_variants(optimizers: Iterable[str | Spec], phis: Sequence[str] = (),
                  base_lrs: dict[str, float] | None = None,
                  lr_rule: str | None = None) -> list[Variant]:
    """The grid's rows: each optimizer, then each ``phi`` variant of each that defines ``phi``.

    ``optimizers`` are preset names, ``.lw`` paths or specs; labels are the
    program names (made unique with ``#2``, ``#3``). ``base_lrs`` maps a
    label or a program name to a base LR (label wins).

    Raises:
        FileNotFoundError, SpecError: a SPEC that is missing or does not
            check, or a ``phi`` expression that does not check.
        ValueError: ``phis`` given but no optimizer defines ``phi``, or a
            ``base_lrs`` key that names no optimizer.
    """
    base_lrs = dict(base_lrs or {})
    variants: list[Variant] = []
    used: set[str] = set()

    def add(label: str, spec: Spec) -> None:
        unique, n = label, 1
        while unique in used:
            n += 1
            unique = f"{label}#{n}"
        used.add(unique)
        lr = base_lrs.get(unique, base_lrs.get(spec.name))
        variants.append(Variant(unique, spec, lr, lr_rule))

    specs = [resolve_spec(o) for o in optimizers]
    for spec in specs:
        add(spec.name, spec)
    plain = list(variants)
    for expr in phis:
        expr = " ".join(expr.split())
        targets = [v for v in plain if defines(v.spec, "phi")]
        if not targets:
            raise ValueError(f"--phi '{expr}': no optimizer of the grid defines phi "
                             f"(e.g. lamb); grid: {', '.join(v.label for v in plain)}")
        for v in targets:
            try:
                spec = v.spec.override(f"def phi(z) = {expr}", filename=f"<--phi {expr}>")
            except SpecError as err:
                raise ValueError(f"--phi '{expr}' for {v.label}: {err.message}") from None
            add(f"{v.label}[phi={expr}]", spec)
    known = {v.label for v in variants} | {v.spec.name for v in variants}
    unknown = [k for k in base_lrs if k not in known]
    if unknown:
        raise ValueError(f"--base-lr names no optimizer of the grid: {', '.join(unknown)}; "
                         f"grid: {', '.join(v.label for v in variants)}")
    return variants


# ---------------------------------------------------------------- running the grid
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


_TASKS: dict[str, Task] = {}


def _task(name: str) -> Task:
    if name not in _TASKS:
        _TASKS[name] = get_task(name)
    return _TASKS[name]


def _run_cell(cell: dict) -> dict:
    """Run one grid cell (in a worker process or in-process); write its record; return its row."""
    task = _task(cell["task"])
    v: Variant = cell["variant"]
    record = train(task, v.spec, progress=False, threads=cell["threads"], label=v.label,
                   batch_size=cell["batch_size"], epochs=cell["epochs"], base_lr=v.base_lr,
                   lr_rule=v.lr_rule, seed=cell["seed"], max_steps=cell["max_steps"])
    write_record(record, cell["record_path"])
    cfg, final = record["config"], record["final"]
    return {"task": task.name, "optimizer": v.label, "program": v.spec.name,
            "batch_size": cfg["batch_size"], "epochs": cfg["epochs"], "steps": record["steps"],
            "lr": cfg["lr"], "base_lr": cfg["base_lr"], "lr_rule": cfg["lr_rule"],
            "warmup_steps": cfg["warmup_steps"], "metric": final["metric"],
            "value": final["value"], "val_loss": final["loss"], "diverged": final["diverged"],
            "train_time_s": record["train_time_s"], "record": cell["record_rel"]}


def run_ablation(out_dir: str | Path, variants: Sequence[Variant],
                 tasks: Sequence[str] | None = None,
                 batch_sizes: Sequence[int] | None = None, epochs: int | None = None,
                 seed: int = 0, jobs: int = 2, threads: int = 1,
                 progress: bool = True, max_steps: int | None = None) -> list[dict]:
    """Run the grid, write ``results.csv``, ``results.md``, the plots and run records.

    Args:
        out_dir: output folder (created).
        variants: the rows (:func:`make_variants`).
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
        variant, then batch size.

    Raises:
        UnknownTaskError, ValueError: bad input, found before any run
            (unknown task, batch size larger than a training set, ...).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    tasks = list(tasks) if tasks else task_names()
    cells = []
    for tname in tasks:
        task = _task(tname)
        sizes = list(batch_sizes) if batch_sizes else list(task.ablate_batch_sizes)
        n_epochs = epochs if epochs is not None else task.ablate_epochs
        for v in variants:
            for b in sizes:
                plan_run(task, v.spec, batch_size=b, epochs=n_epochs, base_lr=v.base_lr,
                         lr_rule=v.lr_rule, seed=seed, label=v.label,
                         max_steps=max_steps)   # validate everything before any run
                rel = f"runs/{tname}_{_slug(v.label)}_b{b}.json"
                cells.append({"task": tname, "variant": v, "batch_size": b, "epochs": n_epochs,
                              "seed": seed, "threads": threads, "max_steps": max_steps,
                              "record_path": str(out / rel),
                              "record_rel": rel})
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict | None] = [None] * len(cells)
    # slowest first (small batches: most optimizer steps), so workers finish together
    order = sorted(range(len(cells)), key=lambda i: (-_task(cells[i]["task"]).relative_cost
                                                     * cells[i]["epochs"],
                                                     cells[i]["batch_size"]))
    started = time.perf_counter()
    bar = tqdm(total=len(cells), disable=not progress, unit="run", file=sys.stderr,
               desc="ablate")
    try:
        if jobs <= 1:
            for i in order:
                bar.set_postfix_str(_cell_name(cells[i]))
                rows[i] = _run_cell(cells[i])
                bar.update(1)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                futures = {pool.submit(_run_cell, cells[i]): i for i in order}
                for fut in as_completed(futures):
                    i = futures[fut]
                    rows[i] = fut.result()
                    bar.set_postfix_str(_cell_name(cells[i]))
                    bar.update(1)
    finally:
        bar.close()
    done = [r for r in rows if r is not None]
    write_csv(done, out / "results.csv")
    text = markdown_table(done, wall_time_s=time.perf_counter() - started)
    (out / "results.md").write_text(text, encoding="utf-8")
    plot_metric_vs_batch(done, out / "metric_vs_batch.png")
    for tname in tasks:
        record = _trust_run(out, [r for r in done if r["task"] == tname])
        if record is not None:
            plot_trust_ratios(record, out / f"trust_ratios_{tname}.png")
    return done


def _cell_name(cell: dict) -> str:
    return f"{cell['task']} {cell['variant'].label} b{cell['batch_size']}"


def _trust_run(out: Path, rows: list[dict]) -> dict | None:
    """The record of the first variant with trust ratios, at its largest batch size."""
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["optimizer"], []).append(r)
    for label, rs in by_label.items():
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
    """The results as markdown: per task, optimizer x batch size -> validation metric.

    Cells show the metric (accuracy in %, or bits per byte) and, in
    brackets, the validation cross-entropy in nats; the best cell of each
    column is bold; ``diverged`` marks a run whose loss became non-finite.
    """
    lines: list[str] = []
    for tname in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == tname]
        task = get_task(tname)
        metric = rs[0]["metric"]
        sizes = sorted({r["batch_size"] for r in rs})
        labels = list(dict.fromkeys(r["optimizer"] for r in rs))
        cell = {(r["optimizer"], r["batch_size"]): r for r in rs}
        best = {}
        for b in sizes:
            vals = [cell[(l, b)]["value"] for l in labels
                    if (l, b) in cell and cell[(l, b)]["value"] is not None]
            if vals:
                best[b] = max(vals) if task.higher_is_better else min(vals)
        steps = {b: next(r["steps"] for r in rs if r["batch_size"] == b) for b in sizes}
        lines.append(f"### {tname}: {_METRIC_TITLE.get(metric, metric)}")
        lines.append("")
        lines.append(f"{task.summary}; {rs[0]['epochs']} epoch(s) per run; "
                     "cells: metric (validation loss, nats).")
        lines.append("")
        lines.append("| optimizer | LR rule | base LR | "
                     + " | ".join(f"B={b} ({steps[b]} steps)" for b in sizes) + " |")
        lines.append("| --- | --- | --- | " + " | ".join("---" for _ in sizes) + " |")
        for label in labels:
            first = next(r for r in rs if r["optimizer"] == label)
            cells = []
            for b in sizes:
                r = cell.get((label, b))
                if r is None:
                    cells.append("")
                    continue
                text = _fmt_metric(metric, r["value"])
                if r["value"] is not None:
                    text += f" ({r['val_loss']:.3f})"
                    if r["value"] == best.get(b):
                        text = f"**{text}**"
                cells.append(text)
            lines.append(f"| {label} | {first['lr_rule']} | {first['base_lr']:g} | "
                         + " | ".join(cells) + " |")
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
    """PNG: validation metric against batch size (log scale), one line per optimizer,
    one panel per task; diverged runs are left out of their line and named in the legend."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4), squeeze=False)
    for ax, tname in zip(axes[0], tasks):
        rs = [r for r in rows if r["task"] == tname]
        metric = rs[0]["metric"]
        scale = 100.0 if metric == "accuracy" else 1.0
        for label in dict.fromkeys(r["optimizer"] for r in rs):
            mine = [r for r in rs if r["optimizer"] == label]
            pts = sorted((r["batch_size"], r["value"] * scale) for r in mine
                         if r["value"] is not None)
            lost = sorted(r["batch_size"] for r in mine if r["value"] is None)
            if lost:
                label += f" (diverged at B={', '.join(map(str, lost))})"
            ax.plot(*(zip(*pts) if pts else ([], [])), marker="o", label=label)
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
