"""The bad-input corpus: every file under ``tests/bad/`` is an invalid program.

Each file states what the checker must report in header comments, one per
problem, in the order the problems are reported (file, line, column)::

    # expect: LINE:COL: PHRASE
    # expect: OTHER.lw:LINE:COL: PHRASE     (a problem found in another file)

The test asserts that loading the file raises ``SpecError`` whose FIRST
problem is at exactly the first expected line and column, that every
expected problem is reported (and nothing else, so a cascade of follow-on
errors fails the test), and that each message contains its PHRASE.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import layerwise as lw
from layerwise.errors import SpecError

BAD = Path(__file__).parent / "bad"
FILES = sorted(BAD.rglob("*.lw"))
_EXPECT = re.compile(r"^# expect: (?:(?P<file>[^:\s]+\.lw):)?(?P<line>\d+):(?P<col>\d+): "
                     r"(?P<phrase>.+?)\s*$", re.M)


def expectations(path: Path) -> list[tuple[str, int, int, str]]:
    """(file name, line, column, phrase) for each ``# expect:`` line of ``path``."""
    out = []
    for m in _EXPECT.finditer(path.read_text(encoding="utf-8")):
        out.append((m["file"] or path.name, int(m["line"]), int(m["col"]), m["phrase"]))
    return out


def test_corpus_is_large_and_well_formed():
    assert len(FILES) >= 30
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        # every header line that starts like an expectation must parse as one
        headers = [ln for ln in text.splitlines() if ln.startswith("# expect")]
        assert headers and len(headers) == len(expectations(path)), path
    multi = [p for p in FILES if len(expectations(p)) >= 2]
    assert len(multi) >= 2, "need files with several independent errors"


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(BAD)) for p in FILES])
def test_bad_program(path: Path):
    expected = expectations(path)
    with pytest.raises(SpecError) as info:
        lw.load(path)
    err = info.value
    got = [(Path(p.span.filename).name, p.span.line, p.span.column, p.message)
           for p in err.problems]
    report = "\n".join(f"{f}:{ln}:{c}: {m}" for f, ln, c, m in got)

    # the first problem: exact place, on the error itself and on its first problem
    first_file, first_line, first_col, _ = expected[0]
    assert (Path(err.filename).name, err.line, err.column) == (first_file, first_line, first_col), report

    # every independent problem is reported, and nothing else
    assert len(got) == len(expected), report
    for (efile, eline, ecol, phrase), (gfile, gline, gcol, message) in zip(expected, got):
        assert (gfile, gline, gcol) == (efile, eline, ecol), report
        assert phrase in message, report

    # the rendered message quotes the faulty line with a caret under the fault
    first = err.problems[0]
    source_line = first.span.source_line()
    assert source_line, "the span must keep the source to quote it"
    rendered = str(err).splitlines()
    assert rendered[0] == f"{first.span.filename}:{first_line}:{first_col}: {first.message}"
    assert rendered[1] == "    " + source_line
    assert rendered[2].startswith("    " + " " * (first_col - 1) + "^")
    assert rendered[2].strip(" ^") == ""
