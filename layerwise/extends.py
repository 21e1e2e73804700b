"""``extends`` and overrides: merge a program onto its parent (LANGUAGE.md section 7).

A child may redeclare a parent's hyper (new default or range), replace a
``def`` of the same name, add hypers, states, defs, rules and watches, and
replace the whole ``step`` block. Everything else is inherited. The result
is a :class:`Declarations`: the merged, still unchecked declarations that
``layerwise.check`` turns into a checked program.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from .builtins import BUILTINS, PREDEFINED
from .errors import Problem, Span, SpecError, suggest
from .resources import preset_names, preset_path
from .syntax import (AdaptDecl, DefDecl, HyperDecl, Name, OptimizerDecl, Program, RuleDecl,
                     StateDecl, StepDecl, WatchDecl, parse_text)

__all__ = ["Declarations", "collect", "apply_override", "copy_declarations", "program_file"]


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
    ``extends`` parent or ``adapt`` target ``parent``, written at ``span``)."""
    if parent.endswith(".lw") or "/" in parent:
        base = Path(filename).parent if not filename.startswith("<") else Path.cwd()
        path = (base / parent).resolve()
        if not path.is_file():
            problems.append(Problem(span, f"cannot find {what} file '{parent}' (looked for {path})"))
            return None
        return path
    path = preset_path(parent)
    if path is None:
        problems.append(Problem(span, f"unknown {what} '{parent}': not a preset"
                                + suggest(parent, preset_names())
                                + " (a file path must end in '.lw')"))
    return path


def _parent_file(decl: OptimizerDecl, filename: str, problems: list[Problem]) -> Path | None:
    assert decl.parent is not None
    return program_file(decl.parent, decl.parent_span, filename, problems)


def collect(program: Program, problems: list[Problem], chain: tuple[str, ...] = ()) -> Declarations:
    """Resolve ``extends`` recursively and merge ``program`` onto its parents.

    Problems (unknown parent, cycles, duplicate or clashing declarations)
    are appended to ``problems``; merging goes on past them so that every
    independent error is reported.
    """
    decls = program.decls
    base = Declarations(filename=program.filename)
    if not decls or not isinstance(decls[0], OptimizerDecl):
        span = _first_span(program)
        problems.append(Problem(span, "a program must start with 'optimizer NAME' (or "
                                      "'adaptation NAME')"))
        apply_override(base, program, problems, rename=False)
        base.complete = False
        return base
    head = decls[0]
    if head.parent is not None:
        path = _parent_file(head, program.filename, problems)
        base.complete = path is not None
        if path is not None:
            key = str(path)
            if key in chain or key == _key(program.filename):
                names = " -> ".join(Path(c).name for c in (*chain, program.filename, key))
                problems.append(Problem(head.parent_span, f"extends cycle: {names}"))
                base.complete = False
            else:
                try:
                    parent = parse_text(path.read_text(encoding="utf-8"), str(path))
                    base = collect(parent, problems, (*chain, _key(program.filename)))
                except SpecError as err:
                    problems.extend(err.problems)
                    base.complete = False
                if base.complete and base.adaptation != head.adaptation:
                    kinds = ("an adaptation", "an optimizer")
                    problems.append(Problem(head.parent_span, f"'{head.parent}' is "
                                            f"{kinds[not base.adaptation]}; "
                                            f"{kinds[not head.adaptation]} can only extend "
                                            f"{kinds[not head.adaptation]}"))
                    base.complete = False
    base.name, base.name_span = head.name, head.span
    base.adaptation, base.filename = head.adaptation, program.filename
    _apply(base, decls[1:], problems)
    return base


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
    decls = program.decls
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
