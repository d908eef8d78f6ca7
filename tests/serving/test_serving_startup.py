"""Start-up and failure behaviour on a real local Ray Serve: the promised context is verified before
the app becomes healthy, and health turns NOT_SERVING when the engine dies (then recovers when Serve
replaces the replica)."""

from __future__ import annotations

import time

import pytest
from serving_testlib import app_config, deployed

from dgserve.serving import local

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _wait_health(client, want: str, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if client.health(timeout=2.0) == want:
                return time.monotonic() - start
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError(f"health did not become {want} within {timeout_s}s")


def _refused(cfg) -> str:
    from ray import serve

    try:
        with pytest.raises(local.DeployError) as err:
            local.deploy(cfg)
    finally:
        serve.delete(cfg.name)
    return str(err.value)


def test_diffusion_serving_less_than_promised_refuses_to_start(tiny_model, serve_port):
    # the tiny checkpoint has max_position_embeddings 4096
    msg = _refused(app_config(tiny_model, serve_port, promised_context_length=8192, fallback={"enabled": False}))
    assert "backend 'diffusion'" in msg and "4096" in msg and "promised 8192" in msg, msg
    assert "Traceback" not in msg


def test_fallback_serving_less_than_promised_refuses_to_start(tmp_path, serve_port):
    from dgserve.engine.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "long", max_position_embeddings=32768)
    # SmolLM2-135M-Instruct serves 8192 tokens
    msg = _refused(app_config(model, serve_port, promised_context_length=16384, fallback={"context_length": None}))
    assert "backend 'fallback'" in msg and "SmolLM2" in msg and "8192" in msg and "promised 16384" in msg, msg
    assert "DiffusionReplica" not in msg  # the diffusion backend serves 16384


def test_health_turns_not_serving_when_the_engine_dies(tiny_model, serve_port):
    from ray import serve

    cfg = app_config(tiny_model, serve_port, fallback={"enabled": False},
                     diffusion={"num_replicas": 1, "health_check_period_s": 1.0, "health_check_timeout_s": 5.0})
    from concurrent.futures import ThreadPoolExecutor

    from dgserve.serving.client import make_request

    with deployed(cfg) as client, ThreadPoolExecutor(1) as pool:
        assert client.health() == "SERVING"
        before = client.generate(make_request("before", max_new_tokens=8))
        serve.get_deployment_handle("DiffusionReplica", cfg.name).shutdown_engine.remote().result(timeout_s=30)
        # sent at once: it reaches the dead engine (retried) or waits for a slot; either way it is not lost
        during = pool.submit(client.generate, make_request("during", max_new_tokens=8, routing="diffusion"), 90)
        _wait_health(client, "NOT_SERVING", timeout_s=10)
        # Serve's own health check replaces the replica; the app serves again
        _wait_health(client, "SERVING", timeout_s=90)
        after = during.result(timeout=90)
        assert after.replica != before.replica and after.usage.completion_tokens > 0


def test_tensor_parallel_replica_runs_its_ranks_in_its_placement_group(tiny_model, serve_port):
    """TP=2 on CPU (gloo): the replica reserves a STRICT_PACK group of 2 bundles and the engine starts its
    follower rank in bundle 1."""
    from dgserve.serving.client import make_request
    from dgserve.v1 import dgserve_pb2 as pb

    cfg = app_config(tiny_model, serve_port, fallback={"enabled": False},
                     diffusion={"num_replicas": 1, "rank_num_cpus": 0.1, "engine": {"tensor_parallel_size": 2}})
    with deployed(cfg) as client:
        (backend,) = client.info().backends
        assert backend.tensor_parallel_size == 2
        r = client.generate(make_request("hello", max_new_tokens=40, seed=2))
        assert r.backend == pb.BACKEND_DIFFUSION and r.usage.completion_tokens > 0
        import ray

        groups = [pg for pg in ray.util.placement_group_table().values()
                  if pg["state"] == "CREATED" and pg["strategy"] == "STRICT_PACK" and len(pg["bundles"]) == 2]
        assert len(groups) == 1, ray.util.placement_group_table()
