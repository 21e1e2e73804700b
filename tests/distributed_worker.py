"""Worker for tests/test_distributed.py: run under ``torchrun --nproc-per-node 2``.

``python -m torch.distributed.run --standalone --nproc-per-node 2
tests/distributed_worker.py OUT {train|resume}`` trains the small model of
:func:`make_model` for :data:`STEPS` steps on the fixed data of
:func:`batch` (rank r takes rows r, r + 2, ...) with every program in
:data:`PROGRAMS`, under FSDP2 (``fully_shard``, gloo, CPU) and under DDP,
and writes, from rank 0, ``OUT/<program>_<engine>.pt``: the full
parameters and optimizer state after the last step, ``opt.watched``, and
the number of gloo collectives each ``opt.step()`` made (counted with
``torch.profiler``, so every path to a collective is seen, not only
layerwise's own).

Programs with row and column values (LANGUAGE.md section 10): the presets
``lamb_rowwise`` and ``adafactor``, :data:`COL_REDUCTIONS` (column states
and reductions, combined across ranks), :data:`LAMB_BLOCKS` and
:data:`ADAFACTOR_BLOCKS` (``row_block`` groups of slices, on a model whose
shards hold whole groups: :data:`BLOCK_RULES`). Under FSDP2 a
row is whole on its rank (dim-0 shards); :func:`straddle` checks that a
``row_block`` cutting a shard boundary is refused (``OUT/straddle.pt``).

``train`` also saves a torch.distributed.checkpoint of the FSDP2 runs of
:data:`RESUMED` after step :data:`CHECKPOINT_AT` (``OUT/ckpt_<program>``)
and measures the collectives per step of models of two depths; ``resume``
starts new processes, loads those checkpoints into freshly built models and
optimizers and runs the remaining steps (``OUT/<program>_resumed.pt``).

:func:`reference` is the single-process run the test compares with (the
whole batch on one process; FSDP2 and DDP average the two ranks' mean
gradients, which equals the gradient of the whole batch's mean loss).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import layerwise as lw

STEPS = 5
CHECKPOINT_AT = 3
ROWS = 8

# lamb as shipped, its trust ratio recorded through a watch of its def
LAMB_WATCHED = "optimizer lamb_watched extends lamb\nwatch trust\n"

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

# column states and reductions (sum and max, combined across ranks with the
# per-parameter partials), a column reduction in a state's initial value,
# a row state, layer reductions of a col and of a row value, numel along
# columns (the rows of the whole parameter, not of the shard); d is 0 up to
# rounding (dot of row values, dot with a number first)
COL_REDUCTIONS = """optimizer col_reductions
hyper lr = 0.02
state c : col = mean(w^2, col)
state q : row = 1
watch n, s, d
step {
  c = 0.9 * c + 0.1 * mean(g^2, col)
  q = 0.5 * q + 0.5 * rms(g, row)
  a = max_abs(g, col)
  u = g / (sqrt(c) + 1e-8) + 0.1 * tanh(a) * w / (1 + q)
  s = sum(c) / numel(w, col) + mean(q)
  d = dot(q, q) - sum(q * q) + dot(2, g) - 2 * sum(g)
  n = norm(w) / (1 + norm(u))
  w = w - lr * n * u / (1 + s)
}
"""

# row_block on the model of width 8 (shards of 4 slices): 0.weight (8, 7) and
# 0.bias (8,) in rows of 2 slices, 2.weight (8, 8) in rows of 4: every shard
# holds whole rows
BLOCK_RULES = """for name ~ "^(module[.])?0[.]" {
  row_block = 2
}
for name ~ "^(module[.])?2[.]weight" {
  row_block = 4
}
"""
#: per parameter of the model of width 8, its row_block under BLOCK_RULES
BLOCKS = {"0.weight": 2, "0.bias": 2, "2.weight": 4}
LAMB_BLOCKS = "optimizer lamb_blocks extends lamb_rowwise\n" + BLOCK_RULES
ADAFACTOR_BLOCKS = "optimizer adafactor_blocks extends adafactor\n" + BLOCK_RULES

# ... and 2.weight in one row of 8 slices, which the shard boundary (4) cuts
STRADDLE = LAMB_BLOCKS.replace("lamb_blocks", "straddle").replace("row_block = 4",
                                                                  "row_block = 8")

#: name -> (program: preset name or text, hyper values, compile)
PROGRAMS = {
    "lamb": (LAMB_WATCHED, {"lr": 0.05}, False),
    "lars": ("lars", {"lr": 0.5, "weight_decay": 1e-3}, False),
    "nvlamb": ("nvlamb", {"lr": 0.05, "max_grad_norm": 0.5}, False),
    "all_reductions": (ALL_REDUCTIONS, {}, False),
    "lamb_compiled": (LAMB_WATCHED, {"lr": 0.05}, True),
    "lamb_float64": (LAMB_WATCHED, {"lr": 0.05}, False),
    "all_reductions_float64": (ALL_REDUCTIONS, {}, False),
    "lamb_rowwise": ("lamb_rowwise", {"lr": 0.05}, False),
    "adafactor": ("adafactor", {}, False),
    "col_reductions": (COL_REDUCTIONS, {}, False),
    "lamb_blocks": (LAMB_BLOCKS, {"lr": 0.05}, False),
    "adafactor_blocks": (ADAFACTOR_BLOCKS, {}, False),
    "adafactor_float64": ("adafactor", {}, False),
}
#: programs run in float64 (the others in float32)
FLOAT64 = {"lamb_float64", "all_reductions_float64", "adafactor_float64"}
#: programs that watch nothing (presets run as they are): only their
#: parameters and states are compared
UNWATCHED = {"lamb_rowwise", "adafactor", "adafactor_float64", "lamb_blocks",
             "adafactor_blocks"}
#: programs whose model has width 8 (default 5)
WIDTH = {"lamb_blocks": 8, "adafactor_blocks": 8}
#: FSDP2 runs checkpointed after step CHECKPOINT_AT and resumed in new processes
RESUMED = ("lamb", "adafactor", "col_reductions")
#: programs whose collectives per step are measured at two depths
COUNTED = ("lamb", "lars", "nvlamb", "all_reductions", "lamb_rowwise", "adafactor",
           "col_reductions")


def spec_of(program: str) -> lw.Spec:
    return lw.parse(program, filename="test.lw") if "\n" in program else lw.load(program)


def make_model(depth: int = 1, dtype: torch.dtype = torch.float32,
               width: int = 5) -> torch.nn.Sequential:
    """Linear(7, 5), ``depth`` x (Tanh, Linear(5, 5)), Tanh, Linear(5, 1), in
    ``dtype``, seeded (5 is ``width``). The 5- and 1-row tensors shard
    unevenly over 2 ranks; the last bias leaves rank 1 an empty shard."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(7, width)]
    for _ in range(depth):
        layers += [torch.nn.Tanh(), torch.nn.Linear(width, width)]
    layers += [torch.nn.Tanh(), torch.nn.Linear(width, 1)]
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
    """The single-process run of program ``name``: full parameters, optimizer
    state and watched values."""
    program, hypers, _ = PROGRAMS[name]
    model = make_model(dtype=torch.float64 if name in FLOAT64 else torch.float32,
                       width=WIDTH.get(name, 5))
    opt = lw.Optimizer(model.named_parameters(), spec_of(program), compile=False,
                       record=("every", 1), **hypers)
    train(model, opt, range(STEPS), None)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "state": _state(model, opt)[0], "watched": opt.watched}


def _whole(t: torch.Tensor) -> torch.Tensor:
    """All of ``t``: a DTensor's full tensor (a collective), any other a copy."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


def _full(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix("module."): _whole(p) for n, p in model.named_parameters()}


def _state(model, opt) -> tuple[dict, dict]:
    """Per parameter name, its whole state values, and their types' names
    (``DTensor`` or ``Tensor``)."""
    values, types = {}, {}
    for n, p in model.named_parameters():
        n = n.removeprefix("module.")
        values[n] = {k: _whole(v) for k, v in opt.state[p].items()}
        types[n] = {k: type(v).__name__ for k, v in opt.state[p].items()}
    return values, types


def _same_on_every_rank(state: dict, types: dict, watched: dict) -> bool:
    """Whether every rank holds bitwise the same plain-tensor (not DTensor)
    state values and watched values (a collective)."""
    import torch.distributed as dist
    mine = ({n: {k: v for k, v in per.items() if types[n][k] != "DTensor"}
             for n, per in state.items()}, watched)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    first = every[0]
    return all(other[1] == first[1] and all(
        torch.equal(v, first[0][n][k]) for n, per in other[0].items() for k, v in per.items())
        for other in every[1:])


def _result(model, opt, **extra) -> dict:
    state, types = _state(model, opt)
    watched = _watched(opt)
    return {"params": _full(model), "state": state, "state_types": types, "watched": watched,
            "same_on_every_rank": _same_on_every_rank(state, types, watched), **extra}


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
           dtype: torch.dtype = torch.float32, width: int = 5):
    model = make_model(depth, dtype, width)
    if engine == "fsdp2":
        model = _fsdp2(model, mesh)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model, lw.Optimizer(model.named_parameters(), spec_of(program), compile=compile,
                               record=("every", 1), **hypers)


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


def straddle(mesh, rank: int) -> dict:
    """FSDP2 with :data:`STRADDLE` (2.weight in one row of 8 slices, sharded 4 and
    4): the first step must raise ValueError and change nothing. Returns, per
    rank, the message, and whether the local parameters and gradients (the same
    tensors, the same values) and the optimizer state are as before."""
    import torch.distributed as dist
    model, opt = _build("fsdp2", mesh, STRADDLE, {"lr": 0.05}, False, width=8)
    x, y = batch(0, rank)
    torch.nn.functional.mse_loss(model(x), y).backward()
    params = list(model.parameters())
    before = [(p.to_local().clone(), p.grad, p.grad.to_local().clone()) for p in params]
    message = None
    try:
        opt.step()
    except ValueError as err:
        message = str(err)
    unchanged = all(torch.equal(p.to_local(), w) and p.grad is g and torch.equal(g.to_local(), gv)
                    for p, (w, g, gv) in zip(params, before))
    mine = {"message": message, "unchanged": unchanged, "state": len(opt.state)}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {"ranks": every}


def main(out: Path, mode: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if mode == "resume":
        for name in RESUMED:
            program, hypers, _ = PROGRAMS[name]
            model, opt = _build("fsdp2", mesh, program, hypers, False)
            _checkpoint(model, opt, out / f"ckpt_{name}", load=True)
            counts = train(model, opt, range(CHECKPOINT_AT, STEPS), rank)
            result = _result(model, opt, collectives=counts)
            if rank == 0:
                torch.save(result, out / f"{name}_resumed.pt")
        dist.destroy_process_group()
        return
    for name, (program, hypers, compile) in PROGRAMS.items():
        for engine in ("fsdp2", "ddp"):
            if (compile or name in FLOAT64) and engine == "ddp":
                continue
            model, opt = _build(engine, mesh, program, hypers, compile,
                                dtype=torch.float64 if name in FLOAT64 else torch.float32,
                                width=WIDTH.get(name, 5))
            counts = train(model, opt, range(CHECKPOINT_AT), rank)
            if name in RESUMED and engine == "fsdp2":
                _checkpoint(model, opt, out / f"ckpt_{name}", load=False)
            counts += train(model, opt, range(CHECKPOINT_AT, STEPS), rank)
            result = _result(model, opt, collectives=counts)
            if rank == 0:
                torch.save(result, out / f"{name}_{engine}.pt")
    # collectives per step against the number of parameters (FSDP2)
    per_depth = {}
    for depth in (1, 6):
        for name in COUNTED:
            program, hypers, _ = PROGRAMS[name]
            model, opt = _build("fsdp2", mesh, program, hypers, False, depth)
            per_depth[(name, depth)] = {
                "params": sum(1 for _ in model.parameters()),
                "collectives": train(model, opt, range(2), rank)}
    refused = straddle(mesh, rank)
    if rank == 0:
        torch.save(per_depth, out / "collectives.pt")
        torch.save(refused, out / "straddle.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    # Every result is saved and the process group destroyed. Leave without
    # running C++ static destructors: under load a torch.distributed process
    # sometimes aborts at interpreter exit ("terminate called without an
    # active exception", SIGABRT with no Python frame; seen with and without
    # the profiler, cf. pytorch/kineto issue 1051), which failed CI after the
    # work was done.
    # A failure during the work still exits non-zero and the test reads the
    # saved files, so nothing is hidden.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
