"""Checked program -> ``torch.fx`` graphs: the intermediate representation.

A checked program (``layerwise.check``) becomes a few graphs, all with
named placeholders. The per-parameter graphs run once per parameter per
step; the consts graphs once per step for each distinct (hyper values, t):

``init``   ``(w, numel, *hypers) -> (*state initial values)``; run once per
           parameter, at its first step.
``reduce_consts`` ``(t, *hypers) -> (*consts)`` and
``reduce`` ``(w, g, t, numel, *hypers, *states, *consts) -> (*partials)``:
           only for programs with global reductions (LANGUAGE.md section 5).
           Each partial is one parameter's share of a ``global_norm`` (sum of
           squares) or ``global_sum`` (sum); the runtime adds the shares of
           all parameters (phase 1) and :func:`finish_globals` turns the
           totals into the global values.
``update_consts`` ``(t, *hypers, *globals) -> (*consts)`` and
``update`` ``(w, g, t, numel, *hypers, *states, *consts) ->
           (new w, *new values of the assigned states, *watched values)``.

An adaptation's step graphs also take ``u`` (the base's update per
unit of learning rate) after ``g``; its first hyper is ``lr``.

Units (LANGUAGE.md section 10): a program with row or col values (or that
reads ``rows``, ``cols`` or ``ndim``) also takes those three 0-d inputs
after ``numel`` (:attr:`Lowered.param_inputs`; the parameter's numbers
after its ``row_block``). In a program with row or col values, elem values
are ``(rows, cols)`` matrices, row values ``(rows, 1)``, col values
``(1, cols)``, and row and col states are inputs and outputs of those
shapes (``layerwise.ops``). Reductions along a unit are ``ops.row_sum``,
``ops.col_sum``, ``ops.row_max_abs`` and ``ops.col_max_abs`` (``norm(x,
row)`` is ``sqrt(row_sum(x * x))``, ``mean(x, row)`` is ``row_sum(x) /
cols``); a layer reduction of a row value is an ordinary one (``mean``
divides by ``rows``), of a col value ``ops.col_total`` / ``ops.col_max``.

Loop-invariant code motion: every const- or global-kind subexpression that
is more than a name or a number (``1 - beta1^t``, ``max_grad_norm /
global_norm(g)``) is computed in the consts graph and enters the
per-parameter graph as a placeholder ``c0, c1, ...``; otherwise inductor
recomputes it for every few elements (measured: it more than doubled the
step time of ``lamb``). Division of an elem value by a narrower value
becomes multiplication by its reciprocal, which is computed once.

Placeholder names: a hyper or state becomes a placeholder of its own name
when that is a plain ASCII Python identifier that fx keeps as it is (not a
keyword, a Python built-in, ``self`` or a name fx reserves); any other
language-valid name (``β1``, ``lambda``, ``print``) gets a generated one
(``hyper_0``, ``state_1``, ...). :attr:`Lowered.placeholders` maps every
hyper and state name to its placeholder's name, so code that feeds the graphs
by name must look names up there.

Shapes and dtypes: ``w``, ``g`` and elem states are 1-D tensors (the
parameter flattened, ``numel`` elements) of the compute dtype; ``t``,
``numel``, hypers, consts, layer states and globals are 0-d tensors of the
same dtype. Outputs of the per-parameter graphs never alias their inputs,
so the runtime may write them back in any order. Layer and global
reductions are explicit nodes (``ops.norm``, ``torch.sum``, ...), so the
graphs can be printed (``layerwise show``), interpreted eagerly and
compiled.
"""
from __future__ import annotations

import math
import operator
import builtins
import keyword
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from . import ops
from .builtins import PARAM_NAMES, widest
from .check import CheckedProgram
from .syntax import Binary, Call, Expr, Name, Num, Unary, children
from .syntax import walk as _walk

__all__ = ["GlobalReduction", "Lowered", "lower", "finish_globals", "fresh_name", "uses_units"]


@dataclass(frozen=True)
class GlobalReduction:
    """One distinct ``global_norm(x)`` or ``global_sum(x)`` of a program."""
    func: str
    arg: Expr


@dataclass
class Lowered:
    """The graphs of one program and the order of their inputs and outputs."""
    program: CheckedProgram
    hyper_names: tuple[str, ...]
    state_names: tuple[str, ...]
    layer_states: tuple[bool, ...]
    assigned_states: tuple[str, ...]
    watch_names: tuple[str, ...]
    globals: tuple[GlobalReduction, ...]
    init: fx.GraphModule
    reduce_consts: fx.GraphModule | None
    reduce: fx.GraphModule | None
    update_consts: fx.GraphModule
    update: fx.GraphModule
    reduce_const_names: tuple[str, ...] = ()
    update_const_names: tuple[str, ...] = ()
    global_names: tuple[str, ...] = ()
    #: each state's kind: "elem", "layer", "row" or "col"
    state_kinds: tuple[str, ...] = ()
    #: (placeholder name, "rows" | "cols" | "ndim") of the parameter's numbers
    param_inputs: tuple[tuple[str, str], ...] = ()
    #: whether the program has row or col values (the unit layout of the runtime)
    units: bool = False
    #: hyper or state name -> the name of its placeholder (the same name unless
    #: fx could not keep it; see the module docstring)
    placeholders: dict[str, str] = field(default_factory=dict)

    def placeholder(self, name: str) -> str:
        """The placeholder name of hyper or state ``name`` (else ``name`` itself)."""
        return self.placeholders.get(name, name)

    def graphs(self) -> list[tuple[str, fx.GraphModule]]:
        """``(title, graph module)`` for every graph, in execution order."""
        return [(title, gm) for title, gm in (
            ("init", self.init), ("reduce_consts", self.reduce_consts), ("reduce", self.reduce),
            ("update_consts", self.update_consts), ("update", self.update)) if gm is not None]


def finish_globals(lowered: Lowered, totals: list[torch.Tensor]) -> list[torch.Tensor]:
    """Global values from the per-step totals of the reduce graph's outputs.

    ``global_norm`` is the square root of the total sum of squares;
    ``global_sum`` is the total itself.
    """
    return [torch.sqrt(x) if gr.func == "global_norm" else x
            for gr, x in zip(lowered.globals, totals)]


# Elementwise built-ins: (NumPy function for folding constants, torch function).
_UNARY = {
    "sqrt": (np.sqrt, torch.sqrt), "rsqrt": (lambda x: 1.0 / np.sqrt(x), ops.rsqrt),
    "exp": (np.exp, torch.exp), "log": (np.log, torch.log), "abs": (np.abs, torch.abs),
    "sign": (np.sign, ops.sign), "sin": (np.sin, torch.sin), "cos": (np.cos, torch.cos),
    "tanh": (np.tanh, torch.tanh),
}
_ARITH = {"+": (np.add, operator.add), "-": (np.subtract, operator.sub),
          "*": (np.multiply, operator.mul), "/": (np.divide, operator.truediv),
          "^": (np.power, torch.pow)}
_CMP = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
        "==": np.equal, "!=": np.not_equal}


def fresh_name(name: str, taken: set[str]) -> str:
    """``name``, with ``_`` prepended until it is not in ``taken`` (which it then
    joins): a placeholder name that no program name (a hyper called ``c0``)
    can clash with."""
    while name in taken:
        name = "_" + name
    taken.add(name)
    return name


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _keeps(name: str) -> bool:
    """Whether fx names a placeholder ``name`` exactly ``name`` and can
    generate Python code with it as an argument."""
    if not _PLAIN.match(name) or keyword.iskeyword(name) or name == "self" \
            or name in builtins.__dict__:
        return False
    node = fx.Graph().placeholder(name)
    return node.name == name


def placeholder_names(names: dict[str, str], taken: set[str]) -> dict[str, str]:
    """A placeholder name for each of ``names`` (name -> prefix): itself when
    fx keeps it, else ``PREFIX_<i>`` not in ``taken``; every chosen name
    joins ``taken``."""
    out = {n: n for n in names if _keeps(n) and n not in taken}
    taken |= set(out)
    for i, (n, prefix) in enumerate(names.items()):
        if n not in out:
            out[n] = fresh_name(f"{prefix}_{i}", taken)
    return {n: out[n] for n in names}


def _fold(fn, *args: float) -> float:
    with np.errstate(all="ignore"):
        return float(fn(*(np.float64(a) for a in args)))


def _names(e: Expr) -> frozenset[str]:
    if isinstance(e, Name):
        return frozenset((e.id,))
    return frozenset().union(*(_names(c) for c in children(e)))


class _Builder:
    """Builds one fx graph: placeholders, expression lowering with CSE, outputs.

    With ``hoist`` (the builder of a consts graph), const- and global-kind
    subexpressions are lowered there and enter this graph as placeholders.
    """

    def __init__(self, inputs: list[str], hoist: "_Builder | None" = None,
                 names: dict[str, str] | None = None):
        self.graph = fx.Graph()
        names = names or {}
        self.env: dict[str, fx.Node | float] = {n: self.graph.placeholder(names.get(n, n))
                                                for n in inputs}
        self.placeholders = set(self.env.values())
        self.last_placeholder = list(self.env.values())[-1]
        self.ref = self.env["w"] if "w" in self.env else self.env["t"]
        self.numel = self.env.get("numel")
        self.rows = self.cols = None       # the parameter's numbers (units)
        self.memo: dict[Expr, tuple[fx.Node | float, frozenset[str]]] = {}
        self.global_nodes: dict[GlobalReduction, fx.Node] = {}
        self.hoist = hoist
        self.hoisted: list[fx.Node] = []    # consts-graph values, one per placeholder c<i>
        self.const_nodes: list[fx.Node] = []  # those placeholders

    def call(self, fn, *args):
        return self.graph.call_function(fn, args)

    def assign(self, name: str, value) -> None:
        self.env[name] = value
        self.memo = {k: v for k, v in self.memo.items() if name not in v[1]}

    def expr(self, e: Expr):
        hit = self.memo.get(e)
        if hit is not None:
            return hit[0]
        if self.hoist is not None and e.kind in ("const", "global") \
                and not isinstance(e, (Num, Name)):
            value = self.hoist.expr(e)
            if isinstance(value, fx.Node):
                value = self.const_input(value, e.kind)
        else:
            value = self._expr(e)
        self.memo[e] = (value, _names(e))
        return value

    def const_input(self, hoisted: fx.Node, kind: str) -> fx.Node:
        """The placeholder through which the consts graph's ``hoisted`` enters."""
        if hoisted in self.hoisted:
            return self.const_nodes[self.hoisted.index(hoisted)]
        name = fresh_name(f"c{len(self.hoisted)}", {p.target for p in self.placeholders})
        with self.graph.inserting_after(self.last_placeholder):
            node = self.graph.placeholder(name)
        node.meta["kind"] = kind
        self.last_placeholder = node
        self.placeholders.add(node)
        self.const_nodes.append(node)
        self.hoisted.append(hoisted)
        return node

    def assign_step(self, name: str, e: Expr, value) -> None:
        """Bind ``name`` here and, for a const/global value, in the consts graph too."""
        self.assign(name, value)
        if self.hoist is not None and e.kind in ("const", "global"):
            self.hoist.assign(name, self.hoist.expr(e))

    def _expr(self, e: Expr):
        if isinstance(e, Num):
            return e.value
        if isinstance(e, Name):
            return self.env[e.id]
        if isinstance(e, Unary):
            x = self.expr(e.operand)
            if e.op == "+":
                return x
            if e.op == "-":
                return -x if isinstance(x, float) else self.call(operator.neg, x)
            return _fold(np.logical_not, x) if isinstance(x, float) else \
                self.call(ops.logical_not, x, self.ref)
        if isinstance(e, Binary):
            if e.op == "/" and e.left.kind == "elem" and e.right.kind != "elem":
                # x / c -> x * (1 / c): one division per layer, not per element
                recip = self.expr(Binary("/", Num(1.0, "const"), e.right, e.right.kind))
                return self.call(operator.mul, self.expr(e.left), recip)
            a, b = self.expr(e.left), self.expr(e.right)
            folded = isinstance(a, float) and isinstance(b, float)
            if e.op in _ARITH:
                np_fn, torch_fn = _ARITH[e.op]
                return _fold(np_fn, a, b) if folded else self.call(torch_fn, a, b)
            if e.op in _CMP:
                return _fold(_CMP[e.op], a, b) if folded else self.call(ops.compare, e.op, a, b,
                                                                        self.ref)
            if e.op == "and":
                return _fold(np.logical_and, a, b) if folded else \
                    self.call(ops.logical_and, a, b, self.ref)
            if e.op == "or":
                return _fold(np.logical_or, a, b) if folded else \
                    self.call(ops.logical_or, a, b, self.ref)
            raise AssertionError(f"operator {e.op!r} should not reach lowering")
        if isinstance(e, Call):
            return self._call(e)
        raise AssertionError(f"cannot lower {e!r}")

    def _call(self, e: Call):
        f = e.func
        if f in ("global_norm", "global_sum"):
            return self.global_nodes[GlobalReduction(f, e.args[0])]
        args = [self.expr(a) for a in e.args
                if not (isinstance(a, Name) and a.kind == "unit")]
        const = all(isinstance(a, float) for a in args)
        if f in _UNARY:
            np_fn, torch_fn = _UNARY[f]
            return _fold(np_fn, *args) if const else self.call(torch_fn, *args)
        if f in ("min", "max"):
            if const:
                return _fold(np.fmin if f == "min" else np.fmax, *args) \
                    if not any(math.isnan(a) for a in args) else math.nan
            return self.call(ops.minimum if f == "min" else ops.maximum, *args, self.ref)
        if f == "clip":
            if const:
                # NaN-propagating like ops.clip (Python's min/max are not)
                return _fold(lambda x, lo, hi: np.minimum(np.maximum(x, lo), hi), *args)
            return self.call(ops.clip, *args, self.ref)
        if f == "where":
            if isinstance(args[0], float):
                # A constant condition picks a branch, but the result keeps the
                # kind of the whole where(): elem, when the branch is narrower,
                # means the branch's value broadcast to the parameter's shape.
                i = 1 if args[0] != 0 else 2
                if e.kind != e.args[i].kind and e.kind in _FILL:
                    return self.call(_FILL[e.kind], args[i], self.ref)
                return args[i]
            return self.call(ops.where, *args, self.ref)
        # Layer reductions: the checker guarantees an elem-, row- or col-kind argument.
        return self._reduction(e, args)

    def _reduction(self, e: Call, args: list):
        f = e.func
        operands = e.args
        if operands and isinstance(operands[-1], Name) and operands[-1].kind == "unit":
            return self._along(f, operands[-1].id, args)
        kind = widest(*(a.kind for a in operands))
        if kind == "col":
            return self._col_reduction(f, args)
        count = self.rows if kind == "row" else self.numel
        if f == "norm":
            return self.call(ops.norm, args[0])
        if f == "sum":
            return self.call(torch.sum, args[0])
        if f == "mean":
            return self.call(ops.mean, args[0], count)
        if f == "rms":
            return self.call(ops.rms, args[0], count)
        if f == "max_abs":
            return self.call(ops.max_abs, args[0])
        if f == "dot":
            return self.call(ops.dot, *args)
        if f == "numel":
            return count
        raise AssertionError(f"unknown built-in {f!r} should not reach lowering")

    def _along(self, f: str, unit: str, args: list):
        """A reduction along each row or column of an elem value (section 10)."""
        if f == "numel":
            return self.cols if unit == "row" else self.rows
        total = ops.row_sum if unit == "row" else ops.col_sum
        count = self.cols if unit == "row" else self.rows
        x = args[0]
        if f == "max_abs":
            return self.call(ops.row_max_abs if unit == "row" else ops.col_max_abs, x)
        if f == "sum":
            return self.call(total, x)
        if f == "dot":
            return self.call(total, self.call(operator.mul, x, args[1]))
        squares = self.call(total, self.call(operator.mul, x, x))
        if f == "norm":
            return self.call(torch.sqrt, squares)
        if f == "mean":
            return self.call(operator.truediv, self.call(total, x), count)
        if f == "rms":
            return self.call(torch.sqrt, self.call(operator.truediv, squares, count))
        raise AssertionError(f"unknown reduction {f!r} should not reach lowering")

    def _col_reduction(self, f: str, args: list):
        """A layer reduction of a col value: the runtime holds col values whole
        on every rank, so this is not a reduction over the parameter's elements."""
        x = args[0]
        if f == "max_abs":
            return self.call(ops.col_max, x, self.cols)
        if f == "numel":
            return self.cols
        if f == "sum":
            return self.call(ops.col_total, x, self.cols)
        if f == "dot":
            return self.call(ops.col_total, self.call(operator.mul, x, args[1]), self.cols)
        squares = self.call(ops.col_total, self.call(operator.mul, x, x), self.cols)
        if f == "norm":
            return self.call(torch.sqrt, squares)
        if f == "mean":
            return self.call(operator.truediv, self.call(ops.col_total, x, self.cols), self.cols)
        if f == "rms":
            return self.call(torch.sqrt, self.call(operator.truediv, squares, self.cols))
        raise AssertionError(f"unknown reduction {f!r} should not reach lowering")

    # outputs
    def elem(self, value) -> fx.Node:
        """An elem-shaped fresh tensor for ``value`` of any kind."""
        if isinstance(value, float) or value.meta.get("kind", "elem") != "elem":
            return self.call(ops.fill_like, value, self.ref)
        return self.fresh(value)

    def unit(self, value, kind: str) -> fx.Node:
        """A fresh row or col value (``kind``) for a ``value`` of that kind or narrower."""
        return self.call(_FILL[kind], value, self.ref)

    def out(self, value, kind: str) -> fx.Node:
        """A fresh output of ``kind`` (a state's) for ``value``."""
        if kind == "layer":
            return self.layer(value)
        return self.elem(value) if kind == "elem" else self.unit(value, kind)

    def layer(self, value) -> fx.Node:
        """A fresh 0-d tensor for a non-elem ``value``."""
        if isinstance(value, float):
            return self.call(ops.scalar, value, self.ref)
        return self.fresh(value)

    def fresh(self, node: fx.Node) -> fx.Node:
        return self.call(torch.clone, node) if node in self.placeholders else node

    def finish(self, outputs: list, name: str) -> fx.GraphModule:
        self.graph.output(tuple(outputs))
        self.graph.eliminate_dead_code()
        self.graph.lint()
        return fx.GraphModule(torch.nn.Module(), self.graph, class_name=name)


#: Broadcast a narrower value to a row, col or elem value.
_FILL = {"row": ops.row_fill, "col": ops.col_fill, "elem": ops.fill_like}


def uses_units(program: CheckedProgram) -> bool:
    """Whether ``program`` has row or col values (states, reductions along a unit)."""
    if any(s.kind in ("row", "col") for s in program.states):
        return True
    exprs = [s.init for s in program.states] + [a.value for a in program.step]
    return any(n.kind in ("row", "col", "unit") for e in exprs for n in _walk(e))


def _param_inputs(program: CheckedProgram, units: bool,
                  taken: set[str]) -> tuple[tuple[str, str], ...]:
    """Placeholders for ``rows``, ``cols``, ``ndim`` if the program needs them."""
    declared = {*program.hyper_names, *(s.name for s in program.states)}
    exprs = [s.init for s in program.states] + [a.value for a in program.step]
    named = any(isinstance(n, Name) and n.id in PARAM_NAMES and n.id not in declared
                for e in exprs for n in _walk(e))
    if not (units or named):
        return ()
    return tuple((fresh_name(n, taken), n) for n in PARAM_NAMES)


def _bind_params(b: "_Builder", params: tuple[tuple[str, str], ...], declared: set[str]) -> None:
    for ph, n in params:
        node = b.env[ph]
        if n == "rows":
            b.rows = node
        elif n == "cols":
            b.cols = node
        if n not in declared:
            b.env[n] = node


def _mark(value, kind: str):
    if isinstance(value, fx.Node) and "kind" not in value.meta:
        value.meta["kind"] = kind
    return value


def _globals(program: CheckedProgram) -> tuple[GlobalReduction, ...]:
    found: list[GlobalReduction] = []

    def walk(e: Expr) -> None:
        if isinstance(e, Call) and e.func in ("global_norm", "global_sum"):
            gr = GlobalReduction(e.func, e.args[0])
            if gr not in found:
                found.append(gr)
            return
        for c in children(e):
            walk(c)

    for a in program.step:
        walk(a.value)
    return tuple(found)


def lower(program: CheckedProgram) -> Lowered:
    """Lower a checked program to its ``init``, ``reduce`` and ``update`` fx graphs."""
    hypers = program.hyper_names
    states = tuple(s.name for s in program.states)
    layer_states = tuple(s.layer for s in program.states)
    kinds = {s.name: s.kind for s in program.states}
    globals_ = _globals(program)
    units = uses_units(program)
    # an adaptation's step also reads u, the base's update (LANGUAGE.md section 12)
    elem_inputs = ["w", "g", "u"] if program.kind == "adaptation" else ["w", "g"]
    declared = {*hypers, *states}
    safe = placeholder_names({**{h: "hyper" for h in hypers}, **{s: "state" for s in states}},
                             {*elem_inputs, "t", "numel", *PARAM_NAMES})
    params = _param_inputs(program, units,
                           {*elem_inputs, "t", "numel", *declared, *safe.values()})
    phs = [ph for ph, _ in params]

    # init: (w, numel, *params, *hypers) -> state initial values
    b = _Builder(["w", "numel", *phs, *hypers], names=safe)
    _bind_params(b, params, declared)
    _mark(b.ref, "elem")
    outs = []
    for s in program.states:
        v = _mark(b.expr(s.init), s.init.kind)
        outs.append(b.out(v, s.kind))
    init = b.finish(outs, f"{program.name}_init")

    step_inputs = [*elem_inputs, "t", "numel", *phs, *hypers, *states]
    reduce_consts = reduce = None
    reduce_const_names: tuple[str, ...] = ()
    if globals_:
        hoist = _Builder(["t", *hypers], names=safe)
        b = _Builder(step_inputs, hoist, safe)
        _bind_params(b, params, declared)
        _mark_inputs(b, kinds)
        outs = []
        for gr in globals_:
            x = _mark(b.expr(gr.arg), gr.arg.kind)
            if gr.arg.kind == "col":
                part = b.call(ops.col_total, b.call(operator.mul, x, x)
                              if gr.func == "global_norm" else x, b.cols)
            elif gr.arg.kind in ("elem", "row"):
                part = b.call(torch.sum, b.call(operator.mul, x, x) if gr.func == "global_norm"
                              else x)
            else:
                x = b.layer(x)
                part = b.call(operator.mul, x, x) if gr.func == "global_norm" else x
            outs.append(b.fresh(part))
        reduce = b.finish(outs, f"{program.name}_reduce")
        reduce_consts = hoist.finish(b.hoisted, f"{program.name}_reduce_consts")
        reduce_const_names = tuple(n.target for n in b.const_nodes)

    taken = {"t", *hypers, *safe.values()}
    global_names = [fresh_name(f"global_{i}", taken) for i in range(len(globals_))]
    hoist = _Builder(["t", *hypers, *global_names], names=safe)
    for name, gr in zip(global_names, globals_):
        hoist.global_nodes[gr] = _mark(hoist.env[name], "global")
    b = _Builder(step_inputs, hoist, safe)
    _bind_params(b, params, declared)
    _mark_inputs(b, kinds)
    assigned: list[str] = []
    for a in program.step:
        v = _mark(b.expr(a.value), a.value.kind)
        if a.target in kinds:
            v = b.out(v, kinds[a.target])
            if a.target not in assigned:
                assigned.append(a.target)
        elif a.target == "w":
            v = b.elem(v)
        b.assign_step(a.target, a.value, v)
    outs = [b.elem(b.env["w"]), *(b.env[s] for s in assigned),
            *(b.layer(b.env[n]) for n in program.watches)]
    update = b.finish(outs, f"{program.name}_update")
    update_consts = hoist.finish(b.hoisted, f"{program.name}_update_consts")
    return Lowered(program, hypers, states, layer_states, tuple(assigned), program.watches,
                   globals_, init, reduce_consts, reduce, update_consts, update,
                   reduce_const_names, tuple(n.target for n in b.const_nodes),
                   tuple(global_names), tuple(kinds[s] for s in states), params, units, safe)


def _mark_inputs(b: _Builder, state_kinds: dict[str, str]) -> None:
    for name, node in b.env.items():
        kind = "elem" if name in ("w", "g", "u") else state_kinds.get(name, "const")
        if node is b.rows or node is b.cols or name in PARAM_NAMES:
            kind = "layer"
        _mark(node, kind)
