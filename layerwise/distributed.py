"""Sharded parameters (FSDP2's DTensors): local shards and reductions across ranks.

Under ``torch.distributed.fsdp.fully_shard`` every parameter, its gradient
and (here) every elem state is a ``DTensor`` whose rank-local tensor is one
shard of the whole. Elementwise arithmetic runs on the local shards as is;
a layer or global reduction must cover the whole parameter, so the
runtime (``layerwise.runtime``) computes each shard's *partial* (sum of
squares, sum, or largest absolute value; ``layerwise.split``), and
:class:`Combiner` combines the partials of every parameter of one level
with one ``all_gather`` per process group, then adds (or takes the max)
across ranks locally. One collective per phase, whatever the number of
parameters; every rank gets bitwise the same values, so the replicated
layer states and watched values stay identical across ranks.

Replicated parameters (plain tensors, as under DDP, or DTensors with only
``Replicate`` placements) hold the whole parameter on every rank and need
no collective at all.
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["Combiner", "local", "shard_group", "like"]


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
    """Combine partials across ranks for items whose process groups are ``groups``
    (None: the item is whole on this rank and its partials are final).

    Calling it with each item's partials of one level (lists of 0-d tensors)
    and how each combines (``"sum"`` or ``"max"``) returns the combined
    values in the same layout and dtypes, after one ``all_gather`` of a
    float64 vector per distinct process group. Max propagates NaN.
    """

    def __init__(self, groups: Sequence):
        self.groups = list(groups)

    def __call__(self, partials: list[list[torch.Tensor]], how: list[str]) -> list[list[torch.Tensor]]:
        out = [list(p) for p in partials]
        by_group: dict = {}
        for j, group in enumerate(self.groups):
            if group is not None and partials[j]:
                by_group.setdefault(group, []).append(j)
        for group, items in by_group.items():
            mine = torch.stack([v.detach().reshape(()).to(torch.float64)
                                for j in items for v in partials[j]])
            gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
            dist.all_gather(gathered, mine, group=group)
            table = torch.stack(gathered)
            total, largest = table.sum(0), table.amax(0)
            k = 0
            for j in items:
                for i, v in enumerate(partials[j]):
                    value = total[k] if how[i] == "sum" else largest[k]
                    out[j][i] = value.to(v.dtype)
                    k += 1
        return out
