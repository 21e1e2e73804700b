"""layerwise.ablate: variants (--phi), the grid, results.csv / results.md and plots."""
from __future__ import annotations

import csv
import json

import pytest

import layerwise as lw
from layerwise.ablate import (defines, make_variants, markdown_table, plot_metric_vs_batch,
                              run_ablation)

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

PNG = b"\x89PNG\r\n\x1a\n"


def test_variants_and_phi():
    vs = make_variants(["lamb", "adamw", "lars_lamb_paper"], ["min(z, 10)", "clip(z,0.01,  10)"])
    assert [v.label for v in vs] == [
        "lamb", "adamw", "lars_lamb_paper",
        "lamb[phi=min(z, 10)]", "lars_lamb_paper[phi=min(z, 10)]",
        "lamb[phi=clip(z,0.01, 10)]", "lars_lamb_paper[phi=clip(z,0.01, 10)]"]
    phi = vs[3].spec
    assert phi.name == "lamb" and "min(norm(w), 10)" in phi.to_text()
    assert defines(lw.load("lamb"), "phi") and not defines(lw.load("adamw"), "phi")
    with pytest.raises(ValueError, match="no optimizer of the grid defines phi"):
        make_variants(["adamw", "sgd"], ["min(z, 10)"])
    with pytest.raises(ValueError, match=r"--phi 'min\(z, gamma\)' for lamb: unknown name 'gamma'"):
        make_variants(["lamb"], ["min(z, gamma)"])
    # the same program twice gets unique labels; base LRs by label or program name
    vs = make_variants(["lamb", "lamb", "sgd"], base_lrs={"lamb#2": 0.5, "sgd": 0.1})
    assert [(v.label, v.base_lr) for v in vs] == [("lamb", None), ("lamb#2", 0.5), ("sgd", 0.1)]
    with pytest.raises(ValueError, match="--base-lr names no optimizer"):
        make_variants(["lamb"], base_lrs={"lion": 1.0})


def test_grid_writes_every_cell(tmp_path):
    variants = make_variants(["lamb", "sgd"], ["min(z, 1)"])
    sizes = [8, 32]
    rows = run_ablation(tmp_path, variants, tasks=["digits"], batch_sizes=sizes, max_steps=2,
                        jobs=1, progress=False)
    labels = ["lamb", "sgd", "lamb[phi=min(z, 1)]"]
    assert [(r["optimizer"], r["batch_size"]) for r in rows] == [(l, b) for l in labels
                                                                 for b in sizes]
    with open(tmp_path / "results.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(labels) * len(sizes)
    assert {(r["optimizer"], int(r["batch_size"])) for r in table} == {
        (l, b) for l in labels for b in sizes}
    for r in table:
        assert r["task"] == "digits" and r["metric"] == "accuracy" and 0 <= float(r["value"]) <= 1
        assert int(r["steps"]) == 2 and r["diverged"] == "False"
        record = json.loads((tmp_path / r["record"]).read_text())
        assert record["config"]["label"] == r["optimizer"]
    # learning rates follow the rule from the tuned base LR
    lr = {(r["optimizer"], int(r["batch_size"])): float(r["lr"]) for r in table}
    assert lr[("sgd", 32)] == pytest.approx(4 * lr[("sgd", 8)])
    assert lr[("lamb", 32)] == pytest.approx(2 * lr[("lamb", 8)])
    assert lr[("lamb[phi=min(z, 1)]", 32)] == lr[("lamb", 32)]
    md = (tmp_path / "results.md").read_text()
    lines = [l for l in md.splitlines() if l.startswith("| ")]
    assert lines[0].startswith("| optimizer | LR rule | base LR | B=8 (2 steps) | B=32 (2 steps)")
    body = lines[2:]
    assert [l.split(" | ")[0][2:] for l in body] == labels
    for line in body:                           # every cell filled
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 3 + len(sizes) and all(cells)
    for name in ("metric_vs_batch.png", "trust_ratios_digits.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_markdown_marks_best_and_divergence():
    def row(opt, b, value, loss):
        return {"task": "charlm", "optimizer": opt, "program": opt, "batch_size": b, "epochs": 1,
                "steps": 100 // b, "lr": 1e-3, "base_lr": 1e-3, "lr_rule": "sqrt",
                "warmup_steps": 1, "metric": "bits_per_byte", "value": value, "val_loss": loss,
                "diverged": value is None, "train_time_s": 1.0, "record": "x.json"}
    rows = [row("lamb", 4, 3.0, 2.08), row("lamb", 8, 3.5, 2.4),
            row("adamw", 4, 3.2, 2.2), row("adamw", 8, None, None)]
    md = markdown_table(rows)
    assert "| lamb | sqrt | 0.001 | **3.000 (2.080)** | **3.500 (2.400)** |" in md
    assert "| adamw | sqrt | 0.001 | 3.200 (2.200) | diverged |" in md
    assert "lower is better" in md


def test_plot_skips_diverged(tmp_path):
    rows = [{"task": "digits", "optimizer": "sgd", "batch_size": b, "epochs": 1,
             "metric": "accuracy", "value": v} for b, v in ((8, 0.5), (16, None))]
    plot_metric_vs_batch(rows, tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:8] == PNG
