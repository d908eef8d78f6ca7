"""Admission control of the router: slots per backend and one bounded FIFO wait queue.

A backend has ``capacity`` slots (its running replicas x their batch cap). A request asks for
backends in preference order; :meth:`Admission.try_acquire` takes the first free slot without
waiting, :meth:`Admission.acquire` waits in the queue (bounded, with a timeout) when none is free.
A freed slot goes straight to the oldest waiter that can use it, so a newcomer never overtakes a
waiting request. Pure asyncio, no Ray: unit-tested alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field


class QueueFullError(Exception):
    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__(f"{waiting} requests already wait for a slot (queue limit {limit})")


class QueueTimeoutError(Exception):
    def __init__(self, waited_s: float) -> None:
        super().__init__(f"no slot freed within {waited_s:.1f}s")


@dataclass
class _Pool:
    capacity: int = 0
    in_use: int = 0
    peak: int = 0

    @property
    def free(self) -> int:
        return self.capacity - self.in_use


@dataclass
class _Waiter:
    backends: tuple[str, ...]
    future: asyncio.Future[str] = field(repr=False)


class Admission:
    def __init__(self, backends: tuple[str, ...], queue_size: int) -> None:
        self._pools = {b: _Pool() for b in backends}
        self._waiters: deque[_Waiter] = deque()
        self.queue_size = queue_size

    # -- state ---------------------------------------------------------------------------------
    def capacity(self, backend: str) -> int:
        return self._pools[backend].capacity

    def in_use(self, backend: str) -> int:
        return self._pools[backend].in_use

    def peak(self, backend: str) -> int:
        return self._pools[backend].peak

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def set_capacity(self, backend: str, capacity: int) -> None:
        """New slot count (replicas came or went); wakes waiters if slots appeared."""
        self._pools[backend].capacity = max(0, capacity)
        self._hand_over()

    # -- acquire / release ---------------------------------------------------------------------
    def try_acquire(self, backends: tuple[str, ...]) -> str | None:
        """A free slot on the first backend (in order) that has one and no one waiting for it."""
        for b in backends:
            if self._pools[b].free > 0 and not any(b in w.backends for w in self._waiters):
                self._take(b)
                return b
        return None

    async def acquire(self, backends: tuple[str, ...], timeout_s: float) -> str:
        """Like try_acquire, else wait in the FIFO queue up to ``timeout_s``.

        Raises QueueFullError at once when the queue is full, QueueTimeoutError after the wait;
        a cancelled wait (client deadline, disconnect) leaves the queue and takes no slot.
        """
        got = self.try_acquire(backends)
        if got is not None:
            return got
        if len(self._waiters) >= self.queue_size:
            raise QueueFullError(len(self._waiters), self.queue_size)
        waiter = _Waiter(backends, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), timeout_s)
        except (TimeoutError, asyncio.CancelledError) as e:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())  # handed a slot just as we gave up: give it back
            else:
                waiter.future.cancel()
            self._remove(waiter)
            if isinstance(e, TimeoutError):
                raise QueueTimeoutError(timeout_s) from None
            raise

    def release(self, backend: str) -> None:
        pool = self._pools[backend]
        pool.in_use -= 1
        self._hand_over()

    # -- internals -----------------------------------------------------------------------------
    def _take(self, backend: str) -> None:
        pool = self._pools[backend]
        pool.in_use += 1
        pool.peak = max(pool.peak, pool.in_use)

    def _remove(self, waiter: _Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def _hand_over(self) -> None:
        """Give free slots to the oldest waiters that can use them."""
        for waiter in list(self._waiters):
            if waiter.future.done():
                self._remove(waiter)
                continue
            for b in waiter.backends:
                if self._pools[b].free > 0:
                    self._take(b)
                    waiter.future.set_result(b)
                    self._remove(waiter)
                    break
