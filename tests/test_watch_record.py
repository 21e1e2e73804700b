"""lw.Optimizer(record=...): the bounded recording policies of ``opt.watched``,
distinct keys for repeated parameter names, and lw.adapt passing ``record`` on."""
import pytest
import torch

import layerwise as lw

WATCHING = """optimizer watching
hyper lr = 0.1 in [0, inf)
watch n, c
step {
  n = norm(g)
  c = n * 2
  w = w - lr * g
}
"""

STEPS = 23


def params():
    torch.manual_seed(0)
    return [("a", torch.nn.Parameter(torch.randn(3, 2))), ("b", torch.nn.Parameter(torch.randn(4)))]


def run(record, steps=STEPS, skip_b_at=(), read_at=()):
    """An optimizer with ``record`` after ``steps`` steps, gradients of norm
    ``step number`` (``b`` without one at steps in ``skip_b_at``; ``watched``
    read after the steps in ``read_at``)."""
    ps = params()
    opt = lw.Optimizer(ps, lw.parse(WATCHING), compile=False, record=record)
    for t in range(1, steps + 1):
        for name, p in ps:
            if name == "b" and t in skip_b_at:
                p.grad = None
            else:
                p.grad = torch.full_like(p, float(t)) / p.numel() ** 0.5
        opt.step()
        if t in read_at:
            opt.watched
    return opt


def series(opt):
    return {w: {n: list(v) for n, v in per.items()} for w, per in opt.watched.items()}


@pytest.mark.parametrize("read_at", [(), (1, 5, 6, 17)])
@pytest.mark.parametrize("skip", [(), (3, 4, 20, 22)])
def test_each_policy_keeps_its_part_of_the_full_history(read_at, skip):
    full = series(run(("every", 1), skip_b_at=skip))
    a_steps = list(range(1, STEPS + 1))
    b_steps = [t for t in a_steps if t not in skip]
    assert full["n"]["a"] == pytest.approx(a_steps)
    assert full["n"]["b"] == pytest.approx(b_steps)
    assert full["c"]["b"] == pytest.approx([2 * t for t in b_steps])

    latest = series(run("latest", skip_b_at=skip, read_at=read_at))
    assert latest == {w: {n: v[-1:] for n, v in per.items()} for w, per in full.items()}
    assert series(run(None or "latest", skip_b_at=skip)) == latest   # the default is "latest"
    default = lw.Optimizer(params(), lw.parse(WATCHING), compile=False)
    assert default.record == "latest"

    for n in (1, 2, 5, 40):
        got = series(run(("history", n), skip_b_at=skip, read_at=read_at))
        assert got == {w: {k: v[-n:] for k, v in per.items()} for w, per in full.items()}, n

    for k in (1, 3, 7):
        got = series(run(("every", k), skip_b_at=skip, read_at=read_at))
        want_a = [float(t) for t in a_steps if t % k == 0]
        want_b = [float(t) for t in b_steps if t % k == 0]
        assert got["n"]["a"] == pytest.approx(want_a), k
        assert got["n"].get("b", []) == pytest.approx(want_b), k
        assert got["c"]["a"] == pytest.approx([2 * x for x in want_a]), k


def test_values_stay_on_the_device_until_read_and_pending_tensors_are_bounded():
    opt = run("latest", steps=5)
    assert len(opt._pending) == 1                     # only the last step's tensor
    assert isinstance(next(iter(opt._pending.values()))[1], torch.Tensor)
    opt = run(("history", 3), steps=9)
    assert len(opt._pending) == 3
    opt = run(("history", 3), steps=9, skip_b_at=(5, 6, 7, 8, 9))
    # b's last three values are from steps 2-4, a's from 7-9: those steps' tensors only
    assert len(opt._pending) == 6
    assert series(opt)["n"]["b"] == pytest.approx([2, 3, 4])
    assert not opt._pending
    opt = run(("every", 4), steps=9)
    assert len(opt._pending) == 2                     # steps 4 and 8


@pytest.mark.parametrize("record, bound", [("latest", 1), (("history", 5), 5),
                                           (("every", 1000), 100)])
def test_memory_after_100k_steps_is_bounded_by_the_policy(record, bound):
    """100,000 recorded steps of 2 watched names on 2 parameters, driven
    through the recording function the step calls (a real step per value
    would take minutes), reading ``watched`` now and then: the number of
    values and of device tensors held never exceeds what the policy keeps."""
    opt = lw.Optimizer(params(), lw.parse(WATCHING), compile=False, record=record)
    names = ["a", "b"]
    steps = 100_000
    most_pending = 0
    for t in range(1, steps + 1):
        opt._steps = t
        if record == "latest" or record[0] == "history" or t % record[1] == 0:
            opt._add_pending(names, torch.tensor([[float(t), t + 0.5], [2.0 * t, 2 * t + 1]]))
        most_pending = max(most_pending, len(opt._pending))
        if t % 33_333 == 0:
            opt.watched
    w = opt.watched
    stored = sum(len(v) for per in w.values() for v in per.values())
    assert stored == 2 * 2 * bound
    assert most_pending <= (bound if record[0] != "every" else steps // record[1])
    assert w["n"]["a"][-1] == steps
    assert w["c"]["b"][-1] == 2 * steps + 1


def test_100k_cheap_steps_under_latest_hold_one_value_each():
    """The real step, 2 parameters of one number: after many steps ``watched``
    holds one value per watched name and parameter, and one pending tensor."""
    ps = [("a", torch.nn.Parameter(torch.zeros(1))), ("b", torch.nn.Parameter(torch.zeros(1)))]
    opt = lw.Optimizer(ps, lw.parse(WATCHING), compile=False)
    for _, p in ps:
        p.grad = torch.ones(1)
    for _ in range(300):
        opt.step()
    assert len(opt._pending) == 1
    assert sum(len(v) for per in opt.watched.values() for v in per.values()) == 4


@pytest.mark.parametrize("bad", ["all", "every", ("every", 0), ("history", -1), ("every", 2.5),
                                 ("history", True), ("ring", 3), ("every", 2, 3), None, 5])
def test_a_bad_record_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match=r"record=.*" + __import__("re").escape(repr(bad))):
        lw.Optimizer(params(), lw.parse(WATCHING), compile=False, record=bad)


def test_repeated_parameter_names_get_distinct_keys():
    torch.manual_seed(0)
    m1, m2, m3 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    groups = [{"params": list(m1.named_parameters())},
              {"params": list(m2.named_parameters()), "lr": 0.01}]
    opt = lw.Optimizer(groups, lw.parse(WATCHING), compile=False)
    opt.add_param_group({"params": list(m3.named_parameters()), "lr": 0.5})
    for m in (m1, m2, m3):
        for p in m.parameters():
            p.grad = torch.ones_like(p)
    opt.step()
    keys = ["weight", "bias", "weight#1", "bias#1", "weight#2", "bias#2"]
    assert list(opt.watched["n"]) == keys
    norms = [p.numel() ** 0.5 for m in (m1, m2, m3) for p in m.parameters()]
    assert [opt.watched["n"][k][0] for k in keys] == pytest.approx(norms)
    assert opt.hypers_of("weight")["lr"] == 0.1
    assert opt.hypers_of("bias#1")["lr"] == 0.01
    assert opt.hypers_of("weight#2")["lr"] == 0.5
    with pytest.raises(ValueError, match="weight#3"):
        opt.hypers_of("weight#3")


def test_a_name_already_taken_by_a_suffix_moves_on():
    ws = [torch.nn.Parameter(torch.ones(2)) for _ in range(3)]
    opt = lw.Optimizer([{"params": [("w", ws[0]), ("w#1", ws[1])]}, {"params": [("w", ws[2])]}],
                       lw.parse(WATCHING), compile=False)
    for p in ws:
        p.grad = torch.ones(2)
    opt.step()
    assert list(opt.watched["n"]) == ["w", "w#1", "w#2"]


def test_unnamed_parameters_are_param_i():
    opt = lw.Optimizer([{"params": [torch.nn.Parameter(torch.ones(2))]},
                        {"params": [torch.nn.Parameter(torch.ones(3))]}],
                       lw.parse(WATCHING), compile=False)
    for g in opt.param_groups:
        g["params"][0].grad = torch.ones_like(g["params"][0])
    opt.step()
    assert list(opt.watched["n"]) == ["param0", "param1"]


def test_load_state_dict_starts_watched_afresh_and_counts_steps_from_the_saved_ones():
    opt = run(("every", 4), steps=6)
    sd = opt.state_dict()
    ps = params()
    again = lw.Optimizer(ps, lw.parse(WATCHING), compile=False, record=("every", 4))
    again.load_state_dict(sd)
    assert again.watched == {"n": {}, "c": {}}
    for t in (7, 8):
        for _, p in ps:
            p.grad = torch.full_like(p, float(t)) / p.numel() ** 0.5
        again.step()
    assert again.watched["n"]["a"] == pytest.approx([8.0])     # step 8 of the run


@pytest.mark.parametrize("record", ["latest", ("every", 2), ("history", 2)])
def test_adapt_passes_record_on(record):
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    wrapped = lw.adapt(torch.optim.SGD(m.parameters(), lr=0.1), "trust", compile=False,
                       record=record)
    base = lw.Optimizer(m.named_parameters(), "adamw", compile=False)
    composed = lw.adapt(base, "trust", compile=False, record=record)
    assert composed.record == record and wrapped.record == record
    assert wrapped.inner.record == record
    for opt in (wrapped, composed):
        for _ in range(5):
            for p in m.parameters():
                p.grad = torch.ones_like(p)
            opt.step()
        lengths = {len(v) for per in opt.watched.values() for v in per.values()}
        assert lengths == {1 if record == "latest" else 2}, (opt, record)
    # the lw path keeps the base's policy when none is given
    kept = lw.adapt(lw.Optimizer(m.named_parameters(), "adamw", compile=False,
                                 record=("history", 3)), "trust", compile=False)
    assert kept.record == ("history", 3)
    with pytest.raises(ValueError, match="record="):
        lw.adapt(torch.optim.SGD(m.parameters(), lr=0.1), "trust", record="everything")
