"""Syntax tree -> checked program: names, kinds, def inlining, every rule of the contract.

``check_program`` takes a parsed program, resolves ``extends`` (via
``layerwise.extends``), inlines every ``def`` call, resolves every name,
infers each expression's kind (const < global < layer < row, col < elem,
LANGUAGE.md sections 5 and 10) and enforces sections 3 to 7 and 10 to 12.
A reduction's unit (``norm(x, row)``) stays its last argument, a
:class:`~layerwise.syntax.Name` of kind ``"unit"``. It collects independent problems
and raises them together in one :class:`~layerwise.errors.SpecError`.

``watch NAME`` of a ``def`` (an addition to section 3): the step's one call
of it (after inlining) is computed into a local named after the def, just
before the statement that holds it, and that local is watched; the value
and the updates are unchanged.

Limits (each gives a :class:`~layerwise.errors.SpecError` at the place
that reaches it, never unbounded work or a crash):

- :data:`MAX_DEF_EXPANSION` nodes: the size of any expression after its
  ``def`` calls are inlined (a def called twice by a def called twice ...
  doubles at every level). Inlining shares the trees of equal calls, so
  checking is linear in the program up to the limit.
- :data:`MAX_EXPRESSION_DEPTH`: how deeply an expression may nest once its
  defs are inlined.
- :data:`MAX_PROBLEMS`: at most this many problems are reported (the
  first ones, in file order); "did you mean" looks at no more than
  :data:`MAX_SUGGESTION_CANDIDATES` names.
- A ``name ~ "regex"`` pattern may not repeat something that itself holds a
  repetition or an alternative (``(a+)+``, ``(a|aa)*``, ``(a?){9}``), use a
  backreference, or hold more than :data:`MAX_REGEX_REPEATS` repetitions
  (``*``, ``+``, ``{m,n}`` with n > 1): Python's backtracking ``re`` takes
  exponential or high-polynomial time on some names with those, and the
  names come from the user's model (``layerwise.rules`` also bounds the name
  length it matches).
- A hyper may not be named like a key that ``torch.optim`` or its LR
  schedulers keep in ``param_groups`` (:data:`RESERVED_GROUP_KEYS`): a hyper
  is a param_groups key.

The result, :class:`CheckedProgram`, holds only hypers, states, rules,
watches and a step whose expressions have no ``def`` calls left and carry
their kind; the lowering (``layerwise.lower``) trusts it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import PurePath
from typing import Sequence

from .builtins import (BUILTINS, PARAM_NAMES, PREDICATE_NAMES, RULE_NAMES, UNITS, narrower,
                       widest)
from .errors import Problem, Span, SpecError, suggest
from .extends import Declarations, collect
from .syntax import (Assign, Binary, Call, Expr, Name, Num, Program, Range, Str, Unary, children,
                     format_expr, format_number)
from .syntax import walk as _walk

__all__ = ["Hyper", "State", "Rule", "CheckedProgram", "check_program", "check_declarations",
           "MAX_DEF_EXPANSION", "MAX_EXPRESSION_DEPTH", "MAX_PROBLEMS",
           "MAX_SUGGESTION_CANDIDATES", "MAX_REGEX_REPEATS", "RESERVED_GROUP_KEYS",
           "regex_problem"]

#: The most nodes an expression may have once its def calls are inlined.
MAX_DEF_EXPANSION = 10_000

#: The deepest an expression may nest once its def calls are inlined.
MAX_EXPRESSION_DEPTH = 200

#: The most problems one SpecError reports.
MAX_PROBLEMS = 100

#: The most known names a "did you mean" suggestion compares against.
MAX_SUGGESTION_CANDIDATES = 500

#: The most repetitions (``*``, ``+``, ``{m,n}`` with n > 1) a name pattern may hold.
MAX_REGEX_REPEATS = 2

#: ``param_groups`` keys of torch.optim and its LR schedulers (and ``betas``,
#: which ``lw.Optimizer`` maps to ``beta1``, ``beta2``): not hyper names.
RESERVED_GROUP_KEYS = frozenset({"params", "param_names", "initial_lr", "betas", "max_lr",
                                 "min_lr", "max_momentum", "base_momentum", "swa_lr"})

@dataclass(frozen=True)
class Hyper:
    """A hyperparameter: name, default value and optional allowed range."""
    name: str
    default: float
    range: Range | None = None
    span: Span | None = field(default=None, compare=False, repr=False)

    def admits(self, value: float) -> bool:
        """Whether ``value`` is allowed (in range; NaN never is)."""
        if isinstance(value, float) and math.isnan(value):
            return False
        return self.range is None or self.range.contains(value)


@dataclass(frozen=True)
class State:
    """Per-parameter state: elem (shaped like the parameter), layer (one
    number), or ``unit`` ``"row"`` / ``"col"`` (one number per row or column)."""
    name: str
    layer: bool
    init: Expr
    span: Span | None = field(default=None, compare=False, repr=False)
    unit: str | None = None

    @property
    def kind(self) -> str:
        return self.unit or ("layer" if self.layer else "elem")


@dataclass(frozen=True)
class Rule:
    """A ``for`` rule (LANGUAGE.md sections 6 and 11): a predicate over the
    parameter's ``ndim``, ``numel``, ``rows``, ``cols`` and ``name``, and
    assignments ``hyper = value`` in order; ``relative`` says, per
    assignment, whether its value names a hyper (it transforms the
    parameter's current value) or not (an override, which a value given
    explicitly in the parameter's param group wins over)."""
    predicate: Expr
    assigns: tuple[tuple[str, Expr], ...]
    relative: tuple[bool, ...] = ()
    span: Span | None = field(default=None, compare=False, repr=False)

    @property
    def uses_name(self) -> bool:
        """Whether the predicate tests the parameter's name."""
        return _mentions(self.predicate, "name")


@dataclass(frozen=True)
class CheckedProgram:
    """A checked program: what the lowering consumes.

    ``step`` is a tuple of assignments whose values are expressions with
    every ``def`` inlined and every node's ``kind`` set. ``kind`` is
    ``"optimizer"`` or ``"adaptation"`` (LANGUAGE.md section 12: its step
    also reads ``u``, and ``lr`` is its first hyper, the base's learning
    rate). ``notes`` are remarks ``layerwise check`` prints (an adapted
    base whose update is taken as a difference).
    """
    name: str
    hypers: tuple[Hyper, ...]
    states: tuple[State, ...]
    rules: tuple[Rule, ...]
    watches: tuple[str, ...]
    step: tuple[Assign, ...]
    filename: str = field(default="<string>", compare=False)
    kind: str = "optimizer"
    notes: tuple[Problem, ...] = field(default=(), compare=False)

    def hyper(self, name: str) -> Hyper:
        """The hyper called ``name`` (KeyError if none)."""
        for h in self.hypers:
            if h.name == name:
                return h
        raise KeyError(name)

    @property
    def hyper_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hypers)

    def to_text(self) -> str:
        """The program as flat ``.lw`` text (no extends, defs inlined) that checks to ``self``."""
        out = [f"{self.kind} {self.name}"]
        for h in self.hypers:
            if self.kind == "adaptation" and h.name == "lr":
                continue
            out.append(f"hyper {h.name} = {format_number(h.default)}"
                       + (f" in {h.range}" if h.range is not None else ""))
        for s in self.states:
            kind = f" : {s.kind}" if s.kind != "elem" else ""
            out.append(f"state {s.name}{kind} = {format_expr(s.init)}")
        for r in self.rules:
            body = "".join(f"  {n} = {format_expr(v)}\n" for n, v in r.assigns)
            out.append(f"for {format_expr(r.predicate)} {{\n{body}}}")
        if self.watches:
            out.append("watch " + ", ".join(self.watches))
        body = "".join(f"  {a.target} = {format_expr(a.value)}\n" for a in self.step)
        out.append(f"step {{\n{body}}}")
        return "\n".join(out) + "\n"


#: What one value of each kind is, for messages.
_PER = {"elem": "one per element", "layer": "one number per parameter", "row": "one per row",
        "col": "one per column", "global": "one number for all parameters",
        "const": "one number"}


def _kind_of(kind: str) -> str:
    """``"row-kind (one per row)"``: a kind as messages name it."""
    return f"{kind}-kind ({_PER[kind]})"


def _mentions(e: Expr, name: str) -> bool:
    if isinstance(e, Name):
        return e.id == name
    return any(_mentions(c, name) for c in children(e))



def check_program(program: Program) -> tuple[CheckedProgram, Declarations]:
    """Check a parsed program (resolving ``extends``).

    Returns the checked program and the merged declarations (kept so that
    ``Spec.override`` can apply further declarations with the same rules).

    Raises:
        SpecError: with every independent problem found.
    """
    problems: list[Problem] = []
    decls = collect(program, problems)
    return check_declarations(decls, program.filename, problems), decls


def check_declarations(decls: Declarations, filename: str = "<string>",
                       problems: Sequence[Problem] = ()) -> CheckedProgram:
    """Check merged declarations; raises SpecError listing every problem.

    ``problems`` are those already found while merging them (duplicate
    declarations and the like); they are reported together with the
    checker's own. If the declarations are incomplete (a parent could not be
    loaded), only those are reported: checking would only find consequences.
    """
    if problems and not decls.complete:
        raise SpecError(problems, main=filename)
    try:
        checked = _Checker(decls, filename).run()
    except SpecError as err:
        raise SpecError([*problems, *err.problems], main=filename) from None
    if problems:
        raise SpecError(problems, main=filename)
    if decls.adapt is not None:
        from .compose import adapted
        checked = adapted(checked, decls.adapt, decls.filename, filename)
    return checked


@dataclass
class _Scope:
    """What a name means where an expression is checked."""
    context: str                       # 'step', 'init' or 'predicate'
    env: dict[str, str]                # visible names -> kind
    fresh: set[str] = field(default_factory=set)   # assigned earlier in this step
    later: "set[str] | _Later" = field(default_factory=set)   # assigned later in this step
    subst: dict[str, Expr] = field(default_factory=dict)  # def arguments
    stack: tuple[str, ...] = ()        # defs being inlined
    call_line: int = 0
    call_file: str = ""                # where the outermost def call is
    in_global: bool = False


class _Later:
    """Names assigned at statement ``i`` or later and not yet known in ``env``
    (a membership test, O(1): no set built per statement)."""

    def __init__(self, last: dict[str, int], i: int, env: dict):
        self.last, self.i, self.env = last, i, env

    def __contains__(self, name: str) -> bool:
        return name not in self.env and self.last.get(name, -1) >= self.i


#: Hyper ``lr`` of an adaptation: the learning rate its base used (read-only).
ADAPTATION_LR = Hyper("lr", 1e-3, Range(0.0, math.inf, True, False))


class _Checker:
    def __init__(self, decls: Declarations, filename: str):
        self.d = decls
        self.filename = filename
        self.adaptation = decls.adaptation
        self.problems: list[Problem] = []
        self.reported: set[tuple[Span, str]] = set()
        self.inlined: set[str] = set()     # defs called somewhere
        # ``watch NAME`` of a def: its calls in the step (each hoisted to a
        # local named after the def just before the statement that holds it)
        self.watched_defs = {n.id for n in decls.watches if n.id in decls.defs}
        self.def_calls: dict[str, list[tuple[Span, str, bool]]] = {
            n: [] for n in self.watched_defs}  # (call span, kind, inside a global reduction)
        self.hoisted: list[Assign] = []    # hoisted calls of the statement being checked
        self.def_seen: set[str] = set()    # watched defs called in the step (even if faulty)
        # inlined calls of this statement: (def, argument and scope ids) -> value,
        # so equal calls share one tree (linear work, not exponential)
        self.shared: dict[tuple, tuple[Expr | None, tuple]] = {}
        # id(node) -> (node, size, depth) of checked expressions
        self.sizes: dict[int, tuple[Expr, int, int]] = {}
        self.depth = 0                     # nesting of expr() calls
        self.too_deep = False

    def bad(self, span: Span, message: str, scope: _Scope | None = None) -> None:
        if scope is not None and scope.stack:
            # A fault inside a def is reported once, at its first call.
            if (span, message) in self.reported:
                return
            self.reported.add((span, message))
            where = (f"line {scope.call_line}" if scope.call_file == span.filename
                     else f"{PurePath(scope.call_file).name}:{scope.call_line}")
            message += f" (in def '{scope.stack[-1]}' called at {where})"
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(span, message))
        elif len(self.problems) == MAX_PROBLEMS:
            self.problems.append(Problem(span, f"too many problems: stopping after "
                                               f"{MAX_PROBLEMS}"))

    def suggest(self, name: str, known) -> str:
        """``suggest`` over at most MAX_SUGGESTION_CANDIDATES names (none once
        the problems are capped): bounded work for any number of faults."""
        if len(self.problems) >= MAX_PROBLEMS:
            return ""
        known = list(dict.fromkeys(known))
        if len(known) > MAX_SUGGESTION_CANDIDATES:
            near = [k for k in known if abs(len(k) - len(name)) <= 2]
            known = near[-MAX_SUGGESTION_CANDIDATES:]
        return suggest(name, known)

    # ------------------------------------------------------------ driver
    def run(self) -> CheckedProgram:
        self.check_reserved_declarations()
        hypers = self.check_hypers()
        self.check_recursion()
        states = self.check_states()
        rules = self.check_rules()
        step, final_env = self.check_step()
        watches = self.check_watches(final_env)
        self.check_unused_defs()
        if self.problems:
            raise SpecError(self.problems)
        if self.adaptation:
            hypers = (ADAPTATION_LR, *hypers)
        return CheckedProgram(self.d.name, hypers, states, rules, watches, step, self.filename,
                              "adaptation" if self.adaptation else "optimizer")

    def check_reserved_declarations(self) -> None:
        """``rows``, ``cols``, ``ndim`` are predefined and ``row_block`` is set
        only in ``for`` rules (section 10): a hyper, state or def of one of
        these names is an error (the contract: "must rename it")."""
        for what, decls in (("hyper", self.d.hypers), ("state", self.d.states),
                            ("def", self.d.defs)):
            for name, decl in decls.items():
                if name in PARAM_NAMES:
                    self.bad(decl.span, f"'{name}' is predefined (the parameter's "
                                        f"{_PARAM_WORDS[name]}, LANGUAGE.md section 10); "
                                        f"rename this {what}")
                elif name == "row_block":
                    self.bad(decl.span, "'row_block' is set only in for rules (LANGUAGE.md "
                                        f"section 10); rename this {what}")

    # ------------------------------------------------------------ hypers
    def check_hypers(self) -> tuple[Hyper, ...]:
        out = []
        for h in self.d.hypers.values():
            if self.adaptation and h.name in ("lr", "u"):
                self.bad(h.span, f"'{h.name}' is predefined in an adaptation ("
                                 + ("the learning rate its base used" if h.name == "lr" else
                                    "the base's update per unit of learning rate")
                                 + ") and cannot be declared")
                continue
            if h.name in RESERVED_GROUP_KEYS:
                self.bad(h.span, f"'{h.name}' is a key that torch.optim or its LR schedulers "
                                 "keep in param_groups, and a hyper is a param_groups key "
                                 "(LANGUAGE.md section 3); rename this hyper")
                continue
            r = h.range
            if r is not None and (r.lo > r.hi or (r.lo == r.hi and not (r.lo_closed and r.hi_closed))):
                self.bad(r.span, f"empty range {r} for hyper '{h.name}'")
            elif r is not None and not r.contains(h.default):
                self.bad(h.default_span, f"default {format_number(h.default)} of hyper "
                                         f"'{h.name}' is outside its range {r}")
            elif math.isnan(h.default):
                self.bad(h.default_span, f"default of hyper '{h.name}' is not a number")
            out.append(Hyper(h.name, h.default, r, h.span))
        return tuple(out)

    # ------------------------------------------------------------ defs
    def check_recursion(self) -> None:
        calls = {name: _calls(d.body) & set(self.d.defs) for name, d in self.d.defs.items()}
        in_reported_cycle: set[str] = set()
        for name, d in self.d.defs.items():
            if len(set(d.params)) != len(d.params):
                dup = next(p for p in d.params if d.params.count(p) > 1)
                self.bad(d.span, f"def '{name}' has the argument '{dup}' twice")
            path = _cycle(name, calls)
            if path and name not in in_reported_cycle:
                in_reported_cycle.update(path)
                self.bad(d.span, "def '" + name + "' is recursive (" + " -> ".join(path)
                         + "); recursion is not allowed")

    def check_unused_defs(self) -> None:
        """Calls in defs that are never called: unknown functions and wrong arity.

        Names in a def are resolved where it is called, so an unused def can
        only be checked for what does not depend on a call site.
        """
        for d in self.d.defs.values():
            if d.name in self.inlined:
                continue
            for node in _walk(d.body):
                if not isinstance(node, Call):
                    continue
                arity = (len(self.d.defs[node.func].params) if node.func in self.d.defs
                         else BUILTINS[node.func].arity if node.func in BUILTINS else None)
                if arity is None:
                    self.bad(node.span, f"unknown function '{node.func}'"
                             + self.suggest(node.func, [*BUILTINS, *self.d.defs])
                             + f" (in def '{d.name}')")
                elif arity != len(node.args):
                    what = (f"def '{node.func}'" if node.func in self.d.defs
                            else f"{node.func}()")
                    self.bad(node.span, f"{what} takes {arity} argument{'s' * (arity != 1)}, "
                                        f"got {len(node.args)} (in def '{d.name}')")

    # ------------------------------------------------------------ states
    def param_names(self) -> dict[str, str]:
        """``rows``, ``cols``, ``ndim``: layer-kind (section 10)."""
        return {n: "layer" for n in PARAM_NAMES}

    def check_states(self) -> tuple[State, ...]:
        env = {"w": "elem", **self.param_names(), **{h: "const" for h in self.d.hypers}}
        out = []
        for s in self.d.states.values():
            scope = _Scope("init", env)
            init = self.expr(s.init, scope)
            if init is None:
                continue
            if not narrower(init.kind, s.kind):
                self.bad(s.init.span, f"{s.kind} state '{s.name}' holds {_PER[s.kind]}; its "
                                      f"initial value is {_kind_of(init.kind)}")
            out.append(State(s.name, s.layer, init, s.span, s.unit))
        return tuple(out)

    # ------------------------------------------------------------ rules
    def check_rules(self) -> tuple:
        out = []
        for r in self.d.rules:
            pred = self.predicate(r.predicate)
            assigns, relative = [], []
            for a in r.assigns:
                value = self.rule_value(a)
                if value is not None:
                    assigns.append((a.target, value))
                    relative.append(any(_mentions(value, h) for h in self.d.hypers))
            if pred is not None:
                out.append(Rule(pred, tuple(assigns), tuple(relative), r.span))
        return tuple(out)

    def rule_value(self, a: Assign) -> Expr | None:
        """A checked rule assignment's value (LANGUAGE.md section 11), or None."""
        if a.target not in self.d.hypers and a.target != "row_block":
            self.bad(a.span, f"'{a.target}' is not a hyper; a for rule may only set "
                             "hypers (and row_block)" + self.suggest(a.target, self.d.hypers))
            return None
        env = {**{h: "const" for h in self.d.hypers}, **{n: "const" for n in RULE_NAMES}}
        value = self.expr(a.value, _Scope("rule", env))
        if value is None:
            return None
        hypers = [h for h in self.d.hypers if _mentions(value, h)]
        if a.target == "row_block":
            if hypers:
                self.bad(a.value.span, "row_block lays the parameter out; it cannot depend on "
                                       f"hypers (this value names '{hypers[0]}')")
                return None
            number = _constant(value)
            if number is not None and not (number >= 1 and number == int(number)):
                self.bad(a.value.span, f"row_block must be a positive whole number, not "
                                       f"{format_number(number)}")
                return None
            return value
        if not hypers and a.target == "lr":
            self.bad(a.value.span, "a for rule may not set 'lr' to a value of its own: it "
                                   "would freeze those parameters' learning rate against LR "
                                   "schedulers; write it relative to lr, e.g. lr = "
                                   f"{format_expr(a.value)} * lr")
            return None
        number = _constant(value)
        hyper = self.d.hypers[a.target]
        if number is not None and hyper.range is not None and not hyper.range.contains(number):
            self.bad(a.value.span, f"{format_number(number)} is outside the range "
                                   f"{hyper.range} of hyper '{a.target}'")
            return None
        return value

    def predicate(self, e: Expr) -> Expr | None:
        if isinstance(e, Num):
            return replace(e, kind="const")
        if isinstance(e, Name):
            if e.id == "name":
                self.bad(e.span, "'name' can only be tested with '~' (name ~ \"regex\")")
                return None
            if e.id not in PREDICATE_NAMES:
                self.bad(e.span, f"unknown name '{e.id}' in a for predicate; predicates use "
                                 "ndim, numel, rows, cols and name"
                         + self.suggest(e.id, PREDICATE_NAMES))
                return None
            return replace(e, kind="const")
        if isinstance(e, Binary) and e.op == "~":
            if not (isinstance(e.left, Name) and e.left.id == "name"):
                self.bad(e.left.span, "'~' matches the parameter's name: write name ~ \"regex\"")
                return None
            assert isinstance(e.right, Str)
            why = regex_problem(e.right.value)
            if why is not None:
                self.bad(e.right.span, why)
                return None
            return replace(e, left=replace(e.left, kind="const"),
                           right=replace(e.right, kind="const"), kind="const")
        if isinstance(e, Binary) and e.op not in ("and", "or", "~") and _is_name_and_string(e):
            text = e.right.value if isinstance(e.right, Str) else e.left.value
            regex = "^" + re.escape(text).replace('"', '\\"') + "$"
            hint = ("; write " + ("not " if e.op == "!=" else "") + f'name ~ "{regex}"'
                    if e.op in ("==", "!=") else "")
            self.bad(e.span, "the parameter's name is tested with '~' (a regular-expression "
                             f"search), not '{e.op}'" + hint)
            return None
        if isinstance(e, (Unary, Binary)):
            parts = [self.predicate(c) for c in children(e)]
            if any(p is None for p in parts):
                return None
            if isinstance(e, Unary):
                return replace(e, operand=parts[0], kind="const")
            return replace(e, left=parts[0], right=parts[1], kind="const")
        if isinstance(e, Call):
            self.bad(e.span, f"a for predicate cannot call '{e.func}'; it may use ndim, numel, "
                             "rows, cols, name, numbers, comparisons and and/or/not")
            return None
        self.bad(e.span, "a string may only follow '~'")
        return None

    # ------------------------------------------------------------ step
    def check_step(self):
        d = self.d
        if d.step is None:
            self.bad(d.name_span, f"optimizer '{d.name}' has no step block")
            return (), {}
        env = {"w": "elem", "g": "elem", "t": "const", **self.param_names(),
               **({"u": "elem", "lr": "const"} if self.adaptation else {}),
               **{h: "const" for h in d.hypers},
               **{s.name: s.kind for s in d.states.values()}}
        # an adaptation's u is computed in the step (a global reduction cannot read it)
        fresh: set[str] = {"u"} if self.adaptation else set()
        out = []
        targets = [a.target for a in d.step.body]
        last = {t: i for i, t in enumerate(targets)}
        for i, a in enumerate(d.step.body):
            scope = _Scope("step", env, fresh, _Later(last, i, env))
            self.shared = {}
            self.hoisted = []
            value = self.expr(a.value, scope)
            for h in self.hoisted:     # watched def calls, computed just before
                env[h.target] = h.value.kind
                fresh.add(h.target)
                out.append(h)
            self.hoisted = []
            target_ok = self.check_target(a)
            if value is None or not target_ok:
                # A local whose value is wrong gets no kind (None): later uses
                # of it are not reported again, so one fault gives one error.
                env.setdefault(a.target, None)
                fresh.add(a.target)
                continue
            state = d.states.get(a.target)
            if state is not None and not narrower(value.kind, state.kind):
                self.bad(a.value.span, f"{state.kind} state '{a.target}' holds "
                                       f"{_PER[state.kind]}; this value is "
                                       f"{_kind_of(value.kind)}"
                         + (_outer(value) or _reduce_hint(state.kind, value.kind)))
                continue
            if state is None and a.target != "g" and a.target != "w":
                env[a.target] = value.kind
            elif a.target == "g":
                env["g"] = value.kind
            fresh.add(a.target)
            out.append(replace(a, value=value))
        if "w" not in targets:
            self.bad(d.step.span, "the step never assigns w, so it would not update the "
                                  "parameter")
        return tuple(out), env

    def check_target(self, a: Assign) -> bool:
        name = a.target
        if name == "t":
            self.bad(a.span, "'t' (the step count) is read-only")
        elif name in self.param_names():
            self.bad(a.span, f"'{name}' (the parameter's {_PARAM_WORDS[name]}) is read-only")
        elif name == "row_block":
            self.bad(a.span, "row_block may be set only in for rules (LANGUAGE.md section 10); "
                             "in a step it would change nothing")
        elif self.adaptation and name in ("u", "lr"):
            self.bad(a.span, f"'{name}' is read-only in an adaptation (it is "
                             + ("the base's update per unit of learning rate" if name == "u"
                                else "the learning rate its base used") + ")")
        elif name in self.d.hypers:
            self.bad(a.span, f"'{name}' is a hyper and is read-only in step")
        elif name in self.d.defs:
            self.bad(a.span, f"'{name}' is a def and cannot be assigned; assign to a new name")
        elif name in BUILTINS:
            self.bad(a.span, f"'{name}' is a built-in function and cannot be assigned")
        else:
            return True
        return False

    def check_watches(self, env: dict[str, str]) -> tuple[str, ...]:
        out = []
        for n in self.d.watches:
            if n.id in self.d.defs:
                name = self.watched_def(n)
                if name is not None:
                    out.append(name)
            elif n.id not in env:
                self.bad(n.span, f"cannot watch unknown name '{n.id}'" + self.suggest(n.id, env))
            elif env[n.id] is None:
                continue  # its assignment is already reported
            elif not narrower(env[n.id], "layer"):
                self.bad(n.span, f"cannot watch '{n.id}': it is {_kind_of(env[n.id])}; "
                                 "watch a layer value such as norm(...)")
            else:
                out.append(n.id)
        return tuple(out)

    def watched_def(self, n: Name) -> str | None:
        """``watch NAME`` of a def: the local its one call in the step was
        hoisted to (named after the def), or None after reporting why not."""
        calls = self.def_calls[n.id]
        if not calls and n.id in self.def_seen:
            return None  # its call is faulty, and that is already reported
        if not calls:
            self.bad(n.span, f"'{n.id}' is never called in the step, so there is no value "
                             "to watch")
            return None
        if len(calls) > 1:
            places = list(dict.fromkeys(_at(c[0], n.span) for c in calls))
            where = ("lines " + ", ".join(p[5:] for p in places)
                     if len(places) > 1 and all(p.startswith("line ") for p in places)
                     else ", ".join(places))
            self.bad(n.span, f"'{n.id}' is called {len(calls)} times in the step (at "
                             f"{where}, after inlining defs); watch a local instead: assign the "
                             f"call you mean to a local (tr = {n.id}(...)) and watch that")
            return None
        span, kind, in_global = calls[0]
        if in_global:
            self.bad(n.span, f"'{n.id}' is called inside a global reduction ("
                             f"{_at(span, n.span)}); watch a local instead")
            return None
        if not narrower(kind, "layer"):
            self.bad(n.span, f"cannot watch def '{n.id}': its value ({_at(span, n.span)}) is "
                             f"{_kind_of(kind)}, not one number per parameter; watch a local "
                             "that reduces it, e.g. with mean()")
            return None
        return n.id

    # ------------------------------------------------------------ expressions
    def expr(self, e: Expr, sc: _Scope) -> Expr | None:
        """Check ``e`` in scope ``sc``: a copy with kinds set and defs inlined, or None."""
        if self.depth >= MAX_EXPRESSION_DEPTH:
            if not self.too_deep:
                self.too_deep = True
                self.bad(e.span, f"expression nested too deeply: more than "
                                 f"{MAX_EXPRESSION_DEPTH} levels (the limit; each operator of "
                                 "a chain like a + b + c and each inlined def call counts); "
                                 "split it into several assignments", sc)
            return None
        self.depth += 1
        try:
            return self._expr(e, sc)
        finally:
            self.depth -= 1

    def _expr(self, e: Expr, sc: _Scope) -> Expr | None:
        if isinstance(e, Num):
            return replace(e, kind="const")
        if isinstance(e, Str):
            self.bad(e.span, "a string may only follow '~' in a for predicate", sc)
            return None
        if isinstance(e, Name):
            return self.name(e, sc)
        if isinstance(e, Unary):
            x = self.expr(e.operand, sc)
            return None if x is None else replace(e, operand=x, kind=x.kind)
        if isinstance(e, Binary):
            if e.op == "~":
                self.bad(e.span, "'~' (name match) is only allowed in for predicates", sc)
                return None
            left, right = self.expr(e.left, sc), self.expr(e.right, sc)
            if left is None or right is None:
                return None
            return replace(e, left=left, right=right, kind=widest(left.kind, right.kind))
        if isinstance(e, Call):
            return self.call(e, sc)
        raise TypeError(f"not an expression node: {e!r}")

    def name(self, e: Name, sc: _Scope) -> Expr | None:
        if e.id in sc.subst:
            arg = sc.subst[e.id]
            # A def argument was checked where the def is called; inside a
            # global reduction it must obey that reduction's rules too.
            return arg if not sc.in_global or self.global_arg_ok(arg, sc) else None
        if e.id in sc.env:
            if sc.env[e.id] is None:
                return None  # a local whose assignment is already reported
            if sc.in_global and e.id in sc.fresh:
                self.bad(e.span, f"'{e.id}' is computed earlier in this step; a global "
                                 "reduction may use only w, g, t, hypers and state values "
                                 "from the previous step", sc)
                return None
            return replace(e, kind=sc.env[e.id])
        if e.id in self.d.defs:
            self.bad(e.span, f"'{e.id}' is a def; call it as {e.id}(...)", sc)
        elif e.id in BUILTINS:
            self.bad(e.span, f"'{e.id}' is a built-in function; call it as {e.id}(...)", sc)
        elif sc.context == "init" and e.id in ("g", "t", *self.d.states):
            self.bad(e.span, f"a state's initial value may use only w, hypers and numbers; "
                             f"'{e.id}' is not available there", sc)
        elif e.id in sc.later:
            self.bad(e.span, f"'{e.id}' is used before it is assigned", sc)
        elif sc.context == "rule" and e.id in ("w", "g", "t", *self.d.states):
            self.bad(e.span, f"a for rule's value is one number per parameter, computed before "
                             f"the step; '{e.id}' is not available there (it may use numbers, "
                             "hypers, ndim, numel, rows and cols)", sc)
        else:
            known = [*sc.env, *sc.subst, *self.d.defs]
            self.bad(e.span, f"unknown name '{e.id}'" + self.suggest(e.id, known), sc)
        return None

    def global_arg_ok(self, arg: Expr, sc: _Scope) -> bool:
        """Whether a checked def argument may be used inside a global reduction."""
        ok = True
        for node in _walk(arg):
            if isinstance(node, Name) and node.id in sc.fresh:
                self.bad(node.span, f"'{node.id}' is computed earlier in this step; a global "
                                    "reduction may use only w, g, t, hypers and state values "
                                    "from the previous step", sc)
                ok = False
            elif isinstance(node, Call) and node.kind == "global":
                self.bad(node.span, "global reductions cannot be nested", sc)
                ok = False
        return ok

    def call(self, e: Call, sc: _Scope) -> Expr | None:
        if e.func in self.d.defs:
            return self.inline(e, sc)
        b = BUILTINS.get(e.func)
        if b is None:
            known = [*BUILTINS, *self.d.defs]
            self.bad(e.span, f"unknown function '{e.func}'" + self.suggest(e.func, known), sc)
            return None
        unit = _unit_arg(e) if b.category == "layer" and len(e.args) == b.arity + 1 else None
        last = e.args[-1] if e.args else None
        if b.category == "layer" and isinstance(last, Name) and len(e.args) == b.arity + 1 \
                and unit is None:
            self.bad(last.span, f"{e.func}() takes {b.arity} argument{'s' * (b.arity != 1)} "
                                f"and an optional unit (row or col); '{last.id}' is not a unit"
                     + self.suggest(last.id, UNITS), sc)
            return None
        if b.category == "layer" and isinstance(last, Name) and last.id in UNITS \
                and len(e.args) == b.arity and b.arity > 1 and last.id not in sc.env:
            self.bad(last.span, f"'{last.id}' is a unit here, so {e.func}() has only "
                                f"{b.arity - 1} operand{'s' * (b.arity != 2)}; it takes "
                                f"{b.arity} and an optional unit", sc)
            return None
        if len(e.args) != b.arity and unit is None:
            more = " and an optional unit (row or col)" if b.category == "layer" else ""
            self.bad(e.span, f"{e.func}() takes {b.arity} argument{'s' * (b.arity != 1)}"
                             f"{more}, got {len(e.args)}", sc)
            return None
        if sc.context == "rule" and b.category != "elementwise":
            self.bad(e.span, f"a for rule's value is one number per parameter; it cannot call "
                             f"{e.func}() (it may use numbers, hypers, ndim, numel, rows, cols "
                             "and elementwise functions)", sc)
            return None
        if b.category == "global":
            return self.global_call(e, sc)
        operands = e.args[:-1] if unit is not None else e.args
        args = [self.expr(a, sc) for a in operands]
        if any(a is None for a in args):
            return None
        kind = widest(*(a.kind for a in args))
        if b.category == "elementwise":
            return replace(e, args=tuple(args), kind=kind)
        if unit is None:
            if kind not in ("row", "col", "elem"):
                self.bad(e.span, f"{e.func}() reduces over the elements of one parameter; its "
                                 f"argument is {kind}-kind, not elem, row or col", sc)
                return None
            return replace(e, args=tuple(args), kind="layer")
        if kind != "elem":
            hint = (f"; reduce it without a unit, {e.func}(...), for one number per parameter"
                    if kind in UNITS else "")
            self.bad(e.span, f"{e.func}(..., {unit.id}) reduces each {_UNIT_WORDS[unit.id]} of "
                             f"an elem value; its argument is {_kind_of(kind)}{hint}", sc)
            return None
        kind = "layer" if e.func == "numel" else unit.id
        return replace(e, args=(*args, replace(unit, kind="unit")), kind=kind)

    def global_call(self, e: Call, sc: _Scope) -> Expr | None:
        if sc.context != "step":
            self.bad(e.span, f"{e.func}() is only allowed in the step block", sc)
            return None
        if sc.in_global:
            self.bad(e.span, "global reductions cannot be nested", sc)
            return None
        inner = replace(sc, in_global=True)
        arg = self.expr(e.args[0], inner)
        if arg is None:
            return None
        if arg.kind not in ("layer", "row", "col", "elem"):
            self.bad(e.span, f"{e.func}() reduces over all parameters; its argument must be "
                             f"layer-, row-, col- or elem-kind, not {arg.kind}", sc)
            return None
        return replace(e, args=(arg,), kind="global")

    def inline(self, e: Call, sc: _Scope) -> Expr | None:
        d = self.d.defs[e.func]
        if sc.context == "step" and e.func in self.watched_defs:
            self.def_seen.add(e.func)
        if e.func in sc.stack:
            return None  # reported once by check_recursion
        if len(e.args) != len(d.params):
            self.bad(e.span, f"def '{e.func}' takes {len(d.params)} argument"
                             f"{'s' * (len(d.params) != 1)}, got {len(e.args)}", sc)
            return None
        args = [self.expr(a, sc) for a in e.args]
        if any(a is None for a in args):
            return None
        self.inlined.add(e.func)
        subst = {**sc.subst, **dict(zip(d.params, args))}
        key = None
        if not self.watched_defs:
            # the body's value depends only on the arguments (and any outer
            # def's arguments) and on the call site's scope
            key = (e.func, sc.context, sc.in_global, id(sc.env), id(sc.fresh),
                   tuple((k, id(v)) for k, v in subst.items()))
            hit = self.shared.get(key)
            if hit is not None:
                return hit[0]
        inner = replace(sc, subst=subst, stack=(*sc.stack, e.func),
                        call_line=e.span.line if not sc.stack else sc.call_line,
                        call_file=e.span.filename if not sc.stack else sc.call_file)
        value = self.expr(d.body, inner)
        if value is not None and self.size(value) > MAX_DEF_EXPANSION:
            self.bad(e.span, f"this call of def '{e.func}' expands to more than "
                             f"{MAX_DEF_EXPANSION:,} nodes once defs are inlined (the limit); "
                             "compute a repeated part once in a local instead", sc)
            value = None
        elif value is not None and self.depth_of(value) > MAX_EXPRESSION_DEPTH:
            self.bad(e.span, f"this call of def '{e.func}' nests more than "
                             f"{MAX_EXPRESSION_DEPTH} levels deep once defs are inlined (the "
                             "limit); compute a part of it in a local instead", sc)
            value = None
        if key is not None:
            self.shared[key] = (value, (sc.env, sc.fresh, tuple(subst.values())))
        if value is None or e.func not in self.watched_defs or sc.context != "step":
            return value
        # a watched def: its value becomes a local named after it, computed
        # just before the statement (the same value: expressions are pure)
        self.def_calls[e.func].append((e.span, value.kind, sc.in_global))
        if sc.in_global:
            return value
        self.hoisted.append(Assign(e.func, value, e.span))
        sc.fresh.add(e.func)       # a global reduction cannot read it (as any local)
        return Name(e.func, value.kind, e.span)


    def size(self, e: Expr) -> int:
        """The number of nodes of ``e`` as a tree (shared subtrees counted at
        each use), in time linear in its distinct nodes."""
        stack = [e]
        while stack:
            node = stack[-1]
            if id(node) in self.sizes:
                stack.pop()
                continue
            todo = [c for c in children(node) if id(c) not in self.sizes]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            below = [self.sizes[id(c)] for c in children(node)]
            self.sizes[id(node)] = (node, 1 + sum(b[1] for b in below),
                                    1 + max((b[2] for b in below), default=0))
        return self.sizes[id(e)][1]

    def depth_of(self, e: Expr) -> int:
        """How deeply ``e`` nests (after :meth:`size` of it)."""
        return self.sizes[id(e)][2]


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a ``name ~`` pattern, or None: it does not
    compile, or it could take exponential or high-polynomial time on some
    names (see the module docstring)."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        return f"invalid regular expression: {err}"
    except (OverflowError, RecursionError, ValueError, MemoryError) as err:
        return f"invalid regular expression: {err or type(err).__name__}"
    try:
        from re import _parser as sre_parse, _constants as sre_c
        tree = sre_parse.parse(pattern, compiled.flags)
    except Exception:           # another Python's internals: compiling was enough
        return None
    repeats = (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, getattr(sre_c, "POSSESSIVE_REPEAT", None))
    count = 0

    def walk(items, inside: bool) -> str | None:
        nonlocal count
        for op, av in items:
            if op in (sre_c.GROUPREF, sre_c.GROUPREF_EXISTS):
                return ("a name pattern may not use a backreference (matching one can take "
                        "exponential time)")
            if op in repeats:
                lo, hi, sub = av
                if inside:
                    return _NESTED
                many = hi > 1
                count += many
                if count > MAX_REGEX_REPEATS:
                    return (f"a name pattern may hold at most {MAX_REGEX_REPEATS} repetitions "
                            "(*, +, {m,n}): with more, matching some names takes very long")
                why = walk(sub, many)
            elif op is sre_c.BRANCH:
                if inside:
                    return _NESTED
                why = None
                for alt in av[1]:
                    why = why or walk(alt, inside)
            elif op is sre_c.SUBPATTERN:
                why = walk(av[-1], inside)
            elif op in (sre_c.ASSERT, sre_c.ASSERT_NOT):
                why = walk(av[1], inside)
            elif op is getattr(sre_c, "ATOMIC_GROUP", None):
                why = walk(av, inside)
            else:
                why = None
            if why:
                return why
        return None

    return walk(tree, False)


_NESTED = ("a name pattern may not repeat something that holds a repetition or '|' "
           "(as in (a+)+ or (a|b)*): matching it can take exponential time on some names")


_UNIT_WORDS = {"row": "row", "col": "column"}
_PARAM_WORDS = {"rows": "number of rows", "cols": "number of columns",
                "ndim": "number of dimensions"}


def _at(span: Span, here: Span) -> str:
    """``line 5``, or ``lamb.lw:5`` for a span in another file than ``here``."""
    if span.filename == here.filename:
        return f"line {span.line}"
    return f"{PurePath(span.filename).name}:{span.line}"


def _unit_arg(e: Call) -> Name | None:
    """The unit (``row`` / ``col``) ending a reduction's arguments, or None."""
    last = e.args[-1] if e.args else None
    return last if isinstance(last, Name) and last.id in UNITS else None


def _outer(value: Expr) -> str:
    """Why a value with no per-element operand is ``elem``: it mixes a row and
    a col value (section 10: their outer product)."""
    def operands(e):           # leaves and reductions: what the value is built from
        if not children(e) or (isinstance(e, Call) and e.func in BUILTINS
                                and BUILTINS[e.func].category != "elementwise"):
            yield getattr(e, "kind", None)
        else:
            for c in children(e):
                yield from operands(c)

    kinds = set(operands(value))
    if value.kind == "elem" and "elem" not in kinds and {"row", "col"} <= kinds:
        return (": it combines a row value with a col value, which gives their outer "
                "product (one per element)")
    return ""


def _reduce_hint(target: str, kind: str) -> str:
    if target == "layer":
        return ": reduce it first, e.g. with mean() or norm()"
    if target in UNITS and kind == "elem":
        return f": reduce it first, e.g. with mean(..., {target})"
    return ""


def _is_name_and_string(e: Binary) -> bool:
    sides = {type(e.left), type(e.right)}
    names = [x for x in (e.left, e.right) if isinstance(x, Name)]
    return sides == {Name, Str} and names[0].id == "name"


def _calls(e: Expr) -> set[str]:
    out = {e.func} if isinstance(e, Call) else set()
    for c in children(e):
        out |= _calls(c)
    return out


def _cycle(start: str, calls: dict[str, set[str]]) -> list[str]:
    """A call path from ``start`` back to itself, or []."""
    stack = [(start, [start])]
    seen = set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(calls.get(node, ())):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return []


def _constant(e: Expr) -> float | None:
    """The value of a checked expression made of numbers only, or None."""
    if any(isinstance(n, Name) for n in _walk(e)):
        return None
    from .rules import evaluate
    return evaluate(e, {})

