"""``dgserve serve`` as a user runs it: a subprocess with its own Ray, a YAML config, the gRPC API on a
loopback port, ``dgserve generate --server`` as the client, and Ctrl-C (SIGINT) shutting it down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dgserve.serving.local import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
DGSERVE = [sys.executable, "-m", "dgserve.cli"]


def test_serve_generate_and_ctrl_c(tiny_model: Path, tmp_path: Path):
    port = free_port()
    cfg = tmp_path / "app.yaml"
    cfg.write_text(f"""
promised_context_length: 1024
diffusion:
  engine: {{model: "{tiny_model}", max_batch: 2, device: cpu}}
  actor_options: {{num_cpus: 0.1}}
fallback: {{enabled: false}}
router: {{actor_options: {{num_cpus: 0.1}}}}
security: {{allow_plaintext: true}}
""")
    env = {**os.environ, "DGSERVE_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen([*DGSERVE, "serve", "--config", str(cfg), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 150
        while "serving dgserve.v1" not in line:
            assert proc.poll() is None, f"serve exited early: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "serve did not come up"
            line = proc.stdout.readline()
        assert f"127.0.0.1:{port}" in line
        out = subprocess.run([*DGSERVE, "generate", "--server", f"127.0.0.1:{port}", "--prompt", "hi",
                              "--max-new-tokens", "40", "--stream"], env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert "backend=diffusion" in out.stderr and "tokens=" in out.stderr
        bad = subprocess.run([*DGSERVE, "generate", "--server", f"127.0.0.1:{port}", "--prompt", "x " * 1100,
                              "--max-new-tokens", "8"], env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "OUT_OF_RANGE" in bad.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
