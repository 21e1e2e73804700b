"""Log a layerwise optimizer's watched values (per-layer trust ratios) from
the Hugging Face ``transformers.Trainer`` to every logger it reports to
(TensorBoard, W&B, ...).

    opt = lw.Optimizer(model.named_parameters(), "lamb", watch=["trust"])
    trainer = Trainer(model, args, optimizers=(opt, sched), ...)
    lw.integrations.hf.log_watched(trainer)        # adds a WatchedCallback
    trainer.train()

Needs ``transformers`` (extra ``layerwise[hf]``).
"""
from __future__ import annotations

from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from .watched import latest_values

__all__ = ["WatchedCallback", "log_watched"]


class WatchedCallback(TrainerCallback):
    """A ``TrainerCallback`` that adds the latest watched values of the
    trainer's layerwise optimizer to the training logs, as
    ``"<prefix>/<watched name>/<parameter name>"`` floats (TensorBoard shows
    them as ``train/layerwise/trust/<parameter>``), at every step the
    Trainer logs (``logging_steps``).

    The Trainer hands ``logs`` to its callbacks in order and its reporting
    callbacks (TensorBoard, ...) come first, so this callback must run
    before them: add it with :func:`log_watched` (which puts it first), not
    with ``Trainer(callbacks=[...])`` or ``add_callback`` (which append it;
    then the values reach only the callbacks after it). The values are not
    in ``trainer.state.log_history`` (the Trainer records that before it
    calls the callbacks). :func:`log_watched` also keeps them off the
    console (the progress bar / printer callback prints every log).

    Args:
        prefix: the first part of each key (``"layerwise"``).

    Raises:
        ValueError: at ``on_train_begin``, if the Trainer's optimizer is not
            a layerwise optimizer (``lw.Optimizer`` or ``lw.adapt``) or
            watches nothing.
    """

    def __init__(self, prefix: str = "layerwise") -> None:
        self.prefix = prefix
        self._last_step = -1

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            latest_values(optimizer, self.prefix)     # raises the error that says why, if any

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        # training logs only, once per step (evaluation logs come at the same step)
        if (logs is None or optimizer is None or state.global_step == 0
                or state.global_step == self._last_step
                or any(k.startswith(("eval_", "test_")) for k in logs)):
            return
        self._last_step = state.global_step
        logs.update(latest_values(optimizer, self.prefix))


class _OffConsole(TrainerCallback):
    """Removes the watched values from ``logs`` before the console printer
    (``ProgressCallback`` / ``PrinterCallback``) sees them."""

    def __init__(self, prefix: str) -> None:
        self.start = prefix + "/"

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in [k for k in logs or () if k.startswith(self.start)]:
            del logs[key]


def log_watched(trainer: Trainer, prefix: str = "layerwise") -> WatchedCallback:
    """Add a :class:`WatchedCallback` to ``trainer`` before its reporting
    callbacks, so every logger the trainer has receives the watched values,
    and keep the values off the console (one per parameter would fill it).

    Returns:
        the callback added.
    """
    callbacks = trainer.callback_handler.callbacks
    callback = WatchedCallback(prefix)
    callbacks.insert(0, callback)
    printers = [i for i, c in enumerate(callbacks)
                if isinstance(c, (ProgressCallback, PrinterCallback))]
    if printers:
        callbacks.insert(printers[0], _OffConsole(prefix))
    return callback
