"""The differential matrix: every preset x dtype x memory layout x path.

One optimizer per (preset, dtype, path) holds parameters in every layout a
PyTorch user can hand over, at small (one chunk) and large (hundreds of
chunks, not a multiple of the chunk length) sizes:

    contiguous, transposed, channels_last (4-D), a strided view of a bigger
    buffer, a parameter sharing its storage with a user tensor, 0-d, empty
    (two shapes), one element; large contiguous and large transposed.

Gradients arrive in other layouts than their parameters (transposed,
strided), one parameter has no gradient at one step, and a fresh gradient
tensor comes every step. After four steps every parameter, every state and
``state["step"]`` is checked:

* eager against the preset's independent NumPy reference (tests/reference),
  started from the same values: float64 normwise relative error <= 1e-12
  per tensor, float32 <= 1e-5; bfloat16 against the reference with the
  parameter rounded to bfloat16 after every step (what the runtime does:
  float32 state and arithmetic, the result rounded to the parameter's
  dtype), <= 1e-2 (one bfloat16 ulp is 2^-8 relative; a rounding that
  falls the other way gives one ulp; a wrong element moves by O(1)), with
  ``precision="nearest"`` (the default ``"master"`` is checked against
  float32 in tests/test_mixed_precision.py);
* compiled against eager: float64 <= 1e-12, float32 <= 1e-5, bfloat16 <=
  1e-2 (inductor contracts multiply-adds, so float32 rounding differs, and a
  bfloat16 rounding may fall the other way);
* adam, adamw and sgd against ``torch.optim`` (they claim equality) in
  float64 (<= 1e-12) and float32 (<= 1e-5);
* ``state["step"]`` exactly, state tensors laid out like their parameter,
  and the rest of the strided view's buffer untouched.

The presets with units (LANGUAGE.md section 10: adafactor's row and column
states, lamb_rowwise's trust ratio per row) see every parameter as its
``(rows, cols)`` matrix in logical row-major order, whatever its memory
layout: the references reshape the row-major values, so a transposed or
channels_last parameter must give what its contiguous copy gives. Their
runtime layout stores one row per chunk, row-major: their elem states have
the parameter's shape but row-major strides (a one-column parameter's are
padded, one element per chunk), a row state is ``(rows,)`` and a column
state ``(cols,)`` (``(1,)`` both for a 0-d parameter), in every layout. They
also run in float16 (float32 states and arithmetic like bfloat16; one ulp is
2^-11 relative, tolerance 2e-3).

Hypers make every update visible in bfloat16 (a relative change of about
1e-2 per step, above the 4e-3 ulp). Compiling 12 presets x 3 dtypes (and 2
in float16) costs most of this file's time (about 10 s per preset and dtype
on a cold cache).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import layerwise as lw
from reference import REFERENCES
from reference.problem import rel_err

STEPS = 4
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
HALF = (torch.bfloat16, torch.float16)      # float32 states and arithmetic, rounded results

# hypers with updates of about 1e-2 relative per step (visible in bfloat16)
HYPERS = {
    "lamb": {"lr": 0.02},
    "lambc": {"lr": 0.02},
    "nvlamb": {"lr": 0.02},
    "lars_lamb_paper": {"lr": 0.02},
    "lars": {"lr": 1.0, "trust_coefficient": 0.02, "weight_decay": 1e-3},
    "larc": {"lr": 0.1, "weight_decay": 1e-3},
    "adam": {"lr": 0.02},
    "adamw": {"lr": 0.02},
    "sgd": {"lr": 0.02, "momentum": 0.9, "weight_decay": 1e-3},
    "lion": {"lr": 0.01, "weight_decay": 0.1},
    # relative step size: max(eps2, rms(w)) * 1e-2 per step with the clipped
    # update's rms <= d = 1 (about 1e-2 relative); no gradient here is all zero,
    # so the paper's eps1 = 1e-30 does not underflow r * c in float32
    "adafactor": {},
    "lamb_rowwise": {"lr": 0.02},
}
#: presets with units: their row and column states (LANGUAGE.md section 10);
#: they also run in float16
UNITS = {"adafactor": {"r": "row", "c": "col"}, "lamb_rowwise": {}}
CASES = [(preset, d) for preset in sorted(HYPERS) for d in DTYPES
         if d != "float16" or preset in UNITS]
TORCH_EQUAL = {
    "adam": lambda ps, h: torch.optim.Adam(ps, lr=h["lr"], foreach=False),
    "adamw": lambda ps, h: torch.optim.AdamW(ps, lr=h["lr"], weight_decay=0.01, foreach=False),
    "sgd": lambda ps, h: torch.optim.SGD(ps, lr=h["lr"], momentum=h["momentum"],
                                         weight_decay=h["weight_decay"], foreach=False),
}
SKIPPED_AT = {"sometimes": 1}    # parameter name -> the step (0-based) without a gradient


def _layouts(dtype: torch.dtype, seed: int):
    """(name, parameter, keep) for every layout: ``keep`` is a tensor the test
    holds (the strided view's buffer, the storage sharer), or None."""
    gen = torch.Generator().manual_seed(seed)

    def values(*shape):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5 + 0.1).to(dtype)

    buf = values(6, 40)
    shared = values(7, 9)
    out = [
        ("contiguous", torch.nn.Parameter(values(5, 70)), None),
        ("transposed", torch.nn.Parameter(values(70, 5).t()), None),
        ("channels_last", torch.nn.Parameter(
            values(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)), None),
        ("strided_view", torch.nn.Parameter(buf[:, ::2]), buf),
        ("shares_storage", torch.nn.Parameter(shared), shared),
        ("zero_d", torch.nn.Parameter(values()), None),
        ("empty", torch.nn.Parameter(values(0)), None),
        ("empty_2d", torch.nn.Parameter(values(3, 0)), None),
        ("one", torch.nn.Parameter(values(1)), None),
        ("sometimes", torch.nn.Parameter(values(33)), None),
        ("large", torch.nn.Parameter(values(300, 301)), None),
        ("large_transposed", torch.nn.Parameter(values(301, 300).t()), None),
    ]
    return out


def _grads(shapes: dict, dtype: torch.dtype, seed: int) -> list[dict]:
    """Per step, a fresh gradient per parameter (None where skipped), given in
    another layout than row-major for some."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for k in range(STEPS):
        step = {}
        for name, shape in shapes.items():
            g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
            if name == "contiguous":                # a transposed gradient tensor
                g = g.t().contiguous().t()
            elif name == "channels_last":           # row-major for a channels_last param
                g = g.contiguous()
            elif name == "large":                   # a strided view
                g = torch.zeros(shape[0], 2 * shape[1], dtype=dtype)[:, ::2].copy_(g)
            step[name] = None if SKIPPED_AT.get(name) == k else g
        steps.append(step)
    return steps


def _run_layerwise(preset: str, dtype: torch.dtype, compile: bool):
    layouts = _layouts(dtype, seed=1)
    named = [(n, p) for n, p, _ in layouts]
    start = {n: p.detach().clone() for n, p in named}
    keep_start = {n: k.clone() for n, _, k in layouts if k is not None}
    grads = _grads({n: tuple(p.shape) for n, p in named}, dtype, seed=2)
    # 16-bit parameters: round to nearest after every step, as the references do
    # (precision="master" against float32: tests/test_mixed_precision.py)
    opt = lw.Optimizer(named, preset, compile=compile, record=("every", 1),
                       **({"precision": "nearest"} if dtype in HALF else {}), **HYPERS[preset])
    for step in grads:
        for n, p in named:
            p.grad = step[n]
        opt.step()
    return layouts, start, keep_start, grads, opt


def _reference(preset: str, start: dict, grads: list[dict], dtype: torch.dtype):
    params = {n: p.double().numpy().copy() for n, p in start.items()}
    ref = REFERENCES[preset](params, **HYPERS[preset])
    for step in grads:
        ref.step({n: None if g is None else g.double().numpy() for n, g in step.items()})
        if dtype in HALF:
            for x in params.values():
                x[...] = torch.from_numpy(x).to(dtype).double().numpy()
    return ref


def _assert_close(actual: torch.Tensor, expected, tol: float, what: str) -> None:
    a = actual.detach().double().cpu().numpy()
    e = expected.detach().double().cpu().numpy() if isinstance(expected, torch.Tensor) \
        else np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    err = rel_err(a, e)
    assert err <= tol, f"{what}: normwise relative error {err:.3g} > {tol:g}"


def _unit_shape(p: torch.Tensor) -> tuple[int, int]:
    """``(rows, cols)`` of ``p``'s matrix view (LANGUAGE.md section 10)."""
    rows = p.shape[0] if p.dim() else 1
    return rows, (p.numel() // rows if rows else int(np.prod(p.shape[1:], dtype=np.int64)))


def _check_structure(layouts, keep_start, opt, dtype, preset):
    state_dtype = torch.float32 if dtype in HALF else dtype
    for name, p, keep in layouts:
        assert p.dtype == dtype
        if name == "strided_view":                 # the other half of the buffer
            torch.testing.assert_close(keep[:, 1::2], keep_start[name][:, 1::2], rtol=0, atol=0)
            assert torch.equal(keep[:, ::2], p.detach())
        if name == "shares_storage":                # the user's tensor sees the update
            assert torch.equal(keep, p.detach())
        st = opt.state[p]
        steps = STEPS - (name in SKIPPED_AT)
        assert st["step"].shape == () and st["step"].item() == steps, name
        if preset in UNITS:
            _check_unit_states(name, p, st, UNITS[preset], state_dtype)
            continue
        for key, value in st.items():
            if key == "step" or value.dim() == 0 and p.dim() != 0:   # step, layer states
                continue
            assert value.shape == p.shape and value.dtype == state_dtype, (name, key)
            if p.numel() > 1 and name not in ("strided_view",):
                assert value.stride() == p.stride(), (name, key, value.stride(), p.stride())


def _check_unit_states(name, p, st, kinds, state_dtype):
    """A unit program's states: ``(rows,)`` per row, ``(cols,)`` per column,
    elem states shaped like ``p`` (their strides are the row layout's, not
    ``p``'s: not checked)."""
    rows, cols = _unit_shape(p)
    assert set(kinds) <= set(st), (name, sorted(st))
    for key, value in st.items():
        if key == "step":
            continue
        assert value.dtype == state_dtype, (name, key, value.dtype)
        kind = kinds.get(key, "elem")
        expected = {"row": (rows,), "col": (cols,), "elem": tuple(p.shape)}[kind]
        assert tuple(value.shape) == expected, (name, key, kind, tuple(value.shape), expected)


def _assert_paths_agree(eager, compiled, tol):
    (elayouts, _, _, _, eopt), (clayouts, _, _, _, copt) = eager, compiled
    for (name, ep, _), (_, cp, _) in zip(elayouts, clayouts):
        _assert_close(cp, ep, tol, f"compiled vs eager: {name}")
        for key in eopt.state[ep]:
            _assert_close(copt.state[cp][key], eopt.state[ep][key], tol,
                          f"compiled vs eager: state {key} of {name}")
    for watch, per_param in eopt.watched.items():
        for pname, values in per_param.items():
            _assert_close(torch.tensor(copt.watched[watch][pname], dtype=torch.float64),
                          torch.tensor(values, dtype=torch.float64), tol,
                          f"compiled vs eager: watched {watch} of {pname}")


# adafactor's reference takes the rms of an empty parameter (NumPy warns; nothing moves)
@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning",
                            "ignore:invalid value encountered in scalar divide:RuntimeWarning")
@pytest.mark.parametrize("preset,dtype_name", CASES, ids=[f"{p}-{d}" for p, d in CASES])
def test_every_layout_and_path_against_references(preset, dtype_name):
    dtype = DTYPES[dtype_name]
    tol = TOL[dtype]
    eager = _run_layerwise(preset, dtype, compile=False)
    layouts, start, keep_start, grads, opt = eager
    _check_structure(layouts, keep_start, opt, dtype, preset)
    ref = _reference(preset, start, grads, dtype)
    for name, p, _ in layouts:
        _assert_close(p, ref.params[name], tol, f"eager vs reference: {name}")
        # every non-empty parameter really moved (a test of nothing would agree too)
        assert p.numel() == 0 or not torch.equal(p.detach(), start[name]), name
    for watch, per_param in opt.watched.items():
        for pname, values in per_param.items():
            if watch in ref.watched:
                _assert_close(torch.tensor(values, dtype=torch.float64), ref.watched[watch][pname], tol,
                              f"eager vs reference: watched {watch} of {pname}")
    compiled = _run_layerwise(preset, dtype, compile=True)
    _check_structure(compiled[0], compiled[2], compiled[4], dtype, preset)
    _assert_paths_agree(eager, compiled, tol)
    if preset in TORCH_EQUAL and dtype not in HALF:
        tlayouts = _layouts(dtype, seed=1)
        tparams = [p for _, p, _ in tlayouts]
        topt = TORCH_EQUAL[preset](tparams, HYPERS[preset])
        for step in grads:
            for (n, p, _) in tlayouts:
                p.grad = None if step[n] is None else step[n].clone()
            topt.step()
        for (name, p, _), (_, tp, _) in zip(layouts, tlayouts):
            _assert_close(p, tp, tol, f"eager vs torch.optim: {name}")
