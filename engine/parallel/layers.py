"""Tensor-parallel building blocks (nano-vllm ``layers/linear.py``, gpt-fast ``tp.py``).

Each layer holds only its rank's shard and knows how to cut that shard out of the
checkpoint tensor while loading (``load_shard(param, safetensors_slice)``), so no rank ever
materialises a full weight. Without a group (``tp=None``) every layer is the plain
single-device layer, computing exactly what ``nn.Linear`` / ``nn.Embedding`` compute.

* ``ColumnParallelLinear``: this rank's rows of W (output features); no communication.
* ``RowParallelLinear``: this rank's columns of W (input features); one all-reduce.
* ``VocabParallelEmbedding``: this rank's vocabulary rows of the tied embedding; lookup
  (one all-reduce), logits (one all-gather: the sampler needs whole rows) and the
  self-conditioning product ``probs @ E`` (one all-reduce).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .group import TPGroup


def _span(s: slice) -> int:
    return s.stop - s.start


class ColumnParallelLinear(nn.Module):
    """y = x W[rows]^T: the output features ``rows`` of an (out, in) weight."""

    def __init__(self, in_features: int, out_features: int, rows: slice | None = None) -> None:
        super().__init__()
        self.rows = rows if rows is not None else slice(0, out_features)
        self.weight = nn.Parameter(torch.empty(_span(self.rows), in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def load_shard(self, name: str, sl) -> torch.Tensor:
        return sl[self.rows]


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W[:, cols_r]^T; ``x`` is this rank's ``cols`` of the input."""

    def __init__(self, in_features: int, out_features: int, cols: slice | None = None,
                 tp: TPGroup | None = None) -> None:
        super().__init__()
        self.cols = cols if cols is not None else slice(0, in_features)
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, _span(self.cols)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        return y if self.tp is None else self.tp.all_reduce(y)

    def load_shard(self, name: str, sl) -> torch.Tensor:
        return sl[:, self.cols]


class VocabParallelEmbedding(nn.Module):
    """The tied embedding / lm_head, rows ``vocab`` of (V, H) on this rank."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.vocab = tp.shard(vocab_size) if tp is not None else slice(0, vocab_size)
        self.weight = nn.Parameter(torch.empty(_span(self.vocab), hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(N,) ids -> (N, H) rows; each id is found on exactly one rank, the others add zeros."""
        if self.tp is None:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab.start
        outside = (local < 0) | (local >= self.weight.shape[0])  # (N,)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # (N, H)
        return self.tp.all_reduce(x.masked_fill_(outside[:, None], 0))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(R, H) -> (R, V) in the weight dtype, whole rows on every rank."""
        y = F.linear(h, self.weight)  # (R, V/size)
        return y if self.tp is None else self.tp.all_gather(y)

    def weighted_sum(self, probs: torch.Tensor) -> torch.Tensor:
        """(M, V) weights over the vocabulary -> (M, H) = probs @ E, each rank its own rows."""
        w = self.weight
        if self.tp is None:
            return probs.to(w.dtype) @ w
        return self.tp.all_reduce(probs[:, self.vocab].to(w.dtype) @ w)

    def load_shard(self, name: str, sl) -> torch.Tensor:
        return sl[self.vocab]
