"""The compiled path: graph counts, no recompiles from schedulers, state_dict round trips.

Cold compiles cost 15-30 s on a 2-core CPU, so this file compiles only a
tiny program (twice, with two different constants; a third time under another
name, which must reuse the first one's graphs) and the `lamb` preset (shared with
other tests through the runner cache).
"""
import copy
import subprocess
import sys
import textwrap

import torch
from torch._dynamo.utils import counters

import layerwise as lw

TINY = """optimizer {name}
hyper lr = 0.1 in [0, inf)
state r : layer = 0
step {{
  r = {beta} * r + (1 - {beta}) * rms(g)
  w = w - lr * norm(w) / (norm(g) + 1) * g - lr * r * sign(g)
}}
"""


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def mixed_params(n: int, seed: int):
    """``n`` parameters whose sizes cover 1, 2..4096 and > 4096 elements."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1,), (3, 4), (80, 90)]
    extra = [(), (7,), (2, 3, 5), (5000,), (16, 16), (1, 1), (33, 129), (4, 4, 4, 4)]
    for i in range(n - 3):
        shapes.append(extra[i % len(extra)])
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes[:n]]


def steps(opt, params, k, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(k):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def test_graph_count_does_not_grow_with_parameters_and_schedulers_do_not_recompile():
    counts = {}
    for n, beta in ((3, 0.9), (300, 0.8)):
        params = mixed_params(n, seed=n)
        program = lw.parse(TINY.format(name=f"tiny_{n}", beta=beta))
        opt = lw.Optimizer(params, program, compile=True)
        before = compiled_graphs()
        steps(opt, params, 2, seed=0)
        counts[n] = compiled_graphs() - before
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=20,
                                                    cycle_momentum=False)
        before = compiled_graphs()
        for _ in range(10):
            steps(opt, params, 1, seed=1)
            sched.step()
        assert compiled_graphs() == before, "an LR scheduler step caused a recompile"
        assert opt.param_groups[0]["lr"] != 0.1  # the scheduler did change lr
    # the flat runtime: one graph per pass (a level pass and the final pass),
    # however many parameters, whatever their sizes
    assert counts[3] == counts[300] and 1 <= counts[3] <= 4, counts
    # the same step under another name (and with rules, which act on the
    # hyper values fed to the graphs, not on the graphs) compiles nothing new
    params = mixed_params(5, seed=5)
    text = TINY.format(name="tiny_renamed", beta=0.9) + 'for ndim <= 1 {\n  lr = 0.5 * lr\n}\n'
    opt = lw.Optimizer(params, lw.parse(text), compile=True)
    before = compiled_graphs()
    steps(opt, params, 2, seed=0)
    assert compiled_graphs() == before, "a renamed program recompiled"


def make_lamb_setup(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    return model.to(dtype)


def train(model, opt, k, seed0):
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(99), dtype=model[0].weight.dtype)
    for s in range(k):
        gen = torch.Generator().manual_seed(seed0 + s)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
    return x


def test_state_dict_round_trip_compiled_is_bit_identical():
    ref = make_lamb_setup()
    ref_opt = lw.Optimizer(ref.parameters(), "lamb", compile=True)
    train(ref, ref_opt, 10, 0)

    model = make_lamb_setup()
    opt = lw.Optimizer(model.parameters(), "lamb", compile=True)
    train(model, opt, 5, 0)
    saved = copy.deepcopy(opt.state_dict())
    copy_model = copy.deepcopy(model)
    fresh = lw.Optimizer(copy_model.parameters(), "lamb", compile=True)
    fresh.load_state_dict(saved)
    train(copy_model, fresh, 5, 5)
    for a, b in zip(copy_model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


FRESH_PROCESS = textwrap.dedent("""
    import sys, torch, layerwise as lw
    sys.path.insert(0, {tests!r})
    from test_compiled_step import make_lamb_setup, train
    path, phase = sys.argv[1], sys.argv[2]
    if phase == "first":
        model = make_lamb_setup(torch.float64)
        opt = lw.Optimizer(model.parameters(), "lamb", compile=False)
        train(model, opt, 5, 0)
        torch.save({{"model": model.state_dict(), "opt": opt.state_dict()}}, path)
    else:
        saved = torch.load(path)
        model = make_lamb_setup(torch.float64)
        model.load_state_dict(saved["model"])
        opt = lw.Optimizer(model.parameters(), "lamb", compile=False)
        opt.load_state_dict(saved["opt"])
        train(model, opt, 5, 5)
        torch.save(model.state_dict(), path)
""")


def test_state_dict_round_trip_into_a_fresh_process(tmp_path):
    import pathlib
    script = tmp_path / "resume.py"
    script.write_text(FRESH_PROCESS.format(tests=str(pathlib.Path(__file__).parent)))
    ckpt = tmp_path / "ckpt.pt"
    for phase in ("first", "second"):
        subprocess.run([sys.executable, str(script), str(ckpt), phase], check=True)
    resumed = torch.load(ckpt)
    ref = make_lamb_setup(torch.float64)
    opt = lw.Optimizer(ref.parameters(), "lamb", compile=False)
    train(ref, opt, 10, 0)
    for name, value in ref.state_dict().items():
        assert torch.equal(resumed[name], value), name


TWO_LEVELS = """optimizer two_levels
hyper lr = 0.01
state s : layer = 0
watch n2
step {
  n2 = norm(g / (norm(g) + 1)) + max_abs(w) * 0
  s = s + mean(g) + rms(w) + dot(w, g)
  w = w - lr * n2 * g - lr * 1e-3 * s * sign(w)
}
"""


def test_split_passes_for_large_parameters_agree_with_eager():
    """Parameters of many chunks (and a zero one) agree between the compiled
    path and the eager path (the same flat graphs, run in blocks)."""
    for spec in ("lamb", lw.parse(TWO_LEVELS)):
        gen = torch.Generator().manual_seed(3)
        base = [torch.randn(s, generator=gen) for s in [(5000,), (70, 80), (3, 4)]]
        base.append(torch.zeros(6000))
        runs = []
        for compile in (False, True):
            params = [torch.nn.Parameter(b.clone()) for b in base]
            opt = lw.Optimizer(params, spec, compile=compile)
            steps(opt, params, 3, seed=4)
            runs.append((params, opt))
        (eager, eopt), (comp, copt) = runs
        for a, b in zip(eager, comp):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            for k in eopt.state[a]:
                torch.testing.assert_close(copt.state[b][k], eopt.state[a][k], rtol=1e-5,
                                           atol=1e-6)
        assert copt.watched.keys() == eopt.watched.keys()
        for n in eopt.watched:
            for p in eopt.watched[n]:
                torch.testing.assert_close(torch.tensor(copt.watched[n][p]),
                                           torch.tensor(eopt.watched[n][p]), rtol=1e-5, atol=1e-6)
