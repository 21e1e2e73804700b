"""What a task is: data with a fixed three-way split, a model, a loss and a metric.

A task is deliberately small: the training loop (``layerwise.train``) asks
it for its data once, for a freshly initialised model per run, for batches
in a seeded order, for the training loss of a batch and for evaluation
numbers on a split. Everything a run depends on is fixed by the task and a
seed. The built-in tasks and a user's own task (``--task FILE.py``, see
``docs/tasks.md``) implement the same protocol: subclass :class:`Task`.

Splits: ``train`` is trained on; ``val`` is the selection split (the
``tuned`` protocol of ``layerwise ablate`` chooses learning rates on it);
``test`` is the held-out split every table reports.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["SPLITS", "Task", "TaskData", "UnknownTaskError"]


class UnknownTaskError(ValueError):
    """A task that cannot be had: an unknown name, or a task file or module that
    cannot be loaded or does not give a valid task (``layerwise.tasks.get_task``)."""


#: The evaluation splits: ``val`` (selection) and ``test`` (reported).
SPLITS = ("val", "test")


@dataclass(frozen=True)
class TaskData:
    """A fixed train/validation/test split; row ``i`` of ``x_*`` goes with row ``i`` of ``y_*``.

    Shapes and dtypes are the task's (see its ``data`` docstring); the
    first dimension is the example index. ``val`` is the selection split,
    ``test`` the reported one; the three must not share examples.
    """
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of split ``which`` (``"train"``, ``"val"`` or ``"test"``).

        Raises:
            ValueError: for another name.
        """
        if which not in ("train", *SPLITS):
            raise ValueError(f"unknown split '{which}'; splits: train, val, test")
        return getattr(self, f"x_{which}"), getattr(self, f"y_{which}")

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def n_val(self) -> int:
        """Number of validation examples."""
        return int(self.x_val.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test (reported) examples."""
        return int(self.x_test.shape[0])


class Task:
    """Base class of the built-in tasks.

    Class attributes a task sets:
        name: registry name (``"digits"``).
        summary: one line: model and data.
        data_source: where the data comes from and its licence.
        metric: name of the reported metric (``"accuracy"``), a key of
            what ``evaluate`` returns.
        metric_title: how tables and plots name it, with its unit
            (``"accuracy, %"``); default: ``metric``.
        metric_percent: show the metric multiplied by 100 (for fractions).
        higher_is_better: whether a larger ``metric`` is better.
        target: the metric value a run must reach on the test split for
            steps-to-target (Shallue et al. 2018, arXiv:1811.03600);
            ``None``: no default target (``--target`` gives one).
        default_batch_size, default_epochs: the size ``layerwise train``
            uses when none is given (about a minute on 2 CPU cores).
        ablate_batch_sizes, ablate_epochs: the default grid of ``layerwise
            ablate`` (small enough that the README's main command runs in
            under 10 minutes on 2 cores, set-up included).
        base_batch_size: the batch size at which ``base_lr`` was tuned.
        base_lr: tuned learning rate at ``base_batch_size`` per preset
            name (see ``docs/lr_sweep.md`` for the sweep behind them).
        base_hypers: other hyper values per preset name used by train and
            ablate unless overridden (e.g. momentum 0.9 for ``sgd``).
        relative_cost: rough cost of one epoch relative to other tasks;
            only orders the cells of an ablation (slowest first).
    """

    name: str = ""
    summary: str = ""
    data_source: str = ""
    metric: str = ""
    metric_title: str = ""
    metric_percent: bool = False
    higher_is_better: bool = True
    target: float | None = None
    default_batch_size: int = 32
    default_epochs: int = 1
    ablate_batch_sizes: tuple[int, ...] = ()
    ablate_epochs: int = 1
    base_batch_size: int = 32
    base_lr: dict[str, float] = {}
    base_hypers: dict[str, dict[str, float]] = {}
    relative_cost: float = 1.0

    def __init__(self) -> None:
        self._data: TaskData | None = None

    # ------------------------------------------------------------ to override
    def load_data(self) -> TaskData:
        """Read the data from the installed package and split it (deterministic)."""
        raise NotImplementedError

    def build_model(self) -> torch.nn.Module:
        """A new model, initialised from torch's global RNG (the caller seeds it)."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats) of ``model`` on one batch: a 0-d float32 tensor."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
                 ) -> dict[str, float]:
        """Numbers of ``model`` on one split's examples ``x``, ``y`` (all of them):
        ``{"loss": mean cross-entropy in nats, metric: value}``. The caller
        puts the model in eval mode and disables gradients."""
        raise NotImplementedError

    # ------------------------------------------------------------ shared
    def data(self) -> TaskData:
        """The task's data, loaded once per task instance."""
        if self._data is None:
            self._data = self.load_data()
        return self._data

    def evaluate_split(self, model: torch.nn.Module, which: str = "test") -> dict[str, float]:
        """:meth:`evaluate` on split ``which`` (``"val"`` or ``"test"``), in eval mode
        without gradients; the model's train/eval mode is restored after."""
        x, y = self.data().split(which)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return {k: float(v) for k, v in self.evaluate(model, x, y).items()}
        finally:
            model.train(was_training)

    def title(self) -> str:
        """``metric_title``, or else ``metric``."""
        return self.metric_title or self.metric

    def steps_per_epoch(self, batch_size: int) -> int:
        """``n_train // batch_size``: the last incomplete batch is dropped, so
        every step sees exactly ``batch_size`` examples.

        Raises:
            ValueError: if ``batch_size`` is not positive or is larger than
                the training set.
        """
        n = self.data().n_train
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, not {batch_size}")
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} is larger than the {self.name} "
                             f"training set ({n} examples)")
        return n // batch_size

    def batches(self, batch_size: int, epoch: int, seed: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of one epoch, in an order fixed by ``seed`` and ``epoch``.

        Yields ``steps_per_epoch(batch_size)`` pairs ``(x, y)`` of rows of
        the training set (a fresh permutation per epoch, last partial
        batch dropped).
        """
        data = self.data()
        steps = self.steps_per_epoch(batch_size)
        gen = torch.Generator().manual_seed(1_000_003 * seed + epoch)
        order = torch.randperm(data.n_train, generator=gen)
        for i in range(steps):
            idx = order[i * batch_size:(i + 1) * batch_size]
            yield data.x_train[idx], data.y_train[idx]

    def describe(self) -> dict:
        """Facts about the task for a run's JSON record."""
        data = self.data()
        return {"name": self.name, "ref": getattr(self, "ref", self.name),
                "summary": self.summary, "data_source": self.data_source,
                "n_train": data.n_train, "n_val": data.n_val, "n_test": data.n_test,
                "metric": self.metric, "metric_title": self.title(),
                "metric_percent": bool(self.metric_percent),
                "higher_is_better": bool(self.higher_is_better), "target": self.target}
