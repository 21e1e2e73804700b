"""Issue 14 (CLI side): any input to check/show/train/ablate gives one line (or one
SpecError block) and exit 1 or 2, never a traceback; every argument and output
destination is checked before training; records are written atomically and an
earlier run's records are never changed."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import layerwise as lw
import layerwise.ablate as ablate_mod
from layerwise.ablate import make_variants, plan_grid
from layerwise import cli
import layerwise.train as train_mod
from layerwise.cli import main
from layerwise.train import available_cpus, plan_run, write_record

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

HERE = Path(__file__).parent
CPUS = available_cpus()
#: the quickest real runs: one or two optimizer steps on digits
TINY = ["--task", "digits", "--batch-size", "8", "--max-steps", "1", "--quiet"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root: Path) -> dict[str, bytes | str | None]:
    """Every file and folder under ``root``: a regular file's bytes, None for a folder,
    "special" for anything else (a FIFO is never opened: that would block)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None if p.is_dir()
                                       else "special")
            for p in sorted(root.rglob("*"))}


def strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-JSON number {token}")
    return json.loads(text, parse_constant=refuse)


def one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- check: every file
def test_check_reports_each_bad_file_and_goes_on(capsys, tmp_path):
    good = tmp_path / "good.lw"
    good.write_text("optimizer good extends lamb\n")
    bad_utf8 = tmp_path / "latin1.lw"
    bad_utf8.write_bytes(b"optimizer x extends lamb\n# caf\xe9\n")
    child = tmp_path / "child.lw"
    child.write_text('optimizer child extends "latin1.lw"\n')
    folder = tmp_path / "folder.lw"
    folder.mkdir()
    missing = tmp_path / "missing.lw"
    fifo = tmp_path / "pipe.lw"
    os.mkfifo(fifo)                              # opening it would block: never opened
    before = snapshot(tmp_path)
    code, out, err = run(capsys, "check", bad_utf8, good, child, folder, missing, fifo, good)
    assert code == 1
    assert out.splitlines() == [f"{good}: ok", f"{good}: ok"]   # checked after each bad one
    lines = err.splitlines()
    assert "Traceback" not in err and len(lines) == 5, err
    assert lines[0].startswith(f"{bad_utf8}:2:") and "UTF-8" in lines[0]
    assert lines[1].startswith(f"{child}:1:") and "latin1.lw" in lines[1] and "UTF-8" in lines[1]
    assert lines[2:] == [f"{folder}: cannot read: is a directory",
                         f"{missing}: cannot read: No such file or directory",
                         f"{fifo}: cannot read: not a regular file"]
    assert snapshot(tmp_path) == before


def test_check_file_name_with_nul_is_one_line(capsys):
    code, out, err = run(capsys, "check", "a\0b.lw")
    assert code == 1 and out == ""
    assert one_line(err) == "a\0b.lw: cannot read: embedded null byte"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="file permissions do not stop root")
def test_check_unreadable_file_and_parent(capsys, tmp_path):
    secret = tmp_path / "secret.lw"
    secret.write_text("optimizer s extends lamb\n")
    secret.chmod(0)
    child = tmp_path / "child.lw"
    child.write_text('optimizer c extends "secret.lw"\n')
    good = tmp_path / "good.lw"
    good.write_text("optimizer good extends lamb\n")
    try:
        code, out, err = run(capsys, "check", secret, child, good)
    finally:
        secret.chmod(0o644)
    assert code == 1 and out == f"{good}: ok\n"
    lines = err.splitlines()
    assert "Traceback" not in err and len(lines) == 2
    assert lines[0].startswith(f"{secret}:") and "Permission denied" in lines[0]
    assert lines[1].startswith(f"{child}:1:") and "secret.lw" in lines[1]


# ---------------------------------------------------------------- the last resort
@pytest.mark.parametrize("exc", [RecursionError("maximum recursion depth exceeded"),
                                 MemoryError(), OverflowError("(34, 'Numerical result')"),
                                 TypeError("can't compare complex\nnumbers")])
def test_unexpected_exception_in_check_is_one_line(capsys, monkeypatch, tmp_path, exc):
    good = tmp_path / "good.lw"
    good.write_text("optimizer good extends lamb\n")

    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(cli, "parse", boom)
    code, out, err = run(capsys, "check", good)
    assert code == 2
    message = " ".join(str(exc).split()) or "-"
    assert one_line(err) == (f"layerwise: internal error: {type(exc).__name__}: {message} "
                             "(please report)")


def test_unexpected_exception_in_show_train_ablate_is_one_line(capsys, monkeypatch, tmp_path):
    def boom(*a, **k):
        raise RecursionError("maximum recursion depth exceeded")
    monkeypatch.setattr(cli, "load", boom)
    code, out, err = run(capsys, "show", "lamb")
    assert code == 2 and one_line(err) == (
        "layerwise: internal error: RecursionError: maximum recursion depth exceeded "
        "(please report)")
    monkeypatch.setattr(train_mod, "train", boom)
    code, out, err = run(capsys, "train", *TINY, "--optimizer", "lamb",
                         "--out", tmp_path / "r.json")
    assert code == 2 and "internal error: RecursionError" in one_line(err)
    assert not (tmp_path / "r.json").exists()
    monkeypatch.setattr(ablate_mod, "make_variants", boom)
    code, out, err = run(capsys, "ablate", *TINY, "--optimizer", "lamb", "--out", tmp_path / "a")
    assert code == 2 and "internal error: RecursionError" in one_line(err)
    assert not (tmp_path / "a").exists()


def test_show_os_error_is_one_line(capsys, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "x.lw")
    monkeypatch.setattr(cli, "load", denied)
    code, out, err = run(capsys, "show", "x.lw")
    assert code == 2 and out == ""
    assert one_line(err) == "layerwise: error: x.lw: cannot read: Permission denied"


def test_interrupt_is_one_line_130(capsys, monkeypatch, tmp_path):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "parse", interrupted)
    good = tmp_path / "good.lw"
    good.write_text("optimizer good extends lamb\n")
    code, out, err = run(capsys, "check", good)
    assert code == 130 and one_line(err) == "layerwise: interrupted"


# ---------------------------------------------------------------- train: inputs before training
def _existing(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "folder" / "keep.json").write_text('{"mine": true}\n')
    return {"folder": tmp_path / "folder", "notes": tmp_path / "notes.txt"}


TRAIN_BAD = {   # extra arguments -> the exact one-line message
    "lr nan": (["--lr", "nan"], "layerwise: error: --lr nan: not a finite number"),
    "lr inf": (["--lr", "inf"], "layerwise: error: --lr inf: not a finite number"),
    "lr -inf": (["--lr=-inf"], "layerwise: error: --lr -inf: not a finite number"),
    "hyper nan": (["--hyper", "beta1=nan"],
                  "layerwise: error: --hyper beta1=nan: not a finite number"),
    "hyper lr inf": (["--hyper", "lr=inf"],
                     "layerwise: error: --hyper lr=inf: not a finite number"),
    "hyper not a number": (["--hyper", "beta1=abc"],
                           "layerwise: error: --hyper beta1: 'abc' is not a number"),
    "threads": (["--threads", "100000"],
                f"layerwise: error: --threads 100000: must be from 1 to {CPUS} (the CPUs "
                "this process may use)"),
    "seed": (["--seed", "99999999999999999999"],
             "layerwise: error: --seed 99999999999999999999: must be from -2**63 to "
             "2**64 - 1 (torch's seed range)"),
    "out is a directory": (["--out", "{folder}"],
                           "layerwise: error: --out {folder}: is a directory (give a file "
                           "name, FILE.json)"),
    "out is not a record": (["--out", "{notes}"],
                            "layerwise: error: --out {notes}: exists and is not a layerwise "
                            "run record; not overwriting it"),
    "out under a file": (["--out", "{notes}/run.json"],
                         "layerwise: error: --out {notes}/run.json: '{notes}' is not a "
                         "directory"),
    "out /dev/null": (["--out", "/dev/null"],
                      "layerwise: error: --out /dev/null: not a regular file"),
    "out /dev/full": (["--out", "/dev/full"],
                      "layerwise: error: --out /dev/full: not a regular file"),
}


@pytest.mark.parametrize("case", list(TRAIN_BAD))
def test_train_bad_input_before_training(case, capsys, monkeypatch, tmp_path):
    names = _existing(tmp_path)
    args, message = TRAIN_BAD[case]
    if any(a.startswith("/dev/") for a in args) and not Path(args[-1]).exists():
        pytest.skip(f"no {args[-1]}")
    def fill(a: str) -> str:
        return a.replace("{folder}", str(names["folder"])).replace("{notes}", str(names["notes"]))
    args = [fill(a) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "run.json")]
    ran = []
    monkeypatch.setattr(train_mod, "_loop", lambda *a, **k: ran.append(1))   # must not train
    before = snapshot(tmp_path)
    code, out, err = run(capsys, "train", *TINY, "--optimizer", "lamb", *args)
    assert code == 2 and out == ""
    assert one_line(err) == fill(message)
    assert not ran
    assert snapshot(tmp_path) == before          # nothing written, nothing changed


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="file permissions do not stop root")
def test_train_unwritable_folder(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, out, err = run(capsys, "train", *TINY, "--optimizer", "lamb",
                             "--out", locked / "sub" / "r.json")
    finally:
        locked.chmod(0o755)
    assert code == 2
    assert one_line(err) == (f"layerwise: error: --out {locked / 'sub' / 'r.json'}: cannot "
                             f"write in '{locked}' (permission denied)")


def test_python_api_messages():
    digits = lw.load("lamb")
    from layerwise.tasks import get_task
    task = get_task("digits")
    for kw, msg in [({"lr": float("nan")}, "lr=nan: not a finite number"),
                    ({"lr": float("inf")}, "lr=inf: not a finite number"),
                    ({"base_lr": float("nan")}, "base_lr=nan: not a finite number"),
                    ({"hypers": {"beta2": float("nan")}}, "beta2=nan: not a finite number")]:
        with pytest.raises(ValueError) as info:
            plan_run(task, digits, **kw)
        assert str(info.value) == msg
    with pytest.raises(ValueError, match=r"^seed 18446744073709551616: must be an integer"):
        plan_run(task, digits, seed=2**64)
    with pytest.raises(ValueError, match=r"^threads 100000: must be from 1 to"):
        train_mod.train(task, digits, threads=100000, max_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"^--base-lr lamb: 'abc' is not a number$"):
        train_mod.parse_hyper("lamb=abc", "--base-lr")


# ---------------------------------------------------------------- train: the record is kept
def test_write_record_is_strict_json_and_atomic(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    write_record({"config": {"lr": float("inf")}, "loss": [1.0, float("nan"), -float("inf")],
                  "optimizer": {}, "final": {}}, path)
    assert strict_json(path.read_text()) == {"config": {"lr": None}, "loss": [1.0, None, None],
                                             "optimizer": {}, "final": {}}
    before = path.read_bytes()

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train_mod.os, "replace", full)
    with pytest.raises(OSError):
        write_record({"config": {}, "optimizer": {}, "final": {}, "new": 1}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]    # no temporary left


def test_train_replaces_a_record_and_keeps_it_when_writing_fails(capsys, monkeypatch, tmp_path):
    out = tmp_path / "runs" / "r.json"
    code, _, err = run(capsys, "train", *TINY, "--optimizer", "sgd", "--out", out)
    assert code == 0, err
    first = out.read_bytes()
    assert strict_json(first.decode())["optimizer"]["name"] == "sgd"
    # a second run into the same record replaces it (a complete record, atomically)
    code, _, err = run(capsys, "train", *TINY, "--optimizer", "adamw", "--out", out)
    assert code == 0, err
    second = out.read_bytes()
    assert strict_json(second.decode())["optimizer"]["name"] == "adamw"
    # the disk fills up after training: the earlier record stays, the run is saved elsewhere
    real_replace = os.replace

    def full(src, dst, *a, **k):
        if Path(dst) == out:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *a, **k)
    monkeypatch.setattr(train_mod.os, "replace", full)
    before = snapshot(tmp_path)
    code, stdout, err = run(capsys, "train", *TINY, "--optimizer", "lamb", "--out", out)
    assert code == 2 and stdout == ""
    line = one_line(err)
    prefix = f"layerwise: error: --out {out}: cannot write the record: No space left on device; "
    assert line.startswith(prefix + "it was saved to ") and line.endswith(" instead")
    spare = Path(line[len(prefix + "it was saved to "):-len(" instead")])
    try:
        assert strict_json(spare.read_text())["optimizer"]["name"] == "lamb"
    finally:
        spare.unlink()
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- ablate: inputs and --out
ABLATE_BAD = {
    "base-lr not a number": (["--base-lr", "lamb=abc"],
                             "layerwise: error: --base-lr lamb: 'abc' is not a number"),
    "base-lr nan": (["--base-lr", "lamb=nan"],
                    "layerwise: error: --base-lr lamb=nan: not a finite number"),
    "base-lr without =": (["--base-lr", "lamb"],
                          "layerwise: error: --base-lr expects NAME=VALUE, not 'lamb'"),
    "threads": (["--threads", "100000"],
                f"layerwise: error: --threads 100000: must be from 1 to {CPUS} (the CPUs this "
                "process may use)"),
    "jobs": (["--jobs", "100000"],
             f"layerwise: error: --jobs 100000: must be from 1 to {max(2, CPUS)} (the CPUs "
             "this process may use, at least 2)"),
    "seed": (["--seed=-99999999999999999999"],
             "layerwise: error: --seed -99999999999999999999: must be from -2**63 to "
             "2**64 - 1 (torch's seed range)"),
    "out /dev/null": (["--out", "/dev/null"], "layerwise: error: --out /dev/null: not a directory"),
    "out is a file": (["--out", "{notes}"], "layerwise: error: --out {notes}: not a directory"),
    "out under a file": (["--out", "{notes}/grid"],
                         "layerwise: error: --out {notes}/grid: '{notes}' is not a directory"),
    "runs is a file": (["--out", "{grid}"],
                       "layerwise: error: --out {grid}: runs exists and is not a directory"),
    "results.csv is a folder": (["--out", "{grid2}"],
                                "layerwise: error: --out {grid2}: results.csv exists and is "
                                "not a regular file"),
    "not a record": (["--out", "{grid3}"],
                     "layerwise: error: --out {grid3}: {rel} is not the record of digits lamb "
                     "b8 seed 0 (it is not a run record (not readable JSON)); move it away"),
}


@pytest.mark.parametrize("case", list(ABLATE_BAD))
def test_ablate_bad_input_before_training(case, capsys, monkeypatch, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "runs").write_text("a file\n")
    (tmp_path / "grid2" / "results.csv").mkdir(parents=True)
    (tmp_path / "grid3" / "runs").mkdir(parents=True)
    rel = plan_grid(make_variants(["lamb"]), tasks=["digits"],
                    batch_sizes=[8], max_steps=1)[0].rel      # where the run's record goes
    (tmp_path / "grid3" / rel).write_text("{half a rec")
    def fill(a: str) -> str:
        for name in ("grid3", "grid2", "grid"):
            a = a.replace("{" + name + "}", str(tmp_path / name))
        return a.replace("{notes}", str(notes)).replace("{rel}", rel)
    args, message = ABLATE_BAD[case]
    args = [fill(a) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "a")]
    monkeypatch.setattr(ablate_mod, "train", lambda *a, **k: pytest.fail("trained"))
    before = snapshot(tmp_path)
    code, out, err = run(capsys, "ablate", *TINY, "--optimizer", "lamb", "--jobs", "1", *args)
    assert code == 2 and out == ""
    assert one_line(err) == fill(message)
    assert snapshot(tmp_path) == before


def _ablate(capsys, out: Path, *optimizers: str, steps: int = 1) -> tuple[int, str, str]:
    return run(capsys, "ablate", "--task", "digits", "--batch-size", "8", "--max-steps",
               str(steps), "--quiet", "--jobs", "1", "--optimizer", *optimizers, "--out", out)


def test_ablate_never_changes_an_earlier_grid(capsys, tmp_path):
    out = tmp_path / "grid"
    code, stdout, err = _ablate(capsys, out, "sgd")
    assert code == 0, err
    (first,) = (out / "runs").iterdir()
    assert first.name.startswith("digits_sgd_b8_s0_")
    before = first.read_bytes()
    # the same cell with another configuration is another run: a record of its own
    code, stdout, err = _ablate(capsys, out, "sgd", steps=2)
    assert code == 0, err
    # another grid in the same folder: its runs are added, the earlier ones kept
    code, stdout, err = _ablate(capsys, out, "adamw")
    assert code == 0, err
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert len(names) == 3 and first.name in names
    assert first.read_bytes() == before
    # the tables are this grid's (adamw only); 'report' shows every record in the folder
    assert [r["optimizer"] for r in csv.DictReader((out / "results.csv").open())] == ["adamw"]
    code, stdout, err = run(capsys, "report", out)
    assert code == 0, err
    assert "| sgd |" in stdout and "| adamw |" in stdout
    assert first.read_bytes() == before


def test_ablate_failed_cell_keeps_records_and_resumes(capsys, monkeypatch, tmp_path):
    out = tmp_path / "grid"
    code, _, err = _ablate(capsys, out, "sgd")
    assert code == 0, err
    (sgd,) = (out / "runs").iterdir()
    earlier = snapshot(tmp_path)
    # a larger grid into the same folder; its new cell fails while training
    real_train = ablate_mod.train
    calls = []

    def failing(task, spec, **kw):
        calls.append(kw["plan"].label)
        raise RuntimeError("boom\nsecond line")
    monkeypatch.setattr(ablate_mod, "train", failing)
    code, stdout, err = _ablate(capsys, out, "sgd", "adamw")
    assert calls == ["adamw"]                     # sgd's record is reused, not re-run
    assert code == 2 and stdout == ""
    assert one_line(err) == (
        "layerwise: error: digits adamw b8 seed 0 failed (RuntimeError: boom); the grid stopped; "
        f"1 of 2 records are in {out / 'runs'} and are reused when the same command runs "
        "again")
    assert snapshot(tmp_path) == earlier          # results and records as they were
    # the same command again: only the missing cell runs; the earlier record is untouched
    monkeypatch.setattr(ablate_mod, "train", lambda task, spec, **kw: (
        calls.append(kw["plan"].label), real_train(task, spec, **kw))[1])
    code, stdout, err = _ablate(capsys, out, "sgd", "adamw")
    assert code == 0, err
    assert calls == ["adamw", "adamw"]
    assert "2 runs; wrote" in stdout
    assert sgd.read_bytes() == earlier[str(sgd.relative_to(tmp_path))]
    table = (out / "results.csv").read_text().splitlines()
    assert len(table) == 3 and {line.split(",")[1] for line in table[1:]} == {"sgd", "adamw"}
    for p in (out / "runs").iterdir():
        strict_json(p.read_text())
    assert not [p for p in out.rglob(".*")]        # no temporary file left


# ---------------------------------------------------------------- from a shell
SHELL = {
    "check": (["check", "{bad}", "{good}"], 1, None),
    "train lr nan": (["train", "--task", "digits", "--optimizer", "lamb", "--lr", "nan"], 2,
                     "layerwise: error: --lr nan: not a finite number"),
    "ablate out /dev/null": (["ablate", "--task", "digits", "--optimizer", "lamb",
                              "--out", "/dev/null"], 2,
                             "layerwise: error: --out /dev/null: not a directory"),
    "show invalid UTF-8": (["show", "{bad}"], 2, None),
}


@pytest.mark.parametrize("case", list(SHELL))
def test_from_a_shell(case, tmp_path):
    bad = tmp_path / "bad.lw"
    bad.write_bytes(b"\xff\xfe optimizer")
    good = tmp_path / "good.lw"
    good.write_text("optimizer good extends lamb\n")
    args, status, message = SHELL[case]
    args = [a.replace("{bad}", str(bad)).replace("{good}", str(good)) for a in args]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-m", "layerwise", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    if message is not None:
        assert lines[0] == message
    else:
        assert lines[0].startswith(f"{bad}:1:1: ") and "UTF-8" in lines[0]
    if case == "check":
        assert proc.stdout == f"{good}: ok\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.lw", "good.lw"]
