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
(elem inputs of shape ``(2, 3)``, all others 0-d). A node that is not
elementwise never reads an elementwise value except as the ``ref``
argument (dtype and device) of ``layerwise.ops``, which the vec graph
replaces by the ``numel`` vector.

Units (LANGUAGE.md section 10), on the unit layout of
``layerwise.runtime.layout`` (a chunk is one row of a parameter; no
``chunk`` constant: the elem graph reads the chunk length from its inputs):
the stand-ins of row inputs are ``(2, 1)`` and of col inputs ``(1, 3)``, so
every node's *space* shows in its shape. Row values are computed in the
elem graph, one per chunk, ``(nchunks, 1)``; col values in the vec graph,
on ``(P, C)`` tables (per-segment values enter them as ``(P, 1)``), and
reach the elem graph as bridges gathered per chunk, ``(nchunks, C)``. A
reduction along rows is a per-chunk partial; along columns, a partial of
the elem value's shape that the runtime reduces over each segment's
chunks; a layer reduction of a row value a per-chunk partial of the value.
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

#: Reductions along a unit: (space of their partial, how it combines).
_ALONG = {ops.row_sum: ("row", "sum"), ops.row_max_abs: ("row", "max"),
          ops.col_sum: ("col", "sum"), ops.col_max_abs: ("col", "max")}

#: Layer reductions of a row value: the per-chunk partial of each.
_VALUE = {ops.sumsq: "sumsq", torch.sum: "sum", ops.max_abs: "max_abs",
          ops.dot: "dot"}

#: Vec-graph versions of the ops on col values.
_COL_OPS = {ops.col_total: flat_ops.col_total, ops.col_max: flat_ops.col_max,
            ops.col_fill: flat_ops.col_fill}

#: Stand-in shape of each space, and the space of each stand-in shape.
_STAND_IN = {"elem": (2, 3), "row": (2, 1), "col": (1, 3)}
_SPACE = {v: k for k, v in _STAND_IN.items()}


@dataclass(frozen=True)
class Role:
    """What the runtime does with one output of a per-parameter pass graph.

    ``kind``: ``"partial"`` (a layer reduction's partial, combined per segment
    by ``combine``), ``"write"`` (a new elem or row value for the buffer
    named ``target``), ``"write_vec"`` (a new value for the layer or col
    state ``target``) or ``"vec"`` (a per-parameter value returned to the
    runtime: a watched value or a global reduction's share). ``early``:
    later nodes of the same pass read the written buffer instead of the
    value (the level pass of ``layerwise.split.split_early``).
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
    after the bridges; ``vec_outputs``: how many per-parameter values follow;
    ``bridge_spaces``: ``"layer"`` (gathered to ``(nchunks, 1)``) or
    ``"col"`` (a ``(P, C)`` table gathered to ``(nchunks, C)``) per bridge;
    ``partial_spaces``: per partial, ``"seg"`` (one per chunk, added up per
    segment), ``"row"`` (one per chunk, each a row's value) or ``"col"``
    (``(nchunks, C)``, added up per segment into a ``(P, C)`` table);
    ``extra``: names of per-chunk inputs of the elem graph after ``act``
    (the rounding of ``w`` into a 16-bit parameter,
    ``layerwise.runtime.precision.rounded_pass``; none from :func:`flatten`).
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
    bridge_spaces: tuple[str, ...] = ()
    partial_spaces: tuple[str, ...] = ()
    #: the elem graph's inputs after ``act``, per chunk (``layerwise.runtime.precision``)
    extra: tuple[str, ...] = ()


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


def _spaces(gm: fx.GraphModule, inputs: dict[str, str]) -> dict[fx.Node, str]:
    """The space (``"elem"``, ``"row"``, ``"col"``; others absent) of every
    node of ``gm``, found by running it on stand-ins."""
    args = [torch.ones(_STAND_IN[inputs[n.name]], dtype=torch.float64) if n.name in inputs
            else torch.ones((), dtype=torch.float64)
            for n in gm.graph.nodes if n.op == "placeholder"]
    ShapeProp(gm).propagate(*args)
    out = {}
    for n in gm.graph.nodes:
        shape = tuple(getattr(n.meta.get("tensor_meta"), "shape", ()))
        if n.op != "output" and shape in _SPACE:
            out[n] = _SPACE[shape]
    return out


def flatten(gm: fx.GraphModule, roles: list[Role], elem_inputs: set[str] | dict[str, str],
            chunk: int | None) -> FlatPass:
    """The vec and elem graphs of the per-parameter pass graph ``gm``.

    ``roles``: one per output of ``gm``; ``elem_inputs``: the names of its
    parameter-shaped placeholders (a set), or for a program with units
    the space (``"elem"``, ``"row"``, ``"col"``) of each of its placeholders
    that is not one number per parameter; ``chunk``: the chunk length C
    (None on the unit layout).

    Raises:
        AssertionError: if the graph breaks the invariants of lowering and
            splitting (a layer reduction that is not an output, a non-elem
            node reading an elem value other than as ``ref``).
    """
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = list(out_node.args[0])
    assert len(outs) == len(roles), (len(outs), len(roles))
    inputs = elem_inputs if isinstance(elem_inputs, dict) else {n: "elem" for n in elem_inputs}
    space = _spaces(gm, inputs)
    # the elem graph's nodes: elem and row values; the vec graph's: the rest
    elem = {n for n, sp in space.items() if sp in ("elem", "row")}
    cols = {n for n, sp in space.items() if sp == "col"}
    partial_nodes = {v for v, r in zip(outs, roles) if r.kind == "partial"}
    for v in partial_nodes:
        if v.target is ops.dot and v.args[0] not in elem and v.args[1] in elem:
            v.args = (v.args[1], v.args[0])    # dot(2, g): the per-element operand first
        assert v.target in PARTIALS or v.target in _ALONG, v.format_node()
        assert v.args[0] in elem, v.format_node()
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
    # the shape of the col tables, for filling one (a col state's initial value)
    colref = vg.placeholder(fresh_name("colref", taken)) \
        if any(n.target is ops.col_fill for n in order) else None
    for n in order:
        if n.op != "call_function" or n in on_elem_side:
            assert n.op != "call_function" or n in partial_nodes or n in elem
            continue
        assert n.target not in PARTIALS or not any(a in elem for a in n.args[:1]), n.format_node()

        if n.target in _COL_OPS:
            if n.target is ops.col_fill:
                venv[n] = vg.call_function(flat_ops.col_fill, (_arg(venv, n.args[0]), colref))
            else:
                venv[n] = vg.call_function(_COL_OPS[n.target],
                                           tuple(_arg(venv, a) for a in n.args))
            continue
        in_cols = n in cols

        def vec_arg(a, node=n, in_cols=in_cols):
            if a in elem:
                assert node.target in _TAKES_REF and a is node.args[-1], node.format_node()
                return venv[numel]
            if in_cols and a not in cols:
                return vg.call_function(flat_ops.as_col, (venv[a],))
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
            args = tuple(eenv[a] if isinstance(a, fx.Node) else a for a in n.args)
            if space[n.args[0]] == "row":
                # a layer reduction of a row value: the value is the chunk's partial
                assert n.target in _VALUE, n.format_node()
                eenv[n] = eg.call_function(flat_ops.value_partial,
                                           (args[0], _VALUE[n.target], *args[1:]))
                continue
            if mask is None:
                mask = eg.call_function(flat_ops.chunk_mask, (valid, chunk)) if chunk \
                    else eg.call_function(flat_ops.chunk_mask_like, (valid, args[0]))
            if n.target in _ALONG:
                where, how = _ALONG[n.target]
                fn = flat_ops.row_partial if where == "row" else flat_ops.col_partial
                eenv[n] = eg.call_function(fn, (args[0], mask, how))
            else:
                eenv[n] = eg.call_function(_ROW[n.target], (*args, mask))
            continue
        eenv[n] = eg.node_copy(n, lambda a: eenv[a])
        if n in early:
            done_early[n] = eenv[n] = eg.call_function(
                flat_ops.write, (dst_nodes[early[n]], eenv[n], active))
    results = [eenv[v] for v, r in zip(outs, roles) if r.kind == "partial"]
    partial_spaces = [_ALONG[v.target][0] if v.target in _ALONG else "seg"
                      for v, r in zip(outs, roles) if r.kind == "partial"]
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
        vec_inputs=tuple(n.name for n in vec_inputs) + ((colref.name,) if colref else ()),
        elem_inputs=tuple(n.name for n in elem_ph),
        dsts=tuple(dsts),
        bridges=len(bridges),
        partials=tuple(r.combine for r in roles if r.kind == "partial"),
        vec_writes=tuple(r.target for r in roles if r.kind == "write_vec"),
        vec_outputs=sum(1 for r in roles if r.kind == "vec"),
        bridge_spaces=tuple("col" if b in cols else "layer" for b in bridges),
        partial_spaces=tuple(partial_spaces))


def _arg(env: dict, a):
    return env[a] if isinstance(a, fx.Node) else a
