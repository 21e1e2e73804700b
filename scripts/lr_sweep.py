"""Sweep the base learning rate of optimizers at a task's base batch size.

How the tuned base LRs in ``layerwise/tasks/*.py`` were chosen
(``docs/lr_sweep.md``)::

    python scripts/lr_sweep.py --task digits --optimizer adamw --lr 1e-3 2e-3 4e-3 --out /tmp/sw

Every LR runs for the task's ablation epochs at its ``base_batch_size``
(where the LR rule's factor is 1), in worker processes like ``layerwise
ablate``; the table lists the metric of each on the val (selection) and test
(reported) splits. ``layerwise ablate --protocol tuned`` does the same per
batch size and chooses on the val split.
"""
import argparse

from layerwise.ablate import Variant, run_ablation
from layerwise.tasks import get_task
from layerwise.train import resolve_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--optimizer", required=True, nargs="+")
    ap.add_argument("--lr", required=True, nargs="+", type=float)
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    task = get_task(args.task)
    variants = [Variant(f"{o}@{lr:g}", resolve_spec(o), base_lr=lr)
                for o in args.optimizer for lr in args.lr]
    rows = run_ablation(args.out, variants, tasks=[task.name],
                        batch_sizes=[task.base_batch_size], jobs=args.jobs)
    print(f"| optimizer | lr | val {task.metric} | test {task.metric} |\n"
          "| --- | --- | --- | --- |")
    for r in rows:
        val = "diverged" if r["val_value"] is None else f"{r['val_value']:.4f}"
        test = "diverged" if r["value"] is None else f"{r['value']:.4f}"
        print(f"| {r['program']} | {r['lr']:g} | {val} | {test} |")


if __name__ == "__main__":
    main()
