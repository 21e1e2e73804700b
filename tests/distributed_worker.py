"""Worker for tests/test_distributed.py: run under ``torchrun --nproc-per-node 2``.

``python -m torch.distributed.run --standalone --nproc-per-node 2
tests/distributed_worker.py OUT {train|resume}`` trains the small model of
:func:`make_model` for :data:`STEPS` steps on the fixed data of
:func:`batch` (rank r takes rows r, r + 2, ...) with every program in
:data:`PROGRAMS`, under FSDP2 (``fully_shard``, gloo, CPU) and under DDP,
and writes, from rank 0, ``OUT/<program>_<engine>.pt``: the full
parameters after the last step, ``opt.watched``, and the number of gloo
collectives each ``opt.step()`` made (counted with ``torch.profiler``,
so every path to a collective is seen, not only layerwise's own).

``train`` also saves a torch.distributed.checkpoint of the FSDP2 ``lamb``
run after step :data:`CHECKPOINT_AT` (``OUT/ckpt``) and measures the
collectives per step of models of two depths; ``resume`` starts new
processes, loads that checkpoint into a freshly built model and optimizer
and runs the remaining steps (``OUT/lamb_resumed.pt``).

:func:`reference` is the single-process run the test compares with (the
whole batch on one process; FSDP2 and DDP average the two ranks' mean
gradients, which equals the gradient of the whole batch's mean loss).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import layerwise as lw

STEPS = 5
CHECKPOINT_AT = 3
ROWS = 8

LAMB_WATCHED = """optimizer lamb_watched extends lamb
watch tr
step {
  m = beta1 * m + (1 - beta1) * g
  v = beta2 * v + (1 - beta2) * g^2
  r = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
  u = r + weight_decay * w
  tr = trust(w, u)
  w = w - lr * tr * u
}
"""

# every layer reduction, both global reductions, a second reduction level,
# and reductions in state initial values
ALL_REDUCTIONS = """optimizer all_reductions
hyper lr = 0.01
state m = w / (1 + max_abs(w))
state s : layer = rms(w)
watch a, b, c, d, e
step {
  a = mean(g) + sum(g) / numel(w)
  b = rms(g) * dot(g, w)
  c = max_abs(g - mean(g))
  d = global_sum(g) / (1 + global_norm(w / (1 + norm(w))))
  e = s
  s = norm(m)
  m = 0.9 * m + g
  w = w - lr * (m / (1 + c) + tanh(a * b) * w + tanh(d) * w / (1 + norm(w)))
}
"""

#: name -> (program: preset name or text, hyper values, compile)
PROGRAMS = {
    "lamb": (LAMB_WATCHED, {"lr": 0.05}, False),
    "lars": ("lars", {"lr": 0.5, "weight_decay": 1e-3}, False),
    "nvlamb": ("nvlamb", {"lr": 0.05, "max_grad_norm": 0.5}, False),
    "all_reductions": (ALL_REDUCTIONS, {}, False),
    "lamb_compiled": (LAMB_WATCHED, {"lr": 0.05}, True),
    "lamb_float64": (LAMB_WATCHED, {"lr": 0.05}, False),
    "all_reductions_float64": (ALL_REDUCTIONS, {}, False),
}
#: programs run in float64 (the others in float32)
FLOAT64 = {"lamb_float64", "all_reductions_float64"}


def spec_of(program: str) -> lw.Spec:
    return lw.parse(program, filename="test.lw") if "\n" in program else lw.load(program)


def make_model(depth: int = 1, dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    """Linear(7, 5), ``depth`` x (Tanh, Linear(5, 5)), Tanh, Linear(5, 1), in
    ``dtype``, seeded. The 5- and 1-row tensors shard unevenly over 2 ranks;
    the last bias leaves rank 1 an empty shard."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(7, 5)]
    for _ in range(depth):
        layers += [torch.nn.Tanh(), torch.nn.Linear(5, 5)]
    layers += [torch.nn.Tanh(), torch.nn.Linear(5, 1)]
    return torch.nn.Sequential(*layers).to(dtype)


def batch(step: int, rank: int | None = None, world: int = 2):
    """The fixed batch of ``step``: all rows, or the rows of ``rank``."""
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(ROWS, 7, generator=gen)
    y = torch.randn(ROWS, 1, generator=gen)
    if rank is None:
        return x, y
    return x[rank::world], y[rank::world]


def train(model, opt, steps: range, rank: int | None) -> list[int]:
    """Run ``steps``; returns the gloo collectives each ``opt.step()`` made."""
    counts = []
    dtype = next(model.parameters()).dtype
    for k in steps:
        x, y = (t.to(dtype) for t in batch(k, rank))
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step()
        counts.append(sum(1 for e in prof.events() if e.name.startswith("gloo:")))
    return counts


def reference(name: str) -> dict:
    """The single-process run of program ``name``: full parameters and watched values."""
    program, hypers, _ = PROGRAMS[name]
    model = make_model(dtype=torch.float64 if name in FLOAT64 else torch.float32)
    opt = lw.Optimizer(model.named_parameters(), spec_of(program), compile=False, **hypers)
    train(model, opt, range(STEPS), None)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "watched": opt.watched}


def _full(model) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        p = p.detach()
        out[n.removeprefix("module.")] = p.full_tensor() if hasattr(p, "full_tensor") else p.clone()
    return out


def _watched(opt) -> dict:
    return {k: {n.removeprefix("module."): v for n, v in per.items()}
            for k, per in opt.watched.items()}


def _fsdp2(model, mesh):
    from torch.distributed.fsdp import fully_shard
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _build(engine: str, mesh, program: str, hypers: dict, compile: bool, depth: int = 1,
           dtype: torch.dtype = torch.float32):
    model = make_model(depth, dtype)
    if engine == "fsdp2":
        model = _fsdp2(model, mesh)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model, lw.Optimizer(model.named_parameters(), spec_of(program), compile=compile,
                               **hypers)


def _checkpoint(model, opt, path: Path, load: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    if not load:
        dcp.save(state, checkpoint_id=str(path))
        return
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def main(out: Path, mode: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    program, hypers, _ = PROGRAMS["lamb"]
    if mode == "resume":
        model, opt = _build("fsdp2", mesh, program, hypers, False)
        _checkpoint(model, opt, out / "ckpt", load=True)
        train(model, opt, range(CHECKPOINT_AT, STEPS), rank)
        result = {"params": _full(model), "watched": _watched(opt)}
        if rank == 0:
            torch.save(result, out / "lamb_resumed.pt")
        dist.destroy_process_group()
        return
    for name, (program, hypers, compile) in PROGRAMS.items():
        for engine in ("fsdp2", "ddp"):
            if (compile or name in FLOAT64) and engine == "ddp":
                continue
            model, opt = _build(engine, mesh, program, hypers, compile,
                                dtype=torch.float64 if name in FLOAT64 else torch.float32)
            counts = train(model, opt, range(CHECKPOINT_AT), rank)
            if name == "lamb" and engine == "fsdp2":
                _checkpoint(model, opt, out / "ckpt", load=False)
            counts += train(model, opt, range(CHECKPOINT_AT, STEPS), rank)
            result = {"params": _full(model), "watched": _watched(opt), "collectives": counts}
            if rank == 0:
                torch.save(result, out / f"{name}_{engine}.pt")
    # collectives per step against the number of parameters (FSDP2)
    per_depth = {}
    for depth in (1, 6):
        for name in ("lamb", "lars", "nvlamb", "all_reductions"):
            program, hypers, _ = PROGRAMS[name]
            model, opt = _build("fsdp2", mesh, program, hypers, False, depth)
            per_depth[(name, depth)] = {
                "params": sum(1 for _ in model.parameters()),
                "collectives": train(model, opt, range(2), rank)}
    if rank == 0:
        torch.save(per_depth, out / "collectives.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
