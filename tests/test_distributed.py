"""lw.Optimizer under FSDP2 (fully_shard, DTensor parameters) and DDP, 2 processes, gloo, CPU.

The runs happen in ``tests/distributed_worker.py`` under ``torchrun`` (two
launches: train, then resume from a torch.distributed.checkpoint in new
processes); these tests compare what they wrote with single-process runs
of the same model on the whole batch. See the worker's docstring for the
set-up (uneven shards, an empty shard, every reduction kind, row and column
values and row_block: LANGUAGE.md section 10).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_worker as worker

WORKER = Path(__file__).with_name("distributed_worker.py")
RTOL, ATOL = 1e-5, 1e-6   # float32: the sums over shards add in another order
# float64: 1e-12 relative


def _launch(out: Path, mode: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(out), mode]
    # a worker that dies of a signal (SIGABRT, SIGSEGV) prints its Python stack
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    # the profiler logs two lines per step and rank: they would hide the error
    stderr = "\n".join(line for line in done.stderr.splitlines()
                       if "SyncActivityProfilerHandler" not in line)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{stderr[-8000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    _launch(out, "train")
    _launch(out, "resume")
    return out


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


# gloo collectives of one opt.step() under FSDP2: one per reduction phase
# (first step, later steps). all_reductions: state init (1, first step
# only), the global reductions (2: the norm inside global_norm's argument,
# then the global sums) and the update's two reduction levels.
# Units: a reduction along rows needs none (a row is whole on its rank:
# lamb_rowwise, lamb_blocks); adafactor's three levels (the column sums with
# rms(w), sum(r), rms(u)); col_reductions: the init's column mean, then the
# column mean and max_abs with the sums of g, then the reductions of q with
# the norms.
EXPECTED = {"lamb": (1, 1), "lars": (1, 1), "nvlamb": (2, 2), "all_reductions": (5, 4),
            "lamb_compiled": (1, 1), "lamb_float64": (1, 1), "all_reductions_float64": (5, 4),
            "lamb_rowwise": (0, 0), "adafactor": (3, 3), "col_reductions": (3, 2),
            "lamb_blocks": (0, 0), "adafactor_blocks": (3, 3), "adafactor_float64": (3, 3)}


# the compiled and float64 runs are made under FSDP2 only (under DDP nothing
# differs from one process)
CASES = [(name, engine) for name, (_, _, compiled) in worker.PROGRAMS.items()
         for engine in ("fsdp2", "ddp")
         if not ((compiled or name in worker.FLOAT64) and engine == "ddp")]


@pytest.mark.parametrize("name, engine", CASES)
def test_two_processes_match_one(runs, name, engine):
    """Every parameter, state value and watched value equals the single-process run's."""
    got = _load(runs / f"{name}_{engine}.pt")
    want = worker.reference(name)
    rtol, atol = (1e-12, 1e-14) if name in worker.FLOAT64 else (RTOL, ATOL)
    assert got["params"].keys() == want["params"].keys()
    for n, p in want["params"].items():
        assert got["params"][n].dtype == p.dtype
        torch.testing.assert_close(got["params"][n], p, rtol=rtol, atol=atol, msg=n)
    assert got["state"].keys() == want["state"].keys()
    for n, per in want["state"].items():
        assert per and got["state"][n].keys() == per.keys(), n
        for k, v in per.items():
            torch.testing.assert_close(got["state"][n][k], v, rtol=rtol, atol=atol,
                                       msg=f"state {k} of {n}")
    assert got["watched"].keys() == want["watched"].keys()
    assert bool(want["watched"]) != (name in worker.UNWATCHED)
    # replicated values (layer and col states, step counts, watched values)
    assert got["same_on_every_rank"]
    for k, per in want["watched"].items():
        assert per.keys() == got["watched"][k].keys()
        for n, values in per.items():
            assert len(values) == worker.STEPS
            torch.testing.assert_close(torch.tensor(got["watched"][k][n], dtype=torch.float64),
                                       torch.tensor(values, dtype=torch.float64),
                                       rtol=rtol, atol=atol, msg=f"watched {k} of {n}")
    # FSDP2: one gather per reduction phase; DDP: none (every rank holds everything)
    first, later = (0, 0) if engine == "ddp" else EXPECTED[name]
    assert got["collectives"] == [first] + [later] * (worker.STEPS - 1)


@pytest.mark.parametrize("name", worker.COUNTED)
def test_collectives_per_step_do_not_grow_with_parameters(runs, name):
    per_depth = _load(runs / "collectives.pt")
    small, large = per_depth[(name, 1)], per_depth[(name, 6)]
    assert large["params"] > 2 * small["params"]
    assert small["collectives"] == large["collectives"] == list(EXPECTED[name])


@pytest.mark.parametrize("name", worker.RESUMED)
def test_checkpoint_resumes_identically(runs, name):
    """An FSDP2 run saved with torch.distributed.checkpoint after step 3 and
    resumed in new processes gives bit-for-bit the parameters, state (row
    states as DTensors, col states as plain tensors) and watched values of the
    run that never stopped, with the same collectives per step."""
    straight = _load(runs / f"{name}_fsdp2.pt")
    resumed = _load(runs / f"{name}_resumed.pt")
    for n, p in straight["params"].items():
        assert torch.equal(resumed["params"][n], p), n
    assert resumed["state_types"] == straight["state_types"]
    for n, per in straight["state"].items():
        for k, v in per.items():
            assert torch.equal(resumed["state"][n][k], v), (n, k)
    rest = worker.STEPS - worker.CHECKPOINT_AT
    assert resumed["watched"].keys() == straight["watched"].keys()
    assert resumed["watched"] or name in worker.UNWATCHED
    for k, per in straight["watched"].items():
        for n, values in per.items():
            assert resumed["watched"][k][n] == values[worker.CHECKPOINT_AT:], (k, n)
            assert len(resumed["watched"][k][n]) == rest
    assert resumed["collectives"] == straight["collectives"][worker.CHECKPOINT_AT:]


@pytest.mark.parametrize("name, row, col", [("adafactor", "r", "c"),
                                            ("adafactor_blocks", "r", "c"),
                                            ("col_reductions", "q", "c"),
                                            ("lamb_rowwise", None, None)])
def test_row_and_col_states_under_fsdp2(runs, name, row, col):
    """Under FSDP2 (dim-0 shards of whole rows) elem states are DTensors like
    their parameter, a row state a DTensor of one number per row (``rows``
    after ``row_block``), a col state a plain tensor of one number per column
    (``cols`` after ``row_block``), the same on every rank."""
    got = _load(runs / f"{name}_fsdp2.pt")
    blocks = worker.BLOCKS if name.endswith("_blocks") else {}
    model = worker.make_model(width=worker.WIDTH.get(name, 5))
    for n, p in model.named_parameters():
        types, state = got["state_types"][n], got["state"][n]
        for k, v in state.items():
            if k not in ("step", row, col):
                assert types[k] == "DTensor" and v.shape == p.shape, (n, k)
        if row is None:
            continue
        rows, cols = p.shape[0] // blocks.get(n, 1), p[0].numel() * blocks.get(n, 1)
        assert types[row] == "DTensor" and state[row].shape == (rows,), n
        assert types[col] == "Tensor" and state[col].shape == (cols,), n


def test_row_block_groups_rows():
    """The row_block runs are not per-slice runs: after one step exactly the
    parameters with a row_block differ from the per-slice run (so matching the
    single-process run tests the groups under FSDP2)."""
    def one_step(name):
        program, hypers, _ = worker.PROGRAMS[name]
        model = worker.make_model(width=8)
        opt = worker.lw.Optimizer(model.named_parameters(), worker.spec_of(program),
                                  compile=False, **hypers)
        worker.train(model, opt, range(1), None)
        return {n: p.detach() for n, p in model.named_parameters()}

    for name, plain in (("lamb_blocks", "lamb_rowwise"), ("adafactor_blocks", "adafactor")):
        blocked, per_slice = one_step(name), one_step(plain)
        for n, p in per_slice.items():
            assert torch.equal(blocked[n], p) == (n not in worker.BLOCKS), (name, n)


def test_row_block_straddling_a_shard_is_refused(runs):
    """A row_block whose rows the shard boundary cuts (2.weight: one row of 8
    slices, shards of 4) makes the first step raise ValueError naming the
    parameter, on every rank, before anything changes: parameters and
    gradients (same tensors, same values) and the optimizer state."""
    refused = _load(runs / "straddle.pt")
    assert len(refused["ranks"]) == 2
    for rank, got in enumerate(refused["ranks"]):
        assert got["message"] is not None, f"rank {rank} did not raise"
        assert "parameter 2.weight" in got["message"] and "row_block 8" in got["message"]
        assert got["unchanged"], rank
        assert got["state"] == 0, rank


def test_fsdp2_example_runs_and_resumes(tmp_path):
    """examples/fsdp2_lamb.py as the README runs it (2 processes), then resumed."""
    example = Path(__file__).parents[1] / "examples" / "fsdp2_lamb.py"
    ckpt = tmp_path / "ckpt"
    runs = [[], ["--resume"]]
    outputs = []
    for epochs, extra in zip((1, 2), runs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", str(example), "--epochs", str(epochs), "--checkpoint", str(ckpt), *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        stderr = "\n".join(line for line in done.stderr.splitlines()
                           if "SyncActivityProfilerHandler" not in line)
        assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-2000:]}\n{stderr[-6000:]}"
        outputs.append(done.stdout)
    assert "epoch  1  val accuracy" in outputs[0] and "epoch  2" not in outputs[0]
    assert "epoch  2  val accuracy" in outputs[1] and "epoch  1" not in outputs[1]
    assert "conv1.weight" in outputs[1] and "trust ratio" in outputs[1]


def test_dot_of_row_values_and_of_a_number():
    """In col_reductions, d = dot(q, q) - sum(q * q) + dot(2, g) - 2 * sum(g) is 0
    up to rounding in one process (a dot of two row values and one whose first
    operand is a number lowered to an AssertionError before), and the
    two-process runs match it (test_two_processes_match_one)."""
    for n, values in worker.reference("col_reductions")["watched"]["d"].items():
        assert len(values) == worker.STEPS and max(map(abs, values)) < 1e-5, (n, values)
