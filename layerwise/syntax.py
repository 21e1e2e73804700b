"""Text -> syntax tree: immutable syntax nodes, each with its source span.

The grammar lives in ``grammars/layerwise.lark`` and nothing else in the
package describes syntax. :func:`parse_text` runs Lark's LALR parser and a
:class:`lark.Transformer` (one method per grammar rule) that builds the
frozen dataclasses below. :func:`format_program` prints a tree back to text
that parses to the same tree.

Node equality ignores spans (``compare=False``), so a tree parsed from
printed text equals the original. Expression nodes carry a ``kind`` that is
``None`` in a syntax tree and set by the checker (``layerwise.check``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Union

import lark

from .errors import Problem, Span, SpecError
from .resources import grammar_text

__all__ = [
    "Num", "Name", "Str", "Unary", "Binary", "Call", "Expr", "children",
    "Range", "Assign", "OptimizerDecl", "AdaptDecl", "HyperDecl", "StateDecl", "DefDecl",
    "RuleDecl", "WatchDecl", "StepDecl", "Decl", "Program",
    "parse_text", "parse_fragment", "format_program", "format_expr", "format_number",
    "RESERVED",
]

_NOSPAN = Span("<none>", 0, 0, 0)

#: Words that cannot be names (LANGUAGE.md section 2; the grammar's NAME excludes them).
RESERVED = frozenset({"optimizer", "extends", "hyper", "state", "def", "step", "for", "watch",
                      "in", "and", "or", "not", "true", "false", "inf"})


def _span() -> Span:
    return field(default=_NOSPAN, compare=False, repr=False)


# ---------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Num:
    """A number literal (``true`` is 1, ``false`` is 0); never negative."""
    value: float
    kind: str | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Name:
    """A reference to a name: ``w``, ``g``, ``t``, a hyper, state, local or def argument."""
    id: str
    kind: str | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Str:
    """A string literal; only the right side of ``~`` in a ``for`` predicate."""
    value: str
    kind: str | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Unary:
    """``-x``, ``+x`` or ``not x``."""
    op: str
    operand: "Expr"
    kind: str | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Binary:
    """``left op right``; ``op`` is one of ``+ - * / ^ < <= > >= == != and or ~``.

    ``**`` is stored as ``^`` (the contract gives both the same meaning).
    """
    op: str
    left: "Expr"
    right: "Expr"
    kind: str | None = None
    span: Span = _span()


@dataclass(frozen=True)
class Call:
    """``func(args...)``: a built-in or a ``def``."""
    func: str
    args: tuple["Expr", ...]
    kind: str | None = None
    span: Span = _span()


Expr = Union[Num, Name, Str, Unary, Binary, Call]


def children(e: Expr) -> tuple:
    """The direct subexpressions of ``e`` (empty for a leaf)."""
    if isinstance(e, Unary):
        return (e.operand,)
    if isinstance(e, Binary):
        return (e.left, e.right)
    if isinstance(e, Call):
        return e.args
    return ()


# ---------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Range:
    """An interval ``[lo, hi]``, ``(lo, hi)``, ``[lo, hi)`` or ``(lo, hi]``."""
    lo: float
    hi: float
    lo_closed: bool
    hi_closed: bool
    span: Span = _span()

    def contains(self, x: float) -> bool:
        """Whether ``x`` lies in the interval (NaN never does)."""
        above = x >= self.lo if self.lo_closed else x > self.lo
        below = x <= self.hi if self.hi_closed else x < self.hi
        return above and below

    def __str__(self) -> str:
        return (("[" if self.lo_closed else "(") + format_number(self.lo) + ", "
                + format_number(self.hi) + ("]" if self.hi_closed else ")"))


@dataclass(frozen=True)
class Assign:
    """``target = value`` inside ``step { }`` or a ``for`` rule."""
    target: str
    value: Expr
    span: Span = _span()          # the target name
    line_span: Span = _span()     # the whole statement


@dataclass(frozen=True)
class OptimizerDecl:
    """``optimizer NAME [extends PARENT]``, or ``adaptation NAME [extends PARENT]``
    when ``adaptation`` (LANGUAGE.md section 12); ``parent`` is a preset name
    or a path."""
    name: str
    parent: str | None = None
    span: Span = _span()          # the name
    parent_span: Span = _span()
    adaptation: bool = False


@dataclass(frozen=True)
class AdaptDecl:
    """``adapt NAME``: apply the adaptation program NAME (a preset or a path)."""
    parent: str
    span: Span = _span()          # the whole declaration
    parent_span: Span = _span()


@dataclass(frozen=True)
class HyperDecl:
    """``hyper NAME = NUMBER [in RANGE]``."""
    name: str
    default: float
    range: Range | None = None
    span: Span = _span()
    default_span: Span = _span()


@dataclass(frozen=True)
class StateDecl:
    """``state NAME [: layer | row | col] = INIT``: ``layer`` for ``: layer``,
    ``unit`` ``"row"`` or ``"col"`` for ``: row`` / ``: col`` (section 10)."""
    name: str
    layer: bool
    init: Expr
    span: Span = _span()
    unit: str | None = None

    @property
    def kind(self) -> str:
        return self.unit or ("layer" if self.layer else "elem")


@dataclass(frozen=True)
class DefDecl:
    """``def NAME(ARGS) = EXPR``: a named expression inlined where called."""
    name: str
    params: tuple[str, ...]
    body: Expr
    span: Span = _span()
    param_spans: tuple[Span, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class RuleDecl:
    """``for PREDICATE { NAME = NUMBER ... }``: per-parameter hyper overrides."""
    predicate: Expr
    assigns: tuple[Assign, ...]
    span: Span = _span()


@dataclass(frozen=True)
class WatchDecl:
    """``watch NAME[, NAME...]``."""
    names: tuple[Name, ...]
    span: Span = _span()


@dataclass(frozen=True)
class StepDecl:
    """``step { ... }``: the update of one parameter."""
    body: tuple[Assign, ...]
    span: Span = _span()


Decl = Union[OptimizerDecl, HyperDecl, StateDecl, DefDecl, RuleDecl, WatchDecl, StepDecl]


@dataclass(frozen=True)
class Program:
    """A parsed ``.lw`` file: its declarations in file order."""
    decls: tuple[Decl, ...]
    filename: str = field(default="<string>", compare=False)
    source: str = field(default="", compare=False, repr=False)


# ---------------------------------------------------------------- parsing
class _ParenNewlines:
    """Postlexer: a newline inside ``( )`` does not end a statement.

    It also keeps the brackets that are open (``self.open``, innermost
    last) so that a syntax error can name an unclosed ``(`` or ``{``.
    """

    always_accept = ("_NL",)

    def __init__(self):
        self.open: list[lark.Token] = []

    def process(self, stream):
        self.open = opened = []
        for tok in stream:
            if tok.type in ("LPAR", "LBRACE"):
                opened.append(tok)
            elif tok.type in ("RPAR", "RBRACE"):
                want = "LPAR" if tok.type == "RPAR" else "LBRACE"
                if opened and opened[-1].type == want:
                    opened.pop()
            elif tok.type == "_NL" and any(t.type == "LPAR" for t in opened):
                continue
            yield tok


_PARSER: lark.Lark | None = None


def _parser() -> lark.Lark:
    global _PARSER
    if _PARSER is None:
        _PARSER = lark.Lark(grammar_text(), parser="lalr", lexer="contextual",
                            postlex=_ParenNewlines(), propagate_positions=True,
                            maybe_placeholders=True)
    return _PARSER


_TOKEN_WORDS = {
    "_NL": "end of line", "$END": "end of file", "NAME": "a name", "NUMBER": "a number",
    "STRING": "a string", "PATH": "a path", "LPAR": "'('", "RPAR": "')'",
    "LBRACE": "'{'", "RBRACE": "'}'", "EQUAL": "'='", "COMMA": "','", "COLON": "':'",
    "LBOUND": "'[' or '('", "RBOUND": "']' or ')'", "INF": "'inf'", "SIGN": "a sign",
    "ADD_OP": "'+' or '-'", "MUL_OP": "'*' or '/'", "POW_OP": "'^'",
    "COMP_OP": "a comparison", "MATCH_OP": "'~'", "_IN": "'in'",
    "STATE_KIND": "'layer', 'row' or 'col'",
    "_AND": "'and'", "_OR": "'or'", "_NOT": "'not'", "TRUE": "'true'", "FALSE": "'false'",
}


def _describe(tok: lark.Token) -> str:
    if tok.type == "$END":
        return "end of file"
    if tok.type == "_NL":
        return "end of line"
    return f"'{tok}'"


def _expected(names) -> str:
    words = sorted({_TOKEN_WORDS.get(n, f"'{n.lower()}'") for n in names})
    if len(words) > 6:
        return ""
    return "; expected " + ", ".join(words)


_NUMBER = re.compile(r"(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")   # the grammar's NUMBER
_BAD_NUMBER = re.compile(r"(?:\d|\.\d)(?:[eE][+-]|[\w.])*")


def _bad_number(text: str, pos: int) -> tuple[int, str] | None:
    """A malformed number around ``pos`` (``1e``, ``1.2.3``, ``2w``): its start and text."""
    start = pos
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] in "._"
                         or (text[start - 1] in "+-" and start > 1
                             and text[start - 2] in "eE")):
        start -= 1
    m = _BAD_NUMBER.match(text, start)
    if m is None or m.end() <= pos or _NUMBER.fullmatch(m.group()):
        return None
    return start, m.group()


def _syntax_problem(err: lark.exceptions.UnexpectedInput, filename: str, text: str) -> Problem:
    line = getattr(err, "line", None)
    column = getattr(err, "column", None)
    if not isinstance(line, int) or line < 1:
        lines = text.splitlines() or [""]
        line, column = len(lines), len(lines[-1]) + 1
    opened = list(_parser().options.postlex.open)
    tok = getattr(err, "token", None)
    # An unclosed bracket: the end of the file (or a '}' while a '(' is open)
    # is where the parser notices, but the fault is the opening bracket.
    if isinstance(err, (lark.exceptions.UnexpectedToken, lark.exceptions.UnexpectedEOF)) \
            and opened and (tok is None or tok.type == "$END"
                            or (tok.type == "RBRACE" and opened[-1].type == "LPAR")):
        br = opened[-1]
        return Problem(Span(filename, br.line, br.column, br.column + 1, text),
                       f"syntax error: '{br}' is never closed")
    pos = getattr(err, "pos_in_stream", None)
    if isinstance(pos, int) and 0 <= pos < len(text) and getattr(tok, "type", "") != "$END":
        bad = _bad_number(text, pos)
        if bad is not None:
            start, word = bad
            bline = text.count("\n", 0, start) + 1
            bcol = start - (text.rfind("\n", 0, start) + 1) + 1
            return Problem(Span(filename, bline, bcol, bcol + len(word), text),
                           f"syntax error: malformed number '{word}'")
    if isinstance(err, lark.exceptions.UnexpectedCharacters):
        ch = text[err.pos_in_stream] if err.pos_in_stream < len(text) else ""
        msg = f"syntax error: unexpected character {ch!r}"
        width = 1
    elif isinstance(err, lark.exceptions.UnexpectedToken):
        try:
            expected = err.accepts or err.expected
        except Exception:  # pragma: no cover - accepts() replays the parser
            expected = err.expected
        if tok.type == "$END":
            msg = "syntax error: unexpected end of file" + _expected(expected)
            width = 1
        elif str(tok) in RESERVED and "NAME" in expected:
            msg = f"syntax error: '{tok}' is a reserved word and cannot be used as a name"
            width = len(str(tok))
        else:
            msg = f"syntax error: unexpected {_describe(tok)}" + _expected(expected)
            width = max(1, len(str(tok))) if tok.type != "_NL" else 1
            paren = next((t for t in reversed(opened) if t.type == "LPAR"), None)
            if paren is not None and paren.line < line:
                msg += f" (is the '(' at line {paren.line}, column {paren.column} closed?)"
    else:  # UnexpectedEOF
        msg = "syntax error: unexpected end of file"
        width = 1
    return Problem(Span(filename, line, column, column + width, text), msg)


def parse_text(text: str, filename: str = "<string>") -> Program:
    """Parse the text of a ``.lw`` program into a syntax tree.

    Only syntax is checked here; names, kinds and the other rules of
    LANGUAGE.md sections 3-7 are checked by ``layerwise.check``.

    Raises:
        SpecError: on a syntax error, with its file, line and column.
    """
    try:
        tree = _parser().parse(text)
    except lark.exceptions.UnexpectedInput as err:
        raise SpecError(_syntax_problem(err, filename, text)) from None
    return _Build(filename, text).transform(tree)


def parse_fragment(text: str, filename: str = "<override>") -> Program:
    """Parse declarations that may lack the ``optimizer`` line (``Spec.override``)."""
    return parse_text(text, filename)


class _Build(lark.Transformer):
    """Lark parse tree -> syntax nodes; one method per grammar rule."""

    def __init__(self, filename: str, source: str):
        super().__init__(visit_tokens=False)
        self.filename = filename
        self.source = source

    # spans
    def _tok(self, tok: lark.Token) -> Span:
        return Span(self.filename, tok.line, tok.column, tok.end_column
                    if tok.end_line == tok.line else tok.column + len(str(tok).split("\n")[0]),
                    self.source)

    def _meta(self, meta) -> Span:
        if getattr(meta, "empty", True):
            return Span(self.filename, 1, 1, 2, self.source)
        end = meta.end_column if meta.end_line == meta.line else 10**6
        return Span(self.filename, meta.line, meta.column, end, self.source)

    def _join(self, a: Span, b: Span) -> Span:
        end = b.end_column if a.line == b.line else 10**6
        return Span(self.filename, a.line, a.column, end, self.source)

    # program
    def start(self, items):
        return Program(tuple(items), self.filename, self.source)

    def optimizer_decl(self, items):
        return self._head(items, adaptation=False)

    def adaptation_decl(self, items):
        return self._head(items, adaptation=True)

    def _head(self, items, adaptation: bool) -> OptimizerDecl:
        name, parent = items
        if parent is None:
            return OptimizerDecl(str(name), None, self._tok(name), adaptation=adaptation)
        return OptimizerDecl(str(name), parent[0], self._tok(name), parent[1], adaptation)

    @lark.v_args(meta=True)
    def adapt_decl(self, meta, items):
        value, span = items[0]
        return AdaptDecl(value, self._meta(meta), span)

    def parent(self, items):
        tok = items[0]
        value = _unquote(str(tok)) if tok.type == "STRING" else str(tok)
        return value, self._tok(tok)

    @lark.v_args(meta=True)
    def hyper_decl(self, meta, items):
        name, (value, vspan), rng = items
        return HyperDecl(str(name), value, rng, self._tok(name), vspan)

    @lark.v_args(meta=True)
    def range(self, meta, items):
        lb, (lo, _), (hi, _), rb = items
        return Range(lo, hi, str(lb) == "[", str(rb) == "]", self._meta(meta))

    @lark.v_args(meta=True)
    def signed_number(self, meta, items):
        sign, tok = items
        value = math.inf if tok.type == "INF" else float(str(tok))
        if sign is not None and str(sign) == "-":
            value = -value
        return value, self._meta(meta)

    @lark.v_args(meta=True)
    def state_decl(self, meta, items):
        name, kind, init = items
        kind = None if kind is None else str(kind)
        return StateDecl(str(name), kind == "layer", init, self._tok(name),
                         kind if kind in ("row", "col") else None)

    @lark.v_args(meta=True)
    def def_decl(self, meta, items):
        name, body = items[0], items[-1]
        params = [p for p in items[1:-1] if p is not None]
        return DefDecl(str(name), tuple(str(p) for p in params), body, self._tok(name),
                       tuple(self._tok(p) for p in params))

    @lark.v_args(meta=True)
    def rule_decl(self, meta, items):
        return RuleDecl(items[0], tuple(i for i in items[1:] if i is not None), self._meta(meta))

    @lark.v_args(meta=True)
    def watch_decl(self, meta, items):
        return WatchDecl(tuple(Name(str(t), None, self._tok(t)) for t in items), self._meta(meta))

    @lark.v_args(meta=True)
    def step_decl(self, meta, items):
        return StepDecl(tuple(i for i in items if i is not None), self._meta(meta))

    @lark.v_args(meta=True)
    def assign(self, meta, items):
        name, value = items
        return Assign(str(name), value, self._tok(name), self._meta(meta))

    # expressions
    @lark.v_args(meta=True)
    def or_expr(self, meta, items):
        return self._chain(items, "or")

    @lark.v_args(meta=True)
    def and_expr(self, meta, items):
        return self._chain(items, "and")

    def _chain(self, items, op):
        node = items[0]
        for right in items[1:]:
            node = Binary(op, node, right, None, self._join(node.span, right.span))
        return node

    @lark.v_args(meta=True)
    def not_op(self, meta, items):
        return Unary("not", items[0], None, self._meta(meta))

    @lark.v_args(meta=True)
    def comparison(self, meta, items):
        left, op, right = items
        return Binary(str(op), left, right, None, self._meta(meta))

    @lark.v_args(meta=True)
    def match(self, meta, items):
        left, _, tok = items
        return Binary("~", left, Str(_unquote(str(tok)), None, self._tok(tok)), None,
                      self._meta(meta))

    def _left_assoc(self, items):
        node = items[0]
        for i in range(1, len(items), 2):
            right = items[i + 1]
            node = Binary(str(items[i]), node, right, None, self._join(node.span, right.span))
        return node

    def sum(self, items):
        return self._left_assoc(items)

    def product(self, items):
        return self._left_assoc(items)

    @lark.v_args(meta=True)
    def unary_op(self, meta, items):
        return Unary(str(items[0]), items[1], None, self._meta(meta))

    @lark.v_args(meta=True)
    def power(self, meta, items):
        return Binary("^", items[0], items[2], None, self._meta(meta))

    @lark.v_args(meta=True)
    def number(self, meta, items):
        tok = items[0]
        return Num(math.inf if tok.type == "INF" else float(str(tok)), None, self._tok(tok))

    @lark.v_args(meta=True)
    def boolean(self, meta, items):
        return Num(1.0 if str(items[0]) == "true" else 0.0, None, self._tok(items[0]))

    @lark.v_args(meta=True)
    def string(self, meta, items):
        return Str(_unquote(str(items[0])), None, self._tok(items[0]))

    @lark.v_args(meta=True)
    def name(self, meta, items):
        return Name(str(items[0]), None, self._tok(items[0]))

    @lark.v_args(meta=True)
    def call(self, meta, items):
        func, args = items[0], [a for a in items[1:] if a is not None]
        return Call(str(func), tuple(args), None, self._tok(func))


def _unquote(s: str) -> str:
    return s[1:-1].replace('\\"', '"')


# ---------------------------------------------------------------- printing
_PREC = {"or": 1, "and": 2, "not": 3, "<": 4, "<=": 4, ">": 4, ">=": 4, "==": 4,
         "!=": 4, "~": 4, "+": 5, "-": 5, "*": 6, "/": 6, "unary": 7, "^": 8}
_ATOM = 9


def format_number(x: float) -> str:
    """Shortest text that parses back to ``x`` (``inf``, ``3``, ``0.9``, ``1e-06``)."""
    if math.isinf(x):
        return "-inf" if x < 0 else "inf"
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


def _prec(e: Expr) -> int:
    if isinstance(e, Binary):
        return _PREC[e.op]
    if isinstance(e, Unary):
        return _PREC["not"] if e.op == "not" else _PREC["unary"]
    return _ATOM


def format_expr(e: Expr, need: int = 0) -> str:
    """Print an expression with only the parentheses its structure needs."""
    if isinstance(e, Num):
        text = format_number(e.value)
    elif isinstance(e, Name):
        text = e.id
    elif isinstance(e, Str):
        text = '"' + e.value.replace('"', '\\"') + '"'
    elif isinstance(e, Call):
        text = f"{e.func}({', '.join(format_expr(a) for a in e.args)})"
    elif isinstance(e, Unary):
        if e.op == "not":
            text = "not " + format_expr(e.operand, _PREC["not"])
        else:
            text = e.op + format_expr(e.operand, _PREC["unary"])
    elif isinstance(e, Binary):
        p = _PREC[e.op]
        if e.op == "^":
            left, right = format_expr(e.left, _ATOM), format_expr(e.right, _PREC["unary"])
        elif p == 4:
            left, right = format_expr(e.left, p + 1), format_expr(e.right, p + 1)
        else:
            left, right = format_expr(e.left, p), format_expr(e.right, p + 1)
        text = f"{left} {e.op} {right}" if e.op != "^" else f"{left}^{right}"
    else:
        raise TypeError(f"not an expression node: {e!r}")
    return f"({text})" if _prec(e) < need else text


def _format_decl(d: Decl) -> str:
    if isinstance(d, OptimizerDecl):
        word = "adaptation" if d.adaptation else "optimizer"
        if d.parent is None:
            return f"{word} {d.name}"
        return f"{word} {d.name} extends {_format_parent(d.parent)}"
    if isinstance(d, AdaptDecl):
        return f"adapt {_format_parent(d.parent)}"
    if isinstance(d, HyperDecl):
        rng = f" in {d.range}" if d.range is not None else ""
        return f"hyper {d.name} = {format_number(d.default)}{rng}"
    if isinstance(d, StateDecl):
        kind = f" : {d.kind}" if d.kind != "elem" else ""
        return f"state {d.name}{kind} = {format_expr(d.init)}"
    if isinstance(d, DefDecl):
        return f"def {d.name}({', '.join(d.params)}) = {format_expr(d.body)}"
    if isinstance(d, RuleDecl):
        body = "".join(f"  {a.target} = {format_expr(a.value)}\n" for a in d.assigns)
        return f"for {format_expr(d.predicate)} {{\n{body}}}"
    if isinstance(d, WatchDecl):
        return "watch " + ", ".join(n.id for n in d.names)
    if isinstance(d, StepDecl):
        body = "".join(f"  {a.target} = {format_expr(a.value)}\n" for a in d.body)
        return f"step {{\n{body}}}"
    raise TypeError(f"not a declaration node: {d!r}")


def _format_parent(parent: str) -> str:
    return parent if parent.isidentifier() else '"' + parent + '"'


def format_program(p: Program) -> str:
    """Print a syntax tree as ``.lw`` text; ``parse_text`` of it gives an equal tree."""
    return "\n".join(_format_decl(d) for d in p.decls) + "\n"
