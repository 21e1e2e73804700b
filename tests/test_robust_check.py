"""Issue 14, checker/files/rules part: any input gives a SpecError (or, at
construction, a ValueError naming the rule and parameter), in bounded time.

Covers: deep ``extends`` chains, which files ``extends`` may read, names
that are not Python identifiers (keywords, ``self``, NFKC), hyper names torch
keeps in param_groups, rule arithmetic that overflows, exponential def
inlining, name patterns with catastrophic backtracking, many faults, and
programs with many locals.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

import layerwise as lw
from layerwise.check import (MAX_DEF_EXPANSION, MAX_PROBLEMS, MAX_REGEX_REPEATS,
                             RESERVED_GROUP_KEYS, regex_problem)
from layerwise.errors import SpecError
from layerwise.extends import MAX_EXTENDS_DEPTH, MAX_FILE_BYTES
from layerwise.lower import lower
from layerwise.rules import MAX_NAME_CHARS, evaluate, matching_rules, param_info

STEP = "step {\n  w = w - lr * g\n}\n"


def fails(text: str, filename: str = "<string>") -> SpecError:
    with pytest.raises(SpecError) as info:
        lw.parse(text, filename)
    return info.value


def timed(fn, *args):
    start = time.perf_counter()
    try:
        out = fn(*args)
    except SpecError as err:
        out = err
    return out, time.perf_counter() - start


# ---------------------------------------------------------------- 1. extends chains
def test_a_chain_of_1000_files_is_a_spec_error_at_the_limit(tmp_path):
    for i in range(1000):
        text = (f"optimizer p{i} extends p{i + 1}.lw\n" if i < 999
                else "optimizer p999 extends sgd\n")
        (tmp_path / f"p{i}.lw").write_text(text)
    with pytest.raises(SpecError) as info:
        lw.load(tmp_path / "p0.lw")
    err = info.value
    assert len(err.problems) == 1
    problem = err.problems[0]
    # reported in the last file the limit admits, at its extends parent
    assert os.path.basename(problem.span.filename) == f"p{MAX_EXTENDS_DEPTH - 1}.lw"
    last = MAX_EXTENDS_DEPTH - 1
    assert (problem.span.line, problem.span.column) == (1, len(f"optimizer p{last} extends ") + 1)
    assert problem.message == (f"extends chain too deep: more than {MAX_EXTENDS_DEPTH} files "
                               "(the limit)")


def test_a_chain_at_the_limit_checks(tmp_path):
    n = MAX_EXTENDS_DEPTH - 1                 # files of ours; the preset sgd is the last
    for i in range(n - 1):
        (tmp_path / f"p{i}.lw").write_text(f"optimizer p{i} extends p{i + 1}.lw\nhyper h{i} = 1\n")
    (tmp_path / f"p{n - 1}.lw").write_text(f"optimizer p{n - 1} extends sgd\n")
    spec = lw.load(tmp_path / "p0.lw")
    assert spec.name == "p0" and "h0" in spec.hypers and f"h{n - 2}" in spec.hypers


# ---------------------------------------------------------------- 2d/8. which files extends reads
def _child(tmp_path, parent: str) -> SpecError:
    return fails(f'optimizer c extends "{parent}"\n' + STEP, str(tmp_path / "c.lw"))


def test_extends_refuses_a_file_not_ending_in_lw(tmp_path):
    err = _child(tmp_path, "/proc/self/mem")
    assert (err.line, err.column) == (1, 21)
    assert err.message == ("a parent file must be a '.lw' file; '/proc/self/mem' is not (a "
                           "preset is named without '/')")
    (tmp_path / "secret.txt").write_text("password=hunter2\n")
    err = _child(tmp_path, "secret.txt")      # no '/': looked up as a preset, not read
    assert "unknown parent 'secret.txt'" in err.message
    err = _child(tmp_path, "./secret.txt")
    assert "must be a '.lw' file" in err.message and "hunter2" not in str(err)


def test_extends_refuses_a_link_to_a_non_lw_file(tmp_path):
    (tmp_path / "secret.txt").write_text("password=hunter2\n")
    (tmp_path / "evil.lw").symlink_to(tmp_path / "secret.txt")
    err = _child(tmp_path, "evil.lw")
    assert (err.line, err.column) == (1, 21)
    assert "is a link to" in err.message and "which is not a '.lw' file" in err.message
    assert "hunter2" not in str(err)


def test_extends_refuses_a_directory_and_a_fifo(tmp_path):
    (tmp_path / "dir.lw").mkdir()
    err = _child(tmp_path, "dir.lw")
    assert (err.line, err.column) == (1, 21)
    assert err.message.endswith("is not a regular file")
    os.mkfifo(tmp_path / "pipe.lw")           # reading it would block forever
    err, seconds = timed(_child, tmp_path, "pipe.lw")
    assert err.message.endswith("is not a regular file") and seconds < 2


def test_extends_an_invalid_utf8_parent(tmp_path):
    (tmp_path / "bad.lw").write_bytes(b"optimizer bad extends sgd\n# caf\xe9\n")
    err = _child(tmp_path, "bad.lw")
    assert (err.filename, err.line, err.column) == (str(tmp_path / "c.lw"), 1, 21)
    assert err.message == (f"cannot use parent file '{tmp_path / 'bad.lw'}': it is not valid "
                           "UTF-8 (byte 0xe9 at line 2, column 6)")


def test_extends_a_parent_larger_than_the_limit(tmp_path):
    big = "optimizer big extends sgd\n" + "#" * MAX_FILE_BYTES + "\n"
    (tmp_path / "big.lw").write_text(big)
    err = _child(tmp_path, "big.lw")
    assert (err.line, err.column) == (1, 21)
    assert err.message.endswith(f"it is larger than {MAX_FILE_BYTES:,} bytes, the limit for "
                                "a program file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file")
def test_extends_an_unreadable_parent(tmp_path):
    (tmp_path / "locked.lw").write_text("optimizer locked extends sgd\n")
    (tmp_path / "locked.lw").chmod(0)
    err = _child(tmp_path, "locked.lw")
    assert (err.line, err.column) == (1, 21) and "cannot read it" in err.message


def test_load_an_invalid_utf8_file_names_the_byte(tmp_path):
    path = tmp_path / "p.lw"
    path.write_bytes(b"optimizer p extends sgd\nhyper k\xff = 1\n")
    with pytest.raises(SpecError) as info:
        lw.load(path)
    err = info.value
    assert (err.filename, err.line, err.column) == (str(path), 2, 8)
    assert err.message == ("cannot read program file: it is not valid UTF-8 (byte 0xff at "
                           "line 2, column 8)")


def test_extends_absolute_and_dotdot_lw_paths_still_work(tmp_path):
    (tmp_path / "parents").mkdir()
    (tmp_path / "kids").mkdir()
    (tmp_path / "parents" / "base.lw").write_text("optimizer base extends sgd\nhyper k = 2\n")
    spec = lw.parse(f'optimizer c extends "{tmp_path / "parents" / "base.lw"}"\n')
    assert spec.hypers["k"] == 2
    spec = lw.parse("optimizer c extends ../parents/base.lw\n",
                    str(tmp_path / "kids" / "c.lw"))
    assert spec.hypers["k"] == 2


def test_adapt_reads_files_with_the_same_policy(tmp_path):
    err = fails('optimizer c extends sgd\nadapt "/etc/passwd"\n', str(tmp_path / "c.lw"))
    assert (err.line, err.column) == (2, 7)
    assert err.message == ("an adaptation file must be a '.lw' file; '/etc/passwd' is not (a "
                           "preset is named without '/')")


# ---------------------------------------------------------------- 2a. names
@pytest.mark.parametrize("name", ["lambda", "self", "None", "class", "print", "β1", "torch"])
def test_unusual_hyper_and_state_names_lower(name):
    """Any language-valid name lowers to fx graphs that generate valid Python."""
    text = (f"optimizer o\nhyper lr = 0.1\nhyper {name} = 0.5\nstate m_{name} = 0\n"
            f"step {{\n  m_{name} = {name} * m_{name} + g\n  w = w - lr * m_{name}\n}}\n")
    lowered = lower(lw.parse(text).program)
    ph = lowered.placeholder(name)
    assert ph.isidentifier() and ph not in ("lambda", "self", "None", "class", "print")
    names = [n.name for n in lowered.update.graph.nodes if n.op == "placeholder"]
    assert ph in names and "lr" in names          # plain names keep their own
    w, g = torch.ones(3), torch.ones(3)
    args = {"w": w, "g": g, "t": torch.tensor(1.0), "numel": torch.tensor(3.0),
            "lr": torch.tensor(0.1), ph: torch.tensor(0.5),
            lowered.placeholder(f"m_{name}"): torch.zeros(3)}
    new_w, new_m = lowered.update(*(args[n] for n in names))
    assert torch.allclose(new_w, torch.full((3,), 0.9)) and torch.allclose(new_m, g)


def test_names_equal_under_nfkc_are_one_name():
    spec = lw.parse("optimizer o\nhyper \ufb01 = 0.1\nstep {\n  w = w - fi * g\n}\n")
    assert spec.program.hyper_names == ("fi",)
    err = fails("optimizer o\nhyper fi = 0.1\nhyper \ufb01 = 2\n" + "step {\n  w = w - fi * g\n}\n")
    assert (err.line, err.column) == (3, 7)
    assert err.message == "'fi' is already declared as a hyper at line 2"


def test_a_name_whose_nfkc_form_is_not_a_name():
    err = fails("optimizer o\nhyper x\u00bd = 0.1\nstep {\n  w = w - x\u00bd * g\n}\n")
    assert len(err.problems) == 1 and (err.line, err.column) == (2, 7)
    assert err.message == ("'x\u00bd' is 'x1\u20442' under Unicode NFKC normalisation (the form "
                           "names are compared in), which is not a valid name; rename it")


# ---------------------------------------------------------------- 2b. param_groups keys
@pytest.mark.parametrize("name", sorted(RESERVED_GROUP_KEYS))
def test_hyper_named_like_a_torch_group_key(name):
    err = fails(f"optimizer o\nhyper lr = 0.1\nhyper {name} = 1\n" + STEP)
    assert (err.line, err.column) == (3, 7)
    assert err.message == (f"'{name}' is a key that torch.optim or its LR schedulers keep in "
                           "param_groups, and a hyper is a param_groups key (LANGUAGE.md "
                           "section 3); rename this hyper")


# ---------------------------------------------------------------- 2c. rule arithmetic
RULES = ("optimizer o\nhyper lr = 0.1\nhyper wd = 0.1\n"
         "for numel ^ 1000 > 0 {\n  wd = numel ^ 1000\n}\n"
         "for (0 - ndim) ^ 0.5 > 0 or (0 - ndim) ^ 0.5 != (0 - ndim) ^ 0.5 {\n  lr = 0.5 * lr\n}\n"
         "step {\n  w = w - lr * g\n}\n")


def test_rule_arithmetic_never_raises():
    rules = lw.parse(RULES).program.rules
    env = param_info((3, 4), "p").env()
    assert evaluate(rules[0].predicate, env) == 1.0
    assert evaluate(rules[0].assigns[0][1], env) == float("inf")      # overflow -> inf
    assert evaluate(rules[1].predicate.left, env) == 0.0              # nan > 0 is false
    assert evaluate(rules[1].predicate.right, env) == 1.0             # nan != nan
    assert evaluate(rules[0].assigns[0][1], {"numel": 10 ** 400}) == float("inf")
    assert matching_rules(rules, param_info((3, 4), "p")) == (0, 1)


def test_rule_arithmetic_at_construction():
    p = torch.nn.Parameter(torch.ones(3, 4))
    p.grad = torch.ones(3, 4)
    opt = lw.Optimizer([("p", p)], lw.parse(RULES), compile=False)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((3, 4), 0.95))


# ---------------------------------------------------------------- 3a. def expansion
def _doubling(n: int, body: str = "a{j}(a{j}(x))") -> str:
    defs = "".join(f"def a{i}(x) = {body.format(j=i - 1)}\n" for i in range(2, n + 1))
    return (f"optimizer o\nhyper lr = 0.1\ndef a1(x) = x + 1\n{defs}"
            f"step {{\n  w = w - lr * a{n}(g)\n}}\n")


def test_exponential_def_expansion_is_a_spec_error_quickly():
    """The issue's program: a_n(x) is x + 1 + 1 ... 2^(n-1) times, nested."""
    err, seconds = timed(lw.parse, _doubling(25))
    assert isinstance(err, SpecError) and seconds < 2
    assert len(err.problems) == 1
    # the first call whose value passes the depth limit, inside the def that makes it
    assert (err.line, err.column) == (4, 13)
    assert err.message == ("this call of def 'a1' nests more than 200 levels deep once defs "
                           "are inlined (the limit); compute a part of it in a local instead "
                           "(in def 'a2' called at line 29)")


def test_def_expansion_size_limit():
    """a_n(x) = a_(n-1)(x) * a_(n-1)(x): shallow, but 2^n nodes as a tree."""
    err, seconds = timed(lw.parse, _doubling(40, "a{j}(x) * a{j}(x)"))
    assert isinstance(err, SpecError) and seconds < 2
    assert len(err.problems) == 1
    assert (err.line, err.column) == (16, 14)     # a13 is 2^14 - 1 nodes, a12 under the limit
    assert err.message == (f"this call of def 'a13' expands to more than {MAX_DEF_EXPANSION:,} "
                           "nodes once defs are inlined (the limit); compute a repeated part "
                           "once in a local instead (in def 'a14' called at line 44)")


def test_def_expansion_under_the_limit_shares_trees():
    spec, seconds = timed(lw.parse, _doubling(12, "a{j}(x) * a{j}(x)"))
    assert isinstance(spec, lw.Spec) and seconds < 2
    value = spec.program.step[-1].value.right.right      # a12(g)
    assert value.left is value.right                      # one shared tree, not two copies
    lowered, seconds = timed(lower, spec.program)
    assert seconds < 2
    # CSE: one multiplication per level in the graph
    muls = [n for n in lowered.update.graph.nodes if n.op == "call_function"]
    assert len(muls) < 20
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.zeros(2)
    lw.Optimizer([p], spec, compile=False).step()
    assert torch.allclose(p.detach(), torch.full((2,), -0.1))


def test_deep_def_chain_is_a_spec_error_not_a_recursion_error():
    defs = "".join(f"def a{i}(x) = a{i - 1}(x) + 1\n" for i in range(2, 1001))
    err, seconds = timed(lw.parse, f"optimizer o\nhyper lr = 0.1\ndef a1(x) = x\n{defs}"
                                   "step {\n  w = w - lr * a1000(g)\n}\n")
    assert isinstance(err, SpecError) and seconds < 2
    assert err.message.startswith("expression nested too deeply: more than 200 levels")


# ---------------------------------------------------------------- 3b. name patterns
@pytest.mark.parametrize("pattern", ["^(a+)+$", "(a|aa)*", "(a?){30}a{30}", "(\\w+_?)*x"])
def test_nested_repetition_is_refused_with_a_caret(pattern):
    text = f'optimizer o\nhyper lr = 0.1\nhyper wd = 0\nfor name ~ "{pattern}" {{\n  wd = 1\n}}\n'
    err = fails(text + STEP)
    assert (err.line, err.column) == (4, 12)
    assert err.message == ("a name pattern may not repeat something that holds a repetition "
                           "or '|' (as in (a+)+ or (a|b)*): matching it can take exponential "
                           "time on some names")


def test_pattern_limits_and_allowed_patterns():
    assert regex_problem("bias|LayerNorm|layer_norm") is None
    assert regex_problem("^(module[.])?0[.]") is None
    assert regex_problem(".*attn.*weight") is None
    assert regex_problem(".*.*.*x") == (f"a name pattern may hold at most {MAX_REGEX_REPEATS} "
                                        "repetitions (*, +, {m,n}): with more, matching some "
                                        "names takes very long")
    assert regex_problem("(a)\\1").startswith("a name pattern may not use a backreference")
    assert regex_problem("a{99999999999}") == ("invalid regular expression: the repetition "
                                               "number is too large")


def test_pattern_limit_is_a_spec_error_at_check():
    err = fails('optimizer o\nhyper lr = 0.1\nfor name ~ "a{99999999999}" {\n  lr = lr\n}\n'
                + STEP)
    assert (err.line, err.column) == (3, 12)
    assert err.message.startswith("invalid regular expression")


def test_matching_any_model_name_is_fast():
    spec = lw.parse('optimizer o\nhyper lr = 0.1\nhyper wd = 0\nfor name ~ "^a+.*_bias$" {\n'
                    "  wd = 1\n}\n" + STEP)
    for name in ("a" * 28 + "_bias", "a" * MAX_NAME_CHARS, "a" * 999 + "_"):
        out, seconds = timed(matching_rules, spec.program.rules, param_info((2,), name))
        assert seconds < 2
    with pytest.raises(ValueError, match=r"the for rule at <string>:4 cannot be decided for "
                                         r"parameter 'aaa.*longer than 1000 characters"):
        matching_rules(spec.program.rules, param_info((2,), "a" * (MAX_NAME_CHARS + 1)))


# ---------------------------------------------------------------- 3c/3d. size
def test_ten_thousand_unknown_names_is_fast_and_capped():
    from layerwise.check import check_program
    from layerwise.syntax import parse_text
    lines = "".join(f"  x{i} = zz{i} + 1\n" for i in range(10_000))
    program = parse_text(f"optimizer o\nhyper lr = 0.1\nstep {{\n{lines}  w = w - lr * g\n}}\n")
    with pytest.raises(SpecError) as info:
        start = time.perf_counter()
        check_program(program)
    assert time.perf_counter() - start < 2
    err = info.value
    assert len(err.problems) == MAX_PROBLEMS + 1
    assert err.problems[0].message == "unknown name 'zz0'"
    assert (err.problems[-1].span.line, err.problems[-1].message) == (
        MAX_PROBLEMS + 4, f"too many problems: stopping after {MAX_PROBLEMS}")


def test_many_locals_check_in_linear_time():
    from layerwise.check import check_program
    from layerwise.syntax import parse_text

    def seconds(n: int) -> float:
        body = "".join(f"  x{i} = x{i - 1} + 1\n" for i in range(1, n))
        program = parse_text(f"optimizer o\nhyper lr = 0.1\nstep {{\n  x0 = g\n{body}"
                             f"  w = w - lr * x{n - 1}\n}}\n")
        start = time.perf_counter()
        check_program(program)
        return time.perf_counter() - start

    assert seconds(12_000) < 2
