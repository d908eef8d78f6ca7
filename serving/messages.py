"""What the router and the backends exchange through Serve handles (plain, picklable dataclasses).

A backend's ``generate`` is an async generator of events: any number of :class:`Chunk` and
:class:`DraftProgress`, then exactly one :class:`Final` or one :class:`Failure`. Backends never
raise request errors across the handle (typed exceptions with keyword-only constructors do not
survive pickling): they yield a :class:`Failure` carrying the gRPC status code name instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, TypeVar

T = TypeVar("T")

# gRPC metadata with the client's remaining deadline in whole milliseconds: the front sets it from the call's
# deadline (Serve's gRPC proxy does not hand the deadline to the router), the router turns it into
# ``BackendRequest.timeout_s``. A client that calls the proxy directly may set it itself.
TIMEOUT_METADATA = "dgserve-timeout-ms"

BackendKind = Literal["diffusion", "autoregressive"]


@dataclass(frozen=True)
class BackendRequest:
    """One request as the router hands it to a backend (text not yet tokenized: each backend
    applies its own tokenizer and chat template)."""

    request_id: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)
    max_new_tokens: int | None = None
    seed: int | None = None
    sampling: dict[str, float | int] = field(default_factory=dict)  # only the fields the client set
    stop_token_ids: tuple[int, ...] = ()
    pinned: tuple[tuple[int, int], ...] = ()  # (position, token id) in the generated sequence
    infill_prefix: str = ""
    infill_suffix: str = ""
    stream_drafts: bool = False
    trace_context: tuple[tuple[str, str], ...] = ()  # W3C traceparent/tracestate of the router's span (if traced)
    # Seconds left of the client's deadline when the router dispatched the request (None: no deadline). The
    # backend ends the request itself when they run out, so a request whose caller died (a router crash: Ray
    # does not cancel an actor's running call when its caller dies) does not hold a slot past its deadline.
    timeout_s: float | None = None

    @property
    def needs_diffusion(self) -> bool:
        """Pinned positions and infilling only exist on a diffusion canvas."""
        return bool(self.pinned or self.infill_suffix or self.infill_prefix)


@dataclass(frozen=True)
class Chunk:
    """New output: a committed canvas (diffusion) or a few tokens (autoregressive)."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    steps: int = 0


@dataclass(frozen=True)
class DraftProgress:
    canvas_index: int
    step: int
    accepted: int
    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class Final:
    """The last event of a successful request."""

    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    model: str
    backend: BackendKind
    replica: str
    replica_in_flight: int  # requests the replica was running when it admitted this one (this one included)
    first_chunk_s: float
    seconds: float
    steps_per_canvas: tuple[int, ...] = ()
    tokens_per_step: float = 0.0


@dataclass(frozen=True)
class Failure:
    """The request failed; ``code`` is a ``grpc.StatusCode`` name (``OUT_OF_RANGE``, ...)."""

    code: str
    message: str


Event = Chunk | DraftProgress | Final | Failure


@dataclass(frozen=True)
class BackendInfo:
    """What a backend serves, as verified when its replica started."""

    backend: BackendKind
    kind: str  # "diffusion", "smollm2", "local", "openai"
    model: str
    served_context_length: int
    max_batch: int
    canvas_length: int = 0
    tensor_parallel_size: int = 1


class BackendDeadlineExceeded(TimeoutError):
    """A backend ended a request at the deadline it carried (``BackendRequest.timeout_s``)."""


async def within_deadline(stream: AsyncIterator[T], req: BackendRequest) -> AsyncIterator[T]:
    """``stream``'s items until ``req.timeout_s`` (counted from this call) runs out, then
    :class:`BackendDeadlineExceeded`. The pending read is cancelled at the deadline, which ends the
    request in the engine (the backends' streams abort their request when cancelled or closed);
    the caller still closes ``stream``."""
    if req.timeout_s is None:
        async for item in stream:
            yield item
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + req.timeout_s
    it = aiter(stream)
    while True:
        try:
            item = await asyncio.wait_for(anext(it), max(deadline - loop.time(), 0.0))
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise BackendDeadlineExceeded(f"request {req.request_id} reached its deadline ({req.timeout_s:.3f} s after "
                                          "the backend got it) and was stopped there") from None
        yield item
