"""``within_deadline``: how a backend stops a request at the deadline it carries (pure asyncio, no Ray)."""

from __future__ import annotations

import asyncio
import time

import pytest

from dgserve.serving.errors import failure_code_name
from dgserve.serving.messages import BackendDeadlineExceeded, BackendRequest, within_deadline


class _Source:
    """An async generator like the engine's stream: one item every ``every_s``; its ``finally`` is where a
    real backend aborts the request and frees the slot."""

    def __init__(self, n: int, every_s: float):
        self.n, self.every_s, self.aborted, self.sent = n, every_s, False, 0

    async def stream(self):
        finished = False
        try:
            for i in range(self.n):
                await asyncio.sleep(self.every_s)
                self.sent += 1
                yield i
            finished = True
        finally:
            self.aborted = not finished


async def _drain(source: _Source, timeout_s: float | None):
    got, stream = [], source.stream()
    try:
        async for item in within_deadline(stream, BackendRequest("r1", prompt="x", timeout_s=timeout_s)):
            got.append(item)
    finally:
        await stream.aclose()  # as the replicas do
    return got


def test_no_deadline_passes_everything_through():
    source = _Source(5, 0.001)
    assert asyncio.run(_drain(source, None)) == [0, 1, 2, 3, 4] and not source.aborted


def test_a_deadline_that_is_not_reached_changes_nothing():
    source = _Source(3, 0.001)
    assert asyncio.run(_drain(source, 30.0)) == [0, 1, 2] and not source.aborted


def test_the_deadline_stops_the_stream_there_and_aborts_the_request():
    source = _Source(1000, 0.05)
    t0 = time.monotonic()
    with pytest.raises(BackendDeadlineExceeded, match=r"request r1 reached its deadline \(0\.300 s") as e:
        asyncio.run(_drain(source, 0.3))
    took = time.monotonic() - t0
    assert 0.25 < took < 2.0 and source.aborted and 2 <= source.sent <= 7
    assert failure_code_name(e.value)[0] == "DEADLINE_EXCEEDED"  # what the replica sends back as a Failure


def test_a_deadline_already_spent_stops_before_the_first_item():
    source = _Source(5, 0.001)
    with pytest.raises(BackendDeadlineExceeded):
        asyncio.run(_drain(source, 0.0))
    assert source.sent == 0
