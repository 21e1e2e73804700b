"""API edges of ``lw.Optimizer`` (issue 14, item 6): each refused with a
``ValueError`` naming the parameter (and the state key) before anything
changes: no state created, no parameter or gradient modified."""
from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import layerwise as lw


def dense() -> torch.Tensor:
    return torch.arange(16, dtype=torch.float32).reshape(4, 4) / 7


def odd_tensor(kind: str) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # "sparse CSR support is in beta"
        t = {"coo": lambda: dense().to_sparse(),
             "csr": lambda: dense().to_sparse_csr(),
             "csc": lambda: dense().to_sparse_csc(),
             "bsr": lambda: dense().to_sparse_bsr((2, 2)),
             "bsc": lambda: dense().to_sparse_bsc((2, 2)),
             "mkldnn": lambda: dense().to_mkldnn(),
             "nested": lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
             "meta": lambda: torch.empty(4, 4, device="meta")}[kind]()
    return t.requires_grad_()


KINDS = ["coo", "csr", "csc", "bsr", "bsc", "mkldnn", "nested", "meta"]
WHY = {"coo": "sparse", "csr": "sparse", "csc": "sparse", "bsr": "sparse", "bsc": "sparse",
       "mkldnn": "dense", "nested": "nested", "meta": "meta device"}


@pytest.mark.parametrize("kind", KINDS)
def test_unsupported_parameter_refused_at_construction(kind):
    good = nn.Parameter(dense())
    with pytest.raises(ValueError) as info:
        lw.Optimizer([("good", good), ("odd", odd_tensor(kind))], "lamb", compile=False)
    message = str(info.value)
    assert "parameter odd" in message and WHY[kind] in message, message
    with pytest.raises(ValueError) as info:
        lw.Optimizer([good, odd_tensor(kind)], "lamb", compile=False)
    message = str(info.value)
    assert re.search(r"parameter param1 \(param group 0, position 1\)", message), message


@pytest.mark.parametrize("kind", KINDS)
def test_unsupported_parameter_refused_by_add_param_group(kind):
    good = nn.Parameter(dense())
    good.grad = torch.ones(4, 4)
    opt = lw.Optimizer([good], "lamb", compile=False)
    opt.step()
    groups = copy.copy(opt.param_groups)
    state = {k: dict(v) for k, v in opt.state.items()}
    with pytest.raises(ValueError, match=r"param1 \(param group 1, position 0\)"):
        opt.add_param_group({"params": [odd_tensor(kind)]})
    assert opt.param_groups == groups and len(opt.param_groups) == 1
    assert {k: dict(v) for k, v in opt.state.items()}.keys() == state.keys()


@pytest.mark.parametrize("kind", KINDS)
def test_unsupported_parameter_joining_later_refused_before_any_state(kind):
    """A parameter appended to a group's list after construction is checked
    at the step, before any state exists for it or anything is updated."""
    good = nn.Parameter(dense())
    opt = lw.Optimizer([good], "lamb", compile=False)
    odd = odd_tensor(kind)
    if kind == "meta":
        odd.grad = torch.empty(4, 4, device="meta")
    opt.param_groups[0]["params"].append(odd)
    good.grad = torch.ones(4, 4)
    before = good.detach().clone()
    with pytest.raises(ValueError, match=rf"parameter param1 \(param group 0, position 1\).*"
                                         rf"{WHY[kind]}"):
        opt.step()
    assert len(opt.state) == 0
    assert torch.equal(good.detach(), before) and torch.equal(good.grad, torch.ones(4, 4))
    opt.param_groups[0]["params"].pop()
    opt.step()
    assert len(opt.state) == 1


def test_non_tensor_parameter_refused():
    with pytest.raises(ValueError, match=r"parameter param0 \(param group 0, position 0\) is a "
                                         r"list, not a tensor"):
        lw.Optimizer([[1.0, 2.0]], "lamb", compile=False)


# ------------------------------------------------------------------ state dicts
def stepped(spec="lamb"):
    gen = torch.Generator().manual_seed(0)
    params = [("a", nn.Parameter(torch.randn(3, 4, generator=gen))),
              ("b", nn.Parameter(torch.randn(5, generator=gen)))]
    opt = lw.Optimizer(params, spec, compile=False)
    for _ in range(2):
        for _, p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p for _, p in params], opt


def snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: torch.as_tensor(v).clone() for k, v in opt.state[p].items()}
             for p in params if p in opt.state})


def assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert a[1][k].keys() == b[1][k].keys()
        for key in a[1][k]:
            assert torch.equal(a[1][k][key], b[1][k][key])


def to_numpy(sd, scalar_steps=False):
    sd = copy.deepcopy(sd)
    for entry in sd["state"].values():
        for k, v in entry.items():
            entry[k] = (np.float32(float(v)) if scalar_steps and k == "step"
                        else v.detach().cpu().numpy())
    return sd


@pytest.mark.parametrize("scalar_steps", [False, True], ids=["arrays", "numpy-scalars"])
def test_numpy_state_dict_is_converted(scalar_steps):
    """A state dict holding NumPy arrays (or NumPy scalars) loads as the same
    values as tensors would; the given dict is not modified."""
    _, opt = stepped()
    sd = opt.state_dict()
    as_np = to_numpy(sd, scalar_steps)
    kept = copy.deepcopy(as_np)
    ref_params, ref = stepped()
    params2, opt2 = stepped()
    ref.load_state_dict(sd)
    opt2.load_state_dict(as_np)
    for k, v in as_np["state"].items():
        for key, x in v.items():
            assert type(x) is type(kept["state"][k][key])
            assert np.array_equal(x, kept["state"][k][key])
    gen = torch.Generator().manual_seed(5)
    for p, q in zip(ref_params, params2):
        q.data.copy_(p.detach())
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()
    ref.step()
    opt2.step()
    for p, q in zip(ref_params, params2):
        assert torch.equal(p, q)
        for key in ref.state[p]:
            assert torch.equal(torch.as_tensor(ref.state[p][key]), torch.as_tensor(opt2.state[q][key]))


@pytest.mark.parametrize("value, pattern", [
    (np.array(["a"] * 12).reshape(3, 4), r"state 'm' of parameter 0\b.*ndarray"),
    (np.zeros((3, 4), dtype=np.int64), r"state 'm' of parameter 0\b.*floating point"),
    ([[0.0] * 4] * 3, r"state 'm' of parameter 0\b.*list"),
    (torch.zeros(3, 4, device="meta"), r"state 'm' of parameter 0\b.*meta"),
    (torch.zeros(3, 4).to_sparse(), r"state 'm' of parameter 0\b.*layout"),
], ids=["strings", "ints", "list", "meta", "sparse"])
def test_state_value_that_cannot_be_used_is_refused(value, pattern):
    params, opt = stepped()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["m"] = value
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(sd)
    assert_same(before, snapshot(opt, params))


@pytest.mark.parametrize("key", ["m", "v", "step"])
def test_missing_state_key_refused_at_load(key):
    params, opt = stepped()
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][1][key]
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=rf"parameter 1\b.*no '{key}'"):
        opt.load_state_dict(sd)
    assert_same(before, snapshot(opt, params))
    opt.step()          # the optimizer still works


def test_missing_state_key_assigned_directly_refused_at_step():
    params, opt = stepped()
    for p in params:
        p.grad = torch.ones_like(p)
    before = snapshot(opt, params)
    saved = opt.state[params[0]]
    opt.state[params[0]] = {"step": 3, "m": torch.zeros(3, 4)}
    with pytest.raises(ValueError, match=r"parameter a\b.*no 'v'"):
        opt.step()
    opt.state[params[0]] = saved
    assert_same(before, snapshot(opt, params))


@pytest.mark.parametrize("bad", [
    [1, 2], {"state": {}}, {"param_groups": []}, {"state": [], "param_groups": []},
    {"state": {}, "param_groups": [1]}, {"state": {}, "param_groups": [{"lr": 1}]},
], ids=["list", "no-groups", "no-state", "state-list", "group-int", "group-no-params"])
def test_malformed_state_dict_refused(bad):
    params, opt = stepped()
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="not an optimizer state dict"):
        opt.load_state_dict(bad)
    assert_same(before, snapshot(opt, params))


def test_state_entry_that_is_not_a_dict_refused():
    params, opt = stepped()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0] = [1, 2]
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"the state of parameter 0 is a list"):
        opt.load_state_dict(sd)
    assert_same(before, snapshot(opt, params))
