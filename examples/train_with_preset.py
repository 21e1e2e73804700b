"""Train with a shipped preset through the Python API, in an ordinary PyTorch loop.

    python examples/train_with_preset.py            # LARS on the digits convnet, ~10 s

The data and model are the ``digits`` task's (scikit-learn's bundled 8x8
handwritten digits and a small convnet); the loop itself is plain PyTorch:
``lw.Optimizer`` is a ``torch.optim.Optimizer``, so LR schedulers work on it
unchanged. The ``lars`` preset ``watch``es its trust ratio ``tr``, so
``opt.watched["tr"]`` holds one value per layer per step (``record=("every", 1)``;
the default keeps only the last).
"""
import torch
from torch.nn import functional as F

import layerwise as lw
from layerwise.tasks.digits import DigitsNet
from layerwise.tasks import get_task


def main() -> None:
    torch.manual_seed(0)
    data = get_task("digits").data()       # x: (N, 1, 8, 8) float32, y: (N,) int64
    model = DigitsNet()

    # the preset's hypers are keyword arguments; everything else is the .lw file's default
    opt = lw.Optimizer(model.named_parameters(), "lars", compile=False, lr=4.0, momentum=0.9,
                       record=("every", 1))   # keep every step's watched values
    epochs, batch = 10, 32
    steps = epochs * (len(data.x_train) // batch)
    warmup = steps // 10                   # linear warm-up, then linear decay
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else (steps - s) / (steps - warmup))

    for epoch in range(epochs):
        order = torch.randperm(len(data.x_train))
        for i in range(len(order) // batch):
            idx = order[i * batch:(i + 1) * batch]
            opt.zero_grad()
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            acc = (model(data.x_val).argmax(1) == data.y_val).float().mean().item()
        print(f"epoch {epoch + 1:2d}  train loss {loss.item():.4f}  val accuracy {acc:.3f}")

    print("\nLARS trust ratio per layer (first step -> last step):")
    for name, values in opt.watched["tr"].items():
        print(f"  {name:14s} {values[0]:.3e} -> {values[-1]:.3e}  ({len(values)} steps)")


if __name__ == "__main__":
    main()
