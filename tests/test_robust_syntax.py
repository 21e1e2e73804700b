"""The parser against hostile input (issue 14, the parser's part).

Deep nesting and long chains either work or give a SpecError at the stated
limit (``MAX_NESTING``, ``MAX_DEPTH``), never a RecursionError; work is
linear in the input; bracket bookkeeping is per parse, so threads do not mix
up messages; quoted lines are the lines that line numbers count; a BOM is
ignored; an unclosed ``(`` is reported at the bracket.
"""
from __future__ import annotations

import pickle
import threading
import time

import pytest
import torch

import layerwise as lw
from layerwise import check, syntax
from layerwise.errors import Problem, Span, SpecError, suggest
from layerwise.syntax import (
    MAX_DEPTH,
    MAX_NESTING,
    Binary,
    Call,
    Name,
    Num,
    Unary,
    expr_depth,
    parse_text,
    walk,
)

HEAD = "optimizer p\nhyper lr = 0.1\nstep {\n"
PREFIX = "  u = "            # the expression starts at column 7 of line 4


def program(expr: str) -> str:
    return HEAD + PREFIX + expr + "\n  w = w - lr * u\n}\n"


def error_of(text: str, filename: str = "p.lw") -> SpecError:
    with pytest.raises(SpecError) as info:
        lw.parse(text, filename)
    return info.value


def place(err: SpecError) -> tuple[int, int, str]:
    return err.line, err.column, err.message


def quoted(err: SpecError) -> list[str]:
    return str(err).split("\n")


# ------------------------------------------------------------ nesting limit
# Each builder nests its construct n levels deep; ``col(k)`` is the column of
# the construct at nesting level k (1-based) on line 4.
NESTED = {
    "minus": (lambda n: "- " * n + "g", lambda k: 7 + 2 * (k - 1)),
    "plus": (lambda n: "+" * n + "g", lambda k: 7 + (k - 1)),
    "abs": (lambda n: "abs(" * n + "g" + ")" * n, lambda k: 7 + 4 * (k - 1)),
    "power": (lambda n: "^".join(["g"] * (n + 1)), lambda k: 7 + 2 * (k - 1)),
    "power_stars": (lambda n: "**".join(["g"] * (n + 1)), lambda k: 7 + 3 * (k - 1)),
    "paren_sum": (lambda n: "(g + " * n + "g" + ")" * n, lambda k: 8 + 5 * (k - 1)),
}
# The checker has its own bound on depth after defs are inlined; the deepest
# tree the whole pipeline must take is the smaller of the two.
PIPELINE_DEPTH = min(MAX_DEPTH, getattr(check, "MAX_EXPRESSION_DEPTH", MAX_DEPTH))


NESTING_MESSAGE = (f"expression nested too deeply: more than {MAX_NESTING} levels of "
                   "operators, calls or '^' (the limit); split it into several assignments")


def test_limits_are_stated():
    assert MAX_NESTING == 200
    assert MAX_DEPTH == 400
    assert "MAX_NESTING" in syntax.__doc__ and "MAX_DEPTH" in syntax.__doc__


@pytest.mark.parametrize("shape", sorted(NESTED))
@pytest.mark.parametrize("n", [MAX_NESTING + 1, 1000])
def test_nesting_over_the_limit_is_a_spec_error_at_the_crossing(shape, n):
    build, col = NESTED[shape]
    err = error_of(program(build(n)))
    assert place(err) == (4, col(MAX_NESTING + 1), NESTING_MESSAGE)
    lines = quoted(err)
    assert lines[0] == f"p.lw:4:{col(MAX_NESTING + 1)}: {NESTING_MESSAGE}"
    assert lines[1] == "    " + PREFIX + build(n)
    assert lines[2] == "    " + " " * (col(MAX_NESTING + 1) - 1) + "^"


def test_nesting_limit_counts_not_and_calls():
    text = HEAD + "  w = w - lr * g\n}\nfor " + "not " * 300 + "ndim > 1 {\n  lr = 1\n}\n"
    err = error_of(text)
    assert place(err) == (6, 5 + 4 * MAX_NESTING, NESTING_MESSAGE)
    err = error_of(program("max(" * 300 + "g" + ", 1)" * 300))
    assert place(err) == (4, 7 + 4 * MAX_NESTING, NESTING_MESSAGE)


@pytest.mark.parametrize("shape", sorted(NESTED))
def test_nesting_up_to_the_limit_works_through_the_optimizer(shape):
    # parse_text alone takes MAX_NESTING
    parse_text(program(NESTED[shape][0](MAX_NESTING)), "p.lw")
    build, _ = NESTED[shape]
    n = min(MAX_NESTING, PIPELINE_DEPTH - 1)      # n operators above a leaf
    n = n if shape != "paren_sum" else n // 2
    spec = lw.parse(program(build(n)), "p.lw")
    p = torch.nn.Parameter(torch.full((3,), 0.5))
    p.grad = torch.full((3,), 0.25)
    opt = lw.Optimizer([p], spec, compile=False)
    opt.step()
    assert torch.isfinite(p).all()
    assert spec.to_text()


def test_parentheses_alone_nest_without_limit():
    spec = lw.parse(program("(" * 20000 + "g" + ")" * 20000), "p.lw")
    assert spec.to_text() == lw.parse(program("g"), "p.lw").to_text()


# ------------------------------------------------------------ long chains
CHAINS = {
    "sum": lambda n: " + ".join(["g"] * n),
    "difference": lambda n: " - ".join(["g"] * n),
    "product": lambda n: " * ".join(["g"] * n),
    "quotient": lambda n: " / ".join(["g"] * n),
    "and": lambda n: "where(" + " and ".join(["g > 0"] * n) + ", g, 0)",
}


@pytest.mark.parametrize("shape", sorted(CHAINS))
def test_chain_up_to_the_depth_limit_works_through_the_optimizer(shape):
    n = PIPELINE_DEPTH - 2     # 'and' sits inside where( ... > ...)
    spec = lw.parse(program(CHAINS[shape](n)), "p.lw")
    p = torch.nn.Parameter(torch.full((3,), 0.5))
    p.grad = torch.full((3,), 0.25)
    lw.Optimizer([p], spec, compile=False).step()
    # a second optimizer of an equal program hits the runner cache: equality
    # and hashing of the deep trees must not recurse
    q = torch.nn.Parameter(torch.full((3,), 0.5))
    q.grad = torch.full((3,), 0.25)
    lw.Optimizer([q], lw.parse(program(CHAINS[shape](n)), "p.lw"), compile=False).step()
    assert torch.equal(p, q)


def test_500_term_sum_is_a_spec_error_not_a_crash():
    # the 500-term sum: over MAX_DEPTH, so it is reported, not a traceback
    err = error_of(program(" + ".join(["g"] * 500)))
    assert err.line == 4 and err.column == 7
    assert err.message.startswith(f"expression too deep: its tree has more than {MAX_DEPTH} "
                                  "levels (the limit")


def test_sum_of_max_depth_terms_is_fine_and_one_more_is_not():
    parse_text(program(" + ".join(["g"] * MAX_DEPTH)), "p.lw")
    with pytest.raises(SpecError) as info:
        parse_text(program(" + ".join(["g"] * (MAX_DEPTH + 1))), "p.lw")
    assert (info.value.line, info.value.column) == (4, 7)


def test_huge_chain_is_fast_spec_error():
    text = program(" + ".join(["g"] * 3000))
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        lw.parse(text, "p.lw")
    assert time.perf_counter() - start < 2
    assert (info.value.line, info.value.column) == (4, 7)
    assert "too deep" in info.value.message


def test_deep_trees_hash_compare_and_walk_without_recursion():
    def chain(n):
        e = Name("g")
        for i in range(n):
            e = Binary("+", e, Unary("-", Call("abs", (Num(float(i)),))))
        return e
    a, b = chain(5000), chain(5000)
    assert a is not b and a == b and hash(a) == hash(b)
    assert a != chain(4999)
    assert Binary("+", Name("g"), Num(1.0)) != Binary("+", Name("g"), Num(2.0))
    assert Binary("+", Name("g"), Num(1.0)) != Binary("-", Name("g"), Num(1.0))
    assert Name("g", "elem") != Name("g")
    assert len({a, b}) == 1
    assert expr_depth(a) == 5003      # the deepest leaf: the last abs(...)'s number
    assert sum(1 for _ in walk(a)) == 1 + 4 * 5000
    assert [type(n).__name__ for n in walk(Binary("+", Name("a"), Num(1.0)))] == \
        ["Binary", "Name", "Num"]
    # the cached hash is not pickled (str hashes differ between processes)
    small = Binary("+", Name("g"), Num(1.0))
    hash(small)
    assert "_hash" in small.__dict__ and "_hash" in small.left.__dict__
    back = pickle.loads(pickle.dumps(small))
    assert back == small and "_hash" not in back.__dict__ and "_hash" not in back.left.__dict__


# ------------------------------------------------------------ linear time
@pytest.mark.parametrize("number, word", [
    ("1" * 20000 + "x" + "1" * 20000, "1" * 30 + "..." + "1" * 7),
    ("1" * 20000 + "." + "1" * 20000 + ".5", "1" * 30 + "...11111.5"),
    ("1" * 40000 + "e", "1" * 30 + "..." + "111111e"),
])
def test_malformed_huge_number_is_fast_and_clear(number, word):
    start = time.perf_counter()
    err = error_of(program(number))
    assert time.perf_counter() - start < 2
    assert place(err) == (4, 7, f"syntax error: malformed number '{word}'")


def test_numbers_still_lex_as_before():
    spec = parse_text(program("1. + .5 + 2.5e-3 + 1e5 + 7 + 0.25E+2"), "p.lw")
    values = [n.value for n in walk(spec.decls[2].body[0].value) if isinstance(n, Num)]
    assert values == [1.0, 0.5, 2.5e-3, 1e5, 7.0, 25.0]


def test_many_problems_render_in_linear_time():
    source = "".join(f"a{i} = b\n" for i in range(20000))
    problems = [Problem(Span("p.lw", i + 1, 1, 3, source), "bad") for i in range(20000)]
    start = time.perf_counter()
    text = str(SpecError(problems))
    assert time.perf_counter() - start < 2
    assert text.split("\n")[-2:] == ["    a19999 = b", "    ^^"]


def test_suggest_is_bounded_and_still_suggests():
    known = [f"name{i}" for i in range(10000)]
    start = time.perf_counter()
    for i in range(2000):
        suggest(f"nmae{i}", known)
    assert time.perf_counter() - start < 2
    assert suggest("beta1", ["beta1_", "lr", "eps"]) == "; did you mean 'beta1_'?"
    assert suggest("lr", iter(["lr_", "eps"])) == "; did you mean 'lr_'?"
    assert suggest("x" * 1000, ["x" * 999]) == ""


# ------------------------------------------------------------ threads
def _bad_programs():
    # (text, expected first line of the message), all different
    out = []
    for k in range(8):
        name = f"prog{k}.lw"
        if k % 4 == 0:      # unclosed '(' reported at the bracket
            text = HEAD + "  u = " + " " * k + "max(g,\n  1\n  w = w - lr * u\n}\n"
            want = f"{name}:4:{10 + k}: syntax error: '(' is never closed"
        elif k % 4 == 1:    # unclosed '(' before a '}'
            text = HEAD + "  w = w - lr * (g" + " + g" * k + "\n}\n"
            want = f"{name}:4:16: syntax error: '(' is never closed"
        elif k % 4 == 2:    # an unexpected '}' with no bracket open
            text = "optimizer p\n" + "\n" * k + "}\n"
            want = f"{name}:{2 + k}:1: syntax error: unexpected '}}'"
        else:               # a stray character
            text = HEAD + "  w = w - lr * g" + " " * k + " $\n}\n"
            want = f"{name}:4:{18 + k}: syntax error: unexpected character '$'"
        out.append((name, text, want))
    return out


def test_threads_get_their_own_messages():
    cases = _bad_programs()
    for name, text, want in cases:       # each is right on its own
        assert str(error_of(text, name)).split("\n")[0] == want
    barrier = threading.Barrier(len(cases))
    wrong: list[str] = []

    def work(name, text, want):
        barrier.wait()
        for _ in range(40):
            try:
                parse_text(text, name)
            except SpecError as err:
                got = str(err).split("\n")[0]
                if got != want:
                    wrong.append(f"{got!r} != {want!r}")
            except Exception as err:  # pragma: no cover - the failure we test for
                wrong.append(repr(err))
            else:  # pragma: no cover
                wrong.append(f"{name} parsed")

    threads = [threading.Thread(target=work, args=case) for case in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


# ------------------------------------------------------------ quoted lines
BREAKERS = ["\f", "\v", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("ch", BREAKERS, ids=[hex(ord(c)) for c in BREAKERS])
def test_quoted_line_is_the_numbered_line(ch):
    text = (f"# one{ch}two{ch}three\noptimizer p  # x{ch}y\nhyper lr = 0.1\n"
            "step {\n  w = w - lr * g $\n}\n")
    err = error_of(text)
    assert place(err) == (5, 18, "syntax error: unexpected character '$'")
    assert err.problems[0].span.source_line() == "  w = w - lr * g $"
    assert quoted(err) == ["p.lw:5:18: syntax error: unexpected character '$'",
                           "      w = w - lr * g $",
                           "                     ^"]


@pytest.mark.parametrize("ch", ["\f", "\v", "\x1c", "\x85", "\u2028"])
def test_line_break_like_character_in_the_quoted_line_is_shown_as_a_space(ch):
    # a form feed is whitespace; the others are in a comment after the fault
    space = "\f" if ch == "\f" else " "
    text = HEAD + f"  w = w -{space}lr * g $  # a{ch}b\n}}\n"
    err = error_of(text)
    assert place(err) == (4, 18, "syntax error: unexpected character '$'")
    assert quoted(err) == ["p.lw:4:18: syntax error: unexpected character '$'",
                           "      w = w - lr * g $  # a b",
                           "                     ^"]
    assert str(err).splitlines() == quoted(err)


def test_crlf_lines_are_quoted_without_the_carriage_return():
    err = error_of(HEAD.replace("\n", "\r\n") + "  w = w - lr * g $\r\n}\r\n")
    assert quoted(err)[1] == "      w = w - lr * g $"


def test_error_past_the_last_line():
    err = error_of("optimizer p\nstep {\n  w = w - g\n")
    assert (err.line, err.column) == (2, 6)
    assert err.message == "syntax error: '{' is never closed"


# ------------------------------------------------------------ byte order mark
def test_leading_bom_is_ignored():
    text = HEAD + "  w = w - lr * g\n}\n"
    assert lw.parse("\ufeff" + text, "p.lw").to_text() == lw.parse(text, "p.lw").to_text()
    err = error_of("\ufeffoptimizer p $\nstep {\n  w = w - g\n}\n")
    assert place(err) == (1, 13, "syntax error: unexpected character '$'")
    assert quoted(err)[1:] == ["    optimizer p $", "                ^"]
    err = error_of("\ufeff" + HEAD + "  w = w - lr * g $\n}\n")
    assert place(err) == (4, 18, "syntax error: unexpected character '$'")


def test_bom_elsewhere_is_still_an_error():
    err = error_of("optimizer p\n\ufeffstep {\n  w = w - g\n}\n")
    assert place(err) == (2, 1, "syntax error: unexpected character '\\ufeff'")


# ------------------------------------------------------------ unclosed '('
@pytest.mark.parametrize("text, line, column", [
    ("optimizer p\ndef f(x\nstep {\n  w = w - g\n}\n", 2, 6),
    ("optimizer p\ndef f(x,\nhyper b = 1\nstep {\n  w = w - g\n}\n", 2, 6),
    ("optimizer p\ndef f(x) = abs(x\nstep {\n  w = w - g\n}\n", 2, 15),
    ("optimizer p\ndef f(x) = (x + 1\ndef h(y) = y\nstep {\n  w = f(g)\n}\n", 2, 12),
    ("optimizer p\nstep {\n  u = max(g,\n   1\n  w = w - u\n}\n", 3, 10),
    ("optimizer p\nstep {\n  u = max(g,\n   1 +\n  w = w - u\n}\n", 3, 10),
    ("optimizer p\nstep {\n  u = ((g\n    )\n  w = w - g\n}\n", 3, 7),
    ("optimizer p\ndef f(\n", 2, 6),
])
def test_unclosed_paren_is_reported_at_the_paren(text, line, column):
    err = error_of(text)
    assert place(err) == (line, column, "syntax error: '(' is never closed")
    assert quoted(err)[2] == "    " + " " * (column - 1) + "^"


def test_a_closed_paren_is_not_blamed():
    err = error_of("optimizer p\nstep {\n  u = (g +\n    )\n  w = w - g\n}\n")
    assert place(err) == (4, 5, "syntax error: unexpected ')'")
    err = error_of("optimizer p\nstep {\n  u = (g\n    g)\n  w = w - g\n}\n")
    assert place(err) == (4, 5, ("syntax error: unexpected 'g' (is the '(' at line 3, "
                                 "column 7 closed?)"))


def test_trees_sharing_subtrees_compare_and_hash_in_linear_time():
    def doubling(n):                 # 2**n paths, n + 1 distinct nodes
        e = Name("g")
        for _ in range(n):
            e = Binary("+", e, e)
        return e
    a, b = doubling(60), doubling(60)
    start = time.perf_counter()
    assert a == b and hash(a) == hash(b)
    assert a != Binary("+", doubling(59), Binary("+", doubling(58), Name("h")))
    assert time.perf_counter() - start < 2
