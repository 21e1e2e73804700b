"""``adapt NAME``: an optimizer program composed with an adaptation (LANGUAGE.md section 12).

The composite's step is the base optimizer's step with every assignment to
``w`` made to a local ``w_base`` instead, then ``u``, then the adaptation's
step (its names renamed where they would clash with the base's locals).

``u = (w - w_base) / lr`` is computed symbolically where the base's new
``w`` has the form ``w - lr * E`` with ``E`` free of ``lr`` (adam, adamw,
sgd, lion): :func:`linear_in_lr` writes each value the base step computes as
``c0 + lr * c1`` (``c0``, ``c1`` free of ``lr``) and ``u`` is then
``-c1`` of the new ``w``, exactly ``E``, never the difference of two nearly
equal weights. Otherwise (lars: its momentum buffer carries the earlier
learning rates) ``u`` is the difference, 0 where ``lr`` is 0, and the
composite carries a note that ``layerwise check`` prints. Where ``lr`` is 0
the step leaves ``w`` unchanged.

The adaptation's hypers, states and watches are added to the base's; a hyper
or state declared by both is an error at the ``adapt`` declaration. A local
of the adaptation that the base watches (``tr`` of ``trust`` on ``lars``) is
renamed ``adapt_NAME``, its watch too, so both series are recorded.
"""
from __future__ import annotations

from dataclasses import replace

from .builtins import widest
from .check import CheckedProgram, check_declarations
from .errors import Problem, Span, SpecError
from .extends import collect, program_file, read_source
from .syntax import AdaptDecl, Assign, Binary, Call, Expr, Name, Num, Unary, children, parse_text

__all__ = ["adapted", "compose", "linear_in_lr", "load_adaptation"]

_ONE, _ZERO = Num(1.0, "const"), Num(0.0, "const")


def _bin(op: str, a: Expr, b: Expr) -> Expr:
    return Binary(op, a, b, widest(a.kind, b.kind))


def _add(a, b):
    return b if a is None else a if b is None else _bin("+", a, b)


def _sub(a, b):
    if b is None:
        return a
    if a is None:
        return b.operand if isinstance(b, Unary) and b.op == "-" else Unary("-", b, b.kind)
    return _bin("-", a, b)


def _mul(a, b):
    if a is None or b is None:
        return None
    if a == _ONE:
        return b
    return a if b == _ONE else _bin("*", a, b)


def _div(a, b):
    return None if a is None else _bin("/", a, b)


def _zero_if_none(e):
    return _ZERO if e is None else e


def _mentions(e: Expr, names) -> bool:
    if isinstance(e, Name):
        return e.id in names
    return any(_mentions(c, names) for c in children(e))


def linear_in_lr(e: Expr, env: dict) -> tuple[Expr | None, Expr | None] | None:
    """``e`` as ``(c0, c1)`` with ``e = c0 + lr * c1`` and neither mentioning
    ``lr`` (None stands for zero), or None if ``e`` is not linear in ``lr``.

    ``env`` maps the names assigned earlier in the step to their own
    decomposition; other names are free of ``lr``.
    """
    if isinstance(e, Num):
        return e, None
    if isinstance(e, Name):
        if e.id == "lr":
            return None, _ONE
        return env.get(e.id, (e, None))
    if isinstance(e, Unary) and e.op in "+-":
        x = linear_in_lr(e.operand, env)
        if x is None:
            return None
        return x if e.op == "+" else (_sub(None, x[0]), _sub(None, x[1]))
    if isinstance(e, Binary) and e.op in "+-*/":
        a, b = linear_in_lr(e.left, env), linear_in_lr(e.right, env)
        if a is None or b is None:
            return None
        if e.op == "+":
            return _add(a[0], b[0]), _add(a[1], b[1])
        if e.op == "-":
            return _sub(a[0], b[0]), _sub(a[1], b[1])
        if e.op == "*":
            if a[1] is None:
                return _mul(a[0], b[0]), _mul(a[0], b[1])
            if b[1] is None:
                return _mul(a[0], b[0]), _mul(a[1], b[0])
            return None
        if b[1] is not None or b[0] is None:
            return None
        return _div(a[0], b[0]), _div(a[1], b[0])
    if isinstance(e, Call) and e.func == "where":
        c, a, b = (linear_in_lr(x, env) for x in e.args)
        if c is None or a is None or b is None or c[1] is not None or c[0] is None:
            return None
        kind = e.kind

        def pick(x, y):
            if x is None and y is None:
                return None
            return Call("where", (c[0], _zero_if_none(x), _zero_if_none(y)), kind)
        return pick(a[0], b[0]), pick(a[1], b[1])
    # anything else is linear only if free of lr: rebuild it from the parts
    parts = [linear_in_lr(x, env) for x in children(e)]
    if any(p is None or p[1] is not None for p in parts):
        return None
    values = [_zero_if_none(p[0]) for p in parts]
    if isinstance(e, Unary):
        return replace(e, operand=values[0]), None
    if isinstance(e, Binary):
        return replace(e, left=values[0], right=values[1]), None
    return replace(e, args=tuple(values)), None


def _rename(e: Expr, names: dict[str, str]) -> Expr:
    if isinstance(e, Name):
        return replace(e, id=names[e.id]) if e.id in names else e
    if isinstance(e, Unary):
        return replace(e, operand=_rename(e.operand, names))
    if isinstance(e, Binary):
        return replace(e, left=_rename(e.left, names), right=_rename(e.right, names))
    if isinstance(e, Call):
        return replace(e, args=tuple(_rename(a, names) for a in e.args))
    return e


def _fresh(name: str, taken: set[str]) -> str:
    out, k = name, 1
    while out in taken:
        k += 1
        out = f"{name}_{k}"
    taken.add(out)
    return out


def load_adaptation(decl: AdaptDecl, filename: str) -> CheckedProgram:
    """The checked adaptation program ``decl`` names (a preset or a path
    relative to ``filename``).

    Raises:
        SpecError: it cannot be found, does not check, or is not an adaptation.
    """
    problems: list[Problem] = []
    path = program_file(decl.parent, decl.parent_span, filename, problems, "adaptation")
    if path is None:
        raise SpecError(problems)
    program = parse_text(read_source(path, decl.parent_span, "adaptation"), str(path))
    decls = collect(program, problems)
    if decls.complete and not decls.adaptation:
        raise SpecError([Problem(decl.parent_span, f"'{decl.parent}' is an optimizer, not an "
                                                   "adaptation; 'adapt' takes a program that "
                                                   "starts with 'adaptation NAME'")])
    return check_declarations(decls, str(path), problems)


def adapted(base: CheckedProgram, decl: AdaptDecl, filename: str,
            main: str) -> CheckedProgram:
    """The composite of the checked optimizer ``base`` and the adaptation that
    ``decl`` (read in ``filename``) names.

    Raises:
        SpecError: the adaptation does not load or check, or it declares a
            hyper or state the base also has, or the base has no ``lr``.
    """
    return compose(base, load_adaptation(decl, filename), decl.span, main)


def compose(base: CheckedProgram, ad: CheckedProgram, span: Span,
            main: str = "<string>") -> CheckedProgram:
    """The composite of the checked optimizer ``base`` and the checked
    adaptation ``ad``; problems are reported at ``span``.

    Raises:
        SpecError: as :func:`adapted`.
    """
    problems = []
    base_hypers = {h.name for h in base.hypers}
    if "lr" not in base_hypers:
        problems.append(Problem(span, f"'{base.name}' has no hyper 'lr': an adaptation "
                                           "reads the base's update per unit of lr"))
    for what, mine, theirs in (
            ("hyper", base_hypers, [h.name for h in ad.hypers if h.name != "lr"]),
            ("state", {s.name for s in base.states}, [s.name for s in ad.states])):
        for n in theirs:
            if n in mine:
                problems.append(Problem(span, f"{what} '{n}' of adaptation '{ad.name}' "
                                                   f"is also a {what} of '{base.name}'"))
    if problems:
        raise SpecError(problems, main=main)

    # the adaptation's locals that the base watches (lars and trust both watch
    # 'tr') renamed 'adapt_NAME', watches included, so both series are kept
    base_states = {s.name for s in base.states}
    taken = {"w", "g", "t", "lr", "u", *base_hypers, *base_states,
             *(a.target for a in base.step), *(a.target for a in ad.step),
             *(h.name for h in ad.hypers), *(s.name for s in ad.states)}
    ad_states = {s.name for s in ad.states}
    clash = [n for n in base.watches if n in ad_states]
    if clash:
        raise SpecError([Problem(span, f"'{clash[0]}' is watched by '{base.name}' and is a "
                                            f"state of adaptation '{ad.name}'")], main=main)
    ad_renamed = {n: _fresh(f"adapt_{n}", taken)
                  for n in dict.fromkeys(a.target for a in ad.step) if n in base.watches}
    ad_step = [replace(a, target=ad_renamed.get(a.target, a.target),
                       value=_rename(a.value, ad_renamed)) for a in ad.step]
    ad_watches = tuple(ad_renamed.get(n, n) for n in ad.watches)

    # the base step: its w (and a rebound g) assigned to locals of their own,
    # its locals that the adaptation also uses renamed
    ad_names = {"u", *(a.target for a in ad_step)}
    names: dict[str, str] = {}
    step: list[Assign] = []
    env: dict = {}
    linear = True
    for a in base.step:
        value = _rename(a.value, names)
        target = a.target
        if target in ("w", "g") or (target in ad_names and target not in base_states):
            names[target] = target = names.get(target) or _fresh(
                "w_base" if target == "w" else f"{target}_base", taken)
        step.append(replace(a, target=target, value=value))
        if linear:
            parts = linear_in_lr(value, env)
            if parts is None:
                linear = False
            else:
                env[target] = (Name(target, value.kind), None) if parts[1] is None else parts
    notes: tuple[Problem, ...] = ()
    lr, w = Name("lr", "const"), Name("w", "elem")
    w_base = names.get("w")
    if w_base is None:
        u_value = _ZERO          # the base never moves w
    else:
        c0, c1 = env.get(w_base, (None, None)) if linear else (None, None)
        if linear and c0 is not None and _same(c0, w):
            u_value = _sub(None, c1) if c1 is not None else _ZERO
        else:
            notes = (Problem(span, f"'{base.name}' does not update w as w - lr * E with "
                                        "E free of lr, so the adaptation's u is computed as "
                                        "(w - w_base) / lr, the difference of two weights"),)
            diff = _bin("/", _bin("-", w, Name(w_base, "elem")), lr)
            u_value = Call("where", (_bin("==", lr, _ZERO), _ZERO, diff), "elem")
    step.append(Assign("u", u_value))

    # the adaptation's step, as written (where lr is 0 it leaves w unchanged)
    w_targets = [i for i, a in enumerate(ad_step) if a.target == "w"]
    for i, a in enumerate(ad_step):
        value = a.value
        if w_targets == [i]:
            value = Call("where", (_bin("==", lr, _ZERO), w, value), "elem")
        step.append(replace(a, value=value))
    return replace(base, hypers=(*base.hypers, *(h for h in ad.hypers if h.name != "lr")),
                   states=(*base.states, *ad.states), rules=(*base.rules, *ad.rules),
                   watches=(*base.watches, *ad_watches), step=tuple(step),
                   notes=(*base.notes, *notes))


def _same(a: Expr, b: Expr) -> bool:
    """Structural equality, kinds and spans aside."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Name):
        return a.id == b.id
    if isinstance(a, Num):
        return a.value == b.value
    if isinstance(a, Unary):
        return a.op == b.op and _same(a.operand, b.operand)
    if isinstance(a, Binary):
        return a.op == b.op and _same(a.left, b.left) and _same(a.right, b.right)
    if isinstance(a, Call):
        return a.func == b.func and len(a.args) == len(b.args) and \
            all(_same(x, y) for x, y in zip(a.args, b.args))
    return False
