"""A tiny random-init BERT masked-language model on text that is on every
machine, shared by ``hf_trainer_lamb.py`` and ``lightning_lamb.py``.

Text: the Python Language Reference topics that ``help()`` shows
(``pydoc_data.topics``, about 466 KB of English prose, the corpus of the
``charlm`` task), as UTF-8 bytes: byte ``b`` is token ``b``, ``[MASK]`` is
256 and ``[PAD]`` 257 (unused: every example is a full window). Examples are
non-overlapping windows of :data:`SEQ` bytes. Masked-LM as in BERT (Devlin
et al. 2019, section 3.1) simplified: 15% of the positions, drawn from a
seeded generator, become ``[MASK]``; the loss is the cross-entropy on them.

Model: ``transformers.BertForMaskedLM`` built from a config (no download):
hidden 64, 2 layers, 2 heads, intermediate 128.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM

from layerwise.tasks.charlm import corpus_bytes

SEQ = 64
MASK, PAD, VOCAB = 256, 257, 258

# LAMB with BERT's exclusion of biases and LayerNorm from weight decay, by name
PROGRAM = """optimizer lamb_bert extends "lamb"
for name ~ "bias|LayerNorm" {
  weight_decay = 0
}
"""


def windows() -> torch.Tensor:
    """``(N, SEQ)`` int64 token ids: the corpus in non-overlapping windows."""
    data = torch.tensor(list(corpus_bytes()), dtype=torch.int64)
    n = len(data) // SEQ
    return data[: n * SEQ].view(n, SEQ)


def mask(ids: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A masked-LM batch of ``ids`` ``(B, SEQ)`` int64: ``input_ids`` with 15%
    of positions replaced by ``[MASK]``, ``labels`` the original ids there
    and -100 elsewhere, ``attention_mask`` all ones."""
    chosen = torch.rand(ids.shape, generator=gen) < 0.15
    return {"input_ids": torch.where(chosen, MASK, ids),
            "labels": torch.where(chosen, ids, -100),
            "attention_mask": torch.ones_like(ids)}


def model(seed: int = 0) -> BertForMaskedLM:
    """The tiny BERT, randomly initialised from ``seed`` (float32)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128,
                        max_position_embeddings=SEQ, pad_token_id=PAD)
    return BertForMaskedLM(config)


def arguments(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The examples' command line: ``--out DIR`` (required), ``--steps``
    (300), ``--lr`` (2e-2), ``--compile``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True, help="output directory (TensorBoard logs)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the step (a cold compile costs 10-30 s on a CPU)")
    return parser.parse_args(argv)
