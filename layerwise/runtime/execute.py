"""Run one flat pass over a bucket: compiled (one call) or eagerly (in blocks).

Both paths run the same two graphs of a :class:`~.flatten.FlatPass` through
the same function (:func:`pass_function`): the vec graph on ``(P,)``
vectors, a gather of its bridges to ``(nchunks, 1)``, then the elem graph
on the ``(nchunks, C)`` buffers.

* Compiled: the function goes through ``torch.compile`` once per program
  and pass (its own code object, so programs never share dynamo's
  recompile budget) with ``fullgraph=True`` and static shapes except the
  numbers of chunks and segments, which are marked dynamic on every call:
  one graph serves every model, and the chunk length C stays a constant
  that the generated loops are specialised to. Inductor fuses the writes
  into the loop that computes them; an early write read back by a
  reduction (``layerwise.split.split_early``) shares its loop.
* Eager: the elem graph runs on blocks of :data:`EAGER_ELEMENTS` elements
  on the CPU (its temporaries stay in cache and are reused by the allocator
  instead of being mapped afresh), on the whole buffers elsewhere, with
  the cheaper masks of ``flat_ops.PartialRows`` and, when every segment
  is active, plain copies for the writes.

A call returns the pass's partials, ``(nchunks,)`` tensors of the compute
dtype (``(nchunks, C)`` for a reduction along columns), and its
per-parameter outputs.

On the unit layout (LANGUAGE.md section 10) the chunk length C differs
between buckets, so it is dynamic in the compiled graphs too; col values
are ``(P, C)`` tables whose bridges are gathered per chunk (per block on
the eager path).
"""
from __future__ import annotations

import types
from typing import Callable, Sequence

import torch

from . import flat_ops
from .flatten import FlatPass

__all__ = ["pass_function", "EAGER_ELEMENTS", "eager_block"]

#: Elements per block of the eager path on the CPU: 1 MiB per float32 array,
#: so a block's temporaries stay in the caches (L2 1 MiB, L3 32 MiB here).
EAGER_ELEMENTS = 1 << 18


def eager_block(chunk: int) -> int:
    """Chunks per block of the eager path on the CPU."""
    return max(1, EAGER_ELEMENTS // chunk)


def _body(flat: FlatPass, blocked: bool) -> Callable:
    vec_graph, elem_graph = flat.vec, flat.elem
    nb, nw, npart = flat.bridges, len(flat.vec_writes), len(flat.partials)
    spaces = flat.bridge_spaces or ("layer",) * nb
    layer_b = [i for i, sp in enumerate(spaces) if sp == "layer"]
    col_b = [i for i, sp in enumerate(spaces) if sp == "col"]
    ref = flat.vec_inputs.index("numel")
    has_elem = bool(next(n for n in elem_graph.graph.nodes if n.op == "output").args[0])

    def run_pass(elem_in: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor],
                 vec_in: Sequence[torch.Tensor], vec_dsts: Sequence[torch.Tensor],
                 seg: torch.Tensor, valid: torch.Tensor, active: torch.Tensor,
                 act: torch.Tensor, extra: Sequence[torch.Tensor] = ()):
        dtype = vec_in[ref].dtype
        vals = vec_graph(*vec_in)
        bridges = list(vals[:nb])
        if layer_b:
            for i, v in zip(layer_b, flat_ops.gather([bridges[i] for i in layer_b], seg)):
                bridges[i] = v
        for dst, v in zip(vec_dsts, vals[nb:nb + nw]):
            flat_ops.write_vec(dst, v, active)
        if not has_elem:
            return [], list(vals[nb + nw:])
        if not blocked or seg.device.type != "cpu":
            for i in col_b:
                bridges[i] = flat_ops.col_gather(bridges[i], seg)
            outs = elem_graph(*[x.to(dtype) for x in elem_in], *dsts, *bridges, valid, act,
                              *extra)
            return list(outs[:npart]), list(vals[nb + nw:])
        parts = []
        cols = set(col_b)
        for rows in valid:
            s, e = rows.start, rows.stop
            block = [flat_ops.col_gather(b, seg[s:e]) if i in cols
                     else b[s:e] if b.dim() else b for i, b in enumerate(bridges)]
            outs = elem_graph(*[x[s:e].to(dtype) for x in elem_in], *[x[s:e] for x in dsts],
                              *block, rows, None if act is None else act[s:e],
                              *[x[s:e] for x in extra])
            parts.append(outs[:npart])
        partials = [p[0] if len(parts) == 1 else torch.cat(p) for p in zip(*parts)] \
            if npart else []
        return partials, list(vals[nb + nw:])

    return run_pass


def _own_code(fn: Callable, name: str) -> Callable:
    """A copy of ``fn`` with a new code object, so dynamo caches it separately."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _mark(tensors: Sequence[torch.Tensor], units: bool = False) -> None:
    for x in tensors:
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            torch._dynamo.mark_dynamic(x, 0)
            if units and x.dim() == 2 and x.shape[1] > 1:
                torch._dynamo.mark_dynamic(x, 1)


def pass_function(flat: FlatPass, compile: bool, name: str, units: bool = False) -> Callable:
    """The callable running ``flat``: ``fn(elem_in, dsts, vec_in, vec_dsts, seg,
    valid, active, act, extra=()) -> (partials, per-parameter outputs)``.

    ``elem_in``: the ``(nchunks, C)`` buffers named by ``flat.elem_inputs``
    (any float dtype; converted to the compute dtype, that of ``vec_in``);
    ``dsts``: the buffers named by ``flat.dsts``; ``vec_in``: ``(P,)`` vectors
    (or 0-d globals) named by ``flat.vec_inputs``; ``vec_dsts``: the layer
    state vectors named by ``flat.vec_writes``; ``seg`` ``(nchunks,)`` int64;
    ``valid`` ``(nchunks, 1)`` int64 (eager on the CPU: the
    ``flat_ops.PartialRows`` of each block of :func:`eager_block` chunks,
    from ``Bucket.partial_rows``); ``active`` ``(P,)`` bool and ``act`` the
    same per chunk, ``(nchunks, 1)`` (eager: None when every segment is
    active); ``extra``: the per-chunk tensors named by ``flat.extra``
    (``layerwise.runtime.precision.rounded_pass``), ``(nchunks, ...)``.
    """
    if not compile:
        return _body(flat, True)
    compiled = torch.compile(_own_code(_body(flat, False), name), dynamic=False,
                             fullgraph=True)

    def run_compiled(elem_in, dsts, vec_in, vec_dsts, seg, valid, active, act, extra=()):
        _mark(elem_in, units)
        _mark(dsts, units)
        _mark(vec_in, units)
        _mark(vec_dsts, units)
        _mark((seg, valid, active, act))
        _mark(extra, units)
        return compiled(elem_in, dsts, vec_in, vec_dsts, seg, valid, active, act, extra)

    return run_compiled
