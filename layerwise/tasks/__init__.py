"""Tasks for ``layerwise train`` and ``layerwise ablate``: the built-in ones and your own.

Each built-in task is a small module holding one
:class:`~layerwise.tasks.base.Task` subclass. All read data that is
already on the machine after set-up, so nothing is downloaded at run time:

========  ==========================================================  ==========================
name      data (licence)                                              setting
========  ==========================================================  ==========================
digits    ``sklearn.datasets.load_digits`` (scikit-learn, BSD-3)      convnet (LARS paper)
charlm    ``pydoc_data.topics`` (CPython standard library, PSF)       transformer LM (LAMB)
mlm       ``pydoc_data.topics`` (CPython standard library, PSF)       BERT-style masked LM (LAMB)
========  ==========================================================  ==========================

:func:`get_task` also loads a user's task from a Python file
(``path/to/task.py[:FUNC]``) or module (``package.module:FUNC``); see
:mod:`layerwise.tasks.loader` and ``docs/tasks.md``.
"""
from __future__ import annotations

from .base import SPLITS, Task, TaskData, UnknownTaskError
from .loader import load_task, validate_task

__all__ = ["SPLITS", "Task", "TaskData", "UnknownTaskError", "get_task", "task_names",
           "validate_task"]


def task_names() -> list[str]:
    """Names of the built-in tasks, in the order the default ablation runs them:
    ``["digits", "charlm", "mlm"]``."""
    from .loader import builtin_tasks
    return list(builtin_tasks())


def get_task(ref: str) -> Task:
    """A fresh instance of the task ``ref``: a built-in name, ``path/to/task.py[:FUNC]``
    or ``module:FUNC`` (:func:`layerwise.tasks.loader.load_task`).

    The task's ``ref`` attribute is the string that re-creates it in another
    process (built-in name, absolute file path ``:FUNC``, or ``module:FUNC``).

    Raises:
        UnknownTaskError: (a ``ValueError``) with one line naming ``ref``: an
            unknown name (the message lists the built-in ones), a task file
            or module that cannot be loaded, or a task that breaks the
            protocol (:func:`validate_task`).
    """
    return load_task(ref)
