"""The ``layerwise`` command line (LANGUAGE.md section 9): check, presets, show."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import layerwise as lw
from layerwise.cli import main

HERE = Path(__file__).parent
PROGRAMS = HERE / "programs"
BAD = HERE / "bad"
LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<message>.+)$")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def expected_lines(path: Path) -> list[tuple[str, int, int, str]]:
    out = []
    for m in re.finditer(r"^# expect: (?:([^:\s]+\.lw):)?(\d+):(\d+): (.+?)\s*$",
                         path.read_text(encoding="utf-8"), re.M):
        out.append((m[1] or path.name, int(m[2]), int(m[3]), m[4]))
    return out


def test_check_valid_files(capsys):
    files = [str(p) for p in sorted(PROGRAMS.glob("*.lw"))]
    code, out, err = run(capsys, "check", *files)
    assert code == 0
    assert out.splitlines() == [f"{f}: ok" for f in files]
    assert err == ""


@pytest.mark.parametrize("name", ["name_unknown_function_nrom.lw", "syntax_unclosed_paren.lw",
                                  "multi_rules_watches_step.lw", "cycle/a.lw"])
def test_check_invalid_file_prints_one_line_per_problem(capsys, name):
    path = BAD / name
    code, out, err = run(capsys, "check", str(path))
    assert code == 1
    assert out == ""
    lines = err.splitlines()
    expected = expected_lines(path)
    assert len(lines) == len(expected)
    for line, (efile, eline, ecol, phrase) in zip(lines, expected):
        m = LINE.match(line)
        assert m, line
        assert (Path(m["file"]).name, int(m["line"]), int(m["col"])) == (efile, eline, ecol)
        assert phrase in m["message"]
    if "/" not in name:
        assert lines[0].startswith(f"{path}:")
    assert "Traceback" not in err


def test_check_reports_every_file_and_fails_if_any_fails(capsys):
    good, bad = PROGRAMS / "lamb.lw", BAD / "readonly_t.lw"
    code, out, err = run(capsys, "check", str(good), str(bad), str(good))
    assert code == 1
    assert out.splitlines() == [f"{good}: ok", f"{good}: ok"]
    assert err.splitlines() == [f"{bad}:4:3: 't' (the step count) is read-only"]


def test_check_missing_file(capsys, tmp_path):
    missing = tmp_path / "nope.lw"
    code, out, err = run(capsys, "check", str(missing))
    assert code == 1
    assert err.startswith(f"{missing}: cannot read")
    assert "Traceback" not in err


def test_presets_lists_lamb(capsys):
    code, out, err = run(capsys, "presets")
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert names == lw.presets() and "lamb" in names
    lamb_line = next(line for line in out.splitlines() if line.split()[0] == "lamb")
    assert "LAMB" in lamb_line


def test_show_prints_the_checked_program(capsys):
    code, out, err = run(capsys, "show", "lamb")
    assert code == 0
    assert lw.load("lamb").to_text() in out
    code, out, err = run(capsys, "show", str(PROGRAMS / "lamb_clipped.lw"))
    assert code == 0
    assert lw.load(PROGRAMS / "lamb_clipped.lw").to_text() in out


def test_show_errors_are_lines_without_traceback(capsys):
    code, out, err = run(capsys, "show", str(BAD / "readonly_hyper.lw"))
    assert code == 2
    assert err.splitlines() == [f"{BAD / 'readonly_hyper.lw'}:5:3: 'lr' is a hyper and is "
                                "read-only in step"]
    code, out, err = run(capsys, "show", "no_such_preset")
    assert code == 2
    assert err.startswith("layerwise: error: 'no_such_preset' is neither a preset nor a file")
    assert "lamb" in err and "Traceback" not in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["check"])
    assert info.value.code == 2


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def test_python_dash_m_layerwise_presets():
    proc = subprocess.run([sys.executable, "-m", "layerwise", "presets"], capture_output=True,
                          text=True, timeout=120, env=_env(), cwd=HERE)
    assert proc.returncode == 0, proc.stderr
    assert "lamb" in proc.stdout.split()


def test_python_dash_m_layerwise_check_exit_codes():
    ok = subprocess.run([sys.executable, "-m", "layerwise", "check", str(PROGRAMS / "lamb.lw")],
                        capture_output=True, text=True, timeout=120, env=_env())
    assert ok.returncode == 0 and ok.stdout.strip().endswith(": ok")
    bad = subprocess.run([sys.executable, "-m", "layerwise", "check",
                          str(BAD / "name_unknown_lerning_rate.lw")],
                         capture_output=True, text=True, timeout=120, env=_env())
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [
        f"{BAD / 'name_unknown_lerning_rate.lw'}:5:11: unknown name 'lerning_rate'; "
        "did you mean 'learning_rate'?"]
    assert "Traceback" not in bad.stderr


def test_console_script():
    script = shutil.which("layerwise", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the layerwise console script is not installed beside this python")
    proc = subprocess.run([script, "check", str(BAD / "missing_step.lw")], capture_output=True,
                          text=True, timeout=120, env=_env())
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"{BAD / 'missing_step.lw'}:2:11: optimizer 'p' has no step")
