"""The Serve application the builder binds (no cluster needed): caps, replicas, placement groups."""

from __future__ import annotations

from ray.serve import Application
from ray.serve._private.utils import import_attr

from dgserve.serving.app import build_app, diffusion_options, fallback_options, router_options
from dgserve.serving.config import IMPORT_PATH, AppConfig


def cfg(**diffusion) -> AppConfig:
    return AppConfig.model_validate({"promised_context_length": 4096,
                                     "diffusion": {"engine": {"model": "/m", "max_batch": 4}, **diffusion},
                                     "fallback": {"max_batch": 16, "num_replicas": 2}})


def test_batch_cap_is_max_ongoing_requests():
    c = cfg(num_replicas=3)
    d = diffusion_options(c)
    assert d["max_ongoing_requests"] == 4 and d["num_replicas"] == 3 and "placement_group_bundles" not in d
    assert d["ray_actor_options"]["num_cpus"] == 0.25
    assert fallback_options(c)["max_ongoing_requests"] == 16
    # the router itself never limits: slots of every backend + its queue + slack
    assert router_options(c)["max_ongoing_requests"] >= 3 * 4 + 2 * 16 + c.router.queue_size


def test_autoscaling_is_rendered_for_serve():
    d = diffusion_options(cfg(autoscaling={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3}))
    assert "num_replicas" not in d
    assert d["autoscaling_config"]["max_replicas"] == 4 and d["autoscaling_config"]["target_ongoing_requests"] == 3


def test_tensor_parallel_reserves_a_strict_pack_group_of_gpu_bundles():
    c = AppConfig.model_validate({
        "promised_context_length": 4096,
        "diffusion": {"engine": {"model": "/m", "tensor_parallel_size": 4},
                      "actor_options": {"num_cpus": 1, "num_gpus": 1, "resources": {"dgserve_diffusion": 1}},
                      "rank_num_cpus": 0.5}})
    d = diffusion_options(c)
    assert d["placement_group_strategy"] == "STRICT_PACK"
    assert d["placement_group_bundles"] == [{"CPU": 1, "GPU": 1, "dgserve_diffusion": 1}] + [{"CPU": 0.5, "GPU": 1}] * 3


def test_import_path_builder_takes_the_args_mapping():
    builder = import_attr(IMPORT_PATH.replace(":", "."))
    app = builder(cfg().model_dump(mode="json"))
    assert isinstance(app, Application)
    assert isinstance(build_app(cfg()), Application)


class _RecordingEngine:
    """Records how the replica builds its engine (a double for the constructor call only)."""

    calls: list[dict] = []

    def __init__(self, config, **kwargs):
        type(self).calls.append({"config": config, **kwargs})
        raise RuntimeError("recorded")


def test_replica_hands_its_placement_group_to_the_engine(monkeypatch):
    import sys

    import pytest
    import ray.util

    from dgserve.serving.diffusion import DiffusionReplica

    sentinel = object()
    monkeypatch.setattr(ray.util, "get_current_placement_group", lambda: sentinel)
    monkeypatch.setitem(sys.modules, "recording_engine", type(sys)("recording_engine"))
    sys.modules["recording_engine"].Engine = _RecordingEngine
    _RecordingEngine.calls = []
    c = AppConfig.model_validate({"promised_context_length": 4096,
                                  "diffusion": {"engine": {"model": "/m", "tensor_parallel_size": 2}}})
    with pytest.raises(RuntimeError, match="recorded"):
        DiffusionReplica(c.model_dump(mode="json"), "recording_engine:Engine")
    (call,) = _RecordingEngine.calls
    assert call["placement_group"] is sentinel and call["config"].context_length == 4096
