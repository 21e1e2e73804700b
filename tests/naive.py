"""A deliberately naive NumPy (float64) interpreter of a checked program.

This is the test oracle for the runtime (``tests/test_runtime_properties.py``):
it shares nothing with ``layerwise.lower`` / ``ops`` / ``runtime`` /
``optimizer`` and imports from ``layerwise`` only the syntax node classes
and the ``CheckedProgram`` type, to walk the tree. It is a recursive
evaluator over expression nodes, one parameter at a time, with NumPy
broadcasting; it favours being obviously right over being fast.

Semantics (LANGUAGE.md sections 3-6, and where the contract is silent the
conventions written in the docstring of ``layerwise/ops.py``):

* Values are float64 ``np.ndarray``: elem values have the parameter's shape
  (a 0-d parameter gives 0-d elem values, an empty one empty values);
  const, global and layer values are 0-d. Mixed kinds combine by NumPy
  broadcasting. Arithmetic is IEEE (``x/0 = +-inf``, ``0/0 = NaN``), no
  warnings, no exceptions.
* Comparisons give 1.0 / 0.0. ``and``, ``or``, ``not`` and ``where``'s
  condition treat any non-zero value as true, NaN included (ops.py:
  ``truth(x) = x != 0``).
* ``min``, ``max`` and ``clip(x, lo, hi) = min(max(x, lo), hi)`` propagate
  NaN (ops.py). ``sign`` gives -1, 0 or 1 and NaN for NaN (like every other
  elementwise built-in, and like the constant folding of the lowering).
* Layer reductions over the parameter's elements: ``norm`` = sqrt(sum x^2),
  ``sum``, ``dot(x, y)`` = sum(x*y), ``max_abs`` = max |x|, ``mean`` =
  sum / numel, ``rms`` = sqrt(sum x^2 / numel), ``numel`` = the number of
  elements of the parameter. For an empty parameter ``norm``, ``sum``,
  ``dot`` and ``max_abs`` are 0 and ``mean`` and ``rms`` are NaN (0/0).
* ``t`` is the parameter's own step count: 1 at the first step in which the
  parameter has a gradient, +1 at each later one. Parameters whose gradient
  is ``None`` are skipped: no init, no ``t`` increment, no watch record,
  state kept.
* States are initialised at the parameter's first step from ``w`` (its value
  then) and hypers; elem states are broadcast to the parameter's shape,
  layer states are 0-d.
* If the step uses ``global_norm`` / ``global_sum`` the step has two phases:
  first every such call's argument is evaluated for every parameter that
  has a gradient, with the values at the start of the step (``w``, ``g``,
  this step's ``t``, hypers, the previous step's states) -- the checker
  guarantees that is all it may read; the shares are summed over those
  parameters (an elem argument contributes sum(x^2) resp. sum(x), a layer
  argument x^2 resp. x, once per parameter); ``global_norm`` is the square
  root of its total. Then each parameter runs the update.
* The update runs the statements in order over an environment of names:
  assigning a state stores its new value (reads after it see the new
  value); assigning ``w`` sets the new parameter value (broadcast to the
  parameter's shape); assigning ``g`` only rebinds the name; anything else
  is a local. Watched names are read from the environment at the end of
  the step (one float per parameter and step).
* Hyper values: the given values (defaults where not given), then every
  assignment of the program's matching ``for`` rules in file order, each
  evaluated from the values so far and the parameter's ``ndim``, ``numel``,
  ``rows``, ``cols`` (LANGUAGE.md section 11).
"""
from __future__ import annotations

import re

import numpy as np

from layerwise.check import CheckedProgram
from layerwise.syntax import Binary, Call, Name, Num, Str, Unary

__all__ = ["NaiveOptimizer", "evaluate", "run"]

_GLOBALS = ("global_norm", "global_sum")


def _f(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _truth(x) -> np.ndarray:
    return _f(x) != 0


def evaluate(e, env: dict, numel: int, globals_: dict | None = None) -> np.ndarray:
    """The value of expression ``e`` for one parameter.

    ``env`` maps names to values; ``numel`` is the parameter's element
    count; ``globals_`` maps global-reduction call nodes to their values.
    """
    with np.errstate(all="ignore"):
        return _eval(e, env, numel, globals_ or {})


def _eval(e, env, n, gl):
    ev = lambda x: _eval(x, env, n, gl)  # noqa: E731
    if isinstance(e, Num):
        return _f(e.value)
    if isinstance(e, Name):
        return _f(env[e.id])
    if isinstance(e, Unary):
        x = ev(e.operand)
        if e.op == "-":
            return -x
        if e.op == "+":
            return x
        assert e.op == "not", e.op
        return _f(x == 0)
    if isinstance(e, Binary):
        a, b = ev(e.left), ev(e.right)
        op = e.op
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "/":
            return a / b
        if op == "^":
            return np.power(a, b)
        if op == "<":
            return _f(a < b)
        if op == "<=":
            return _f(a <= b)
        if op == ">":
            return _f(a > b)
        if op == ">=":
            return _f(a >= b)
        if op == "==":
            return _f(a == b)
        if op == "!=":
            return _f(a != b)
        if op == "and":
            return _f(_truth(a) & _truth(b))
        if op == "or":
            return _f(_truth(a) | _truth(b))
        raise AssertionError(f"unexpected operator {op!r}")
    if isinstance(e, Call):
        if e.func in _GLOBALS:
            return _f(gl[e])
        args = [ev(a) for a in e.args]
        f = e.func
        x = args[0]
        if f == "sqrt":
            return np.sqrt(x)
        if f == "rsqrt":
            return 1.0 / np.sqrt(x)
        if f == "exp":
            return np.exp(x)
        if f == "log":
            return np.log(x)
        if f == "abs":
            return np.abs(x)
        if f == "sign":
            return np.sign(x)          # NaN for NaN
        if f == "sin":
            return np.sin(x)
        if f == "cos":
            return np.cos(x)
        if f == "tanh":
            return np.tanh(x)
        if f == "min":
            return np.minimum(x, args[1])
        if f == "max":
            return np.maximum(x, args[1])
        if f == "clip":
            return np.minimum(np.maximum(x, args[1]), args[2])
        if f == "where":
            return _f(np.where(_truth(x), args[1], args[2]))
        if f == "norm":
            return np.sqrt(np.sum(x * x))
        if f == "sum":
            return _f(np.sum(x))
        if f == "dot":
            return _f(np.sum(x * args[1]))
        if f == "max_abs":
            return _f(np.max(np.abs(x))) if x.size else _f(0.0)
        if f == "mean":
            return _f(np.sum(x)) / n
        if f == "rms":
            return np.sqrt(np.sum(x * x) / n)
        if f == "numel":
            return _f(n)
        raise AssertionError(f"unexpected built-in {f!r}")
    raise AssertionError(f"cannot evaluate {e!r}")


def _global_calls(e, out: list) -> None:
    if isinstance(e, Call) and e.func in _GLOBALS:
        if e not in out:
            out.append(e)
        return
    children = (e.operand,) if isinstance(e, Unary) else (e.left, e.right) \
        if isinstance(e, Binary) else e.args if isinstance(e, Call) else ()
    for c in children:
        _global_calls(c, out)


def _matrix(shape) -> dict:
    """``ndim``, ``numel``, ``rows``, ``cols`` of a parameter's plain matrix view."""
    rows = shape[0] if shape else 1
    return {"ndim": float(len(shape)), "numel": float(np.prod(shape)), "rows": float(rows),
            "cols": float(np.prod(shape[1:]))}


def _predicate(e, shape, name: str | None) -> float:
    """A ``for`` predicate's value for one parameter (non-zero is true)."""
    ev = lambda x: _predicate(x, shape, name)  # noqa: E731
    if isinstance(e, Num):
        return e.value
    if isinstance(e, Name):
        return _matrix(shape)[e.id]
    if isinstance(e, Unary):
        x = ev(e.operand)
        return {"-": -x, "+": x, "not": float(x == 0)}[e.op]
    assert isinstance(e, Binary), e
    if e.op == "~":
        assert isinstance(e.right, Str)
        return float(re.search(e.right.value, name) is not None)
    if e.op == "and":
        return float(ev(e.left) != 0 and ev(e.right) != 0)
    if e.op == "or":
        return float(ev(e.left) != 0 or ev(e.right) != 0)
    a, b = np.float64(ev(e.left)), np.float64(ev(e.right))
    with np.errstate(all="ignore"):
        return float(_eval(Binary(e.op, Num(float(a)), Num(float(b))), {}, 1, {}))


class NaiveOptimizer:
    """Runs a checked program on NumPy float64 parameters, one naive step at a time.

    Args:
        program: the checked program (``spec.program``).
        params: ``{name: array}``, any shapes (0-d and empty included); copied.
        hypers: hyper values; hypers not given take their defaults.

    Attributes:
        params: current parameter values ``{name: array}``.
        states: ``{name: {state name: array}}`` for initialised parameters.
        t: ``{name: int}`` steps taken by each parameter.
        hypers: ``{name: {hyper: value}}`` after the ``for`` rules.
        watched: ``{watch name: {param name: [float per step]}}`` (as ``opt.watched``).
    """

    def __init__(self, program: CheckedProgram, params: dict, hypers: dict | None = None):
        assert isinstance(program, CheckedProgram)
        self.program = program
        self.params = {k: _f(v).copy() for k, v in params.items()}
        base = {h.name: float(h.default) for h in program.hypers}
        base.update({k: float(v) for k, v in (hypers or {}).items()})
        self.hypers = {}
        for name, w in self.params.items():
            # LANGUAGE.md section 11: every assignment of a matching rule, in
            # order, from the values so far (nothing here is explicit in a group)
            values = dict(base)
            for rule in program.rules:
                if _predicate(rule.predicate, w.shape, name) != 0:
                    for target, value in rule.assigns:
                        if target != "row_block":
                            env = {**values, **_matrix(w.shape)}
                            values[target] = float(evaluate(value, env, 1))
            self.hypers[name] = values
        self.states: dict[str, dict[str, np.ndarray]] = {}
        self.t = {k: 0 for k in self.params}
        self.watched = {n: {} for n in program.watches}
        self.globals_in_step: list[Call] = []
        for a in program.step:
            _global_calls(a.value, self.globals_in_step)

    def _start_env(self, name: str, grad) -> dict:
        """Names at the start of a step: w, g, t, hypers, previous states."""
        return {"w": self.params[name], "g": _f(grad), "t": _f(self.t[name]),
                **self.hypers[name], **self.states[name]}

    def step(self, grads: dict) -> None:
        """One step; ``grads`` maps parameter names to arrays, or None (skipped)."""
        prog = self.program
        todo = [k for k in self.params if grads.get(k) is not None]
        for k in todo:
            w = self.params[k]
            assert np.shape(grads[k]) == w.shape
            if k not in self.states:                     # first step: initial states
                env = {"w": w, **self.hypers[k]}
                self.states[k] = {}
                for s in prog.states:
                    v = evaluate(s.init, env, w.size)
                    self.states[k][s.name] = (_f(v).copy() if s.layer
                                              else np.broadcast_to(v, w.shape).copy())
                    assert not s.layer or self.states[k][s.name].shape == ()
            self.t[k] += 1
        # phase 1: global reductions over every parameter with a gradient
        totals = {c: 0.0 for c in self.globals_in_step}
        with np.errstate(all="ignore"):
            for k in todo:
                env = self._start_env(k, grads[k])
                for c in self.globals_in_step:
                    x = evaluate(c.args[0], env, self.params[k].size)
                    share = np.sum(x * x) if c.func == "global_norm" else np.sum(x)
                    totals[c] = totals[c] + share
            gl = {c: (np.sqrt(v) if c.func == "global_norm" else v) for c, v in totals.items()}
        # phase 2: the update of each parameter
        states = {s.name: s for s in prog.states}
        for k in todo:
            shape = self.params[k].shape
            env = self._start_env(k, grads[k])
            for a in prog.step:
                v = evaluate(a.value, env, self.params[k].size, gl)
                if a.target in states:
                    v = _f(v).copy() if states[a.target].layer \
                        else np.broadcast_to(v, shape).copy()
                elif a.target == "w":
                    v = np.broadcast_to(v, shape).copy()
                env[a.target] = v
            self.params[k] = env["w"]
            self.states[k] = {s.name: env[s.name] for s in prog.states}
            for n in prog.watches:
                v = _f(env[n])
                assert v.shape == (), f"watched {n!r} is not one number"
                self.watched[n].setdefault(k, []).append(float(v))


def run(program: CheckedProgram, params: dict, grads_per_step: list, hypers: dict | None = None):
    """Run one step per entry of ``grads_per_step``; returns the NaiveOptimizer."""
    opt = NaiveOptimizer(program, params, hypers)
    for grads in grads_per_step:
        opt.step(grads)
    return opt
