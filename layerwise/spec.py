"""A checked optimizer program and how to get one: ``load``, ``parse``, ``presets``.

:class:`Spec` is what ``lw.Optimizer`` accepts: a checked program plus the
merged declarations it came from, so that :meth:`Spec.override` can apply
more declarations with the same rules as ``extends`` (LANGUAGE.md
section 7).
"""
from __future__ import annotations

import os
from pathlib import Path

from .check import CheckedProgram, check_declarations, check_program
from .errors import Problem
from .extends import Declarations, apply_override, copy_declarations, read_source
from .resources import preset_names, preset_path
from .syntax import parse_fragment, parse_text

__all__ = ["Spec", "load", "parse", "presets", "preset_summary"]


class Spec:
    """A checked layerwise program.

    Attributes:
        program: the :class:`~layerwise.check.CheckedProgram`.
        name: the optimizer's name.
        filename: where it was read from (or the name given to ``parse``).
    """

    def __init__(self, program: CheckedProgram, declarations: Declarations | None,
                 filename: str):
        self.program = program
        self._declarations = declarations
        self.filename = filename

    @property
    def name(self) -> str:
        return self.program.name

    @property
    def hypers(self) -> dict[str, float]:
        """Hyperparameter names and their defaults, in declaration order."""
        return {h.name: h.default for h in self.program.hypers}

    def override(self, text: str, filename: str = "<override>") -> "Spec":
        """A new spec: this one with ``text``'s declarations applied as a child would.

        ``text`` may redeclare hypers (default or range), replace defs, add
        hypers, states, defs, rules and watches, or replace the step; it
        may start with ``optimizer NAME`` to rename the result.

        Raises:
            SpecError: if ``text`` has a syntax error or the result does not check.
        """
        if self._declarations is None:
            raise ValueError(f"spec '{self.name}' was composed in Python (lw.adapt); write it "
                             "as a program with 'adapt NAME' to override it")
        problems: list[Problem] = []
        merged = apply_override(copy_declarations(self._declarations),
                                parse_fragment(text, filename), problems)
        return Spec(check_declarations(merged, filename, problems), merged, filename)

    def watching(self, *names: str) -> "Spec":
        """A new spec that also watches ``names``: the same as
        ``override("watch " + ", ".join(names))``.

        A name may be a layer-kind local of the step or a ``def`` that the
        step calls exactly once (``lw.load("lamb").watching("trust")``
        records LAMB's trust ratio as ``watched["trust"]``); the program and
        its updates are unchanged.

        Raises:
            SpecError: a name cannot be watched (unknown, not one number per
                parameter, a def called more or less than once, ...).
            ValueError: no names, or a name that is not an identifier.
        """
        if not names:
            raise ValueError("watching() needs at least one name")
        for n in names:
            if not isinstance(n, str) or not n.isidentifier():
                raise ValueError(f"watching(): {n!r} is not a name")
        return self.override("watch " + ", ".join(names), filename="<watching>")

    def to_text(self) -> str:
        """The checked program as flat text (no extends, defs inlined)."""
        return self.program.to_text()

    def __repr__(self) -> str:
        return f"<layerwise.Spec {self.name!r} from {self.filename}>"


def parse(text: str, filename: str = "<string>") -> Spec:
    """Parse and check program ``text``; ``filename`` names it in errors and anchors
    relative ``extends`` paths.

    Raises:
        SpecError: with file, line and column of every problem found.
    """
    program, decls = check_program(parse_text(text, filename))
    return Spec(program, decls, filename)


def load(name_or_path: str | os.PathLike) -> Spec:
    """Load a preset by name (``"lamb"``) or a ``.lw`` file by path.

    Raises:
        FileNotFoundError: if it is neither a preset nor an existing file
            (the message lists the presets).
        SpecError: if the program does not check, or the file is not valid
            UTF-8, is larger than ``layerwise.extends.MAX_FILE_BYTES`` or
            cannot be read (at the invalid byte's line and column, else 1:1).
    """
    text = str(name_or_path)
    path = preset_path(text) if isinstance(name_or_path, str) else None
    if path is None:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"'{text}' is neither a preset nor a file; presets: {', '.join(preset_names())}")
    return parse(read_source(path), str(path))


def presets() -> list[str]:
    """Names of the shipped presets (``presets/*.lw``), sorted."""
    return preset_names()


def preset_summary(name: str) -> str:
    """The first sentence of the comment under a preset's ``optimizer`` line.

    Raises:
        KeyError: if there is no preset ``name``.
    """
    path = preset_path(name)
    if path is None:
        raise KeyError(name)
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        if not line.startswith("#") or not line.strip("# "):
            if words:
                break
            continue
        words.append(line.lstrip("#").strip())
        if words[-1].endswith("."):
            break
    return " ".join(words)
