"""Turn a ``--task`` reference into a validated :class:`~layerwise.tasks.Task`.

A reference (``ref``) is one of

* a built-in task name: ``digits``, ``charlm``, ``mlm``;
* a Python file, ``path/to/task.py`` or ``path/to/task.py:FUNC``: the file
  is imported by path (it need not be on ``sys.path``) and ``FUNC``
  (default ``make_task``) is called;
* an importable module, ``package.module:FUNC``.

``FUNC`` takes no arguments and returns an instance of a ``Task``
subclass. Every task that :func:`load_task` returns is a fresh instance
and carries ``task.ref``: the string that gives an equal task in another
process (a spawned worker of ``layerwise ablate``): the built-in name, the
file's absolute path plus ``:FUNC``, or ``module:FUNC``. A user's task is
checked by :func:`validate_task` before it is returned. See
``docs/tasks.md``.

Every failure is an :class:`~layerwise.tasks.UnknownTaskError` (a
``ValueError``) with a one-line message that names the reference and what
is wrong, e.g. ``--task my_task.py: no function 'make_task' (define
make_task() returning a layerwise.tasks.Task)``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import math
import numbers
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from .base import Task, TaskData, UnknownTaskError

__all__ = ["DEFAULT_FUNC", "builtin_tasks", "load_task", "validate_task"]

#: The function a task file or module is asked for when the reference names none.
DEFAULT_FUNC = "make_task"

# imported task files: absolute path -> (mtime_ns, size, module)
_FILES: dict[str, tuple[int, int, ModuleType]] = {}


def builtin_tasks() -> dict[str, type[Task]]:
    """The built-in tasks by name, in the order the default ablation runs them."""
    from .charlm import CharLM
    from .digits import Digits
    from .mlm import MLM
    return {"digits": Digits, "charlm": CharLM, "mlm": MLM}


def load_task(ref: str) -> Task:
    """A fresh, validated task for ``ref`` (see the module docstring), with ``task.ref`` set.

    Built-in tasks are not re-validated (their tests do that). A file is
    imported once per process (again if it changed on disk); every call
    calls ``FUNC`` again, so every call gives a new instance.

    Raises:
        UnknownTaskError: one line naming ``ref``: an unknown name (listing
            the built-in ones), no such file, a syntax error
            (``FILE:LINE: SyntaxError: ...``), an exception while importing
            or calling ``FUNC``, no such function, a result that is not a
            ``Task``, or a task that fails :func:`validate_task`.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise UnknownTaskError(f"--task {ref!r}: give a task name, a task file "
                               "(path/to/task.py[:FUNC]) or module:FUNC")
    tasks = builtin_tasks()
    if ref in tasks:
        task = tasks[ref]()
        task.ref = ref
        return task
    target, func = _split(ref)
    if _looks_like_file(target):
        module, path = _import_file(ref, target)
        canonical = f"{path}:{func or DEFAULT_FUNC}"
    elif func is not None:
        module = _import_module(ref, target)
        canonical = f"{target}:{func}"
    else:
        raise UnknownTaskError(
            f"unknown task '{ref}'; known tasks: {', '.join(tasks)} (or a task file "
            f"path/to/task.py[:FUNC], or module:FUNC; see docs/tasks.md)")
    task = _call(ref, module, func or DEFAULT_FUNC)
    if isinstance(task.name, str) and task.name in tasks:
        raise UnknownTaskError(f"--task {ref}: the task's name '{task.name}' is a built-in "
                               "task's name; give it another")
    validate_task(task, ref)
    task.ref = canonical
    return task


# ---------------------------------------------------------------- resolving
def _split(ref: str) -> tuple[str, str | None]:
    """``"a/b.py:f"`` -> ``("a/b.py", "f")``; no ``:IDENTIFIER`` suffix -> ``(ref, None)``."""
    target, sep, func = ref.rpartition(":")
    if sep and target and func.isidentifier():
        return target, func
    return ref, None


def _looks_like_file(target: str) -> bool:
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return target.endswith(".py") or any(s in target for s in seps) or os.path.isfile(target)


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text + (" ..." if len(lines) > 1 else "")


def _where(err: BaseException, path: str, shown: str) -> str:
    """`` (FILE:LINE)`` of the innermost traceback frame in ``path``, or ``""``."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if f.filename and os.path.abspath(f.filename) == path]
    return f" ({shown}:{frames[-1].lineno})" if frames else ""


def _syntax(err: SyntaxError, path: str, shown: str) -> UnknownTaskError:
    filename = err.filename or shown
    if os.path.abspath(filename) == path:
        filename = shown
    line = f":{err.lineno}" if err.lineno else ""
    return UnknownTaskError(f"{filename}{line}: SyntaxError: {err.msg}")


def _import_file(ref: str, target: str) -> tuple[ModuleType, str]:
    """Import the file ``target`` (cached by absolute path, mtime and size)."""
    p = Path(target).expanduser()
    if not p.exists():
        raise UnknownTaskError(f"--task {ref}: no such file '{target}'")
    if p.is_dir():
        raise UnknownTaskError(f"--task {ref}: '{target}' is a directory, not a Python file")
    path = str(p.resolve())
    try:
        st = os.stat(path)
    except OSError as err:
        raise UnknownTaskError(f"--task {ref}: cannot read '{target}': {err.strerror}") from None
    cached = _FILES.get(path)
    if cached and cached[:2] == (st.st_mtime_ns, st.st_size):
        return cached[2], path
    digest = hashlib.sha1(path.encode()).hexdigest()[:12]
    name = f"_layerwise_task_{p.stem.replace('.', '_')}_{digest}"
    loader = importlib.machinery.SourceFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module              # dataclasses and pickle look classes up here
    try:
        loader.exec_module(module)
    except (Exception, SystemExit) as err:
        sys.modules.pop(name, None)
        if isinstance(err, SyntaxError):
            raise _syntax(err, path, target) from None
        if isinstance(err, OSError) and err.filename and \
                os.path.abspath(str(err.filename)) == path:
            raise UnknownTaskError(f"--task {ref}: cannot read '{target}': "
                                   f"{err.strerror}") from None
        raise UnknownTaskError(f"--task {ref}: importing it raised {_first_line(err)}"
                               f"{_where(err, path, target)}") from None
    _FILES[path] = (st.st_mtime_ns, st.st_size, module)
    return module, path


def _import_module(ref: str, target: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as err:
        if err.name and (target == err.name or target.startswith(err.name + ".")):
            raise UnknownTaskError(
                f"--task {ref}: no module named '{err.name}' (and '{target}' is not a file; "
                "a file needs a path such as ./task.py)") from None
        raise UnknownTaskError(f"--task {ref}: importing '{target}' raised "
                               f"{_first_line(err)}") from None
    except SyntaxError as err:
        raise _syntax(err, "", err.filename or target) from None
    except (Exception, SystemExit) as err:
        raise UnknownTaskError(f"--task {ref}: importing '{target}' raised "
                               f"{_first_line(err)}") from None


def _call(ref: str, module: ModuleType, func: str) -> Task:
    fn: Callable[[], Any] | None = getattr(module, func, None)
    if fn is None:
        raise UnknownTaskError(f"--task {ref}: no function '{func}' (define {func}() "
                               "returning a layerwise.tasks.Task)")
    if not callable(fn):
        raise UnknownTaskError(f"--task {ref}: '{func}' is a {type(fn).__name__}, not a "
                               f"function (define {func}() returning a layerwise.tasks.Task)")
    if isinstance(fn, type) and issubclass(fn, Task):
        raise UnknownTaskError(f"--task {ref}: '{func}' is a Task class; name a function "
                               f"returning an instance (def make_task(): return {func}())")
    try:
        task = fn()
    except (Exception, SystemExit) as err:
        raise UnknownTaskError(f"--task {ref}: {func}() raised {_first_line(err)}") from None
    if not isinstance(task, Task):
        raise UnknownTaskError(f"--task {ref}: {func}() returned {_kind(task)}, not an "
                               "instance of a layerwise.tasks.Task subclass")
    return task


def _kind(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, type):
        return f"the class {value.__name__}"
    return f"a {type(value).__name__}"


# ---------------------------------------------------------------- validation
def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def validate_task(task: Task, ref: str | None = None) -> Task:
    """Check that ``task`` keeps the task protocol (``docs/tasks.md``); returns it.

    Checks, in order: it is a :class:`Task`; ``name`` a non-empty string
    without whitespace or path separators; ``metric`` a non-empty string;
    ``higher_is_better`` and ``metric_percent`` bools; ``target`` ``None``
    or a finite number; ``load_data()`` (through ``task.data()``, which
    caches it) gives a :class:`TaskData` of six tensors, each split's
    ``x`` and ``y`` with the same first dimension and no split empty;
    ``build_model()`` gives a ``torch.nn.Module`` and ``evaluate`` of it
    (in eval mode, without gradients: what ``evaluate_split`` does) on the
    ``"val"`` and the ``"test"`` split a dict whose values are numbers,
    with keys ``"loss"`` and ``metric`` (any float, NaN included: the
    model is untrained); ``base_lr`` a dict of str -> positive finite number;
    ``base_hypers`` a dict of str -> dict of str -> finite number;
    ``ablate_batch_sizes`` a non-empty sequence of positive ints no larger
    than the training set; ``default_batch_size`` and ``base_batch_size``
    such ints too; ``default_epochs`` and ``ablate_epochs`` positive ints;
    ``relative_cost`` a positive finite number. Torch's global RNG is left
    as it was (the model is built under ``torch.random.fork_rng``).

    Args:
        task: the task.
        ref: how the user named it (for messages); default ``task.name``.

    Raises:
        UnknownTaskError: ``--task REF: <what is wrong>`` (one line).
    """
    shown = ref if ref is not None else getattr(task, "name", "?")

    def bad(why: str) -> UnknownTaskError:
        return UnknownTaskError(f"--task {shown}: {why}")

    if not isinstance(task, Task):
        raise bad(f"{_kind(task)} is not an instance of a layerwise.tasks.Task subclass")
    cls = type(task).__name__
    name = task.name
    if not isinstance(name, str) or not name:
        raise bad(f"{cls}.name must be a non-empty string, not {name!r}")
    if any(c.isspace() for c in name) or any(s in name for s in ("/", "\\", os.sep)):
        raise bad(f"{cls}.name {name!r} must not contain whitespace or path separators")
    if not isinstance(task.metric, str) or not task.metric:
        raise bad(f"{cls}.metric must be a non-empty string (a key of what evaluate() "
                  f"returns), not {task.metric!r}")
    for attr in ("higher_is_better", "metric_percent"):
        if not isinstance(getattr(task, attr), bool):
            raise bad(f"{cls}.{attr} must be True or False, not {getattr(task, attr)!r}")
    target = task.target
    if target is not None and not (_number(target) and math.isfinite(target)):
        raise bad(f"{cls}.target must be None or a finite number, not {target!r}")
    if not hasattr(task, "_data"):
        raise bad(f"{cls}.__init__ must call super().__init__()")

    try:
        data = task.data()
    except Exception as err:
        raise bad(f"load_data() raised {_first_line(err)}") from None
    if not isinstance(data, TaskData):
        raise bad(f"load_data() returned {_kind(data)}, not a layerwise.tasks.TaskData")
    for split in ("train", "val", "test"):
        x, y = data.split(split)
        for which, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor):
                raise bad(f"load_data(): {which}_{split} is {_kind(t)}, not a torch.Tensor")
            if t.dim() == 0:
                raise bad(f"load_data(): {which}_{split} is 0-d; the first dimension "
                          "indexes the examples")
        if x.shape[0] != y.shape[0]:
            raise bad(f"load_data(): x_{split} has {x.shape[0]} examples but y_{split} "
                      f"has {y.shape[0]}")
        if x.shape[0] == 0:
            raise bad(f"load_data(): the {split} split is empty")
    n_train = data.n_train

    try:
        with torch.random.fork_rng(devices=[]):
            model = task.build_model()
    except Exception as err:
        raise bad(f"build_model() raised {_first_line(err)}") from None
    if not isinstance(model, torch.nn.Module):
        raise bad(f"build_model() returned {_kind(model)}, not a torch.nn.Module")
    model.eval()
    for split in ("val", "test"):
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                result = task.evaluate(model, *data.split(split))
        except Exception as err:
            raise bad(f"evaluate() on the {split} split raised {_first_line(err)}") from None
        if not isinstance(result, dict):
            raise bad(f"evaluate() returned {_kind(result)}, not a dict "
                      f"{{'loss': ..., '{task.metric}': ...}}")
        for key in ("loss", task.metric):
            if key not in result:
                raise bad(f"evaluate() on the {split} split has no '{key}' (keys: "
                          f"{', '.join(map(str, result)) or 'none'}); it must return "
                          f"{{'loss': ..., '{task.metric}': ...}}")
        for key, value in result.items():
            try:
                float(value)
            except (TypeError, ValueError, RuntimeError):
                raise bad(f"evaluate() on the {split} split: '{key}' is {_kind(value)}, "
                          "not a number") from None

    if not isinstance(task.base_lr, dict):
        raise bad(f"{cls}.base_lr must be a dict of optimizer name -> learning rate")
    for key, lr in task.base_lr.items():
        if not isinstance(key, str) or not (_number(lr) and math.isfinite(lr) and lr > 0):
            raise bad(f"{cls}.base_lr[{key!r}] = {lr!r}: must be a positive finite number "
                      "under an optimizer name")
    if not isinstance(task.base_hypers, dict):
        raise bad(f"{cls}.base_hypers must be a dict of optimizer name -> {{hyper: value}}")
    for key, hypers in task.base_hypers.items():
        if not isinstance(key, str) or not isinstance(hypers, dict):
            raise bad(f"{cls}.base_hypers[{key!r}] must be a dict of hyper name -> number")
        for h, v in hypers.items():
            if not isinstance(h, str) or not (_number(v) and math.isfinite(v)):
                raise bad(f"{cls}.base_hypers[{key!r}][{h!r}] = {v!r}: must be a finite "
                          "number")
    sizes = task.ablate_batch_sizes
    if not isinstance(sizes, (tuple, list)) or not sizes:
        raise bad(f"{cls}.ablate_batch_sizes must be a non-empty tuple of batch sizes, "
                  f"not {sizes!r}")
    for b in sizes:
        if not _positive_int(b) or b > n_train:
            raise bad(f"{cls}.ablate_batch_sizes: {b!r} must be a positive int no larger "
                      f"than the training set ({n_train} examples)")
    for attr in ("default_batch_size", "base_batch_size"):
        b = getattr(task, attr)
        if not _positive_int(b) or b > n_train:
            raise bad(f"{cls}.{attr} = {b!r}: must be a positive int no larger than the "
                      f"training set ({n_train} examples)")
    for attr in ("default_epochs", "ablate_epochs"):
        if not _positive_int(getattr(task, attr)):
            raise bad(f"{cls}.{attr} = {getattr(task, attr)!r}: must be a positive int")
    cost = task.relative_cost
    if not (_number(cost) and math.isfinite(cost) and cost > 0):
        raise bad(f"{cls}.relative_cost = {cost!r}: must be a positive finite number")
    return task
