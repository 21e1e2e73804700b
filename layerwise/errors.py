"""Errors in layerwise programs: :class:`SpecError` and source spans.

Every syntax node keeps a :class:`Span`; every error in a program is built
from one, so the message can always quote the offending line with a caret.
"""
from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from typing import Collection, Iterable, Sequence

__all__ = ["Span", "SpecError", "Problem", "suggest", "SUGGEST_MAX_CANDIDATES",
           "SUGGEST_MAX_LENGTH"]


@functools.lru_cache(maxsize=16)
def _line_starts(source: str) -> list[int]:
    r"""Offsets where each line of ``source`` starts (lines end at ``\n`` only).

    Cached: every span of a file shares its ``source``, so quoting many
    problems of one file scans it once.
    """
    return [0, *(m.end() for m in re.finditer("\n", source))]


#: str.splitlines() breaks at these besides \n; a quoted line shows them as spaces.
_NOT_LINE_ENDS = {ord(c): " " for c in "\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


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
        r"""The text of ``line`` without its newline ('' if unknown).

        Lines end only at ``\n`` (a ``\r`` before it is dropped), as line
        numbers count them: form feed, ``\v``, ``\x1c``-``\x1e``, ``\x85``
        and U+2028/2029 are characters of a line, not ends of lines.
        """
        starts = _line_starts(self.source)
        if not 0 < self.line <= len(starts):
            return ""
        start = starts[self.line - 1]
        end = starts[self.line] - 1 if self.line < len(starts) else len(self.source)
        return self.source[start:end].removesuffix("\r")


@dataclass(frozen=True)
class Problem:
    """One error in a program: where it is and what is wrong."""

    span: Span
    message: str

    def render(self) -> str:
        """``FILE:LINE:COL: message`` followed by the quoted line and a caret."""
        head = f"{self.span.filename}:{self.span.line}:{self.span.column}: {self.message}"
        # characters that str.splitlines() (and so a reader of the message)
        # takes for line ends are shown as spaces, keeping the caret aligned
        text = self.span.source_line().translate(_NOT_LINE_ENDS)
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


#: :func:`suggest` compares a name with at most this many known names, each
#: at most :data:`SUGGEST_MAX_LENGTH` long, and suggests nothing beyond: a
#: program with thousands of unknown names in a scope of thousands of names
#: would otherwise take time quadratic in its length.
SUGGEST_MAX_CANDIDATES = 500
SUGGEST_MAX_LENGTH = 100


def suggest(name: str, known: Iterable[str]) -> str:
    """A ``"; did you mean 'x'?"`` suffix naming the closest known name, or ''.

    Gives '' without comparing when ``known`` holds more than
    :data:`SUGGEST_MAX_CANDIDATES` names or ``name`` is longer than
    :data:`SUGGEST_MAX_LENGTH`, so one call costs at most a bounded time.
    """
    if len(name) > SUGGEST_MAX_LENGTH:
        return ""
    if not isinstance(known, Collection):
        known = list(known)
    if len(known) > SUGGEST_MAX_CANDIDATES:
        return ""
    candidates = {k for k in known if len(k) <= SUGGEST_MAX_LENGTH}
    # ties are broken by the names themselves, so the order of ``known`` is irrelevant
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""
