"""Parser unit tests: text -> syntax tree (layerwise.syntax), and printing it back."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from layerwise.errors import SpecError
from layerwise.syntax import (Assign, Binary, Call, DefDecl, HyperDecl, Name, Num, OptimizerDecl,
                              Program, Range, RuleDecl, StateDecl, StepDecl, Str, Unary,
                              WatchDecl, format_expr, format_number, format_program, parse_text)

PROGRAMS = Path(__file__).parent / "programs"
PRESETS = Path(__file__).parent.parent / "presets"


def expr(src: str):
    """The syntax tree of one expression, parsed as the value of a step assignment."""
    prog = parse_text(f"optimizer p\nstep {{\n  x = {src}\n}}\n")
    step = prog.decls[1]
    assert isinstance(step, StepDecl) and len(step.body) == 1
    return step.body[0].value


def N(s: str) -> Name:
    return Name(s)


def B(op, left, right) -> Binary:
    return Binary(op, left, right)


# ---------------------------------------------------------------- precedence
def test_unary_minus_binds_looser_than_power():
    assert expr("-x^2") == Unary("-", B("^", N("x"), Num(2.0)))
    assert expr("-x**2") == Unary("-", B("^", N("x"), Num(2.0)))
    assert expr("(-x)^2") == B("^", Unary("-", N("x")), Num(2.0))


def test_power_is_right_associative_and_both_spellings_are_one_node():
    right = B("^", N("a"), B("^", N("b"), N("c")))
    assert expr("a^b^c") == right
    assert expr("a**b**c") == right
    assert expr("a^b**c") == right
    assert expr("(a^b)^c") == B("^", B("^", N("a"), N("b")), N("c"))
    assert expr("a ** b").op == "^"


def test_power_exponent_may_be_negated():
    assert expr("a^-b") == B("^", N("a"), Unary("-", N("b")))
    assert expr("2^-t") == B("^", Num(2.0), Unary("-", N("t")))


def test_arithmetic_precedence_and_left_associativity():
    assert expr("a + b * c") == B("+", N("a"), B("*", N("b"), N("c")))
    assert expr("a * b + c") == B("+", B("*", N("a"), N("b")), N("c"))
    assert expr("a - b - c") == B("-", B("-", N("a"), N("b")), N("c"))
    assert expr("a / b * c") == B("*", B("/", N("a"), N("b")), N("c"))
    assert expr("a - (b - c)") == B("-", N("a"), B("-", N("b"), N("c")))
    assert expr("a * b^c") == B("*", N("a"), B("^", N("b"), N("c")))
    assert expr("-a * b") == B("*", Unary("-", N("a")), N("b"))
    assert expr("+a") == Unary("+", N("a"))


def test_comparison_and_or_not_precedence():
    assert expr("a + b < c * d") == B("<", B("+", N("a"), N("b")), B("*", N("c"), N("d")))
    assert expr("a < b and c or not d") == B(
        "or", B("and", B("<", N("a"), N("b")), N("c")), Unary("not", N("d")))
    assert expr("a or b and c") == B("or", N("a"), B("and", N("b"), N("c")))
    assert expr("not a < b") == Unary("not", B("<", N("a"), N("b")))
    assert expr("not not a") == Unary("not", Unary("not", N("a")))
    assert expr("a and b and c") == B("and", B("and", N("a"), N("b")), N("c"))
    for op in ("<", "<=", ">", ">=", "==", "!="):
        assert expr(f"a {op} b") == B(op, N("a"), N("b"))


def test_comparisons_do_not_chain():
    with pytest.raises(SpecError, match="syntax error"):
        expr("a < b < c")


def test_calls():
    assert expr("f()") == Call("f", ())
    assert expr("min(a, b + 1)") == Call("min", (N("a"), B("+", N("b"), Num(1.0))))
    assert expr("where(a > 0 and b > 0, a / b, 1)") == Call(
        "where", (B("and", B(">", N("a"), Num(0.0)), B(">", N("b"), Num(0.0))),
                  B("/", N("a"), N("b")), Num(1.0)))
    assert expr("sqrt(norm(g))^2") == B("^", Call("sqrt", (Call("norm", (N("g"),)),)), Num(2.0))


def test_match_operator_in_a_predicate():
    prog = parse_text('optimizer p\nfor ndim <= 1 or name ~ "bias|LayerNorm" {\n  wd = 0\n}\n')
    rule = prog.decls[1]
    assert isinstance(rule, RuleDecl)
    assert rule.predicate == B("or", B("<=", N("ndim"), Num(1.0)),
                               B("~", N("name"), Str("bias|LayerNorm")))
    assert rule.assigns == (Assign("wd", Num(0.0)),)


def test_string_escapes():
    prog = parse_text('optimizer p\nfor name ~ "a\\"b" {\n  wd = 0\n}\n')
    assert prog.decls[1].predicate.right == Str('a"b')


# ---------------------------------------------------------------- numbers
@pytest.mark.parametrize("text,value", [
    ("3", 3.0), ("0.9", 0.9), ("1e-6", 1e-6), (".5", 0.5), ("1E3", 1000.0), ("2e+2", 200.0),
    ("inf", math.inf), ("true", 1.0), ("false", 0.0), ("0", 0.0), ("007", 7.0),
])
def test_numbers(text, value):
    assert expr(text) == Num(value)


def test_negative_numbers_are_unary_minus_in_expressions():
    assert expr("-1") == Unary("-", Num(1.0))
    assert expr("-inf") == Unary("-", Num(math.inf))


def test_hyper_defaults_and_ranges():
    prog = parse_text("optimizer p\n"
                      "hyper a = 1e-3\n"
                      "hyper b = -2 in [-inf, 0]\n"
                      "hyper c = +.5 in (0, 1)\n"
                      "hyper d = inf in (0, inf]\n"
                      "hyper e = 0.9 in [0, 1)\n")
    a, b, c, d, e = prog.decls[1:]
    assert a == HyperDecl("a", 1e-3, None)
    assert b == HyperDecl("b", -2.0, Range(-math.inf, 0.0, True, True))
    assert c == HyperDecl("c", 0.5, Range(0.0, 1.0, False, False))
    assert d == HyperDecl("d", math.inf, Range(0.0, math.inf, False, True))
    assert e.range == Range(0.0, 1.0, True, False)
    assert e.range.contains(0.0) and e.range.contains(0.99) and not e.range.contains(1.0)
    assert not c.range.contains(0.0) and not c.range.contains(math.nan)
    assert str(e.range) == "[0, 1)" and str(b.range) == "[-inf, 0]"


def test_format_number_round_trips():
    for x in (0.0, 3.0, 0.9, 1e-6, 0.5, 1e-3, 123456789.0, 1e20, 2.5e-300, 0.1 + 0.2, math.inf):
        assert float(format_number(x)) == x
        assert expr(format_number(x)) == Num(x)
    assert format_number(3.0) == "3"
    assert format_number(math.inf) == "inf"


# ---------------------------------------------------------------- names, layout
def test_unicode_names():
    prog = parse_text("optimizer φ_lamb\n"
                      "hyper β1 = 0.9\n"
                      "hyper η = 1e-3\n"
                      "def φ(z) = z\n"
                      "step {\n"
                      "  m = β1 * g\n"
                      "  w = w - η * φ(m)\n"
                      "}\n")
    assert prog.decls[0] == OptimizerDecl("φ_lamb")
    assert [d.name for d in prog.decls[1:4]] == ["β1", "η", "φ"]
    assert prog.decls[4].body[1].value == B("-", N("w"), B("*", N("η"), Call("φ", (N("m"),))))


def test_names_may_contain_digits_and_underscores_and_contain_reserved_words():
    assert expr("beta_2 + _x + x2y") == B("+", B("+", N("beta_2"), N("_x")), N("x2y"))
    assert expr("index + notable + infinity + stepsize") == B(
        "+", B("+", B("+", N("index"), N("notable")), N("infinity")), N("stepsize"))


@pytest.mark.parametrize("word", ["optimizer", "extends", "hyper", "state", "def", "step", "for",
                                  "watch", "in", "and", "or", "not", "true", "false", "inf"])
def test_reserved_words_cannot_be_names(word):
    with pytest.raises(SpecError) as info:
        parse_text(f"optimizer p\nhyper {word} = 1\n")
    assert (info.value.line, info.value.column) == (2, 7)
    assert f"'{word}' is a reserved word" in info.value.message


def test_comments_and_blank_lines():
    text = ("# a leading comment\n"
            "\n"
            "optimizer p   # trailing comment\n"
            "   # an indented comment line\n"
            "hyper lr = 0.1 # after a number\n"
            "\n\n"
            "step {  # after a brace\n"
            "  # inside the block\n"
            "  w = w - lr * g # after an assignment\n"
            "}\n"
            "# at the end, no newline")
    prog = parse_text(text)
    assert prog == Program((OptimizerDecl("p"), HyperDecl("lr", 0.1),
                            StepDecl((Assign("w", B("-", N("w"), B("*", N("lr"), N("g")))),))))


def test_newlines_inside_parentheses_do_not_end_a_statement():
    prog = parse_text("optimizer p\n"
                      "def f(a,\n"
                      "      b) = where(a > 0,\n"
                      "                 a / b,   # a comment inside\n"
                      "\n"
                      "                 1)\n"
                      "step {\n"
                      "  w = w - (0.1\n"
                      "           * g)\n"
                      "}\n")
    assert prog.decls[1] == DefDecl("f", ("a", "b"), Call(
        "where", (B(">", N("a"), Num(0.0)), B("/", N("a"), N("b")), Num(1.0))))
    assert prog.decls[2].body == (Assign("w", B("-", N("w"), B("*", Num(0.1), N("g")))),)


def test_newline_outside_parentheses_ends_a_statement():
    with pytest.raises(SpecError) as info:
        parse_text("optimizer p\nstep {\n  w = w -\n    g\n}\n")
    assert (info.value.line, info.value.column) == (3, 10)
    assert "unexpected end of line" in info.value.message


def test_one_line_blocks_and_empty_blocks():
    prog = parse_text("optimizer p\nfor ndim <= 1 { wd = 0 }\nstep { w = w - g }\nstep {\n}\n")
    assert prog.decls[1].assigns == (Assign("wd", Num(0.0)),)
    assert prog.decls[2].body == (Assign("w", B("-", N("w"), N("g"))),)
    assert prog.decls[3].body == ()


def test_empty_text_is_an_empty_program():
    assert parse_text("") == Program(())
    assert parse_text("\n# only a comment\n") == Program(())


def test_declaration_nodes():
    prog = parse_text("optimizer p\n"
                      "state m = 0\n"
                      "state s : layer = 1\n"
                      "state w0 = w * 2\n"
                      "def one() = 1\n"
                      "def trust(w, u) = norm(w) / norm(u)\n"
                      "watch tr, s\n"
                      "watch m\n")
    assert prog.decls[1:] == (
        StateDecl("m", False, Num(0.0)),
        StateDecl("s", True, Num(1.0)),
        StateDecl("w0", False, B("*", N("w"), Num(2.0))),
        DefDecl("one", (), Num(1.0)),
        DefDecl("trust", ("w", "u"), B("/", Call("norm", (N("w"),)), Call("norm", (N("u"),)))),
        WatchDecl((N("tr"), N("s"))),
        WatchDecl((N("m"),)),
    )


# ---------------------------------------------------------------- extends
def test_extends_a_preset_name():
    assert parse_text("optimizer c extends lamb\n").decls[0] == OptimizerDecl("c", "lamb")


def test_extends_a_relative_path():
    head = parse_text("optimizer c extends ../parents/base-v1.lw\n").decls[0]
    assert head == OptimizerDecl("c", "../parents/base-v1.lw")
    assert (head.parent_span.line, head.parent_span.column) == (1, 21)
    assert parse_text("optimizer c extends base.lw\n").decls[0].parent == "base.lw"


def test_extends_a_quoted_path():
    head = parse_text('optimizer c extends "my parents/base.lw"\n').decls[0]
    assert head == OptimizerDecl("c", "my parents/base.lw")
    assert (head.parent_span.column, head.parent_span.end_column) == (21, 41)


# ---------------------------------------------------------------- spans
def test_spans_of_nodes():
    text = ("optimizer lamb_x\n"             # 1
            "hyper lr = -1e-3 in [-1, 1]\n"  # 2
            "state m : layer = 0\n"          # 3
            "def f(a, bb) = a\n"             # 4
            "watch m, tr\n"                  # 5
            "step {\n"                       # 6
            "  tr = norm(g) * lr\n"          # 7
            "  w = w - (m + tr)^2\n"         # 8
            "}\n")
    prog = parse_text(text, "spans.lw")
    opt, hyper, state, d, watch, step = prog.decls

    def at(span):
        return (span.filename, span.line, span.column, span.end_column)

    assert at(opt.span) == ("spans.lw", 1, 11, 17)
    assert at(hyper.span) == ("spans.lw", 2, 7, 9)
    assert (hyper.default_span.line, hyper.default_span.column) == (2, 12)
    assert (hyper.range.span.line, hyper.range.span.column) == (2, 21)
    assert at(state.span) == ("spans.lw", 3, 7, 8)
    assert at(d.span) == ("spans.lw", 4, 5, 6)
    assert [at(s) for s in d.param_spans] == [("spans.lw", 4, 7, 8), ("spans.lw", 4, 10, 12)]
    assert [at(n.span) for n in watch.names] == [("spans.lw", 5, 7, 8), ("spans.lw", 5, 10, 12)]
    assert (step.span.line, step.span.column) == (6, 1)

    tr, new_w = step.body
    assert at(tr.span) == ("spans.lw", 7, 3, 5)
    assert (tr.line_span.line, tr.line_span.column) == (7, 3)
    call = tr.value.left
    assert isinstance(call, Call) and at(call.span) == ("spans.lw", 7, 8, 12)
    assert at(call.args[0].span) == ("spans.lw", 7, 13, 14)
    assert at(tr.value.right.span) == ("spans.lw", 7, 18, 20)
    power = new_w.value.right
    assert power.op == "^" and (power.span.line, power.span.column) == (8, 11)
    assert at(power.right.span) == ("spans.lw", 8, 20, 21)
    assert at(power.left.right.span) == ("spans.lw", 8, 16, 18)
    # spans keep the text, so an error can quote the line
    assert call.span.source_line() == "  tr = norm(g) * lr"


def test_spans_after_multiline_parentheses():
    prog = parse_text("optimizer p\nstep {\n  w = w - (0.1 *\n    g) * nrom(g)\n}\n")
    value = prog.decls[1].body[0].value
    call = value.right.right
    assert call.func == "nrom" and (call.span.line, call.span.column) == (4, 10)


def test_spans_do_not_take_part_in_equality():
    a = parse_text("optimizer p\nstep {\n  w = w - 0.1 * g\n}\n", "a.lw")
    b = parse_text("optimizer   p\n\n\nstep {\n      w = w-0.1*g\n}", "b.lw")
    assert a == b
    assert a.decls[1].body[0].value.span != b.decls[1].body[0].value.span


# ---------------------------------------------------------------- syntax errors
@pytest.mark.parametrize("text,line,column,phrase", [
    ("optimizer p\nstep {\n  w = w - 0.1 * (g + 1\n}\n", 3, 17, "'(' is never closed"),
    ("optimizer p\nstep {\n  w = min(g,\n", 3, 10, "'(' is never closed"),
    ("optimizer p\nstep {\n  w = w - g\n", 2, 6, "'{' is never closed"),
    ("optimizer p\nstep {\n  w = w - g ?\n}\n", 3, 13, "unexpected character '?'"),
    ("optimizer p\nhyper lr 0.1\n", 2, 10, "unexpected '0.1'; expected '='"),
    ("optimizer p\nhyper lr = 1e\n", 2, 12, "malformed number '1e'"),
    ("optimizer p\nhyper lr = 1e-\n", 2, 12, "malformed number '1e-'"),
    ("optimizer p\nstep {\n  w = w - 2w\n}\n", 3, 11, "malformed number '2w'"),
    ("optimizer p\nhyper lr = x\n", 2, 12, "unexpected 'x'"),
    ("optimizer p\nhyper b = 0.9 in [0, 1\n", 2, 23, "expected ']' or ')'"),
    ("optimizer p\nstep {\n  w = w - g)\n}\n", 3, 12, "unexpected ')'"),
    ("optimizer p\nstep {\n  w = w - g\n}}\n", 4, 2, "unexpected '}'"),
    ("optimizer p extends\n", 1, 20, "unexpected end of line"),
    ("optimizer p\nfor name ~ bias {\n  wd = 0\n}\n", 2, 12, "expected a string"),
])
def test_syntax_errors(text, line, column, phrase):
    with pytest.raises(SpecError) as info:
        parse_text(text, "bad.lw")
    err = info.value
    assert (err.filename, err.line, err.column) == ("bad.lw", line, column), err.message
    assert phrase in err.message
    assert err.message.startswith("syntax error")
    assert len(err.problems) == 1


def test_syntax_error_is_a_value_error_with_caret():
    with pytest.raises(ValueError) as info:
        parse_text("optimizer p\nhyper lr 0.1\n", "x.lw")
    assert str(info.value).splitlines() == [
        "x.lw:2:10: syntax error: unexpected '0.1'; expected '='",
        "    hyper lr 0.1",
        "             ^^^",
    ]


# ---------------------------------------------------------------- printing
def test_format_expr_adds_only_needed_parentheses():
    for src in ("a + b * c", "(a + b) * c", "a - (b - c)", "a - b - c", "-x^2", "(-x)^2",
                "a^b^c", "(a^b)^c", "a^-b", "not a < b", "(not a) < b", "a or b and c",
                "(a or b) and c", "-(a + b)", "f(a, -b)", "a / (b * c)", "(a < b) == (c > d)"):
        once = format_expr(expr(src))
        assert expr(once) == expr(src), (src, once)
        assert format_expr(expr(once)) == once
    assert format_expr(expr("a + b * c")) == "a + b * c"
    assert format_expr(expr("(a + b) * c")) == "(a + b) * c"
    assert format_expr(expr("((a))")) == "a"
    assert format_expr(expr("-x^2")) == "-x^2"
    assert format_expr(expr("(-x)^2")) == "(-x)^2"
    assert format_expr(expr("a ** b ** c")) == "a^b^c"


@pytest.mark.parametrize("path", sorted(PROGRAMS.glob("*.lw")) + sorted(PRESETS.glob("*.lw")),
                         ids=lambda p: p.name)
def test_format_program_reparses_to_an_equal_tree(path):
    tree = parse_text(path.read_text(encoding="utf-8"), str(path))
    text = format_program(tree)
    again = parse_text(text, "printed.lw")
    assert again == tree
    assert format_program(again) == text


def test_format_program_of_every_declaration_form():
    text = ('optimizer child extends "../dir with space/parent.lw"\n'
            "hyper a = -0.5 in [-1, 1)\n"
            "hyper b = inf in (0, inf]\n"
            "state s : layer = 0\n"
            "state m = w^2\n"
            "def f(x, y) = clip(x, -y, y)\n"
            "def k() = 3\n"
            'for not (ndim > 1 and numel >= 10) or name ~ "a\\"b" {\n'
            "  a = -1\n"
            "  b = 2\n"
            "}\n"
            "watch s, tr\n"
            "step {\n"
            "  tr = norm(w) / (norm(g) + 1e-12)\n"
            "  w = w - k() * f(g, a)\n"
            "}\n")
    tree = parse_text(text)
    assert parse_text(format_program(tree)) == tree


def test_expected_tokens_are_named_as_written():
    with pytest.raises(SpecError) as info:
        expr("a < b == c")
    assert info.value.message == ("syntax error: unexpected '=='; expected "
                                  "'and', 'or', '}', end of line")
