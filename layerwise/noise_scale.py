"""The gradient noise scale of a training run, per layer and for the whole model.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch
Training" (arXiv:1812.06162): the *simple noise scale*
``B_simple = tr(Sigma) / |G|^2`` (section 2.2, eq. 2.9), with ``G`` the true
gradient and ``Sigma`` the per-example gradient covariance, predicts the
critical batch size: well below it a larger batch cuts the steps needed
almost proportionally, well beyond it hardly at all. Appendix A.1 estimates
it without bias from squared gradient norms at two batch sizes
``B_small < B_big``, since ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``::

    |G|^2 ~= (B_big |G_Bbig|^2 - B_small |G_Bsmall|^2) / (B_big - B_small)   (A.2)
    S     ~= (|G_Bsmall|^2 - |G_Bbig|^2) / (1/B_small - 1/B_big)             (A.3)

One step's values are very noisy: ``|G|^2`` and ``S`` are each averaged over
steps (bias-corrected EMA) and ``B_simple`` is the ratio of the averages (the
paper's less biased choice). A batch of ``B_big`` is split into ``k = B_big /
B_small`` micro-batches, one backward each; their mean gradient is the one the
optimizer steps with, so training is the ordinary run at ``B_big``. All is kept
per parameter tensor ("layer") and for the whole model (the sum over tensors).
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["measure_noise_scale", "plot_noise_scale", "micro_step", "estimate", "NoiseEMA",
           "add_parser", "run"]

PAPER = "McCandlish et al. 2018, arXiv:1812.06162, appendix A.1 (eqs. A.2, A.3)"
MAX_DEFAULT_STEPS, MIN_DEFAULT_STEPS, TOP = 1000, 20, 3


# ---------------------------------------------------------------- the estimator
def micro_step(model, params: list, loss_fn: Callable, x, y, k: int):
    """Gradients of one batch from ``k`` micro-batches, one backward each.

    ``loss_fn(model, x, y)`` is the *mean* loss of a batch; rows of ``x``/``y``
    (``B_big`` of them, divisible by ``k``) are split in order. Sets ``p.grad``
    of each of ``params`` to the mean micro-batch gradient (in ``p.dtype``).

    Returns:
        ``(loss, small_sq, big_sq)``: 0-d float64 mean of the micro-batch
        losses; float64 ``(len(params),)``: per tensor, the mean over
        micro-batches of ``|g_micro|^2`` and ``|mean g_micro|^2`` (squared
        units of the loss gradient). All on the parameters' device, no sync.
    """
    import torch

    dev = params[0].device
    acc = [torch.zeros(p.shape, dtype=torch.float64, device=dev) for p in params]
    small = torch.zeros(len(params), dtype=torch.float64, device=dev)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    for xm, ym in zip(x.chunk(k), y.chunk(k)):
        loss = loss_fn(model, xm, ym)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        sq = []
        for a, g, p in zip(acc, grads, params):
            g = torch.zeros_like(p) if g is None else g
            g = g.to(torch.float64)
            a.add_(g)
            sq.append(g.square().sum())
        small += torch.stack(sq)
        loss_sum += loss.detach().to(torch.float64)
    for a, p in zip(acc, params):
        a.div_(k)
        p.grad = a.to(p.dtype)
    big = torch.stack([a.square().sum() for a in acc])
    return loss_sum / k, small / k, big


def estimate(small_sq, big_sq, b_small: int, b_big: int):
    """Unbiased one-step estimates ``(|G|^2, S = tr(Sigma))`` from squared gradient
    norms (tensors of any shape, e.g. per layer) at batch sizes ``b_small < b_big``
    (McCandlish et al. 2018, eqs. A.2 and A.3). ``|G|^2`` may be negative from noise."""
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    s = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, s


class NoiseEMA:
    """Bias-corrected exponential moving averages of ``|G|^2`` and ``S`` (float64
    tensors of one shape, e.g. ``(n_layers,)``), updated with ``decay`` per step."""

    def __init__(self, decay: float) -> None:
        self.decay, self.steps, self.g2, self.s = float(decay), 0, None, None

    def update(self, g2, s) -> None:
        """Add one step's estimates (tensors; no sync)."""
        d = self.decay
        self.steps += 1
        self.g2 = (1 - d) * g2 if self.g2 is None else d * self.g2 + (1 - d) * g2
        self.s = (1 - d) * s if self.s is None else d * self.s + (1 - d) * s

    def values(self):
        """``(|G|^2, S)``: the averages divided by ``1 - decay**steps``."""
        c = 1.0 - self.decay ** self.steps
        return self.g2 / c, self.s / c


def b_simple(g2: float | None, s: float | None) -> float | None:
    """``S / |G|^2``, or ``None`` while it is not estimable (``|G|^2 <= 0``, ``S < 0``
    or a non-finite value): never a negative noise scale."""
    if g2 is None or s is None or not (math.isfinite(g2) and math.isfinite(s)):
        return None
    return s / g2 if g2 > 0 and s >= 0 else None


# ---------------------------------------------------------------- inputs
def _check_int(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} {value!r}: must be a positive integer")
    return value


def _prepare(task, spec, batch_size, micro_batch_size, steps, every, seed, lr, ema, threads):
    """Resolve and check every input before training (see :func:`measure_noise_scale`)."""
    from .tasks import get_task
    from .train import check_seed, check_threads, plan_run, resolve_spec

    check_seed(seed, "--seed")
    if threads is not None:
        check_threads(threads, "--threads")
    if isinstance(task, str):
        task = get_task(task)      # an UnknownTaskError (ValueError) names --task itself
    try:
        spec = resolve_spec(spec)
    except FileNotFoundError as err:
        raise ValueError(f"--optimizer {spec}: {err}") from None
    n = task.data().n_train
    big = max(task.ablate_batch_sizes or (task.default_batch_size,)) if batch_size is None \
        else _check_int(batch_size, "--batch-size")
    if big > n:
        raise ValueError(f"--batch-size {big}: larger than the {task.name} training set "
                         f"({n} examples)")
    small = big // 8 if micro_batch_size is None else _check_int(micro_batch_size,
                                                                 "--micro-batch-size")
    if small < 1 or big % small:
        raise ValueError(f"--micro-batch-size {small}: must be a positive divisor of "
                         f"--batch-size {big}")
    if big // small < 2:
        raise ValueError(f"--micro-batch-size {small}: gives {big // small} micro-batch per "
                         f"batch of {big}; the estimate needs at least 2")
    spe = n // big
    steps = (min(max(spe, MIN_DEFAULT_STEPS), MAX_DEFAULT_STEPS) if steps is None
             else _check_int(steps, "--steps"))
    _check_int(every, "--every")
    if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= ema < 1:
        raise ValueError(f"ema {ema!r}: must be a number in [0, 1)")
    plan = plan_run(task, spec, batch_size=big, epochs=math.ceil(steps / spe), lr=lr,
                    seed=seed, max_steps=steps)
    return task, spec, plan, small


# ---------------------------------------------------------------- the run
def measure_noise_scale(task, spec="lamb", *, batch_size: int | None = None,
                        micro_batch_size: int | None = None, steps: int | None = None,
                        every: int = 10, seed: int = 0, lr: float | None = None,
                        ema: float = 0.95, progress: bool = True, report: Callable = print,
                        threads: int | None = None) -> dict:
    """Train ``task`` at batch size ``B_big`` and estimate its simple noise scale as it goes.

    Args:
        task: a :class:`~layerwise.tasks.Task` or a task name.
        spec: preset name, ``.lw`` path or :class:`~layerwise.Spec`.
        batch_size: ``B_big`` (default: the task's largest ``ablate_batch_sizes``).
        micro_batch_size: ``B_small``, a divisor of ``B_big`` with ``k = B_big / B_small
            >= 2`` (default ``B_big // 8``).
        steps: optimizer steps (default: one epoch at ``B_big``, at least 20 and at
            most 1000; runs past an epoch take the next epoch's batches).
        every: report (and record) every ``every`` steps, and at the last step.
        seed, lr: as in :func:`layerwise.train.plan_run` (``lr=None``: the task's tuned
            LR scaled to ``B_big``; same warm-up/decay schedule as ``layerwise train``).
        ema: decay of the moving averages of ``|G|^2`` and ``S`` (bias-corrected).
        progress: a tqdm bar on stderr (report lines then go through ``tqdm.write``).
        report: called with one text line per report.
        threads: ``torch.set_num_threads`` for the run (restored after).

    Returns:
        A JSON-able record: ``task``, ``optimizer`` (name, file, program text),
        ``config``, ``series`` (``step``, ``loss`` and, for ``model`` and each layer
        of ``layers``, lists ``b_simple``, ``g2`` (``|G|^2``) and ``s`` (``tr Sigma``)
        of the averages at each report; units: squared loss-gradient norm, and
        examples for ``b_simple``), ``final`` (the same at the last step, plus the
        test evaluation), ``batch_sizes`` (the task's ``ablate_batch_sizes``, each
        ``past_b_noise``: above the final whole-model ``B_simple``), ``versions``.
        ``b_simple`` is ``None`` while not estimable (:func:`b_simple`).

    Raises:
        ValueError: a bad input (naming its command-line option), before training.
        SpecError: the program does not check.
    """
    started = time.perf_counter()
    task, spec, plan, small = _prepare(task, spec, batch_size, micro_batch_size, steps, every,
                                       seed, lr, ema, threads)
    return _measure(task, spec, plan, small, every, ema, progress, report, threads, started)


def _measure(task, spec, plan, small: int, every: int, ema: float, progress: bool,
             report: Callable, threads: int | None, started: float) -> dict:
    """:func:`measure_noise_scale` once its inputs are resolved and checked (``_prepare``)."""
    import torch
    from tqdm.auto import tqdm

    from .optimizer import Optimizer
    from . import __version__
    from .train import json_safe, lr_factor

    big, k, total = plan.batch_size, plan.batch_size // small, plan.total_steps
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    bar = tqdm(total=total, disable=not progress, unit="step", file=sys.stderr, leave=False,
               desc=f"{task.name} noise scale b{big}/{small}")
    say = tqdm.write if (progress and report is print) else report
    try:
        torch.manual_seed(plan.seed)
        model = task.build_model()
        model.train()
        names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
        opt = Optimizer(zip(names, params), spec, compile=False,
                        **{**plan.hypers, "lr": plan.lr})
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, plan.warmup_steps, total))
        avg = NoiseEMA(ema)
        series = {"step": [], "loss": [], "model": {"b_simple": [], "g2": [], "s": []},
                  "layers": {n: {"b_simple": [], "g2": [], "s": []} for n in names}}
        batches = (b for epoch in itertools.count() for b in task.batches(big, epoch, plan.seed))
        for step, (x, y) in enumerate(itertools.islice(batches, total), 1):
            opt.zero_grad(set_to_none=True)
            loss, small_sq, big_sq = micro_step(model, list(params), task.loss, x, y, k)
            avg.update(*estimate(small_sq, big_sq, small, big))
            opt.step()
            sched.step()
            bar.update(1)
            if step % every == 0 or step == total:
                g2, s = avg.values()
                values = torch.cat([loss.reshape(1), g2, s]).tolist()  # the one sync
                _add_point(series, step, values, names)
                say(_line(series, task.ablate_batch_sizes))
        final_eval = task.evaluate_split(model, "test")
    finally:
        bar.close()
        torch.set_num_threads(old_threads)
    last = lambda d: {key: v[-1] for key, v in d.items()}  # noqa: E731
    whole = last(series["model"])
    return json_safe({
        "kind": "noise_scale", "paper": PAPER,
        "task": task.describe(),
        "optimizer": {"name": spec.name, "file": spec.filename, "program": spec.to_text()},
        "config": {"batch_size": big, "micro_batch_size": small, "micro_batches": k,
                   "steps": total, "every": every, "lr": plan.lr, "lr_source": plan.lr_source,
                   "warmup_steps": plan.warmup_steps, "hypers": plan.hypers, "seed": plan.seed,
                   "ema": ema, "threads": torch.get_num_threads() if threads is None else threads,
                   "schedule": "linear warm-up over warmup_steps, then linear decay"},
        "series": series,
        "final": {"step": total, "loss": series["loss"][-1], "model": whole,
                  "layers": {n: last(d) for n, d in series["layers"].items()},
                  "test": final_eval},
        "batch_sizes": _compare(task.ablate_batch_sizes, whole["b_simple"]),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "versions": {"layerwise": __version__, "torch": torch.__version__},
    })


def _add_point(series: dict, step: int, values: list[float], names) -> None:
    n = len(names)
    loss, g2, s = values[0], values[1:1 + n], values[1 + n:]
    series["step"].append(step)
    series["loss"].append(loss)
    for name, a, b in zip(names, g2, s):
        d = series["layers"][name]
        d["g2"].append(a), d["s"].append(b), d["b_simple"].append(b_simple(a, b))
    m, whole = series["model"], (math.fsum(g2), math.fsum(s))
    m["g2"].append(whole[0]), m["s"].append(whole[1]), m["b_simple"].append(b_simple(*whole))


def _compare(sizes, noise: float | None) -> list[dict]:
    return [{"batch_size": b, "past_b_noise": None if noise is None else b > noise}
            for b in sizes]


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _top(layers: dict, n: int = TOP) -> list[tuple[str, float]]:
    vals = [(name, d["b_simple"][-1]) for name, d in layers.items()]
    return sorted(((a, v) for a, v in vals if v is not None), key=lambda t: -t[1])[:n]


def _line(series: dict, sizes) -> str:
    """One report line: step, whole-model B_simple, top layers, batch sizes past it."""
    noise = series["model"]["b_simple"][-1]
    top = " ".join(f"{name}={_fmt(v)}" for name, v in _top(series["layers"]))
    if noise is None:
        past = "not yet estimable (|G|^2 estimate <= 0)"
    else:
        over = [str(c["batch_size"]) for c in _compare(sizes, noise) if c["past_b_noise"]]
        past = f"past B_noise: {', '.join(over) if over else 'none'} of {sizes}"
    return (f"step {series['step'][-1]:5d}  loss {series['loss'][-1]:.4f}  "
            f"B_simple {_fmt(noise):>8s}  | top layers: {top or '-'}  | {past}")


# ---------------------------------------------------------------- plot
def plot_noise_scale(record: dict, path: str | Path, top: int = 12) -> None:
    """PNG at ``path``: ``B_simple`` against step, log y; the whole model thick black,
    the ``top`` layers with the largest final value thin, and horizontal lines at
    the task's batch sizes. Points that are not estimable are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nan = float("nan")
    steps, series = record["series"]["step"], record["series"]
    ys = lambda xs: [nan if v is None else v for v in xs]  # noqa: E731
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    ranked = [n for n, _ in _top(series["layers"], len(series["layers"]))]
    shown = ranked[:top]
    cmap = plt.get_cmap("viridis")
    for i, name in enumerate(shown):
        ax.plot(steps, ys(series["layers"][name]["b_simple"]), lw=0.8,
                color=cmap(i / max(1, len(shown) - 1)), label=name)
    ax.plot(steps, ys(series["model"]["b_simple"]), lw=2.5, color="black", label="whole model")
    for b in record["batch_sizes"]:
        ax.axhline(b["batch_size"], color="grey", ls="--", lw=0.8)
        ax.annotate(f"B={b['batch_size']}", (1.0, b["batch_size"]), fontsize=7, color="grey",
                    xycoords=("axes fraction", "data"), ha="right", va="bottom")
    if any(v is not None and v > 0 for v in series["model"]["b_simple"]) or shown:
        ax.set_yscale("log")
    hidden = len(series["layers"]) - len(shown)
    cfg = record["config"]
    ax.set_title(f"{record['task']['name']} {record['optimizer']['name']}: simple noise scale, "
                 f"B={cfg['batch_size']} in {cfg['micro_batches']} x {cfg['micro_batch_size']}"
                 + (f" ({hidden} more layers in the record)" if hidden else ""), fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("B_simple = tr(Sigma) / |G|^2 (examples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- command line
def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``noise-scale`` command to an argparse ``subparsers``; its ``func`` is :func:`run`."""
    p = subparsers.add_parser(
        "noise-scale", help="estimate the gradient noise scale B_simple (McCandlish et al. "
                            "2018) per layer while training a task; JSON record and plot")
    p.add_argument("--task", required=True, help="a task name (digits, charlm)")
    p.add_argument("--optimizer", default="lamb", metavar="SPEC",
                   help="a preset name or .lw file (default: lamb)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="B_big (default: the task's largest ablation batch size)")
    p.add_argument("--micro-batch-size", type=int, metavar="N",
                   help="B_small, dividing B_big at least twice (default: B_big / 8)")
    p.add_argument("--steps", type=int, metavar="N",
                   help="steps (default: one epoch at B_big, 20 to 1000)")
    p.add_argument("--every", type=int, default=10, metavar="K",
                   help="report every K steps (default: 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch threads (default: 1)")
    p.add_argument("--out", default="results/noise_scale", metavar="DIR",
                   help="writes DIR/noise_scale_TASK.json and .png (default: results/noise_scale)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or report lines")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``layerwise noise-scale``: check every input and the outputs, measure,
    write ``DIR/noise_scale_TASK.json`` and ``.png`` atomically, print a summary.

    Raises:
        ValueError: a bad input, naming its option, before anything runs or is written.
    """
    import importlib.util

    from .train import atomic_output, check_record_path, nearest_directory, write_record

    missing = [m for m in ("matplotlib", "tqdm") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"'layerwise noise-scale' needs {', '.join(missing)}: "
                         "pip install 'layerwise[tasks]'")
    started = time.perf_counter()
    opts = dict(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                steps=args.steps, every=args.every, seed=args.seed, lr=None, ema=0.95,
                threads=args.threads)
    task, spec, plan, small = _prepare(args.task, args.optimizer, **opts)
    out = Path(args.out)
    json_path, png_path = out / f"noise_scale_{task.name}.json", out / f"noise_scale_{task.name}.png"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: not a directory")
    check_record_path(json_path, "--out")
    nearest_directory(png_path, f"--out {out}")
    if png_path.is_dir():
        raise ValueError(f"--out {out}: {png_path} is a directory")
    rec = _measure(task, spec, plan, small, args.every, opts["ema"], not args.quiet,
                   (lambda line: None) if args.quiet else print, args.threads, started)
    write_record(rec, json_path)
    with atomic_output(png_path) as tmp:
        plot_noise_scale(rec, tmp)
    cfg, m = rec["config"], rec["final"]["model"]
    print(f"{task.name} {spec.name}: B_big {cfg['batch_size']} = {cfg['micro_batches']} x "
          f"{cfg['micro_batch_size']}, {cfg['steps']} steps, peak lr {cfg['lr']:.4g}")
    print(f"final whole-model B_simple {_fmt(m['b_simple'])} (|G|^2 {_fmt(m['g2'])}, "
          f"tr Sigma {_fmt(m['s'])}); layers with the largest: "
          + ", ".join(f"{n} {_fmt(v)}" for n, v in _top(rec["series"]["layers"], 5)))
    over = [str(b["batch_size"]) for b in rec["batch_sizes"] if b["past_b_noise"]]
    print(f"batch sizes past B_noise (diminishing returns): {', '.join(over) or 'none'}")
    print(f"wall time {rec['wall_time_s']:.1f} s; wrote {json_path}, {png_path}")
    return 0
