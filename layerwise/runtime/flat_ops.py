"""The operations that flat graphs add to the language's ``layerwise.ops``.

A flat graph (``layerwise.runtime.flatten``) runs one pass of a program over
every parameter of a bucket at once. Its arrays:

* elem values: ``(nchunks, C)`` tensors, the rows ("chunks") of the
  bucket's flat buffers (``layerwise.runtime.layout``); a chunk belongs to
  one parameter, whose last chunk may end in padding;
* per-parameter values (layer, const): ``(P,)`` vectors, one entry per
  parameter ("segment"); global values: 0-d tensors;
* ``seg``: ``(nchunks,)`` int64, the segment of each chunk; ``valid``:
  ``(nchunks, 1)`` int64, how many leading elements of each chunk are the
  parameter's (the rest is padding).

A per-parameter value enters elementwise arithmetic through :func:`gather`
(``(P,) -> (nchunks, 1)``, broadcast along the chunk). A layer reduction
becomes a per-chunk partial (:func:`row_sum` and its siblings, padding
masked out) that the runtime adds up per segment. Writes go through
:func:`write`, which leaves the segments that are not active this step (no
gradient) as they were.

The eager path (``layerwise.runtime.execute``) runs the same graphs with two
cheaper arguments, because eager ``torch.where`` over a block costs about
60 times a multiplication on the CPU: ``valid`` may be a
:class:`PartialRows` (only the rows that end in padding are masked, the
others are summed as they are) and ``active`` may be None (every segment
is active: a plain copy).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PartialRows", "per_chunk", "gather", "chunk_mask", "row_sum", "row_sumsq", "row_dot",
           "row_max_abs", "write", "write_vec"]


@dataclass
class PartialRows:
    """A block of chunks (rows ``start`` to ``stop``), its rows that end in
    padding (``index``, ``(k,)`` int64, relative to ``start``) and their
    element masks (``mask``, ``(k, C)`` bool): what the eager path passes as
    ``valid``."""
    start: int
    stop: int
    index: torch.Tensor
    mask: torch.Tensor

    @staticmethod
    def of(valid: torch.Tensor, start: int, stop: int, chunk: int) -> "PartialRows":
        """From the ``valid`` counts (``(nchunks, 1)`` int64) of rows ``start:stop``."""
        block = valid[start:stop]
        index = torch.nonzero(block[:, 0] != chunk).flatten()
        return PartialRows(start, stop, index,
                           torch.arange(chunk, device=valid.device) < block[index])


@torch.library.custom_op("layerwise::per_chunk", mutates_args=())
def per_chunk(values: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """``(k, P)`` per-segment values -> ``(k, nchunks)``: each chunk's segment's.

    An operator of its own, opaque to inductor: its input is then computed
    once per segment into a buffer, and the elementwise kernels read one
    value per chunk from its output. (Gathering inside the kernel let
    inductor recompute every per-segment expression, ``beta1^t`` included,
    for every 16 elements; measured 2-3 x slower on BERT-base.)
    """
    return values.index_select(1, seg)


@per_chunk.register_fake
def _per_chunk_fake(values: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    return values.new_empty((values.shape[0], seg.shape[0]))


def gather(xs: list, seg: torch.Tensor) -> list:
    """Per-segment values as per-chunk columns: each ``(P,)`` vector becomes
    ``(nchunks, 1)`` (each chunk gets its segment's value, through one
    :func:`per_chunk`); 0-d tensors and floats are returned as they are."""
    vectors = [i for i, x in enumerate(xs) if isinstance(x, torch.Tensor) and x.dim() == 1]
    out = list(xs)
    if vectors:
        table = per_chunk(torch.stack([xs[i] for i in vectors]), seg)
        for k, i in enumerate(vectors):
            out[i] = table[k].unsqueeze(1)
    return out


def chunk_mask(valid, chunk: int):
    """``(nchunks, chunk)`` bool: True on the elements that belong to a
    parameter, False on padding. ``valid``: ``(nchunks, 1)`` int64 (or a
    :class:`PartialRows`, returned as it is)."""
    if isinstance(valid, PartialRows):
        return valid
    return torch.arange(chunk, device=valid.device) < valid


def _rows(x: torch.Tensor, mask, reduce, fill) -> torch.Tensor:
    if not isinstance(mask, PartialRows):
        return reduce(torch.where(mask, x, fill))
    out = reduce(x)
    if mask.index.numel():
        out[mask.index] = reduce(torch.where(mask.mask, x[mask.index], fill))
    return out


def row_sum(x: torch.Tensor, mask) -> torch.Tensor:
    """Per-chunk sum of ``x`` over the unmasked elements: ``(nchunks,)``."""
    return _rows(x, mask, lambda y: y.sum(1), 0)


def row_sumsq(x: torch.Tensor, mask) -> torch.Tensor:
    """Per-chunk sum of squares (the partial of ``norm`` and ``rms``)."""
    return row_sum(x * x, mask)


def row_dot(x: torch.Tensor, y, mask) -> torch.Tensor:
    """Per-chunk sum of ``x * y`` (the partial of ``dot``)."""
    return row_sum(x * y, mask)


def row_max_abs(x: torch.Tensor, mask) -> torch.Tensor:
    """Per-chunk largest absolute value (0 for padding; NaN propagates)."""
    return _rows(torch.abs(x), mask, lambda y: y.amax(1), 0)


def write(dst: torch.Tensor, value, active: torch.Tensor | None) -> torch.Tensor:
    """Write ``value`` (any kind, broadcast) into the buffer ``dst`` on active
    chunks (``active``: ``(nchunks, 1)`` bool, None for all), keep ``dst``
    elsewhere; returns ``dst``. The value is rounded to ``dst``'s dtype (a
    bfloat16 parameter)."""
    if active is None:
        return dst.copy_(value) if isinstance(value, torch.Tensor) else dst.fill_(value)
    return dst.copy_(torch.where(active, value, dst))


def write_vec(dst: torch.Tensor, value, active: torch.Tensor) -> torch.Tensor:
    """Write a per-segment ``value`` (a ``(P,)`` vector, 0-d tensor or float)
    into the ``(P,)`` vector ``dst`` where ``active`` (``(P,)`` bool)."""
    return dst.copy_(torch.where(active, value, dst))
