"""Checker unit tests: names, kinds, def inlining, extends/overrides, the Python API, SpecError."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import layerwise as lw
from layerwise.check import CheckedProgram, check_program
from layerwise.errors import SpecError
from layerwise.syntax import Binary, Call, Name, Num, Str, Unary, format_expr, parse_text

HERE = Path(__file__).parent
PROGRAMS = HERE / "programs"
LANGUAGE = HERE.parent.parent / "shared" / "LANGUAGE.md"

PRELUDE = """optimizer p
hyper lr = 0.1 in (0, inf)
hyper wd = 0.01
state m = 0
state v = 1
state s : layer = 0
"""


def check(text: str, filename: str = "<test>") -> CheckedProgram:
    return lw.parse(text, filename).program


def step_of(body: str, decls: str = "") -> dict[str, object]:
    """The checked step of PRELUDE + decls + body, as {target: value} (last assignment wins)."""
    prog = check(PRELUDE + decls + "step {\n" + body + "\n}\n")
    return {a.target: a.value for a in prog.step}


def kind_of(src: str, decls: str = "") -> str:
    return step_of(f"  x = {src}\n  w = w - lr * g", decls)["x"].kind


def nodes(e):
    yield e
    for c in ((e.operand,) if isinstance(e, Unary) else (e.left, e.right)
              if isinstance(e, Binary) else e.args if isinstance(e, Call) else ()):
        yield from nodes(c)


def errors(text: str, filename: str = "<test>") -> SpecError:
    with pytest.raises(SpecError) as info:
        lw.parse(text, filename)
    return info.value


# ---------------------------------------------------------------- kinds
@pytest.mark.parametrize("src,kind", [
    ("1", "const"), ("lr", "const"), ("t", "const"), ("1 + lr * t", "const"),
    ("-lr^2", "const"), ("min(lr, 2)", "const"), ("sqrt(wd) + exp(t)", "const"),
    ("lr > 0 and not wd == 1", "const"), ("inf", "const"), ("true", "const"),
    ("global_norm(g)", "global"), ("global_sum(w * g)", "global"),
    ("lr * global_norm(g)", "global"), ("global_norm(s)", "global"),
    ("where(global_norm(g) > 1, 1 / global_norm(g), 1)", "global"),
    ("norm(w)", "layer"), ("s", "layer"), ("sum(g)", "layer"), ("mean(g^2)", "layer"),
    ("rms(m)", "layer"), ("max_abs(g)", "layer"), ("dot(w, g)", "layer"), ("numel(w)", "layer"),
    ("norm(w) + global_norm(g)", "layer"), ("norm(w) > 0 and lr > 0", "layer"),
    ("where(norm(w) > 0, norm(w) / norm(g), 1)", "layer"), ("min(s, lr)", "layer"),
    ("w", "elem"), ("g", "elem"), ("m", "elem"), ("m / v", "elem"), ("sqrt(v) + lr", "elem"),
    ("norm(w) * g", "elem"), ("clip(g, -lr, lr)", "elem"), ("where(g > 0, 1, -1)", "elem"),
    ("s * g", "elem"), ("-g", "elem"), ("global_norm(g) * w", "elem"),
    ("abs(sign(g)) + rsqrt(v) + log(v) + sin(w) + cos(w) + tanh(w)", "elem"),
])
def test_kinds(src, kind):
    assert kind_of(src) == kind


def test_every_checked_node_has_a_kind():
    text = (PROGRAMS / "lamb.lw").read_text(encoding="utf-8")
    prog = check(text)
    for a in prog.step:
        for n in nodes(a.value):
            assert n.kind in ("const", "global", "layer", "elem"), n
    for s in prog.states:
        assert all(n.kind is not None for n in nodes(s.init))


def test_kind_is_the_widest_operand():
    value = step_of("  x = lr * norm(w) + g\n  w = w - x")["x"]
    assert value.kind == "elem"
    assert value.left.kind == "layer" and value.left.left.kind == "const"
    assert value.right.kind == "elem"


def test_locals_carry_their_kind():
    step = step_of("  a = norm(w)\n  b = a * 2\n  c = b * g\n  d = global_norm(g) * lr\n"
                   "  w = w - c * d")
    assert [step[k].kind for k in "abcd"] == ["layer", "layer", "elem", "global"]
    assert step["b"].left == Name("a", "layer")


def test_rebinding_g_changes_its_kind_for_the_rest_of_the_step():
    step = step_of("  g = norm(g)\n  x = g * 2\n  w = w - lr * x")
    assert step["x"].kind == "layer"
    err = errors(PRELUDE + "step {\n  g = g * 2\n  w = w - g / global_norm(g)\n}\n")
    assert "'g' is computed earlier in this step" in err.message


def test_final_w_may_be_narrower_than_elem():
    step = step_of("  w = norm(w) * lr")
    assert step["w"].kind == "layer"
    assert step_of("  w = lr")["w"].kind == "const"


def test_layer_state_accepts_layer_and_narrower_values():
    step = step_of("  s = 0.9 * s + 0.1 * norm(g)\n  w = w - lr * s * g")
    assert step["s"].kind == "layer"
    assert step_of("  s = t\n  w = w - g")["s"].kind == "const"


def test_state_inits():
    prog = check(PRELUDE + "state w_slow = w\nstate k : layer = norm(w) * lr\n"
                 "step {\n  w = w - g\n}\n")
    inits = {s.name: s for s in prog.states}
    assert inits["w_slow"].init == Name("w", "elem") and not inits["w_slow"].layer
    assert inits["k"].layer and inits["k"].init.kind == "layer" and inits["k"].kind == "layer"
    assert inits["m"].init == Num(0.0, "const") and inits["m"].kind == "elem"


# ---------------------------------------------------------------- defs
def test_defs_are_inlined_everywhere():
    prog = lw.load(PROGRAMS / "lamb.lw").program
    defs = {"phi", "ratio", "trust"}
    for a in prog.step:
        assert not any(isinstance(n, Call) and n.func in defs for n in nodes(a.value))
    w = prog.step[-1]
    assert w.target == "w"
    assert format_expr(w.value) == ("w - lr * where(norm(w) > 0 and norm(u) > 0, "
                                    "norm(w) / norm(u), 1) * u")


def test_def_reads_a_step_local_at_its_call_site():
    step = step_of("  u = g * 2\n  w = w - upd()", "def upd() = lr * u\n")
    assert step["w"] == Binary("-", Name("w", "elem"),
                               Binary("*", Name("lr", "const"), Name("u", "elem"), "elem"), "elem")


def test_def_reading_a_local_before_it_is_assigned_names_the_call():
    err = errors(PRELUDE + "def upd() = lr * u\nstep {\n  w = w - upd()\n  u = g\n}\n")
    assert (err.line, err.column) == (7, 18)
    assert err.message == "'u' is used before it is assigned (in def 'upd' called at line 9)"


def test_def_calling_a_def():
    decls = "def sq(x) = x * x\ndef nrm(x) = sqrt(sum(sq(x)))\ndef unit(x) = x / nrm(x)\n"
    step = step_of("  w = w - lr * unit(g)", decls)
    assert format_expr(step["w"]) == "w - lr * (g / sqrt(sum(g * g)))"
    assert step["w"].kind == "elem"


def test_def_arguments_are_substituted_and_shadow_outer_names():
    step = step_of("  w = w - f(g, norm(g))", "def f(w, x) = w * x + x\n")
    assert format_expr(step["w"]) == "w - (g * norm(g) + norm(g))"


def test_def_argument_kind_follows_the_argument():
    decls = "def twice(x) = 2 * x\n"
    step = step_of("  a = twice(lr)\n  b = twice(norm(g))\n  c = twice(g)\n  w = w - c", decls)
    assert [step[k].kind for k in "abc"] == ["const", "layer", "elem"]


def test_a_global_reduction_inside_a_def():
    step = step_of("  w = w - lr * g / gn(g + m)", "def gn(x) = global_norm(x)\n")
    assert step["w"].right.right == Call("global_norm", (Binary(
        "+", Name("g", "elem"), Name("m", "elem"), "elem"),), "global")


def test_an_unused_def_is_checked_for_unknown_functions_and_arity():
    err = errors(PRELUDE + "def f(x) = nrom(x) + clip(x, 1)\nstep {\n  w = w - g\n}\n")
    assert [(p.span.line, p.span.column) for p in err.problems] == [(7, 12), (7, 22)]
    assert "unknown function 'nrom'; did you mean 'norm'?" in err.problems[0].message
    assert "clip() takes 3 arguments, got 2" in err.problems[1].message


def test_a_fault_inside_a_def_called_twice_is_reported_once():
    err = errors(PRELUDE + "def f(x) = x * bogus\nstep {\n  a = f(g)\n  w = w - f(a)\n}\n")
    assert len(err.problems) == 1
    assert err.message == "unknown name 'bogus' (in def 'f' called at line 9)"


# ---------------------------------------------------------------- state reads and writes
def test_state_reads_before_and_after_its_assignment():
    step = check(PRELUDE + "step {\n  old = m\n  m = 0.9 * m + g\n  new = m\n"
                 "  w = w - lr * (new - old)\n}\n").step
    assert [a.target for a in step] == ["old", "m", "new", "w"]
    # reads on either side of the assignment are the same name, in step order:
    # the lowering gives the first the previous step's value, the second the new one
    assert step[0].value == Name("m", "elem") and step[2].value == Name("m", "elem")
    assert step[1].value.left.right == Name("m", "elem")


def test_global_reduction_sees_a_state_only_before_its_assignment():
    ok = check(PRELUDE + "step {\n  n = global_norm(m)\n  m = 0.9 * m + g\n"
               "  w = w - lr * m / n\n}\n")
    assert ok.step[0].value.kind == "global"
    err = errors(PRELUDE + "step {\n  m = 0.9 * m + g\n  n = global_norm(m)\n"
                 "  w = w - lr * m / n\n}\n")
    assert (err.line, err.column) == (9, 19)
    assert "'m' is computed earlier in this step" in err.message
    err = errors(PRELUDE + "step {\n  w = w - lr * g\n  n = global_norm(w)\n}\n")
    assert "'w' is computed earlier in this step" in err.message


def test_global_reduction_of_a_layer_state_and_of_hypers_times_w():
    step = step_of("  a = global_sum(s)\n  b = global_norm(lr * w + t)\n  w = w - a * b * g")
    assert step["a"].kind == step["b"].kind == "global"


def test_a_failed_local_does_not_cascade():
    err = errors(PRELUDE + "watch tr\nstep {\n  tr = nrom(g)\n  u = tr * g\n  w = w - u\n}\n")
    assert [p.message for p in err.problems] == ["unknown function 'nrom'; did you mean 'norm'?"]


# ---------------------------------------------------------------- rules and watches
def test_rules_and_watches():
    prog = lw.load(PROGRAMS / "lamb_rules.lw").program
    (rule,) = prog.rules
    assert rule.assigns == (("weight_decay", Num(0.0, "const")),) and rule.relative == (False,)
    assert rule.uses_name
    assert rule.predicate.right == Binary("~", Name("name", "const"),
                                          Str("bias|LayerNorm|layer_norm", "const"), "const")
    prog = check(PRELUDE + "for ndim >= 2 and numel > 1000 {\n  lr = 0.2 * lr\n  wd = -1\n}\n"
                 "watch tr, s, n\nstep {\n  tr = norm(w) / norm(g)\n  n = global_norm(g)\n"
                 "  w = w - lr * tr * g\n}\n")
    (rule,) = prog.rules
    assert [t for t, _ in rule.assigns] == ["lr", "wd"] and not rule.uses_name
    assert rule.relative == (True, False)
    assert prog.watches == ("tr", "s", "n")


def test_rule_values_are_checked_against_ranges():
    err = errors(PRELUDE + "hyper b = 0.5 in [0, 1]\nfor ndim <= 1 {\n  b = 2 - 0.5\n}\n"
                 "step {\n  w = w - b * g\n}\n")
    assert (err.line, err.column) == (9, 7)
    assert err.message == "1.5 is outside the range [0, 1] of hyper 'b'"


def test_rule_may_not_freeze_lr():
    """LANGUAGE.md section 11: a hyper-free value for lr is an error that
    suggests writing it relative to lr."""
    err = errors(PRELUDE + "for ndim <= 1 {\n  lr = 0.2\n}\nstep {\n  w = w - lr * g\n}\n")
    assert (err.line, err.column) == (8, 8)
    assert "may not set 'lr' to a value of its own" in err.message
    assert "lr = 0.2 * lr" in err.message


# ---------------------------------------------------------------- extends and overrides
def test_lamb_clipped_extends_lamb():
    spec = lw.load(PROGRAMS / "lamb_clipped.lw")
    lamb = lw.load("lamb")
    assert spec.name == "lamb_clipped"
    assert list(spec.hypers) == [*lamb.hypers, "gamma_u"]
    assert spec.program.hyper("gamma_u").default == 10
    assert str(spec.program.hyper("gamma_u").range) == "(0, inf)"
    assert spec.program.states == lamb.program.states
    assert spec.program.step[:-1] == lamb.program.step[:-1]
    assert format_expr(spec.program.step[-1].value) == (
        "w - lr * where(min(norm(w), gamma_u) > 0 and norm(u) > 0, "
        "min(norm(w), gamma_u) / norm(u), 1) * u")


def test_child_redeclares_a_hyper_default_and_range():
    spec = lw.parse("optimizer c extends lamb\nhyper lr = 0.01 in (0, 1]\nhyper beta1 = 0.8\n")
    assert list(spec.hypers) == list(lw.load("lamb").hypers)  # declaration order kept
    assert spec.hypers["lr"] == 0.01 and str(spec.program.hyper("lr").range) == "(0, 1]"
    assert spec.hypers["beta1"] == 0.8


def test_child_redeclared_default_is_checked_against_its_range():
    err = errors("optimizer c extends lamb\nhyper lr = 2 in (0, 1]\n", "c.lw")
    assert (err.filename, err.line, err.column) == ("c.lw", 2, 12)


def test_child_replaces_a_def_adds_rules_watches_states_and_replaces_step():
    text = ("optimizer c extends lamb\n"
            "state n : layer = 0\n"
            "def trust(w, u) = 1\n"
            "for ndim <= 1 {\n  weight_decay = 0\n}\n"
            "watch n\n"
            "step {\n"
            "  n = norm(g)\n"
            "  w = w - lr * trust(w, g) * g\n"
            "}\n")
    spec = lw.parse(text)
    assert [s.name for s in spec.program.states] == ["m", "v", "n"]
    assert spec.program.rules[0].assigns == (("weight_decay", Num(0.0, "const")),)
    assert spec.program.watches == ("n",)
    assert [a.target for a in spec.program.step] == ["n", "w"]
    assert format_expr(spec.program.step[1].value) == "w - lr * 1 * g"


def test_child_without_step_inherits_the_parents_step_with_its_own_defs():
    spec = lw.parse("optimizer c extends lamb\ndef phi(z) = 2 * z\n")
    assert "where(2 * norm(w) > 0" in format_expr(spec.program.step[-1].value)


def test_extends_a_relative_file_and_a_chain(tmp_path, monkeypatch):
    (tmp_path / "parents").mkdir()
    (tmp_path / "kids").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "parents" / "base.lw").write_text(
        "optimizer base extends lamb\nhyper gamma = 2\ndef phi(z) = min(z, gamma)\n")
    (tmp_path / "kids" / "kid.lw").write_text(
        "optimizer kid extends ../parents/base.lw\nhyper gamma = 3\nwatch tr\n"
        "step {\n  tr = trust(w, g)\n  w = w - lr * tr * g\n}\n")
    (tmp_path / "kids" / "quoted.lw").write_text('optimizer q extends "../parents/base.lw"\n')
    monkeypatch.chdir(tmp_path / "elsewhere")  # paths are relative to the file, not the cwd
    kid = lw.load(tmp_path / "kids" / "kid.lw")
    assert kid.name == "kid"
    assert kid.hypers["gamma"] == 3 and "beta1" in kid.hypers
    assert "min(norm(w), gamma)" in format_expr(kid.program.step[0].value)
    assert lw.load(str(tmp_path / "kids" / "quoted.lw")).hypers["gamma"] == 2


def test_error_in_a_parent_file_is_reported_in_that_file(tmp_path):
    (tmp_path / "parent.lw").write_text("optimizer parent\nhyper lr 1\n")
    (tmp_path / "child.lw").write_text("optimizer child extends parent.lw\n")
    with pytest.raises(SpecError) as info:
        lw.load(tmp_path / "child.lw")
    assert Path(info.value.filename).name == "parent.lw"
    assert (info.value.line, info.value.column) == (2, 10)


def test_parse_anchors_relative_extends_at_its_filename(tmp_path):
    (tmp_path / "parent.lw").write_text("optimizer parent extends lamb\nhyper k = 1\n")
    spec = lw.parse("optimizer c extends parent.lw\n", str(tmp_path / "c.lw"))
    assert spec.hypers["k"] == 1


def test_spec_override_section_8():
    lamb = lw.load("lamb")
    spec = lamb.override("def phi(z) = clip(z, 0.01, 10)")
    assert isinstance(spec, lw.Spec) and spec is not lamb
    assert "clip(norm(w), 0.01, 10)" in format_expr(spec.program.step[-1].value)
    assert "clip(" not in lamb.to_text()  # the original is unchanged
    assert spec.program.hypers == lamb.program.hypers


def test_spec_override_same_rules_as_extends():
    lamb = lw.load("lamb")
    spec = lamb.override("optimizer lamb2\nhyper lr = 0.5 in (0, 1)\nhyper k = 2\n"
                         "for ndim <= 1 {\n  k = 0\n}\n")
    assert spec.name == "lamb2" and spec.hypers["lr"] == 0.5 and spec.hypers["k"] == 2
    assert spec.override("hyper k = 3").hypers["k"] == 3  # overrides chain
    assert spec.hypers["k"] == 2
    err = pytest.raises(SpecError, lamb.override, "state m = 1").value
    assert "state 'm' is inherited" in err.message and err.filename == "<override>"
    err = pytest.raises(SpecError, lamb.override, "optimizer x extends lars").value
    assert "an override cannot use 'extends'" in err.message
    err = pytest.raises(SpecError, lamb.override, "def phi(z) = nrom(z)").value
    assert (err.filename, err.line, err.column) == ("<override>", 1, 14)
    assert "did you mean 'norm'" in err.message
    err = pytest.raises(SpecError, lamb.override, "hyper beta1 = 0.9 in [0, 1", "o.lw").value
    assert err.filename == "o.lw" and err.message.startswith("syntax error")


# ---------------------------------------------------------------- the Python API
def test_parse_and_load():
    text = (PROGRAMS / "lamb.lw").read_text(encoding="utf-8")
    spec = lw.parse(text, filename="my.lw")
    assert spec.name == "lamb" and spec.filename == "my.lw"
    assert spec.hypers == {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6,
                           "weight_decay": 0.01}
    assert lw.load("lamb").program == spec.program
    assert lw.load(PROGRAMS / "lamb.lw").program == spec.program
    assert lw.load(str(PROGRAMS / "lamb.lw")).program == spec.program
    assert "lamb" in lw.presets()


def test_load_missing_names_the_presets():
    with pytest.raises(FileNotFoundError, match="lamb"):
        lw.load("no_such_optimizer")
    with pytest.raises(FileNotFoundError):
        lw.load(HERE / "no_such_file.lw")


def test_check_program_returns_the_merged_declarations():
    prog, decls = check_program(parse_text("optimizer c extends lamb\nhyper k = 1\n"))
    assert decls.name == "c" and "k" in decls.hypers and "phi" in decls.defs
    assert prog.hyper_names[-1] == "k"


def test_checked_program_text_round_trips():
    for path in sorted(PROGRAMS.glob("*.lw")):
        spec = lw.load(path)
        again = lw.parse(spec.to_text())
        assert again.program == spec.program, path
        assert again.to_text() == spec.to_text()


# ---------------------------------------------------------------- SpecError
def test_spec_error_attributes():
    text = PRELUDE + "step {\n  w = w - lrr * g\n}\n"
    with pytest.raises(lw.SpecError) as info:
        lw.parse(text, filename="my.lw")
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.filename, err.line, err.column) == ("my.lw", 8, 11)
    assert err.message == "unknown name 'lrr'; did you mean 'lr'?"
    assert str(err) == ("my.lw:8:11: unknown name 'lrr'; did you mean 'lr'?\n"
                        "      w = w - lrr * g\n"
                        "              ^^^")
    assert err.lines() == ["my.lw:8:11: unknown name 'lrr'; did you mean 'lr'?"]


def test_spec_error_lists_every_problem_in_file_order():
    text = ("optimizer p\nstep {\n  w = w - foo * g\n  x = bar(g)\n}\n"
            "hyper lr = 2 in [0, 1]\n")
    err = errors(text, "e.lw")
    assert err.lines() == [
        "e.lw:3:11: unknown name 'foo'",
        "e.lw:4:7: unknown function 'bar'",
        "e.lw:6:12: default 2 of hyper 'lr' is outside its range [0, 1]",
    ]
    assert str(err).count("^") == 3 + 3 + 1
    assert str(err).splitlines()[3:6] == ["e.lw:4:7: unknown function 'bar'",
                                          "      x = bar(g)", "          ^^^"]


@pytest.mark.parametrize("text,suggestion", [
    ("state momentum = 0\nstep {\n  w = w - momentom\n}\n", "did you mean 'momentum'?"),
    ("step {\n  w = w - sqr(g)\n}\n", "did you mean 'sqrt'?"),
    ("hyper beta = 1\nstep {\n  w = w - bta * g\n}\n", "did you mean 'beta'?"),
    ("hyper wd = 1\nfor nmel > 1 {\n  wd = 0\n}\nstep {\n  w = w - g\n}\n",
     "did you mean 'numel'?"),
])
def test_suggestions(text, suggestion):
    assert errors("optimizer p\n" + text).message.endswith(suggestion)


def test_no_suggestion_for_a_far_name():
    assert errors("optimizer p\nstep {\n  w = w - zzzz\n}\n").message == "unknown name 'zzzz'"


def test_unknown_preset_parent_suggests_a_preset():
    err = errors("optimizer p extends lmab\n", "p.lw")
    assert (err.line, err.column) == (1, 21)
    assert "did you mean 'lamb'?" in err.message


def test_parent_problems_stop_the_check():
    # with an unknown parent, nothing inherited is known: no follow-on errors
    err = errors("optimizer p extends nope\nstep {\n  w = w - lr * trust(w, g) * g\n}\n")
    assert len(err.problems) == 1


# ---------------------------------------------------------------- the contract's programs
@pytest.mark.parametrize("path", sorted(PROGRAMS.glob("*.lw")), ids=lambda p: p.name)
def test_contract_programs_check(path):
    spec = lw.load(path)
    assert spec.program.step and spec.program.step[-1].target == "w"
    assert spec.name == path.stem


def _code_blocks(markdown: str) -> list[str]:
    return re.findall(r"```(?:\w*)\n(.*?)```", markdown, re.S)


@pytest.mark.skipif(not LANGUAGE.is_file() and not os.environ.get("CI"),
                    reason="shared/LANGUAGE.md is not beside this checkout")
def test_contract_programs_are_the_ones_in_language_md():
    # CI always has shared/ beside the clone: there, a missing file fails
    blocks = _code_blocks(LANGUAGE.read_text(encoding="utf-8"))
    lamb = next(b for b in blocks if b.startswith("optimizer lamb\n"))
    rule = next(b for b in blocks if b.startswith("for ndim <= 1"))
    relative = next(b for b in blocks if b.startswith("for ndim >= 2"))
    assert (PROGRAMS / "lamb_relative_rules.lw").read_text(encoding="utf-8").endswith(relative)
    clipped = next(b for b in blocks if b.startswith("optimizer lamb_clipped"))
    python = next(b for b in blocks if "spec.override(" in b)
    assert (PROGRAMS / "lamb.lw").read_text(encoding="utf-8") == lamb
    assert rule in (PROGRAMS / "lamb_rules.lw").read_text(encoding="utf-8")
    assert (PROGRAMS / "lamb_rules.lw").read_text(encoding="utf-8").replace(
        "optimizer lamb_rules", "optimizer lamb").startswith(lamb)
    assert (PROGRAMS / "lamb_clipped.lw").read_text(encoding="utf-8") == clipped
    override = re.search(r'spec\.override\("([^"]*)"\)', python).group(1)
    assert override == "def phi(z) = clip(z, 0.01, 10)"
    assert override in (PROGRAMS / "lamb_phi_clip.lw").read_text(encoding="utf-8")
    # the same override through the API gives the same checked step as the file
    via_api = lw.load("lamb").override(override)
    assert via_api.program.step == lw.load(PROGRAMS / "lamb_phi_clip.lw").program.step


@pytest.mark.skipif(not LANGUAGE.is_file() and not os.environ.get("CI"),
                    reason="shared/LANGUAGE.md is not beside this checkout")
def test_the_projects_language_reference_is_the_contract():
    """docs/language.md (shipped in the package) is LANGUAGE.md, word for word."""
    from layerwise.resources import language_reference
    assert language_reference() == LANGUAGE.read_text(encoding="utf-8")


def test_override_reports_declaration_and_check_problems_together():
    err = pytest.raises(SpecError, lw.load("lamb").override,
                        "hyper k = 1\nhyper k = 2\ndef phi(z) = z * kk\n").value
    assert err.lines() == [
        "<override>:2:7: 'k' is already declared as a hyper at line 1",
        "<override>:3:18: unknown name 'kk'; did you mean 'k'? (in def 'phi' called at lamb.lw:31)",
    ]


def test_redeclared_hyper_without_range_keeps_the_parents_range(tmp_path):
    child = tmp_path / "child.lw"
    child.write_text("optimizer c extends lamb\nhyper beta1 = 1.5\n")
    with pytest.raises(lw.SpecError) as err:
        lw.load(child)
    assert (err.value.line, err.value.column) == (2, 15)
    assert "outside its range [0, 1)" in err.value.message
    widened = lw.parse("optimizer c extends lamb\nhyper beta1 = 1.5 in (-inf, inf)\n",
                       filename=str(tmp_path / "w.lw"))
    assert widened.hypers["beta1"] == 1.5


def test_first_problem_is_in_the_file_being_checked(tmp_path):
    (tmp_path / "zparent.lw").write_text("optimizer p\nhyper a = 5 in [0, 1]\nstep {\n  w = w\n}\n")
    child = tmp_path / "achild.lw"
    child.write_text('optimizer c extends "zparent.lw"\nstep {\n  w = w + nope\n}\n')
    with pytest.raises(lw.SpecError) as err:
        lw.load(child)
    assert err.value.filename == str(child) and (err.value.line, err.value.column) == (3, 11)
    assert [p.span.filename for p in err.value.problems] == [str(child), str(tmp_path / "zparent.lw")]
