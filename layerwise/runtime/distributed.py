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
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

__all__ = ["Combiner", "is_dtensor", "local", "shard_group", "like"]


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
    (one vector per reduction) and how each combines (``"sum"`` or
    ``"max"``) replaces the sharded segments' entries by their totals over
    the ranks, in place, after one ``all_gather`` per process group,
    whatever the number of parameters. Max propagates NaN; every rank gets
    bitwise the same values.
    """

    def __init__(self, shards: list[dict[object, torch.Tensor]]):
        self.shards = shards

    def __call__(self, partials: list[list[torch.Tensor]], how: list[str]) -> None:
        groups = list(dict.fromkeys(g for per_bucket in self.shards for g in per_bucket))
        for group in groups:
            pieces = [(idx, x, how[i]) for b, per_bucket in enumerate(self.shards)
                      if (idx := per_bucket.get(group)) is not None
                      for i, x in enumerate(partials[b])]
            if not pieces:
                continue
            mine = torch.cat([x[idx] for idx, x, _ in pieces])
            gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
            dist.all_gather(gathered, mine, group=group)
            table = torch.stack(gathered)
            total, largest = table.sum(0), table.amax(0)
            k = 0
            for idx, x, kind in pieces:
                n = idx.numel()
                x[idx] = (total if kind == "sum" else largest)[k:k + n]
                k += n
