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
           "row_max_abs", "write", "write_vec", "chunk_mask_like", "as_col", "col_mask",
           "col_total", "col_max", "col_fill", "col_gather", "row_partial", "col_partial",
           "segment_columns",
           "value_partial"]


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
    into the ``(P,)`` vector (or ``(P, C)`` col table) ``dst`` where
    ``active`` (``(P,)`` bool)."""
    if dst.dim() == 2:
        return dst.copy_(torch.where(active.unsqueeze(1), as_col(value), dst))
    return dst.copy_(torch.where(active, value, dst))


# ---------------------------------------------------------------- units
# Programs with row or col values (LANGUAGE.md section 10) run on the unit
# layout (``layerwise.runtime.layout``): a chunk is one row of a parameter's
# ``(rows, cols)`` matrix (``C = max(cols, 2)`` for every parameter of the
# bucket), so a row value is ``(nchunks, 1)``, one per chunk, and a col value
# is a ``(P, C)`` table, one row per segment.

def chunk_mask_like(valid, ref: torch.Tensor):
    """:func:`chunk_mask` for a chunk length that is ``ref.shape[1]`` (the unit
    layout's, which differs between buckets)."""
    return chunk_mask(valid, ref.shape[1])


def as_col(x):
    """A per-segment value ``(P,)`` as a column ``(P, 1)`` that broadcasts
    against ``(P, C)`` col tables; 0-d tensors and floats as they are."""
    if isinstance(x, torch.Tensor) and x.dim() == 1:
        return x.unsqueeze(1)
    return x


def col_mask(cols: torch.Tensor, width: int) -> torch.Tensor:
    """``(P, width)`` bool: True on each segment's first ``cols`` columns
    (``cols``: ``(P,)`` float, the segments' column counts)."""
    return torch.arange(width, device=cols.device) < as_col(cols)


def col_total(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``(P, C) -> (P,)``: each segment's sum over its columns."""
    return torch.where(col_mask(cols, x.shape[1]), x, 0).sum(1)


def col_max(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``(P, C) -> (P,)``: each segment's largest absolute value over its
    columns (0 if it has none; NaN propagates)."""
    return torch.where(col_mask(cols, x.shape[1]), torch.abs(x), 0).amax(1)


def col_fill(value, ref: torch.Tensor) -> torch.Tensor:
    """A new ``(P, C)`` col table (``ref``'s shape and dtype) holding
    ``value`` (a float, 0-d, ``(P,)`` or ``(P, C)``)."""
    return torch.zeros_like(ref) + as_col(value)


def col_gather(table: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """``(P, C)`` col table -> ``(nchunks, C)``: each chunk's segment's row."""
    return table.index_select(0, seg)


def row_partial(x: torch.Tensor, mask, reduce: str) -> torch.Tensor:
    """The partial of a reduction along rows: per chunk (one row each), the
    sum (``reduce="sum"``) or largest absolute value (``"max"``) of ``x``
    over its real elements: ``(nchunks,)``."""
    return row_sum(x, mask) if reduce == "sum" else row_max_abs(x, mask)


def col_partial(x: torch.Tensor, mask, reduce: str) -> torch.Tensor:
    """The partial of a reduction along columns: ``x`` (or ``|x|`` for
    ``reduce="max"``) with padding set to 0, ``(nchunks, C)`` float64 (the
    conversion fused into the pass that computes ``x``); the runtime reduces
    it over each segment's chunks (:func:`segment_columns`)."""
    y = (torch.abs(x) if reduce == "max" else x).to(torch.float64)
    if isinstance(mask, PartialRows):
        if not mask.index.numel():
            return y.clone() if y is x else y
        y = y.clone() if y is x else y
        y[mask.index] = torch.where(mask.mask, y[mask.index], 0)
        return y
    return torch.where(mask, y, 0)


def segment_columns(x: torch.Tensor, seg: torch.Tensor, offsets: torch.Tensor, nseg: int,
                    reduce: str) -> torch.Tensor:
    """Each segment's column totals (``reduce="sum"``) or maxima (``"max"``,
    of values >= 0) of the ``(nchunks, C)`` float64 partial ``x``:
    ``(nseg, C)``. ``seg`` ``(nchunks,)`` maps chunks to segments, whose chunks
    are consecutive (``offsets`` ``(nseg + 1,)``).

    Deterministic on every device: on the CPU ``index_add_`` /
    ``scatter_reduce_`` (sequential in chunk order, multithreaded over columns:
    ~30x faster than ``segment_reduce`` along dim 0 of a BERT embedding's
    partial); elsewhere ``segment_reduce`` (``index_add_`` would use atomic
    adds whose order varies)."""
    if x.device.type == "cpu":
        out = x.new_zeros(nseg, x.shape[1])
        if reduce == "sum":
            return out.index_add_(0, seg, x)
        return out.scatter_reduce_(0, seg.unsqueeze(1).expand_as(x), x, "amax")
    return torch.segment_reduce(x, "sum" if reduce == "sum" else "max", offsets=offsets,
                                initial=0.0)


def value_partial(x: torch.Tensor, target: str, y: torch.Tensor | None = None) -> torch.Tensor:
    """The partial of a layer reduction of a row value ``(nchunks, 1)``: per
    chunk (one row), the value (``target="sum"``), its square (``"sumsq"``),
    its absolute value (``"max_abs"``) or, with the row value ``y``, the
    product (``"dot"``; ``y`` may be a number), as ``(nchunks,)``."""
    v = x[:, 0]
    if target == "sumsq":
        return v * v
    if target == "max_abs":
        return torch.abs(v)
    if target == "dot":
        return v * (y[:, 0] if isinstance(y, torch.Tensor) and y.dim() == 2 else y)
    return v + 0 if target == "sum" else v
