"""The programs of LANGUAGE.md sections 10-12 (version 2) check and run as written.

Acceptance point of issue 12: every program in sections 10-12 checks and runs
as written, eager and compiled; ``lamb_from_parts`` equals ``lamb`` to 1e-12
relative in float64 over 10 steps; ``lamb_rowwise`` and ``lamb_per_head``
equal NumPy per-row / per-block LAMB (``reference.LambRowwise``).

* (a) every code block of sections 10-12 is a shipped preset or a file of
  tests/programs/ (a preset may add comment lines of its own), the section 11
  rule fragment is in tests/programs/lamb_relative_rules.lw, and the Python
  block runs statement by statement;
* (b) every program runs three steps, eager and compiled, on a named model
  with a fused QKV weight ``attn.qkv.weight`` (128, 16) (so ``lamb_per_head``'s
  ``row_block = 64`` applies: two heads), a conv weight, biases, a LayerNorm
  weight and a 0-d scalar; compiled equals eager to float32 rounding;
* (c) ``lamb_per_head`` and ``lamb_rowwise`` against the NumPy reference;
* (d) a ``row_block`` that does not divide dim 0 is an error at construction
  that names the parameter, and changes nothing;
* (e) ``state_dict`` round trips of programs with row and col states, and the
  shapes of those states in ``opt.state[p]``.

Compiles: each of the seven programs once in float32 (``lamb_per_head``
shares ``lamb_rowwise``'s graphs), plus ``lion`` adapted by ``trust`` for the
Python block; everything else is eager.
"""
from __future__ import annotations

import ast
import copy
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import layerwise as lw
from layerwise.resources import preset_path
from reference import Adafactor, LambRowwise
from reference.problem import make_problem, rel_err
from test_presets import as_dtype, run_layerwise

HERE = Path(__file__).parent
PROGRAMS = HERE / "programs"
LANGUAGE = HERE.parent.parent / "shared" / "LANGUAGE.md"
needs_language = pytest.mark.skipif(not LANGUAGE.is_file() and not os.environ.get("CI"),
                                    reason="shared/LANGUAGE.md is not beside this checkout")

QKV = "attn.qkv.weight"
SHAPES = {"scale": (), QKV: (128, 16), "attn.qkv.bias": (128,), "conv.weight": (4, 3, 3, 3),
          "conv.bias": (4,), "norm.weight": (16,), "norm.bias": (16,)}
#: lamb_per_head's rule `for name ~ "qkv" { row_block = 64 }` matches the QKV bias too
BLOCKS = {QKV: 64, "attn.qkv.bias": 64}
STEPS = 10
PARAMS, GRADS = make_problem(seed=0, steps=STEPS, shapes=SHAPES)
#: the programs of sections 10-12 (section 11's rule fragment is lamb_relative_rules)
CONTRACT = ["lamb_rowwise", "lamb_per_head", "adafactor", "lamb_relative_rules", "trust",
            "lamb_from_parts", "lion"]
COMPILED_RTOL = 1e-5
#: against the float64 reference, for w and for w - w0: float64 measured <= 1e-16
#: and 1e-13; float32 (from the same float32 values) 2e-7 and 1.1e-4 (w - w0 is
#: about 1e-3 w per step, and float32 rounds w to 6e-8 w)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DISPLACEMENT_TOL = {torch.float64: 1e-10, torch.float32: 1e-3}


def contract_file(name: str) -> Path:
    """tests/programs/NAME.lw if there is one, else the shipped preset NAME."""
    path = PROGRAMS / f"{name}.lw"
    if path.is_file():
        return path
    path = preset_path(name)
    assert path is not None, f"'{name}' is neither in tests/programs/ nor a preset"
    return path


class ContractModel(torch.nn.Module):
    """A fused-QKV projection, a conv, a LayerNorm and a 0-d scalar, with the
    values of ``PARAMS`` (named as ``SHAPES``)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.attn = torch.nn.Module()
        self.attn.qkv = torch.nn.Linear(16, 128)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.LayerNorm(16)
        self.to(dtype)
        with torch.no_grad():
            for n, p in self.named_parameters():
                p.copy_(torch.from_numpy(PARAMS[n]))


def set_grads(model: torch.nn.Module, k: int) -> None:
    for n, p in model.named_parameters():
        p.grad = torch.tensor(GRADS[k][n], dtype=p.dtype)


def make_optimizer(name: str, model: torch.nn.Module, compile: bool) -> torch.optim.Optimizer:
    """The contract's program ``name`` on ``model``; the adaptation ``trust``
    through ``lw.adapt`` of torch's AdamW (section 12's first Python line)."""
    if name == "trust":
        base = torch.optim.AdamW(model.parameters(), lr=2e-3, eps=1e-6, weight_decay=0.01)
        return lw.adapt(base, "trust", compile=compile)
    return lw.Optimizer(model.named_parameters(), lw.load(contract_file(name)), compile=compile)


def run(factory, steps=3, dtype=torch.float32):
    model = ContractModel(dtype)
    opt = factory(model)
    for k in range(steps):
        set_grads(model, k)
        opt.step()
    return model, opt


def assert_close_rel(a_model, a_opt, b_model, b_opt, tol, what):
    """Every parameter, state tensor and watched value of a and b agree to ``tol``
    (normwise relative, per tensor)."""
    for (n, a), (_, b) in zip(a_model.named_parameters(), b_model.named_parameters()):
        err = rel_err(a.detach().double().numpy(), b.detach().double().numpy())
        assert err <= tol, f"{what}: {n}: relative error {err:.3g} > {tol:g}"
        sa, sb = a_opt.state[a], b_opt.state[b]
        assert set(sa) == set(sb), n
        for k in sb:
            x, y = torch.as_tensor(sa[k]), torch.as_tensor(sb[k])
            assert x.shape == y.shape, f"{what}: {n}: state {k}"
            err = rel_err(x.double().numpy(), y.double().numpy())
            assert err <= tol, f"{what}: {n}: state {k}: relative error {err:.3g} > {tol:g}"
    wa, wb = getattr(a_opt, "watched", {}), getattr(b_opt, "watched", {})
    assert wa.keys() == wb.keys()
    for key in wb:
        assert wa[key].keys() == wb[key].keys()
        for n in wb[key]:
            assert rel_err(wa[key][n], wb[key][n]) <= tol, f"{what}: watched {key}[{n}]"


# --------------------------------------------------------------------------- (a) the text
def _sections(markdown: str) -> dict[str, str]:
    parts = re.split(r"(?m)^## (\d+)\. ", markdown)
    return dict(zip(parts[1::2], parts[2::2]))


def _v2_blocks() -> list[tuple[str, str, str]]:
    """(section, language, text) of every ``` block of sections 10-12."""
    sections = _sections(LANGUAGE.read_text(encoding="utf-8"))
    return [(s, lang, text) for s in ("10", "11", "12")
            for lang, text in re.findall(r"```(\w*)\n(.*?)```", sections[s], re.DOTALL)]


def _is_text_with_comments(block: str, text: str) -> bool:
    """``text`` is ``block`` with (maybe) whole comment lines added."""
    want = block.splitlines()
    i = 0
    for line in text.splitlines():
        if i < len(want) and line == want[i]:
            i += 1
        elif not line.lstrip().startswith("#"):
            return False
    return i == len(want) and text.endswith("\n") == block.endswith("\n")


@needs_language
def test_every_block_of_sections_10_to_12_is_shipped_or_tested():
    programs, fragments, python = {}, [], []
    for section, lang, text in _v2_blocks():
        head = re.match(r"(optimizer|adaptation) (\w+)", text)
        if lang == "python":
            python.append(text)
        elif head:
            programs[head.group(2)] = (section, text, head)
        else:
            fragments.append((section, text))
    assert set(programs) == set(CONTRACT) - {"lamb_relative_rules"}
    assert [s for s, _ in fragments] == ["11"] and len(python) == 1
    for name, (section, text, head) in programs.items():
        path = contract_file(name)
        shipped = path.read_text(encoding="utf-8")
        if path.parent == PROGRAMS:
            assert shipped == text, f"tests/programs/{name}.lw is not section {section}'s text"
        else:
            # a preset may document itself with comment lines of its own
            assert _is_text_with_comments(text, shipped), \
                f"preset {name} is not section {section}'s text"
        spec = lw.load(path)
        assert spec.name == name and spec.program.kind == head.group(1)
    relative = (PROGRAMS / "lamb_relative_rules.lw").read_text(encoding="utf-8")
    assert fragments[0][1] in relative
    assert relative.startswith("optimizer lamb_relative_rules extends lamb\n")


def _python_statements() -> list[str]:
    (block,) = [text for _, lang, text in _v2_blocks() if lang == "python"]
    tree = ast.parse(block)
    return [ast.get_source_segment(block, s) for s in tree.body]


def _lamb_as_in_section_1(model):
    return lw.Optimizer(model.named_parameters(), lw.load(PROGRAMS / "lamb.lw"), compile=False,
                        lr=2e-3, eps=1e-6, weight_decay=0.01)


def _lion_trust(model):
    spec = lw.parse("optimizer lion_trust extends lion\nadapt trust\n")
    return lw.Optimizer(model.named_parameters(), spec, compile=False)


#: what each statement of section 12's Python block equals (run eagerly)
PYTHON_EQUIVALENTS = {"torch.optim.AdamW(": _lamb_as_in_section_1,
                      'lw.Optimizer(model.named_parameters(), "lion")': _lion_trust}


@needs_language
def test_the_python_block_of_section_12_runs_as_written():
    """Each statement, executed as written (compiled, the default) with
    ``model``, ``torch`` and ``lw``, gives a torch optimizer whose three steps
    equal its eager equivalent to float32 rounding: AdamW adapted by trust is
    LAMB; lion adapted by trust is the program ``lion`` + ``adapt trust``."""
    statements = _python_statements()
    assert len(statements) == len(PYTHON_EQUIVALENTS)
    for source in statements:
        (equivalent,) = [f for key, f in PYTHON_EQUIVALENTS.items() if key in source]
        namespace = {"lw": lw, "torch": torch, "model": ContractModel()}
        exec(compile(source, "LANGUAGE.md", "exec"), namespace)  # noqa: S102
        opt = namespace["opt"]
        assert isinstance(opt, torch.optim.Optimizer)
        lr = 2e-3 if "AdamW" in source else lw.load("lion").hypers["lr"]
        assert [g["lr"] for g in opt.param_groups] == [lr] * len(opt.param_groups)
        model = namespace["model"]
        for k in range(3):
            set_grads(model, k)
            opt.step()
        assert all(len(v) == 1 for v in opt.watched["tr"].values())   # record="latest"
        assert len(opt.watched["tr"]) == len(SHAPES)
        ref_model, _ = run(equivalent)
        for (n, a), (_, b) in zip(model.named_parameters(), ref_model.named_parameters()):
            err = rel_err(a.detach().double().numpy(), b.detach().double().numpy())
            assert err <= COMPILED_RTOL, f"{source}: {n}: relative error {err:.3g}"


# --------------------------------------------------------------------------- (b) they run
@pytest.mark.parametrize("name", CONTRACT)
def test_contract_program_runs_eager_and_compiled(name):
    """Three steps, float32: every parameter changes and stays finite, on both
    paths; compiled equals eager to float32 rounding (inductor fuses and
    reorders reductions)."""
    eager_model, eager = run(lambda m: make_optimizer(name, m, compile=False))
    compiled_model, compiled = run(lambda m: make_optimizer(name, m, compile=True))
    for opt, flag in ((eager, False), (compiled, True)):
        assert getattr(opt, "inner", opt)._runner.compiled is flag
    for model in (eager_model, compiled_model):
        for n, p in model.named_parameters():
            assert torch.isfinite(p).all(), n
            assert not np.array_equal(p.detach().double().numpy(),
                                      PARAMS[n].astype(np.float32)), f"{n} did not change"
    assert_close_rel(compiled_model, compiled, eager_model, eager, COMPILED_RTOL,
                     f"{name} compiled vs eager")


def test_lamb_from_parts_equals_lamb_on_the_contract_model():
    """Section 12: ``lamb_from_parts`` equals section 1's ``lamb`` to 1e-12
    relative in float64 over 10 steps (w and w - w0), here on the model with
    the QKV weight, conv, biases, LayerNorm weight and a 0-d scalar."""
    def model_after(program: str) -> torch.nn.Module:
        spec = lw.load(PROGRAMS / f"{program}.lw")
        return run(lambda m: lw.Optimizer(m.named_parameters(), spec, compile=False, lr=0.01),
                   steps=STEPS, dtype=torch.float64)[0]

    runs = [model_after(p) for p in ("lamb", "lamb_from_parts")]
    for (n, a), (_, b) in zip(*(m.named_parameters() for m in runs)):
        a, b = a.detach().numpy(), b.detach().numpy()
        assert rel_err(b, a) <= 1e-12, n
        assert rel_err(b - PARAMS[n], a - PARAMS[n]) <= 1e-12, n


# --------------------------------------------------------------------------- (c) per row / head
def lamb_reference(params, grads, blocks=None):
    params = {n: np.array(v, dtype=np.float64) for n, v in params.items()}
    ref = LambRowwise(params, blocks=blocks)
    history = []
    for g in grads:
        ref.step(g)
        history.append(copy.deepcopy(params))
    return history


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name, blocks", [("lamb_per_head", BLOCKS), ("lamb_rowwise", None)])
def test_rowwise_lamb_equals_numpy_per_row_and_per_block_lamb(name, blocks, dtype):
    """lamb_per_head: one trust ratio per attention head (64 rows of the QKV
    weight and bias each), per row elsewhere; lamb_rowwise: per row
    everywhere. 10 steps, float64 to 1e-10 (w and w - w0), float32 to 1e-5
    (w) and 1e-3 (w - w0) against the float64 reference from the same float32
    values. (With row_block 32 instead of 64, w - w0 is 0.19 off.)"""
    params, grads = as_dtype(PARAMS, GRADS, dtype)
    expected = lamb_reference(params, grads, blocks)
    actual, _ = run_layerwise(lw.load(contract_file(name)), params, grads, dtype)
    tol = TOL[dtype]
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        for n in e:
            err = rel_err(a[n], e[n])
            assert err <= tol, f"step {step}, {n}: relative error {err:.3g} > {tol:g}"
            err = rel_err(a[n] - params[n], e[n] - params[n])
            assert err <= DISPLACEMENT_TOL[dtype], \
                f"step {step}, {n}: w - w0 relative error {err:.3g}"


def test_per_head_blocks_make_a_difference():
    """The comparison above means something: per head and per row differ on
    the QKV parameters (the rule matched) and agree elsewhere."""
    per_head, per_row = lamb_reference(PARAMS, GRADS, BLOCKS), lamb_reference(PARAMS, GRADS)
    for n in SHAPES:
        err = rel_err(per_head[-1][n] - PARAMS[n], per_row[-1][n] - PARAMS[n])
        assert (err > 1e-3) if n in BLOCKS else (err == 0), n
    opt = lw.Optimizer(ContractModel().named_parameters(), lw.load(contract_file("lamb_per_head")),
                       compile=False)
    blocks = {n: r.row_block for g, rules in zip(opt.param_groups, opt._rules)
              for n, r in zip(g["param_names"], rules)}
    assert blocks == {n: BLOCKS.get(n, 1) for n in SHAPES}


# --------------------------------------------------------------------------- (d) row_block errors
@pytest.mark.parametrize("value", ["48", "rows / 3", "rows / (ndim - 2)", "256"])
def test_row_block_not_dividing_dim_0_is_an_error_at_construction(value):
    """Section 11: an error at construction that names the parameter; the
    parameters are untouched and no optimizer exists. Added as a param group
    to an existing optimizer, the group is refused and the optimizer unchanged."""
    spec = lw.parse(f'optimizer bad_heads extends lamb_rowwise\nfor name ~ "qkv.weight" {{\n'
                    f"  row_block = {value}\n}}\n")
    model = ContractModel()
    before = {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"parameter {re.escape(QKV)}: row_block .* does not "
                                         r"divide its dim 0 of size 128"):
        lw.Optimizer(model.named_parameters(), spec, compile=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.data_ptr() == before[n][1], n
        assert p.grad is None

    others = [(n, p) for n, p in model.named_parameters() if n != QKV]
    opt = lw.Optimizer(others, spec, compile=False)
    groups = [(list(map(id, g["params"])), {k: v for k, v in g.items() if k != "params"})
              for g in opt.param_groups]
    with pytest.raises(ValueError, match=rf"parameter {re.escape(QKV)}: row_block"):
        opt.add_param_group({"params": [(QKV, model.attn.qkv.weight)]})
    assert [(list(map(id, g["params"])), {k: v for k, v in g.items() if k != "params"})
            for g in opt.param_groups] == groups and len(opt._rules) == 1
    set_grads(model, 0)
    opt.step()
    assert torch.equal(model.attn.qkv.weight, before[QKV][0])
    assert not torch.equal(model.conv.weight, before["conv.weight"][0])


# --------------------------------------------------------------------------- (e) state
ADAFACTOR_PER_HEAD = ('optimizer adafactor_per_head extends adafactor\nfor name ~ "qkv" {\n'
                      "  row_block = 64\n}\n")


def _spec(name: str):
    return lw.parse(ADAFACTOR_PER_HEAD) if name == "adafactor_per_head" else lw.load(name)


def expected_state_shapes(name: str) -> dict[str, dict[str, tuple]]:
    """What a user expects: ``step`` 0-d; elem states shaped as the parameter;
    a row state one number per row (dim 0, 1 for a 0-d tensor; per head with
    a row_block) and a col state one per column (numel / rows)."""
    out = {}
    for n, shape in SHAPES.items():
        if name == "lamb_rowwise":
            out[n] = {"step": (), "m": shape, "v": shape}
            continue
        block = BLOCKS.get(n, 1) if name == "adafactor_per_head" else 1
        rows = (shape[0] if shape else 1) // block
        out[n] = {"step": (), "r": (rows,), "c": (int(np.prod(shape)) // rows,)}
    return out


@pytest.mark.parametrize("name", ["adafactor", "adafactor_per_head", "lamb_rowwise"])
def test_state_dict_round_trip_with_row_and_col_states(name):
    """Save after 3 steps (through torch.save), load into a fresh optimizer on a
    copy of the model: 3 more steps equal 6 uninterrupted ones bit for bit.
    The state in ``opt.state[p]`` has the shapes a user expects, before and
    after loading."""
    def make(model):
        return lw.Optimizer(model.named_parameters(), _spec(name), compile=False)

    straight, straight_opt = run(make, steps=6)
    first, opt = run(make, steps=3)
    shapes = expected_state_shapes(name)
    for n, p in first.named_parameters():
        assert {k: tuple(v.shape) for k, v in opt.state[p].items()} == shapes[n], n
        assert all(v.dtype == torch.float32 for v in opt.state[p].values())
        assert opt.state[p]["step"].item() == 3
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = copy.deepcopy(first)
    opt2 = make(resumed)
    opt2.load_state_dict(saved)
    for n, p in resumed.named_parameters():
        assert {k: tuple(v.shape) for k, v in opt2.state[p].items()} == shapes[n], n
    for k in range(3, 6):
        set_grads(resumed, k)
        opt2.step()
    for (n, a), (_, b) in zip(resumed.named_parameters(), straight.named_parameters()):
        assert torch.equal(a, b), n
        for key, v in straight_opt.state[b].items():
            assert torch.equal(opt2.state[a][key], v), f"{n}: state {key}"


def test_adafactor_row_and_col_states_are_the_papers_factors():
    """opt.state[p]["r"] and ["c"] are Algorithm 4's R_t and C_t (float64, 3
    steps, against the NumPy reference's); for a bias or a 0-d parameter
    (one column) r is Algorithm 5's unfactored V_t and c = sum(r)."""
    model, opt = run(lambda m: lw.Optimizer(m.named_parameters(), "adafactor", compile=False),
                     dtype=torch.float64)
    params = {n: np.array(v) for n, v in PARAMS.items()}
    ref = Adafactor(params)
    for g in GRADS[:3]:
        ref.step(g)
    for n, p in model.named_parameters():
        state, want = opt.state[p], ref.state[n]
        r, c = state["r"].numpy(), state["c"].numpy()
        if "r" in want:
            assert rel_err(r, want["r"]) <= 1e-12 and rel_err(c, want["c"]) <= 1e-12, n
        else:
            v = want["v"].reshape(-1)
            assert rel_err(r, v) <= 1e-12 and rel_err(c, [v.sum()]) <= 1e-12, n
