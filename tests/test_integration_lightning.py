"""The Lightning integration (issue 13): per-layer trust ratios through the
trainer's loggers, LearningRateMonitor(log_momentum=True) on betas."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger

import layerwise as lw
from layerwise.integrations.lightning import WatchedCallback
from tensorboard_events import read_scalars

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import tiny_bert  # noqa: E402


class Memory(Logger):
    """A logger that keeps every ``log_metrics`` call: ``{key: [(step, value)]}``."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, list[tuple[int, float]]] = {}

    name = "memory"
    version = 0

    def log_metrics(self, metrics, step=None):
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, float(v)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class Regression(pl.LightningModule):
    """A two-layer MLP on fixed random data, with the optimizer given."""

    def __init__(self, make_optimizer) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.make_optimizer = make_optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return self.make_optimizer(self)


def _fit(module, callbacks, steps=6, every=2) -> Memory:
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=gen), torch.randn(64, 1, generator=gen))
    logger = Memory()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, log_every_n_steps=every,
                         logger=logger, callbacks=callbacks, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return logger


def test_example_writes_per_layer_trust_ratios_and_momentum_to_tensorboard(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "lightning_lamb.py"), "--out",
                           str(tmp_path), "--steps", "200"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    scalars = read_scalars(tmp_path)
    steps = list(range(9, 200, 10))          # Lightning's step of the 10th, 20th, ... batch
    for name, _ in tiny_bert.model().named_parameters():
        series = scalars[f"layerwise/trust/bert.{name}"]
        assert [s for s, _ in series] == steps, name
        assert all(math.isfinite(v) and v > 0 for _, v in series), name
    assert [s for s, _ in scalars["train_loss"]] == steps
    loss = [v for _, v in scalars["train_loss"]]
    assert loss[-1] < 0.75 * loss[0]
    # LearningRateMonitor(log_momentum=True) reads betas[0]: LAMB's beta1, not 0
    assert [v for _, v in scalars["lr-Optimizer-momentum"]] == pytest.approx([0.9] * len(steps))
    lr = [v for _, v in scalars["lr-Optimizer"]]
    assert max(lr) == pytest.approx(2e-2) and lr[-1] < lr[len(lr) // 2]


def test_logged_values_are_the_values_the_optimizer_recorded():
    made = []

    def lamb(module):
        made.append(lw.Optimizer(module.named_parameters(), "lamb", compile=False,
                                 watch=["trust"], record=("every", 1)))
        return made[0]

    logger = _fit(Regression(lamb), [WatchedCallback(every_n_steps=3)])
    recorded = made[0].watched["trust"]
    assert set(recorded) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    for name, values in recorded.items():
        assert len(values) == 6
        logged = logger.metrics[f"layerwise/trust/{name}"]
        assert [s for s, _ in logged] == [2, 5]           # after optimizer steps 3 and 6
        assert [v for _, v in logged] == [values[2], values[5]]


def test_learning_rate_monitor_logs_beta1_under_onecyclelr():
    def lamb(module):
        opt = lw.Optimizer(module.parameters(), "lamb", compile=False, lr=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=8,
                                                    base_momentum=0.85, max_momentum=0.95)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    monitor = LearningRateMonitor(logging_interval="step", log_momentum=True)
    logger = _fit(Regression(lamb), [monitor], steps=8, every=1)
    momentum = [v for _, v in logger.metrics["lr-Optimizer-momentum"]]
    assert len(momentum) == 8 and momentum[0] == pytest.approx(0.95)
    assert min(momentum) == pytest.approx(0.85, abs=0.02) and momentum[-1] > 0.9


def test_callback_refuses_what_it_cannot_log():
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer, not 0"):
        WatchedCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="no optimizer of the trainer is a layerwise optimizer"):
        _fit(Regression(lambda m: torch.optim.SGD(m.parameters(), lr=0.1)), [WatchedCallback()])
    with pytest.raises(ValueError, match="watches nothing"):
        _fit(Regression(lambda m: lw.Optimizer(m.parameters(), "lamb", compile=False)),
             [WatchedCallback()])
