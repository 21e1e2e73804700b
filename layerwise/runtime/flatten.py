"""Per-parameter pass graph -> two flat graphs over every parameter of a bucket.

Lowering (``layerwise.lower``) and splitting (``layerwise.split``) give
*per-parameter* graphs: elem values are one parameter's elements (1-D),
everything else is 0-d. The runtime runs each pass over all parameters of
a bucket at once (``layerwise.runtime.layout``): elem values become
``(nchunks, C)`` rows of flat buffers and per-parameter values ``(P,)``
vectors (``layerwise.runtime.flat_ops`` has the conventions).
:func:`flatten` derives, from the same graph:

``vec``  ``(*per-parameter inputs) -> (*bridges, *layer writes, *outputs)``:
         every node whose value is one number per parameter, computed once
         per pass on ``(P,)`` vectors (hoisted constants such as
         ``1 / (1 - beta1^t)`` and trust ratios from reduced partials);
``elem`` ``(*elem inputs, *destination buffers, *bridges, valid, active) ->
         (*partials, *writes)``: the elementwise nodes. A *bridge* is a
         per-parameter value that elementwise arithmetic reads: the runtime
         gathers it to ``(nchunks, 1)`` between the two graphs. Layer
         reductions at the pass's outputs become per-chunk partials with the
         padding masked out; writes into parameter and state buffers keep the
         segments that are not active.

Which nodes are elementwise is found by running the graph once on stand-ins
(elem inputs of shape ``(3,)``, all others 0-d). A node that is not
elementwise never reads an elementwise value except as the ``ref``
argument (dtype and device) of ``layerwise.ops``, which the vec graph
replaces by the ``numel`` vector.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from .. import ops
from ..lower import fresh_name
from ..split import PARTIALS
from . import flat_ops

__all__ = ["Role", "FlatPass", "flatten", "inline_consts"]

#: Call targets whose last argument is ``ref`` (a dtype and device to follow).
_TAKES_REF = frozenset({ops.compare, ops.logical_and, ops.logical_or, ops.logical_not, ops.where,
                        ops.minimum, ops.maximum, ops.clip, ops.fill_like, ops.scalar})

#: Per-chunk partial of each partial target (``layerwise.split.PARTIALS``).
_ROW = {ops.sumsq: flat_ops.row_sumsq, torch.sum: flat_ops.row_sum, ops.dot: flat_ops.row_dot,
        ops.max_abs: flat_ops.row_max_abs}


@dataclass(frozen=True)
class Role:
    """What the runtime does with one output of a per-parameter pass graph.

    ``kind``: ``"partial"`` (a layer reduction's partial, combined per segment
    by ``combine``), ``"write"`` (a new elem value for the buffer named
    ``target``), ``"write_vec"`` (a new value for the layer state ``target``)
    or ``"vec"`` (a per-parameter value returned to the runtime: a watched
    value or a global reduction's share). ``early``: later nodes of the same
    pass read the written buffer instead of the value (the level pass of
    ``layerwise.split.split_early``).
    """
    kind: str
    target: str = ""
    combine: str = "sum"
    early: bool = False


@dataclass
class FlatPass:
    """The two graphs of one pass and how their inputs and outputs line up.

    ``vec_inputs``: names of the vec graph's placeholders (the per-parameter
    graph's non-elem inputs: ``t``, ``numel``, hypers, layer states, globals,
    reduced partials ``r<i>``); ``elem_inputs``: names of the elem inputs the
    elem graph reads (``w``, ``g``, elem states); ``dsts``: names of the
    buffers it writes; ``partials``: how each partial output combines;
    ``vec_writes``: the layer states written from the vec graph's outputs
    after the bridges; ``vec_outputs``: how many per-parameter values follow.
    """
    vec: fx.GraphModule
    elem: fx.GraphModule
    vec_inputs: tuple[str, ...]
    elem_inputs: tuple[str, ...]
    dsts: tuple[str, ...]
    bridges: int
    partials: tuple[str, ...]
    vec_writes: tuple[str, ...]
    vec_outputs: int


def inline_consts(gm: fx.GraphModule, consts: fx.GraphModule,
                  const_names: tuple[str, ...]) -> fx.GraphModule:
    """``gm`` with its hoisted-constant placeholders (``const_names``, in the
    order of ``consts``'s outputs) replaced by the nodes of ``consts``; the
    consts graph's own placeholders are shared by name (``t``, hypers) or
    added (globals)."""
    new = fx.Graph()
    env: dict[str, fx.Node] = {}
    for node in list(gm.graph.nodes) + list(consts.graph.nodes):
        if node.op == "placeholder" and node.name not in const_names and node.name not in env:
            env[node.name] = new.placeholder(node.name)
    cenv: dict[fx.Node, object] = {}
    for node in consts.graph.nodes:
        if node.op == "placeholder":
            cenv[node] = env[node.name]
        elif node.op == "output":
            values = [fx.node.map_arg(v, lambda n: cenv[n]) for v in node.args[0]]
        else:
            cenv[node] = new.node_copy(node, lambda n: cenv[n])
    for name, value in zip(const_names, values):
        env[name] = value
    genv: dict[fx.Node, object] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            genv[node] = env[node.name]
        elif node.op == "output":
            new.output(fx.node.map_arg(node.args[0], lambda n: genv[n]))
        else:
            genv[node] = new.node_copy(node, lambda n: genv[n])
    new.eliminate_dead_code()
    new.lint()
    return fx.GraphModule(torch.nn.Module(), new, class_name=gm.__class__.__name__)


def _elem_nodes(gm: fx.GraphModule, elem_inputs: set[str]) -> set[fx.Node]:
    """Nodes of ``gm`` whose value is parameter-shaped."""
    args = [torch.ones(3, dtype=torch.float64) if n.name in elem_inputs
            else torch.ones((), dtype=torch.float64)
            for n in gm.graph.nodes if n.op == "placeholder"]
    ShapeProp(gm).propagate(*args)
    return {n for n in gm.graph.nodes if n.op != "output"
            and tuple(getattr(n.meta.get("tensor_meta"), "shape", ())) == (3,)}


def flatten(gm: fx.GraphModule, roles: list[Role], elem_inputs: set[str],
            chunk: int) -> FlatPass:
    """The vec and elem graphs of the per-parameter pass graph ``gm``.

    ``roles``: one per output of ``gm``; ``elem_inputs``: the names of its
    parameter-shaped placeholders; ``chunk``: the chunk length C.

    Raises:
        AssertionError: if the graph breaks the invariants of lowering and
            splitting (a layer reduction that is not an output, a non-elem
            node reading an elem value other than as ``ref``).
    """
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = list(out_node.args[0])
    assert len(outs) == len(roles), (len(outs), len(roles))
    elem = _elem_nodes(gm, elem_inputs)
    partial_nodes = {v for v, r in zip(outs, roles) if r.kind == "partial"}
    for v in partial_nodes:
        assert v.target in PARTIALS and v.args[0] in elem, v.format_node()
    needed: set[fx.Node] = set()
    stack = [v for v in outs if isinstance(v, fx.Node)]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    on_elem_side = elem | partial_nodes
    order = [n for n in gm.graph.nodes if n in needed]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    numel = next(n for n in placeholders if n.name == "numel")
    taken = {n.name for n in placeholders}

    # ---- vec graph: everything that is one number per parameter
    vg = fx.Graph()
    venv: dict[fx.Node, fx.Node] = {}
    vec_inputs = [n for n in placeholders if n not in elem
                  and (n in needed or n is numel)]
    for n in vec_inputs:
        venv[n] = vg.placeholder(n.name)
    for n in order:
        if n.op != "call_function" or n in on_elem_side:
            assert n.op != "call_function" or n in partial_nodes or n in elem
            continue
        assert n.target not in PARTIALS or not any(a in elem for a in n.args[:1]), n.format_node()

        def vec_arg(a, node=n):
            if a in elem:
                assert node.target in _TAKES_REF and a is node.args[-1], node.format_node()
                return venv[numel]
            return venv[a]
        venv[n] = vg.node_copy(n, vec_arg)
    bridges: list[fx.Node] = []
    for n in order:
        if n in on_elem_side and n.op == "call_function":
            for a in n.all_input_nodes:
                if a not in elem and a not in bridges:
                    bridges.append(a)

    # ---- elem graph: the elementwise nodes, partials and writes
    eg = fx.Graph()
    eenv: dict[fx.Node, fx.Node] = {}
    elem_ph = [n for n in placeholders if n in elem and n in needed]
    for n in elem_ph:
        eenv[n] = eg.placeholder(n.name)
    writes = [(v, r) for v, r in zip(outs, roles) if r.kind == "write"]
    dsts = list(dict.fromkeys(r.target for _, r in writes))
    dst_nodes = {d: eg.placeholder(fresh_name(f"dst_{d}", taken)) for d in dsts}
    bridge_ph = [eg.placeholder(fresh_name(f"b{i}", taken)) for i in range(len(bridges))]
    eenv.update(zip(bridges, bridge_ph))
    valid = eg.placeholder(fresh_name("valid", taken))
    active = eg.placeholder(fresh_name("active", taken))
    mask = None
    early = {v: r.target for v, r in writes if r.early}
    done_early: dict[fx.Node, fx.Node] = {}
    for n in order:
        if n.op != "call_function" or n not in on_elem_side:
            continue
        if n in partial_nodes:
            if mask is None:
                mask = eg.call_function(flat_ops.chunk_mask, (valid, chunk))
            args = tuple(eenv[a] if isinstance(a, fx.Node) else a for a in n.args)
            eenv[n] = eg.call_function(_ROW[n.target], (*args, mask))
            continue
        eenv[n] = eg.node_copy(n, lambda a: eenv[a])
        if n in early:
            done_early[n] = eenv[n] = eg.call_function(
                flat_ops.write, (dst_nodes[early[n]], eenv[n], active))
    results = [eenv[v] for v, r in zip(outs, roles) if r.kind == "partial"]
    for v, r in writes:
        if v in done_early:
            results.append(done_early[v])
        else:
            value = eenv[v] if isinstance(v, fx.Node) else v
            results.append(eg.call_function(flat_ops.write, (dst_nodes[r.target], value, active)))
    eg.output(tuple(results))
    eg.lint()

    vec_values = [v for v, r in zip(outs, roles) if r.kind == "write_vec"] + \
                 [v for v, r in zip(outs, roles) if r.kind == "vec"]
    vg.output(tuple([venv[b] for b in bridges]
                    + [venv[v] if isinstance(v, fx.Node) else v for v in vec_values]))
    vg.lint()
    name = gm.__class__.__name__
    return FlatPass(
        vec=fx.GraphModule(torch.nn.Module(), vg, class_name=f"{name}_vec"),
        elem=fx.GraphModule(torch.nn.Module(), eg, class_name=f"{name}_elem"),
        vec_inputs=tuple(n.name for n in vec_inputs),
        elem_inputs=tuple(n.name for n in elem_ph),
        dsts=tuple(dsts),
        bridges=len(bridges),
        partials=tuple(r.combine for r in roles if r.kind == "partial"),
        vec_writes=tuple(r.target for r in roles if r.kind == "write_vec"),
        vec_outputs=sum(1 for r in roles if r.kind == "vec"))
