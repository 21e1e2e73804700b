"""The ``layerwise`` command line (LANGUAGE.md section 9).

Every user error (a bad program, a missing file) prints one or more clear
lines and exits with status 1 (``check``) or 2 (usage and input errors);
never a Python traceback. ``train`` and ``ablate`` (the real-data tasks,
``layerwise.train`` and ``layerwise.ablate``) print exactly one line for
a bad input: a missing or invalid SPEC, an unknown task, a batch size
larger than the training set, an unknown hyper name, an ``--adapt`` value
that is not an adaptation (or one that cannot be applied to an optimizer
of the grid), or a missing ``layerwise[tasks]`` dependency.
"""
from __future__ import annotations

import argparse
import sys

from .errors import SpecError
from .spec import load, preset_summary, presets

__all__ = ["main"]


def _cmd_check(args) -> int:
    failed = False
    for path in args.files:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as err:
            print(f"{path}: cannot read: {err.strerror or err}", file=sys.stderr)
            failed = True
            continue
        try:
            from .spec import parse
            spec = parse(text, path)
        except SpecError as err:
            for line in err.lines():
                print(line, file=sys.stderr)
            failed = True
        else:
            for note in spec.program.notes:
                s = note.span
                print(f"{s.filename}:{s.line}:{s.column}: note: {note.message}")
            print(f"{path}: ok")
    return 1 if failed else 0


def _cmd_presets(args) -> int:
    for name in presets():
        print(f"{name:18s} {preset_summary(name)}")
    return 0


def _cmd_show(args) -> int:
    from .lower import lower

    spec = load(args.spec)
    print(f"# checked program '{spec.name}' (from {spec.filename}; defs inlined)")
    print(spec.to_text())
    lowered = lower(spec.program)
    for title, gm in lowered.graphs():
        print(f"# torch.fx graph: {title}")
        print(gm.graph)
    return 0


# ---------------------------------------------------------------- train / ablate
_TASK_DEPS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}


class _InputError(Exception):
    """A bad input of train/ablate, reported as one line with exit status 2."""


def _need_task_deps(command: str) -> None:
    import importlib.util

    missing = [pip for mod, pip in _TASK_DEPS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise _InputError(f"'layerwise {command}' needs {', '.join(missing)}: "
                          "pip install 'layerwise[tasks]'")


def _one_line(err: BaseException) -> str:
    """A user error as one line: the first problem of a SpecError (with a count of the rest)."""
    if isinstance(err, SpecError):
        lines = err.lines()
        more = f" (and {len(lines) - 1} more: layerwise check FILE)" if len(lines) > 1 else ""
        return lines[0] + more
    text = str(err).strip().splitlines()
    return f"layerwise: error: {text[0] if text else type(err).__name__}"


def _cmd_train(args) -> int:
    _need_task_deps("train")
    from .tasks import get_task
    from .train import parse_hyper, train, write_record

    hypers = dict(parse_hyper(h) for h in args.hyper)
    task = get_task(args.task)
    record = train(task, args.optimizer, progress=not args.quiet, threads=args.threads,
                   batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                   warmup_steps=args.warmup_steps, hypers=hypers, lr_rule=args.lr_rule,
                   seed=args.seed, compile=args.compile, max_steps=args.max_steps)
    cfg, final = record["config"], record["final"]
    out = args.out or f"runs/{task.name}_{record['optimizer']['name']}_b{cfg['batch_size']}.json"
    path = write_record(record, out)
    length = (f"{cfg['epochs']} epoch(s)" if cfg["max_steps"] is None
              else f"cut at --max-steps {cfg['max_steps']}")
    print(f"{task.name} {cfg['label']}: batch {cfg['batch_size']}, {length}, "
          f"{record['steps']} steps, peak lr {cfg['lr']:.4g} ({cfg['lr_rule']} rule; "
          f"{cfg['lr_source']}), warm-up {cfg['warmup_steps']} steps")
    if final["diverged"]:
        print(f"validation {final['metric']}: diverged (training loss became non-finite)")
    elif final["metric"] == "accuracy":
        print(f"validation accuracy: {100 * final['value']:.2f}% (loss {final['loss']:.4f})")
    else:
        print(f"validation {final['metric'].replace('_', ' ')}: {final['value']:.4f} "
              f"(loss {final['loss']:.4f} nats)")
    print(f"wall time {record['wall_time_s']:.1f} s; record: {path}")
    return 0


def _cmd_ablate(args) -> int:
    _need_task_deps("ablate")
    from .ablate import DEFAULT_OPTIMIZERS, make_variants, run_ablation
    from .tasks import get_task, task_names
    from .train import parse_hyper

    tasks = args.task or task_names()
    for t in tasks:
        get_task(t)
    base_lrs = dict(parse_hyper(x) for x in args.base_lr)
    variants = make_variants(args.optimizer or DEFAULT_OPTIMIZERS, args.phi or (), base_lrs,
                             args.lr_rule, adaptations=args.adapt)
    rows = run_ablation(args.out, variants, tasks=tasks, batch_sizes=args.batch_size,
                        epochs=args.epochs, seed=args.seed, jobs=args.jobs, threads=args.threads,
                        progress=not args.quiet, max_steps=args.max_steps)
    from pathlib import Path
    out = Path(args.out)
    print((out / "results.md").read_text(encoding="utf-8"), end="")
    print(f"{len(rows)} runs; wrote {out / 'results.csv'}, {out / 'results.md'}, "
          f"{out / 'metric_vs_batch.png'}, trust-ratio plots and {out / 'runs'}/")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _add_train_parsers(sub) -> None:
    import os

    p = sub.add_parser("train", help="train a built-in task (digits, charlm) with a preset "
                                     "or .lw file; write a JSON record of the run")
    p.add_argument("--task", required=True, help="digits or charlm")
    p.add_argument("--optimizer", required=True, metavar="SPEC",
                   help="a preset name or a path to a .lw file")
    p.add_argument("--batch-size", type=int, metavar="N", help="default: the task's")
    p.add_argument("--epochs", type=int, metavar="E", help="default: the task's")
    p.add_argument("--lr", type=float, metavar="X",
                   help="peak learning rate (default: the tuned base LR scaled by the LR rule)")
    p.add_argument("--warmup-steps", type=int, metavar="W",
                   help="linear warm-up steps (default: 10%% of the steps)")
    p.add_argument("--hyper", nargs="+", action="extend", default=[], metavar="NAME=VALUE",
                   help="other hyperparameter values of the program")
    p.add_argument("--lr-rule", choices=("sqrt", "linear", "none"),
                   help="LR scaling with batch size (default: linear for sgd/lars/larc, "
                        "else sqrt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, metavar="N", default=1,
                   help="torch threads (default: 1; the models are tiny, and two threads "
                        "are much slower than one on a busy machine)")
    p.add_argument("--compile", action="store_true",
                   help="run the optimizer step through torch.compile (default: eager)")
    p.add_argument("--out", metavar="FILE.json",
                   help="where to write the record (default: runs/TASK_NAME_bN.json)")
    p.add_argument("--max-steps", type=_positive_int, metavar="N",
                   help="stop after N steps (a quick smoke run)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("ablate", help="optimizer x adaptation x batch-size grid on the built-in "
                                      "tasks: results.csv, results.md and plots in DIR")
    p.add_argument("--task", nargs="+", action="extend", metavar="T",
                   help="tasks (default: all: digits charlm)")
    p.add_argument("--optimizer", nargs="+", action="extend", metavar="SPEC",
                   help="presets or .lw files (default: lamb lars adamw sgd)")
    p.add_argument("--batch-size", nargs="+", action="extend", type=_positive_int,
                   metavar="N", help="batch sizes for every task (default: each task's)")
    p.add_argument("--phi", nargs="+", action="extend", metavar="EXPR",
                   help="add 'def phi(z) = EXPR' variants of each optimizer defining phi")
    p.add_argument("--adapt", nargs="+", action="extend", metavar="NAME",
                   help="run every optimizer once per adaptation: an adaptation preset "
                        "(trust), a .lw file starting 'adaptation NAME', or none (the "
                        "optimizer as it is); default: none")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--epochs", type=_positive_int, metavar="E",
                   help="epochs per run (default: each task's)")
    p.add_argument("--base-lr", nargs="+", action="extend", default=[], metavar="NAME=X",
                   help="base LR (at the task's base batch size) of an optimizer, or of one "
                        "adapted optimizer (NAME: OPTIMIZER+ADAPTATION, e.g. sgd+trust)")
    p.add_argument("--lr-rule", choices=("sqrt", "linear", "none"),
                   help="LR scaling for every optimizer (default: linear for sgd/lars/larc, "
                        "else sqrt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=_positive_int, default=min(2, os.cpu_count() or 1),
                   help="worker processes (default: 2, or 1 on a 1-core machine)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch threads per run (default: 1)")
    p.add_argument("--max-steps", type=_positive_int, metavar="N",
                   help="stop every run after N steps (a quick smoke run)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_ablate)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``layerwise`` command."""
    parser = argparse.ArgumentParser(
        prog="layerwise",
        description="Layerwise-adaptive optimizers (LAMB, LARS, ...) written as text programs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("check", help="parse and check .lw files; errors as FILE:LINE:COL: message")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser("show", help="print the checked program and its lowered graph")
    p.add_argument("spec", metavar="FILE|PRESET")
    p.set_defaults(func=_cmd_show)
    p = sub.add_parser("presets", help="list the shipped presets, one line each")
    p.set_defaults(func=_cmd_presets)
    _add_train_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.func in (_cmd_train, _cmd_ablate):
        try:
            return args.func(args)
        except (_InputError, SpecError, FileNotFoundError, ValueError) as err:
            print(_one_line(err), file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("layerwise: interrupted", file=sys.stderr)
            return 130
    try:
        return args.func(args)
    except SpecError as err:
        for line in err.lines():
            print(line, file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"layerwise: error: {err}", file=sys.stderr)
        return 2
