"""Update graph -> passes split at its layer reductions (for large parameters).

The fused ``update`` graph (``layerwise.lower``) is one kernel after
compilation, but inductor keeps every elem value that a layer reduction
reads *and* the update needs later (``u`` in LAMB) in a parameter-sized
temporary that it allocates on every call. For large parameters this costs
more than reading the inputs again (docs/design-runtime.md, "Performance
status"). :func:`split_update` derives, by graph surgery on the same graph:

``level k`` (k = 1..D) ``(w, g, t, numel, *hypers, *states, *consts,
           *values of the reductions of levels < k) -> (*reductions of level k)``
``final``  ``(w, g, t, numel, *hypers, *states, *consts, *all reductions)
           -> the update graph's outputs``

A reduction's level is 1 + the highest level among the reductions its
argument depends on. Each pass recomputes the elementwise values it needs
from the inputs, so no elem temporary survives between passes; nothing is
written before the final pass, so a pass may read every input as it was.
The arithmetic is the same nodes as the fused graph, copied.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from . import ops

__all__ = ["Level", "SplitUpdate", "split_update", "REDUCTIONS"]

#: Call targets that reduce over one parameter's elements (layer reductions).
REDUCTIONS = frozenset({ops.norm, torch.sum, ops.mean, ops.rms, ops.max_abs, ops.dot})


@dataclass
class Level:
    """One pass: its graph, the reductions it reads (indices) and those it computes."""
    graph: fx.GraphModule
    reads: list[int]
    computes: list[int]


@dataclass
class SplitUpdate:
    """The level passes in order and the final graph; ``count`` reductions in all."""
    levels: list[Level]
    final: fx.GraphModule
    count: int


def _levels(graph: fx.Graph) -> dict[fx.Node, int]:
    """Level of every reduction node (0 for nodes that depend on none)."""
    level: dict[fx.Node, int] = {}
    for node in graph.nodes:
        below = max((level.get(a, 0) for a in node.all_input_nodes), default=0)
        level[node] = below + 1 if node.op == "call_function" and node.target in REDUCTIONS \
            else below
    return {n: lv for n, lv in level.items()
            if n.op == "call_function" and n.target in REDUCTIONS}


def _derive(graph: fx.Graph, as_input: list[fx.Node], outputs: list[fx.Node] | None,
            name: str) -> fx.GraphModule:
    """A copy of ``graph`` where ``as_input`` nodes become placeholders r0, r1, ...
    (in that order) and the outputs are ``outputs`` (None: the original ones)."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    last = None
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = last = new.placeholder(node.name)
            env[node].meta.update(node.meta)
    for i, node in enumerate(as_input):
        with new.inserting_after(last):
            env[node] = last = new.placeholder(f"r{i}")
    for node in graph.nodes:
        if node.op == "placeholder" or node in env:
            continue
        if node.op == "output":
            result = node.args[0] if outputs is None else tuple(outputs)
            new.output(fx.node.map_arg(result, lambda n: env[n]))
        else:
            env[node] = new.node_copy(node, lambda n: env[n])
    new.eliminate_dead_code()
    new.lint()
    return fx.GraphModule(torch.nn.Module(), new, class_name=name)


def split_update(update: fx.GraphModule) -> SplitUpdate | None:
    """The split passes of ``update``, or None if it has no layer reduction."""
    levels = _levels(update.graph)
    if not levels:
        return None
    order = list(levels)  # graph order: the index of each reduction input r<i>
    depth = max(levels.values())
    passes = []
    for k in range(1, depth + 1):
        below = [n for n in order if levels[n] < k]
        here = [n for n in order if levels[n] == k]
        gm = _derive(update.graph, below, here, f"{update.__class__.__name__}_level{k}")
        passes.append(Level(gm, [order.index(n) for n in below],
                            [order.index(n) for n in here]))
    final = _derive(update.graph, order, None, f"{update.__class__.__name__}_final")
    return SplitUpdate(passes, final, len(order))
