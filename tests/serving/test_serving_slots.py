"""Admission control of the router (pure asyncio): slots, FIFO hand-over, bounded queue, timeouts."""

from __future__ import annotations

import asyncio

import pytest

from dgserve.serving.slots import Admission, QueueFullError, QueueTimeoutError

D, F = "diffusion", "autoregressive"


def make(d: int = 2, f: int = 1, queue: int = 4) -> Admission:
    a = Admission((D, F), queue)
    a.set_capacity(D, d)
    a.set_capacity(F, f)
    return a


def test_preference_order_then_overflow_then_nothing():
    a = make(d=2, f=1)
    assert [a.try_acquire((D, F)) for _ in range(4)] == [D, D, F, None]
    assert a.in_use(D) == 2 and a.in_use(F) == 1 and a.peak(D) == 2


def test_never_more_than_capacity_under_a_burst():
    async def main():
        a = make(d=3, f=0, queue=100)
        running = peak = 0

        async def one():
            nonlocal running, peak
            b = await a.acquire((D,), timeout_s=5)
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.001)
            running -= 1
            a.release(b)

        await asyncio.gather(*(one() for _ in range(50)))
        return a, peak

    a, peak = asyncio.run(main())
    assert peak == 3 and a.peak(D) == 3 and a.in_use(D) == 0 and a.waiting == 0


def test_freed_slot_goes_to_the_oldest_waiter_not_a_newcomer():
    async def main():
        a = make(d=1, f=0)
        held = a.try_acquire((D,))
        waiter = asyncio.ensure_future(a.acquire((D,), timeout_s=5))
        await asyncio.sleep(0)
        assert a.waiting == 1
        a.release(held)
        assert a.try_acquire((D,)) is None  # handed to the waiter already
        assert await waiter == D

    asyncio.run(main())


def test_queue_full_is_refused_at_once():
    async def main():
        a = make(d=1, f=0, queue=1)
        a.try_acquire((D,))
        first = asyncio.ensure_future(a.acquire((D,), timeout_s=5))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="queue limit 1"):
            await a.acquire((D,), timeout_s=5)
        first.cancel()

    asyncio.run(main())


def test_timeout_and_cancellation_leave_the_queue_without_a_slot():
    async def main():
        a = make(d=1, f=0)
        a.try_acquire((D,))
        with pytest.raises(QueueTimeoutError):
            await a.acquire((D,), timeout_s=0.05)
        task = asyncio.ensure_future(a.acquire((D,), timeout_s=5))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert a.waiting == 0 and a.in_use(D) == 1
        a.release(D)
        assert a.in_use(D) == 0

    asyncio.run(main())


def test_new_capacity_wakes_waiters_and_any_backend_serves_a_multi_backend_waiter():
    async def main():
        a = make(d=0, f=0)
        only_d = asyncio.ensure_future(a.acquire((D,), timeout_s=5))
        either = asyncio.ensure_future(a.acquire((D, F), timeout_s=5))
        await asyncio.sleep(0)
        a.set_capacity(F, 1)  # only the second waiter can use it
        assert await either == F
        assert not only_d.done()
        a.set_capacity(D, 1)
        assert await only_d == D

    asyncio.run(main())
