"""``dgserve check-context``: can this model serve that context, without loading weights?"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig
from .context import ContextReport, kv_budget_bytes, verify_context
from .engine import resolve_device, resolve_dtype


def check_context(model: str | Path, *, context: int, max_batch: int = 8, kv_cache_memory_bytes: int | None = None,
                  dtype: str = "auto", device: str = "auto", gpu_memory_utilization: float = 0.9,
                  prefill_chunk_size: int = 2048) -> ContextReport:
    """Raises ContextVerificationError (or ModelLoadError) with the reason when it cannot."""
    cfg = ModelConfig.from_dir(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, cfg, dev)
    budget = kv_budget_bytes(dev, kv_cache_memory_bytes, gpu_memory_utilization)
    if kv_cache_memory_bytes is None and dev.type == "cuda":  # the weights are not loaded yet
        weights = sum(f.stat().st_size for f in Path(model).glob("*.safetensors"))
        budget = max(0, budget - int(weights * gpu_memory_utilization))
    return verify_context(cfg, requested=context, max_batch=max_batch, chunk_tokens=prefill_chunk_size,
                          dtype_bytes=torch.finfo(dt).bits // 8, kv_budget=budget)
