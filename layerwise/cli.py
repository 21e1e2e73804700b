"""The ``layerwise`` command line (LANGUAGE.md section 9).

Every user error (a bad program, a missing file) prints one or more clear
lines and exits with status 1 (``check``) or 2 (usage and input errors);
never a Python traceback.
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
            parse(text, path)
        except SpecError as err:
            for line in err.lines():
                print(line, file=sys.stderr)
            failed = True
        else:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as err:
        for line in err.lines():
            print(line, file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"layerwise: error: {err}", file=sys.stderr)
        return 2
