"""The Serve application: ``build_app(config) -> Application`` and the import-path entrypoint.

``dgserve.serving.app:app_builder`` is what a Serve config (KubeRay ``serveConfigV2``) names as
``import_path``; its ``args`` are an :class:`~dgserve.serving.config.AppConfig` as a mapping. The
Serve-wide ``grpc_options`` come from :meth:`AppConfig.serve_grpc_options`.

Deployments: ``Router`` (ingress) -> ``DiffusionReplica`` (batch cap = ``max_ongoing_requests``;
with tensor parallelism a STRICT_PACK placement group of one bundle per rank) and
``AutoregressiveFallback``.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from .config import AppConfig, _ReplicaSet
from .diffusion import DEFAULT_ENGINE_FACTORY, DiffusionReplica
from .fallback import AutoregressiveFallback
from .router import Router

ROUTER_SLACK = 64  # router concurrency beyond slots + queue: health checks, info calls, requests being refused


def _replica_options(rs: _ReplicaSet) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "ray_actor_options": rs.actor_options.to_ray(),
        "health_check_period_s": rs.health_check_period_s,
        "health_check_timeout_s": rs.health_check_timeout_s,
        "graceful_shutdown_timeout_s": rs.graceful_shutdown_timeout_s,
        "max_constructor_retry_count": rs.max_constructor_retry_count,
    }
    if rs.autoscaling is not None:
        opts["autoscaling_config"] = rs.autoscaling.to_serve()
    else:
        opts["num_replicas"] = rs.num_replicas
    return opts


def _max_replicas(rs: _ReplicaSet) -> int:
    return rs.autoscaling.max_replicas if rs.autoscaling is not None else rs.num_replicas


def diffusion_options(cfg: AppConfig) -> dict[str, Any]:
    d = cfg.diffusion
    opts = _replica_options(d) | {"name": "DiffusionReplica", "max_ongoing_requests": d.max_batch}
    tp = d.tensor_parallel_size
    if tp > 1:
        actor = d.actor_options
        first = {"CPU": actor.num_cpus, **({"GPU": actor.num_gpus} if actor.num_gpus else {}), **actor.resources}
        if actor.memory_bytes:
            first["memory"] = actor.memory_bytes
        rank = {"CPU": d.rank_num_cpus, **({"GPU": actor.num_gpus} if actor.num_gpus else {})}
        opts["placement_group_bundles"] = [first] + [dict(rank) for _ in range(tp - 1)]
        opts["placement_group_strategy"] = "STRICT_PACK"
    return opts


def fallback_options(cfg: AppConfig) -> dict[str, Any]:
    f = cfg.fallback
    return _replica_options(f) | {"name": "AutoregressiveFallback", "max_ongoing_requests": f.max_batch}


def router_options(cfg: AppConfig) -> dict[str, Any]:
    r = cfg.router
    slots = cfg.diffusion.max_batch * _max_replicas(cfg.diffusion)
    if cfg.fallback.enabled:
        slots += cfg.fallback.max_batch * _max_replicas(cfg.fallback)
    return {"name": "Router", "num_replicas": r.num_replicas, "ray_actor_options": r.actor_options.to_ray(),
            "max_ongoing_requests": slots + r.queue_size + ROUTER_SLACK,
            "health_check_period_s": r.health_check_period_s}


def build_app(config: AppConfig, *, engine_factory: str = DEFAULT_ENGINE_FACTORY) -> Application:
    """Bind the deployments of one dgserve application (``engine_factory``: ``"module:callable"``
    building the diffusion engine from an EngineConfig)."""
    payload = config.model_dump(mode="json")
    diffusion = serve.deployment(DiffusionReplica).options(**diffusion_options(config)).bind(payload, engine_factory)
    fallback = None
    if config.fallback.enabled:
        fallback = serve.deployment(AutoregressiveFallback).options(**fallback_options(config)).bind(payload)
    return serve.deployment(Router).options(**router_options(config)).bind(payload, diffusion, fallback)


def app_builder(args: dict[str, Any]) -> Application:
    """Serve import-path entrypoint: ``import_path: dgserve.serving.app:app_builder``, ``args: AppConfig``."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    return build_app(config)
