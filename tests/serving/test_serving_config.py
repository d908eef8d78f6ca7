"""The app config contract (the operator renders exactly this model into serveConfigV2)."""

from __future__ import annotations

import typing

import pytest
from pydantic import BaseModel, ValidationError

from dgserve.serving.config import IMPORT_PATH, AppConfig

MINIMAL = """
promised_context_length: 2048
diffusion:
  engine: {model: /models/dg, max_batch: 4}
"""


def _models(model: type[BaseModel], prefix: str = ""):
    yield prefix, model
    for name, field in model.model_fields.items():
        for arg in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield from _models(arg, f"{prefix}{name}.")


def test_every_field_is_described_and_extra_is_forbidden():
    for prefix, model in _models(AppConfig):
        assert model.model_config.get("extra") == "forbid", prefix or "AppConfig"
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"


def test_yaml_round_trip_and_serve_config():
    cfg = AppConfig.from_yaml_text(MINIMAL)
    assert AppConfig.from_yaml_text(cfg.to_yaml()) == cfg
    doc = cfg.serve_config()
    (app,) = doc["applications"]
    assert app["import_path"] == IMPORT_PATH == "dgserve.serving.app:app_builder"
    assert AppConfig.model_validate(app["args"]) == cfg
    assert doc["grpc_options"]["port"] == 9000
    assert any("add_HealthServicer_to_server" in f for f in doc["grpc_options"]["grpc_servicer_functions"])


def test_engine_is_asked_for_the_promised_context():
    cfg = AppConfig.from_yaml_text(MINIMAL)
    assert cfg.diffusion.max_batch == 4
    assert cfg.engine_config().context_length == 2048


@pytest.mark.parametrize("patch, match", [
    ({"bogus": 1}, "bogus"),
    ({"diffusion": {"engine": {"model": "m", "context_length": 1024}}}, "below promised_context_length 2048"),
    ({"fallback": {"context_length": 100}}, "fallback.context_length 100 is below"),
    ({"fallback": {"kind": "openai"}}, "needs fallback.url"),
    ({"fallback": {"kind": "local"}}, "needs fallback.model_path"),
    ({"diffusion": {"engine": {"model": "m", "max_batch": 9}}}, "max_batch"),
    ({"diffusion": {"engine": {"model": "m"}, "autoscaling": {"min_replicas": 0, "max_replicas": 2}}},
     "min_replicas must be at least 1"),
    ({"router": {"grpc_port": 0}}, "grpc_port"),
])
def test_bad_configs_are_refused_with_the_offending_value(patch, match):
    data = {"promised_context_length": 2048, "diffusion": {"engine": {"model": "m"}}} | patch
    with pytest.raises(ValidationError, match=match):
        AppConfig.model_validate(data)
