"""lw.Optimizer under FSDP2 (fully_shard, DTensor parameters) and DDP, 2 processes, gloo, CPU.

The runs happen in ``tests/distributed_worker.py`` under ``torchrun`` (two
launches: train, then resume from a torch.distributed.checkpoint in new
processes); these tests compare what they wrote with single-process runs
of the same model on the whole batch. See the worker's docstring for the
set-up (uneven shards, an empty shard, every reduction kind).
"""
from __future__ import annotations

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
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"


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
EXPECTED = {"lamb": (1, 1), "lars": (1, 1), "nvlamb": (2, 2), "all_reductions": (5, 4),
            "lamb_compiled": (1, 1), "lamb_float64": (1, 1), "all_reductions_float64": (5, 4)}


# the compiled and float64 runs are made under FSDP2 only (under DDP nothing
# differs from one process)
CASES = [(name, engine) for name, (_, _, compiled) in worker.PROGRAMS.items()
         for engine in ("fsdp2", "ddp")
         if not ((compiled or name in worker.FLOAT64) and engine == "ddp")]


@pytest.mark.parametrize("name, engine", CASES)
def test_two_processes_match_one(runs, name, engine):
    """Every parameter and every watched value equals the single-process run's."""
    got = _load(runs / f"{name}_{engine}.pt")
    want = worker.reference(name)
    rtol, atol = (1e-12, 1e-14) if name in worker.FLOAT64 else (RTOL, ATOL)
    assert got["params"].keys() == want["params"].keys()
    for n, p in want["params"].items():
        assert got["params"][n].dtype == p.dtype
        torch.testing.assert_close(got["params"][n], p, rtol=rtol, atol=atol, msg=n)
    assert want["watched"] and got["watched"].keys() == want["watched"].keys()
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


@pytest.mark.parametrize("name", ["lamb", "lars", "nvlamb", "all_reductions"])
def test_collectives_per_step_do_not_grow_with_parameters(runs, name):
    per_depth = _load(runs / "collectives.pt")
    small, large = per_depth[(name, 1)], per_depth[(name, 6)]
    assert large["params"] > 2 * small["params"]
    assert small["collectives"] == large["collectives"] == list(EXPECTED[name])


def test_checkpoint_resumes_identically(runs):
    """FSDP2 lamb saved with torch.distributed.checkpoint after step 3 and resumed in
    new processes gives bit-for-bit the parameters and trust ratios of the run
    that never stopped."""
    straight = _load(runs / "lamb_fsdp2.pt")
    resumed = _load(runs / "lamb_resumed.pt")
    for n, p in straight["params"].items():
        assert torch.equal(resumed["params"][n], p), n
    rest = worker.STEPS - worker.CHECKPOINT_AT
    for n, values in straight["watched"]["tr"].items():
        assert resumed["watched"]["tr"][n] == values[worker.CHECKPOINT_AT:], n
        assert len(resumed["watched"]["tr"][n]) == rest


def test_fsdp2_example_runs_and_resumes(tmp_path):
    """examples/fsdp2_lamb.py as the README runs it (2 processes), then resumed."""
    example = Path(__file__).parents[1] / "examples" / "fsdp2_lamb.py"
    ckpt = tmp_path / "ckpt"
    runs = [[], ["--resume"]]
    outputs = []
    for epochs, extra in zip((1, 2), runs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", str(example), "--epochs", str(epochs), "--checkpoint", str(ckpt), *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-6000:]
        outputs.append(done.stdout)
    assert "epoch  1  val accuracy" in outputs[0] and "epoch  2" not in outputs[0]
    assert "epoch  2  val accuracy" in outputs[1] and "epoch  1" not in outputs[1]
    assert "conv1.weight" in outputs[1] and "trust ratio" in outputs[1]
