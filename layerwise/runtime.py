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
* Graphs with layer reductions also run as split passes
  (``layerwise.split``, :class:`Passes`): compiled, for parameters above
  :data:`SPLIT_ABOVE` elements; always, for sharded parameters, whose
  partial reductions are combined across ranks between the passes.
  Where it moves fewer bytes (``layerwise.split.materialize``; LAMB), the
  compiled large-parameter path keeps the elem values the final pass needs
  (LAMB's ``u``) in a scratch buffer instead of recomputing them: one
  buffer per (program, dtype, device), as large as the largest parameter
  times the number of kept values, reused by every parameter and step.
"""
from __future__ import annotations

import types
from typing import Callable, Sequence

import torch

from .check import CheckedProgram
from .lower import Lowered, finish_globals, lower
from .split import Materialized, SplitGraph, materialize, split_graph

#: Parameters with more elements than this take the split passes when compiled
#: (and not sharded: sharded parameters always do).
SPLIT_ABOVE = 4096

__all__ = ["Runner", "Passes", "runner_for", "compute_dtype", "flat"]


def flat(t: torch.Tensor, offset: int = 0, numel: int | None = None) -> torch.Tensor:
    """A 1-D tensor aliasing ``t``'s elements that is not a view (no ``_base``):
    all of them, or ``numel`` from element ``offset`` on.

    dynamo guards on a view's base: passing ``t.view(-1)`` would compile one
    graph per parameter rank. ``t`` must be contiguous; a 0-d tensor gives
    shape ``(1,)``.
    """
    out = t.new_empty(0)
    n = t.numel() if numel is None else numel
    out.set_(t.untyped_storage(), t.storage_offset() + offset, (n,), (1,))
    return out


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states and the update use for a parameter of ``dtype``.

    float32 and float64 parameters compute in their own dtype; bfloat16 and
    float16 parameters in float32 (LANGUAGE.md section 8).
    """
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _make_update(lowered: Lowered, graph, assigned: Sequence[str] | None = None) -> Callable:
    """The update wrapper around ``graph`` (the fused update or a split final
    pass, which also takes the reductions' partials ``reds`` and maybe
    ``scratch`` values): advance ``t``, run the graph, write the new
    parameter and the ``assigned`` states (default: all the program
    assigns) back."""
    assigned = lowered.assigned_states if assigned is None else assigned
    slots = [lowered.state_names.index(s) for s in assigned]

    def update(param: torch.Tensor, grad: torch.Tensor, t: torch.Tensor, numel: torch.Tensor,
               hypers: Sequence[torch.Tensor], states: Sequence[torch.Tensor],
               consts: Sequence[torch.Tensor], reds: Sequence[torch.Tensor] = (),
               scratch: Sequence[torch.Tensor] = ()):
        t.add_(1)
        w = param.to(t.dtype)
        g = grad.to(t.dtype)
        outs = graph(w, g, t, numel, *hypers, *states, *consts, *scratch, *reds)
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


def _make_keep_level(lowered: Lowered, keep: Materialized) -> Callable:
    """The wrapper of a :class:`~layerwise.split.Materialized` level pass: runs
    at ``t + 1``, writes the early states and the ``scratch`` buffers, and
    returns the partials."""
    slots = [lowered.state_names.index(s) for s in keep.early]
    count = len(keep.combine)
    run_pass = _make_pass(keep.level)

    def keep_level(param: torch.Tensor, grad: torch.Tensor, t: torch.Tensor,
                   numel: torch.Tensor, hypers: Sequence[torch.Tensor],
                   states: Sequence[torch.Tensor], consts: Sequence[torch.Tensor],
                   scratch: Sequence[torch.Tensor]):
        outs = run_pass(param, grad, t, numel, hypers, states, consts)
        for j, i in enumerate(slots):
            states[i].copy_(outs[count + j])
        for j, buf in enumerate(scratch):
            buf.copy_(outs[count + len(slots) + j])
        return outs[:count]

    return keep_level


def _make_init(graph) -> Callable:
    """The wrapper of an init graph or one of its split passes."""

    def run_init(w: torch.Tensor, numel: torch.Tensor, hypers: Sequence[torch.Tensor],
                 reds: Sequence[torch.Tensor] = ()):
        return graph(w, numel, *hypers, *reds)

    return run_init


def _own_code(fn: Callable, name: str) -> Callable:
    """A copy of ``fn`` with a new code object, so dynamo caches it separately."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _compiled(fn: Callable, name: str) -> Callable:
    return torch.compile(_own_code(fn, name), dynamic=True, fullgraph=True)


#: ``combine(partials, how)``: each item's partials of one level (a list per
#: item, one 0-d tensor per reduction) -> the same, combined across shards;
#: ``how[i]`` is ``"sum"`` or ``"max"`` for the i-th partial of every item.
Combine = Callable[[list[list[torch.Tensor]], list[str]], list[list[torch.Tensor]]]


class Passes:
    """The callables of one split graph (``layerwise.split``), eager or compiled.

    :meth:`run` runs them for several parameters ("items") at once, level by
    level, so that a ``combine`` between levels can reduce every item's
    partials of that level in one collective.
    """

    def __init__(self, split: SplitGraph, level_fn: Callable, final_fn: Callable):
        self.levels = [(level_fn(lv.graph, k), lv) for k, lv in enumerate(split.levels, 1)]
        self.final = final_fn(split.final)
        self.combine = split.combine

    def run(self, items: Sequence[tuple], combine: Combine | None = None) -> list:
        """The final pass's outputs for each item; ``items`` are the wrappers'
        positional arguments without ``reds``."""
        reds: list[list] = [[None] * len(self.combine) for _ in items]
        for fn, lv in self.levels:
            partials = [list(fn(*args, [r[i] for i in lv.reads])) for args, r in zip(items, reds)]
            if combine is not None:
                partials = combine(partials, [self.combine[i] for i in lv.computes])
            for r, values in zip(reds, partials):
                for i, v in zip(lv.computes, values):
                    r[i] = v
        return [self.final(*args, r) for args, r in zip(items, reds)]


class Runner:
    """Runs one lowered program's graphs over parameters, eagerly or compiled.

    The per-parameter wrappers take ``(param, grad, t, numel, hypers, states,
    consts)``: 1-D aliases of parameter-shaped tensors (or 0-d tensors) as
    described in ``layerwise.lower``; ``t`` is the parameter's step count
    *before* this step, in the compute dtype, and is advanced in place by
    the update; ``numel`` is the whole parameter's element count (also when
    the tensors are one shard of it). ``consts`` come from
    :meth:`update_consts` / :meth:`reduce_consts` for the step count of this
    step (``t + 1``). The consts graphs always run eagerly: they are a few
    scalar operations, run once per step per distinct (hyper values, t).

    ``combine`` (see :data:`Combine`): given, every graph with layer
    reductions runs as split passes (``layerwise.split``) and the partials
    of each level go through ``combine`` (``layerwise.distributed``);
    None, one parameter's reductions are its own.
    """

    def __init__(self, lowered: Lowered, compile: bool):
        self.lowered = lowered
        self.compiled = compile
        name = lowered.program.name
        update = _make_update(lowered, lowered.update)
        self.update_fn = _compiled(update, f"{name}_update_step") if compile else update
        self.reduce_fn = None
        if lowered.reduce is not None:
            reduce = _make_pass(lowered.reduce)
            self.reduce_fn = _compiled(reduce, f"{name}_reduce_step") if compile else reduce

        def passes(split, make_level, make_final, title, compile_it):
            if split is None:
                return None
            if not compile_it:
                return Passes(split, lambda g, k: make_level(g), make_final)
            return Passes(split, lambda g, k: _compiled(make_level(g), f"{name}_{title}_level{k}"),
                          lambda g: _compiled(make_final(g), f"{name}_{title}_final"))

        self.update_passes = passes(split_graph(lowered.update), _make_pass,
                                    lambda g: _make_update(lowered, g), "update", compile)
        self.reduce_passes = None if lowered.reduce is None else passes(
            split_graph(lowered.reduce, skip_outputs=True), _make_pass, _make_pass, "reduce",
            compile)
        self.init_passes = passes(split_graph(lowered.init), _make_init, _make_init, "init",
                                  False)
        self._keep = None
        if compile and self.update_passes is not None:
            elem = {"w", "g", *(s for s, layer in zip(lowered.state_names, lowered.layer_states)
                                if not layer)}
            self._keep = materialize(lowered.update, elem, list(lowered.assigned_states))
        if self._keep is not None:
            self._keep_level = _compiled(_make_keep_level(lowered, self._keep),
                                         f"{name}_keep_level")
            self._keep_final = _compiled(_make_update(lowered, self._keep.final, self._keep.late),
                                         f"{name}_keep_final")
            self._scratch: dict[tuple, torch.Tensor] = {}

    def _split_step(self, args: tuple):
        """The split update of one large parameter (compiled, not combined)."""
        if self._keep is None:
            return self.update_passes.run([args])[0]
        param, t = args[0], args[2]
        n, k = param.numel(), self._keep.scratch
        key = (t.dtype, param.device)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < n * k:
            buf = self._scratch[key] = torch.empty(n * k, dtype=t.dtype, device=param.device)
        scratch = [flat(buf, i * n, n) for i in range(k)]
        reds = self._keep_level(*args, scratch)
        return self._keep_final(*args, reds, scratch)

    def update(self, items: Sequence[tuple], combine: Combine | None = None) -> list:
        """Run the update of every item ``(param, grad, t, numel, hypers, states,
        consts)``; returns each item's watched values.

        Compiled and not combined, parameters above :data:`SPLIT_ABOVE`
        elements take the split passes, the others the fused step.
        """
        if self.update_passes is None:
            return [self.update_fn(*args) for args in items]
        if combine is not None:
            return self.update_passes.run(items, combine)
        if not self.compiled:
            return [self.update_fn(*args) for args in items]
        return [self.update_fn(*args) if args[0].numel() <= SPLIT_ABOVE
                else self._split_step(args) for args in items]

    def reduce(self, items: Sequence[tuple], combine: Combine | None = None) -> list:
        """Each item's partials of the global reductions (arguments as :meth:`update`)."""
        if combine is None or self.reduce_passes is None:
            partials = [self.reduce_fn(*args) for args in items]
        else:
            partials = self.reduce_passes.run(items, combine)
        if combine is not None:
            partials = combine([list(p) for p in partials], ["sum"] * len(self.lowered.globals))
        return partials

    def init_states(self, items: Sequence[tuple],
                    combine: Combine | None = None) -> list[list[torch.Tensor]]:
        """Initial state values for each item ``(w, numel, hypers)`` (run once, eagerly)."""
        if combine is None or self.init_passes is None:
            return [list(self.lowered.init(w, numel, *hypers)) for w, numel, hypers in items]
        return [list(out) for out in self.init_passes.run(items, combine)]

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
