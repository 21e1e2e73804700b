"""``charlm``: a small byte-level transformer language model on real English text.

Corpus: ``pydoc_data.topics`` from the Python standard library -- the
topics of the Python Language Reference that ``help()`` shows (about
466 KB of English prose with code, PSF licence), present in every CPython
installation, so nothing is downloaded. The topics are concatenated in
sorted-key order and encoded as UTF-8 bytes; the first 90% of the bytes
are the training text, the next 5% the validation (selection) text and the
last 5% the test (reported) text (the contiguous split of enwik8/text8). The corpus differs a little between
CPython releases, so the record of every run carries the corpus's SHA-256
and size.

Examples are non-overlapping windows of ``context + 1`` bytes (stride
``context``): ``x`` is the first ``context`` bytes and ``y`` the same
window shifted by one. With the default ``context = 64`` that is 6,554
training, 364 validation and 364 test windows (on CPython 3.11.7).

Model: a GPT-style pre-LayerNorm decoder (Radford et al. 2019): byte
embedding (256 x d) plus learned positions, ``n_layers`` blocks of causal
multi-head self-attention and a 4d GELU MLP, a final LayerNorm and an
untied linear head to 256 logits. Default d = 48, 2 layers, 4 heads:
84,544 parameters in 30 tensors. This is the setting of the LAMB paper
(You et al. 2019, arXiv:1904.00962: attention models), scaled down to a
CPU. Metric: test bits per byte (cross-entropy in nats / ln 2; lower is
better).
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import Task, TaskData

__all__ = ["CorpusTask", "CharLM", "ByteTransformer", "corpus_bytes"]


def corpus_bytes() -> bytes:
    """The corpus: ``pydoc_data.topics.topics`` values in sorted-key order, UTF-8."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics)).encode("utf-8")


class Block(nn.Module):
    """One pre-LN transformer block on ``(B, T, d)`` float32 activations.

    ``causal=True`` (the decoder of ``charlm``): position ``t`` attends to
    positions ``<= t``; ``causal=False`` (the encoder of ``mlm``): to all
    positions. The flag adds no parameter.
    """

    def __init__(self, d: int, heads: int, causal: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ByteTransformer(nn.Module):
    """Decoder-only byte LM: input ``(B, T)`` int64 bytes, output ``(B, T, 256)``
    float32 logits for the next byte (``T <= context``)."""

    def __init__(self, context: int = 64, d: int = 48, n_layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)
        for m in self.modules():            # GPT-2 initialisation: N(0, 0.02), zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


class CorpusTask(Task):
    """Base of the tasks on :func:`corpus_bytes` (``charlm``, ``mlm``): the contiguous
    90 / 5 / 5 byte split and the corpus's SHA-256 and size in every run record."""

    context = 64

    def __init__(self) -> None:
        super().__init__()
        self._sha256 = ""
        self._size = 0

    def corpus_splits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The corpus's bytes 0-90% (train), 90-95% (val) and 95-100% (test): 1-D int64
        tensors of byte values 0..255. Records the corpus's SHA-256 and size."""
        raw = corpus_bytes()
        self._sha256 = hashlib.sha256(raw).hexdigest()
        self._size = len(raw)
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)
        cut, cut2 = int(0.9 * len(data)), int(0.95 * len(data))
        return data[:cut], data[cut:cut2], data[cut2:]

    def describe(self) -> dict:
        out = super().describe()
        out.update({"corpus_sha256": self._sha256, "corpus_bytes": self._size,
                    "context": self.context})
        return out


class CharLM(CorpusTask):
    """Byte-level transformer LM on ``pydoc_data.topics``; metric: validation bits per byte.

    ``data()`` gives ``x_*`` and ``y_*`` int64 ``(N, context)`` byte values
    0..255, ``y`` being ``x`` shifted by one byte.
    """

    name = "charlm"
    summary = "byte-level transformer LM (2 layers, d=48, 84.5k parameters) on pydoc_data.topics"
    metric = "bits_per_byte"
    metric_title = "bits per byte"
    higher_is_better = False
    target = 3.0
    default_batch_size = 16
    default_epochs = 5
    ablate_batch_sizes = (16, 64, 256)
    ablate_epochs = 2
    base_batch_size = 16
    # tuned at batch 16, 2 epochs: docs/lr_sweep.md
    base_lr = {"lamb": 2e-2, "lars": 16.0, "adamw": 8e-3, "sgd": 0.8}
    base_hypers = {"sgd": {"momentum": 0.9}}

    relative_cost = 25.0
    context = 64
    d_model = 48
    n_layers = 2
    heads = 4

    @property
    def data_source(self) -> str:  # type: ignore[override]
        return ("pydoc_data.topics (CPython standard library, PSF licence); UTF-8 bytes, "
                "first 90% train / next 5% validation / last 5% test")

    def load_data(self) -> TaskData:
        def windows(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            n = (len(seq) - 1) // self.context
            x = seq[: n * self.context].view(n, self.context)
            y = seq[1: n * self.context + 1].view(n, self.context)
            return x.contiguous(), y.contiguous()

        return TaskData(*(z for part in self.corpus_splits() for z in windows(part)))

    def build_model(self) -> nn.Module:
        return ByteTransformer(self.context, self.d_model, self.n_layers, self.heads)

    def loss(self, model, x, y):
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def evaluate(self, model, x, y):
        total, count = 0.0, 0
        for i in range(0, x.shape[0], 256):
            xb, yb = x[i:i + 256], y[i:i + 256]
            total += F.cross_entropy(model(xb).flatten(0, 1), yb.flatten(),
                                     reduction="sum").item()
            count += yb.numel()
        loss = total / count
        return {"loss": loss, "bits_per_byte": loss / math.log(2)}
