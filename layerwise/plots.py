"""Plots of an ablation (matplotlib, Agg backend, PNG): metric against batch size with
error bars, steps to target against batch size (log-log), per-layer trust ratios as
lines and as a heatmap.

Every function takes what :mod:`layerwise.report` computes from run records
and writes one PNG; none of them reads or trains anything else.
"""
from __future__ import annotations

import math
from pathlib import Path

from .report import NONE, CellSummary

__all__ = ["plot_metric_vs_batch", "plot_steps_to_target", "plot_trust_ratios"]

_STYLES = ["-", "--", ":", "-."]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _lines(summaries: list[CellSummary]):
    """Per task: ``{(optimizer, adaptation): [cells by batch size]}``, and the colour
    and line style of each optimizer and adaptation (an optimizer keeps its colour
    across adaptations; ``none`` is solid)."""
    plt = _pyplot()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    optimizers = list(dict.fromkeys(c.optimizer for c in summaries))
    adaptations = list(dict.fromkeys([NONE, *(c.adaptation for c in summaries)]))
    colour = {o: colours[i % len(colours)] for i, o in enumerate(optimizers)}
    style = {a: _STYLES[i % len(_STYLES)] for i, a in enumerate(adaptations)}
    tasks: dict[str, dict[tuple[str, str], list[CellSummary]]] = {}
    for c in summaries:     # a panel per task (and per run length, if there are several)
        tasks.setdefault(c.task if c.length == summaries[0].length or all(
            d.length == c.length for d in summaries if d.task == c.task)
            else f"{c.task} ({c.length[0]} epochs, cut {c.length[1]})", {}).setdefault((c.optimizer, c.adaptation), []).append(c)
    return plt, tasks, colour, style


def _label(opt: str, ad: str) -> str:
    return opt if ad == NONE else f"{opt}+{ad}"


def _batch_axis(plt, ax, sizes, log_y: bool = False) -> None:
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xticks(sizes)
    ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("batch size")
    ax.grid(alpha=0.3, which="both")


def plot_metric_vs_batch(summaries: list[CellSummary], path: str | Path) -> None:
    """PNG: the test metric against batch size (log scale), one panel per task, one line
    per optimizer and adaptation; points are the mean over seeds, error bars one
    sample standard deviation. Cells whose every seed diverged are left out of their
    line and named in the legend."""
    plt, tasks, colour, style = _lines(summaries)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4), squeeze=False)
    for ax, (tname, lines) in zip(axes[0], tasks.items()):
        task = next(iter(lines.values()))[0].chosen.runs[0]["_task"]
        scale = 100.0 if task.get("metric_percent") else 1.0
        for (opt, ad), cells in lines.items():
            pts = sorted((c.batch_size, c.chosen.mean() * scale, (c.chosen.sd() or 0) * scale)
                         for c in cells if c.chosen.mean() is not None)
            lost = sorted(c.batch_size for c in cells if c.chosen.mean() is None)
            label = _label(opt, ad) + (f" (diverged at B={', '.join(map(str, lost))})"
                                       if lost else "")
            xs, ys, es = zip(*pts) if pts else ((), (), ())
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label,
                        color=colour[opt], linestyle=style[ad])
        sizes = sorted({c.batch_size for cs in lines.values() for c in cs})
        _batch_axis(plt, ax, sizes)
        better = "higher" if task["higher_is_better"] else "lower"
        ax.set_ylabel(f"test {task.get('metric_title') or task['metric']} ({better} is better)")
        seeds = max(len(c.chosen.runs) for cs in lines.values() for c in cs)
        ax.set_title(f"{tname}: mean ± sd over {seeds} seed(s)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_steps_to_target(summaries: list[CellSummary], path: str | Path) -> bool:
    """PNG: steps to the target against batch size, log-log, one panel per task with a
    target (Shallue et al. 2018, arXiv:1811.03600, figure 1). Points: the mean over the
    seeds that reached the target; a thin dotted line per optimizer is perfect scaling
    from its smallest batch size that reached it (steps proportional to 1 / batch size).

    Returns:
        ``False`` (and writes nothing) when no task has a target.
    """
    with_target = [c for c in summaries if c.chosen.runs[0]["target"] is not None]
    if not with_target:
        return False
    plt, tasks, colour, style = _lines(with_target)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4), squeeze=False)
    for ax, (tname, lines) in zip(axes[0], tasks.items()):
        run0 = next(iter(lines.values()))[0].chosen.runs[0]
        task, target = run0["_task"], run0["target"]
        any_point = False
        for (opt, ad), cells in lines.items():
            pts = sorted((c.batch_size, sum(c.reached) / len(c.reached)) for c in cells
                         if c.reached)
            any_point = any_point or bool(pts)
            if not pts:
                ax.plot([], [], color=colour[opt], linestyle=style[ad],
                        label=f"{_label(opt, ad)} (never reached)")
                continue
            ax.plot(*zip(*pts), marker="o", color=colour[opt], linestyle=style[ad],
                    label=_label(opt, ad))
            b0, s0 = pts[0]
            bs = sorted({c.batch_size for c in cells if c.batch_size >= b0})
            ax.plot(bs, [s0 * b0 / b for b in bs], color=colour[opt], linestyle=":",
                    linewidth=0.8, alpha=0.7)
        sizes = sorted({c.batch_size for cs in lines.values() for c in cs})
        _batch_axis(plt, ax, sizes, log_y=any_point)
        if not any_point:
            ax.text(0.5, 0.5, "no run reached the target", transform=ax.transAxes,
                    ha="center")
        op = ">=" if task["higher_is_better"] else "<="
        shown = f"{100 * target:g}%" if task.get("metric_percent") else f"{target:g}"
        ax.set_ylabel("steps to target")
        ax.set_title(f"{tname}: test {task['metric']} {op} {shown}\n"
                     "(dotted: perfect scaling)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_trust_ratios(record: dict, path: str | Path) -> None:
    """PNG: the per-layer trust ratios of one run (its first watched name with values):
    left, one line per layer over the steps (log y); right, a heatmap layer x step with
    a logarithmic colour scale (non-positive and missing values blank).

    Raises:
        ValueError: if the record has no watched values.
    """
    import numpy as np

    plt = _pyplot()
    values = record["trust_ratios"]["values"]
    name = next((n for n, per in values.items() if per), None)
    if name is None:
        raise ValueError("the run recorded no trust ratios")
    per = values[name]
    params = list(per)
    steps = max(len(xs) for xs in per.values())
    grid = np.full((len(params), steps), np.nan)
    for i, xs in enumerate(per.values()):
        for j, x in enumerate(xs):
            if x is not None and math.isfinite(x) and x > 0:
                grid[i, j] = x
    fig, (ax, hm) = plt.subplots(1, 2, figsize=(15, max(3.8, 1.2 + 0.22 * len(params))),
                                 gridspec_kw={"width_ratios": [1, 1.25]})
    cmap = plt.get_cmap("viridis")
    for i, row in enumerate(grid):
        ax.plot(range(1, steps + 1), row, color=cmap(i / max(1, len(params) - 1)), lw=1,
                label=params[i])
    cfg = record["config"]
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"'{name}' per layer")
    ax.grid(alpha=0.3)
    ax.set_title(f"{record['task']['name']} {cfg['label']} batch {cfg['batch_size']} "
                 f"(seed {cfg['seed']}): per-layer trust ratio", fontsize=9)
    if len(params) <= 16:
        ax.legend(fontsize=6, loc="best")
    finite = grid[np.isfinite(grid)]
    if finite.size:
        from matplotlib.colors import LogNorm

        norm = LogNorm(vmin=finite.min(), vmax=max(finite.max(), finite.min() * 1.0001))
        im = hm.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest",
                       norm=norm, cmap="viridis", extent=(0.5, steps + 0.5, len(params) - 0.5,
                                                          -0.5))
        fig.colorbar(im, ax=hm, label=f"'{name}' (log scale)")
    hm.set_yticks(range(len(params)))
    hm.set_yticklabels(params, fontsize=6)
    hm.set_xlabel("step")
    hm.set_title("layer x step", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
