"""Ablations a researcher can publish: seeds, the scaled and tuned protocols, steps to
target, records that are reused (grids that grow), --plan / run-cell / report, and
programs with name rules in train and ablate."""
from __future__ import annotations

import csv
import io
import json
import shlex

import pytest

import layerwise.ablate as ablate_mod
from layerwise.ablate import make_variants, plan_grid, run_ablation, write_plan
from layerwise.cli import main
from layerwise.report import markdown, parse_targets, run_row, steps_to_target, summarize
from layerwise.train import scaled_lr, train

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

PNG = b"\x89PNG\r\n\x1a\n"
TASK = {"name": "digits", "summary": "s", "metric": "accuracy", "metric_title": "accuracy, %",
        "metric_percent": True, "higher_is_better": True, "target": 0.9}


def record(opt="lamb", b=8, seed=0, lr=0.1, warmup=1, value=0.5, val=0.5, evals=(),
           diverged=False, ad=None, task=TASK, steps=10, max_steps=None):
    """A minimal run record, as layerwise.train.train writes it."""
    label = opt if ad is None else f"{opt}+{ad}"
    return {"task": dict(task), "optimizer": {"name": opt, "program": "p"},
            "adaptation": None if ad is None else {"label": ad},
            "config": {"label": label, "batch_size": b, "seed": seed, "epochs": 1,
                       "total_steps": steps, "max_steps": max_steps, "lr": lr, "base_lr": 0.1,
                       "lr_rule": "sqrt", "warmup_steps": warmup},
            "steps": steps, "evals": list(evals), "train_time_s": 1.0,
            "final": {"metric": task["metric"], "value": None if diverged else value,
                      "val_value": None if diverged else val, "loss": None if diverged else 1.0,
                      "val_loss": None if diverged else 1.0, "diverged": diverged}}


def rows(*records):
    return [run_row(r, f"runs/{i}.json") for i, r in enumerate(records)]


# ---------------------------------------------------------------- report arithmetic
def test_steps_to_target():
    evals = [{"step": 5, "accuracy": 0.5}, {"step": 10, "accuracy": None},
             {"step": 15, "accuracy": 0.91}, {"step": 20, "accuracy": 0.95}]
    assert steps_to_target(evals, "accuracy", 0.9, True) == 15
    assert steps_to_target(evals, "accuracy", 0.95, True) == 20
    assert steps_to_target(evals, "accuracy", 0.99, True) is None
    assert steps_to_target(evals, "accuracy", None, True) is None
    assert steps_to_target(evals, "accuracy", 0.6, False) == 5        # lower is better
    r = run_row(record(evals=evals), "x.json")
    assert r["steps_to_target"] == 15 and r["target"] == 0.9
    assert run_row(record(evals=evals), "x.json", target=0.95)["steps_to_target"] == 20


def test_seeds_mean_and_sd():
    (cell,) = summarize(rows(record(seed=0, value=0.5), record(seed=1, value=0.7),
                             record(seed=2, value=0.6)))
    assert cell.protocol == "scaled" and len(cell.chosen.runs) == 3
    assert cell.chosen.mean() == pytest.approx(0.6)
    assert cell.chosen.sd() == pytest.approx(0.1)                     # sample sd
    md = markdown([cell])
    assert "**60.0 ± 10.0**" in md and "mean ± sd over 3 seed(s)" in md
    # one seed diverged: the mean of the others, and it is said
    (cell,) = summarize(rows(record(seed=0, value=0.5), record(seed=1, value=0.7),
                             record(seed=2, diverged=True)))
    assert cell.chosen.mean() == pytest.approx(0.6) and cell.chosen.n_diverged == 1
    assert "60.0 ± 14.1 (n=2; 1 diverged)" in markdown([cell])
    (cell,) = summarize(rows(record(seed=0, diverged=True)))
    assert "diverged (1/1)" in markdown([cell])


def test_tuned_chooses_on_val_and_reports_test():
    """Candidate lr=0.2 has the better test metric but the worse val metric: the val
    split decides, the table shows the chosen candidate's test metric and LR."""
    rs = rows(*(record(lr=0.1, seed=s, val=0.8, value=0.6) for s in (0, 1)),
              *(record(lr=0.2, seed=s, val=0.7, value=0.9) for s in (0, 1)),
              *(record(lr=0.4, seed=s, diverged=s == 1, val=0.95, value=0.95) for s in (0, 1)))
    (cell,) = summarize(rs)
    assert cell.protocol == "tuned" and len(cell.candidates) == 3
    assert cell.chosen.lr == 0.1                  # lr=0.4 had a diverged seed
    md = markdown([cell])
    assert "60.0 ± 0.0 (lr 0.1, wu 1)" in md and "chosen on the val split" in md
    lower = dict(TASK, higher_is_better=False, metric_percent=False)
    (cell,) = summarize(rows(record(lr=0.1, val=2.0, value=2.0, task=lower),
                             record(lr=0.2, val=1.0, value=3.0, task=lower)))
    assert cell.chosen.lr == 0.2                  # lower val is better


def test_steps_to_target_table_and_best_column():
    ev = lambda s: [{"step": s, "accuracy": 0.95}]                     # noqa: E731
    rs = rows(record("lamb", 8, 0, evals=ev(40), value=0.95),
              record("lamb", 8, 1, evals=ev(60), value=0.93),
              record("lamb", 32, 0, value=0.8), record("sgd", 8, 0, value=0.96, evals=ev(30)),
              record("sgd", 32, 0, value=0.85))
    md = markdown(summarize(rs))
    assert "#### digits: steps to test accuracy, % >= 90" in md
    assert "| lamb | 50 ± 14 (2/2) | not reached (0/1) |" in md
    assert "| sgd | 30 (1/1) | not reached (0/1) |" in md
    assert "| sgd | sqrt | 0.1 | **96.0 (n=1)** | **85.0 (n=1)** |" in md   # best mean per column
    # runs of another length are another table, not mixed into one cell
    more = rs + rows(record("lamb", 8, 0, steps=3, max_steps=3, value=0.1))
    heads = [l for l in markdown(summarize(more)).splitlines() if l.startswith("### ")]
    assert len(heads) == 2


def test_parse_targets():
    assert parse_targets(["0.9"]) == {None: 0.9}
    assert parse_targets(["digits=0.9", "charlm=3"], ["digits", "charlm"]) == {
        "digits": 0.9, "charlm": 3.0}
    with pytest.raises(ValueError, match="no task 'mnist'"):
        parse_targets(["mnist=0.9"], ["digits"])
    with pytest.raises(ValueError, match="not a finite number"):
        parse_targets(["nan"])
    with pytest.raises(ValueError, match="expects X or TASK=X"):
        parse_targets(["digits=high"])


# ---------------------------------------------------------------- real grids
def _trained(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = ablate_mod.train

    def counting(task, spec, **kw):
        calls.append(f"{kw['plan'].label} b{kw['plan'].batch_size} s{kw['plan'].seed}")
        return real(task, spec, **kw)
    monkeypatch.setattr(ablate_mod, "train", counting)
    return calls


def test_seeds_rerun_and_extension(tmp_path, monkeypatch, capsys):
    calls = _trained(monkeypatch)
    args = ["ablate", "--task", "digits", "--optimizer", "lamb", "sgd", "--batch-size", "8",
            "--seeds", "2", "--max-steps", "4", "--jobs", "1", "--quiet", "--out",
            str(tmp_path)]
    assert main(args) == 0
    first, _ = capsys.readouterr()
    assert sorted(calls) == ["lamb b8 s0", "lamb b8 s1", "sgd b8 s0", "sgd b8 s1"]
    recs = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").iterdir())]
    assert len(recs) == 4 and {r["config"]["seed"] for r in recs} == {0, 1}
    lamb = [r for r in recs if r["config"]["label"] == "lamb"]
    assert lamb[0]["loss"] != lamb[1]["loss"]              # other init and data order
    assert "±" in first and "mean ± sd over 2 seed(s)" in first
    # the same command again: no training, the same table
    calls.clear()
    assert main(args) == 0
    again, _ = capsys.readouterr()
    assert calls == [] and again == first
    # a larger batch size and a third seed: only the new runs train
    assert main(args[:7] + ["8", "16", "--seeds", "3"] + args[10:]) == 0
    assert sorted(calls) == sorted(f"{o} b{b} s{s}" for o in ("lamb", "sgd")
                                   for b, s in ((8, 2), (16, 0), (16, 1), (16, 2)))
    with open(tmp_path / "summary.csv", newline="") as fh:
        cells = list(csv.DictReader(fh))
    assert [(c["optimizer"], c["batch_size"], c["seeds"]) for c in cells] == [
        ("lamb", "8", "3"), ("lamb", "16", "3"), ("sgd", "8", "3"), ("sgd", "16", "3")]
    for name in ("metric_vs_batch.png", "steps_to_target.png", "trust_ratios_digits.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_tuned_protocol(tmp_path, monkeypatch):
    calls = _trained(monkeypatch)
    out = run_ablation(tmp_path, make_variants(["lamb"]), tasks=["digits"], batch_sizes=[8, 32],
                       seeds=2, protocol="tuned", lr_grid=[0.5, 2.0], warmup_grid=[0.0, 0.5],
                       max_steps=4, jobs=1, progress=False)
    assert len(calls) == len(out) == 2 * 2 * 2 * 2
    base = scaled_lr(1e-2, 8, 32, "sqrt")                 # digits' tuned lamb LR at batch 8
    assert sorted({r["lr"] for r in out if r["batch_size"] == 8}) == pytest.approx(
        [0.5 * base, 2 * base])
    assert sorted({r["warmup_steps"] for r in out}) == [0, 2]
    (c8, c32) = summarize(out)
    for c in (c8, c32):                                   # the choice is the best mean val
        assert c.protocol == "tuned" and len(c.candidates) == 4
        assert c.chosen.mean("val_value") == max(k.mean("val_value") for k in c.candidates)
    md = (tmp_path / "results.md").read_text()
    assert f"(lr {c8.chosen.lr:.3g}, wu {c8.chosen.warmup_steps})" in md
    with pytest.raises(ValueError, match="belong to --protocol tuned"):
        plan_grid(make_variants(["lamb"]), tasks=["digits"], lr_grid=[2.0])
    with pytest.raises(ValueError, match="--lr-grid -1"):
        plan_grid(make_variants(["lamb"]), tasks=["digits"], protocol="tuned",
                  lr_grid=[-1.0])


def test_plan_run_cell_and_report(tmp_path, capsys):
    grid = dict(tasks=["digits"], batch_sizes=[8, 16], seeds=2, max_steps=3)
    variants = make_variants(["lamb", "adamw"], adaptations=["none", "trust"])
    runs = plan_grid(variants, **grid)
    buf = io.StringIO()
    assert write_plan(tmp_path / "a", runs, buf) == 16
    lines = buf.getvalue().splitlines()
    assert len(lines) == 16 and all(l.startswith("layerwise run-cell --out ") for l in lines)
    for line in lines:                                    # as a scheduler would run them
        assert main(shlex.split(line)[1:]) == 0
    assert main(shlex.split(lines[0])[1:]) == 0           # again: not run again
    assert "already there, not run again" in capsys.readouterr()[0]
    buf = io.StringIO()
    assert write_plan(tmp_path / "a", runs, buf) == 0     # nothing left to do
    assert main(["report", str(tmp_path / "a")]) == 0
    reported = (tmp_path / "a" / "results.md").read_text()
    # the same grid run by ablate gives the same records and the same table
    run_ablation(tmp_path / "b", variants, jobs=1, progress=False, **grid)
    direct = (tmp_path / "b" / "results.md").read_text()
    assert sorted(p.name for p in (tmp_path / "a" / "runs").iterdir()) == sorted(
        p.name for p in (tmp_path / "b" / "runs").iterdir())
    # the same lines; report orders optimizers by record name (no grid order to follow)
    assert sorted(reported.rsplit("Training time", 1)[0].splitlines()) == sorted(
        direct.rsplit("Training time", 1)[0].splitlines())
    # a plan line whose run no longer resolves to the same configuration is refused
    cfg = json.loads(shlex.split(lines[0])[-1])
    cfg["digest"] = "0" * 64
    capsys.readouterr()
    assert main(["run-cell", "--out", str(tmp_path / "c"), json.dumps(cfg)]) == 2
    err = capsys.readouterr()[1]
    assert "now resolves to another configuration" in err and len(err.splitlines()) == 1
    assert main(["run-cell", "--out", str(tmp_path / "c"), "{not json"]) == 2
    assert not (tmp_path / "c").exists()


NAME_RULE = ('optimizer lamb_bert extends lamb\n'
             'for name ~ "bias|ln" {\n  weight_decay = 0\n}\n')


def test_train_and_ablate_run_a_program_with_a_name_rule(tmp_path, capsys):
    spec = tmp_path / "lamb_bert.lw"
    spec.write_text(NAME_RULE)
    rec = train("digits", str(spec), batch_size=8, max_steps=2, progress=False)
    assert rec["steps"] == 2 and rec["optimizer"]["name"] == "lamb_bert"
    assert main(["train", "--task", "digits", "--optimizer", str(spec), "--batch-size", "8",
                 "--max-steps", "2", "--quiet", "--out", str(tmp_path / "r.json")]) == 0
    assert main(["ablate", "--task", "digits", "--optimizer", str(spec), "--adapt", "none",
                 "trust", "--batch-size", "8", "--max-steps", "2", "--jobs", "1", "--quiet",
                 "--out", str(tmp_path / "g")]) == 0
    out = capsys.readouterr()[0]
    assert "| lamb_bert | none |" in out and "| lamb_bert | trust |" in out
