"""Property tests of the front end over generated VALID programs (hypothesis).

The generator builds syntax trees directly (the nodes of ``layerwise.syntax``),
valid by construction: hypers with ranges and in-range defaults, elem and
layer states, defs (elementwise ones and layer-reducing ones, calling earlier
defs), ``for`` rules with in-range values, watches of non-elem names, and a
step with locals, state updates, layer reductions, global reductions of only
the names they may use, and elementwise built-ins. Every expression is built
to have a known kind, so the checker's kinds can be compared with it.

Properties:
  (a) every generated program checks, and each local gets the kind it was built with;
  (b) parse(format_program(tree)) == tree;
  (c) for the checked program P, parse(P.to_text()).program == P.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layerwise as lw
from layerwise.syntax import (Assign, Binary, Call, DefDecl, HyperDecl, Name, Num, OptimizerDecl,
                              Program, Range, RuleDecl, StateDecl, StepDecl, Str, Unary, WatchDecl,
                              format_program, parse_text)

KINDS = ("const", "global", "layer", "elem")
SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ELEMENTWISE_1 = ("sqrt", "rsqrt", "exp", "log", "abs", "sign", "sin", "cos", "tanh")
REDUCE_1 = ("norm", "sum", "mean", "rms", "max_abs", "numel")
ARITH = ("+", "-", "*", "/", "^")
COMPARE = ("<", "<=", ">", ">=", "==", "!=")
LOGIC = ("and", "or")
REGEXES = ("bias", "LayerNorm|layer_norm", r"^layer\.\d+\.", 'we"ird', "ß|β", "(?i)EMBED")

# Name suffixes use letters that no reserved word, built-in or predefined name
# can be made of once a one-letter prefix is put in front (h, m, q, f, x, u, o).
SUFFIX = st.text(alphabet="abzβηφ_0189", min_size=1, max_size=4)
NUMBERS = st.one_of(
    st.sampled_from([0.0, 1.0, 2.0, 0.5, 0.9, 0.999, 1e-6, 1e-3, 10.0, 3.25, math.inf]),
    st.floats(min_value=0.0, allow_nan=False, allow_infinity=True),
)


def widest(*kinds):
    return max(kinds, key=KINDS.index, default="const")


def narrower(kind):
    return KINDS[:KINDS.index(kind) + 1]


def num(x: float):
    """A number as the parser builds it: a literal, negated if below zero."""
    return Unary("-", Num(-x)) if x < 0 or (x == 0 and math.copysign(1, x) < 0) else Num(x)


@dataclass
class Ctx:
    """What an expression may use where it is generated."""
    names: dict[str, list[str]]                 # kind -> names
    clean: dict[str, list[str]]                 # kind -> names allowed in a global reduction
    allow_global: bool
    edefs: list[tuple[str, int]] = field(default_factory=list)   # elementwise defs, arity
    rdefs: list[str] = field(default_factory=list)               # layer-reducing defs

    def scope(self, in_global: bool) -> dict[str, list[str]]:
        return self.clean if in_global else self.names

    def can(self, kind: str, in_global: bool) -> bool:
        names = self.scope(in_global)
        if kind == "const":
            return True
        if kind == "elem":
            return bool(names["elem"])
        if kind == "layer":
            return bool(names["layer"]) or bool(names["elem"])
        return bool(names["global"]) or (self.allow_global and not in_global
                                          and bool(self.clean["elem"]))

    def kinds(self, upto: str, in_global: bool) -> list[str]:
        return [k for k in narrower(upto) if self.can(k, in_global)]


def gen(draw, ctx: Ctx, kind: str, depth: int, in_global: bool = False):
    """An expression of exactly ``kind``."""
    assert ctx.can(kind, in_global), kind
    names = ctx.scope(in_global)
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        return leaf(draw, ctx, kind, in_global)
    choice = draw(st.integers(0, 7))
    sub = depth - 1
    if choice == 0:
        return Unary(draw(st.sampled_from(["-", "+", "not"])), gen(draw, ctx, kind, sub, in_global))
    if choice in (1, 2, 3):
        op = draw(st.sampled_from(ARITH + COMPARE + LOGIC))
        a = gen(draw, ctx, kind, sub, in_global)
        b = gen(draw, ctx, draw(st.sampled_from(ctx.kinds(kind, in_global))), sub, in_global)
        return Binary(op, *((a, b) if draw(st.booleans()) else (b, a)))
    if choice == 4:
        func = draw(st.sampled_from(ELEMENTWISE_1 + ("min", "max", "clip", "where")))
        arity = 1 if func in ELEMENTWISE_1 else 2 if func in ("min", "max") else 3
        args = [gen(draw, ctx, draw(st.sampled_from(ctx.kinds(kind, in_global))), sub, in_global)
                for _ in range(arity - 1)]
        args.insert(draw(st.integers(0, arity - 1)), gen(draw, ctx, kind, sub, in_global))
        return Call(func, tuple(args))
    if choice == 5 and ctx.edefs:
        name, arity = draw(st.sampled_from(ctx.edefs))
        if arity == 0:
            return leaf(draw, ctx, kind, in_global) if kind != "const" else Call(name, ())
        args = [gen(draw, ctx, draw(st.sampled_from(ctx.kinds(kind, in_global))), sub, in_global)
                for _ in range(arity - 1)]
        args.insert(draw(st.integers(0, arity - 1)), gen(draw, ctx, kind, sub, in_global))
        return Call(name, tuple(args))
    if choice == 6 and kind == "layer" and names["elem"]:
        if ctx.rdefs and draw(st.booleans()):
            return Call(draw(st.sampled_from(ctx.rdefs)), (gen(draw, ctx, "elem", sub, in_global),))
        if draw(st.booleans()):
            other = gen(draw, ctx, draw(st.sampled_from(ctx.kinds("elem", in_global))), sub,
                        in_global)
            return Call("dot", (gen(draw, ctx, "elem", sub, in_global), other))
        return Call(draw(st.sampled_from(REDUCE_1)), (gen(draw, ctx, "elem", sub, in_global),))
    if choice == 7 and kind == "global" and ctx.allow_global and not in_global \
            and ctx.clean["elem"]:
        return global_call(draw, ctx, sub)
    return leaf(draw, ctx, kind, in_global)


def global_call(draw, ctx: Ctx, depth: int):
    arg_kind = draw(st.sampled_from(["layer", "elem"]))
    arg = gen(draw, ctx, arg_kind, depth, in_global=True)
    return Call(draw(st.sampled_from(["global_norm", "global_sum"])), (arg,))


def leaf(draw, ctx: Ctx, kind: str, in_global: bool):
    names = ctx.scope(in_global)
    if kind == "const":
        if names["const"] and draw(st.booleans()):
            return Name(draw(st.sampled_from(names["const"])))
        return Num(draw(NUMBERS))
    if kind == "global" and not names["global"]:
        return global_call(draw, ctx, 1)
    if kind == "layer" and not names["layer"]:
        return Call(draw(st.sampled_from(REDUCE_1)), (leaf(draw, ctx, "elem", in_global),))
    return Name(draw(st.sampled_from(names[kind])))


def def_body(draw, params, consts, edefs):
    """An elementwise body that uses every parameter (so its kind is their widest)."""
    parts = [Name(p) for p in params]
    for _ in range(draw(st.integers(0 if parts else 1, 2))):
        parts.append(Name(draw(st.sampled_from(consts))) if consts and draw(st.booleans())
                     else Num(draw(NUMBERS)))
    parts = draw(st.permutations(parts))
    while len(parts) > 1:
        a, b, *rest = parts
        if draw(st.integers(0, 3)) == 0:
            node = Call(draw(st.sampled_from(["min", "max"])), (a, b))
        else:
            node = Binary(draw(st.sampled_from(ARITH + COMPARE + LOGIC)), a, b)
        parts = [node, *rest]
    body = parts[0]
    wrap = draw(st.integers(0, 3))
    usable = [(n, k) for n, k in edefs if k >= 1]
    if wrap == 1:
        body = Call(draw(st.sampled_from(ELEMENTWISE_1)), (body,))
    elif wrap == 2 and usable:
        name, arity = draw(st.sampled_from(usable))
        body = Call(name, (body,) + tuple(Num(draw(NUMBERS)) for _ in range(arity - 1)))
    elif wrap == 3:
        body = Unary("-", body)
    return body


@st.composite
def hyper_decls(draw, names):
    out = []
    for name in names:
        default = draw(st.one_of(st.sampled_from([0.0, 1e-3, 0.9, 0.5, -1.0, 10.0]),
                                 st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)))
        rng = None
        if draw(st.booleans()):
            lo_kind = draw(st.sampled_from(["closed_at", "below", "-inf"]))
            hi_kind = draw(st.sampled_from(["closed_at", "above", "inf"]))
            lo = {"closed_at": default, "-inf": -math.inf}.get(lo_kind)
            if lo is None:
                lo = default - draw(st.sampled_from([0.5, 1.0, 10.0]))
            hi = {"closed_at": default, "inf": math.inf}.get(hi_kind)
            if hi is None:
                hi = default + draw(st.sampled_from([0.5, 1.0, 10.0]))
            lo_closed = lo_kind == "closed_at" or (lo_kind != "-inf" and draw(st.booleans()))
            hi_closed = hi_kind == "closed_at" or (hi_kind != "inf" and draw(st.booleans()))
            rng = Range(lo, hi, lo_closed, hi_closed)
            assert rng.contains(default)
        out.append(HyperDecl(name, default, rng))
    return out


def in_range_value(draw, h: HyperDecl) -> float:
    if h.range is None:
        return draw(st.sampled_from([0.0, 1.0, -2.5, math.inf, h.default]))
    r = h.range
    cands = [h.default, (r.lo + h.default) / 2, (r.hi + h.default) / 2,
             r.lo if r.lo_closed else h.default, r.hi if r.hi_closed else h.default]
    return draw(st.sampled_from([c for c in cands if not math.isnan(c) and r.contains(c)]))


def predicate(draw, depth: int):
    if depth <= 0 or draw(st.integers(0, 2)) == 0:
        if draw(st.booleans()):
            return Binary("~", Name("name"), Str(draw(st.sampled_from(REGEXES))))
        return Binary(draw(st.sampled_from(COMPARE)), Name(draw(st.sampled_from(["ndim", "numel"]))),
                      Num(draw(st.sampled_from([0.0, 1.0, 2.0, 1e3]))))
    if draw(st.integers(0, 2)) == 0:
        return Unary("not", predicate(draw, depth - 1))
    return Binary(draw(st.sampled_from(LOGIC)), predicate(draw, depth - 1),
                  predicate(draw, depth - 1))


@dataclass
class Generated:
    tree: Program
    local_kinds: dict[str, str]     # kind each step local was built with


@st.composite
def programs(draw) -> Generated:
    n_h, n_s, n_q, n_e, n_r, n_u = (draw(st.integers(0, 3)), draw(st.integers(0, 2)),
                                    draw(st.integers(0, 2)), draw(st.integers(0, 3)),
                                    draw(st.integers(0, 1)), draw(st.integers(0, 4)))
    suffixes = draw(st.lists(SUFFIX, min_size=6, max_size=6, unique=True))
    suffix_of = iter(suffixes)

    def names(prefix, n):
        s = next(suffix_of)
        return [f"{prefix}{s}{i}" for i in range(n)]

    hypers = draw(hyper_decls(names("h", n_h)))
    hnames = [h.name for h in hypers]
    elem_states, layer_states = names("m", n_s), names("q", n_q)
    locals_ = names("u", n_u)

    # defs: elementwise ones (every parameter used) and layer-reducing ones
    edefs: list[tuple[str, int]] = []
    decls: list = []
    for i, name in enumerate(names("f", n_e)):
        params = tuple(f"x{j}" for j in range(draw(st.integers(0, 3))))
        decls.append(DefDecl(name, params, def_body(draw, params, hnames, edefs)))
        edefs.append((name, len(params)))
    rdefs = []
    for name in names("o", n_r):
        body = Call(draw(st.sampled_from(REDUCE_1)), (def_body(draw, ("x",), hnames, edefs),))
        if hnames and draw(st.booleans()):
            body = Binary("*", body, Name(draw(st.sampled_from(hnames))))
        decls.append(DefDecl(name, ("x",), body))
        rdefs.append(name)

    # states, initialised from w, hypers and numbers
    init_ctx = Ctx({"const": hnames, "global": [], "layer": [], "elem": ["w"]},
                   {"const": hnames, "global": [], "layer": [], "elem": ["w"]},
                   allow_global=False, edefs=edefs, rdefs=rdefs)
    for s in elem_states:
        decls.append(StateDecl(s, False, gen(draw, init_ctx,
                                             draw(st.sampled_from(["const", "layer", "elem"])), 2)))
    for s in layer_states:
        decls.append(StateDecl(s, True, gen(draw, init_ctx,
                                            draw(st.sampled_from(["const", "layer"])), 2)))

    # rules
    for _ in range(draw(st.integers(0, 2)) if hypers else 0):
        targets = draw(st.lists(st.sampled_from(hypers), min_size=1, max_size=2,
                                unique_by=lambda h: h.name))
        decls.append(RuleDecl(predicate(draw, 2),
                              tuple(Assign(h.name, num(in_range_value(draw, h))) for h in targets)))

    # the step
    names_now = {"const": [*hnames, "t"], "global": [], "layer": list(layer_states),
                 "elem": ["w", "g", *elem_states]}
    clean = {"const": [*hnames, "t"], "global": [], "layer": list(layer_states),
             "elem": ["w", "g", *elem_states]}
    ctx = Ctx(names_now, clean, allow_global=True, edefs=edefs, rdefs=rdefs)
    plan = [("local", u) for u in locals_]
    plan += [("state", s) for s in draw(st.lists(st.sampled_from(elem_states + layer_states),
                                                 unique=True)) ] if elem_states + layer_states else []
    plan.append(("w", "w"))
    if draw(st.booleans()):
        plan.append(("g", "g"))
    plan = draw(st.permutations(plan))
    body, local_kinds = [], {}
    depth = draw(st.integers(1, 3))
    for what, target in plan:
        if what == "local":
            kind = draw(st.sampled_from(ctx.kinds("elem", False)))
            body.append(Assign(target, gen(draw, ctx, kind, depth)))
            names_now[kind].append(target)
            local_kinds[target] = kind
            continue
        if what == "state" and target in layer_states:
            value = gen(draw, ctx, draw(st.sampled_from(ctx.kinds("layer", False))), depth)
            clean["layer"].remove(target)
        elif what == "g":
            value = gen(draw, ctx, "elem", depth)
            clean["elem"].remove("g")
        else:  # an elem state or w
            value = gen(draw, ctx, draw(st.sampled_from(ctx.kinds("elem", False))), depth)
            clean["elem"].remove(target)
        body.append(Assign(target, value))
    decls.append(StepDecl(tuple(body)))

    watchable = [u for u, k in local_kinds.items() if k != "elem"] + list(layer_states)
    watched = draw(st.lists(st.sampled_from(watchable), unique=True)) if watchable else []
    if watched:
        cut = draw(st.integers(1, len(watched)))
        decls.append(WatchDecl(tuple(Name(n) for n in watched[:cut])))
        if watched[cut:]:
            decls.append(WatchDecl(tuple(Name(n) for n in watched[cut:])))

    decls.extend(hypers)
    decls = draw(st.permutations(decls))
    head = OptimizerDecl("opt" + draw(SUFFIX))
    return Generated(Program((head, *decls)), local_kinds)


# ---------------------------------------------------------------- properties
@SETTINGS
@given(programs())
def test_generated_programs_check(gen_prog):
    text = format_program(gen_prog.tree)
    spec = lw.parse(text, "generated.lw")
    kinds = {a.target: a.value.kind for a in spec.program.step}
    for name, kind in gen_prog.local_kinds.items():
        assert kinds[name] == kind, (name, text)
    assert spec.program.step[-1].target in {a.target for a in spec.program.step}
    assert "w" in kinds


@SETTINGS
@given(programs())
def test_printing_and_parsing_a_syntax_tree_round_trips(gen_prog):
    text = format_program(gen_prog.tree)
    again = parse_text(text, "printed.lw")
    assert again == gen_prog.tree, text
    assert format_program(again) == text


@SETTINGS
@given(programs())
def test_checked_program_text_round_trips(gen_prog):
    program = lw.parse(format_program(gen_prog.tree), "generated.lw").program
    text = program.to_text()
    again = lw.parse(text, "flat.lw").program
    assert again == program, text
    assert again.to_text() == text
