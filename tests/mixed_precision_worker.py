"""Worker for tests/test_mixed_precision.py: run under ``torchrun --nproc-per-node 2``.

``python -m torch.distributed.run --standalone --nproc-per-node 2
tests/mixed_precision_worker.py OUT`` shards the bfloat16 model of
:func:`make_model` with FSDP2 (``fully_shard``, gloo, CPU; 5- and 1-row
tensors shard unevenly, the last bias leaves rank 1 an empty shard), gives
every parameter the fixed gradients of :func:`grads` (the same whole
gradient on every rank, sharded like the parameter) and runs :data:`STEPS`
lamb steps under each precision of :data:`MODES`. Rank 0 writes
``OUT/<mode>.pt``: the whole parameters, the whole master copies, the
type and placements of each master (a DTensor sharded like its
parameter) and of each parameter.

:func:`reference` is the same run in one process on plain tensors.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import layerwise as lw

STEPS = 4
MODES = ("master", "stochastic")
HYPERS = {"lr": 2e-3}


def make_model(width: int = 5) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, width), torch.nn.Tanh(),
                               torch.nn.Linear(width, width), torch.nn.Tanh(),
                               torch.nn.Linear(width, 1)).to(torch.bfloat16)


def grads(step: int, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in shapes.items()}


def _run(model, opt, shard=None) -> None:
    named = [(n.removeprefix("module."), p) for n, p in model.named_parameters()]
    shapes = {n: tuple(p.shape) for n, p in named}
    for k in range(STEPS):
        g = grads(k, shapes)
        for n, p in named:
            p.grad = g[n] if shard is None else shard(g[n], p)
        opt.step()


def reference(mode: str) -> dict:
    model = make_model()
    opt = lw.Optimizer(model.named_parameters(), "lamb", compile=False, precision=mode,
                       rounding_seed=7, **HYPERS)
    _run(model, opt)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "masters": {n: opt.state[p]["master"].clone() for n, p in model.named_parameters()
                        if "master" in opt.state[p]}}


def main(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for mode in MODES:
        model = make_model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        model = fully_shard(model, mesh=mesh)
        opt = lw.Optimizer(model.named_parameters(), "lamb", compile=False, precision=mode,
                           rounding_seed=7, **HYPERS)
        _run(model, opt, lambda g, p: distribute_tensor(g, p.device_mesh, p.placements))
        result = {"params": {}, "masters": {}, "types": {}}
        for n, p in model.named_parameters():
            n = n.removeprefix("module.")
            result["params"][n] = p.detach().full_tensor()
            m = opt.state[p].get("master")
            if m is not None:
                result["masters"][n] = m.full_tensor()
                result["types"][n] = (type(m).__name__, str(m.placements), str(p.placements),
                                      tuple(m.to_local().shape), tuple(p.to_local().shape),
                                      m.dtype)
        if rank == 0:
            torch.save(result, out / f"{mode}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # results saved, process group destroyed: leave without C++ static
    # destructors (torch.distributed sometimes aborts at exit under load;
    # see tests/distributed_worker.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
