"""Who holds what under tensor parallelism, and whether a model can be split that way.

* Attention: query heads split evenly. Key/value heads split evenly when there are at least
  as many as ranks; otherwise each KV head is *replicated* on the ``size // num_kv_heads``
  ranks whose query heads use it (DiffusionGemma's full-attention layers have 2 KV heads,
  so at TP=4 or 8 each rank holds one of them).
* Dense MLP, expert MLPs: the intermediate features split evenly.
* Embedding / tied lm_head: the vocabulary rows split evenly.
"""

from __future__ import annotations

from dataclasses import replace

from ..config import ModelConfig
from ..errors import ConfigError

MAX_CPU_RANKS = 8  # gloo ranks are processes (CI, tests): cores may be shared, up to the config's limit


def head_shard(num_heads: int, rank: int, size: int) -> slice:
    per = num_heads // size
    return slice(rank * per, (rank + 1) * per)


def kv_head_shard(num_kv_heads: int, rank: int, size: int) -> slice:
    """KV heads of ``rank``: an even share, or the one head its query heads use (replicated)."""
    if num_kv_heads % size == 0:
        return head_shard(num_kv_heads, rank, size)
    head = rank // (size // num_kv_heads)  # query heads [rank*Hq/size, ...) all map to this KV head
    return slice(head, head + 1)


def shard_config(cfg: ModelConfig, size: int) -> ModelConfig:
    """The per-rank shapes: what one rank's KV cache holds (context verification, KV cache)."""
    layers = tuple(replace(ls, num_kv_heads=max(ls.num_kv_heads // size, 1)) for ls in cfg.layers)
    return replace(cfg, num_heads=cfg.num_heads // size, layers=layers)


def check_tensor_parallel(cfg: ModelConfig, size: int, *, devices: int, device_kind: str) -> None:
    """Refuse a ``tensor_parallel_size`` that cannot work, naming the value and the limit."""
    problems = []
    if size < 1 or size & (size - 1):
        problems.append("it must be a power of two (1, 2, 4, 8)")
    elif size > devices:
        problems.append(f"only {devices} {device_kind} visible")
    else:
        if cfg.num_heads % size:
            problems.append(f"it does not divide num_attention_heads {cfg.num_heads}")
        for kv in sorted({ls.num_kv_heads for ls in cfg.layers}):
            if kv % size and size % kv:
                problems.append(f"{kv} key/value heads can be neither split nor replicated over {size} ranks")
        sizes = {"vocab_size": cfg.vocab_size, "intermediate_size": cfg.intermediate_size}
        if cfg.is_moe:
            sizes["moe_intermediate_size"] = cfg.moe_intermediate_size
        problems += [f"it does not divide {name} {n}" for name, n in sizes.items() if n % size]
    if problems:
        raise ConfigError(f"tensor_parallel_size {size} is not usable: " + "; ".join(problems))
