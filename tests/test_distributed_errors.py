"""Layouts lw.Optimizer refuses, checked in one process (a gloo group of size 1)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Shard

import layerwise as lw


@pytest.fixture(scope="module")
def mesh2d(tmp_path_factory):
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1, 1))
    finally:
        dist.destroy_process_group()


def _param(local: torch.Tensor, mesh, placements) -> torch.nn.Parameter:
    p = torch.nn.Parameter(DTensor.from_local(local, mesh, placements, run_check=False))
    p.grad = DTensor.from_local(torch.ones_like(local), mesh, placements, run_check=False)
    return p


@pytest.mark.parametrize("placements, phrase", [
    ((Shard(0), Shard(1)), "sharded over 2 mesh dimensions"),
    ((Partial(), Shard(0)), "placement Partial"),
])
def test_unsupported_layouts_are_refused_before_anything_changes(mesh2d, placements, phrase):
    p = _param(torch.arange(6.0).reshape(2, 3), mesh2d, placements)
    before = p.to_local().clone()
    opt = lw.Optimizer([("enc.weight", p)], "lamb", compile=False)
    with pytest.raises(ValueError, match=phrase) as err:
        opt.step()
    assert "enc.weight" in str(err.value)
    assert torch.equal(p.to_local(), before) and not opt.state[p]


def test_gradient_sharded_unlike_its_parameter_is_refused(mesh2d):
    p = _param(torch.arange(6.0).reshape(2, 3), init_device_mesh("cpu", (1,)), (Shard(0),))
    p.grad = torch.ones(2, 3)
    opt = lw.Optimizer([("w", p)], "lars", compile=False)
    with pytest.raises(ValueError, match="w is a DTensor .* gradient is not sharded the same way"):
        opt.step()
    assert not opt.state[p]


def test_plain_state_for_a_sharded_parameter_is_refused(mesh2d):
    mesh = init_device_mesh("cpu", (1,))
    p = _param(torch.arange(6.0).reshape(2, 3), mesh, (Shard(0),))
    opt = lw.Optimizer([p], "lamb", compile=False)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["m"] = torch.zeros(2, 3)
    kept = {k: v.to_local().clone() if isinstance(v, DTensor) else v.clone()
            for k, v in opt.state[p].items()}
    with pytest.raises(ValueError, match="state 'm' of parameter 0 is laid out as a plain tensor"):
        opt.load_state_dict(saved)
    for k, v in opt.state[p].items():
        assert torch.equal(v.to_local() if isinstance(v, DTensor) else v, kept[k]), k
