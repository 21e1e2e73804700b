"""``digits``: a small convnet on scikit-learn's bundled handwritten digits.

Data: ``sklearn.datasets.load_digits`` -- 1,797 grey-scale 8x8 images of
the digits 0-9 (the UCI "Optical Recognition of Handwritten Digits" test
set), shipped inside scikit-learn (BSD-3-Clause licence), so nothing is
downloaded. Fixed split: a stratified 80/20 split with
``sklearn.model_selection.train_test_split(random_state=0)`` gives 1,437
training images; the other 360 are split again, stratified
(``random_state=1``), into 180 validation (selection) and 180 test
(reported) images. Pixels (0..16) are scaled to [0, 1].

Model: conv(1->16, 3x3) - ReLU - conv(16->32, 3x3) - ReLU - maxpool 2 -
linear(512->64) - ReLU - linear(64->10); 38,282 parameters in 8 tensors.
This is the setting of the LARS paper (You, Gitman and Ginsburg 2017,
arXiv:1708.03888: layerwise rates for convnets), scaled down to a CPU.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import Task, TaskData

__all__ = ["Digits", "DigitsNet"]


class DigitsNet(nn.Module):
    """The small convnet: input ``(B, 1, 8, 8)`` float32 in [0, 1], output
    ``(B, 10)`` float32 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class Digits(Task):
    """Handwritten digits (8x8), small convnet; metric: test accuracy.

    ``data()`` gives ``x_*`` float32 ``(N, 1, 8, 8)`` in [0, 1] and ``y_*``
    int64 ``(N,)`` class labels 0..9; N = 1437 (train), 180 (val), 180 (test).
    """

    name = "digits"
    summary = "small convnet (38.3k parameters) on scikit-learn's 8x8 handwritten digits"
    data_source = ("sklearn.datasets.load_digits (bundled with scikit-learn, BSD-3-Clause); "
                   "stratified 80/10/10 split")
    metric = "accuracy"
    metric_title = "accuracy, %"
    metric_percent = True
    higher_is_better = True
    target = 0.95
    default_batch_size = 32
    default_epochs = 30
    ablate_batch_sizes = (32, 128, 512)
    ablate_epochs = 20
    base_batch_size = 32
    # tuned at batch 32, 20 epochs: docs/lr_sweep.md
    base_lr = {"lamb": 1e-2, "lars": 4.0, "adamw": 8e-3, "sgd": 5e-2}
    base_hypers = {"sgd": {"momentum": 0.9}}

    def load_data(self) -> TaskData:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        x = bunch.images.astype("float32") / 16.0
        y = bunch.target.astype("int64")
        x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.2, random_state=0,
                                                      stratify=y)
        x_va, x_te, y_va, y_te = train_test_split(x_rest, y_rest, test_size=0.5,
                                                  random_state=1, stratify=y_rest)

        def images(a):
            return torch.from_numpy(a).unsqueeze(1)

        return TaskData(images(x_tr), torch.from_numpy(y_tr), images(x_va),
                        torch.from_numpy(y_va), images(x_te), torch.from_numpy(y_te))

    def build_model(self) -> nn.Module:
        return DigitsNet()

    def loss(self, model, x, y):
        return F.cross_entropy(model(x), y)

    def evaluate(self, model, x, y):
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y).item(),
                "accuracy": (logits.argmax(1) == y).float().mean().item()}
