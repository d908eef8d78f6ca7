"""Shared fixtures: one real local Ray + Serve (gRPC proxy on a free loopback port) for the whole
session and a tiny real DiffusionGemma checkpoint (helpers live in serving_testlib.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dgserve.serving import local


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dgserve.engine.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-diffusiongemma") / "model", seed=0)


@pytest.fixture(scope="session")
def serve_port() -> Iterator[int]:
    """Starts Ray (temp dir in the state dir, auth off) and Serve with our gRPC servicers, once."""
    port = local.free_port()
    local.start_ray(num_cpus=4)
    try:
        local.start_serve(port)
        yield port
    finally:
        local.shutdown()
