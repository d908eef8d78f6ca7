"""Where dgserve keeps state on a machine (Ray temp dir, generated tiny models, logs)."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """``$DGSERVE_STATE_DIR`` or ``./.dgserve``; created on first use."""
    path = Path(os.environ.get("DGSERVE_STATE_DIR") or Path.cwd() / ".dgserve").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
