"""Memory and step time of ``precision=`` for bfloat16 parameters, against float32 (issue 16).

Usage (replaces the "Mixed precision" section of benchmarks/RESULTS.md)::

    python benchmarks/mixed_precision.py                     # BERT-base, compiled and eager
    python benchmarks/mixed_precision.py --layers 4 --repeats 5 --paths compiled

Parameter set: BERT-base's shapes (``step_time.bert_shapes``; ``--layers``
fewer encoder layers for a reduced run, labelled as such), weights
randn*0.02 and gradients randn*1e-3 made in float32, then cast to bfloat16
for the 16-bit rows. Rows: layerwise ``lamb`` with float32 parameters (the
anchor), and with bfloat16 parameters under ``precision="master"``,
``"stochastic"`` and ``"nearest"``; compiled and eager.

Memory: the bytes the optimizer's buffers hold after the first step
(parameters ``W``, gradients ``G``, elem states, masters ``M``;
``layerwise.runtime.layout.Bucket``), i.e. parameters + gradients +
optimizer state as laid out, per parameter element and in total; measured
on one optimizer at a time. Time: all rows of a path are alive together and
timed interleaved (every repeat steps each row once, in turn); a row's ratio
to the float32 row is taken per repeat, then the median (these machines are
shared: drift moves neighbours alike).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import bert_shapes  # noqa: E402

ROWS = [("float32 parameters", torch.float32, "master"),
        ("bfloat16, precision=\"master\"", torch.bfloat16, "master"),
        ("bfloat16, precision=\"stochastic\"", torch.bfloat16, "stochastic"),
        ("bfloat16, precision=\"nearest\"", torch.bfloat16, "nearest")]
BEGIN, END = "<!-- mixed-precision: begin -->", "<!-- mixed-precision: end -->"


def make(shapes, dtype, precision, compile):
    import layerwise as lw
    gen = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(dtype))
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(dtype)
        params.append(p)
    opt = lw.Optimizer(params, "lamb", compile=compile, precision=precision, lr=1e-3)
    opt.step()
    return params, opt


def held_bytes(opt) -> int:
    total = 0
    for b in opt._buckets.buckets.values():
        for buf in (b.W, b.G, *b.S.values(), *((b.M,) if b.M is not None else ())):
            total += buf.numel() * buf.element_size()
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--paths", default="compiled,eager")
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS.md"))
    args = parser.parse_args(argv)
    shapes = bert_shapes(768, args.layers)
    numel = sum(torch.Size(s).numel() for s in shapes)
    label = "BERT-base" if args.layers == 12 else \
        f"reduced BERT-base ({args.layers} of 12 encoder layers)"
    memory = {}
    for name, dtype, precision in ROWS:
        params, opt = make(shapes, dtype, precision, False)
        memory[name] = held_bytes(opt)
        del params, opt
        gc.collect()
    timing = {}
    for path in args.paths.split(","):
        rows = [(name, make(shapes, dtype, precision, path == "compiled"))
                for name, dtype, precision in ROWS]
        for _ in range(args.warmup):
            for _, (_, opt) in rows:
                opt.step()
        times = {name: [] for name, _ in rows}
        for _ in range(args.repeats):
            for name, (_, opt) in rows:
                t0 = time.perf_counter()
                opt.step()
                times[name].append(time.perf_counter() - t0)
        anchor = times[ROWS[0][0]]
        timing[path] = {name: (statistics.median(t), statistics.median(
            [a / b for a, b in zip(t, anchor)])) for name, t in times.items()}
        del rows
        gc.collect()
    lines = [BEGIN, "## Mixed precision (issue 16): bfloat16 parameters, `precision=`", "",
             f"Made by: `python benchmarks/mixed_precision.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"{label}: {len(shapes)} tensors, {numel / 1e6:.1f}M values; layerwise `lamb`; "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads. Memory: bytes held "
             "by the optimizer's buffers after the first step (parameters, gradients, m, v, "
             "masters, with the layout's padding), measured one optimizer at a time. Time: rows "
             f"of a path timed interleaved, {args.repeats} repeats; ratio to the float32 row "
             "per repeat, median.", "",
             "| parameters | held MiB | B / value | / float32 | "
             + " | ".join(f"{p} ms | {p} / float32" for p in timing) + " |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---: | ---:" for _ in timing) + " |"]
    base = memory[ROWS[0][0]]
    for name, _, _ in ROWS:
        cells = [f"{memory[name] / 2 ** 20:.0f}", f"{memory[name] / numel:.2f}",
                 f"{memory[name] / base:.2f}"]
        for p in timing:
            ms, ratio = timing[p][name]
            cells += [f"{1e3 * ms:.1f}", f"{ratio:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", END]
    section = "\n".join(lines)
    print(section)
    out = Path(args.out)
    text = out.read_text() if out.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
