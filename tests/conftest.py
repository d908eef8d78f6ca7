"""Fixtures shared by every test area."""

from __future__ import annotations

import pytest

from dgserve.operator.tools import ToolUnavailableError, ensure_tool


@pytest.fixture(scope="session")
def helm() -> str:
    """The real helm binary (the set-up installs it; see docs in dgserve.operator.tools)."""
    try:
        return str(ensure_tool("helm"))
    except ToolUnavailableError as e:
        pytest.fail(f"helm is part of the test set-up (make venv installs it): {e}")
