"""Tables of an ablation from its run records: seeds, protocols, steps to a target.

Everything here reads run records (``layerwise.train.train``'s JSON, as
``layerwise ablate`` writes them to ``DIR/runs/``) and nothing else, so
``layerwise report DIR`` rebuilds the tables and plots of a grid whose
cells ran anywhere (``layerwise ablate --plan``).

Grouping. The runs of one *cell* share task, optimizer label, adaptation
and batch size. Within a cell, runs that share the peak learning rate and
the warm-up are one *candidate*; their seeds are repeats.

* A cell with one candidate was run with ``--protocol scaled`` (one
  learning rate per batch size, from the scaling rule). It reports the
  mean and sample standard deviation of the test metric over its seeds.
* A cell with several candidates was run with ``--protocol tuned``
  (per-batch-size tuning, as in Nado et al. 2021, "A Large Batch Optimizer
  Reality Check", arXiv:2102.06356): the candidate with the fewest
  diverged seeds and then the best mean *validation* metric is chosen, and
  the cell reports that candidate's *test* metric (mean +- sd over its
  seeds), its learning rate and warm-up. The test split plays no part in
  the choice.

Steps to target (Shallue et al. 2018, "Measuring the Effects of Data
Parallelism on Neural Network Training", arXiv:1811.03600, section 3):
the first evaluated step at which a run's test metric reached the task's
target (or ``--target``); a cell reports the mean over the seeds that
reached it, and how many did.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["RUN_FIELDS", "CELL_FIELDS", "Candidate", "CellSummary", "run_row", "steps_to_target",
           "summarize", "markdown", "write_runs_csv", "write_cells_csv", "read_records",
           "parse_targets"]

#: Columns of ``results.csv`` (one line per run).
RUN_FIELDS = ["task", "optimizer", "adaptation", "program", "batch_size", "seed", "epochs",
              "steps", "lr", "base_lr", "lr_rule", "warmup_steps", "metric", "value",
              "val_value", "loss", "val_loss", "diverged", "steps_to_target", "target",
              "train_time_s", "record"]

#: Columns of ``summary.csv`` (one line per cell).
CELL_FIELDS = ["task", "optimizer", "adaptation", "batch_size", "steps", "protocol",
               "candidates", "lr", "warmup_steps", "seeds", "diverged", "mean", "sd",
               "val_mean", "target", "reached", "steps_to_target_mean",
               "steps_to_target_sd"]

NONE = "none"


def steps_to_target(evals: Sequence[dict], metric: str, target: float | None,
                    higher_is_better: bool) -> int | None:
    """The first ``step`` of ``evals`` whose ``metric`` reached ``target`` (``>=`` when
    higher is better, else ``<=``); ``None`` if none did or there is no target.

    ``evals`` are a record's evaluations of the test split, in step order,
    each ``{"step": int, metric: float or None, ...}``.
    """
    if target is None:
        return None
    for e in evals:
        v = e.get(metric)
        if v is not None and (v >= target if higher_is_better else v <= target):
            return int(e["step"])
    return None


def run_row(record: dict, rel: str, target: float | None = None) -> dict:
    """The ``results.csv`` row of one run record.

    ``rel`` is the record's path relative to the grid folder; ``target``
    overrides the task's own (``record["task"]["target"]``).

    Raises:
        KeyError, TypeError: ``record`` is not a complete run record.
    """
    cfg, final, task = record["config"], record["final"], record["task"]
    ad = record.get("adaptation")
    target = task.get("target") if target is None else target
    label = cfg["label"]
    if ad and label.endswith("+" + ad["label"]):
        label = label[: -len(ad["label"]) - 1]
    return {"task": task["name"], "optimizer": label,
            "adaptation": ad["label"] if ad else NONE,
            "program": record["optimizer"]["name"], "batch_size": cfg["batch_size"],
            "seed": cfg["seed"], "epochs": cfg["epochs"], "steps": record["steps"],
            "total_steps": cfg["total_steps"], "max_steps": cfg.get("max_steps"),
            "lr": cfg["lr"], "base_lr": cfg["base_lr"],
            "lr_rule": cfg["lr_rule"], "warmup_steps": cfg["warmup_steps"],
            "metric": final["metric"], "value": final["value"],
            "val_value": final.get("val_value"), "loss": final["loss"],
            "val_loss": final.get("val_loss"), "diverged": bool(final["diverged"]),
            "steps_to_target": steps_to_target(record.get("evals", ()), final["metric"], target,
                                               task["higher_is_better"]),
            "target": target, "train_time_s": record["train_time_s"], "record": rel,
            "_task": task}


@dataclass
class Candidate:
    """The runs of one cell at one learning rate and warm-up (one per seed)."""
    lr: float
    warmup_steps: int
    runs: list[dict] = field(default_factory=list)

    @property
    def finite(self) -> list[dict]:
        """The runs that did not diverge."""
        return [r for r in self.runs if not r["diverged"] and r["value"] is not None]

    @property
    def n_diverged(self) -> int:
        """How many seeds diverged."""
        return len(self.runs) - len(self.finite)

    def mean(self, key: str = "value") -> float | None:
        """Mean of ``key`` over the finite runs (``None`` if none)."""
        xs = [r[key] for r in self.finite if r.get(key) is not None]
        return statistics.fmean(xs) if xs else None

    def sd(self, key: str = "value") -> float | None:
        """Sample standard deviation of ``key`` over the finite runs (``None`` below 2)."""
        xs = [r[key] for r in self.finite if r.get(key) is not None]
        return statistics.stdev(xs) if len(xs) > 1 else None


@dataclass
class CellSummary:
    """One table cell: a task, optimizer, adaptation and batch size, summarised."""
    task: str
    optimizer: str
    adaptation: str
    batch_size: int
    steps: int
    candidates: list[Candidate]
    chosen: Candidate
    higher_is_better: bool
    length: tuple = (None, None)
    """``(epochs, max_steps)``: runs of another length are another table."""

    @property
    def protocol(self) -> str:
        """``"tuned"`` when the cell has several candidates, else ``"scaled"``."""
        return "tuned" if len(self.candidates) > 1 else "scaled"

    @property
    def reached(self) -> list[int]:
        """Steps to target of the chosen candidate's seeds that reached it."""
        return [r["steps_to_target"] for r in self.chosen.runs
                if r["steps_to_target"] is not None]


def _choose(cands: list[Candidate], higher_is_better: bool) -> Candidate:
    """Fewest diverged seeds, then the best mean validation metric, then the smaller LR."""
    def key(c: Candidate):
        v = c.mean("val_value")
        score = math.inf if v is None else (-v if higher_is_better else v)
        return (c.n_diverged, score, c.lr, c.warmup_steps)
    return min(cands, key=key)


def summarize(rows: Iterable[dict]) -> list[CellSummary]:
    """Group run rows (:func:`run_row`) into cells, in the order cells first appear.

    Runs of one task with another number of epochs or another step cut are
    other cells (and other tables).
    """
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["epochs"], r["max_steps"], r["optimizer"],
                          r["adaptation"], r["batch_size"]), []).append(r)
    out = []
    for (task, epochs, cut, opt, ad, b), rs in cells.items():
        cands: dict[tuple, Candidate] = {}
        for r in sorted(rs, key=lambda r: (r["lr"], r["warmup_steps"], r["seed"])):
            cands.setdefault((r["lr"], r["warmup_steps"]),
                             Candidate(r["lr"], r["warmup_steps"])).runs.append(r)
        hib = rs[0]["_task"]["higher_is_better"]
        cl = list(cands.values())
        out.append(CellSummary(task, opt, ad, b, rs[0]["total_steps"], cl, _choose(cl, hib),
                               hib, (epochs, cut)))
    return out


def _fmt(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def _cell_text(c: CellSummary, percent: bool, seeds: int) -> str:
    ch = c.chosen
    mean = ch.mean()
    if mean is None:
        return f"diverged ({ch.n_diverged}/{len(ch.runs)})"
    sd = ch.sd()
    text = _fmt(mean, percent) + (f" ± {_fmt(sd, percent)}" if sd is not None else "")
    notes = []
    if len(ch.finite) != seeds:
        notes.append(f"n={len(ch.finite)}")
    if ch.n_diverged:
        notes.append(f"{ch.n_diverged} diverged")
    if c.protocol == "tuned":
        notes.append(f"lr {ch.lr:.3g}, wu {ch.warmup_steps}")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def _title(task: dict) -> str:
    better = "higher" if task["higher_is_better"] else "lower"
    return f"test {task.get('metric_title') or task['metric']} ({better} is better)"


def markdown(summaries: list[CellSummary], train_time_s: float | None = None) -> str:
    """The tables as markdown: per task, the metric table and the steps-to-target table.

    Metric table: one row per optimizer (and adaptation, when any cell has
    one other than ``none``), one column per batch size; a cell is the
    chosen candidate's mean ± sd of the test metric over its seeds, with
    ``n=`` when some seeds are missing or diverged, the number diverged,
    and for a tuned cell its learning rate and warm-up steps. The best mean
    of each column is bold. ``train_time_s``: a closing line with the
    summed training time of the runs (read from the records, so re-running
    the same grid prints the same text).
    """
    lines: list[str] = []
    tables = list(dict.fromkeys((c.task, c.length) for c in summaries))
    for tname, length in tables:
        cs = [c for c in summaries if (c.task, c.length) == (tname, length)]
        task = cs[0].chosen.runs[0]["_task"]
        percent = bool(task.get("metric_percent"))
        sizes = sorted({c.batch_size for c in cs})
        keys = list(dict.fromkeys((c.optimizer, c.adaptation) for c in cs))
        adapted = any(ad != NONE for _, ad in keys)
        by = {(c.optimizer, c.adaptation, c.batch_size): c for c in cs}
        seeds = max(len(c.chosen.runs) for c in cs)
        protocols = sorted({c.protocol for c in cs})
        best = {}
        for b in sizes:
            means = [m for k in keys if (c := by.get((*k, b))) and (m := c.chosen.mean())
                     is not None]
            if means:
                best[b] = max(means) if task["higher_is_better"] else min(means)
        steps = {b: next(c.steps for c in cs if c.batch_size == b) for b in sizes}
        first = cs[0].chosen.runs[0]
        lines += [f"### {tname}: {_title(task)}", ""]
        what = ("mean ± sd" if seeds > 1 else "one run") + f" over {seeds} seed(s)"
        proto = " and ".join(protocols)
        extra = ("; tuned cells: the learning rate and warm-up chosen on the val split"
                 if "tuned" in protocols else "")
        cut = "" if length[1] is None else f", cut at {length[1]} steps"
        lines += [f"{task['summary']}; {first['epochs']} epoch(s) per run{cut}; protocol {proto}; "
                  f"cells: {what}{extra}.", ""]
        head = ["optimizer", *(["adaptation"] if adapted else []), "LR rule", "base LR"]
        lines.append("| " + " | ".join(head) + " | "
                     + " | ".join(f"B={b} ({steps[b]} steps)" for b in sizes) + " |")
        lines.append("|" + " --- |" * (len(head) + len(sizes)))
        for key in keys:
            row0 = next(c for c in cs if (c.optimizer, c.adaptation) == key).chosen.runs[0]
            def metric_cell(c: CellSummary) -> str:
                text = _cell_text(c, percent, seeds)
                best_here = c.chosen.mean() is not None and c.chosen.mean() == best.get(
                    c.batch_size)
                return f"**{text}**" if best_here else text

            cells = _row_cells(key, sizes, by, metric_cell)
            lead = [key[0], *([key[1]] if adapted else []), row0["lr_rule"],
                    f"{row0['base_lr']:g}"]
            lines.append("| " + " | ".join(lead) + " | " + " | ".join(cells) + " |")
        lines.append("")
        lines += _target_table(tname, task, cs, keys, adapted, sizes, by)
    if train_time_s is not None:
        lines += [f"Training time of these runs: {train_time_s:.0f} s (summed over runs).", ""]
    return "\n".join(lines)


def _row_cells(key: tuple, sizes: list[int], by: dict, fmt) -> list[str]:
    """One table row's cells: ``fmt(cell)`` per batch size, empty where the grid has none."""
    return [fmt(by[(*key, b)]) if (*key, b) in by else "" for b in sizes]


def _target_table(tname, task, cs, keys, adapted, sizes, by) -> list[str]:
    target = cs[0].chosen.runs[0]["target"]
    if target is None:
        return []
    op = ">=" if task["higher_is_better"] else "<="
    shown = f"{100 * target:g}" if task.get("metric_percent") else f"{target:g}"
    lines = [f"#### {tname}: steps to test {task.get('metric_title') or task['metric']} "
             f"{op} {shown}", "",
             "Mean over the seeds that reached the target (how many of all did); "
             "evaluated every few steps, so a count is the first evaluation at or past it.",
             "",
             "| optimizer | " + ("adaptation | " if adapted else "")
             + " | ".join(f"B={b}" for b in sizes) + " |",
             "|" + " --- |" * (1 + adapted + len(sizes))]
    def steps_cell(c: CellSummary) -> str:
        got, n = c.reached, len(c.chosen.runs)
        if not got:
            return f"not reached (0/{n})"
        sd = f" ± {statistics.stdev(got):.0f}" if len(got) > 1 else ""
        return f"{statistics.fmean(got):.0f}{sd} ({len(got)}/{n})"

    for key in keys:
        cells = _row_cells(key, sizes, by, steps_cell)
        lines.append("| " + " | ".join([key[0], *([key[1]] if adapted else []), *cells]) + " |")
    return lines + [""]


def _csv(path: str | Path, fields: list[str], rows: Iterable[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in fields})


def write_runs_csv(rows: list[dict], path: str | Path) -> None:
    """``results.csv``: one line per run with the columns of :data:`RUN_FIELDS`."""
    _csv(path, RUN_FIELDS, rows)


def write_cells_csv(summaries: list[CellSummary], path: str | Path) -> None:
    """``summary.csv``: one line per cell with the columns of :data:`CELL_FIELDS`."""
    rows = []
    for c in summaries:
        got = c.reached
        rows.append({"task": c.task, "optimizer": c.optimizer, "adaptation": c.adaptation,
                     "batch_size": c.batch_size, "steps": c.steps, "protocol": c.protocol,
                     "candidates": len(c.candidates), "lr": c.chosen.lr,
                     "warmup_steps": c.chosen.warmup_steps, "seeds": len(c.chosen.runs),
                     "diverged": c.chosen.n_diverged, "mean": c.chosen.mean(),
                     "sd": c.chosen.sd(), "val_mean": c.chosen.mean("val_value"),
                     "target": c.chosen.runs[0]["target"], "reached": len(got),
                     "steps_to_target_mean": statistics.fmean(got) if got else None,
                     "steps_to_target_sd": statistics.stdev(got) if len(got) > 1 else None})
    _csv(path, CELL_FIELDS, rows)


def read_records(out_dir: str | Path) -> dict[str, dict]:
    """Every run record in ``out_dir/runs/*.json``, by path relative to ``out_dir``.

    Files that are not run records (not JSON, not a dict with ``config``,
    ``optimizer`` and ``final``) are skipped.

    Raises:
        ValueError: ``out_dir`` has no ``runs`` folder, or it holds no record.
    """
    runs = Path(out_dir) / "runs"
    if not runs.is_dir():
        raise ValueError(f"{out_dir}: no runs/ folder with run records")
    records = {}
    for p in sorted(runs.glob("*.json")):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(data, dict) and {"config", "optimizer", "final", "task"} <= set(data):
            records[f"runs/{p.name}"] = data
    if not records:
        raise ValueError(f"{out_dir}: runs/ holds no run record")
    return records


def parse_targets(values: Sequence[str], tasks: Sequence[str] | None = None
                  ) -> dict[str | None, float]:
    """``--target`` values: ``X`` (every task) or ``TASK=X``; ``{task or None: X}``.

    Raises:
        ValueError: a value that is not a finite number, or a TASK not among
            ``tasks`` (when given).
    """
    out: dict[str | None, float] = {}
    for text in values:
        name, sep, value = text.rpartition("=")
        key = name.strip() if sep else None
        try:
            x = float(value)
        except ValueError:
            raise ValueError(f"--target '{text}': expects X or TASK=X with a number X") from None
        if not math.isfinite(x):
            raise ValueError(f"--target '{text}': not a finite number")
        if key is not None and tasks is not None and key not in tasks:
            raise ValueError(f"--target '{text}': no task '{key}' in this grid "
                             f"({', '.join(tasks)})")
        out[key] = x
    return out
