"""layerwise.ablate: variants (--phi, --adapt), the grid, results.csv / results.md and plots.

Seeds, protocols, steps to target, reuse, --plan and report: tests/test_ablate_protocols.py.
"""
from __future__ import annotations

import csv
import json

import pytest
import torch

import layerwise as lw
from layerwise.ablate import (adapt_spec, defines, make_adaptations, make_variants,
                              run_ablation)
from layerwise.cli import main

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
    lines = [l for l in md.split("####")[0].splitlines() if l.startswith("| ")]
    assert lines[0].startswith("| optimizer | LR rule | base LR | B=8 (2 steps) | B=32 (2 steps)")
    body = lines[2:]
    assert [l.split(" | ")[0][2:] for l in body] == labels
    for line in body:                           # every cell filled
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 3 + len(sizes) and all(cells)
    for name in ("metric_vs_batch.png", "trust_ratios_digits.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


# ---------------------------------------------------------------- the adaptation axis (--adapt)
HALVE = "adaptation halve\n# half the base's update\nstep {\n  w = w - lr * 0.5 * u\n}\n"


def test_adaptations_and_variants(tmp_path):
    halve = tmp_path / "halve.lw"
    halve.write_text(HALVE)
    other = tmp_path / "other" / "halve.lw"            # another file, the same adaptation name
    other.parent.mkdir()
    other.write_text(HALVE)
    ads = make_adaptations(["none", "trust", str(halve), str(other)])
    assert ads[0] is None and [a.label for a in ads[1:]] == ["trust", "halve", "halve#2"]
    assert make_adaptations(None) == [None] and make_adaptations([]) == [None]
    vs = make_variants(["adamw", "sgd"], adaptations=["none", "trust", str(halve)],
                       base_lrs={"sgd+trust": 0.5, "sgd": 0.1})
    assert [(v.label, v.adaptation_label, v.name, v.base_lr) for v in vs] == [
        ("adamw", "none", "adamw", None), ("adamw", "trust", "adamw+trust", None),
        ("adamw", "halve", "adamw+halve", None), ("sgd", "none", "sgd", 0.1),
        ("sgd", "trust", "sgd+trust", 0.5), ("sgd", "halve", "sgd+halve", 0.1)]
    # the trained program is lw.adapt's: its name (so tuned LR and LR rule) is the optimizer's
    spec = vs[1].train_spec()
    assert vs[0].train_spec() is vs[0].spec
    assert spec.name == "adamw" and spec.program.watches == ("tr",)
    assert "tr = " in spec.to_text() and "0.5 * u" not in spec.to_text()
    assert "0.5 * u" in vs[2].train_spec().to_text()    # adamw+halve: the file's step
    # without adaptations, the grid is as before the axis
    assert [v.name for v in make_variants(["lamb", "sgd"])] == ["lamb", "sgd"]
    assert all(v.adaptation is None for v in make_variants(["lamb", "sgd"], ["min(z, 1)"]))
    # phi variants get every adaptation too
    assert [v.name for v in make_variants(["lamb"], ["min(z, 1)"], adaptations=["none", "trust"])
            ] == ["lamb", "lamb+trust", "lamb[phi=min(z, 1)]", "lamb[phi=min(z, 1)]+trust"]


def test_adapted_program_equals_lw_adapt_of_a_torch_optimizer():
    """The program an adapted cell trains is AdamW with LAMB's trust ratio: it steps as
    lw.adapt(torch.optim.AdamW, "trust") does (float64, 4 steps)."""
    torch.manual_seed(0)
    shapes = [(6, 5), (5,), (3, 6)]
    ours = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    spec = make_variants(["adamw"], adaptations=["trust"])[0].train_spec()
    a = lw.Optimizer(ours, spec, compile=False, lr=0.01)
    b = lw.adapt(torch.optim.AdamW(ref, lr=0.01, eps=1e-8, weight_decay=0.01), "trust",
                 compile=False)
    plain = [p.detach().clone().requires_grad_() for p in ours]
    c = torch.optim.AdamW(plain, lr=0.01, eps=1e-8, weight_decay=0.01)
    for _ in range(4):
        grads = [torch.randn(*s, dtype=torch.float64) for s in shapes]
        for params, opt in ((ours, a), (ref, b), (plain, c)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for x, y, z in zip(ours, ref, plain):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(x, z)                 # and it is not plain AdamW


def test_grid_with_adaptation_axis(tmp_path, capsys):
    """A real grid, first without --adapt, then with '--adapt none trust' into the same folder:
    the unadapted cells keep their record names (and results); adapted cells are added."""
    sizes = [8, 32]
    plain = run_ablation(tmp_path, make_variants(["adamw", "sgd"]), tasks=["digits"],
                         batch_sizes=sizes, max_steps=3, jobs=1, progress=False)
    plain_md = (tmp_path / "results.md").read_text()
    assert "| optimizer | LR rule | base LR | B=8 (3 steps)" in plain_md   # as before the axis
    assert "adaptation" not in plain_md
    assert {r["adaptation"] for r in plain} == {"none"}
    before = {r["record"]: json.loads((tmp_path / r["record"]).read_text()) for r in plain}
    assert {r.rsplit("_", 1)[0] for r in before} == {
        f"runs/digits_{o}_b{b}_s0" for o in ("adamw", "sgd") for b in sizes}

    code = main(["ablate", "--task", "digits", "--optimizer", "adamw", "sgd", "--adapt", "none",
                 "trust", "--batch-size", "8", "32", "--max-steps", "3", "--jobs", "1",
                 "--quiet", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "8 runs; wrote" in out
    assert "reusing 4 of 8 records" not in err       # --quiet
    with open(tmp_path / "results.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    cells = [(r["optimizer"], r["adaptation"], int(r["batch_size"])) for r in table]
    assert cells == [(o, a, b) for o in ("adamw", "sgd") for a in ("none", "trust")
                     for b in sizes]
    records = {}
    for r in table:
        record = json.loads((tmp_path / r["record"]).read_text())
        records[(r["optimizer"], r["adaptation"], int(r["batch_size"]))] = record
        name = r["optimizer"] if r["adaptation"] == "none" else f"{r['optimizer']}+trust"
        assert r["record"].startswith(f"runs/digits_{name}_b{r['batch_size']}_s0_")
        if r["adaptation"] == "none":               # the grid without --adapt wrote it
            assert r["record"] in before
        assert record["config"]["label"] == name and record["optimizer"]["name"] == r["program"]
        assert int(r["steps"]) == 3 and r["diverged"] == "False"
        if r["adaptation"] == "none":
            assert record["adaptation"] is None
            # the same key and the same run as the grid without --adapt
            assert record["loss"] == before[r["record"]]["loss"]
            assert record["final"] == before[r["record"]]["final"]
        else:
            assert record["adaptation"]["name"] == "trust"
            assert record["adaptation"]["file"].endswith("trust.lw")
            assert "tr = " in record["optimizer"]["program"]
    lr = {k: r["lr"] for k, r in ((k, rec["config"]) for k, rec in records.items())}
    for o in ("adamw", "sgd"):
        for b in sizes:
            none, trust = records[(o, "none", b)], records[(o, "trust", b)]
            assert lr[(o, "trust", b)] == lr[(o, "none", b)]     # the same LR: only adapted
            assert none["loss"][0] == trust["loss"][0]           # the same model and batch
            assert none["loss"][1:] != trust["loss"][1:]         # ... then another optimizer
            tr = trust["trust_ratios"]["values"]["tr"]
            assert tr and all(len(xs) == 3 and all(x > 0 for x in xs) for xs in tr.values())
            assert not any(none["trust_ratios"]["values"].values())
    md = (tmp_path / "results.md").read_text()
    assert md in out
    lines = [l for l in md.split("####")[0].splitlines() if l.startswith("| ")]
    assert lines[0].startswith("| optimizer | adaptation | LR rule | base LR | B=8 (3 steps) |")
    assert [tuple(c.strip() for c in l.strip("|").split("|")[:3]) for l in lines[2:]] == [
        ("adamw", "none", "sqrt"), ("adamw", "trust", "sqrt"),
        ("sgd", "none", "linear"), ("sgd", "trust", "linear")]
    for name in ("metric_vs_batch.png", "trust_ratios_digits.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


# an optimizer without an lr: no adaptation can be applied to it
NO_LR = "optimizer sgd_eta\nhyper eta = 0.1 in [0, inf)\nstep {\n  w = w - eta * g\n}\n"

BAD_ADAPT = {   # --adapt (and related) values -> a phrase of the one-line error
    "unknown name": (["--adapt", "none", "trsut"],
                     "--adapt 'trsut' is neither 'none', an adaptation preset (trust"),
    "optimizer preset": (["--adapt", "lamb"],
                         "--adapt 'lamb': 'lamb' is an optimizer, not an adaptation"),
    "optimizer file": (["--adapt", "trust", "{opt}"],
                       "'my_sgd' is an optimizer, not an adaptation"),
    "bad adaptation file": (["--adapt", "{bad}"], "bad_adapt.lw:3:16: unknown name 'uu'"),
    "given twice": (["--adapt", "trust", "none", "trust"], "--adapt 'trust' is given twice"),
    "no lr": (["--optimizer", "adamw", "{no_lr}", "--adapt", "none", "trust"],
              "--adapt trust cannot be applied to sgd_eta: 'sgd_eta' has no hyper 'lr'"),
    "adaptation as optimizer": (["--optimizer", "trust"],
                                ("'trust' is an adaptation, not an optimizer: give it with "
                                 "--adapt trust")),
    "base LR of no cell": (["--adapt", "trust", "--base-lr", "adamw=0.1", "sgd+trust=1"],
                           "--base-lr names no optimizer of the grid: sgd+trust"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPT))
def test_bad_adapt_is_one_line_before_anything_runs(case, capsys, tmp_path):
    (tmp_path / "my_sgd.lw").write_text("optimizer my_sgd extends sgd\n")
    (tmp_path / "bad_adapt.lw").write_text("adaptation bad\nstep {\n  w = w - lr * uu\n}\n")
    (tmp_path / "sgd_eta.lw").write_text(NO_LR)
    args, phrase = BAD_ADAPT[case]
    if "--optimizer" not in args:
        args = ["--optimizer", "adamw", *args]
    args = [a.replace("{opt}", str(tmp_path / "my_sgd.lw"))
            .replace("{bad}", str(tmp_path / "bad_adapt.lw"))
            .replace("{no_lr}", str(tmp_path / "sgd_eta.lw")) for a in args]
    code = main(["ablate", "--task", "digits", "--batch-size", "8", "--max-steps", "1",
                 "--jobs", "1", "--quiet", "--out", str(tmp_path / "a"), *args])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1, err
    assert phrase in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()               # nothing ran, nothing written


def test_bad_adapt_from_python():
    """The same checks from Python (make_adaptations, make_variants, adapt_spec)."""
    with pytest.raises(ValueError, match="'lamb' is an optimizer, not an adaptation"):
        make_adaptations(["lamb"])
    with pytest.raises(ValueError, match="'nope' is neither 'none'"):
        make_variants(["adamw"], adaptations=["nope"])
    no_lr = lw.parse(NO_LR, "sgd_eta.lw")
    with pytest.raises(ValueError, match="--adapt trust cannot be applied to sgd_eta: 'sgd_eta' "
                                         "has no hyper 'lr'"):
        make_variants([no_lr, "adamw"], adaptations=["none", "trust"])
    with pytest.raises(lw.SpecError, match="has no hyper 'lr'"):
        adapt_spec(no_lr, "trust")
    # lars watches a 'tr' of its own, as trust does: the adaptation's is 'adapt_tr'
    assert adapt_spec(lw.load("lars"), "trust").program.watches == ("tr", "adapt_tr")
