"""Run lowered graphs over many parameters: the eager and the compiled step.

Both paths call the SAME ``torch.fx`` graphs (``layerwise.lower``) through
the same small wrapper functions; the compiled path passes the wrappers
through ``torch.compile``. Design choices (measured; see
``docs/design-runtime.md``):

* Every parameter is flattened to 1-D and the wrappers are compiled with
  ``dynamic=True``, so the number of compiled graphs depends on the
  program and the dtypes, never on the number or shapes of parameters
  (sizes 0 and 1 are specialised by dynamo, so at most three per dtype).
* Hyperparameters, ``t`` and ``numel`` enter as 0-d tensors: a new ``lr``
  from a scheduler changes a tensor's value, not a guard, so it never
  recompiles.
* The wrapper writes the graph's outputs back into the parameter and
  state tensors with ``copy_``, which inductor fuses into the update
  kernel (no extra pass over memory for the write-back).
* Compiled steps are cached per checked program and shared by every
  optimizer built from it. Each program's wrapper gets its own code
  object (:func:`_own_code`): dynamo keeps its compiled graphs per code
  object, so programs never share (and exhaust) one recompile budget.
"""
from __future__ import annotations

import types
from typing import Callable, Sequence

import torch

from .check import CheckedProgram
from .lower import Lowered, finish_globals, lower
from .split import SplitUpdate, split_update

#: Parameters with more elements than this take the split passes when compiled.
SPLIT_ABOVE = 4096

__all__ = ["Runner", "runner_for", "compute_dtype", "flat"]


def flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor aliasing ``t``'s elements that is not a view (no ``_base``).

    dynamo guards on a view's base: passing ``t.view(-1)`` would compile one
    graph per parameter rank. ``t`` must be contiguous; a 0-d tensor gives
    shape ``(1,)``.
    """
    out = t.new_empty(0)
    out.set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))
    return out


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states and the update use for a parameter of ``dtype``.

    float32 and float64 parameters compute in their own dtype; bfloat16 and
    float16 parameters in float32 (LANGUAGE.md section 8).
    """
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _make_update(lowered: Lowered, graph) -> Callable:
    """The update wrapper around ``graph`` (the fused update or the split final
    pass, which also takes the reductions ``reds``): advance ``t``, run the
    graph, write the new parameter and states back."""
    slots = [lowered.state_names.index(s) for s in lowered.assigned_states]

    def update(param: torch.Tensor, grad: torch.Tensor, t: torch.Tensor, numel: torch.Tensor,
               hypers: Sequence[torch.Tensor], states: Sequence[torch.Tensor],
               consts: Sequence[torch.Tensor], reds: Sequence[torch.Tensor] = ()):
        t.add_(1)
        w = param.to(t.dtype)
        g = grad.to(t.dtype)
        outs = graph(w, g, t, numel, *hypers, *states, *consts, *reds)
        param.copy_(outs[0])
        for j, i in enumerate(slots):
            states[i].copy_(outs[1 + j])
        return outs[1 + len(slots):]

    return update


def _make_pass(graph) -> Callable:
    """The wrapper of a graph that only returns values (the global-reduction
    pass, or a level pass of the split step, which also takes ``reds``): it
    runs at the step count of this step, ``t + 1``, and writes nothing."""

    def run_pass(param: torch.Tensor, grad: torch.Tensor, t: torch.Tensor, numel: torch.Tensor,
                 hypers: Sequence[torch.Tensor], states: Sequence[torch.Tensor],
                 consts: Sequence[torch.Tensor], reds: Sequence[torch.Tensor] = ()):
        return graph(param.to(t.dtype), grad.to(t.dtype), t + 1, numel, *hypers, *states,
                     *consts, *reds)

    return run_pass


def _own_code(fn: Callable, name: str) -> Callable:
    """A copy of ``fn`` with a new code object, so dynamo caches it separately."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


class Runner:
    """Runs one lowered program's graphs over parameters, eagerly or compiled.

    ``update_fn(param, grad, t, numel, hypers, states, consts)`` and
    ``reduce_fn`` (same arguments) take 1-D aliases of parameter-shaped
    tensors (or 0-d tensors) as described in ``layerwise.lower``; ``t`` is
    the parameter's step count *before* this step, in the compute dtype,
    and is advanced in place by ``update_fn``. ``consts`` come from
    :meth:`update_consts` / :meth:`reduce_consts` for the step count of
    this step (``t + 1``). The consts and init graphs always run eagerly:
    they are a few scalar operations, run once per step per distinct
    (hyper values, t), or once per parameter.
    """

    def __init__(self, lowered: Lowered, compile: bool):
        self.lowered = lowered
        self.update_fn = _make_update(lowered, lowered.update)
        self.reduce_fn = _make_pass(lowered.reduce) if lowered.reduce is not None else None
        self._split: SplitUpdate | None = None
        if compile:
            name = lowered.program.name
            self.fused_fn = torch.compile(_own_code(self.update_fn, f"{name}_update_step"),
                                          dynamic=True, fullgraph=True)
            self.update_fn = self.fused_fn
            self._split = split_update(lowered.update)
            if self._split is not None:
                self._levels = [torch.compile(_own_code(_make_pass(lv.graph), f"{name}_level{k}"),
                                              dynamic=True, fullgraph=True)
                                for k, lv in enumerate(self._split.levels, 1)]
                self._final = torch.compile(
                    _own_code(_make_update(lowered, self._split.final), f"{name}_final"),
                    dynamic=True, fullgraph=True)
                self.update_fn = self._update_any
            if self.reduce_fn is not None:
                self.reduce_fn = torch.compile(_own_code(self.reduce_fn, f"{name}_reduce_step"),
                                               dynamic=True, fullgraph=True)

    def _update_any(self, param, grad, t, numel, hypers, states, consts):
        """Compiled update: fused for small parameters, split passes above SPLIT_ABOVE."""
        if param.numel() <= SPLIT_ABOVE:
            return self.fused_fn(param, grad, t, numel, hypers, states, consts)
        reds: list = [None] * self._split.count
        for fn, lv in zip(self._levels, self._split.levels):
            values = fn(param, grad, t, numel, hypers, states, consts, [reds[i] for i in lv.reads])
            for i, v in zip(lv.computes, values):
                reds[i] = v
        return self._final(param, grad, t, numel, hypers, states, consts, reds)

    def init_states(self, w: torch.Tensor, numel: torch.Tensor,
                    hypers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Initial state values for one parameter (run once, eagerly)."""
        return list(self.lowered.init(w, numel, *hypers))

    def update_consts(self, t: torch.Tensor, hypers: Sequence[torch.Tensor],
                      globals_: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Hoisted const/global values of the update graph for step count ``t``."""
        return self.lowered.update_consts(t, *hypers, *globals_)

    def reduce_consts(self, t: torch.Tensor,
                      hypers: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Hoisted const values of the reduce graph for step count ``t``."""
        return self.lowered.reduce_consts(t, *hypers)

    def finish_globals(self, partials: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Global values from each parameter's reduce-graph outputs."""
        if not partials:
            return []
        totals = [torch.stack([p[i] for p in partials]).sum()
                  for i in range(len(self.lowered.globals))]
        return finish_globals(self.lowered, totals)


_CACHE: dict[tuple[CheckedProgram, bool], Runner] = {}


def runner_for(program: CheckedProgram, compile: bool) -> Runner:
    """The (cached) runner of ``program``: one compiled step per program, not per optimizer."""
    key = (program, compile)
    runner = _CACHE.get(key)
    if runner is None:
        runner = _CACHE[key] = Runner(lower(program), compile)
    return runner
