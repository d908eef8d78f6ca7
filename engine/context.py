"""Start-up verification of the context length the engine can really serve.

A managed endpoint once shipped DiffusionGemma with 8,192 tokens of context instead of
256K. Here the engine refuses to start when it cannot hold what it was asked to, and
says which limit binds: the config's ``max_position_embeddings``, the RoPE settings
(``original_max_position_embeddings``, times the factor of an extension method), or the
KV memory for ``max_batch`` sequences of that length.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .errors import ContextVerificationError
from .kv_cache import KVCache


@dataclass(frozen=True)
class ContextReport:
    requested: int | None
    served: int  # the largest context every one of max_batch slots can hold
    limits: dict[str, int]  # limit name -> tokens
    cause: str  # the binding limit
    kv_bytes_per_token: int
    kv_budget_bytes: int

    def describe(self) -> str:
        parts = ", ".join(f"{k}={v}" for k, v in self.limits.items())
        return f"serves {self.served} tokens (limits: {parts}; binding: {self.cause})"


def kv_budget_bytes(device: torch.device, explicit: int | None, gpu_utilization: float) -> int:
    """KV cache budget: explicit, or a share of free GPU memory, or 25% of RAM on CPU."""
    if explicit is not None:
        return explicit
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * gpu_utilization)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.25)


def verify_context(cfg: ModelConfig, *, requested: int | None, max_batch: int, chunk_tokens: int,
                   dtype_bytes: int, kv_budget: int) -> ContextReport:
    """Returns what can be served; raises ContextVerificationError if ``requested`` cannot be."""
    limits = {"max_position_embeddings": cfg.max_position_embeddings}
    if cfg.rope_context_limit is not None:
        limits["rope"] = cfg.rope_context_limit
    per_slot = kv_budget // max_batch
    full_bpt = cfg.kv_bytes_per_token(dtype_bytes)
    sliding_fixed = cfg.sliding_bytes_per_token(dtype_bytes) * (cfg.sliding_window - 1 + chunk_tokens
                                                                + cfg.canvas_length)
    kv_tokens = (per_slot - sliding_fixed) // full_bpt - cfg.canvas_length if full_bpt else 1 << 62
    limits["kv_memory"] = max(int(kv_tokens), 0)
    cause = min(limits, key=lambda k: limits[k])
    served = limits[cause]
    report = ContextReport(requested, served, limits, cause, full_bpt, kv_budget)
    if requested is not None and requested > served:
        why = {
            "max_position_embeddings": f"config.json max_position_embeddings is {served}",
            "rope": f"the RoPE settings cover {served} positions (original_max_position_embeddings)",
            "kv_memory": (f"KV memory for max_batch={max_batch} sequences holds {served} tokens each "
                          f"(budget {kv_budget / 2**30:.2f} GiB, {full_bpt} bytes/token on full-attention layers)"),
        }[cause]
        raise ContextVerificationError(
            f"cannot serve context_length={requested}: it serves at most {served} tokens because {why}",
            requested=requested, served=served, cause=cause)
    if served < 1:
        raise ContextVerificationError(
            f"cannot serve any context: {report.describe()}", requested=requested or 0, served=served, cause=cause)
    return report


def planned_kv_bytes(cfg: ModelConfig, max_batch: int, context: int, chunk_tokens: int, dtype_bytes: int) -> int:
    return KVCache.plan_bytes(cfg, max_batch, context, chunk_tokens, dtype_bytes)
