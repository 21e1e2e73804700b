"""Optimizer step time on BERT-shaped parameter sets, side by side, against the bandwidth floor.

Usage (writes benchmarks/RESULTS.md and RESULTS.json)::

    python benchmarks/step_time.py                       # CPU: everything (~15 min)
    python benchmarks/step_time.py --sets base --no-probes --repeats 5
    python benchmarks/step_time.py --device cuda         # the same comparison on a GPU

Parameter sets (float32, weights randn*0.02): ``small`` (BERT-small, hidden
512, 4 layers), ``base`` (BERT-base, 199 tensors, 109.5M values), ``large``
(BERT-large, hidden 1024, 24 layers) and ``many`` (1,000 tensors of 256
values). For each set the methods run in groups, *interleaved*: every repeat
times one step of each method of the group in turn, and a method's ratio to
its group's torch.optim AdamW (and, in the first group, to the floor) is
taken per repeat from steps run back to back, then summarised by its median:
a machine whose speed drifts (these are shared) moves both alike.

Methods: layerwise ``lamb`` and ``lars``, compiled and eager; the programs
with units (``lamb_rowwise``: a trust ratio per row; ``adafactor``: factored
row and column second moments), compiled and eager, paired with compiled
``lamb`` as well as with AdamW; torch.optim
AdamW with ``fused=True`` and ``foreach=True`` (the anchors of issue 11);
third-party LAMB/LARS (pytorch_optimizer, torch_optimizer; apex FusedLAMB on
CUDA when installed); and "fresh gradients" rows: a new ``.grad`` tensor
every step (as after ``zero_grad(set_to_none=True)`` and backward), for
layerwise lamb and fused AdamW. With persistent gradients layerwise reads
them in place (``.grad`` is a view of its buffer after the first step);
fresh ones are copied in (12 B/parameter more).

The floor: one call of a compiled streaming kernel over flat arrays that
reads four and writes three (``w += g; m += g; v += g``): the 28 B/parameter
a one-pass LAMB step would move. LAMB needs two passes over a layer larger
than the cache (the trust ratio needs ||u|| of the whole layer before any
element of w is written): at least 40 B/parameter, 1.43 x the floor.

Probes, each in a fresh process (``benchmarks/probes.py``): the cold compile
time of the lamb step (empty inductor cache) on BERT-small, -base and
-large (three runs each, interleaved; medians), and the memory a compiled
lamb step adds (CPU: resident set high water mark; CUDA: the allocator's
peak).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from report import markdown  # noqa: E402

UNITS_LAMB = "layerwise lamb (compiled), beside the units"
SETS = {"small": (512, 4), "base": (768, 12), "large": (1024, 24), "many": None}


def bert_shapes(hidden: int, layers: int, vocab: int = 30522, max_pos: int = 512) -> list[tuple]:
    """Parameter shapes of a BERT encoder (Devlin et al. 2019) with a pooler.

    BERT-base (768, 12): 199 tensors, 109.5M parameters.
    """
    shapes = [(vocab, hidden), (max_pos, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4          # q, k, v, attention output
        shapes += [(hidden,), (hidden,)]                     # attention LayerNorm
        shapes += [(4 * hidden, hidden), (4 * hidden,)]      # intermediate
        shapes += [(hidden, 4 * hidden), (hidden,)]          # output
        shapes += [(hidden,), (hidden,)]                     # output LayerNorm
    shapes += [(hidden, hidden), (hidden,)]                  # pooler
    return shapes


def set_shapes(name: str) -> list[tuple]:
    """The parameter shapes of set ``name`` (see the module docstring)."""
    return [(256,)] * 1000 if name == "many" else bert_shapes(*SETS[name])


def make_params(shapes, device: str = "cpu", seed: int = 0) -> list[torch.nn.Parameter]:
    """float32 parameters (randn*0.02) with gradients (randn*1e-3), seeded."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device))
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(device)
        params.append(p)
    return params


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def methods(device: str) -> list[list[tuple[str, bool, callable]]]:
    """Groups of (label, fresh gradients?, factory(params) -> step callable), in
    report order. The methods of a group are timed interleaved, step by step;
    the first method of the first group is the floor's neighbour, and each
    group's torch.optim AdamW is the anchor its other rows are paired with."""
    import layerwise as lw

    def lw_opt(spec, compile):
        return lambda ps: lw.Optimizer(ps, spec, compile=compile).step

    def adamw(**kw):
        return lambda ps: torch.optim.AdamW(ps, lr=1e-3, **kw).step

    groups = [[("layerwise lamb (compiled)", False, lw_opt("lamb", True)),
               ("torch.optim.AdamW (fused)", False, adamw(fused=True))],
              [("layerwise lamb (eager)", False, lw_opt("lamb", False)),
               ("torch.optim.AdamW (foreach)", False, adamw(foreach=True))],
              [("layerwise lamb (compiled), fresh gradients", True, lw_opt("lamb", True)),
               ("torch.optim.AdamW (fused), fresh gradients", True, adamw(fused=True))],
              [("layerwise lars (compiled)", False, lw_opt("lars", True)),
               ("layerwise lars (eager)", False, lw_opt("lars", False)),
               ("torch.optim.AdamW (fused), beside lars", False, adamw(fused=True))],
              # programs with units (LANGUAGE.md section 10), paired with lamb too
              [(UNITS_LAMB, False, lw_opt("lamb", True)),
               ("layerwise lamb_rowwise (compiled)", False, lw_opt("lamb_rowwise", True)),
               ("layerwise adafactor (compiled)", False, lw_opt("adafactor", True)),
               ("layerwise lamb_rowwise (eager)", False, lw_opt("lamb_rowwise", False)),
               ("layerwise adafactor (eager)", False, lw_opt("adafactor", False)),
               ("torch.optim.AdamW (fused), beside the units", False, adamw(fused=True))]]
    others = []
    try:
        import pytorch_optimizer as po
        others += [("pytorch_optimizer Lamb", False,
                    lambda ps: po.Lamb(ps, lr=1e-3, weight_decay=0.01).step),
                   ("pytorch_optimizer LARS", False,
                    lambda ps: po.LARS(ps, lr=1e-3, weight_decay=1e-4).step)]
    except ImportError:
        print("pytorch_optimizer not installed: skipped", file=sys.stderr)
    try:
        import torch_optimizer as to
        others += [("torch_optimizer Lamb", False,
                    lambda ps: to.Lamb(ps, lr=1e-3, weight_decay=0.01).step)]
    except ImportError:
        print("torch_optimizer not installed: skipped", file=sys.stderr)
    if device.startswith("cuda"):
        try:
            from apex.optimizers import FusedLAMB
            others += [("apex FusedLAMB", False,
                        lambda ps: FusedLAMB(ps, lr=1e-3, weight_decay=0.01).step)]
        except ImportError:
            print("apex not installed: FusedLAMB skipped", file=sys.stderr)
    if others:
        groups.append(others + [("torch.optim.AdamW (fused), beside the third-party", False,
                                  adamw(fused=True))])
    return groups


def floor_step(numel: int, device: str):
    """The streaming kernel that sets the floor: read w, g, m, v; write w, m, v,
    over flat arrays of ``numel`` elements in one call."""
    w, g, m, v = (torch.rand(numel, device=device) for _ in range(4))

    @torch.compile(dynamic=False)
    def stream(w, g, m, v):
        w.add_(g)
        m.add_(g)
        v.add_(g)

    return lambda: stream(w, g, m, v)


def _stepper(factory, fresh: bool, shapes, device: str):
    """A step callable on fresh parameters; with ``fresh``, new gradient tensors
    (pre-made, two alternating sets) are assigned before every step."""
    params = make_params(shapes, device)
    step = factory(params)
    if not fresh:
        return step
    # two sets of gradient tensors, assigned alternately: every step sees new tensors
    spare = [[torch.randn_like(p) * 1e-3 for p in params] for _ in range(2)]
    turn = [0]

    def fresh_step():
        grads = spare[turn[0] % 2]
        turn[0] += 1
        for p, g in zip(params, grads):
            p.grad = g
        step()

    return fresh_step


def run_set(name: str, device: str, warmup: int, repeats: int, only: set[str] | None) -> dict:
    """Time every group of methods on set ``name``: the methods of a group step
    in turn, ``repeats`` times (the first group with the floor kernel too).
    Each method's ratio to its group's AdamW (and, in the first group, to the
    floor) is taken per repeat, from steps run back to back, and summarised by
    its median and minimum: a machine whose speed drifts moves both alike."""
    shapes = set_shapes(name)
    numel = sum(torch.Size(s).numel() for s in shapes)
    out = {"set": name, "tensors": len(shapes), "numel": numel, "methods": {}}
    for k, group in enumerate(methods(device)):
        group = [m for m in group if not only or any(o in m[0] for o in only)
                 or m[0].startswith("torch.optim.AdamW")]
        steps = {label: _stepper(factory, fresh, shapes, device)
                 for label, fresh, factory in group}
        if k == 0:
            steps["floor"] = floor_step(numel, device)
        for step in steps.values():
            for _ in range(warmup):
                step()
        _sync(device)
        timed: dict[str, list[float]] = {label: [] for label in steps}
        for _ in range(repeats):
            for label, step in steps.items():
                t0 = time.perf_counter()
                step()
                _sync(device)
                timed[label].append(time.perf_counter() - t0)
        anchor = next(label for label in steps if label.startswith("torch.optim.AdamW"))
        for label, ts in timed.items():
            if label == "floor":
                continue
            row = {"median_s": statistics.median(ts), "min_s": min(ts), "anchor": anchor,
                   "vs_anchor": _paired(ts, timed[anchor])}
            if "floor" in timed:
                row["vs_floor"] = _paired(ts, timed["floor"])
            if UNITS_LAMB in timed and label != UNITS_LAMB:
                row["vs_lamb"] = _paired(ts, timed[UNITS_LAMB])
            out["methods"][label] = row
            print(f"{name:5s} {label:50s} median {row['median_s'] * 1e3:9.2f} ms, "
                  f"x{row['vs_anchor']['median']:.2f} paired with {anchor}",
                  file=sys.stderr, flush=True)
        if "floor" in timed:
            out["floor_s"] = statistics.median(timed["floor"])
            out["bandwidth_GBps"] = 28 * numel / out["floor_s"] / 1e9
        del steps
    return out


def _paired(times: list[float], anchor: list[float]) -> dict:
    ratios = [a / b for a, b in zip(times, anchor)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="base,many,small")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (no GPU here: CPU only)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--only", default="", help="comma-separated substrings of method labels")
    parser.add_argument("--no-probes", action="store_true",
                        help="skip the compile-time and memory probes")
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS.md"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    only = {o for o in args.only.split(",") if o} or None
    results = [run_set(s, args.device, args.warmup, args.repeats, only)
               for s in args.sets.split(",")]
    probes = {}
    if not args.no_probes:
        import probes as probe
        # three cold compiles per set, interleaved: one varies by +-30% on a shared machine
        runs = {s: [] for s in ("small", "base", "large")}
        for _ in range(3):
            for s in runs:
                runs[s].append(probe.compile_time(s, args.device))
        probes["compile_s"] = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                               | {"all": [r["compile"] for r in rs]} for s, rs in runs.items()}
        probes["memory"] = probe.step_memory("base", args.device)
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(results, probes, args.device, argv_text)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
         "results": results, **probes}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
