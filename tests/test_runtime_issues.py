"""Regression tests for bugs reported against the old runtime.

Each test names the symptom it guards against: wrong elements updated for
non-contiguous parameters, writes outside strided views, a compiled float64
step that never advanced ``t``, failures under an outer ``torch.compile``,
non-atomic failing steps and ``load_state_dict`` accepting bad state, a
per-tensor cost of the step, and per-parameter host synchronisations.

Cold compiles cost 10-20 s each, so the compiled path uses the ``lamb``,
``sgd``, ``nvlamb`` and ``lars`` presets (their runners are cached and shared
with other test files) and one program of this file (``PROBE``, with a layer
state and a watch), compiled under inductor's kernel profiling so that its
generated C++ kernels show up as profiler events.
"""
from __future__ import annotations

import collections
import copy
import re

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import layerwise as lw
from layerwise.runtime import execute
from layerwise.runtime.execute import eager_block
from layerwise.runtime.layout import CHUNK

PROBE = lw.parse("""optimizer runtime_issues_probe
hyper lr   = 0.01 in (0, inf)
hyper beta = 0.9  in [0, 1)
state m = 0
state s : layer = 0
watch tr
step {
  m = beta * m + (1 - beta) * g
  s = beta * s + (1 - beta) * norm(g)
  tr = where(norm(w) > 0 and norm(m) > 0, norm(w) / norm(m), 1)
  w = w - lr * tr * m - lr * 0.01 * s * sign(w)
}
""")
KERNEL_PROFILE = {"cpp.enable_kernel_profile": True}
COMPILE = pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
# 0-d, empty, one element, vectors and matrices above/below/at 256, a conv weight
SHAPES = [(), (0,), (1,), (7,), (256,), (300,), (3, 5), (16, 16), (33, 129), (8, 3, 3, 3)]


def mixed(n: int, seed: int = 0, dtype=torch.float32) -> list[nn.Parameter]:
    """``n`` parameters cycling through SHAPES, each with a gradient."""
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(SHAPES[i % len(SHAPES)], generator=gen, dtype=dtype))
              for i in range(n)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
    return params


def clone_params(params):
    out = [nn.Parameter(p.detach().clone()) for p in params]
    for q, p in zip(out, params):
        q.grad = None if p.grad is None else p.grad.clone()
    return out


def snapshot(opt: lw.Optimizer, params) -> dict:
    """Copies of everything a failed step or load must leave alone."""
    return {"params": [p.detach().clone() for p in params],
            "grads": [None if p.grad is None else p.grad.clone() for p in params],
            "state": [{k: v.clone() if isinstance(v, torch.Tensor) else v
                       for k, v in opt.state[p].items()} for p in params],
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]}


def assert_same_snapshot(a: dict, b: dict) -> None:
    for x, y in zip(a["params"], b["params"]):
        assert torch.equal(x, y)
    for x, y in zip(a["grads"], b["grads"]):
        assert (x is None and y is None) or torch.equal(x, y)
    for sa, sb in zip(a["state"], b["state"]):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k
    assert a["groups"] == b["groups"]


# ------------------------------------------------------------------ 1. layouts
@COMPILE
def test_transposed_parameter_updates_the_right_element(compile):
    """Old bug: a transposed (non-contiguous) parameter had the wrong
    elements updated. One SGD step with lr=1 must equal torch.optim.SGD bitwise."""
    p = nn.Parameter(torch.zeros(4, 3).t())
    g = torch.zeros(3, 4)
    g[0, 1] = 1
    p.grad = g
    lw.Optimizer([p], "sgd", compile=compile, lr=1).step()
    ref = nn.Parameter(torch.zeros(4, 3).t())
    ref.grad = g.clone()
    torch.optim.SGD([ref], lr=1).step()
    assert p[0, 1].item() == -1.0
    assert torch.equal(p, ref)


def train_conv(spec, channels_last, dtype, compile, steps=3):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3).to(dtype)
    x = torch.randn(5, 3, 9, 9, dtype=dtype, generator=torch.Generator().manual_seed(1))
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = lw.Optimizer(conv.parameters(), spec, compile=compile, lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        (conv(x) ** 2).mean().backward()
        opt.step()
    return conv, opt


@COMPILE
@pytest.mark.parametrize("spec, dtype, rtol", [("sgd", torch.float32, 0.0),
                                               ("lamb", torch.float32, 1e-6),
                                               ("lamb", torch.float64, 1e-12)])
def test_channels_last_conv_matches_contiguous(spec, dtype, rtol, compile):
    """Old bug: a channels_last Conv2d weight was updated in the wrong element
    order. Training it must match the contiguous conv (sgd: bitwise, the update
    is elementwise; lamb: the norms sum in another order), and the weight and
    its elem state must stay channels_last."""
    ref, _ = train_conv(spec, False, dtype, compile)
    conv, opt = train_conv(spec, True, dtype, compile)
    for a, b in zip(conv.parameters(), ref.parameters()):
        # atol scaled to the tensor: elements near zero (w - lr * tr * u cancels)
        # have large relative errors from a one-ulp change of tr
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.detach().abs().max()))
    cl = torch.channels_last
    assert conv.weight.is_contiguous(memory_format=cl)
    state = opt.state[conv.weight]
    assert state["m" if spec == "lamb" else "buf"].is_contiguous(memory_format=cl)


# ------------------------------------------------------------------ 2. strided views
@COMPILE
def test_strided_view_parameter_writes_only_its_elements(compile):
    """Old bug: the step of a strided-view parameter wrote outside it (into
    the skipped columns of its base)."""
    buf = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    before = buf.clone()
    v = nn.Parameter(buf[:, ::2])
    ref = nn.Parameter(before.clone()[:, ::2])
    hypers = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    opt = lw.Optimizer([v], "sgd", compile=compile, **hypers)
    ref_opt = torch.optim.SGD([ref], **hypers)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        g = torch.randn(4, 3, generator=gen)
        v.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert torch.equal(buf[:, 1::2], before[:, 1::2])
    # torch's add_(alpha=) may contract into an FMA: float32 rounding only
    torch.testing.assert_close(v.detach(), ref.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(buf[:, ::2], v.detach())


# ------------------------------------------------------------------ 3. float64 compiled
def run_steps(spec, params, compile, steps=4, steps_seen=None):
    opt = lw.Optimizer(params, spec, compile=compile, record=("every", 1))
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
        if steps_seen is not None:
            steps_seen.append([float(opt.state[p]["step"]) for p in params])
    return opt


@pytest.mark.parametrize("spec", ["lamb", "nvlamb"])
def test_compiled_float64_advances_t_and_matches_eager(spec):
    """Old bug: the compiled float64 step never advanced ``t``, so its bias
    corrections stayed at step 1 and results drifted from the eager path."""
    base = mixed(12, seed=3, dtype=torch.float64)
    seen = []
    compiled_params, eager_params = clone_params(base), clone_params(base)
    copt = run_steps(spec, compiled_params, True, steps_seen=seen)
    eopt = run_steps(spec, eager_params, False)
    assert seen == [[float(k)] * len(base) for k in (1, 2, 3, 4)]
    for cp, ep in zip(compiled_params, eager_params):
        torch.testing.assert_close(cp, ep, rtol=1e-12, atol=1e-14)
        assert copt.state[cp].keys() == eopt.state[ep].keys()
        for k, v in eopt.state[ep].items():
            torch.testing.assert_close(copt.state[cp][k], v, rtol=1e-12, atol=1e-14, msg=k)
    assert copt.watched.keys() == eopt.watched.keys() == set(lw.load(spec).program.watches)
    for name, per_param in eopt.watched.items():
        assert per_param and copt.watched[name].keys() == per_param.keys()
        for pname, values in per_param.items():
            assert len(values) == 4
            torch.testing.assert_close(copt.watched[name][pname], values, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ 4. outer torch.compile
def outer_compile_run(compile, mode, steps=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = lw.Optimizer(model.parameters(), "lamb", compile=compile, lr=0.01)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=gen), torch.randn(16, 2, generator=gen))
            for _ in range(steps)]

    def train_step(x, y):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    compiled_opt_step = torch.compile(lambda: opt.step())
    compiled_train_step = torch.compile(train_step)
    for x, y in data:
        if mode == "plain":
            train_step(x, y)
        elif mode == "compiled_train_step":
            compiled_train_step(x, y)
        else:                               # the docs' recipe: compile opt.step only
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            compiled_opt_step()
    return list(model.parameters()), opt


@COMPILE
@pytest.mark.parametrize("mode", ["compiled_opt_step", "compiled_train_step"])
def test_outer_torch_compile(compile, mode):
    """Old bug: calling ``opt.step()`` inside an outer ``torch.compile`` failed.
    Both recipes of PyTorch's "Compiling the optimizer" must run and give
    the parameters of the plain loop."""
    ref, _ = outer_compile_run(compile, "plain")
    params, opt = outer_compile_run(compile, mode)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert float(opt.state[p]["step"]) == 3.0


# ------------------------------------------------------------------ 5. atomicity
def probe_opt(compile=False, spec=PROBE):
    params = [nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0))),
              nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(1)))]
    named = [("a", params[0]), ("b", params[1])]
    opt = lw.Optimizer(named, spec, compile=compile)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


def bad_entry(sd, index, key, value):
    sd = copy.deepcopy(sd)
    if value is KeyError:
        del sd["state"][index][key]
    else:
        sd["state"][index][key] = value
    return sd


@pytest.mark.parametrize("index, key, value", [
    (0, "s", torch.zeros(3)),           # layer state of the wrong shape
    (1, "m", torch.zeros(2, 2)),        # elem state of the wrong shape
    (0, "s", KeyError),                 # a missing key
    (1, "extra", torch.zeros(())),      # an unknown key
], ids=["layer-shape", "elem-shape", "missing", "unknown"])
def test_load_state_dict_rejects_bad_state_and_changes_nothing(index, key, value):
    """Old bug: load_state_dict accepted state that did not fit (and the step
    failed later, or silently broadcast it). Now a ValueError names the
    parameter and the key, and nothing changes."""
    params, opt = probe_opt()
    sd = bad_entry(opt.state_dict(), index, key, value)
    before = snapshot(opt, params)
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(sd)
    message = str(info.value)
    assert re.search(rf"parameter ({index}|{'ab'[index]})\b", message), message
    assert f"'{key}'" in message, message
    assert_same_snapshot(before, snapshot(opt, params))


@pytest.mark.parametrize("spec, patterns", [("sgd", [r"parameter (0|a)\b", "'buf'", "'m'"]),
                                            ("lambc", ["trust_clip"])])
def test_load_state_dict_of_another_program_is_rejected(spec, patterns):
    """Old bug: the state dict of another program was accepted. lamb's state
    (m, v) into sgd (buf) must fail naming the keys; lamb's param groups into
    lambc (the same state, one more hyper: trust_clip) must fail naming
    trust_clip, not leave groups without it that break the next step."""
    _, lamb = probe_opt(spec="lamb")
    sd = lamb.state_dict()
    params, other = probe_opt(spec=spec)
    before = snapshot(other, params)
    with pytest.raises(ValueError) as info:
        other.load_state_dict(sd)
    assert all(re.search(w, str(info.value)) for w in patterns), str(info.value)
    assert_same_snapshot(before, snapshot(other, params))


def test_load_state_dict_accepts_numbers_for_layer_state_and_step():
    """A Python float as a layer state and an int ``step`` are numbers: loaded
    into a fresh optimizer, the next steps equal exactly those of the original
    optimizer (and of loading its tensors)."""
    params, opt = probe_opt()
    sd = copy.deepcopy(opt.state_dict())
    numbers = copy.deepcopy(sd)
    for entry in numbers["state"].values():
        entry["s"], entry["step"] = float(entry["s"]), int(entry["step"])
        assert entry["s"] != 0 and entry["step"] == 2
    runs = [(params, opt)]
    for state_dict in (sd, numbers):
        copies = [nn.Parameter(p.detach().clone()) for p in params]
        fresh = lw.Optimizer([("a", copies[0]), ("b", copies[1])], PROBE, compile=False)
        fresh.load_state_dict(state_dict)
        runs.append((copies, fresh))
    for ps, o in runs:
        gen = torch.Generator().manual_seed(5)
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            o.step()
    (ref, ref_opt), *others = runs
    for ps, o in others:
        for x, y in zip(ps, ref):
            assert torch.equal(x, y)
            assert o.state[x].keys() == ref_opt.state[y].keys()
            for k in ref_opt.state[y]:
                assert torch.equal(o.state[x][k], ref_opt.state[y][k]), k


@COMPILE
@pytest.mark.parametrize("failure", ["grad-shape", "hyper-range"])
def test_failing_step_changes_nothing(compile, failure):
    """Old bug: a step that raised had already updated some parameters (or
    their state, or ``step``). Now it changes no parameter, gradient or state."""
    params = mixed(6, seed=4)
    opt = lw.Optimizer([{"params": params[:3]}, {"params": params[3:]}], "lamb",
                       compile=compile)
    for _ in range(2):
        opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    if failure == "grad-shape":
        params[-1].grad.data = torch.randn(params[-1].numel() + 1)  # torch refuses `.grad =`
    else:
        opt.param_groups[1]["eps"] = 0.0
    before = snapshot(opt, params)
    with pytest.raises(ValueError):
        opt.step()
    assert_same_snapshot(before, snapshot(opt, params))


# ------------------------------------------------------------------ 6. constant cost
def step_events(params, opt, fresh: bool) -> collections.Counter:
    """Event names of one steady-state step, after three warm-up steps.
    ``fresh``: new (seeded) gradients before every step, else the same ones.
    Events inside ``aten::_foreach_copy_`` are left out: on the CPU it is a
    loop of one ``aten::copy_`` per tensor (one multi-tensor kernel on GPUs)."""
    gen = torch.Generator().manual_seed(11)
    for k in range(4):
        if fresh:
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if k < 3:
            opt.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    names = collections.Counter()
    for e in prof.events():
        parent, inside = e.cpu_parent, False
        while parent is not None and not inside:
            inside, parent = parent.name == "aten::_foreach_copy_", parent.cpu_parent
        if not inside:
            names[e.name] += 1
    return names


@pytest.fixture
def kernel_profile(monkeypatch):
    """PROBE compiles (on its first compiled step, in the first test using
    this) with inductor's C++ kernels emitting profiler events. The eager
    path runs in blocks of ``EAGER_ELEMENTS`` values (a cost that grows with
    the model's size, not its tensor count): here one block holds all."""
    monkeypatch.setattr(execute, "EAGER_ELEMENTS", 1 << 22)
    with torch._inductor.config.patch(KERNEL_PROFILE):
        yield


def probe_events(n: int, compile: bool, fresh: bool) -> collections.Counter:
    params = mixed(n, seed=n)
    assert sum(-(-p.numel() // CHUNK) for p in params) < eager_block(CHUNK)  # one eager block
    return step_events(params, lw.Optimizer(params, PROBE, compile=compile), fresh)


@COMPILE
def test_step_cost_does_not_grow_with_parameter_count(kernel_profile, compile):
    """Old bug: the step cost grew with the number of tensors (per-parameter
    kernels and ops). One steady-state step of 10 and of 300 parameters of
    mixed shapes must run the same events: compiled regions (at most 4; one
    per pass), inductor's C++ kernels and aten ops."""
    counts = {n: probe_events(n, compile, False) for n in (10, 300)}
    print(f"\ncompile={compile}: {sum(counts[10].values())} events for 10 parameters, "
          f"{sum(counts[300].values())} for 300\n", sorted(counts[10].items()))
    assert counts[10] == counts[300], (counts[300] - counts[10], counts[10] - counts[300])
    regions = sum(v for k, v in counts[10].items() if k.startswith("Torch-Compiled Region"))
    kernels = sum(v for k, v in counts[10].items() if "cpp_fused" in k)
    if compile:
        assert 1 <= regions <= 4 and kernels >= 1, (regions, kernels)
    else:
        assert regions == kernels == 0


@COMPILE
def test_fresh_gradients_cost_only_a_constant_number_of_copies(kernel_profile, compile):
    """With fresh gradients every step the extra events, over kept gradients,
    are a constant number (at most 4) of copies, whatever the number of
    parameters."""
    extra = {n: probe_events(n, compile, True) - probe_events(n, compile, False)
             for n in (10, 300)}
    print("\nextra events with fresh gradients:", dict(extra[10]), dict(extra[300]))
    assert extra[10] == extra[300]
    assert set(extra[10]) <= {"aten::_foreach_copy_", "aten::copy_"}
    assert 1 <= sum(extra[10].values()) <= 4


# ------------------------------------------------------------------ 7. host syncs
SYNCS = {"aten::item", "aten::_local_scalar_dense"}


@COMPILE
@pytest.mark.parametrize("fresh", [False, True], ids=["grads-kept", "grads-fresh"])
def test_no_host_sync_in_steady_state_step(compile, fresh):
    """Old bug: each step synchronised with the host once per parameter
    (``.item()`` for ``t``, hypers and watched values). A steady-state step of
    lars (which watches ``tr``; lamb has no watch, and ``watch tr`` cannot be
    added to it: its trust ratio is no local) runs no ``aten::item`` at all,
    and the watched values read afterwards are those of the eager path."""
    for n in (10, 300):
        params = mixed(n, seed=n)
        eager_params = clone_params(params)
        opt = lw.Optimizer(params, "lars", compile=compile, record=("every", 1))
        events = step_events(params, opt, fresh)
        assert not SYNCS & set(events), {k: events[k] for k in SYNCS}
        eager = lw.Optimizer(eager_params, "lars", compile=False, record=("every", 1))
        step_events(eager_params, eager, fresh)
        tr, ref = opt.watched["tr"], eager.watched["tr"]
        assert tr.keys() == ref.keys() and len(ref) == n
        for name in ref:
            assert len(tr[name]) == 4
            torch.testing.assert_close(tr[name], ref[name], rtol=1e-5, atol=1e-7)
