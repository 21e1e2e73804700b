"""lw.Optimizer as a torch.optim.Optimizer (LANGUAGE.md section 8), on the eager path."""
import copy
import math

import pytest
import torch

import layerwise as lw

SGD_LIKE = """optimizer plain
hyper lr = 0.1 in [0, inf)
hyper weight_decay = 0 in [0, inf)
state calls : layer = 0
for ndim <= 1 or name ~ "bias" {
  weight_decay = 0.5
}
watch n
step {
  calls = calls + 1
  n = norm(g)
  w = w - lr * (g + weight_decay * w)
}
"""


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def fill_grads(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def test_is_a_torch_optimizer_and_updates_like_the_program():
    m = model()
    opt = lw.Optimizer(m.named_parameters(), lw.parse(SGD_LIKE), compile=False)
    assert isinstance(opt, torch.optim.Optimizer)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    fill_grads(m.parameters())
    opt.step()
    for n, p in m.named_parameters():
        wd = 0.5 if (p.dim() <= 1 or "bias" in n) else 0.0
        expected = before[n] - 0.1 * (p.grad + wd * before[n])
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
        assert opt.state[p]["step"].item() == 1
        assert opt.state[p]["calls"].shape == ()


def test_unknown_hyper_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'lerning_rate'.*known: lr, "):
        lw.Optimizer(model().parameters(), "lamb", compile=False, lerning_rate=1)
    with pytest.raises(ValueError, match=r"'momentum' in param group 0"):
        lw.Optimizer([{"params": model().parameters(), "momentum": 0.9}], "lamb", compile=False)


def test_hyper_range_checked_at_construction_and_at_step():
    with pytest.raises(ValueError, match=r"beta1=1.0 in keyword argument is outside its range \[0, 1\)"):
        lw.Optimizer(model().parameters(), "lamb", compile=False, beta1=1.0)
    m = model()
    opt = lw.Optimizer(m.parameters(), "lamb", compile=False)
    fill_grads(m.parameters())
    opt.param_groups[0]["eps"] = 0.0
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match=r"param group 0: eps=0.0 is outside its range \(0, inf\)"):
        opt.step()
    # nothing was modified by the failed step
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))
    assert all(not s for s in opt.state.values())


def test_param_groups_with_overrides_and_rules_explicit_values_win():
    m = model()
    groups = [{"params": [m[0].weight, m[0].bias], "lr": 0.01},
              {"params": [m[2].weight, m[2].bias], "weight_decay": 0.25}]
    opt = lw.Optimizer(groups, lw.parse(SGD_LIKE.replace('or name ~ "bias"', "")),
                       compile=False, lr=0.2)
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[1]["lr"] == 0.2
    before = [p.detach().clone() for p in m.parameters()]
    fill_grads(m.parameters())
    opt.step()
    # group 0: lr 0.01; bias (ndim 1) gets the rule's weight decay 0.5, weight none
    w0, b0, w2, b2 = before
    torch.testing.assert_close(m[0].weight.detach(), w0 - 0.01 * m[0].weight.grad)
    torch.testing.assert_close(m[0].bias.detach(), b0 - 0.01 * (m[0].bias.grad + 0.5 * b0))
    # group 1 set weight_decay explicitly: it wins over the rule for the bias
    torch.testing.assert_close(m[2].bias.detach(), b2 - 0.2 * (m[2].bias.grad + 0.25 * b2))
    torch.testing.assert_close(m[2].weight.detach(), w2 - 0.2 * (m[2].weight.grad + 0.25 * w2))


def test_name_rule_needs_named_parameters():
    with pytest.raises(ValueError, match=r"tests the parameter's name.*named_parameters"):
        lw.Optimizer(model().parameters(), lw.parse(SGD_LIKE), compile=False)


def test_watched_values_per_name_and_parameter():
    m = model()
    opt = lw.Optimizer(m.named_parameters(), lw.parse(SGD_LIKE), compile=False,
                       record=("every", 1))
    for seed in range(3):
        fill_grads(m.parameters(), seed)
        opt.step()
    assert set(opt.watched) == {"n"}
    assert set(opt.watched["n"]) == {n for n, _ in m.named_parameters()}
    last = opt.watched["n"]["2.bias"]
    assert len(last) == 3
    assert math.isclose(last[-1], m[2].bias.grad.norm().item(), rel_tol=1e-6)
    unnamed = lw.Optimizer(model().parameters(), lw.parse(SGD_LIKE.replace('or name ~ "bias"', "")),
                           compile=False)
    ps = unnamed.param_groups[0]["params"]
    fill_grads(ps)
    unnamed.step()
    assert set(unnamed.watched["n"]) == {f"param{i}" for i in range(4)}


def test_parameters_without_gradient_are_skipped_and_keep_state():
    m = model()
    opt = lw.Optimizer(m.parameters(), "lamb", compile=False)
    fill_grads(m.parameters())
    opt.step()
    frozen = m[0].weight
    frozen.grad = None
    kept = {k: v.clone() for k, v in opt.state[frozen].items()}
    value = frozen.detach().clone()
    fill_grads([p for p in m.parameters() if p is not frozen], seed=2)
    opt.step()
    assert torch.equal(frozen.detach(), value)
    assert all(torch.equal(kept[k], opt.state[frozen][k]) for k in kept)
    assert opt.state[m[2].weight]["step"].item() == 2


def test_closure_is_called_with_grad_enabled_and_loss_returned():
    m = model()
    x = torch.randn(5, 3)
    opt = lw.Optimizer(m.parameters(), "lamb", compile=False)

    def closure():
        opt.zero_grad()
        loss = m(x).pow(2).sum()
        loss.backward()
        return loss

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor) and first.requires_grad
    assert opt.step(closure).item() < first.item()


def test_sparse_gradients_rejected_before_anything_changes():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    lin = torch.nn.Linear(3, 1)
    opt = lw.Optimizer(list(emb.parameters()) + list(lin.parameters()), "lamb", compile=False)
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    before = [p.detach().clone() for p in (*emb.parameters(), *lin.parameters())]
    with pytest.raises(ValueError, match="sparse gradient"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, (*emb.parameters(), *lin.parameters())))


def test_complex_and_integer_parameters_rejected():
    with pytest.raises(ValueError, match=r"complex.*view_as_real"):
        lw.Optimizer([torch.zeros(3, dtype=torch.complex64, requires_grad=True)], "lamb")
    with pytest.raises(ValueError, match=r"dtype torch.int64"):
        lw.Optimizer([torch.zeros(3, dtype=torch.int64)], "lamb")


@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32),
                                               (torch.float64, torch.float64),
                                               (torch.bfloat16, torch.float32)])
def test_state_dtype_rule(dtype, state_dtype):
    p = torch.nn.Parameter(torch.randn(4, 3).to(dtype))
    opt = lw.Optimizer([p], "lamb", compile=False)
    p.grad = torch.randn(4, 3).to(dtype)
    ref = p.detach().to(state_dtype).clone()
    opt.step()
    assert p.dtype == dtype
    assert opt.state[p]["m"].dtype == state_dtype and opt.state[p]["m"].shape == p.shape
    # the update is computed in the state's dtype: compare with a float64 computation
    g = p.grad.to(torch.float64)
    m, v = 0.1 * g, 0.001 * g * g
    u = (m / 0.1) / ((v / 0.001).sqrt() + 1e-6) + 0.01 * ref.double()
    tr = ref.double().norm() / u.norm()
    expected = ref.double() - 1e-3 * tr * u
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(p.detach().double(), expected.to(dtype).double(), rtol=tol, atol=tol)


def test_state_dict_round_trip_bitwise_including_bfloat16_state():
    def run(model_, opt_, steps, seed0):
        for s in range(steps):
            fill_grads(model_.parameters(), seed0 + s)
            opt_.step()

    m = model().to(torch.bfloat16)
    ref = copy.deepcopy(m)
    opt = lw.Optimizer(m.parameters(), "lamb", compile=False)
    ref_opt = lw.Optimizer(ref.parameters(), "lamb", compile=False)
    run(m, opt, 5, 0)
    run(ref, ref_opt, 10, 0)
    saved = copy.deepcopy(opt.state_dict())
    m2 = copy.deepcopy(m)
    opt2 = lw.Optimizer(m2.parameters(), "lamb", compile=False)
    opt2.load_state_dict(saved)
    assert opt2.state[next(m2.parameters())]["m"].dtype == torch.float32
    run(m2, opt2, 5, 5)
    for a, b in zip(m2.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    # the loaded dict was not aliased: stepping did not change it
    assert torch.equal(saved["state"][0]["m"], copy.deepcopy(opt.state_dict())["state"][0]["m"])


CONTRACT_PROGRAMS = sorted((__import__("pathlib").Path(__file__).parent / "programs").glob("*.lw"))


@pytest.mark.parametrize("path", CONTRACT_PROGRAMS, ids=lambda p: p.name)
def test_every_contract_program_runs(path):
    """The LANGUAGE.md programs (tests/programs/) run, not only check: two eager
    steps on a named model change every parameter and stay finite."""
    assert len(CONTRACT_PROGRAMS) >= 4
    m = model()
    before = [p.detach().clone() for p in m.parameters()]
    opt = lw.Optimizer(m.named_parameters(), lw.load(path), compile=False)
    for seed in range(2):
        fill_grads(m.parameters(), seed)
        opt.step()
    for a, p in zip(before, m.parameters()):
        assert torch.isfinite(p).all() and not torch.equal(a, p)
