"""A refused start-up is traced: on the session's real local Ray Serve, a diffusion replica that serves
less context than promised exports its ``dgserve.verify_context`` error span (flushed before the
replica fails) to a real OTLP/gRPC receiver started here."""

from __future__ import annotations

import pytest

from dgserve.serving import local, telemetry
from dgserve.serving.otlp_receiver import Receiver

from serving_testlib import app_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_refused_context_is_an_error_span_naming_the_binding_limit(tiny_model, serve_port):
    from ray import serve

    with Receiver() as receiver:
        # the tiny checkpoint has max_position_embeddings 4096
        cfg = app_config(tiny_model, serve_port, name="dgserve-refused", promised_context_length=8192,
                         fallback={"enabled": False}, telemetry={"otlp_endpoint": receiver.endpoint,
                                                                 "sampling_ratio": 0.0})
        try:
            with pytest.raises(local.DeployError):
                local.deploy(cfg)
        finally:
            serve.delete(cfg.name)
        span = receiver.wait_for(lambda spans: next(
            (s for s in spans if s.name == telemetry.STARTUP_SPAN and s.attributes["dgserve.component"] == "diffusion"),
            None), timeout_s=30)
    a = span.attributes
    assert a["dgserve.context.verified"] is False and span.status_code == 2  # ERROR
    assert a["dgserve.context.promised"] == 8192 and a["dgserve.context.served"] == 4096
    assert a["dgserve.context.binding_limit"] == "max_position_embeddings"
    assert "promised 8192" in span.status_message and "exception" in span.events
