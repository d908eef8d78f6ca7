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


def test_default_diffusion_model_is_the_bundled_sudoku_checkpoint(tmp_path, monkeypatch):
    """The local mode serves the trained Sudoku checkpoint shipped in the package, at the promised
    context; ``diffusion="tiny"`` keeps the tiny random checkpoint (written into the state dir)."""
    from dgserve.engine.check import check_context
    from dgserve.engine.sudoku.solve import default_checkpoint

    monkeypatch.setenv("DGSERVE_STATE_DIR", str(tmp_path))
    cfg = local.default_config(9000)
    assert cfg.diffusion.engine.model == str(default_checkpoint())
    assert cfg.diffusion.engine.model_name == local.SUDOKU_MODEL_NAME
    check_context(cfg.diffusion.engine.model, context=cfg.promised_context_length,
                  max_batch=cfg.diffusion.engine.max_batch, device="cpu")  # raises when it could not start
    tiny = local.default_config(9000, "tiny")
    assert tiny.diffusion.engine.model == str(tmp_path / "models" / "tiny-diffusiongemma")
    assert (tmp_path / "models" / "tiny-diffusiongemma" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="'huge'"):
        local.default_config(9000, "huge")
