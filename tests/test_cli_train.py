"""``layerwise train`` and ``layerwise ablate``: output, records, and one-line errors (exit 2)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from layerwise.cli import main

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_prints_metric_and_writes_record(capsys, tmp_path):
    out_file = tmp_path / "run.json"
    code, out, err = run(capsys, "train", "--task", "digits", "--optimizer", "lamb",
                         "--batch-size", "16", "--max-steps", "3", "--hyper", "weight_decay=0",
                         "--warmup-steps", "1", "--quiet", "--out", str(out_file))
    assert code == 0, err
    assert "validation accuracy: " in out and f"record: {out_file}" in out
    record = json.loads(out_file.read_text())
    assert record["config"]["hypers"] == {"weight_decay": 0.0}
    assert record["config"]["warmup_steps"] == 1 and record["steps"] == 3
    assert len(record["trust_ratios"]["values"]["tr"]) == 8


def test_train_with_a_lw_file_and_lr(capsys, tmp_path):
    spec = tmp_path / "clipped.lw"
    spec.write_text("optimizer lamb_clipped extends lamb\nhyper gamma_u = 10 in (0, inf)\n"
                    "def phi(z) = min(z, gamma_u)\n")
    code, out, err = run(capsys, "train", "--task", "charlm", "--optimizer", str(spec),
                         "--batch-size", "4", "--max-steps", "2", "--lr", "0.003",
                         "--hyper", "gamma_u=2", "--quiet", "--out", str(tmp_path / "r.json"))
    assert code == 0, err
    assert "validation bits per byte: " in out and "peak lr 0.003 " in out
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["optimizer"]["name"] == "lamb_clipped"
    assert record["config"]["hypers"] == {"gamma_u": 2.0}


BAD = {
    "missing spec file": (["train", "--task", "digits", "--optimizer", "missing.lw"],
                          "neither a preset nor a file"),
    "invalid spec file": (["train", "--task", "digits", "--optimizer", "{bad}"],
                          "bad.lw:4:"),
    "unknown task": (["train", "--task", "mnist", "--optimizer", "lamb"],
                     "unknown task 'mnist'; known tasks: digits, charlm"),
    "batch too large": (["train", "--task", "digits", "--optimizer", "lamb", "--batch-size",
                         "5000"], "batch size 5000 is larger than the digits training set"),
    "unknown hyper": (["train", "--task", "digits", "--optimizer", "lamb", "--hyper",
                       "wd=0.1"], "unknown hyper 'wd' for optimizer 'lamb'"),
    "hyper out of range": (["train", "--task", "digits", "--optimizer", "lamb", "--hyper",
                            "beta2=1"], "beta2=1 is outside its range [0, 1)"),
    "hyper not a number": (["train", "--task", "digits", "--optimizer", "lamb", "--hyper",
                            "beta2=high"], "'high' is not a number"),
    "ablate missing spec": (["ablate", "--out", "{tmp}/a", "--optimizer", "lamb", "nope"],
                            "'nope' is neither a preset nor a file"),
    "ablate invalid spec": (["ablate", "--out", "{tmp}/a", "--optimizer", "{bad}"],
                            "bad.lw:4:"),
    "ablate unknown task": (["ablate", "--out", "{tmp}/a", "--task", "digits", "cifar"],
                            "unknown task 'cifar'"),
    "ablate batch too large": (["ablate", "--out", "{tmp}/a", "--task", "charlm",
                                "--batch-size", "8", "100000"],
                               "batch size 100000 is larger than the charlm training set"),
    "ablate bad phi": (["ablate", "--out", "{tmp}/a", "--phi", "min(z,"],
                       "--phi 'min(z,' for lamb: syntax error"),
    "ablate phi without phi": (["ablate", "--out", "{tmp}/a", "--optimizer", "sgd", "--phi",
                                "z"], "no optimizer of the grid defines phi"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2(case, capsys, tmp_path):
    bad = tmp_path / "bad.lw"
    bad.write_text("optimizer bad\nhyper lr = 1\nstep {\n  w = w - lr * gg\n  w = w - lr * hh\n}\n")
    argv, phrase = BAD[case]
    argv = [a.replace("{bad}", str(bad)).replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert phrase in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()           # nothing ran


def test_missing_task_dependencies(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real(name, *a))
    for cmd in (["train", "--task", "digits", "--optimizer", "lamb"], ["ablate", "--out", "x"]):
        code, out, err = run(capsys, *cmd)
        assert code == 2 and len(err.splitlines()) == 1
        assert "needs scikit-learn" in err and "pip install 'layerwise[tasks]'" in err


def test_ablate_in_worker_processes(tmp_path):
    """The real command, spawning two workers (python -m layerwise: the __main__ guard)."""
    out = tmp_path / "grid"
    proc = subprocess.run(
        [sys.executable, "-m", "layerwise", "ablate", "--task", "digits", "--optimizer", "lamb",
         "adamw", "--batch-size", "8", "16", "--max-steps", "1", "--jobs", "2", "--quiet",
         "--out", str(out)], capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr
    assert "### digits: test accuracy, % (higher is better)" in proc.stdout
    assert "| lamb | sqrt |" in proc.stdout and "| adamw | sqrt |" in proc.stdout
    assert "4 runs; wrote" in proc.stdout
    assert len(list((out / "runs").glob("*.json"))) == 4
