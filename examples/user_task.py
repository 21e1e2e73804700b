"""Your own task for ``layerwise train`` and ``layerwise ablate``: a complete, small example.

A task is a subclass of ``layerwise.tasks.Task`` in any Python file; the
file defines ``make_task()``, a function of no arguments that returns an
instance. Point ``--task`` at the file::

    layerwise train --task examples/user_task.py --optimizer lamb
    layerwise ablate --task examples/user_task.py --optimizer lamb adamw --out runs/cancer

(``--task examples/user_task.py:make_task`` names the function
explicitly; ``--task mypackage.tasks:make_task`` loads it from an
importable module instead.) The protocol -- attributes, shapes, the three
splits -- is in ``docs/tasks.md``.

This task: breast-cancer diagnosis from 30 measured features of a cell
nucleus image (``sklearn.datasets.load_breast_cancer``, the Wisconsin
Diagnostic Breast Cancer data, 569 samples, 2 classes; bundled with
scikit-learn, BSD-3-Clause, so nothing is downloaded). A stratified split
with fixed seeds gives 398 training, 85 validation and 86 test examples;
features are standardised with the training split's mean and standard
deviation. Model: an MLP 30 -> 64 -> 64 -> 2 with ReLU (6,274 parameters
in 6 tensors). Metric: test accuracy (higher is better). A default
``layerwise train`` run (batch 32, 20 epochs, 240 steps) takes about a
second on one CPU core.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from layerwise.tasks import Task, TaskData


class Cancer(Task):
    """Breast-cancer diagnosis with a small MLP.

    ``data()`` gives ``x_*`` float32 ``(N, 30)`` standardised features and
    ``y_*`` int64 ``(N,)`` labels (0 malignant, 1 benign); N = 398 (train),
    85 (val), 86 (test).
    """

    # -- required: what the task is called and what it reports
    name = "cancer"                       # no spaces or slashes: used in file names
    summary = "MLP (6.3k parameters) on scikit-learn's breast-cancer data"
    data_source = ("sklearn.datasets.load_breast_cancer (bundled with scikit-learn, "
                   "BSD-3-Clause); stratified 70/15/15 split")
    metric = "accuracy"                   # a key of what evaluate() returns
    metric_title = "accuracy, %"
    metric_percent = True                 # a fraction, shown as a percentage
    higher_is_better = True
    target = 0.95                         # steps-to-target threshold on the test split

    # -- run sizes: `layerwise train` and `layerwise ablate` defaults
    default_batch_size = 32
    default_epochs = 20
    ablate_batch_sizes = (16, 64, 256)    # at most the training set (398)
    ablate_epochs = 20
    base_batch_size = 16                  # where base_lr was chosen
    # a few runs at batch 16, 20 epochs, seeds 0 and 1 (not a careful sweep)
    base_lr = {"lamb": 1e-2, "lars": 2.0, "adamw": 4e-3, "sgd": 0.05}
    base_hypers = {"sgd": {"momentum": 0.9}}
    relative_cost = 0.3                   # an epoch costs about 0.3 digits epochs

    def load_data(self) -> TaskData:
        """Deterministic: the same split and scaling in every process."""
        from sklearn.datasets import load_breast_cancer
        from sklearn.model_selection import train_test_split

        x, y = load_breast_cancer(return_X_y=True)
        x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.3, random_state=0,
                                                      stratify=y)
        x_va, x_te, y_va, y_te = train_test_split(x_rest, y_rest, test_size=0.5,
                                                  random_state=0, stratify=y_rest)
        mean, std = x_tr.mean(0), x_tr.std(0)

        def features(a):
            return torch.from_numpy((a - mean) / std).float()

        def labels(a):
            return torch.from_numpy(a).long()

        return TaskData(features(x_tr), labels(y_tr), features(x_va), labels(y_va),
                        features(x_te), labels(y_te))

    def build_model(self) -> nn.Module:
        """A new MLP; its initial weights come from torch's global RNG, which the
        training loop seeds (so do not seed here)."""
        return nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                             nn.Linear(64, 2))

    def loss(self, model, x, y):
        """Mean cross-entropy (nats) of one training batch: a 0-d tensor."""
        return F.cross_entropy(model(x), y)

    def evaluate(self, model, x, y):
        """Loss and accuracy on a whole split (called in eval mode, without gradients)."""
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y).item(),
                "accuracy": (logits.argmax(1) == y).float().mean().item()}


def make_task() -> Cancer:
    """What ``--task examples/user_task.py`` calls."""
    return Cancer()
