"""layerwise.split on its own, eagerly (no compile): the split passes compute what
the fused graph computes, for whole parameters and for parameters cut into
shards whose partials are combined (as under FSDP2), on the presets and on
random programs; and the split that writes early states (``split_early``) likewise."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layerwise as lw
from layerwise.lower import lower
from layerwise.split import split_early, split_graph
from test_runtime_properties import programs

N = 11          # elements of the parameter; shards of 6 and 5, or 11 and 0
R, K = 5, 3     # a program with units: a (5, 3) matrix; shards of 3 and 2 rows, or 5 and 0


def _shape(lowered, kind: str) -> tuple[int, ...]:
    if not lowered.units:
        return () if kind == "layer" else (N,)
    return {"layer": (), "elem": (R, K), "row": (R, 1), "col": (1, K)}[kind]


def _inputs(lowered, seed: int) -> list[torch.Tensor]:
    """Positional inputs of the update graph: random elem (row, col) and 0-d values."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.tensor(3.0, dtype=torch.float64)
    hypers = [torch.rand((), generator=gen, dtype=torch.float64) * 0.8 + 0.1
              for _ in lowered.hyper_names]
    states = [torch.randn(_shape(lowered, kind), generator=gen, dtype=torch.float64)
              for kind in lowered.state_kinds]
    globals_ = [torch.rand((), generator=gen, dtype=torch.float64) + 0.5 for _ in lowered.globals]
    consts = list(lowered.update_consts(t, *hypers, *globals_))
    elem = [torch.randn(_shape(lowered, "elem"), generator=gen, dtype=torch.float64)
            for _ in range(3 if lowered.program.kind == "adaptation" else 2)]  # w, g (, u)
    numbers = {"rows": R, "cols": K, "ndim": 2} if lowered.units else \
        {"rows": N, "cols": 1, "ndim": 1}
    params = [torch.tensor(float(numbers[n]), dtype=torch.float64)
              for _, n in lowered.param_inputs]
    numel = R * K if lowered.units else N
    return [*elem, t, torch.tensor(float(numel), dtype=torch.float64), *params, *hypers,
            *states, *consts]


def _elem(lowered) -> set[str]:
    return {"w", "g", "u", *(s for s, kind in zip(lowered.state_names, lowered.state_kinds)
                             if kind == "elem")}


def _rows(lowered) -> int:
    return R if lowered.units else N


def _sharded(x: torch.Tensor, rows: int) -> bool:
    """Whether ``x`` is cut by a dim-0 sharding (elem and row values)."""
    return x.dim() >= 1 and x.shape[0] == rows and not (x.dim() == 2 and x.shape[0] == 1)


def _shard(inputs: list[torch.Tensor], cut: slice, rows: int) -> list[torch.Tensor]:
    return [x[cut] if _sharded(x, rows) else x for x in inputs]


def _run_sharded(split, inputs: list[torch.Tensor], cuts: list[slice], rows: int) -> list[list]:
    """Each shard's final outputs, partials combined across shards between levels
    (those of reductions along rows are each shard's own)."""
    shards = [_shard(inputs, c, rows) for c in cuts]
    reds: list[list] = [[None] * split.count for _ in cuts]
    for lv in split.levels:
        parts = [lv.graph(*x, *[r[i] for i in lv.reads]) for x, r in zip(shards, reds)]
        for k, i in enumerate(lv.computes):
            if split.spaces[i] == "row":
                for r, p in zip(reds, parts):
                    r[i] = p[k]
                continue
            column = torch.stack([p[k] for p in parts])
            value = column.sum(0) if split.combine[i] == "sum" else column.amax(0)
            for r in reds:
                r[i] = value
    return [list(split.final(*x, *r)) for x, r in zip(shards, reds)]


def _assert_sharded_equals_fused(lowered, seed: int) -> None:
    split = split_graph(lowered.update)
    if split is None:
        return
    inputs = _inputs(lowered, seed)
    fused = lowered.update(*inputs)
    n = _rows(lowered)
    for cuts in ([slice(0, n)], [slice(0, n // 2 + 1), slice(n // 2 + 1, n)],
                 [slice(0, n), slice(n, n)]):
        outs = _run_sharded(split, inputs, cuts, n)
        for j, want in enumerate(fused):
            if _sharded(want, n):
                got = torch.cat([o[j] for o in outs])
            else:
                got = outs[0][j]
                for o in outs[1:]:   # layer values: every shard agrees
                    torch.testing.assert_close(o[j], got, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, equal_nan=True,
                                       msg=f"output {j}, shards {cuts}")


def _assert_early_equals_fused(lowered, seed: int) -> None:
    keep = split_early(lowered.update, _elem(lowered), list(lowered.assigned_states))
    if keep is None:
        return
    inputs = _inputs(lowered, seed)
    fused = lowered.update(*inputs)
    first = 4 + (lowered.program.kind == "adaptation") + len(lowered.param_inputs) \
        + len(lowered.hyper_names)
    outs = keep.level(*inputs)             # every graph here sees this step's t
    count = len(keep.combine)
    partials, early = outs[:count], outs[count:]
    assert len(early) == len(keep.early)
    written = list(inputs)
    for name, value in zip(keep.early, early):   # the level pass writes early states
        written[first + lowered.state_names.index(name)] = value
    final = keep.final(*written, *partials)
    want_states = dict(zip(lowered.assigned_states, fused[1:1 + len(lowered.assigned_states)]))
    torch.testing.assert_close(final[0], fused[0], rtol=1e-10, atol=1e-12, equal_nan=True)
    for name, value in zip(keep.late, final[1:1 + len(keep.late)]):
        torch.testing.assert_close(value, want_states[name], rtol=1e-10, atol=1e-12,
                                   equal_nan=True)
    for name, value in zip(keep.early, early):
        torch.testing.assert_close(value, want_states[name], rtol=1e-10, atol=1e-12,
                                   equal_nan=True)
    for got, want in zip(final[1 + len(keep.late):], fused[1 + len(lowered.assigned_states):]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("name", lw.presets())
def test_presets_split_and_sharded_equal_fused(name):
    lowered = lower(lw.load(name).program)
    _assert_sharded_equals_fused(lowered, seed=1)
    _assert_early_equals_fused(lowered, seed=2)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(programs())
def test_random_programs_split_and_sharded_equal_fused(program):
    lowered = lower(lw.parse(program[0], filename="generated.lw").program)
    _assert_sharded_equals_fused(lowered, seed=3)
    _assert_early_equals_fused(lowered, seed=4)


def test_split_early_only_where_it_moves_fewer_bytes():
    """lamb writes m, v in the level pass and reads them back: 10 arrays
    instead of 11; lars's momentum depends on the trust ratio (no early state)."""
    def keep(name):
        lowered = lower(lw.load(name).program)
        return split_early(lowered.update, _elem(lowered), list(lowered.assigned_states))
    lamb = keep("lamb")
    assert (lamb.early, lamb.late) == (["m", "v"], [])
    assert keep("lars") is None
    paper = keep("lars_lamb_paper")
    assert paper is not None and paper.early == ["m"]


CLASH = """optimizer clash
hyper c0 = 0.5
hyper global_0 = 2
state r0 = 0
state s0 = 0
step {
  s0 = r0
  r0 = r0 + g
  w = w - c0 * (1 - c0^t) * r0 / (norm(r0) + global_norm(g) * global_0) + 0 * s0
}
"""


def test_program_names_never_clash_with_internal_placeholders():
    """A hyper named c0 or global_0 and states named r0, s0 (the runtime's own
    placeholder names) once broke the graphs or read the wrong value."""
    lowered = lower(lw.parse(CLASH, filename="clash.lw").program)
    _assert_sharded_equals_fused(lowered, seed=5)
    _assert_early_equals_fused(lowered, seed=6)
    w0 = torch.linspace(-1, 1, 7, dtype=torch.float64)
    g = torch.linspace(0.5, 2, 7, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    p.grad = g.clone()
    lw.Optimizer([p], lw.parse(CLASH), compile=False).step()
    want = w0 - 0.5 * 0.5 * g / (g.norm() + g.norm() * 2)
    torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=6), cols=st.integers(1, 9),
       seed=st.integers(0, 2**31 - 1))
def test_segment_columns_equals_numpy_per_segment(counts, cols, seed):
    """The column totals and maxima of each segment's chunks (the runtime's
    reduction along columns), against NumPy on each segment's rows; empty
    segments give zeros."""
    from layerwise.runtime.flat_ops import segment_columns
    gen = torch.Generator().manual_seed(seed)
    n = sum(counts)
    x = torch.randn(n, cols, generator=gen, dtype=torch.float64)
    counts_t = torch.tensor(counts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts_t.cumsum(0)])
    seg = torch.repeat_interleave(torch.arange(len(counts)), counts_t)
    total = segment_columns(x, seg, offsets, len(counts), "sum")
    peak = segment_columns(x.abs(), seg, offsets, len(counts), "max")
    xs = x.numpy()
    for i, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        np.testing.assert_allclose(total[i].numpy(), xs[a:b].sum(axis=0), rtol=1e-12, atol=1e-12)
        want = np.abs(xs[a:b]).max(axis=0) if b > a else np.zeros(cols)
        np.testing.assert_array_equal(peak[i].numpy(), want)
