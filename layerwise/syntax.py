"""Text -> syntax tree: immutable syntax nodes, each with its source span.

The grammar lives in ``grammars/layerwise.lark`` and nothing else in the
package describes syntax. :func:`parse_text` runs Lark's LALR parser and a
:class:`lark.Transformer` (one method per grammar rule) that builds the
frozen dataclasses below. :func:`format_program` prints a tree back to text
that parses to the same tree.

Node equality ignores spans (``compare=False``), so a tree parsed from
printed text equals the original. Expression nodes carry a ``kind`` that is
``None`` in a syntax tree and set by the checker (``layerwise.check``).

Limits (LANGUAGE.md section 2). Parsing and tree building never recurse per
nesting level, and every later stage gets trees of bounded depth:

- :data:`MAX_NESTING` (200): how deeply operators, calls, ``-``/``+``/``not``
  and ``^`` may nest inside one expression. A chain of one left-associative
  operator (``a + b - c + ...``, ``a * b / c``, ``a and b and c``) counts as
  one level however long it is; parentheses alone add no level.
- :data:`MAX_DEPTH` (400): the depth of an expression's syntax tree, where
  each operator of such a chain is one level. The checker and the lowering
  recurse once or twice per level of this tree, so this bound keeps them
  well inside Python's default recursion limit. The checker's own limit,
  after defs are inlined, is lower (``check.MAX_EXPRESSION_DEPTH``, 200
  levels counted its way), so that is the limit a program meets.

Deeper input is a :class:`~layerwise.errors.SpecError` at the construct that
crosses the limit. Equality and hashing of expression nodes do not recurse
either, so any tree the parser returns can be compared, hashed and cached.
"""
from __future__ import annotations

import math
import re
import threading
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
    "RESERVED", "MAX_NESTING", "MAX_DEPTH", "walk", "expr_depth",
]

_NOSPAN = Span("<none>", 0, 0, 0)

#: Words that cannot be names (LANGUAGE.md section 2; the grammar's NAME excludes them).
RESERVED = frozenset({"optimizer", "extends", "hyper", "state", "def", "step", "for", "watch",
                      "in", "and", "or", "not", "true", "false", "inf"})


#: Deepest nesting of operators, calls, prefix operators and ``^`` in one
#: expression; a chain of one left-associative operator counts once.
MAX_NESTING = 200

#: Deepest expression syntax tree, counting each operator of a chain.
MAX_DEPTH = 400


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


def walk(e: Expr):
    """Every node of ``e``, parents before children (left to right), without recursion."""
    stack = [e]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(children(node)))


def expr_depth(e: Expr) -> int:
    """The depth of ``e``'s tree (1 for a leaf), computed without recursion."""
    deepest = 0
    stack = [(e, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        stack.extend((c, level + 1) for c in children(node))
    return deepest


# Equality and hashing of expression nodes compare the same fields as the
# dataclass methods would (everything but ``span``), but walk the trees with
# a stack instead of recursing, so that a deep tree (a long sum is a
# left-deep tree) can be compared and used as a dict key. A node's hash is
# cached on it (nodes are immutable); the cache is not pickled.
_LEAF_FIELDS = {"Num": ("value", "kind"), "Name": ("id", "kind"), "Str": ("value", "kind"),
                "Unary": ("op", "kind"), "Binary": ("op", "kind"), "Call": ("func", "kind")}


def _expr_eq(a, b):
    if a.__class__ is not b.__class__:
        return NotImplemented
    stack = [(a, b)]
    seen: set[tuple[int, int]] = set()      # pairs already compared (trees may share nodes)
    while stack:
        x, y = stack.pop()
        if x is y or (id(x), id(y)) in seen:
            continue
        seen.add((id(x), id(y)))
        if x.__class__ is not y.__class__:
            return False
        for f in _LEAF_FIELDS[x.__class__.__name__]:
            vx, vy = getattr(x, f), getattr(y, f)
            if not (vx is vy or vx == vy):
                return False
        cx, cy = children(x), children(y)
        if len(cx) != len(cy):
            return False
        stack.extend(zip(cx, cy))
    return True


def _expr_hash(e) -> int:
    h = e.__dict__.get("_hash")
    if h is not None:
        return h
    stack = [e]
    while stack:
        node = stack[-1]
        if "_hash" in node.__dict__:
            stack.pop()
            continue
        todo = [c for c in children(node) if "_hash" not in c.__dict__]
        if todo:
            stack.extend(todo)
            continue
        stack.pop()
        key = tuple(getattr(node, f) for f in _LEAF_FIELDS[node.__class__.__name__])
        object.__setattr__(node, "_hash", hash((node.__class__.__name__, key,
                                                tuple(c._hash for c in children(node)))))
    return e._hash


def _expr_getstate(e) -> dict:
    state = dict(e.__dict__)
    state.pop("_hash", None)
    return state


for _cls in (Num, Name, Str, Unary, Binary, Call):
    _cls.__eq__ = _expr_eq
    _cls.__hash__ = _expr_hash
    _cls.__getstate__ = _expr_getstate
del _cls


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

    It also keeps the brackets that are open (:attr:`open`, innermost last)
    so that a syntax error can name an unclosed ``(`` or ``{``. The Lark
    parser, and so this object, is shared by every thread: the record is
    kept per thread, and each parse starts a new one.
    """

    always_accept = ("_NL",)

    def __init__(self):
        self._local = threading.local()

    @property
    def open(self) -> list[lark.Token]:
        """The brackets left open where this thread's last parse stopped."""
        return getattr(self._local, "open", [])

    @property
    def seen(self) -> int:
        """Where the last token this thread's last parse passed on starts (-1: none)."""
        return getattr(self._local, "seen", -1)

    def process(self, stream):
        """Drop the newlines inside ``( )`` from ``stream`` (a generator)."""
        local = self._local
        local.open = opened = []
        local.seen = -1
        parens = 0                       # how many of ``opened`` are '('
        for tok in stream:
            local.seen = tok.start_pos
            kind = tok.type
            if kind == "LPAR" or kind == "LBRACE":
                opened.append(tok)
                parens += kind == "LPAR"
            elif kind == "RPAR" or kind == "RBRACE" or kind == "RBOUND":
                # a ')' the parser does not expect may be lexed as a range's RBOUND
                want = "LBRACE" if kind == "RBRACE" else "LPAR"
                if opened and opened[-1].type == want:
                    opened.pop()
                    parens -= want == "LPAR"
            elif kind == "_NL" and parens:
                continue
            yield tok


_PARSER: lark.Lark | None = None
_PARSER_LOCK = threading.Lock()


def _parser() -> lark.Lark:
    global _PARSER
    with _PARSER_LOCK:
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

#: Longest piece of the program a message quotes in full (the caret line shows all).
_QUOTE = 40


def _clip(word: str) -> str:
    return word if len(word) <= _QUOTE else word[:_QUOTE - 10] + "..." + word[-7:]


def _describe(tok: lark.Token) -> str:
    if tok.type == "$END":
        return "end of file"
    if tok.type == "_NL":
        return "end of line"
    return f"'{_clip(str(tok))}'"


def _expected(names) -> str:
    words = sorted({_TOKEN_WORDS.get(n, f"'{n.lower()}'") for n in names})
    if len(words) > 6:
        return ""
    return "; expected " + ", ".join(words)


# the grammar's NUMBER, written so that a failed fullmatch cannot backtrack
# quadratically (``\d+\.?\d*`` can split a run of digits in n ways)
_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_BAD_NUMBER = re.compile(r"(?:\d|\.\d)(?:[eE][+-]|[\w.])*")
# what a line that starts a statement looks like (a declaration or ``NAME =``)
_STATEMENT_HEAD = re.compile(r"[ \t\f]*(?:(?:optimizer|adaptation|adapt|hyper|state|def|step|"
                             r"for|watch)(?!\w)|\w+[ \t\f]*=(?!=))")


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


def _line_text(text: str, line: int) -> str:
    """Line ``line`` (1-based) of ``text``; lines end only at ``\\n``."""
    start = 0
    for _ in range(line - 1):
        start = text.find("\n", start) + 1
        if start == 0:
            return ""
    end = text.find("\n", start)
    return text[start:] if end < 0 else text[start:end]


def _starts_statement(tok: lark.Token, text: str) -> bool:
    """Whether ``tok`` is in the head of what looks like a new statement on its line."""
    line = _line_text(text, tok.line)
    m = _STATEMENT_HEAD.match(line)
    return m is not None and tok.column - 1 < m.end()


def _syntax_problem(err: lark.exceptions.UnexpectedInput, filename: str, text: str) -> Problem:
    line = getattr(err, "line", None)
    column = getattr(err, "column", None)
    if not isinstance(line, int) or line < 1:
        line = text.count("\n") + 1
        column = len(text) - (text.rfind("\n") + 1) + 1
    postlex = _parser().options.postlex
    opened = list(postlex.open)
    tok = getattr(err, "token", None)
    # The contextual lexer rejects a token the parser cannot take before the
    # postlexer sees it: a rejected ')' or '}' still closes its bracket.
    if tok is not None and opened and tok.type in ("RPAR", "RBRACE", "RBOUND") \
            and isinstance(tok.start_pos, int) and tok.start_pos > postlex.seen \
            and opened[-1].type == ("LBRACE" if tok.type == "RBRACE" else "LPAR"):
        opened.pop()
    # An unclosed bracket: the end of the file (or a '}' while a '(' is open,
    # or a new statement on a later line) is where the parser notices, but
    # the fault is the opening bracket.
    if isinstance(err, (lark.exceptions.UnexpectedToken, lark.exceptions.UnexpectedEOF)) \
            and opened and (tok is None or tok.type == "$END"
                            or (tok.type == "RBRACE" and opened[-1].type == "LPAR")
                            or (opened[-1].type == "LPAR" and opened[-1].line < tok.line
                                and _starts_statement(tok, text))):
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
                           f"syntax error: malformed number '{_clip(word)}'")
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


# Rules of the parse tree that are one level of nesting (MAX_NESTING). A
# chain ``a + b + c`` is one ``sum`` node; parentheses make no node.
_NESTING_RULES = frozenset({"or_expr", "and_expr", "not_op", "comparison", "match", "sum",
                            "product", "unary_op", "power", "call"})


def _check_nesting(tree: lark.Tree, filename: str, text: str) -> None:
    """SpecError at the first construct nested deeper than MAX_NESTING."""
    stack = [(tree, 0)]
    while stack:
        node, level = stack.pop()
        if node.data in _NESTING_RULES:
            level += 1
            if level > MAX_NESTING:
                meta = node.meta
                raise SpecError(Problem(
                    Span(filename, meta.line, meta.column, meta.column + 1, text),
                    f"expression nested too deeply: more than {MAX_NESTING} levels of "
                    "operators, calls or '^' (the limit); split it into several assignments"))
        stack.extend((c, level) for c in reversed(node.children) if isinstance(c, lark.Tree))


def _decl_exprs(d: Decl) -> list[Expr]:
    if isinstance(d, StateDecl):
        return [d.init]
    if isinstance(d, DefDecl):
        return [d.body]
    if isinstance(d, RuleDecl):
        return [d.predicate, *(a.value for a in d.assigns)]
    if isinstance(d, StepDecl):
        return [a.value for a in d.body]
    return []


def _check_depth(program: Program) -> None:
    """SpecError at the first expression whose tree is deeper than MAX_DEPTH."""
    for d in program.decls:
        for e in _decl_exprs(d):
            stack = [(e, 1)]
            while stack:
                node, level = stack.pop()
                if level > MAX_DEPTH:
                    raise SpecError(Problem(node.span, (
                        f"expression too deep: its tree has more than {MAX_DEPTH} levels "
                        "(the limit; each operator of a chain like a + b + c is one level); "
                        "split it into several assignments")))
                stack.extend((c, level + 1) for c in reversed(children(node)))


def parse_text(text: str, filename: str = "<string>") -> Program:
    """Parse the text of a ``.lw`` program into a syntax tree.

    Only syntax is checked here; names, kinds and the other rules of
    LANGUAGE.md sections 3-7 are checked by ``layerwise.check``. A byte
    order mark (U+FEFF) at the start of ``text`` is ignored. Time and memory
    are linear in the length of ``text``, and nothing recurses per nesting
    level; an expression nested deeper than :data:`MAX_NESTING` or with a
    tree deeper than :data:`MAX_DEPTH` is an error.

    Raises:
        SpecError: on a syntax error or a limit exceeded, with its file,
            line and column.
    """
    text = text.removeprefix("\ufeff")
    try:
        tree = _parser().parse(text)
    except lark.exceptions.UnexpectedInput as err:
        raise SpecError(_syntax_problem(err, filename, text)) from None
    _check_nesting(tree, filename, text)
    program = _Build(filename, text).transform(tree)
    _check_depth(program)
    return program


def parse_fragment(text: str, filename: str = "<override>") -> Program:
    """Parse declarations that may lack the ``optimizer`` line (``Spec.override``)."""
    return parse_text(text, filename)


class _Build(lark.visitors.Transformer_NonRecursive):
    """Lark parse tree -> syntax nodes; one method per grammar rule.

    Non-recursive (an explicit stack), so deep nesting cannot overflow
    Python's stack here.
    """

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
