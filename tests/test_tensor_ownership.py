"""What lw.Optimizer does to the user's tensors must be invisible: checked against torch.optim.

The runtime keeps each (dtype, device) bucket's parameters, gradients and
states in flat buffers (``layerwise/runtime/layout.py``): it *adopts*
parameters that own their storage (``p.data`` becomes a view of ``W``),
*packs* the others (copied in before the step, back after), hands out views
of ``G`` as ``p.grad``, and every step detects tensors the user replaced.
Each test runs one sequence of user actions on a model and on an independent
copy with torch.optim and compares: the "adamw" preset with default hypers is
``torch.optim.AdamW(lr=1e-3, weight_decay=0.01)``, "sgd" is
``torch.optim.SGD``. Models are float64, so ``TOL`` allows rounding only
(float32 would differ: torch fuses multiply-adds differently). All eager
(``compile=False``) except one compiled check.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import layerwise as lw

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-14)
TORCH_KEY = {"m": "exp_avg", "v": "exp_avg_sq", "buf": "momentum_buffer", "step": "step"}


def data(i, *shape, dtype=F64):
    """Deterministic values number ``i``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(i), dtype=dtype)


class Net(nn.Module):
    """Conv2d (channels_last weight, bias) -> tanh -> Linear -> a free bias."""
    io = (5, 2, 4, 4), (5, 4)                         # input and target shapes

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.conv.weight = nn.Parameter(
            self.conv.weight.detach().contiguous(memory_format=torch.channels_last))
        self.fc = nn.Linear(12, 4)
        self.shift = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1)) + self.shift


class MLP(nn.Sequential):
    io = (8, 6), (8, 3)

    def __init__(self):
        super().__init__(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


class Shared(nn.Module):
    """``w`` a strided view of a user buffer, ``u`` sharing its storage with a user tensor."""
    io = (6, 4), (6, 3)

    def __init__(self, buf, t):
        super().__init__()
        self.w = nn.Parameter(buf[:, ::2])
        self.u = nn.Parameter(t)
        self.b = nn.Parameter(torch.zeros(3, dtype=F64))

    def forward(self, x):
        return (x @ self.w) @ self.u + self.b


def pair(make=Net, dtype=F64, seed=0):
    """Two equal, independent models (deepcopy keeps channels_last)."""
    torch.manual_seed(seed)
    ours = make().to(dtype)
    return ours, copy.deepcopy(ours)


def optimizers(ours, ref, kind="adamw", compile=False, **hypers):
    mine = lw.Optimizer(ours.named_parameters(), kind, compile=compile, **hypers)
    theirs = (torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01) if kind == "adamw"
              else torch.optim.SGD(ref.parameters(), **hypers))
    return mine, theirs


def backward(model, i):
    dtype = next(model.parameters()).dtype
    x, y = data(100 + i, *model.io[0], dtype=dtype), data(500 + i, *model.io[1], dtype=dtype)
    (model(x) - y).pow(2).mean().backward()


def train(model, opt, steps, start=0, zero="opt", micro=1):
    """``steps`` steps on batches ``start...``: zero gradients (``opt``: opt.zero_grad(),
    ``model``: model.zero_grad(), ``keep``: zero_grad(set_to_none=False)), ``micro``
    accumulated backward passes, step."""
    for i in range(start, start + steps):
        if zero == "opt":
            opt.zero_grad()
        elif zero == "model":
            model.zero_grad()
        else:
            opt.zero_grad(set_to_none=False)
        for k in range(micro):
            backward(model, 10 * i + k)
        opt.step()


def assert_match(ours, ref, mine=None, theirs=None, tol=TOL):
    """Parameters (lists or modules) equal; with optimizers, their state too."""
    ours = list(ours.parameters()) if isinstance(ours, nn.Module) else ours
    ref = list(ref.parameters()) if isinstance(ref, nn.Module) else ref
    assert len(ours) == len(ref)
    for k, (p, q) in enumerate(zip(ours, ref)):
        assert (p.shape, p.dtype, p.requires_grad) == (q.shape, q.dtype, q.requires_grad)
        torch.testing.assert_close(p.detach(), q.detach(), **tol, msg=lambda m: f"param {k}: {m}")
        if mine is None:
            continue
        st, tt = mine.state.get(p, {}), theirs.state.get(q, {})
        assert bool(st) == bool(tt), f"param {k}: state {set(st)} vs torch {set(tt)}"
        for key, v in st.items():
            if key == "step":              # torch.optim.SGD keeps no step
                assert float(v) == float(tt.get("step", v)), f"param {k}: step {v} vs torch"
            else:
                torch.testing.assert_close(v, tt[TORCH_KEY[key]], **tol,
                                           msg=lambda m: f"param {k} state {key}: {m}")


# ---------------------------------------------------------------- the loop
@pytest.mark.parametrize("zero,micro", [("opt", 1), ("model", 1), ("keep", 2)])
def test_training_loop_matches_torch(zero, micro):
    """Guards the steady state: adopted parameters, gradient views handed out and
    dropped (set_to_none), or zeroed in place and accumulated into over two
    micro-batches, must update exactly as torch.optim.AdamW."""
    ours, ref = pair()
    opts = optimizers(ours, ref)
    for model, opt in zip((ours, ref), opts):
        train(model, opt, 6, zero=zero, micro=micro)
    assert_match(ours, ref, *opts)


def test_held_gradients_keep_their_values():
    """Guards against overwriting a gradient view the user still holds: ``p.grad``
    handed out at one step, or a view of it, must keep its values when later
    gradients arrive (torch never writes an old .grad)."""
    ours, ref = pair()
    mine, theirs = optimizers(ours, ref)
    held, clones = [], []
    for i in range(6):
        for model, opt in ((ours, mine), (ref, theirs)):
            opt.zero_grad()
            backward(model, i)
            opt.step()
        for k, (p, q) in enumerate(zip(ours.parameters(), ref.parameters())):
            torch.testing.assert_close(p.grad, q.grad, **TOL)
            kept = p.grad if i % 2 == 0 else p.grad[0] if k == 0 else None
            if kept is not None:            # odd steps: only a view of one gradient
                held.append(kept)
                clones.append(kept.clone())
    for k, (g, c) in enumerate(zip(held, clones)):
        assert torch.equal(g, c), f"held gradient {k} changed"
    assert_match(ours, ref, mine, theirs)


# ---------------------------------------------------------------- replaced parameters
def test_reassigned_param_data_matches_torch():
    """Guards detection of ``p.data = ...`` (a clone in new memory, new values held
    by the user): the new tensors are read and updated, the user's tensor sees
    the update, and the tensor that was ``p.data`` keeps its values, as in torch."""
    ours, ref = pair()
    opts = optimizers(ours, ref)
    replaced = []
    for model, opt in zip((ours, ref), opts):
        train(model, opt, 2)
        model.fc.weight.data = model.fc.weight.data.clone()
        train(model, opt, 2, start=2)
        old = model.conv.weight.data
        replaced.append((old, old.clone()))
        new = data(7, 3, 2, 3, 3).contiguous(memory_format=torch.channels_last)
        model.conv.weight.data = new
        train(model, opt, 2, start=4)
        assert torch.equal(new, model.conv.weight.detach())   # it is the parameter's storage
    assert_match(ours, ref, *opts)
    for side, (old, kept) in zip(("layerwise", "torch"), replaced):
        assert torch.equal(old, kept), f"{side}: the replaced p.data changed after the step"


def test_model_double_carries_state_over():
    """Guards relayout on a dtype change: after ``model.double()`` the SGD momentum
    and step must carry over (converted to float64), not restart. torch keeps
    its float32 momentum buffer (and AdamW then fails on mixed dtypes), so the
    reference converts its buffer to float64, as the runtime documents.
    lr is a power of two so that the float32 phase has no fused-rounding drift."""
    ours, ref = pair(dtype=torch.float32)
    mine, theirs = optimizers(ours, ref, "sgd", lr=2.0 ** -6, momentum=0.9)
    for model, opt in ((ours, mine), (ref, theirs)):
        train(model, opt, 3)
        model.double()
    for s in theirs.state.values():
        s["momentum_buffer"] = s["momentum_buffer"].double()
    for model, opt in ((ours, mine), (ref, theirs)):
        train(model, opt, 3, start=3)
    assert all(s["buf"].dtype == F64 and float(s["step"]) == 6 for s in mine.state.values())
    assert_match(ours, ref, mine, theirs)


def test_swap_tensors_on_a_parameter():
    """Guards detection of ``torch.utils.swap_tensors(p, new)``: ``p`` keeps its
    state and now holds the new values; the swapped-out tensor keeps its values."""
    ours, ref = pair()
    opts = optimizers(ours, ref)
    swapped_out = []
    for model, opt in zip((ours, ref), opts):
        train(model, opt, 2)
        other = nn.Parameter(data(8, 4, 12))
        torch.utils.swap_tensors(model.fc.weight, other)
        swapped_out.append((other, other.detach().clone()))
        train(model, opt, 3, start=2)
    assert_match(ours, ref, *opts)
    for side, (other, kept) in zip(("layerwise", "torch"), swapped_out):
        assert torch.equal(other.detach(), kept), f"{side}: the swapped-out tensor changed"


def test_load_state_dict_assign_with_swap():
    """Guards ``load_state_dict(assign=True)`` when torch swaps tensors: the same
    Parameter objects (and state) now share storage with the source model, which
    must see every update, as with torch.optim."""
    ours, ref = pair()
    opts = optimizers(ours, ref)
    sources = pair(seed=1)
    flag = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        for model, opt, src in zip((ours, ref), opts, sources):
            train(model, opt, 2)
            params = list(model.parameters())
            model.load_state_dict(src.state_dict(), assign=True)
            assert all(a is b for a, b in zip(params, model.parameters()))
            train(model, opt, 3, start=2)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(flag)
    assert_match(ours, ref, *opts)
    assert_match(*sources)
    for p, s in zip(ours.parameters(), sources[0].parameters()):
        assert torch.equal(p.detach(), s.detach())


def test_load_state_dict_assign_without_swap():
    """Guards the plain ``load_state_dict(assign=True)``: the module gets new
    Parameter objects the optimizer does not know; as with torch.optim they only
    accumulate gradients and the old ones are no longer updated."""
    ours, ref = pair()
    opts = optimizers(ours, ref)
    sources = pair(seed=1)
    old = []
    for model, opt, src in zip((ours, ref), opts, sources):
        train(model, opt, 2)
        old.append(list(model.parameters()))
        model.load_state_dict(src.state_dict(), assign=True)
        assert not any(a is b for a, b in zip(old[-1], model.parameters()))
        train(model, opt, 3, start=2)
    assert_match(old[0], old[1], *opts)
    assert_match(ours, ref)
    assert_match(*sources)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL)


# ---------------------------------------------------------------- packed parameters
def test_views_and_shared_storage_are_updated_like_torch():
    """Guards packed parameters: a strided view of a user buffer must leave the
    buffer's other elements alone, and a tensor sharing a parameter's storage
    must see each update, exactly as with torch.optim."""
    buf, t = data(1, 4, 10), data(2, 5, 3)
    bufs, ts = (buf, buf.clone()), (t, t.clone())
    models = [Shared(b, u) for b, u in zip(bufs, ts)]
    opts = optimizers(*models)
    for model, opt in zip(models, opts):
        train(model, opt, 5)
    assert_match(*models, *opts)
    for model, b, u in zip(models, bufs, ts):
        assert model.w.data_ptr() == b.data_ptr() and model.u.data_ptr() == u.data_ptr()
        assert torch.equal(b[:, 1::2], data(1, 4, 10)[:, 1::2])
        assert torch.equal(b[:, ::2], model.w.detach()) and torch.equal(u, model.u.detach())
    torch.testing.assert_close(bufs[0], bufs[1], **TOL)
    torch.testing.assert_close(ts[0], ts[1], **TOL)


# ---------------------------------------------------------------- user edits
def test_assigned_grads_and_state_edits_match_torch():
    """Guards detection of gradients and state the user replaced between steps:
    ``p.grad = t`` (contiguous, transposed, a strided view), ``state[p]["m"] = t``,
    ``state[p]["step"] = torch.tensor(3.)``, ``state[p] = {}`` and ``del state[p]``
    must act as the same edits to torch.optim.AdamW's state."""
    ours, ref = pair()
    mine, theirs = optimizers(ours, ref)
    grads = {"fc.weight": data(3, 12, 4).T, "conv.weight": data(4, 3, 2, 3, 6)[..., ::2],
             "conv.bias": data(5, 3), "shift": data(6, 2, 4)[1]}
    for model, opt in ((ours, mine), (ref, theirs)):
        train(model, opt, 2)
        opt.zero_grad()
        backward(model, 2)
        named = dict(model.named_parameters())
        for name, g in grads.items():
            named[name].grad = g.clone() if opt is theirs else g
        opt.step()
        train(model, opt, 1, start=3)
    assert all(torch.equal(g, h) for g, h in zip(grads.values(), (
        data(3, 12, 4).T, data(4, 3, 2, 3, 6)[..., ::2], data(5, 3), data(6, 2, 4)[1])))
    assert_match(ours, ref, mine, theirs)

    m_new = data(9, 3, 2, 3, 3)                       # contiguous, for a channels_last param
    for model, opt in ((ours, mine), (ref, theirs)):
        key = "m" if opt is mine else "exp_avg"
        opt.state[model.conv.weight][key] = m_new.clone()
        opt.state[model.fc.weight]["step"] = torch.tensor(3.)
        opt.state[model.fc.bias] = {}
        del opt.state[model.shift]
        train(model, opt, 3, start=4)
    assert_match(ours, ref, mine, theirs)


def test_adoption_changes_no_value_or_layout():
    """Guards adoption itself: after construction and steps (lr=0, so nothing may
    change), parameters keep their values, shapes, strides, dtypes and
    requires_grad, ``p.grad`` the values of the gradient it had, and
    ``data_ptr`` changes at most once (at the first step)."""
    model = Net().double()
    model.fc.bias.requires_grad_(False)
    opt = lw.Optimizer(model.named_parameters(), "adamw", compile=False, lr=0.0)
    backward(model, 0)
    params = list(model.parameters())
    before = [(p.detach().clone(), p.shape, p.stride(), p.dtype, p.requires_grad,
               None if p.grad is None else p.grad.clone()) for p in params]
    ptrs = []
    for step in range(3):
        if step:
            opt.zero_grad()
            backward(model, 0)
        opt.step()
        for p, (value, shape, stride, dtype, rg, grad) in zip(params, before):
            assert isinstance(p, nn.Parameter) and p.is_leaf
            assert (p.shape, p.stride(), p.dtype, p.requires_grad) == (shape, stride, dtype, rg)
            assert torch.equal(p.detach(), value)
            assert (p.grad is None) == (grad is None)
            assert grad is None or torch.equal(p.grad, grad)
        ptrs.append([p.data_ptr() for p in params])
    assert ptrs[0] == ptrs[1] == ptrs[2]


@pytest.mark.parametrize("through_bytes", [False, True])
def test_state_dict_round_trip_is_bit_identical(through_bytes):
    """Guards saving and resuming: 5 steps, state_dict, load into a fresh optimizer
    on a copied model (optionally through torch.save / torch.load(weights_only))
    and 5 more steps equal 10 steps bit for bit, and the saved optimizer's
    state is not aliased by the new one."""
    straight, first = pair()
    opt = lw.Optimizer(straight.named_parameters(), "adamw", compile=False)
    train(straight, opt, 10)
    first_opt = lw.Optimizer(first.named_parameters(), "adamw", compile=False)
    train(first, first_opt, 5)
    sd = first_opt.state_dict()
    if through_bytes:
        f = io.BytesIO()
        torch.save(sd, f)
        f.seek(0)
        sd = torch.load(f, weights_only=True)
    snapshot = {p: {k: v.clone() for k, v in s.items()} for p, s in first_opt.state.items()}
    second = copy.deepcopy(first)
    second_opt = lw.Optimizer(second.named_parameters(), "adamw", compile=False)
    second_opt.load_state_dict(sd)
    train(second, second_opt, 5, start=5)
    for p, q in zip(straight.parameters(), second.parameters()):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, second_opt.state[q][k]), k
    for p, s in first_opt.state.items():
        assert all(torch.equal(v, snapshot[p][k]) for k, v in s.items())


def test_compiled_sgd_matches_torch():
    """Guards the compiled runtime's handling of gradient views: SGD with momentum,
    zero_grad(set_to_none=True) and zeroing in place, equals torch.optim.SGD."""
    for zero in ("opt", "keep"):
        ours, ref = pair(MLP)
        mine, theirs = optimizers(ours, ref, "sgd", compile=True, lr=0.05, momentum=0.9)
        for model, opt in ((ours, mine), (ref, theirs)):
            train(model, opt, 5, zero=zero)
        assert_match(ours, ref, mine, theirs)


# ---------------------------------------------------------------- failed steps
def _bad_grad(model, opt):
    model.fc.weight.grad = torch.zeros_like(model.fc.weight)
    model.fc.weight.grad.data = torch.zeros(12, 4, dtype=F64)  # torch refuses p.grad = wrong


def _bad_state(model, opt):
    opt.state[model.fc.weight]["m"] = torch.zeros(3, dtype=F64)


def _bad_shape(model, opt):
    model.fc.weight.data = torch.zeros(2, 12, dtype=F64)


BREAKERS = {"grad shape": (_bad_grad, r"fc\.weight.*gradient has shape \(12, 4\)"),
            "state shape": (_bad_state, r"'m' of parameter fc\.weight"),
            "param shape": (_bad_shape, r"parameter fc\.weight has shape \(2, 12\)")}


@pytest.mark.parametrize("zero", ["opt", "keep"])
@pytest.mark.parametrize("breaker", list(BREAKERS))
def test_failed_step_changes_nothing(breaker, zero):
    """Guards atomicity: a step refused for one bad parameter (wrong gradient
    shape, wrong state shape, changed shape) among good ones raises ValueError
    naming it, and leaves parameters, ``.grad`` objects and their values, and
    every state tensor as they were."""
    model = Net().double()
    opt = lw.Optimizer(model.named_parameters(), "adamw", compile=False)
    train(model, opt, 3, zero=zero)
    opt.zero_grad(set_to_none=zero == "opt")
    backward(model, 3)
    breaks, message = BREAKERS[breaker]
    breaks(model, opt)
    params = list(model.parameters())
    before = [(p.detach().clone(), p.grad, p.grad.clone()) for p in params]
    state = {p: (dict(s), {k: v.clone() for k, v in s.items()}) for p, s in opt.state.items()}
    with pytest.raises(ValueError, match=message):
        opt.step()
    for p, (value, grad, grad_value) in zip(params, before):
        assert torch.equal(p.detach(), value) and p.grad is grad
        assert torch.equal(p.grad, grad_value)
    assert set(opt.state) == set(state)
    for p, (entries, values) in state.items():
        assert list(opt.state[p]) == list(entries)
        assert all(opt.state[p][k] is v for k, v in entries.items())
        assert all(torch.equal(opt.state[p][k], v) for k, v in values.items())


def test_tying_a_parameter_to_another_after_the_first_step_is_refused():
    """``a.data = b.data`` after the optimizer laid them out makes ``a`` a view of
    ``b``'s slot: both would be updated from the same values and one write
    would win. Refused before anything changes."""
    a, b = nn.Parameter(data(1, 4)), nn.Parameter(data(2, 4))
    opt = lw.Optimizer([("a", a), ("b", b)], "sgd", compile=False, lr=0.1)
    for p in (a, b):
        p.grad = data(3, 4)
    opt.step()
    a.data = b.data
    before = b.detach().clone()
    with pytest.raises(ValueError, match="parameter a shares memory with another parameter"):
        opt.step()
    assert torch.equal(b, before)


def test_each_tensor_handed_out_has_a_storage_of_its_own():
    """Parameters, gradients and states live in shared flat buffers, but each
    tensor handed to the user has a storage object covering just its own
    elements: savers that group tensors by storage (safetensors refuses shared
    ones; accelerate's safetensors path keeps one tensor per storage and drops
    the rest) see independent tensors, and ``torch.save`` of one parameter
    writes its own bytes, not the whole buffer."""
    ours, ref = pair()
    opt, _ = optimizers(ours, ref)
    x, y = data(7, *Net.io[0]), data(8, *Net.io[1])
    for _ in range(2):
        opt.zero_grad()
        nn.functional.mse_loss(ours(x), y).backward()
        opt.step()
    tensors = list(ours.state_dict().values())
    tensors += [p.grad for p in ours.parameters()]
    tensors += [v for st in opt.state.values() for v in st.values()]
    keys = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors}
    assert len(keys) == len(tensors)
    for t in tensors:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    buf = io.BytesIO()
    torch.save(ours.fc.weight.detach(), buf)
    assert len(buf.getvalue()) < 2000 + ours.fc.weight.numel() * 8
