"""Log a layerwise optimizer's watched values (per-layer trust ratios) from
a Lightning ``Trainer`` to every logger it has (TensorBoardLogger,
CSVLogger, ...).

    def configure_optimizers(self):
        return lw.Optimizer(self.named_parameters(), "lamb", watch=["trust"])

    trainer = L.Trainer(callbacks=[lw.integrations.lightning.WatchedCallback()])

Needs ``lightning`` (``lightning.pytorch``; extra ``layerwise[lightning]``).
"""
from __future__ import annotations

from lightning.pytorch import Callback

from .watched import find_watching, latest_values

__all__ = ["WatchedCallback"]


class WatchedCallback(Callback):
    """A Lightning ``Callback`` that sends the latest watched values of the
    trainer's layerwise optimizers to every logger of the trainer
    (``trainer.loggers``, each ``log_metrics``), as ``"<prefix>/<watched
    name>/<parameter name>"`` floats, after every ``every_n_steps``-th
    optimizer step. The logged step is that of Lightning's own metrics of
    the same batch (``self.log`` in ``training_step``): the 0-based index of
    the optimizer step, ``trainer.global_step - 1``.

    Optimizers that are not layerwise ones are skipped; with several
    layerwise optimizers the keys get ``"<prefix>/<optimizer index>/..."``.

    Args:
        prefix: the first part of each key (``"layerwise"``).
        every_n_steps: log at optimizer steps that are multiples of it;
            ``None`` (default) takes the trainer's ``log_every_n_steps``.

    Raises:
        ValueError: at ``on_train_start``, if no optimizer of the trainer is
            a layerwise optimizer that watches something, or
            ``every_n_steps`` is not a positive integer.
    """

    def __init__(self, prefix: str = "layerwise", every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and (not isinstance(every_n_steps, int)
                                          or isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive integer, not {every_n_steps!r}")
        self.prefix = prefix
        self.every_n_steps = every_n_steps
        self._last_step = -1

    def _watching(self, trainer) -> list:
        return [o for o in (find_watching(o) for o in trainer.optimizers) if o is not None]

    def on_train_start(self, trainer, pl_module) -> None:
        found = self._watching(trainer)
        if not found:
            raise ValueError("WatchedCallback: no optimizer of the trainer is a layerwise "
                             "optimizer (lw.Optimizer or lw.adapt)")
        for opt in found:
            latest_values(opt, self.prefix)        # raises if it watches nothing

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step                 # optimizer steps taken
        every = self.every_n_steps or trainer.log_every_n_steps
        if step == 0 or step == self._last_step or step % every:
            return
        self._last_step = step
        found = self._watching(trainer)
        values = {}
        for i, opt in enumerate(found):
            prefix = self.prefix if len(found) == 1 else f"{self.prefix}/{i}"
            values.update(latest_values(opt, prefix))
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step - 1)
