"""layerwise.noise_scale: the simple noise scale of McCandlish et al. 2018 (arXiv:1812.06162, A.1).

The estimator is checked against problems where tr(Sigma) and |G|^2 are
known exactly; the splitting into micro-batches against one full-batch
backward; the command against a short real run on ``digits``.
"""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from layerwise import noise_scale as ns
from layerwise.train import train

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ns.add_parser(parser.add_subparsers())
    return parser.parse_args(["noise-scale", *argv])


# ---------------------------------------------------------------- (a) the estimator
def test_estimate_is_exact_on_expected_norms():
    # E|G_B|^2 = |G|^2 + tr(Sigma)/B: plugging in the expectations gives the truth back
    g2 = torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64)
    s = torch.tensor([40.0, 7.0, 0.0], dtype=torch.float64)
    e_g2, e_s = ns.estimate(g2 + s / 8, g2 + s / 64, 8, 64)
    torch.testing.assert_close(e_g2, g2, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(e_s, s, rtol=1e-14, atol=1e-14)
    assert ns.b_simple(-0.1, 5.0) is None and ns.b_simple(1.0, -2.0) is None
    assert ns.b_simple(float("nan"), 1.0) is None and ns.b_simple(2.0, 5.0) == 2.5


def _run_estimator(model, params, loss_fn, sample, b_small, b_big, steps, decay):
    avg = ns.NoiseEMA(decay)
    for _ in range(steps):
        x, y = sample(b_big)
        _, small_sq, big_sq = ns.micro_step(model, params, loss_fn, x, y, b_big // b_small)
        avg.update(*ns.estimate(small_sq, big_sq, b_small, b_big))
    return avg.values()


def test_synthetic_gradients_with_known_covariance():
    """Per-example gradients g_i = G + L z_i (z ~ N(0, I)) injected through a loss that
    is linear in the parameters: tr(Sigma) = |L|_F^2 and |G|^2 are exact, per layer."""
    gen = torch.Generator().manual_seed(0)
    dims = (30, 12, 5)
    true_g = [torch.randn(d, generator=gen, dtype=torch.float64) for d in dims]
    chol = [torch.randn(d, d, generator=gen, dtype=torch.float64) * s
            for d, s in zip(dims, (1.0, 1.5, 0.6))]
    params = [torch.zeros(d, dtype=torch.float64, requires_grad=True) for d in dims]

    def sample(b):
        per = [g + torch.randn(b, len(g), generator=gen, dtype=torch.float64) @ c.T
               for g, c in zip(true_g, chol)]
        return torch.cat(per, 1), torch.zeros(b)

    def loss_fn(model, x, y):         # d loss / d theta_j = mean of the rows' part j
        parts = x.mean(0).split(dims)
        return sum((p * v).sum() for p, v in zip(params, parts))

    g2, s = _run_estimator(None, params, loss_fn, sample, 8, 64, 1500, 0.995)
    truth_g2 = torch.stack([g.square().sum() for g in true_g])
    truth_s = torch.stack([c.square().sum() for c in chol])
    torch.testing.assert_close(g2, truth_g2, rtol=0.08, atol=0)     # per layer, 8%
    torch.testing.assert_close(s, truth_s, rtol=0.05, atol=0)
    whole = truth_s.sum() / truth_g2.sum()
    assert s.sum() / g2.sum() == pytest.approx(whole.item(), rel=0.08)
    per_layer = s / g2
    torch.testing.assert_close(per_layer, truth_s / truth_g2, rtol=0.12, atol=0)


def test_linear_least_squares_closed_form():
    """0.5 (w.x + b - y)^2 on a fixed data set: per-example gradients r_i x_i and r_i
    in closed form give G and tr(Sigma) per tensor; micro-batches are drawn with
    replacement, so the estimator's expectation is exactly that."""
    gen = torch.Generator().manual_seed(1)
    n, d = 4096, 16
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, generator=gen, dtype=torch.float64) + 0.5 \
        + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
    model = torch.nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.zero_(), model.bias.fill_(-1.0)
    params = list(model.parameters())
    with torch.no_grad():
        r = model(x).squeeze(1) - y
        per = [r[:, None] * x, r[:, None]]                       # weight, bias
    truth_g2 = torch.stack([p.mean(0).square().sum() for p in per])
    truth_s = torch.stack([(p - p.mean(0)).square().sum(1).mean() for p in per])

    def loss_fn(m, xb, yb):
        return 0.5 * (m(xb).squeeze(1) - yb).square().mean()

    def sample(b):
        idx = torch.randint(n, (b,), generator=gen)
        return x[idx], y[idx]

    g2, s = _run_estimator(model, params, loss_fn, sample, 4, 64, 1200, 0.995)
    torch.testing.assert_close(g2, truth_g2, rtol=0.1, atol=0)
    torch.testing.assert_close(s, truth_s, rtol=0.06, atol=0)
    assert (s.sum() / g2.sum()).item() == pytest.approx(
        (truth_s.sum() / truth_g2.sum()).item(), rel=0.1)


# ---------------------------------------------------------------- (b), (c) splitting
def _mlp():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(7, 11), torch.nn.Tanh(),
                               torch.nn.Linear(11, 3)).double()


def _ce(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def test_big_gradient_equals_one_full_backward_and_norms_add_up():
    model = _mlp()
    params = list(model.parameters())
    x = torch.randn(48, 7, dtype=torch.float64)
    y = torch.randint(3, (48,))
    full = torch.autograd.grad(_ce(model, x, y), params)
    loss, small_sq, big_sq = ns.micro_step(model, params, _ce, x, y, 6)
    for p, g in zip(params, full):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
    assert loss.item() == pytest.approx(_ce(model, x, y).item(), rel=1e-12)
    # per-tensor squared norms, and their sums are the whole-model (flattened) norms
    flat = torch.cat([g.flatten() for g in full])
    torch.testing.assert_close(big_sq, torch.stack([g.square().sum() for g in full]))
    assert big_sq.sum().item() == pytest.approx(flat.square().sum().item(), rel=1e-12)
    micro = [torch.cat([g.flatten() for g in torch.autograd.grad(_ce(model, xm, ym), params)])
             for xm, ym in zip(x.chunk(6), y.chunk(6))]
    whole_small = torch.stack([m.square().sum() for m in micro]).mean()
    assert small_sq.sum().item() == pytest.approx(whole_small.item(), rel=1e-12)


def test_training_is_the_ordinary_run():
    kw = dict(batch_size=128, seed=2)
    rec = ns.measure_noise_scale("digits", "lamb", micro_batch_size=16, steps=5, every=1,
                                 progress=False, report=lambda line: None, **kw)
    plain = train("digits", "lamb", max_steps=5, progress=False, **kw)
    assert rec["config"]["lr"] == plain["config"]["lr"]
    assert rec["series"]["loss"] == pytest.approx(plain["loss"], rel=1e-4)


# ---------------------------------------------------------------- (d) the command
def test_digits_run_through_the_command(tmp_path, capsys):
    out = tmp_path / "ns"
    assert ns.run(_args("--task", "digits", "--batch-size", "256", "--micro-batch-size", "32",
                        "--steps", "8", "--every", "4", "--out", str(out), "--quiet")) == 0
    text = capsys.readouterr().out
    assert "final whole-model B_simple" in text
    rec = json.loads((out / "noise_scale_digits.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert (out / "noise_scale_digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))
    cfg, fin = rec["config"], rec["final"]
    assert (cfg["batch_size"], cfg["micro_batch_size"], cfg["micro_batches"], cfg["steps"]) \
        == (256, 32, 8, 8)
    assert rec["series"]["step"] == [4, 8]
    m = fin["model"]
    assert all(isinstance(m[k], float) and math.isfinite(m[k]) and m[k] > 0
               for k in ("b_simple", "g2", "s"))
    names = [n for n, _ in ns._prepare("digits", "lamb", None, None, 1, 1, 0, None, 0.5,
                                       None)[0].build_model().named_parameters()]
    assert list(rec["series"]["layers"]) == names
    # (b) whole model = sum over layers, at every recorded step
    for i in range(2):
        layers = rec["series"]["layers"].values()
        for key in ("g2", "s"):
            assert rec["series"]["model"][key][i] == pytest.approx(
                math.fsum(d[key][i] for d in layers), rel=1e-12)
    assert m["b_simple"] == pytest.approx(m["s"] / m["g2"])
    assert [b["batch_size"] for b in rec["batch_sizes"]] == [32, 128, 512]
    assert all(b["past_b_noise"] == (b["batch_size"] > m["b_simple"]) for b in rec["batch_sizes"])


# ---------------------------------------------------------------- (e) bad inputs
@pytest.mark.parametrize("argv, option", [
    (["--batch-size", "100", "--micro-batch-size", "30"], "--micro-batch-size 30"),
    (["--batch-size", "64", "--micro-batch-size", "64"], "--micro-batch-size 64"),
    (["--batch-size", "64", "--micro-batch-size", "0"], "--micro-batch-size 0"),
    (["--batch-size", "5000"], "--batch-size 5000"),
    (["--seed", str(2 ** 64)], "--seed"),
    (["--steps", "0"], "--steps 0"),
    (["--every", "0"], "--every 0"),
    (["--threads", "100000"], "--threads"),
    (["--optimizer", "no_such_optimizer"], "--optimizer no_such_optimizer"),
])
def test_bad_inputs_name_the_option_and_write_nothing(tmp_path, argv, option):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="^" + option) as info:
        ns.run(_args("--task", "digits", *argv, "--out", str(out), "--quiet"))
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_unknown_task_and_bad_out(tmp_path):
    with pytest.raises(ValueError, match="^unknown task 'nope'; known tasks: digits"):
        ns.run(_args("--task", "nope", "--out", str(tmp_path / "o")))
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    with pytest.raises(ValueError, match="^--out"):
        ns.run(_args("--task", "digits", "--steps", "1", "--out", str(blocker), "--quiet"))
    assert blocker.read_text() == "mine" and sorted(tmp_path.iterdir()) == [blocker]
