"""The Hugging Face Trainer integration (issue 13): per-layer trust ratios
in TensorBoard, names for the Trainer's bare-tensor param groups."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

import layerwise as lw
from layerwise.integrations.hf import WatchedCallback, log_watched
from tensorboard_events import read_scalars

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import tiny_bert  # noqa: E402


def _trainer(out: Path, optimizer=None, steps: int = 6, logging_steps: int = 2, **kw) -> Trainer:
    gen = torch.Generator().manual_seed(0)
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8,
                             logging_steps=logging_steps, report_to=["tensorboard"],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                             **kw.pop("args", {}))
    return Trainer(model=kw.pop("model"), args=args, train_dataset=list(tiny_bert.windows()[:64]),
                   data_collator=lambda rows: tiny_bert.mask(torch.stack(rows), gen),
                   optimizers=(optimizer, None), **kw)


def test_example_writes_per_layer_trust_ratios_to_tensorboard(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "hf_trainer_lamb.py"), "--out",
                           str(tmp_path), "--steps", "200"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "layerwise/trust" not in done.stdout.split("loss ")[0]      # kept off the console
    scalars = read_scalars(tmp_path / "runs")
    names = [n for n, _ in tiny_bert.model().named_parameters()]
    for name in names:
        series = scalars[f"train/layerwise/trust/{name}"]
        assert [s for s, _ in series] == list(range(10, 201, 10)), name
        assert all(math.isfinite(v) and v > 0 for _, v in series), name
    # the ratios move as training goes on, and the model learns
    query = [v for _, v in scalars["train/layerwise/trust/bert.encoder.layer.0.attention.self.query.weight"]]
    assert len(set(query)) > 10
    loss = [v for _, v in scalars["train/loss"]]
    assert loss[-1] < 0.75 * loss[0]


def test_logged_values_are_the_values_the_optimizer_recorded(tmp_path, capsys):
    model = tiny_bert.model()
    opt = lw.Optimizer(model.named_parameters(), "lamb", compile=False, watch=["trust"],
                       record=("every", 1), lr=1e-2)
    trainer = _trainer(tmp_path, opt, model=model)
    callback = log_watched(trainer)
    assert trainer.callback_handler.callbacks[0] is callback      # before the reporters
    trainer.train()
    printed = capsys.readouterr().out
    assert "'loss'" in printed and "layerwise/" not in printed
    recorded = opt.watched["trust"]
    scalars = read_scalars(tmp_path / "runs")
    for name, values in recorded.items():
        assert len(values) == 6
        logged = scalars[f"train/layerwise/trust/{name}"]
        assert [s for s, _ in logged] == [2, 4, 6]
        for step, value in logged:      # TensorBoard keeps float32
            assert value == pytest.approx(values[step - 1], rel=1e-6, abs=1e-30), (name, step)


def test_callback_refuses_an_optimizer_it_cannot_log(tmp_path):
    model = tiny_bert.model()
    plain = torch.optim.AdamW(model.parameters())
    trainer = _trainer(tmp_path / "a", plain, model=model)
    log_watched(trainer)
    with pytest.raises(ValueError, match="AdamW is not a layerwise optimizer"):
        trainer.train()
    silent = lw.Optimizer(model.named_parameters(), "lamb", compile=False)
    trainer = _trainer(tmp_path / "b", silent, model=model, callbacks=[WatchedCallback()])
    with pytest.raises(ValueError, match=r"watches nothing.*watch=\['trust'\]"):
        trainer.train()


RULED = """optimizer lamb_ruled extends "lamb"
for name ~ "embeddings" {
  lr = lr * 0.1
}
"""


def test_name_rule_through_optimizer_cls_and_kwargs(tmp_path):
    """The Trainer builds two groups of bare tensors (weight decay 0 for
    biases and LayerNorm); names_from names them for the rule."""
    model = tiny_bert.model()
    kwargs = {"spec": lw.parse(RULED), "names_from": model, "compile": False, "lr": 1e-2}
    trainer = _trainer(tmp_path, model=model, args={"weight_decay": 0.01},
                       optimizer_cls_and_kwargs=(lw.Optimizer, kwargs))
    opt = trainer.create_optimizer()
    assert isinstance(opt, lw.Optimizer)
    words = opt.hypers_of("bert.embeddings.word_embeddings.weight")
    assert words["lr"] == pytest.approx(1e-3) and words["weight_decay"] == 0.01
    assert opt.hypers_of("bert.embeddings.LayerNorm.weight")["weight_decay"] == 0.0
    query = opt.hypers_of("bert.encoder.layer.0.attention.self.query.weight")
    assert query["lr"] == pytest.approx(1e-2) and query["weight_decay"] == 0.01
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    # without names_from the rule cannot see names, and says what to pass
    del kwargs["names_from"]
    trainer = _trainer(tmp_path, model=tiny_bert.model(), optimizer_cls_and_kwargs=(lw.Optimizer, kwargs))
    with pytest.raises(ValueError, match="names_from=model"):
        trainer.create_optimizer()


def test_names_from_refuses_a_tensor_the_module_does_not_own():
    model = torch.nn.Linear(2, 2)
    stranger = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"param group 0: a tensor of shape \(3,\) is not a "
                                         "parameter of the names_from module"):
        lw.Optimizer([model.weight, stranger], "lamb", compile=False, names_from=model)
    with pytest.raises(ValueError, match="names_from must be a torch.nn.Module, not dict"):
        lw.Optimizer(model.parameters(), "lamb", compile=False, names_from={})
    opt = lw.Optimizer([model.weight], "lamb", compile=False, names_from=model)
    opt.add_param_group({"params": [model.bias], "lr": 0.5})
    assert [g["param_names"] for g in opt.param_groups] == [["weight"], ["bias"]]
