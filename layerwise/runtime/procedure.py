"""A lowered program -> its three procedures of flat passes (init, reduce, update).

A procedure is what the runtime runs over the buckets of parameters
(``layerwise.runtime.runner``) for one graph of ``layerwise.lower``: zero or
more *level passes*, each returning the partials of one level of layer
reductions (``layerwise.split``), then a *final pass* that writes and
returns. Between passes the runtime adds each parameter's partials over its
chunks (and, for sharded parameters, across ranks) and hands the results to
the later passes as ``r<i>`` inputs.

``init``   ``(w, numel, *hypers)``: writes every state's initial value, on
           the parameters initialised this step.
``reduce`` only for programs with global reductions: returns each
           parameter's share of every ``global_norm`` / ``global_sum`` (a
           sum of squares or a sum over its elements, or a layer value).
``update`` writes ``w`` and the assigned states, returns the watched values.
           A one-level update whose early states can be written by the level
           pass (``layerwise.split.split_early``; LAMB's ``m`` and ``v``)
           does so.

Hoisted constants (``layerwise.lower``) are computed inside each pass's vec
graph from ``t``, hypers and globals (:func:`~.flatten.inline_consts`).

A program with row or col values (``Lowered.units``) runs on the unit
layout: its passes are flattened without a chunk constant, with the space
of every input (row and col states, and the partials of reductions along a
unit, which later passes read as row or col values).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..lower import Lowered
from ..split import split_early, split_graph
from .flatten import FlatPass, Role, flatten, inline_consts

__all__ = ["Procedure", "Pass", "procedures"]


@dataclass
class Pass:
    """One flat pass: its graphs, which reduction each ``r<i>`` input holds
    (``reads``: placeholder name -> reduction index), which reductions its
    partial outputs are (``computes``, in order) and the roles of its outputs."""
    flat: FlatPass
    reads: dict[str, int]
    computes: list[int]
    roles: list[Role]
    #: the space of each reduction this pass computes ("seg", "row" or "col")
    spaces: list[str] = ()


@dataclass
class Procedure:
    """Level passes, then the final pass; ``reductions`` layer reductions in all."""
    name: str
    levels: list[Pass]
    final: Pass
    reductions: int


def _state_role(kind: str) -> str:
    """Elem and row states live in per-chunk buffers, layer and col states in
    per-segment vectors and tables."""
    return "write_vec" if kind in ("layer", "col") else "write"


def _roles_update(lowered: Lowered, late: list[str], n_watch: int) -> list[Role]:
    kinds = dict(zip(lowered.state_names, lowered.state_kinds))
    return ([Role("write", "w")]
            + [Role(_state_role(kinds[s]), s) for s in late]
            + [Role("vec")] * n_watch)


def _with_consts(gm: fx.GraphModule, consts: fx.GraphModule | None, names) -> fx.GraphModule:
    return inline_consts(gm, consts, tuple(names)) if consts is not None and names else gm


def _pass(gm: fx.GraphModule, roles: list[Role], reads: list[int], computes: list[int],
          elem: set[str] | dict[str, str], chunk: int | None, consts=None, const_names=(),
          spaces=()) -> Pass:
    """Flatten ``gm``, whose last ``len(reads)`` placeholders are the partials of
    the reductions ``reads`` (``layerwise.split``); ``spaces``: the space of
    every reduction of the procedure."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    red_names = dict(zip(names[len(names) - len(reads):], reads)) if reads else {}
    if isinstance(elem, dict):
        elem = {**elem, **{n: spaces[i] for n, i in red_names.items()
                           if spaces[i] in ("row", "col")}}
    flat = flatten(_with_consts(gm, consts, const_names), roles, elem, chunk)
    return Pass(flat, red_names, computes, roles, [spaces[i] for i in computes])


def _procedure(name: str, gm: fx.GraphModule, final_roles: list[Role], elem,
               chunk: int | None, consts=None, const_names=()) -> Procedure:
    split = split_graph(gm)
    if split is None:
        return Procedure(name, [], _pass(gm, final_roles, [], [], elem, chunk, consts,
                                         const_names), 0)
    levels = [_pass(lv.graph, [Role("partial", combine=split.combine[i]) for i in lv.computes],
                    lv.reads, lv.computes, elem, chunk, consts, const_names, split.spaces)
              for lv in split.levels]
    final = _pass(split.final, final_roles, list(range(split.count)), [], elem, chunk, consts,
                  const_names, split.spaces)
    return Procedure(name, levels, final, split.count)


def procedures(lowered: Lowered, chunk: int) -> dict[str, Procedure]:
    """The ``init``, ``update`` and (with global reductions) ``reduce``
    procedures of ``lowered``, for chunks of ``chunk`` elements (on the unit
    layout, ``lowered.units``, the chunk length is each bucket's: ``chunk``
    is not used)."""
    kinds = dict(zip(lowered.state_names, lowered.state_kinds))
    elem_names = {"w", "g", "u", *(s for s, k in kinds.items() if k == "elem")}
    # the graphs' placeholders are named lowered.placeholder(state), which is
    # not the state's name when fx could not keep that (``β1``, ``lambda``)
    ph = lowered.placeholder
    elem: set[str] | dict[str, str] = {ph(n) for n in elem_names}
    if lowered.units:
        chunk = None
        elem = {**{ph(n): "elem" for n in elem_names},
                **{ph(s): k for s, k in kinds.items() if k in ("row", "col")}}
    out: dict[str, Procedure] = {}
    init_roles = [Role(_state_role(kinds[s]), s) for s in lowered.state_names]
    out["init"] = _procedure("init", lowered.init, init_roles, elem, chunk)
    if lowered.reduce is not None:
        # every output is one parameter's share of a global reduction; the
        # reductions in it (sum(x^2) of an elem argument included) are levels
        shares = [Role("vec")] * len(lowered.globals)
        out["reduce"] = _procedure("reduce", lowered.reduce, shares, elem, chunk,
                                   lowered.reduce_consts, lowered.reduce_const_names)
    n_watch = len(lowered.watch_names)
    early = split_early(lowered.update, elem_names, list(lowered.assigned_states), ph)
    if early is None:
        out["update"] = _procedure("update", lowered.update,
                                   _roles_update(lowered, list(lowered.assigned_states), n_watch),
                                   elem, chunk, lowered.update_consts,
                                   lowered.update_const_names)
    else:
        consts, names = lowered.update_consts, lowered.update_const_names
        n = len(early.combine)
        level_roles = ([Role("partial", combine=c) for c in early.combine]
                       + [Role("write", s, early=True) for s in early.early])
        level = _pass(early.level, level_roles, [], list(range(n)), elem, chunk, consts, names,
                      early.spaces)
        final = _pass(early.final, _roles_update(lowered, early.late, n_watch), list(range(n)),
                      [], elem, chunk, consts, names, early.spaces)
        out["update"] = Procedure("update", [level], final, n)
    return out
