"""Sharded parameters (FSDP2's DTensors): local shards and reductions across ranks.

Under ``torch.distributed.fsdp.fully_shard`` every parameter, its gradient
and (here) every elem state is a ``DTensor`` whose rank-local tensor is one
shard of the whole. Elementwise arithmetic runs on the local shards as is;
a layer or global reduction must cover the whole parameter, so the
runtime computes each shard's *partial* (sum of squares, sum, or largest
absolute value; ``layerwise.split``), and :class:`Combiner` combines the
partials of every parameter of one level with one ``all_gather`` per
process group, then adds (or takes the max) across ranks locally. One collective per
phase, whatever the number of parameters; every rank gets bitwise the same values, so the replicated
layer states and watched values stay identical across ranks.

Replicated parameters (plain tensors, as under DDP, or DTensors with only
``Replicate`` placements) hold the whole parameter on every rank and need
no collective at all.

Units (LANGUAGE.md section 10) need parameters sharded along dim 0 (FSDP2's
default), in shards of whole rows (``layerwise.runtime.layout``): a row's
values are then complete on its rank, and only column values (``(P, C)``
tables of per-parameter column totals) are combined across ranks, in the
same collective as the per-parameter partials. Row states of a sharded
parameter are DTensors sharded like its dim 0 (:func:`like_rows`).
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

__all__ = ["Combiner", "is_dtensor", "local", "shard_group", "like", "like_rows", "shard_offset"]


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``.

    Importing ``torch.distributed.tensor`` takes about a second, so it is
    not imported here: a DTensor can only exist once it has been.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor (no copy); any other tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def shard_group(p: torch.Tensor, where: str):
    """The process group over which ``p``'s shards must be combined, or None
    if this rank holds all of ``p`` (a plain tensor, or only ``Replicate``).

    Raises:
        ValueError: ``p`` (named ``where``) is a DTensor with a ``Partial``
            placement, is sharded over more than one mesh dimension, or its
            local shard is not contiguous.
    """
    if not is_dtensor(p):
        return None
    dims = []
    for i, placement in enumerate(p.placements):
        if placement.is_shard():
            dims.append(i)
        elif not placement.is_replicate():
            raise ValueError(f"parameter {where} has placement {type(placement).__name__} "
                             f"({placement}); layerwise "
                             "optimizers support Shard and Replicate placements")
    if len(dims) > 1:
        raise ValueError(f"parameter {where} is sharded over {len(dims)} mesh dimensions "
                         f"({p.placements}); layerwise optimizers support one")
    if not p.to_local().is_contiguous():
        raise ValueError(f"parameter {where}: its local shard is not contiguous")
    return p.device_mesh.get_group(dims[0]) if dims else None


def shard_offset(p: torch.Tensor) -> int:
    """Index along dim 0 of the first slice of ``p`` this rank holds (0 unless
    ``p`` is a DTensor sharded along dim 0).

    Raises:
        ValueError: ``p`` is sharded along another dimension (its rows would
            be cut; units need whole rows).
    """
    if not is_dtensor(p):
        return 0
    for placement in p.placements:
        if placement.is_shard() and placement.dim != 0:
            raise ValueError(f"it is sharded along dim {placement.dim} ({p.placements}); "
                             "programs with row or col values need parameters sharded along "
                             "dim 0 (FSDP2's default)")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0]) if offset else 0


def like_rows(value: torch.Tensor, p: torch.Tensor, rows: int) -> torch.Tensor:
    """A row state ``value`` (this rank's rows, ``(k,)``) as a tensor laid out
    like ``p``'s dim 0: a DTensor of shape ``(rows,)`` with ``p``'s mesh and
    placements if ``p`` is one (LANGUAGE.md section 10)."""
    if not is_dtensor(p):
        return value
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(value, p.device_mesh, p.placements, run_check=False,
                              shape=torch.Size((rows,)), stride=(1,))


def like(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``value`` (shaped like ``p``'s local shard) as a tensor laid out like ``p``:
    a DTensor with ``p``'s mesh and placements if ``p`` is one."""
    if not is_dtensor(p):
        return value
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(value, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


class Combiner:
    """Combine per-segment partials across ranks, for the sharded segments of
    several buckets at once.

    ``shards[b]`` maps each process group to the ``(K,)`` int64 indices of the
    segments of bucket ``b`` sharded over it (``layerwise.runtime.layout``).
    Calling it with, per bucket, the ``(P,)`` float64 partials of one level
    (one vector per reduction; a ``(P, C)`` table for a reduction along
    columns), how each combines (``"sum"`` or ``"max"``) and their spaces
    (``"seg"``, ``"row"``, ``"col"``; the per-chunk partials of reductions
    along rows are complete on their rank and left alone) replaces the
    sharded segments' entries by their totals over the ranks, in place,
    after one ``all_gather`` per process group, whatever the number of
    parameters. Max propagates NaN; every rank gets bitwise the same values.
    """

    def __init__(self, shards: list[dict[object, torch.Tensor]]):
        self.shards = shards

    def __call__(self, partials: list[list[torch.Tensor]], how: list[str],
                 spaces: list[str] | None = None) -> None:
        spaces = spaces or ["seg"] * len(how)
        groups = list(dict.fromkeys(g for per_bucket in self.shards for g in per_bucket))
        for group in groups:
            pieces = [(idx, x, how[i]) for b, per_bucket in enumerate(self.shards)
                      if (idx := per_bucket.get(group)) is not None
                      for i, x in enumerate(partials[b]) if spaces[i] != "row"]
            if not pieces:
                continue
            mine = torch.cat([x[idx].reshape(-1) for idx, x, _ in pieces])
            gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
            dist.all_gather(gathered, mine, group=group)
            table = torch.stack(gathered)
            total, largest = table.sum(0), table.amax(0)
            k = 0
            for idx, x, kind in pieces:
                n = idx.numel() * (x.shape[1] if x.dim() == 2 else 1)
                x[idx] = (total if kind == "sum" else largest)[k:k + n].view(x[idx].shape)
                k += n
