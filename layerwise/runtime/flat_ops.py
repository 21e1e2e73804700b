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
"""
from __future__ import annotations

import torch

__all__ = ["gather", "chunk_mask", "row_sum", "row_sumsq", "row_dot", "row_max_abs", "write",
           "write_vec"]


def gather(x, seg: torch.Tensor):
    """A per-segment ``(P,)`` vector as an ``(nchunks, 1)`` column (each chunk
    gets its segment's value); 0-d tensors and floats are returned as they are."""
    if isinstance(x, torch.Tensor) and x.dim() == 1:
        return x[seg].unsqueeze(1)
    return x


def chunk_mask(valid: torch.Tensor, chunk: int) -> torch.Tensor:
    """``(nchunks, chunk)`` bool: True on the elements that belong to a
    parameter, False on padding. ``valid``: ``(nchunks, 1)`` int64."""
    return torch.arange(chunk, device=valid.device) < valid


def row_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-chunk sum of ``x`` over the unmasked elements: ``(nchunks,)``."""
    return torch.where(mask, x, 0).sum(1)


def row_sumsq(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-chunk sum of squares (the partial of ``norm`` and ``rms``)."""
    return row_sum(x * x, mask)


def row_dot(x: torch.Tensor, y, mask: torch.Tensor) -> torch.Tensor:
    """Per-chunk sum of ``x * y`` (the partial of ``dot``)."""
    return row_sum(x * y, mask)


def row_max_abs(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-chunk largest absolute value (0 for padding; NaN propagates)."""
    return torch.where(mask, torch.abs(x), 0).amax(1)


def write(dst: torch.Tensor, value, active: torch.Tensor) -> torch.Tensor:
    """Write ``value`` (any kind, broadcast) into the buffer ``dst`` on active
    chunks (``active``: ``(nchunks, 1)`` bool), keep ``dst`` elsewhere; returns
    ``dst``. The value is rounded to ``dst``'s dtype (a bfloat16 parameter)."""
    return dst.copy_(torch.where(active, value, dst))


def write_vec(dst: torch.Tensor, value, active: torch.Tensor) -> torch.Tensor:
    """Write a per-segment ``value`` (a ``(P,)`` vector, 0-d tensor or float)
    into the ``(P,)`` vector ``dst`` where ``active`` (``(P,)`` bool)."""
    return dst.copy_(torch.where(active, value, dst))
