"""Train a tiny random-init BERT with LAMB under Lightning and log per-layer
trust ratios, the learning rate and LAMB's beta1 to TensorBoard.

    python examples/lightning_lamb.py --out runs/pl      # ~300 steps, about a minute on 2 CPU cores
    tensorboard --logdir runs/pl                          # layerwise/trust/<parameter>, lr-Lamb_bert, ...

``configure_optimizers`` returns an ``lw.Optimizer`` built from
``self.named_parameters()`` (so the program's name rule sees the names) with
``watch=["trust"]`` (LAMB's trust ratio) and a linear warm-up/decay
``LambdaLR`` stepped every optimizer step.
:class:`layerwise.integrations.lightning.WatchedCallback` sends the trust
ratios to every logger of the trainer; Lightning's own
``LearningRateMonitor(log_momentum=True)`` logs the learning rate and beta1
(the optimizer reports ``betas``). Data and model: ``tiny_bert.py`` beside
this file. Needs ``pip install 'layerwise[lightning]'``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger

import layerwise as lw
from layerwise.integrations.lightning import WatchedCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_bert  # noqa: E402  (beside this file)


class MaskedLM(pl.LightningModule):
    """The tiny BERT as a LightningModule, trained with LAMB."""

    def __init__(self, steps: int, lr: float, compile: bool) -> None:
        super().__init__()
        self.bert = tiny_bert.model(seed=0)
        self.steps, self.lr, self.compile_step = steps, lr, compile

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.bert(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = lw.Optimizer(self.named_parameters(), lw.parse(tiny_bert.PROGRAM),
                           compile=self.compile_step, watch=["trust"], lr=self.lr,
                           weight_decay=0.01)
        warmup = max(1, self.steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warmup, max(0.0, (self.steps - s) / (self.steps - warmup))))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(argv: list[str] | None = None) -> None:
    args = tiny_bert.arguments(__doc__.splitlines()[0], argv)

    pl.seed_everything(0, verbose=False)
    gen = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(
        tiny_bert.windows(), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0),
        collate_fn=lambda rows: tiny_bert.mask(torch.stack(rows), gen))
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, log_every_n_steps=10,
        logger=TensorBoardLogger(str(args.out), name="lamb"),
        callbacks=[WatchedCallback(), LearningRateMonitor(logging_interval="step", log_momentum=True)],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = MaskedLM(args.steps, args.lr, args.compile)
    trainer.fit(module, loader)
    print(f"final train loss {trainer.callback_metrics['train_loss']:.3f}; "
          f"TensorBoard event files under {trainer.logger.log_dir}")


if __name__ == "__main__":
    main()
