"""``extends`` and overrides: merge a program onto its parent (LANGUAGE.md section 7).

A child may redeclare a parent's hyper (new default or range), replace a
``def`` of the same name, add hypers, states, defs, rules and watches, and
replace the whole ``step`` block. Everything else is inherited. The result
is a :class:`Declarations`: the merged, still unchecked declarations that
``layerwise.check`` turns into a checked program.

Which files a program may read (``extends PARENT`` and ``adapt PARENT``):

- PARENT is a preset name (a name, no ``/`` and no ``.lw``), or a path to a
  file whose name ends in ``.lw``. A path is relative to the directory of
  the file that names it (to the working directory for a program given as
  text); absolute paths and ``..`` are allowed.
- The file (after following symbolic links) must be a regular file whose
  name ends in ``.lw``, of at most :data:`MAX_FILE_BYTES` bytes, in UTF-8
  (a leading byte-order mark is ignored). Anything else (``/proc/self/mem``,
  a device, a directory, a non-``.lw`` file, a link to one) is refused with
  a :class:`~layerwise.errors.SpecError` at the ``extends`` (or ``adapt``)
  line and column; the message names the path but never quotes the refused
  file's contents.
- Names are compared after Unicode NFKC normalisation, as Python compares
  identifiers: ``ﬁ`` (the ligature) and ``fi`` are the same name, and the
  checked program uses the normalised spelling. A name whose normalised
  form is a reserved word or not a name (``x½`` becomes ``x1⁄2``) is a
  SpecError at the name.
- A chain of ``extends`` may be at most :data:`MAX_EXTENDS_DEPTH` files
  deep (the program and its ancestors); a deeper chain is a SpecError at the
  ``extends`` that goes past the limit. Resolution is iterative, so no depth
  exhausts Python's stack.
"""
from __future__ import annotations

import os
import re
import stat
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path

from .builtins import BUILTINS, PREDEFINED
from .errors import Problem, Span, SpecError, suggest
from .resources import preset_names, preset_path
from .syntax import (RESERVED, AdaptDecl, Assign, Binary, Call, DefDecl, HyperDecl, Name,
                     OptimizerDecl, Program, RuleDecl, StateDecl, StepDecl, Unary, WatchDecl,
                     parse_text)

__all__ = ["Declarations", "collect", "apply_override", "copy_declarations", "program_file",
           "read_source", "MAX_EXTENDS_DEPTH", "MAX_FILE_BYTES"]

#: The most files an ``extends`` chain may hold: the program and its ancestors.
MAX_EXTENDS_DEPTH = 32

#: The largest program file (a parent, an adaptation, or a file given to
#: ``lw.load``) that is read, in bytes.
MAX_FILE_BYTES = 1_000_000


@dataclass
class Declarations:
    """Merged declarations of a program and its ancestors, in declaration order."""
    name: str = ""
    name_span: Span | None = None
    hypers: dict[str, HyperDecl] = field(default_factory=dict)
    states: dict[str, StateDecl] = field(default_factory=dict)
    defs: dict[str, DefDecl] = field(default_factory=dict)
    rules: list[RuleDecl] = field(default_factory=list)
    watches: list[Name] = field(default_factory=list)
    step: StepDecl | None = None
    #: False when a parent could not be loaded or the program has no
    #: ``optimizer`` line: checking would then only report consequences.
    complete: bool = True
    #: an ``adaptation`` program (LANGUAGE.md section 12), not an optimizer
    adaptation: bool = False
    #: the ``adapt NAME`` declaration of an optimizer (the last one wins in a child)
    adapt: AdaptDecl | None = None
    #: the file the declarations were read from (relative paths resolve there)
    filename: str = "<string>"

    def category(self, name: str) -> str | None:
        """'hyper', 'state' or 'def' if ``name`` is declared as one, else None."""
        for cat, table in (("hyper", self.hypers), ("state", self.states), ("def", self.defs)):
            if name in table:
                return cat
        return None


def program_file(parent: str, span: Span, filename: str, problems: list[Problem],
                 what: str = "parent") -> Path | None:
    """The file of a preset name or of a path relative to ``filename`` (the
    ``extends`` parent or ``adapt`` target ``parent``, written at ``span``).

    Appends a problem at ``span`` and returns None if it is not a preset, or
    not a regular ``.lw`` file (see the module docstring for the policy)."""
    if parent.endswith(".lw") or "/" in parent or "\\" in parent:
        if not parent.endswith(".lw"):
            article = "an" if what[:1] in "aeiou" else "a"
            problems.append(Problem(span, f"{article} {what} file must be a '.lw' file; "
                                          f"'{parent}' is not (a preset is named without '/')"))
            return None
        base = Path(filename).parent if not filename.startswith("<") else Path.cwd()
        path = base / parent
        try:
            path = path.resolve()
            info = os.stat(path)
        except (OSError, ValueError, RuntimeError):
            problems.append(Problem(span, f"cannot find {what} file '{parent}' (looked for "
                                          f"{path})"))
            return None
        if not path.name.endswith(".lw"):
            problems.append(Problem(span, f"{what} file '{parent}' is a link to '{path}', "
                                          "which is not a '.lw' file"))
            return None
        if not stat.S_ISREG(info.st_mode):
            problems.append(Problem(span, f"{what} file '{parent}' ({path}) is not a regular "
                                          "file"))
            return None
        return path
    path = preset_path(parent)
    if path is None:
        problems.append(Problem(span, f"unknown {what} '{parent}': not a preset"
                                + suggest(parent, preset_names())
                                + " (a file path must end in '.lw')"))
    return path


class _Unreadable(Exception):
    """A program file that cannot be read as text: why, and where (line and
    column of an invalid byte, else 1:1)."""

    def __init__(self, why: str, line: int = 1, column: int = 1):
        super().__init__(why)
        self.why, self.line, self.column = why, line, column


def _read(path: str | os.PathLike) -> str:
    try:
        # stat first: opening a FIFO would block until something writes to it
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise _Unreadable("it is not a regular file")
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise _Unreadable(f"cannot read it: {err.strerror or type(err).__name__}") from None
    if len(data) > MAX_FILE_BYTES:
        raise _Unreadable(f"it is larger than {MAX_FILE_BYTES:,} bytes, the limit for a "
                          "program file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        start = err.start
        line = data.count(b"\n", 0, start) + 1
        before = data[data.rfind(b"\n", 0, start) + 1:start]
        column = len(before.decode("utf-8", errors="replace")) + 1
        raise _Unreadable(f"it is not valid UTF-8 (byte 0x{data[start]:02x} at line {line}, "
                          f"column {column})", line, column) from None


def read_source(path: str | os.PathLike, span: Span | None = None, what: str = "parent") -> str:
    """The text of program file ``path`` (UTF-8, a leading BOM dropped).

    Raises:
        SpecError: it is not a regular file, cannot be read, is larger than
            :data:`MAX_FILE_BYTES` or is not valid UTF-8. With ``span`` (the
            ``extends`` or ``adapt`` that names a ``what`` file) the problem
            is placed there; without, at the invalid byte of ``path`` itself
            (1:1 for the other faults). The file's contents are never quoted.
    """
    try:
        return _read(path)
    except _Unreadable as err:
        if span is not None:
            raise SpecError(Problem(span, f"cannot use {what} file '{path}': {err.why}")) \
                from None
        raise SpecError(Problem(Span(str(path), err.line, err.column, err.column + 1),
                                f"cannot read program file: {err.why}")) from None


def _parent_file(decl: OptimizerDecl, filename: str, problems: list[Problem]) -> Path | None:
    assert decl.parent is not None
    return program_file(decl.parent, decl.parent_span, filename, problems)


def collect(program: Program, problems: list[Problem], chain: tuple[str, ...] = ()) -> Declarations:
    """Resolve ``extends`` and merge ``program`` onto its parents.

    The chain of parents is followed iteratively, at most
    :data:`MAX_EXTENDS_DEPTH` files deep (a deeper chain is a problem at the
    ``extends`` that goes past the limit). Problems (unknown or refused
    parent, cycles, duplicate or clashing declarations) are appended to
    ``problems``; merging goes on past them so that every independent error
    is reported. ``chain``: resolved files that include ``program`` (a
    parent that is one of them is a cycle).
    """
    # child first: each program and whether its parent could be loaded
    program = normalize_names(program, problems)
    links: list[Program] = [program]
    keys = [*chain, _key(program.filename)]
    complete = True
    while True:
        current = links[-1]
        decls = current.decls
        if not decls or not isinstance(decls[0], OptimizerDecl) or decls[0].parent is None:
            break
        head = decls[0]
        path = _parent_file(head, current.filename, problems)
        if path is None:
            complete = False
            break
        key = str(path)
        if key in keys:
            names = " -> ".join(Path(c).name for c in (*keys, key))
            problems.append(Problem(head.parent_span, f"extends cycle: {names}"))
            complete = False
            break
        if len(links) >= MAX_EXTENDS_DEPTH:
            problems.append(Problem(head.parent_span, f"extends chain too deep: more than "
                                                      f"{MAX_EXTENDS_DEPTH} files (the limit)"))
            complete = False
            break
        try:
            links.append(normalize_names(
                parse_text(read_source(path, head.parent_span), str(path)), problems))
        except SpecError as err:
            problems.extend(err.problems)
            complete = False
            break
        keys.append(key)

    base = Declarations(filename=links[-1].filename, complete=complete)
    for i in range(len(links) - 1, -1, -1):
        current = links[i]
        decls = current.decls
        if not decls or not isinstance(decls[0], OptimizerDecl):
            span = _first_span(current)
            problems.append(Problem(span, "a program must start with 'optimizer NAME' (or "
                                          "'adaptation NAME')"))
            base = Declarations(filename=current.filename)
            apply_override(base, current, problems, rename=False)
            base.complete = False
            continue
        head = decls[0]
        if i < len(links) - 1 and base.complete and base.adaptation != head.adaptation:
            kinds = ("an adaptation", "an optimizer")
            problems.append(Problem(head.parent_span, f"'{head.parent}' is "
                                    f"{kinds[not base.adaptation]}; "
                                    f"{kinds[not head.adaptation]} can only extend "
                                    f"{kinds[not head.adaptation]}"))
            base.complete = False
        base.name, base.name_span = head.name, head.span
        base.adaptation, base.filename = head.adaptation, current.filename
        _apply(base, decls[1:], problems)
    return base


_NAME = re.compile(r"(?!\d)\w+\Z")


def normalize_names(program: Program, problems: list[Problem]) -> Program:
    """``program`` with every name in its NFKC form (Python's rule for
    identifiers), so that names equal under NFKC are one name. A name whose
    NFKC form is a reserved word or not a name is a problem at its span.
    Programs written in ASCII are returned unchanged (the common case)."""
    if program.source.isascii():
        return program
    memo: dict[int, tuple[object, object]] = {}
    bad: set[str] = set()

    def name(text: str, span: Span) -> str:
        if text.isascii():
            return text
        norm = unicodedata.normalize("NFKC", text)
        if norm != text and (norm in RESERVED or not _NAME.match(norm)) and text not in bad:
            bad.add(text)    # reported once, at its first occurrence
            problems.append(Problem(span, f"'{text}' is '{norm}' under Unicode NFKC "
                                          "normalisation (the form names are compared in), "
                                          "which is not a valid name; rename it"))
        return norm

    def expr(e):
        hit = memo.get(id(e))
        if hit is not None:
            return hit[1]
        if isinstance(e, Name):
            out = replace(e, id=name(e.id, e.span))
        elif isinstance(e, Call):
            out = replace(e, func=name(e.func, e.span), args=tuple(expr(a) for a in e.args))
        elif isinstance(e, Unary):
            out = replace(e, operand=expr(e.operand))
        elif isinstance(e, Binary):
            out = replace(e, left=expr(e.left), right=expr(e.right))
        else:
            out = e
        memo[id(e)] = (e, out)
        return out

    def assign(a: Assign) -> Assign:
        return replace(a, target=name(a.target, a.span), value=expr(a.value))

    out = []
    for d in program.decls:
        if isinstance(d, (HyperDecl, StateDecl)):
            d = replace(d, name=name(d.name, d.span))
            if isinstance(d, StateDecl):
                d = replace(d, init=expr(d.init))
        elif isinstance(d, DefDecl):
            spans = d.param_spans or (d.span,) * len(d.params)
            d = replace(d, name=name(d.name, d.span), body=expr(d.body),
                        params=tuple(name(p, sp) for p, sp in zip(d.params, spans)))
        elif isinstance(d, RuleDecl):
            d = replace(d, predicate=expr(d.predicate),
                        assigns=tuple(assign(a) for a in d.assigns))
        elif isinstance(d, WatchDecl):
            d = replace(d, names=tuple(expr(n) for n in d.names))
        elif isinstance(d, StepDecl):
            d = replace(d, body=tuple(assign(a) for a in d.body))
        out.append(d)
    return replace(program, decls=tuple(out))


def _key(filename: str) -> str:
    return filename if filename.startswith("<") else str(Path(filename).resolve())


def _first_span(program: Program) -> Span:
    if program.decls:
        span = getattr(program.decls[0], "span")
        text = span.source_line()
        column = len(text) - len(text.lstrip()) + 1 if text.strip() else span.column
        word = len(text.strip().split()[0]) if text.strip() else 1
        return Span(span.filename, span.line, column, column + word, span.source)
    return Span(program.filename, 1, 1, 2, program.source)


def apply_override(base: Declarations, program: Program, problems: list[Problem],
                   rename: bool = True) -> Declarations:
    """Apply the declarations of ``program`` onto ``base`` in place (``Spec.override``).

    A leading ``optimizer NAME`` renames the result; ``extends`` is not
    allowed in an override (the base is the parent).
    """
    decls = normalize_names(program, problems).decls
    if decls and isinstance(decls[0], OptimizerDecl) and rename:
        head = decls[0]
        if head.parent is not None:
            problems.append(Problem(head.parent_span,
                                    "an override cannot use 'extends': its parent is the spec"))
        base.name, base.name_span = head.name, head.span
        decls = decls[1:]
    _apply(base, decls, problems)
    return base


def _apply(base: Declarations, decls, problems: list[Problem]) -> None:
    seen: dict[str, tuple[str, Span]] = {}
    inherited = {n: base.category(n) for n in (*base.hypers, *base.states, *base.defs)}

    def declare(name: str, cat: str, span: Span) -> bool:
        if name in PREDEFINED:
            problems.append(Problem(span, f"'{name}' is predefined ({PREDEFINED[name]}) "
                                          f"and cannot be declared as a {cat}"))
            return False
        if name in BUILTINS:
            problems.append(Problem(span, f"'{name}' is a built-in function and cannot be "
                                          f"declared as a {cat}"))
            return False
        if name in seen:
            other, where = seen[name]
            problems.append(Problem(span, f"'{name}' is already declared as a {other} "
                                          f"at line {where.line}"))
            return False
        old = inherited.get(name)
        if old is not None and old != cat:
            problems.append(Problem(span, f"'{name}' is inherited as a {old}; "
                                          f"it cannot be redeclared as a {cat}"))
            return False
        if old == "state":
            problems.append(Problem(span, f"state '{name}' is inherited; a child may not "
                                          "redeclare a state (only hypers, defs and step)"))
            return False
        seen[name] = (cat, span)
        return True

    step_span: Span | None = None
    adapt_span: Span | None = None
    for d in decls:
        if isinstance(d, OptimizerDecl):
            word = "adaptation" if d.adaptation else "optimizer"
            problems.append(Problem(d.span, f"'{word}' must be the first statement, and "
                                            "only once"))
        elif isinstance(d, AdaptDecl):
            if base.adaptation:
                problems.append(Problem(d.span, "an adaptation cannot adapt another; "
                                                "'adapt' belongs in an optimizer"))
            elif adapt_span is not None:
                problems.append(Problem(d.span, f"only one 'adapt' is allowed (the first "
                                                f"is at line {adapt_span.line})"))
            else:
                adapt_span, base.adapt = d.span, d
        elif isinstance(d, HyperDecl):
            if declare(d.name, "hyper", d.span):
                inherited_hyper = base.hypers.get(d.name)
                if d.range is None and inherited_hyper is not None:
                    # a new default keeps the parent's range; a child widens
                    # or drops it only by saying so (e.g. in (-inf, inf))
                    d = replace(d, range=inherited_hyper.range)
                base.hypers[d.name] = d
        elif isinstance(d, StateDecl):
            if declare(d.name, "state", d.span):
                base.states[d.name] = d
        elif isinstance(d, DefDecl):
            if declare(d.name, "def", d.span):
                base.defs[d.name] = d
        elif isinstance(d, RuleDecl):
            base.rules.append(d)
        elif isinstance(d, WatchDecl):
            base.watches.extend(n for n in d.names
                                if n.id not in {w.id for w in base.watches})
        elif isinstance(d, StepDecl):
            if step_span is not None:
                problems.append(Problem(d.span, f"only one step block is allowed "
                                                f"(the first is at line {step_span.line})"))
            else:
                step_span = d.span
                base.step = d


def copy_declarations(d: Declarations) -> Declarations:
    """A copy of ``d`` that can be changed without changing ``d``."""
    return Declarations(d.name, d.name_span, dict(d.hypers), dict(d.states),
                        dict(d.defs), list(d.rules), list(d.watches), d.step, d.complete,
                        d.adaptation, d.adapt, d.filename)
