"""Rank 0's engine under tensor parallelism: the scheduler's owner, the command sender, and
the watchdog that turns a dead rank into an :class:`EngineDeadError` naming it.

Failure model: a follower that dies (crash, OOM kill, SIGKILL) makes the next or current
collective fail on rank 0 (gloo: as soon as the peer's sockets close; NCCL: the watchdog
aborts the communicator, which would otherwise wait for its timeout). Rank 0 then marks the
engine dead, stops the remaining followers and raises EngineDeadError naming the rank(s)
that died, with their exit status and reason. Nothing tries to recover: the replica is
restarted (its health check fails from then on).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import replace
from collections.abc import Callable
from typing import Protocol

from ..config import EngineConfig
from ..engine import Engine
from ..errors import EngineDeadError
from ..scheduler import Event
from ..sequence import Sequence
from . import channel
from .channel import Abort, AddRequest, Shutdown, Step
from .group import TPGroup, failure_key

log = logging.getLogger(__name__)


class WorkerHandle(Protocol):
    """How rank 0 sees a follower rank (a local process, a Ray actor, a torchrun peer)."""

    rank: int

    def exit_status(self) -> str | None:
        """None while the rank runs; else how it ended ("killed by SIGKILL", "exit code 1", ...)."""

    def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for a clean exit (after Shutdown), then kill it."""


def describe_exit(code: int | None) -> str | None:
    if code is None:
        return None
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def failure_reason(store, rank: int) -> str | None:
    """What a follower reported before exiting (None: it died without a word, e.g. SIGKILL)."""
    key = failure_key(rank)
    try:
        if store.check([key]):
            return store.get(key).decode(errors="replace")[:300]
    except Exception:  # the store is unreachable: no reason to give
        pass
    return None


def describe_failure(store, dead: dict[int, str], cause: BaseException | None, during: str = "step") -> str:
    if not dead:
        return (f"tensor-parallel {during} failed on rank 0 and no rank has exited (a rank stuck past the collective "
                f"timeout, or an error on rank 0): {type(cause).__name__}: {cause}")
    reasons = {r: failure_reason(store, r) for r in dead}
    # a rank that left no reason (killed, crashed hard) is the cause; the others failed after it
    order = sorted(dead, key=lambda r: (reasons[r] is not None, r))
    parts = [f"rank {r} {dead[r]}" + (f" ({reasons[r]})" if reasons[r] else "") for r in order]
    return f"tensor-parallel rank {order[0]} died during {during}: " + "; ".join(parts)


class Watchdog:
    """Polls the followers every ``interval_s``; on the first death it calls ``on_death`` (which
    marks the engine dead, stops the other ranks and, on NCCL, aborts the communicator so that a
    collective blocked on the dead peer returns)."""

    def __init__(self, workers: list[WorkerHandle], on_death: Callable[[dict[int, str]], None],
                 interval_s: float = 0.2) -> None:
        self.workers = workers
        self.on_death = on_death
        self.interval_s = interval_s
        self.dead: dict[int, str] = {}
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="dgserve-tp-watchdog", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.poll():
                self.on_death(dict(self.dead))
                return

    def poll(self) -> dict[int, str]:
        for w in self.workers:
            status = w.exit_status()
            if status is not None and w.rank not in self.dead:
                self.dead[w.rank] = status
        return self.dead

    def wait_for_death(self, timeout_s: float) -> dict[int, str]:
        """After a failed collective: give the dead rank's exit a moment to become visible."""
        deadline = time.monotonic() + timeout_s
        while not self.poll() and time.monotonic() < deadline:
            time.sleep(0.05)
        return dict(self.dead)

    def stop(self) -> None:
        self._stop.set()


class TPEngine(Engine):
    """Rank 0. Same API as :class:`Engine`; every step first tells the followers what to replay."""

    def __init__(self, config: EngineConfig, *, tp: TPGroup, workers: list[WorkerHandle],
                 progress: bool = False) -> None:
        super().__init__(config, progress=progress, tp=tp)
        self.workers = workers
        self._ops: list[AddRequest | Abort] = []
        self._lock = threading.Lock()  # one step or shutdown at a time on the command channel
        self._fail_lock = threading.Lock()
        self._error: EngineDeadError | None = None
        self._closed = False
        self.watchdog = Watchdog(workers, lambda dead: self._fail(dead, None))

    def add_sequence(self, seq: Sequence) -> None:
        super().add_sequence(seq)
        request = seq.request
        self._ops.append(AddRequest(replace(request, params=replace(request.params, seed=seq.params.seed))))

    def abort(self, request_id: str) -> bool:
        found = super().abort(request_id)
        self._ops.append(Abort(request_id))
        return found

    def step(self) -> list[Event]:
        with self._lock:
            self.check_health()
            plan = self.scheduler.schedule()
            if not plan:
                return []
            try:
                channel.send(self.tp.control, Step(tuple(self._ops), channel.plan_digest(plan)),
                             self.tp.collective_timeout)
                self._ops.clear()
                outputs = self.runner.run(plan)
            except Exception as e:  # the ranks are out of step: nothing more can run
                raise self._fail(self.watchdog.wait_for_death(timeout_s=3.0), e) from e
        return self.scheduler.postprocess(plan, outputs)

    def check_health(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise EngineDeadError("tensor-parallel engine is shut down")

    def shutdown(self) -> None:
        if self._closed:
            return
        clean = self._error is None and self._lock.acquire(timeout=10.0)
        self._closed = True
        self.watchdog.stop()
        try:
            if clean:
                try:
                    channel.send(self.tp.control, Shutdown(), self.tp.collective_timeout)
                except Exception:
                    clean = False
            for w in self.workers:
                w.stop(timeout=30.0 if clean else 0.0)
            try:
                self.tp.close()  # lets this process host another engine later
            except Exception:
                log.exception("could not destroy the tensor-parallel process group")
        finally:
            if clean:
                self._lock.release()

    def _fail(self, dead: dict[int, str], cause: BaseException | None) -> EngineDeadError:
        """Mark the engine dead (once) and stop every rank still running: the ranks are out of step."""
        with self._fail_lock:
            if self._error is None:
                self._error = EngineDeadError(describe_failure(self.tp.store, dead, cause))
                log.error("%s", self._error)
                self.watchdog.stop()
                self.tp.abort()
                for w in self.workers:
                    if w.rank not in dead:
                        w.stop(timeout=0.0)
            return self._error
