"""docs/migrating.md: each row that names an installable library runs both
optimizers on the same problem and compares them (float64, 10 steps).

torch_optimizer.Lamb and torch.optim are installed with the ``test`` extra,
timm by scripts/setup.sh (loaded without ``import timm``: tests/timm_optim.py).
Parameters include a 0-d tensor and a zero tensor (the ratio-1 rule). Rows
whose call passes ``[decay, no_decay]`` split the parameters into two param
groups, the second with weight decay 0 (biases, 0-d and zero tensors), the
same for both optimizers.
"""
from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
import pytorch_optimizer
import torch
import torch_optimizer
import transformers

import layerwise as lw
from timm_optim import timm_optim

jax.config.update("jax_enable_x64", True)      # optax rows compare in float64

ROOT = Path(__file__).parents[1]
STEPS = 10
SHAPES = [(5, 4), (4,), (3, 2, 2, 2), (), (6,)]


def _problem(seed: int, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    params[-1].zero_()
    # gradients of global norm about 7: clipping at max_grad_norm = 1 is active
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
             for _ in range(STEPS)]
    return params, grads


def _run(make, params, grads):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = make(ps)
    for g in grads:
        for p, x in zip(ps, g):
            p.grad = x.clone()
        opt.step()
    return [p.detach() for p in ps]


def _split(ps):
    """The parameters as [decay, no_decay] param groups (see the module docstring)."""
    return [{"params": [ps[0], ps[2]]}, {"params": [ps[1], ps[3], ps[4]], "weight_decay": 0.0}]


def _program(name: str) -> lw.Spec:
    return lw.load(ROOT / "examples" / "migrating" / f"{name}.lw")


def _torch_optimizer_lamb(**kw):
    return lambda ps: torch_optimizer.Lamb(ps, **kw)


def _pytorch_optimizer_lamb(**kw):
    return lambda ps: pytorch_optimizer.Lamb(ps, **kw)


def _timm(cls: str, split: bool = False, **kw):
    module = timm_optim(cls.lower())
    return lambda ps: getattr(module, cls)(_split(ps) if split else ps, **kw)


class _Optax:
    """An optax transformation driven like a torch optimizer: ``step()``
    reads the parameters' ``.grad`` and writes the updated values back."""

    def __init__(self, params, transformation):
        self.params, self.tx = params, transformation
        self.state = self.tx.init([jax.numpy.asarray(p.detach().numpy()) for p in params])

    def step(self):
        ps = [jax.numpy.asarray(p.detach().numpy()) for p in self.params]
        gs = [jax.numpy.asarray(p.grad.numpy()) for p in self.params]
        updates, self.state = self.tx.update(gs, self.state, ps)
        with torch.no_grad():
            for p, new in zip(self.params, optax.apply_updates(ps, updates)):
                p.copy_(torch.from_numpy(np.array(new)))


def _optax(name: str, **kw):
    return lambda ps: _Optax(ps, getattr(optax, name)(**kw))


#: rows run on other shapes than SHAPES: transformers.Adafactor factors a
#: tensor of more than 2 dims over its last two dims, the preset over dim 0
#: against the rest (LANGUAGE.md section 10), so no conv weight there.
ROW_SHAPES = {"transformers.Adafactor()": [(5, 4), (4,), (7, 1), (), (6,)]}

# (row id, theirs, program or preset, our hypers); "[decay, no_decay]" in the id: _split
ROWS = [
    ("torch_optimizer.Lamb()", _torch_optimizer_lamb(), "torch_optimizer_lamb", {}),
    ("torch_optimizer.Lamb(weight_decay=0.01, clamp_value=0.5)",
     _torch_optimizer_lamb(weight_decay=0.01, clamp_value=0.5), "torch_optimizer_lamb",
     {"weight_decay": 0.01, "clamp_value": 0.5}),
    ("torch_optimizer.Lamb(debias=True, weight_decay=0.01)",
     _torch_optimizer_lamb(debias=True, weight_decay=0.01), "torch_optimizer_lamb_debias",
     {"weight_decay": 0.01}),
    ("pytorch_optimizer.Lamb()", _pytorch_optimizer_lamb(), "pytorch_optimizer_lamb", {}),
    ("pytorch_optimizer.Lamb(weight_decay=0.01, lr=0.01)",
     _pytorch_optimizer_lamb(weight_decay=0.01, lr=0.01), "pytorch_optimizer_lamb",
     {"weight_decay": 0.01, "lr": 0.01}),
    ("torch.optim.AdamW()", lambda ps: torch.optim.AdamW(ps, foreach=False), "adamw", {}),
    ("torch.optim.SGD(momentum=0.9, nesterov=True)",
     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, foreach=False), "sgd",
     {"lr": 0.1, "momentum": 0.9, "nesterov": 1}),
    ("transformers.Adafactor()", lambda ps: transformers.Adafactor(ps), "adafactor", {}),
    ("timm.optim.Lamb()", _timm("Lamb"), "nvlamb", {}),
    ("timm.optim.Lamb([decay, no_decay])", _timm("Lamb", split=True), "nvlamb", {}),
    ("timm.optim.Lamb(trust_clip=True, always_adapt=True)",
     _timm("Lamb", trust_clip=True, always_adapt=True), "timm_lamb",
     {"trust_clip": 1, "use_nvlamb": 1}),
    ("timm.optim.Lamb(max_grad_norm=None, bias_correction=False, grad_averaging=False)",
     _timm("Lamb", max_grad_norm=None, bias_correction=False, grad_averaging=False), "nvlamb",
     {"max_grad_norm": float("inf"), "bias_correction": 0, "grad_averaging": 0}),
    ("timm.optim.Lars()", _timm("Lars"), "timm_lars", {}),
    ("timm.optim.Lars([decay, no_decay], momentum=0.9, weight_decay=1e-4)",
     _timm("Lars", split=True, momentum=0.9, weight_decay=1e-4), "timm_lars",
     {"momentum": 0.9, "weight_decay": 1e-4}),
    ("timm.optim.Lars(momentum=0.9, nesterov=True, trust_clip=True, always_adapt=True, lr=0.1)",
     _timm("Lars", momentum=0.9, nesterov=True, trust_clip=True, always_adapt=True, lr=0.1),
     "timm_lars", {"momentum": 0.9, "nesterov": 1, "trust_clip": 1, "always_adapt": 1, "lr": 0.1}),
    ("optax.lamb(learning_rate=1e-3)", _optax("lamb", learning_rate=1e-3), "lamb",
     {"weight_decay": 0}),
    ("optax.lamb(learning_rate=1e-2, weight_decay=0.01)",
     _optax("lamb", learning_rate=1e-2, weight_decay=0.01), "lamb", {"lr": 1e-2}),
    ("optax.lars(learning_rate=0.1)", _optax("lars", learning_rate=0.1), "optax_lars",
     {"lr": 0.1}),
    ("optax.lars(learning_rate=0.1, weight_decay=1e-4, nesterov=True)",
     _optax("lars", learning_rate=0.1, weight_decay=1e-4, nesterov=True), "optax_lars",
     {"lr": 0.1, "weight_decay": 1e-4, "nesterov": 1}),
    ("timm.optim.Lars(momentum=0.9, weight_decay=1e-4, eps=0)",
     _timm("Lars", momentum=0.9, weight_decay=1e-4, eps=0), "lars", {"weight_decay": 1e-4}),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_migration_row_reproduces_the_library(row):
    _, theirs, ours, hypers = row
    spec = _program(ours) if (ROOT / "examples" / "migrating" / f"{ours}.lw").exists() \
        else lw.load(ours)
    params, grads = _problem(seed=len(ours), shapes=ROW_SHAPES.get(row[0], SHAPES))
    want = _run(theirs, params, grads)
    split = "[decay, no_decay]" in row[0]
    got = _run(lambda ps: lw.Optimizer(_split(ps) if split else ps, spec, compile=False, **hypers),
               params, grads)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


HF_TRAINER_ROW = "transformers.Trainer(args=TrainingArguments(weight_decay=0.01))"


def test_hf_trainer_default_optimizer_is_adamw_with_a_name_rule(tmp_path):
    """The Trainer's own AdamW over its [decay, no_decay] groups, against
    examples/migrating/hf_trainer_adamw.lw on the model's named parameters
    (a tiny random BERT, float64, 10 steps of fixed gradients)."""
    config = transformers.BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16,
                                     max_position_embeddings=8)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).double()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), weight_decay=0.01,
                                          learning_rate=1e-2, use_cpu=True, report_to=[])
    theirs = transformers.Trainer(model=model, args=args).create_optimizer()
    assert isinstance(theirs, torch.optim.AdamW)
    names = [n for n, _ in model.named_parameters()]
    start = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in start]
             for _ in range(STEPS)]

    def run(opt):
        with torch.no_grad():
            for p, s in zip(model.parameters(), start):
                p.copy_(s)
        for g in grads:
            for p, x in zip(model.parameters(), g):
                p.grad = x.clone()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    want = run(theirs)
    ours = lw.Optimizer(model.named_parameters(), _program("hf_trainer_adamw"), compile=False,
                        lr=1e-2, weight_decay=0.01)
    decayed = {n for g in theirs.param_groups if g["weight_decay"] for n in
               [names[i] for i, p in enumerate(model.parameters()) if any(p is q for q in g["params"])]}
    assert decayed and decayed == {n for n in names if ours.hypers_of(n)["weight_decay"] > 0}
    got = run(ours)
    for n, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=n)


def test_every_row_of_the_guide_is_tested():
    """Each library call in the guide's tables is a row here, and back."""
    text = (ROOT / "docs" / "migrating.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([^`]+)` \|", text, re.M))
    assert documented == {r[0] for r in ROWS} | {HF_TRAINER_ROW}
