"""Cost of ``nonfinite="skip"`` (issue 14): lamb's step with and without the
guard, side by side.

Usage::

    python benchmarks/nonfinite_guard.py            # CPU, eager and compiled, ~2 min

24 float32 tensors, 7.1M values (BERT-like shapes: 6 x (768x768, 768x3072,
3072x768, 768)), persistent gradients. Each repeat times one step of the
guarded and one of the unguarded optimizer back to back (order alternating),
so a machine whose speed drifts moves both alike; the ratio
guarded / unguarded is taken per repeat and summarised by its median (and
min-max). Prints a Markdown table; run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import layerwise as lw

SHAPES = [(768, 768), (768, 3072), (3072, 768), (768,)] * 6


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(0.02 * torch.randn(s, generator=gen)) for s in SHAPES]
    for p in params:
        p.grad = 1e-3 * torch.randn(p.shape, generator=gen)
    return params


def _timed(opt) -> float:
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def measure(compile: bool, repeats: int) -> tuple[float, float, float, float, float]:
    """(median ms without, median ms with, median ratio, min ratio, max ratio)."""
    plain = lw.Optimizer(_params(0), "lamb", compile=compile)
    guarded = lw.Optimizer(_params(0), "lamb", compile=compile, nonfinite="skip")
    for _ in range(3):                       # warm-up (and the compiles)
        plain.step()
        guarded.step()
    without, with_, ratios = [], [], []
    for r in range(repeats):
        if r % 2:
            b = _timed(guarded)
            a = _timed(plain)
        else:
            a = _timed(plain)
            b = _timed(guarded)
        without.append(a)
        with_.append(b)
        ratios.append(b / a)
    return (1e3 * statistics.median(without), 1e3 * statistics.median(with_),
            statistics.median(ratios), min(ratios), max(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| path | without guard (ms, median) | with guard (ms, median) | ratio (median) | ratio min-max |")
    print("| --- | --- | --- | --- | --- |")
    for compile in (False, True):
        a, b, ratio, lo, hi = measure(compile, args.repeats)
        name = "compiled" if compile else "eager"
        print(f"| {name} | {a:.1f} | {b:.1f} | {ratio:.2f} | {lo:.2f}-{hi:.2f} |", flush=True)


if __name__ == "__main__":
    main()
