"""The exact KV cache: preallocated, one slot per in-flight request.

Why preallocated slots rather than pages: the batch is at most 8 requests, so a slot per
request wastes little, and it gives the start-up check an exact bound (``max_batch`` slots
of ``context_length`` tokens either fit in the budget or they don't: nothing is admitted
that could later run out of KV memory mid-generation). Contiguous slots also keep the
attention call a plain SDPA over a slice, with no block tables on the CPU.

Layout per layer: ``(max_batch, kv_heads, capacity, head_dim)`` for K and for V.

* Full-attention layers hold every position: capacity = context_length + canvas_length
  (the canvas being denoised sits after the committed tokens as scratch: the decoder pass
  writes its K/V there, reads them, and the commit pass overwrites them with the encoder's).
* Sliding layers hold only what a window can see: the last ``window - 1`` committed
  tokens plus room for one forward's new tokens (prefill chunk or commit) and a canvas.
  When a slot runs out of room, its last ``window - 1`` entries move to the front
  (a copy of at most window-1 rows, amortised over a chunk), so reads stay contiguous.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, max_batch: int, context_length: int, chunk_tokens: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.cfg = cfg
        self.max_batch = max_batch
        self.context_length = context_length
        self.window = cfg.sliding_window
        self.full_capacity = context_length + cfg.canvas_length
        self.sliding_capacity = min(self.full_capacity, self.window - 1 + chunk_tokens + cfg.canvas_length)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for spec in cfg.layers:
            cap = self.sliding_capacity if spec.sliding else self.full_capacity
            shape = (max_batch, spec.num_kv_heads, cap, spec.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
        self.sliding_layers = [i for i, s in enumerate(cfg.layers) if s.sliding]
        # absolute position stored at index 0 of each slot's sliding buffers
        self.sliding_start = [0] * max_batch

    @staticmethod
    def plan_bytes(cfg: ModelConfig, max_batch: int, context_length: int, chunk_tokens: int,
                   dtype_bytes: int) -> int:
        """Bytes the cache will allocate, from the config alone (used before allocating)."""
        full_cap = context_length + cfg.canvas_length
        sliding_cap = min(full_cap, cfg.sliding_window - 1 + chunk_tokens + cfg.canvas_length)
        per_slot = (cfg.kv_bytes_per_token(dtype_bytes) * full_cap
                    + cfg.sliding_bytes_per_token(dtype_bytes) * sliding_cap)
        return max_batch * per_slot

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reset_slot(self, slot: int) -> None:
        self.sliding_start[slot] = 0

    def reserve(self, slot: int, cache_len: int, n_tokens: int) -> None:
        """Make room in the slot's sliding buffers for ``n_tokens`` written at ``cache_len``."""
        if cache_len + n_tokens > self.full_capacity:
            raise RuntimeError(f"slot {slot}: {cache_len}+{n_tokens} tokens exceed capacity {self.full_capacity}")
        s0 = self.sliding_start[slot]
        if cache_len - s0 + n_tokens <= self.sliding_capacity:
            return
        keep = min(cache_len - s0, self.window - 1)
        if keep + n_tokens > self.sliding_capacity:
            raise RuntimeError(f"slot {slot}: {n_tokens} tokens in one forward exceed the sliding buffer "
                               f"({self.sliding_capacity} = window-1 + chunk + canvas)")
        src = cache_len - s0 - keep
        for i in self.sliding_layers:
            for buf in (self.k[i], self.v[i]):
                buf[slot, :, :keep] = buf[slot, :, src:src + keep].clone()
        self.sliding_start[slot] = cache_len - keep

    def index(self, layer: int, slot: int, pos: int) -> int:
        """Buffer index of absolute position ``pos`` in ``layer`` for ``slot``."""
        return pos - self.sliding_start[slot] if self.cfg.layers[layer].sliding else pos

    def write(self, layer: int, slot: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (n, kv_heads, head_dim) for absolute positions pos..pos+n-1."""
        i = self.index(layer, slot, pos)
        n = k.shape[0]
        self.k[layer][slot, :, i:i + n] = k.transpose(0, 1)  # (H, n, D)
        self.v[layer][slot, :, i:i + n] = v.transpose(0, 1)

    def read(self, layer: int, slot: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V for absolute positions lo..hi-1: (1, kv_heads, hi-lo, head_dim) views."""
        a, b = self.index(layer, slot, lo), self.index(layer, slot, hi)
        return self.k[layer][slot:slot + 1, :, a:b], self.v[layer][slot:slot + 1, :, a:b]
