"""Built-in real-data tasks for ``layerwise train`` and ``layerwise ablate``.

Each task is a small module holding one :class:`~layerwise.tasks.base.Task`
subclass; this registry maps task names to them. Both tasks read data that
is already on the machine after set-up, so nothing is downloaded at run time:

========  ==========================================================  =======================
name      data (licence)                                              setting
========  ==========================================================  =======================
digits    ``sklearn.datasets.load_digits`` (scikit-learn, BSD-3)      convnet (LARS paper)
charlm    ``pydoc_data.topics`` (CPython standard library, PSF)       transformer LM (LAMB)
========  ==========================================================  =======================
"""
from __future__ import annotations

from .base import Task, TaskData, UnknownTaskError

__all__ = ["Task", "TaskData", "UnknownTaskError", "get_task", "task_names"]


def _registry() -> dict[str, type[Task]]:
    from .charlm import CharLM
    from .digits import Digits
    return {"digits": Digits, "charlm": CharLM}


def task_names() -> list[str]:
    """Names of the built-in tasks, in the order the default ablation runs them."""
    return list(_registry())


def get_task(name: str) -> Task:
    """A fresh instance of the task called ``name``.

    Raises:
        UnknownTaskError: (a ``ValueError``) if there is no such task; the
            message lists the known ones.
    """
    tasks = _registry()
    if name not in tasks:
        raise UnknownTaskError(f"unknown task '{name}'; known tasks: {', '.join(tasks)}")
    return tasks[name]()
