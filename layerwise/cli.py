"""The ``layerwise`` command line (LANGUAGE.md section 9).

Every user error (a bad program, a missing file) prints one or more clear
lines and exits with status 1 (``check``) or 2 (usage and input errors);
never a Python traceback. ``check`` reports every file -- one that cannot
be read, is not valid UTF-8 or extends a parent that cannot be used is
reported like a program that does not check -- and goes on with the next.
``train`` and ``ablate`` (the real-data tasks, ``layerwise.train`` and
``layerwise.ablate``) print exactly one line for a bad input: a missing or
invalid SPEC, an unknown task, a batch size larger than the training set,
an unknown hyper name, a learning rate or hyper value that is not a finite
number, an ``--adapt`` value that is not an adaptation (or one that cannot
be applied to an optimizer of the grid), a ``--threads``/``--jobs`` count
above the CPUs, an ``--out`` that cannot be written (a directory where a
file is expected or the reverse, a device, an unwritable folder, a file
that is not a run record, a folder holding another grid's records), or a
missing ``layerwise[tasks]`` dependency. All of these are found before any
training starts, and nothing is written.

Anything else that goes wrong (a bug) prints one line, ``layerwise:
internal error: TYPE: MESSAGE (please report)``, and exits with status 2;
Ctrl-C prints ``layerwise: interrupted`` and exits with status 130.
"""
from __future__ import annotations

import argparse
import math
import os
import stat
import sys

from .errors import SpecError
from .spec import load, parse, preset_summary, presets

__all__ = ["main"]


def _cannot_read(path: str, err: BaseException) -> str:
    why = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return f"{path}: cannot read: {why}"


def _check_one(path: str) -> bool:
    """Check one file for ``layerwise check``; print its result; True if it is ok."""
    from .extends import read_source

    try:
        st = os.stat(path)
    except (OSError, ValueError) as err:            # missing, a bad name (NUL), ...
        print(_cannot_read(path, err), file=sys.stderr)
        return False
    if not stat.S_ISREG(st.st_mode):                 # a directory, a FIFO (would block), ...
        why = "is a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        print(f"{path}: cannot read: {why}", file=sys.stderr)
        return False
    try:
        spec = parse(read_source(path), path)
    except SpecError as err:                         # also: not UTF-8, a bad parent
        for line in err.lines():
            print(line, file=sys.stderr)
        return False
    except OSError as err:                           # a file it uses cannot be read
        name = f" {err.filename}" if err.filename and str(err.filename) != path else ""
        print(f"{path}: cannot read{name}: {err.strerror or err}", file=sys.stderr)
        return False
    except ValueError as err:
        text = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"{path}: error: {text}", file=sys.stderr)
        return False
    for note in spec.program.notes:
        s = note.span
        print(f"{s.filename}:{s.line}:{s.column}: note: {note.message}")
    print(f"{path}: ok")
    return True


def _cmd_check(args) -> int:
    failed = False
    for path in args.files:
        if not _check_one(path):
            failed = True
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
    return f"layerwise: error: {_first_line(err)}"


def _finite_option(option: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise _InputError(f"{option} {value}: not a finite number")


def _save_elsewhere(record: dict, out: str, err: OSError) -> str:
    """The record could not be written to ``out`` after the run: keep it in a
    temporary file instead (so the run is not lost) and say where."""
    import tempfile

    from .train import write_record

    why = err.strerror or str(err)
    try:
        fd, spare = tempfile.mkstemp(prefix="layerwise-record-", suffix=".json")
        os.close(fd)
        write_record(record, spare)
    except OSError:
        return f"layerwise: error: --out {out}: cannot write the record: {why}; the run is lost"
    return (f"layerwise: error: --out {out}: cannot write the record: {why}; "
            f"it was saved to {spare} instead")


def _cmd_train(args) -> int:
    _need_task_deps("train")
    from .tasks import get_task
    from .train import (check_record_path, check_seed, check_threads, parse_hyper,
                        resolve_spec, train, write_record)

    # every input and the output path are checked before training
    _finite_option("--lr", args.lr)
    check_seed(args.seed, "--seed")
    check_threads(args.threads, "--threads")
    hypers = dict(parse_hyper(h) for h in args.hyper)
    task = get_task(args.task)
    spec = resolve_spec(args.optimizer)
    batch = task.default_batch_size if args.batch_size is None else args.batch_size
    out = args.out or f"runs/{task.name}_{spec.name}_b{batch}.json"
    check_record_path(out, "--out")
    record = train(task, spec, progress=not args.quiet, threads=args.threads,
                   batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
                   warmup_steps=args.warmup_steps, hypers=hypers, lr_rule=args.lr_rule,
                   seed=args.seed, compile=args.compile, max_steps=args.max_steps,
                   eval_every=args.eval_every)
    cfg, final = record["config"], record["final"]
    try:
        path = write_record(record, out)
    except OSError as err:
        print(_save_elsewhere(record, out, err), file=sys.stderr)
        return 2
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
    from .ablate import (DEFAULT_OPTIMIZERS, check_jobs, make_variants, plan_grid,
                         run_ablation, write_plan)
    from .report import parse_targets
    from .tasks import get_task, task_names
    from .train import check_seed, check_threads, parse_hyper

    check_threads(args.threads, "--threads")
    check_jobs(args.jobs, "--jobs")
    check_seed(args.seed, "--seed")
    check_seed(args.seed + args.seeds - 1, "--seed + --seeds - 1")
    tasks = args.task or task_names()
    names = [get_task(t).name for t in tasks]
    targets = parse_targets(args.target, names)
    base_lrs = dict(parse_hyper(x, "--base-lr") for x in args.base_lr)
    variants = make_variants(args.optimizer or DEFAULT_OPTIMIZERS, args.phi or (), base_lrs,
                             args.lr_rule, adaptations=args.adapt)
    grid = dict(tasks=tasks, batch_sizes=args.batch_size, epochs=args.epochs, seed=args.seed,
                seeds=args.seeds, protocol=args.protocol, lr_grid=args.lr_grid,
                warmup_grid=args.warmup_grid, max_steps=args.max_steps,
                eval_every=args.eval_every)
    if args.plan is not None:
        runs = plan_grid(variants, **grid)
        if args.plan == "-":
            n = write_plan(args.out, runs, sys.stdout, args.threads)
        else:
            from .ablate import check_plan_path
            from .train import atomic_output
            check_plan_path(args.plan)
            with atomic_output(args.plan) as tmp, open(tmp, "w", encoding="utf-8") as fh:
                n = write_plan(args.out, runs, fh, args.threads)
        print(f"{n} of {len(runs)} runs to do (the others have records in {args.out}); then: "
              f"layerwise report {args.out}", file=sys.stderr)
        return 0
    rows = run_ablation(args.out, variants, jobs=args.jobs, threads=args.threads,
                        progress=not args.quiet, targets=targets, **grid)
    return _print_results(args.out, len(rows), with_runs=True)


def _cmd_run_cell(args) -> int:
    _need_task_deps("run-cell")
    from .ablate import run_cell_json
    from .train import check_threads

    check_threads(args.threads, "--threads")
    path, trained = run_cell_json(args.out, args.config, args.threads)
    print(f"{'wrote' if trained else 'already there, not run again:'} {path}")
    return 0


def _cmd_report(args) -> int:
    _need_task_deps("report")
    from .ablate import write_report
    from .report import parse_targets

    rows = write_report(args.dir, targets=parse_targets(args.target))
    return _print_results(args.dir, len(rows), with_runs=False)


def _print_results(out_dir: str, runs: int, with_runs: bool) -> int:
    """Print the tables ablate (``with_runs``: it wrote run records too) and report
    wrote in ``out_dir``, and what they wrote."""
    from pathlib import Path
    out = Path(out_dir)
    tail = f", plots and {out / 'runs'}/" if with_runs else " and plots"
    print((out / "results.md").read_text(encoding="utf-8"), end="")
    print(f"{runs} runs; wrote {out / 'results.csv'}, {out / 'summary.csv'}, "
          f"{out / 'results.md'}{tail}")
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

    p = sub.add_parser("train", help="train a task (built-in or your own) with a preset "
                                     "or .lw file; write a JSON record of the run")
    p.add_argument("--task", required=True,
                   help="a built-in task (digits, charlm, mlm), FILE.py[:FUNC] or MODULE:FUNC")
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
    p.add_argument("--eval-every", type=_positive_int, metavar="K",
                   help="evaluate the test split every K steps (default: about 20 times)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("ablate", help="optimizer x adaptation x batch-size grid (seeds, "
                                      "protocols): tables and plots in DIR")
    p.add_argument("--task", nargs="+", action="extend", metavar="T",
                   help="tasks: built-in names, FILE.py[:FUNC] or MODULE:FUNC "
                        "(default: every built-in task)")
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
    p.add_argument("--seeds", type=_positive_int, default=1, metavar="N",
                   help="runs per cell, seeds SEED .. SEED+N-1 (model init and data order); "
                        "tables show mean +- sd (default: 1)")
    p.add_argument("--protocol", choices=("scaled", "tuned"), default="scaled",
                   help="scaled: one base LR scaled by the LR rule (default); tuned: a grid "
                        "of LRs (and warm-ups) per batch size, chosen on the val split")
    p.add_argument("--lr-grid", nargs="+", action="extend", type=float, metavar="F",
                   help="tuned: factors of the scaled LR to try (default: 0.25 0.5 1 2 4)")
    p.add_argument("--warmup-grid", nargs="+", action="extend", type=float, metavar="FRAC",
                   help="tuned: warm-up lengths to try, as fractions of a run's steps "
                        "(default: 0.1 only)")
    p.add_argument("--eval-every", type=_positive_int, metavar="K",
                   help="evaluate the test split every K steps (default: about 20 times a "
                        "run), for steps to target")
    p.add_argument("--target", nargs="+", action="extend", default=[], metavar="[TASK=]X",
                   help="steps-to-target target of the test metric (default: each task's)")
    p.add_argument("--plan", metavar="FILE",
                   help="do not train: write one 'layerwise run-cell' command per run without "
                        "a record to FILE (- for stdout), for a cluster scheduler; then "
                        "'layerwise report DIR'")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_ablate)

    p = sub.add_parser("run-cell", help="run one run of an ablation plan (a line of "
                                        "'layerwise ablate --plan')")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--threads", type=_positive_int, default=1)
    p.add_argument("config", metavar="JSON")
    p.set_defaults(func=_cmd_run_cell)

    p = sub.add_parser("report", help="rebuild an ablation's tables and plots from the run "
                                      "records in DIR/runs")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--target", nargs="+", action="extend", default=[], metavar="[TASK=]X",
                   help="steps-to-target target of the test metric (default: each task's)")
    p.set_defaults(func=_cmd_report)


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
    from . import noise_scale
    noise_scale.add_parser(sub)
    return parser


def _internal_error(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"layerwise: internal error: {type(err).__name__}: {text or '-'} (please report)"


def _run(args) -> int:
    from . import noise_scale
    if args.func in (_cmd_train, _cmd_ablate, _cmd_run_cell, _cmd_report, noise_scale.run):
        from .ablate import CellFailed

        try:
            return args.func(args)
        except (_InputError, SpecError, FileNotFoundError, ValueError, CellFailed) as err:
            print(_one_line(err), file=sys.stderr)
            return 2
        except OSError as err:
            print(f"layerwise: error: {_os_error(err)}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except SpecError as err:
        for line in err.lines():
            print(line, file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"layerwise: error: {_first_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"layerwise: error: {_os_error(err, 'cannot read: ')}", file=sys.stderr)
        return 2


def _os_error(err: OSError, doing: str = "") -> str:
    """``FILE: DOING WHY`` for an OSError (no ``FILE: `` when it names none)."""
    return f"{str(err.filename) + ': ' if err.filename else ''}{doing}{err.strerror or err}"


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Usage errors exit through argparse (``SystemExit(2)``); user errors
    return 1 or 2 after printing one line (or one SpecError block); any
    other exception returns 2 after one ``layerwise: internal error: ...``
    line; Ctrl-C returns 130.
    """
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("layerwise: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:                      # stdout closed early (| head): stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 1
    except Exception as err:                     # a bug: one line, never a traceback
        try:
            print(_internal_error(err), file=sys.stderr)
        except Exception:
            pass
        return 2
