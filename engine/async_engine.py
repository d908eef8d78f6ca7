"""An asyncio front for the engine: one background thread steps the engine, callers await
their own stream of events.

The step loop runs in a dedicated thread (a forward is blocking compute); requests and
aborts cross into it through a condition variable, events come back through each
caller's event loop (``call_soon_threadsafe``). If the loop dies, every open stream gets
an :class:`EngineDeadError` and ``check_health`` raises from then on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from .config import EngineConfig
from .engine import Engine
from .errors import EngineDeadError, InvalidRequestError
from .scheduler import Event
from .sequence import Sequence
from .types import CanvasEvent, EngineInfo, GenerationRequest

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, config: EngineConfig, *, progress: bool = False, engine: Engine | None = None,
                 placement_group: Any = None) -> None:
        """``placement_group``: with tensor_parallel_size > 1, the Ray placement group whose bundles
        1..n-1 host the follower ranks (this process is rank 0); without it they are local processes."""
        from .parallel.launcher import launch

        self.engine = engine or launch(config, placement_group=placement_group, progress=progress)
        self.tokenizer = self.engine.tokenizer
        self._cv = threading.Condition()
        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="dgserve-engine", daemon=True)
        self._thread.start()

    # -- public API ----------------------------------------------------------------------
    def info(self) -> EngineInfo:
        return self.engine.info()

    def num_in_flight(self) -> int:
        with self._cv:
            return len(self._streams)

    def check_health(self) -> None:
        self.engine.check_health()  # a dead tensor-parallel rank, even while the loop is idle
        if self._dead is not None:
            raise EngineDeadError(f"engine loop died: {type(self._dead).__name__}: {self._dead}") from self._dead
        if self._stopping or not self._thread.is_alive():
            raise EngineDeadError("engine is shut down")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Yields DraftEvent/CanvasEvent; the last CanvasEvent has ``finished=True``.

        Invalid requests raise (InvalidRequestError, ContextLengthExceededError) before anything
        is queued. Closing or cancelling the iterator aborts the request and frees its slot.
        """
        self.check_health()
        seq = self.engine.make_sequence(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._cv:
            if request.request_id in self._streams:
                raise InvalidRequestError(f"request_id {request.request_id!r} is already in flight")
            self._streams[request.request_id] = (loop, queue)
            self._inbox.append(seq)
            self._cv.notify()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, CanvasEvent) and item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        """Frees the request's slot before the next step (thread-safe, idempotent)."""
        with self._cv:
            if self._streams.pop(request_id, None) is not None:
                self._aborts.add(request_id)
                self._cv.notify()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)
        self.engine.shutdown()

    # -- the loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._inbox or self._aborts or self.engine.has_unfinished()):
                        self._cv.wait()
                    if self._stopping:
                        break
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, set()
                for rid in aborts:
                    self.engine.abort(rid)
                for seq in inbox:
                    if seq.request_id in aborts:
                        continue
                    self.engine.add_sequence(seq)
                if self.engine.has_unfinished():
                    self._dispatch(self.engine.step())
        except BaseException as e:  # the engine is unusable: tell everyone waiting
            log.exception("engine loop died")
            self._dead = e
        finally:
            err = EngineDeadError(f"engine loop died: {self._dead}" if self._dead else "engine shut down")
            with self._cv:
                streams, self._streams = self._streams, {}
            for loop, queue in streams.values():
                loop.call_soon_threadsafe(queue.put_nowait, err)

    def _dispatch(self, events: list[Event]) -> None:
        with self._cv:
            targets = [(ev, self._streams.get(ev.request_id)) for ev in events]
            for ev in events:
                if isinstance(ev, CanvasEvent) and ev.finished:
                    self._streams.pop(ev.request_id, None)
        for ev, target in targets:
            if target is not None:
                loop, queue = target
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, ev)
                except RuntimeError:  # the caller's loop is closed: nobody is listening
                    self.abort(ev.request_id)
