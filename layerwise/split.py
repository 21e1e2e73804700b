"""Per-parameter graph -> passes split at its layer reductions.

Two runtime paths need a per-parameter graph (``layerwise.lower``) cut at
its layer reductions (``norm``, ``sum``, ``mean``, ``rms``, ``dot``,
``max_abs``):

* large parameters, compiled: the fused ``update`` graph is one kernel,
  but inductor keeps every elem value that a layer reduction reads *and*
  the update needs later (``u`` in LAMB) in a parameter-sized temporary
  allocated on every call. Recomputing it costs less
  (docs/design-runtime.md, "Performance status");
* sharded parameters (FSDP2, ``layerwise.distributed``): a rank holds one
  shard, so a reduction must be combined across ranks before anything
  that depends on it runs.

:func:`split_graph` derives, by graph surgery on the same graph:

``level k`` (k = 1..D) ``(*inputs, *partials of the reductions of levels
           < k) -> (*partials of the reductions of level k)``
``final``  ``(*inputs, *partials of all reductions) -> the graph's outputs``

A reduction's level is 1 + the highest level among the reductions its
argument depends on. A level pass returns each reduction as a *partial*
that is combined across shards by a sum or a max (:data:`COMBINE`): the
sum of squares for ``norm`` and ``rms``, the sum for ``sum``, ``mean`` and
``dot``, the largest absolute value for ``max_abs``. The passes that take
partials finish them inside the graph (``sqrt``, ``/ numel``; ``numel``
is the whole parameter's element count), so one parameter's passes, run
one after the other with nothing combined in between, compute exactly the
reductions of the fused graph. Each pass recomputes the elementwise values
it needs from the inputs, so no elem temporary survives between passes;
nothing is written before the final pass, so a pass may read every input
as it was. The arithmetic is the same nodes as the fused graph, copied.

Shapes and dtypes: as the graph split (``layerwise.lower``); every
partial is a 0-d tensor of the compute dtype.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from . import ops
from .lower import fresh_name

__all__ = ["Level", "SplitGraph", "split_graph", "REDUCTIONS", "COMBINE"]

#: Call targets that reduce over one parameter's elements (layer reductions).
REDUCTIONS = frozenset({ops.norm, torch.sum, ops.mean, ops.rms, ops.max_abs, ops.dot})

#: How the partials of each reduction combine across shards.
COMBINE = {ops.norm: "sum", torch.sum: "sum", ops.mean: "sum", ops.rms: "sum",
           ops.dot: "sum", ops.max_abs: "max"}

#: The partial a level pass returns in place of each reduction.
_PARTIAL = {ops.norm: ops.sumsq, ops.rms: ops.sumsq, ops.mean: torch.sum}


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

    @property
    def count(self) -> int:
        """Number of layer reductions."""
        return len(self.combine)


def _levels(graph: fx.Graph, skip: set[fx.Node]) -> dict[fx.Node, int]:
    """Level of every reduction node not in ``skip`` (0 for nodes that depend on none)."""
    level: dict[fx.Node, int] = {}
    for node in graph.nodes:
        below = max((level.get(a, 0) for a in node.all_input_nodes), default=0)
        split = node.op == "call_function" and node.target in REDUCTIONS and node not in skip
        level[node] = below + 1 if split else below
    return {n: lv for n, lv in level.items()
            if n.op == "call_function" and n.target in REDUCTIONS and n not in skip}


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
            name: str, scratch: list[fx.Node] = (),
            by_state: dict[fx.Node, fx.Node] | None = None) -> fx.GraphModule:
    """A copy of ``graph`` where ``scratch`` nodes become placeholders s0, s1, ...
    (their values, kept by an earlier pass), then ``as_input`` reductions
    placeholders r0, r1, ... holding their partials; ``by_state`` nodes are
    read from the (already written) state placeholders they map to. The
    outputs are the partials of ``outputs`` (None: the graph's own outputs)."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    last = None
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = last = new.placeholder(node.name)
            env[node].meta.update(node.meta)
    taken = {n.target for n in new.nodes}
    extra = []
    for base in [f"s{i}" for i in range(len(scratch))] + [f"r{i}" for i in range(len(as_input))]:
        with new.inserting_after(last):
            last = new.placeholder(fresh_name(base, taken))
            extra.append(last)
    env.update(zip(scratch, extra))
    for node, partial in zip(as_input, extra[len(scratch):]):
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


def split_graph(gm: fx.GraphModule, skip_outputs: bool = False) -> SplitGraph | None:
    """The split passes of the per-parameter graph ``gm``, or None if it has
    no layer reduction to split at.

    ``skip_outputs``: reductions that are themselves outputs of ``gm`` are
    not split points (the ``reduce`` graph's outputs are partials of global
    reductions, which the runtime combines).
    """
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    skip = set(out_node.all_input_nodes) if skip_outputs else set()
    levels = _levels(gm.graph, skip)
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
    return SplitGraph(passes, final, [COMBINE[n.target] for n in order])


@dataclass
class Materialized:
    """A one-level split of an update graph that keeps elem values instead of
    recomputing them (see :func:`materialize`).

    ``level``: ``(*inputs) -> (*partials, *new values of the early states,
    *scratch values)``; ``final``: ``(*inputs, *scratch values, *partials)
    -> (new w, *new values of the late states, *watched)``. ``early`` and
    ``late`` are state names in the update graph's output order;
    ``scratch`` is the number of parameter-sized scratch values.
    """
    level: fx.GraphModule
    final: fx.GraphModule
    combine: list[str]
    early: list[str]
    late: list[str]
    scratch: int


def _elem_nodes(gm: fx.GraphModule, elem_inputs: set[str]) -> set[fx.Node]:
    """Nodes of ``gm`` whose value is parameter-shaped (found by running the
    graph once on 3-element stand-ins; every other input is 0-d)."""
    from torch.fx.passes.shape_prop import ShapeProp
    args = [torch.ones(3, dtype=torch.float64) if n.name in elem_inputs
            else torch.ones((), dtype=torch.float64)
            for n in gm.graph.nodes if n.op == "placeholder"]
    ShapeProp(gm).propagate(*args)
    return {n for n in gm.graph.nodes if n.op != "output"
            and tuple(getattr(n.meta.get("tensor_meta"), "shape", ())) == (3,)}


def _elem_reads(gm: fx.GraphModule, elem_inputs: set[str]) -> int:
    return sum(1 for n in gm.graph.nodes
               if n.op == "placeholder" and n.name in elem_inputs and n.users)


def materialize(gm: fx.GraphModule, elem_inputs: set[str],
                assigned: list[str]) -> Materialized | None:
    """A split of the update graph ``gm`` whose level pass writes the elem
    values the final pass needs (into scratch buffers, or straight into the
    states they are the new values of), when that moves fewer bytes than
    :func:`split_graph`'s recomputation; None otherwise, or if the graph has
    no or more than one level of layer reductions.

    ``elem_inputs``: names of the parameter-shaped placeholders (``w``,
    ``g``, elem states); ``assigned``: the states whose new values are
    ``gm``'s outputs 1, 2, ... in order.

    Cost model, in parameter-sized arrays read or written per step (LAMB:
    recomputing reads w, g, m, v twice and writes w, m, v: 11; keeping
    ``u`` writes m, v and ``u`` in the level pass and then reads w and
    ``u``: 10. LARS keeps recomputing: 7 against 8).
    """
    levels = _levels(gm.graph, set())
    if not levels or max(levels.values()) != 1:
        return None
    elem = _elem_nodes(gm, elem_inputs)
    reductions = list(levels)
    later: set[fx.Node] = set()             # reductions and everything after them
    for node in gm.graph.nodes:
        if node in levels or any(a in later for a in node.all_input_nodes):
            later.add(node)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = list(out_node.args[0])
    state_out = dict(zip(assigned, outs[1:1 + len(assigned)]))
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    used_later = {a for n in later if n.op != "output" for a in n.all_input_nodes}
    early = [s for s, v in state_out.items()
             if s in elem_inputs and v not in later and placeholders[s] not in used_later
             and v.op != "placeholder"]
    late = [s for s in assigned if s not in early]
    final_outs = [outs[0], *(state_out[s] for s in late), *outs[1 + len(assigned):]]
    frontier = [n for n in gm.graph.nodes if n in elem and n not in later
                and n.op != "placeholder" and (n in used_later or n in final_outs)]
    by_state = {state_out[s]: placeholders[s] for s in early}
    scratch = [n for n in frontier if n not in by_state]

    level = _derive(gm.graph, [], reductions + [state_out[s] for s in early] + scratch,
                    f"{gm.__class__.__name__}_keep_level")
    final = _derive(gm.graph, reductions, final_outs, f"{gm.__class__.__name__}_keep_final",
                    scratch, by_state)
    plain = split_graph(gm)
    recompute = (_elem_reads(plain.levels[0].graph, elem_inputs)
                 + _elem_reads(plain.final, elem_inputs) + 1
                 + sum(1 for s in assigned if s in elem_inputs))
    kept = (_elem_reads(level, elem_inputs) + len(early) + 2 * len(scratch)
            + _elem_reads(final, elem_inputs) + 1 + sum(1 for s in late if s in elem_inputs))
    if kept >= recompute:
        return None
    return Materialized(level, final, [COMBINE[n.target] for n in reductions], early, late,
                        len(scratch))

