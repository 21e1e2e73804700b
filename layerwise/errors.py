"""Errors in layerwise programs: :class:`SpecError` and source spans.

Every syntax node keeps a :class:`Span`; every error in a program is built
from one, so the message can always quote the offending line with a caret.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["Span", "SpecError", "Problem", "suggest"]


@dataclass(frozen=True)
class Span:
    """A place in a program's text.

    ``line`` and ``column`` are 1-based; ``end_column`` is exclusive and
    refers to ``line`` (a span over several lines underlines to the end of
    its first line). ``source`` is the whole text of the file, kept so that
    an error can quote its line; it never takes part in comparisons.
    """

    filename: str
    line: int
    column: int
    end_column: int
    source: str = ""

    def __eq__(self, other):  # spans compare by place, never by the text
        if not isinstance(other, Span):
            return NotImplemented
        return (self.filename, self.line, self.column, self.end_column) == (
            other.filename, other.line, other.column, other.end_column)

    def __hash__(self):
        return hash((self.filename, self.line, self.column, self.end_column))

    def source_line(self) -> str:
        """The text of ``line`` without its newline ('' if unknown)."""
        lines = self.source.splitlines()
        return lines[self.line - 1] if 0 < self.line <= len(lines) else ""


@dataclass(frozen=True)
class Problem:
    """One error in a program: where it is and what is wrong."""

    span: Span
    message: str

    def render(self) -> str:
        """``FILE:LINE:COL: message`` followed by the quoted line and a caret."""
        head = f"{self.span.filename}:{self.span.line}:{self.span.column}: {self.message}"
        text = self.span.source_line()
        if not text:
            return head
        width = max(1, min(self.span.end_column, len(text) + 1) - self.span.column)
        caret = " " * (self.span.column - 1) + "^" * width
        return f"{head}\n    {text}\n    {caret}"


class SpecError(ValueError):
    """An error in a layerwise program (a ``ValueError``).

    Attributes:
        filename, line, column: where the first problem is (1-based line and
            column), as the contract (LANGUAGE.md section 8) requires.
        problems: every independent problem found: those in ``main`` (the
            file being checked) first, then other files' (parents'), each
            file's in line order. The message of the exception renders all
            of them, each with its source line quoted and a caret under it.
    """

    def __init__(self, problems: Sequence[Problem] | Problem, main: str | None = None):
        if isinstance(problems, Problem):
            problems = [problems]
        # the file being checked (``main``) first, then the other files in
        # the order their first problem was found; places in file order
        problems = list(dict.fromkeys(problems))
        files = [main, *(p.span.filename for p in problems)]
        order = {f: i for i, f in reversed(list(enumerate(files)))}
        problems.sort(key=lambda p: (order[p.span.filename], p.span.line, p.span.column))
        if not problems:
            raise ValueError("SpecError needs at least one problem")
        self.problems: list[Problem] = list(problems)
        first = self.problems[0].span
        self.filename: str = first.filename
        self.line: int = first.line
        self.column: int = first.column
        super().__init__("\n".join(p.render() for p in self.problems))

    @property
    def message(self) -> str:
        """The first problem's message, without place or quoted source."""
        return self.problems[0].message

    def lines(self) -> list[str]:
        """One ``FILE:LINE:COL: message`` line per problem (for the CLI)."""
        return [f"{p.span.filename}:{p.span.line}:{p.span.column}: {p.message}"
                for p in self.problems]


def suggest(name: str, known: Iterable[str]) -> str:
    """A ``"; did you mean 'x'?"`` suffix naming the closest known name, or ''."""
    close = difflib.get_close_matches(name, sorted(set(known)), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""
