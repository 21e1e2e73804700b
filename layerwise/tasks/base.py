"""What a built-in task is: data with a fixed split, a model, a loss and a metric.

A task is deliberately small: the training loop (``layerwise.train``) asks
it for its data once, for a freshly initialised model per run, for batches
in a seeded order, for the training loss of a batch and for validation
numbers. Everything a run depends on is fixed by the task and a seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["Task", "TaskData", "UnknownTaskError"]


class UnknownTaskError(ValueError):
    """A task name that is not in the registry (``layerwise.tasks.get_task``)."""


@dataclass(frozen=True)
class TaskData:
    """A fixed train/validation split; row ``i`` of ``x_*`` goes with row ``i`` of ``y_*``.

    Shapes and dtypes are the task's (see its ``data`` docstring); the
    first dimension is the example index.
    """
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def n_val(self) -> int:
        """Number of validation examples."""
        return int(self.x_val.shape[0])


class Task:
    """Base class of the built-in tasks.

    Class attributes a task sets:
        name: registry name (``"digits"``).
        summary: one line: model and data.
        data_source: where the data comes from and its licence.
        metric: name of the reported validation metric (``"accuracy"``).
        higher_is_better: whether a larger ``metric`` is better.
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
    higher_is_better: bool = True
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

    def evaluate(self, model: torch.nn.Module, data: TaskData) -> dict[str, float]:
        """Validation numbers: ``{"loss": mean cross-entropy in nats, metric: value}``."""
        raise NotImplementedError

    # ------------------------------------------------------------ shared
    def data(self) -> TaskData:
        """The task's data, loaded once per task instance."""
        if self._data is None:
            self._data = self.load_data()
        return self._data

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
        return {"name": self.name, "summary": self.summary, "data_source": self.data_source,
                "n_train": data.n_train, "n_val": data.n_val, "metric": self.metric,
                "higher_is_better": self.higher_is_better}
