"""Per-parameter graph -> passes split at its layer reductions.

The multi-tensor runtime (``layerwise.runtime``) runs every per-parameter
graph of ``layerwise.lower`` over all parameters at once, on flat buffers
(``layerwise.runtime.flatten``). A layer reduction (``norm``, ``sum``,
``mean``, ``rms``, ``dot``, ``max_abs``) needs every element of a layer
before anything that depends on it can run, and under FSDP2 it must also
be combined across ranks; so the graph is cut there.
:func:`split_graph` derives, by graph surgery on the same graph:

``level k`` (k = 1..D) ``(*inputs, *partials of the reductions of levels
           < k) -> (*partials of the reductions of level k)``
``final``  ``(*inputs, *partials of all reductions) -> the graph's outputs``

A reduction's level is 1 + the highest level among the reductions its
argument depends on. A level pass returns each reduction as a *partial*
that is combined across chunks and shards by a sum or a max
(:data:`COMBINE`): the sum of squares for ``norm`` and ``rms``, the sum
for ``sum``, ``mean`` and ``dot``, the largest absolute value for
``max_abs``. The passes that take partials finish them inside the graph
(``sqrt``, ``/ numel``; ``numel`` is the whole parameter's element count),
so one parameter's passes, run one after the other with nothing combined
in between, compute exactly the reductions of the fused graph. Each pass
recomputes the elementwise values it needs from the inputs, so no elem
temporary survives between passes; nothing is written before the final
pass, so a pass may read every input as it was.

:func:`split_early` is the variant for one-level update graphs in which a
state's new value does not depend on any reduction (LAMB's ``m`` and
``v``): the level pass also writes those states, and the final pass reads
them back instead of recomputing them, when that moves fewer bytes.

Shapes and dtypes: as the graph split (``layerwise.lower``); every
partial is a 0-d tensor of the compute dtype.
"""
from __future__ import annotations

from typing import Callable

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from . import ops
from .lower import fresh_name

__all__ = ["Level", "SplitGraph", "EarlySplit", "split_graph", "split_early", "REDUCTIONS",
           "COMBINE", "PARTIALS"]

#: Call targets that reduce over one parameter's elements (layer reductions,
#: and the reductions along rows or columns of LANGUAGE.md section 10).
REDUCTIONS = frozenset({ops.norm, torch.sum, ops.mean, ops.rms, ops.max_abs, ops.dot,
                        ops.row_sum, ops.row_max_abs, ops.col_sum, ops.col_max_abs})

#: How the partials of each reduction combine across shards.
COMBINE = {ops.norm: "sum", torch.sum: "sum", ops.mean: "sum", ops.rms: "sum",
           ops.dot: "sum", ops.max_abs: "max", ops.row_sum: "sum", ops.row_max_abs: "max",
           ops.col_sum: "sum", ops.col_max_abs: "max"}

#: The space of each reduction's partial: one per parameter ("seg"), per row
#: or per column (a reduction along a unit is its own partial).
SPACE = {ops.row_sum: "row", ops.row_max_abs: "row", ops.col_sum: "col", ops.col_max_abs: "col"}

#: The partial a level pass returns in place of each reduction.
_PARTIAL = {ops.norm: ops.sumsq, ops.rms: ops.sumsq, ops.mean: torch.sum}

#: Call targets of the partials a pass returns (``ops.sumsq`` for ``norm`` and
#: ``rms``, ``torch.sum`` for ``sum`` and ``mean``, and ``dot`` and ``max_abs``
#: as they are), with how each combines.
PARTIALS = {ops.sumsq: "sum", torch.sum: "sum", ops.dot: "sum", ops.max_abs: "max"}


@dataclass
class Level:
    """One pass: its graph, the reductions it reads (indices) and those it computes."""
    graph: fx.GraphModule
    reads: list[int]
    computes: list[int]


@dataclass
class SplitGraph:
    """The level passes in order, the final graph, and how each of the
    ``len(combine)`` reductions' partials combine (``"sum"`` or ``"max"``)."""
    levels: list[Level]
    final: fx.GraphModule
    combine: list[str]
    spaces: list[str]

    @property
    def count(self) -> int:
        """Number of layer reductions."""
        return len(self.combine)


def _levels(graph: fx.Graph) -> dict[fx.Node, int]:
    """Level of every reduction node (0 for nodes that depend on none)."""
    level: dict[fx.Node, int] = {}
    for node in graph.nodes:
        below = max((level.get(a, 0) for a in node.all_input_nodes), default=0)
        split = node.op == "call_function" and node.target in REDUCTIONS
        level[node] = below + 1 if split else below
    return {n: lv for n, lv in level.items()
            if n.op == "call_function" and n.target in REDUCTIONS}


def _finish(new: fx.Graph, node: fx.Node, partial: fx.Node, env) -> fx.Node:
    """Nodes in ``new`` turning the placeholder ``partial`` into ``node``'s value."""
    if node.target is ops.norm:
        return new.call_function(torch.sqrt, (partial,))
    if node.target is ops.mean:
        return new.call_function(operator.truediv, (partial, env[node.args[1]]))
    if node.target is ops.rms:
        ratio = new.call_function(operator.truediv, (partial, env[node.args[1]]))
        return new.call_function(torch.sqrt, (ratio,))
    return partial


def _derive(graph: fx.Graph, as_input: list[fx.Node], outputs: list[fx.Node] | None,
            name: str, by_state: dict[fx.Node, fx.Node] | None = None) -> fx.GraphModule:
    """A copy of ``graph`` where the ``as_input`` reductions become placeholders
    r0, r1, ... holding their partials; ``by_state`` nodes are read from the
    (already written) state placeholders they map to. The outputs are the
    partials of ``outputs`` (None: the graph's own outputs)."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    last = None
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = last = new.placeholder(node.name)
            env[node].meta.update(node.meta)
    taken = {n.target for n in new.nodes}
    extra = []
    for base in [f"r{i}" for i in range(len(as_input))]:
        with new.inserting_after(last):
            last = new.placeholder(fresh_name(base, taken))
            extra.append(last)
    for node, partial in zip(as_input, extra):
        env[node] = _finish(new, node, partial, env)
    for value, state in (by_state or {}).items():
        env[value] = env[state]
    wanted = set(outputs or ())
    for node in graph.nodes:
        if node.op == "placeholder" or node in env:
            continue
        if node.op == "output":
            result = node.args[0] if outputs is None else tuple(outputs)
            new.output(fx.node.map_arg(result, lambda n: env[n]))
        elif node in wanted and node.target in _PARTIAL:
            env[node] = new.call_function(_PARTIAL[node.target], (env[node.args[0]],))
        else:
            env[node] = new.node_copy(node, lambda n: env[n])
    new.eliminate_dead_code()
    new.lint()
    return fx.GraphModule(torch.nn.Module(), new, class_name=name)


def split_graph(gm: fx.GraphModule) -> SplitGraph | None:
    """The split passes of the per-parameter graph ``gm``, or None if it has
    no layer reduction to split at."""
    levels = _levels(gm.graph)
    if not levels:
        return None
    order = list(levels)  # graph order: the index of each reduction input r<i>
    depth = max(levels.values())
    base = gm.__class__.__name__
    passes = []
    for k in range(1, depth + 1):
        below = [n for n in order if levels[n] < k]
        here = [n for n in order if levels[n] == k]
        passes.append(Level(_derive(gm.graph, below, here, f"{base}_level{k}"),
                            [order.index(n) for n in below], [order.index(n) for n in here]))
    final = _derive(gm.graph, order, None, f"{base}_final")
    return SplitGraph(passes, final, [COMBINE[n.target] for n in order],
                      [SPACE.get(n.target, "seg") for n in order])


@dataclass
class EarlySplit:
    """A one-level split of an update graph whose level pass also computes the
    new values of the *early* states (see :func:`split_early`).

    ``level``: ``(*inputs) -> (*partials, *new values of the early states)``;
    ``final``: ``(*inputs, *partials) -> (new w, *new values of the late
    states, *watched)``, reading the early states' placeholders as their new
    values. ``early`` and ``late`` are state names in the update graph's
    output order.
    """
    level: fx.GraphModule
    final: fx.GraphModule
    combine: list[str]
    early: list[str]
    late: list[str]
    spaces: list[str]


def _elem_reads(gm: fx.GraphModule, elem_inputs: set[str]) -> int:
    return sum(1 for n in gm.graph.nodes
               if n.op == "placeholder" and n.name in elem_inputs and n.users)


def split_early(gm: fx.GraphModule, elem_inputs: set[str], assigned: list[str],
                placeholder: Callable[[str], str] = str) -> EarlySplit | None:
    """A split of the update graph ``gm`` whose level pass writes the new values
    of the elem states that do not depend on a reduction (and whose old values
    are not read after one), when that moves fewer bytes than
    :func:`split_graph`'s recomputation; None otherwise, or if the graph has
    no or more than one level of layer reductions.

    ``elem_inputs``: names of the parameter-shaped inputs (``w``, ``g``,
    elem states); ``assigned``: the states whose new values are ``gm``'s
    outputs 1, 2, ... in order; ``placeholder``: a state's placeholder name
    (``Lowered.placeholder``; the name itself by default).

    Cost model, in parameter-sized arrays read or written per step. LAMB:
    recomputing reads w, g, m, v twice and writes w, m, v: 11; writing m
    and v in the level pass and reading them back in the final pass (w, m,
    v read, w written): 10. LARS's momentum depends on the trust ratio, so
    it has no early state.
    """
    levels = _levels(gm.graph)
    if not levels or max(levels.values()) != 1:
        return None
    reductions = list(levels)
    later: set[fx.Node] = set()             # reductions and everything after them
    for node in gm.graph.nodes:
        if node in levels or any(a in later for a in node.all_input_nodes):
            later.add(node)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = list(out_node.args[0])
    state_out = dict(zip(assigned, outs[1:1 + len(assigned)]))
    by_name = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    placeholders = {s: by_name[placeholder(s)] for s in assigned if placeholder(s) in by_name}
    used_later = {a for n in later if n.op != "output" for a in n.all_input_nodes}
    early = [s for s, v in state_out.items()
             if s in elem_inputs and v not in later and placeholders[s] not in used_later
             and v.op != "placeholder"]
    if not early:
        return None
    late = [s for s in assigned if s not in early]
    final_outs = [outs[0], *(state_out[s] for s in late), *outs[1 + len(assigned):]]
    by_state = {state_out[s]: placeholders[s] for s in early}
    base = gm.__class__.__name__
    level = _derive(gm.graph, [], reductions + [state_out[s] for s in early], f"{base}_early_level")
    final = _derive(gm.graph, reductions, final_outs, f"{base}_early_final", by_state)
    plain = split_graph(gm)
    elem_assigned = sum(1 for s in assigned if s in elem_inputs)
    recompute = (_elem_reads(plain.levels[0].graph, elem_inputs)
                 + _elem_reads(plain.final, elem_inputs) + 1 + elem_assigned)
    kept = (_elem_reads(level, elem_inputs) + len(early) + _elem_reads(final, elem_inputs) + 1
            + sum(1 for s in late if s in elem_inputs))
    if kept >= recompute:
        return None
    return EarlySplit(level, final, [COMBINE[n.target] for n in reductions], early, late,
                      [SPACE.get(n.target, "seg") for n in reductions])
