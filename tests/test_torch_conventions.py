"""torch conventions of lw.Optimizer (issue 13): ``betas`` beside ``beta1`` /
``beta2`` (so OneCycleLR / CyclicLR with ``cycle_momentum=True`` work) and
``hypers_of``."""
import copy

import pytest
import torch

import layerwise as lw


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def fill_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def groups_without_params(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


# ------------------------------------------------------------------ betas
@pytest.mark.parametrize("preset", ["lamb", "lambc", "nvlamb", "adam", "adamw", "lion"])
def test_betas_keyword_sets_beta1_beta2_and_is_reported(preset):
    m = model()
    opt = lw.Optimizer(m.parameters(), preset, compile=False, betas=(0.8, 0.99))
    assert opt.defaults["betas"] == (0.8, 0.99)
    assert (opt.defaults["beta1"], opt.defaults["beta2"]) == (0.8, 0.99)
    for g in opt.param_groups:
        assert g["betas"] == (0.8, 0.99) and (g["beta1"], g["beta2"]) == (0.8, 0.99)


def test_default_betas_reported_without_giving_them():
    opt = lw.Optimizer(model().parameters(), "lamb", compile=False, beta1=0.85)
    assert opt.defaults["betas"] == (0.85, 0.999)
    assert opt.param_groups[0]["betas"] == (0.85, 0.999)


def test_betas_in_param_groups():
    m = model()
    opt = lw.Optimizer([{"params": m[0].parameters(), "betas": (0.7, 0.95)},
                        {"params": m[2].parameters(), "beta2": 0.9}],
                       "lamb", compile=False)
    g0, g1 = opt.param_groups
    assert (g0["beta1"], g0["beta2"], g0["betas"]) == (0.7, 0.95, (0.7, 0.95))
    assert (g1["beta1"], g1["beta2"], g1["betas"]) == (0.9, 0.9, (0.9, 0.9))
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "betas": [0.5, 0.6]})
    assert opt.param_groups[2]["betas"] == (0.5, 0.6)
    assert opt.param_groups[2]["beta1"] == 0.5


@pytest.mark.parametrize("bad", [(1.5, 0.999), (0.9,), "ab", 0.9, (0.9, -0.1)])
def test_betas_out_of_range_or_malformed_is_refused_naming_betas(bad):
    with pytest.raises(ValueError, match="betas"):
        lw.Optimizer(model().parameters(), "lamb", compile=False, betas=bad)
    with pytest.raises(ValueError, match=r"betas.*param group 0"):
        lw.Optimizer([{"params": model().parameters(), "betas": bad}], "lamb", compile=False)


def test_betas_disagreeing_with_beta1_in_the_same_place_is_refused():
    with pytest.raises(ValueError, match="betas.*beta1"):
        lw.Optimizer(model().parameters(), "lamb", compile=False, betas=(0.8, 0.99), beta1=0.9)
    opt = lw.Optimizer(model().parameters(), "lamb", compile=False, betas=(0.8, 0.99), beta1=0.8)
    assert opt.defaults["betas"] == (0.8, 0.99)


@pytest.mark.parametrize("preset", ["sgd", "lars", "lars_lamb_paper"])
def test_betas_refused_without_beta1_and_beta2(preset):
    opt = lw.Optimizer(model().parameters(), preset, compile=False)
    assert "betas" not in opt.defaults
    assert all("betas" not in g for g in opt.param_groups)
    with pytest.raises(ValueError, match="unknown hyperparameter 'betas'"):
        lw.Optimizer(model().parameters(), preset, compile=False, betas=(0.9, 0.999))
    with pytest.raises(ValueError, match="unknown hyperparameter 'betas'"):
        lw.Optimizer([{"params": model().parameters(), "betas": (0.9, 0.999)}], preset,
                     compile=False)
    fill_grads(list(model().parameters()), 1)
    opt.step()
    assert "betas" not in opt.param_groups[0]


def test_changing_either_form_takes_effect_and_both_agree_after_the_step():
    m = model()
    params = list(m.parameters())
    opt = lw.Optimizer(params, "lamb", compile=False)
    g = opt.param_groups[0]
    fill_grads(params, 1)
    g["betas"] = (0.5, g["betas"][1])
    opt.step()
    assert (g["beta1"], g["beta2"], g["betas"]) == (0.5, 0.999, (0.5, 0.999))
    g["beta2"] = 0.9
    opt.step()
    assert (g["beta1"], g["beta2"], g["betas"]) == (0.5, 0.9, (0.5, 0.9))
    # both changed, per component without conflict: betas' beta1, the scalar beta2
    g["betas"] = (0.6, 0.9)
    g["beta2"] = 0.95
    opt.step()
    assert g["betas"] == (0.6, 0.95) and (g["beta1"], g["beta2"]) == (0.6, 0.95)
    # both changed to the same value
    g["betas"] = (0.7, 0.95)
    g["beta1"] = 0.7
    opt.step()
    assert g["betas"] == (0.7, 0.95) and g["beta1"] == 0.7


def test_betas_change_is_used_by_the_step():
    """Setting betas gives exactly the parameters that setting beta1 gives."""
    runs = []
    for form in ("betas", "beta1"):
        m = model()
        params = list(m.parameters())
        opt = lw.Optimizer(params, "adam", compile=False)
        for k in range(4):
            fill_grads(params, k)
            if form == "betas":
                opt.param_groups[0]["betas"] = (0.5 + 0.1 * k, 0.999)
            else:
                opt.param_groups[0]["beta1"] = 0.5 + 0.1 * k
            opt.step()
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_inconsistent_change_raises_naming_the_group_and_changes_nothing():
    m = model()
    opt = lw.Optimizer([{"params": m[0].parameters()}, {"params": m[2].parameters()}],
                       "lamb", compile=False)
    params = list(m.parameters())
    fill_grads(params, 1)
    opt.step()
    fill_grads(params, 2)
    before = [p.detach().clone() for p in params]
    state = [(p, {k: v.clone() for k, v in opt.state[p].items()}) for p in params]
    opt.param_groups[0]["betas"] = (0.8, 0.999)  # consistent change in group 0
    opt.param_groups[1]["betas"] = (0.5, 0.999)
    opt.param_groups[1]["beta1"] = 0.6
    groups = copy.deepcopy(groups_without_params(opt))
    with pytest.raises(ValueError, match=r"param group 1.*betas.*beta1"):
        opt.step()
    assert groups_without_params(opt) == groups
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    for p, entry in state:
        for k, v in entry.items():
            assert torch.equal(opt.state[p][k], v)
    opt.param_groups[1]["beta1"] = 0.5
    opt.step()
    assert opt.param_groups[0]["beta1"] == 0.8 and opt.param_groups[1]["betas"] == (0.5, 0.999)


def test_onecyclelr_cycle_momentum_on_lamb_equals_setting_beta1_by_hand():
    steps = 20
    m = model()
    params = list(m.parameters())
    opt = lw.Optimizer(params, "lamb", compile=False, lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    assert sched.use_beta1
    schedule = []
    for k in range(steps):
        g = opt.param_groups[0]
        schedule.append((g["lr"], g["betas"][0]))
        fill_grads(params, k)
        opt.step()
        assert g["beta1"] == schedule[-1][1] and g["betas"][0] == schedule[-1][1]
        sched.step()
    assert len({b for _, b in schedule}) > 5          # beta1 really cycled
    assert min(b for _, b in schedule) == pytest.approx(0.85)
    scheduled = [p.detach().clone() for p in params]

    m = model()
    params = list(m.parameters())
    opt = lw.Optimizer(params, "lamb", compile=False, lr=1e-2)
    for k, (lr, beta1) in enumerate(schedule):
        opt.param_groups[0]["lr"] = lr
        opt.param_groups[0]["beta1"] = beta1
        fill_grads(params, k)
        opt.step()
    for a, b in zip(scheduled, params):
        assert torch.equal(a, b)


def test_cycliclr_cycle_momentum_on_adam():
    m = model()
    params = list(m.parameters())
    opt = lw.Optimizer(params, "adam", compile=False)
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=3,
                                              cycle_momentum=True)
    seen = set()
    for k in range(8):
        fill_grads(params, k)
        opt.step()
        g = opt.param_groups[0]
        assert g["betas"] == (g["beta1"], g["beta2"])
        seen.add(g["beta1"])
        sched.step()
    assert len(seen) > 2 and max(seen) <= 0.9 and min(seen) >= 0.8


def test_state_dict_round_trip_keeps_betas():
    m = model()
    params = list(m.parameters())
    opt = lw.Optimizer(params, "lamb", compile=False, betas=(0.8, 0.99))
    fill_grads(params, 1)
    opt.step()
    opt.param_groups[0]["betas"] = (0.7, 0.99)     # a scheduler's change, not stepped yet
    sd = opt.state_dict()
    assert sd["param_groups"][0]["betas"] == (0.7, 0.99)
    assert sd["param_groups"][0]["beta1"] == 0.7

    m2 = model()
    opt2 = lw.Optimizer(m2.parameters(), "lamb", compile=False)
    opt2.load_state_dict(sd)
    g = opt2.param_groups[0]
    assert g["betas"] == (0.7, 0.99) and (g["beta1"], g["beta2"]) == (0.7, 0.99)
    for opt_, ps in ((opt, params), (opt2, list(m2.parameters()))):
        with torch.no_grad():
            for p, q in zip(ps, params):
                p.copy_(q)
    fill_grads(params, 2)
    fill_grads(list(m2.parameters()), 2)
    opt.step()
    opt2.step()
    for a, b in zip(params, m2.parameters()):
        assert torch.equal(a, b)


def test_state_dict_saved_without_betas_still_loads():
    m = model()
    params = list(m.parameters())
    opt = lw.Optimizer(params, "lamb", compile=False, beta1=0.8)
    fill_grads(params, 1)
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["betas"]
    opt2 = lw.Optimizer(model().parameters(), "lamb", compile=False)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.999)
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["betas"] = (0.5, 0.999)
    with pytest.raises(ValueError, match="betas.*beta1"):
        opt2.load_state_dict(bad)


def test_state_dict_of_a_program_without_betas_loads_with_extra_keys():
    opt = lw.Optimizer(model().parameters(), "sgd", compile=False)
    sd = opt.state_dict()
    sd["param_groups"][0]["betas"] = (0.9, 0.999)     # e.g. a key another tool added
    opt.load_state_dict(sd)


# ------------------------------------------------------------------ hypers_of
RULES = """optimizer with_rules extends lamb
for ndim <= 1 {
  weight_decay = 0
  lr = 0.1 * lr
}
"""


@pytest.mark.parametrize("spec", [lw.parse(RULES), "tests/programs/lamb_relative_rules.lw"])
def test_hypers_of_applies_group_and_rules_and_follows_a_scheduler(spec):
    m = model()
    opt = lw.Optimizer(m.named_parameters(), spec, compile=False, lr=0.01, weight_decay=0.1)
    weight = opt.hypers_of("0.weight")
    bias = opt.hypers_of(m[0].bias)
    assert set(weight) == set(opt.program.hyper_names)
    assert bias == opt.hypers_of("0.bias")
    assert bias["lr"] == pytest.approx(0.001) and bias["weight_decay"] == 0.0
    assert weight["weight_decay"] == 0.1
    assert weight["beta1"] == 0.9 and weight["beta2"] == 0.999
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    fill_grads(list(m.parameters()), 1)
    opt.step()
    sched.step()
    assert opt.hypers_of("0.bias")["lr"] == pytest.approx(0.0005)
    assert opt.hypers_of(m[0].weight)["lr"] == pytest.approx(weight["lr"] / 2)
    opt.param_groups[0]["betas"] = (0.5, 0.999)   # seen before the step
    assert opt.hypers_of("2.bias")["beta1"] == 0.5


def test_hypers_of_with_groups_explicit_values_and_row_block():
    m = model()
    spec = lw.parse(RULES)
    opt = lw.Optimizer([{"params": m[0].parameters(), "weight_decay": 0.3},
                        {"params": m[2].parameters(), "lr": 0.2}], spec, compile=False)
    assert opt.hypers_of(m[0].bias)["weight_decay"] == 0.3   # explicit beats the override
    assert opt.hypers_of(m[2].bias)["lr"] == pytest.approx(0.02)
    assert "row_block" not in opt.hypers_of(m[2].bias)
    rb = lw.parse("optimizer rb extends lamb\nfor ndim >= 2 {\n  row_block = 2\n}\n")
    opt = lw.Optimizer(model().named_parameters(), rb, compile=False)
    assert opt.hypers_of("0.weight")["row_block"] == 2
    assert opt.hypers_of("0.bias")["row_block"] == 1
    unnamed = lw.Optimizer(model().parameters(), "lamb", compile=False)
    assert unnamed.hypers_of("param1")["lr"] == unnamed.defaults["lr"]


def test_hypers_of_unknown_or_ambiguous_is_an_error():
    m = model()
    opt = lw.Optimizer(m.named_parameters(), "lamb", compile=False)
    with pytest.raises(ValueError, match="'nope' is not one of this optimizer's parameters"):
        opt.hypers_of("nope")
    with pytest.raises(ValueError, match=r"shape \(3,\) is not one"):
        opt.hypers_of(torch.nn.Parameter(torch.zeros(3)))
    a, b = model(), model()
    opt = lw.Optimizer([{"params": list(a.named_parameters())},
                        {"params": list(b.named_parameters())}], "lamb", compile=False)
    opt.param_groups[1]["lr"] = 0.5     # repeated names: the later ones are "name#1"
    assert opt.hypers_of("0.weight")["lr"] == opt.hypers_of(a[0].weight)["lr"] == opt.defaults["lr"]
    assert opt.hypers_of("0.weight#1")["lr"] == 0.5
    assert opt.hypers_of(b[0].weight)["lr"] == 0.5
    with pytest.raises(ValueError, match="'0.weight#2' is not one"):
        opt.hypers_of("0.weight#2")


def test_onecyclelr_cycle_momentum_does_not_recompile():
    """betas reach the compiled step as tensor values, as lr does (compiles
    lamb: cold, 10-30 s; shared with test_compiled_step in one session)."""
    from torch._dynamo.utils import counters
    m = model()
    params = list(m.parameters())
    opt = lw.Optimizer(params, "lamb", compile=True)
    fill_grads(params, 0)
    opt.step()
    opt.step()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=20)
    before = counters["stats"]["unique_graphs"]
    seen = set()
    for k in range(6):
        fill_grads(params, k)
        opt.step()
        seen.add(opt.param_groups[0]["beta1"])
        sched.step()
    assert len(seen) == 6
    assert counters["stats"]["unique_graphs"] == before, "a betas change recompiled"


def _named_forms(m):
    named = list(m.named_parameters())
    return {
        "named_parameters()": lambda: m.named_parameters(),
        "list of pairs": lambda: list(named),
        "groups of pairs": lambda: [{"params": named[:1]}, {"params": named[1:], "lr": 0.2}],
        "group of a generator": lambda: [{"params": m.named_parameters()}],
        "group of a tuple": lambda: [{"params": tuple(named)}],
    }


@pytest.mark.parametrize("form", list(_named_forms(torch.nn.Linear(1, 1))))
def test_named_parameters_in_every_form_torch_accepts(form):
    """Each form torch.optim accepts gives the same param_names, and a name
    rule sees them."""
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    make = _named_forms(m)[form]
    ours = lw.Optimizer(make(), lw.parse(NAME_RULE), compile=False)
    theirs = torch.optim.SGD(make(), lr=0.1)
    assert [g["param_names"] for g in ours.param_groups] == \
        [g["param_names"] for g in theirs.param_groups]
    assert ours.hypers_of("0.bias")["lr"] == 0.0 and ours.hypers_of("0.weight")["lr"] > 0


NAME_RULE = """optimizer sgd_named
hyper lr = 0.1 in [0, inf)
for name ~ "bias" {
  lr = 0 * lr
}
step {
  w = w - lr * g
}
"""
