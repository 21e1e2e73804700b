"""Train a tiny random-init BERT with LAMB in the Hugging Face Trainer and
log per-layer trust ratios to TensorBoard.

    python examples/hf_trainer_lamb.py --out runs/hf      # ~300 steps, about a minute on 2 CPU cores
    tensorboard --logdir runs/hf                           # train/layerwise/trust/<parameter>

The Trainer builds the optimizer itself (``optimizer_cls_and_kwargs``) with
its usual two param groups (weight decay 0 for biases and LayerNorm) of bare
tensors; ``names_from=model`` gives them the model's names, so the
program's name rule and the logged keys use them. ``watch=["trust"]``
records LAMB's trust ratio (the ``trust`` def of ``presets/lamb.lw``);
:func:`layerwise.integrations.hf.log_watched` sends it to every logger the
Trainer reports to. Data and model: ``tiny_bert.py`` beside this file.
Needs ``pip install 'layerwise[hf]'`` (transformers, accelerate, tensorboard).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import layerwise as lw
from layerwise.integrations.hf import log_watched
from layerwise.integrations.watched import latest_values

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_bert  # noqa: E402  (beside this file)


class Windows(torch.utils.data.Dataset):
    """The corpus windows as a map-style dataset of ``(SEQ,)`` int64 tensors."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ids[i]


def main(argv: list[str] | None = None) -> None:
    args = tiny_bert.arguments(__doc__.splitlines()[0], argv)

    model = tiny_bert.model(seed=0)
    gen = torch.Generator().manual_seed(0)
    training = TrainingArguments(
        output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=32,
        weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=args.steps // 10,
        logging_steps=10, report_to=["tensorboard"], save_strategy="no", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = Trainer(
        model=model, args=training, train_dataset=Windows(tiny_bert.windows()),
        data_collator=lambda rows: tiny_bert.mask(torch.stack(rows), gen),
        optimizer_cls_and_kwargs=(lw.Optimizer, {
            "spec": lw.parse(tiny_bert.PROGRAM), "names_from": model, "watch": ["trust"],
            "compile": args.compile, "lr": args.lr}))
    log_watched(trainer)
    trainer.train()

    history = [h for h in trainer.state.log_history if "loss" in h]
    print(f"loss {history[0]['loss']:.3f} (step {history[0]['step']}) -> "
          f"{history[-1]['loss']:.3f} (step {history[-1]['step']})")
    trust = latest_values(trainer.optimizer)
    for key in sorted(trust)[:4]:
        print(f"  {key}: {trust[key]:.3e}")
    print(f"TensorBoard event files under {args.out}")


if __name__ == "__main__":
    main()
