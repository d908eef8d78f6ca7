"""Local-mode helpers that need no Ray: Ray's temp dir placement and failure-message extraction."""

from __future__ import annotations

import pytest

from dgserve.serving import local


def test_ray_temp_dir_lives_in_the_state_dir_unless_too_long_for_unix_sockets(tmp_path, monkeypatch):
    short = tmp_path / "s"
    monkeypatch.setenv("DGSERVE_STATE_DIR", "/tmp/dgs-test-state")
    assert local.ray_temp_dir() == local.state_dir() / "ray"
    monkeypatch.setenv("DGSERVE_STATE_DIR", str(short / ("x" * 80)))
    path = local.ray_temp_dir()
    assert len(str(path)) <= 40 and path.is_dir() and path.name.startswith("dgserve-ray-")


@pytest.mark.parametrize("message, expected", [
    ("The deployment failed to start 1 times in a row. Error:\nTraceback (most recent call last):\n  File \"x.py\"\n"
     "dgserve.engine.errors.ContextVerificationError: backend 'diffusion' serves 4096, promised 8192",
     "ContextVerificationError: backend 'diffusion' serves 4096, promised 8192"),
    ("plain message", "plain message"),
])
def test_failure_message_keeps_only_the_error_line(message, expected):
    assert local._last_error_line(message) == expected
