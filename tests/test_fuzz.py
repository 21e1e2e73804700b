"""Fuzzing the front end (issue 14): mutated presets and random token soup.

For every input, ``lw.parse`` either returns a program or raises
``SpecError`` (nothing else), within 2 s; every problem in the file being
checked quotes the file's real line ``line`` (lines counted by ``\\n``
only; a CR before the ``\\n`` is not quoted) and has a column inside it (or just after it). Programs that still
check are built into an eager ``lw.Optimizer`` and stepped once: only
``ValueError`` may come out. The ``check`` command on the same inputs
prints no traceback and exits 0 or 1.

Examples are derandomized (the same ones every run), so CI is stable and a
failure reproduces; ``max_examples`` keeps the whole file under a minute.
"""
from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import layerwise as lw
from layerwise.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "presets").glob("*.lw"), *(ROOT / "examples" / "variants").glob("*.lw"),
                  *(ROOT / "examples" / "migrating").glob("*.lw")])
TEXTS = [p.read_text(encoding="utf-8") for p in SOURCES]
FILENAME = "fuzz.lw"

#: pieces inserted by the mutations: the language's tokens, deep nesting,
#: huge numbers, odd whitespace and line breaks, names that are Python
#: keywords or NFKC-equal, hostile regexes, self-reference
PIECES = ["(", ")", "{", "}", "[", "]", ",", "^", "-", "+", "*", "/", "=", "<", ">", "~", "#",
          "\n", " ", "\t", "\r", "\x0c", "\x0b", "\x1c", "\x85", "\u2028", "\u2029", "\ufeff",
          "abs(", "norm(", "sum(", "where(", "min(", "clip(", "g", "w", "t", "m", "v", "lr",
          "row", "col", "rows", "cols", "ndim", "numel", "name", "row_block",
          "1", "0", "1e999", "-1e-999", "99999999999999999999", "0.5", "inf", "nan", "1e",
          "optimizer x\n", "adaptation a\n", "extends \"lamb\"\n", "adapt trust\n",
          "hyper ", "state ", "def ", "watch ", "step {\n", "for ", " in [0, 1)", " : row",
          " : col", " : layer", "class", "self", "lambda", "None", "params", "param_names",
          "\ufb01", "fi", "\u00e9", "def f(x) = f(x)\n", "def h(x) = x + x\n",
          'for name ~ "(a+)+$" {\n', 'for name ~ "a{99999999999}" {\n', "- " * 300,
          "abs(" * 150, "(" * 150, ")" * 150, "x + " * 300, "2 ^ " * 300]


@st.composite
def mutated(draw) -> str:
    """A preset or example program with 1-4 random edits, or token soup."""
    if draw(st.integers(0, 9)) == 0:
        return "".join(draw(st.lists(st.sampled_from(PIECES), max_size=40)))
    text = draw(st.sampled_from(TEXTS))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        if op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 20)):]
        else:
            piece = draw(st.sampled_from(PIECES))
            cut = at + (draw(st.integers(1, 10)) if op == "replace" else 0)
            text = text[:at] + piece + text[cut:]
    return text


def _parse(text: str) -> lw.Spec | None:
    """``lw.parse(text)``: the program, or None after checking its SpecError."""
    start = time.perf_counter()
    try:
        return lw.parse(text, FILENAME)
    except lw.SpecError as err:
        lines = (text[1:] if text.startswith("\ufeff") else text).split("\n")
        for p in err.problems:
            if p.span.filename != FILENAME:
                continue
            assert 1 <= p.span.line <= len(lines), (p.span, len(lines))
            real = lines[p.span.line - 1].removesuffix("\r")     # CRLF files: the line without CR
            assert p.span.source_line() == real, (p.span.line, p.span.source_line(), real)
            assert 1 <= p.span.column <= len(real) + 1, (p.span, real)
        return None
    finally:
        took = time.perf_counter() - start
        assert took < 2.0, f"lw.parse took {took:.1f} s"


@settings(max_examples=2000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated())
def test_parse_gives_a_program_or_a_spec_error_quoting_the_real_line(text):
    _parse(text)


def _model_params():
    gen = torch.Generator().manual_seed(0)
    params = [("layer.weight", torch.randn(4, 3, generator=gen)), ("layer.bias", torch.randn(3, generator=gen)),
              ("scale", torch.randn((), generator=gen))]
    out = []
    for name, p in params:
        p = torch.nn.Parameter(p)
        p.grad = torch.randn(p.shape, generator=gen)
        out.append((name, p))
    return out


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated())
def test_programs_that_check_build_and_step_or_raise_value_error(text):
    spec = _parse(text)
    if spec is None:
        return
    try:
        opt = lw.Optimizer(_model_params(), spec, compile=False)
        opt.step()
    except ValueError:
        pass


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated())
def test_check_command_prints_no_traceback(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / FILENAME
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["check", str(path)])
    printed = out.getvalue() + err.getvalue()
    assert code in (0, 1), (code, printed[-2000:])
    assert "Traceback" not in printed and printed.strip()
