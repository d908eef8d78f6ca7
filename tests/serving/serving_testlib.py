"""Helpers of the serving tests: a small app config and deploying it on the session's Serve."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dgserve.serving import local
from dgserve.serving.client import Client
from dgserve.serving.config import AppConfig

# Keep every replica on a fractional CPU: the machine has 2 cores shared by everyone.
CPU = {"num_cpus": 0.1}


def app_config(tiny_model: Path, port: int, **sections: Any) -> AppConfig:
    """A small app: tiny diffusion model, SmolLM2 fallback with tiny outputs; ``sections`` override."""
    base: dict[str, Any] = {
        "promised_context_length": 2048,
        "diffusion": {"engine": {"model": str(tiny_model), "max_batch": 4, "device": "cpu"},
                      "actor_options": CPU, "health_check_period_s": 2.0, "max_constructor_retry_count": 1},
        "fallback": {"kind": "smollm2", "max_batch": 16, "context_length": 2048, "default_max_new_tokens": 16,
                     "actor_options": CPU, "max_constructor_retry_count": 1},
        "router": {"grpc_port": port, "queue_size": 8, "queue_timeout_s": 30.0, "capacity_refresh_s": 0.25,
                   "actor_options": CPU},
    }
    for key, value in sections.items():
        base[key] = _merge(base.get(key), value)
    return AppConfig.model_validate(base)


def _merge(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {**a, **{k: _merge(a.get(k), v) for k, v in b.items()}}
    return b


@contextlib.contextmanager
def deployed(config: AppConfig) -> Iterator[Client]:
    """Deploy ``config`` on the session's Serve, wait for health SERVING, yield a client; delete after."""
    from ray import serve

    try:
        local.deploy(config)
        target = f"127.0.0.1:{config.router.grpc_port}"
        local.wait_healthy(target, timeout_s=60)
        with Client(target) as client:
            yield client
    finally:
        serve.delete(config.name)
