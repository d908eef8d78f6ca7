"""``Router``: the gRPC ingress (Serve's gRPC proxy calls its methods by RPC name).

Per request: validate -> pick backends in preference order -> take a slot (at once, or wait in the
bounded queue) -> stream the backend's events -> build the response -> free the slot.

* A diffusion replica never gets more than its batch cap: the router holds one slot per
  (healthy diffusion replica x ``max_batch``) and dispatches only with a slot in hand; Serve's
  ``max_ongoing_requests`` (= the cap) enforces it again inside the replica.
* ``ANY``: a diffusion slot if one is free, else the fallback at once (``router.overflow``), else wait.
* ``DIFFUSION_ONLY`` (and any request with pinned positions or infill): wait for a diffusion slot in
  the bounded FIFO queue until the client's deadline (the proxy cancels the call) or
  ``router.queue_timeout_s``; RESOURCE_EXHAUSTED with a retry hint when the queue is full.
* Deadlines: the client's deadline arrives as ``dgserve-timeout-ms`` metadata (the front sets it; Serve's
  proxy does not pass gRPC deadlines on) and goes to the backend as the seconds left at dispatch, which the
  replica enforces itself, so a request outlives neither its client's deadline nor a crash of this router.
* Start-up: each backend reports what it serves; the router refuses to start (the app never becomes
  healthy) if any serves less context than ``promised_context_length``.

Replica health and slot counts come from the replicas' ``record_routing_stats``, read through their
actors every ``router.capacity_refresh_s`` (an actor call, not a request: it takes no slot).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from opentelemetry.trace import INVALID_SPAN, Span

from dgserve.engine.errors import ContextVerificationError
from dgserve.v1 import dgserve_pb2 as pb

from . import telemetry
from .config import AppConfig, LimitSettings
from .diffusion import check_served_context, replica_id
from .errors import ServingError, status_for
from .messages import TIMEOUT_METADATA, BackendInfo, BackendRequest, Chunk, DraftProgress, Failure, Final
from .security import TokenFile, check_request_limits, token_file
from .slots import Admission, QueueFullError, QueueTimeoutError
from .telemetry import NO_TRACING, RouterMetrics, Tracing

log = logging.getLogger("dgserve.serving")

DIFFUSION, FALLBACK = "diffusion", "autoregressive"
DEPLOYMENTS = {DIFFUSION: "DiffusionReplica", FALLBACK: "AutoregressiveFallback"}
BACKEND_ENUM = {DIFFUSION: pb.BACKEND_DIFFUSION, FALLBACK: pb.BACKEND_AUTOREGRESSIVE}
FINISH_ENUM = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
HEALTH_SERVICES = ("", "dgserve.v1.DGServe")
RETRIES_ON_DEAD_REPLICA = 1  # a request whose replica died before answering is tried once more
SAMPLING_FIELDS = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "confidence_threshold",
                   "stability_threshold", "temperature", "top_p")


@dataclass
class Plan:
    request: BackendRequest
    backends: tuple[str, ...]  # preference order
    may_wait: bool = True
    deadline: float | None = None  # time.monotonic() of the client's deadline, when the call has one

    def dispatched(self) -> BackendRequest:
        """The request as a backend gets it now: with the seconds left of the client's deadline, which the
        backend enforces itself (it still ends the request if this router dies meanwhile)."""
        if self.deadline is None:
            return self.request
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"request {self.request.request_id} reached its deadline before a backend took it")
        return dataclasses.replace(self.request, timeout_s=left)


def deadline_from_metadata(metadata: Any) -> float | None:
    """The ``time.monotonic()`` deadline carried by ``dgserve-timeout-ms`` (set by the front), or None."""
    for key, value in metadata or ():
        if key != TIMEOUT_METADATA:
            continue
        try:
            ms = int(value)
        except (TypeError, ValueError):
            ms = -1
        if ms < 0:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"metadata {TIMEOUT_METADATA}={value!r} must be a whole number of milliseconds >= 0")
        return time.monotonic() + ms / 1000
    return None


def plan_request(msg: pb.GenerateRequest, *, fallback: bool, overflow: bool,
                 limits: LimitSettings | None = None) -> Plan:
    """Validate a request and choose its backends (raises ServingError INVALID_ARGUMENT / FAILED_PRECONDITION).
    ``limits``: the deployment's request limits (``security.limits``)."""
    def invalid(text: str) -> ServingError:
        return ServingError(grpc.StatusCode.INVALID_ARGUMENT, text)

    if msg.prompt and msg.messages:
        raise invalid("set either prompt or messages, not both")
    if not (msg.prompt or msg.messages or msg.infill.prefix):
        raise invalid("empty request: set prompt or messages")
    check_request_limits(msg, limits or LimitSettings())
    for i, m in enumerate(msg.messages):
        if not m.role:
            raise invalid(f"messages[{i}].role is empty")
    if msg.HasField("max_new_tokens") and msg.max_new_tokens == 0:
        raise invalid("max_new_tokens must be positive, got 0")
    has_infill = bool(msg.infill.prefix or msg.infill.suffix)
    if msg.pinned and has_infill:
        raise invalid("pinned and infill cannot be combined: infill pins the suffix itself")
    sampling = {f: getattr(msg.sampling, f) for f in SAMPLING_FIELDS if msg.sampling.HasField(f)}
    req = BackendRequest(
        request_id=msg.request_id or uuid.uuid4().hex,
        prompt=msg.prompt or None,
        messages=tuple((m.role, m.content) for m in msg.messages),
        max_new_tokens=msg.max_new_tokens if msg.HasField("max_new_tokens") else None,
        seed=msg.seed if msg.HasField("seed") else None,
        sampling=sampling,
        stop_token_ids=tuple(msg.stop_token_ids),
        pinned=tuple((p.position, p.token_id) for p in msg.pinned),
        infill_prefix=msg.infill.prefix,
        infill_suffix=msg.infill.suffix,
        stream_drafts=msg.stream_drafts,
    )
    routing = msg.routing
    if routing == pb.GenerateRequest.AUTOREGRESSIVE_ONLY:
        if req.needs_diffusion:
            raise invalid("pinned positions and infill need the diffusion backend: not with AUTOREGRESSIVE_ONLY")
        if not fallback:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               "AUTOREGRESSIVE_ONLY: this deployment has no autoregressive fallback")
        return Plan(req, (FALLBACK,))
    if routing == pb.GenerateRequest.DIFFUSION_ONLY or req.needs_diffusion:
        return Plan(req, (DIFFUSION,))
    if routing != pb.GenerateRequest.ANY:
        raise invalid(f"unknown routing value {routing}")
    return Plan(req, (DIFFUSION, FALLBACK) if (fallback and overflow) else (DIFFUSION,))


@dataclass
class _Outcome:
    chunks: list[Chunk] = field(default_factory=list)
    final: Final | None = None
    queue_s: float = 0.0
    backend: str = "none"  # the backend of the last slot taken


class Router:
    """Serve ingress deployment class (decorated in ``app.py``)."""

    _tracing: Tracing = NO_TRACING
    _tokens: TokenFile | None = None  # security.auth: accepted bearer tokens

    async def __init__(self, config: dict[str, Any], diffusion: Any, fallback: Any | None = None) -> None:
        self.cfg = AppConfig.model_validate(config)
        self.handles = {DIFFUSION: diffusion}
        if fallback is not None:
            self.handles[FALLBACK] = fallback
        rc = self.cfg.router
        self.admission = Admission(tuple(self.handles), rc.queue_size)
        self.infos: dict[str, BackendInfo] = {}
        self.replica_stats: dict[str, dict[str, dict[str, Any]]] = {b: {} for b in self.handles}
        self._actors: dict[str, Any] = {}
        self._app, self._routers = _replica_context()
        self._metrics = RouterMetrics()
        self._tracing = Tracing.from_config(self.cfg.telemetry, "router", replica_id())
        self._tokens = token_file(self.cfg.security)
        await self._verify_backends()
        await self.refresh()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    # -- start-up -------------------------------------------------------------------------------
    async def _verify_backends(self) -> None:
        promised = self.cfg.promised_context_length
        timeouts = {DIFFUSION: self.cfg.diffusion.startup_timeout_s, FALLBACK: self.cfg.fallback.startup_timeout_s}
        for name, handle in self.handles.items():
            with telemetry.verifying_context(self._tracing, "router", name, promised) as span:
                try:
                    info: BackendInfo = await asyncio.wait_for(handle.info.remote(), timeouts[name])
                except TimeoutError as e:
                    raise ContextVerificationError(
                        f"backend {name!r} did not report what it serves within {timeouts[name]}s",
                        requested=promised, served=0, cause="startup_timeout") from e
                telemetry.set_attributes(span, {"gen_ai.request.model": info.model,
                                                "dgserve.context.served": info.served_context_length})
                check_served_context(name, info.model, info.served_context_length, promised)
            self.infos[name] = info
        self._metrics.context(promised, {n: (i.model, i.served_context_length) for n, i in self.infos.items()})
        log.info("router: every backend serves at least the promised %d tokens: %s", promised,
                 {n: i.served_context_length for n, i in self.infos.items()})

    # -- replica view ---------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Re-read every backend replica's routing stats; slots = healthy replicas x cap / routers."""
        names = await asyncio.to_thread(_replica_actor_names, self._app)
        for backend in self.handles:
            found = names.get(DEPLOYMENTS[backend], [])
            results = await asyncio.gather(*(self._stats(n) for n in found))
            stats = {s["replica"]: s for s in results if s is not None}
            self.replica_stats[backend] = stats
            slots = sum(int(s["max_batch"]) for s in stats.values() if s.get("healthy"))
            self.admission.set_capacity(backend, slots // self._routers)
        self._metrics.refresh(self.admission.waiting, {b: (self.admission.capacity(b), self.admission.in_use(b))
                                                       for b in self.handles})

    async def _stats(self, actor_name: str) -> dict[str, Any] | None:
        import ray

        try:
            actor = self._actors.get(actor_name)
            if actor is None:
                actor = await asyncio.to_thread(ray.get_actor, actor_name, "serve")
                self._actors[actor_name] = actor
            return await asyncio.wait_for(actor.record_routing_stats.remote(), 2.0)
        except Exception:  # starting, stopping or dead: no slots
            self._actors.pop(actor_name, None)
            return None

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.router.capacity_refresh_s)
            try:
                await self.refresh()
            except Exception:
                log.exception("router: refreshing replica stats failed")

    def serving(self) -> bool:
        return any(s.get("healthy") for s in self.replica_stats[DIFFUSION].values())

    def check_health(self) -> None:
        """Serve's health check of the router itself."""
        if self._refresher.done():
            raise RuntimeError(f"router refresh task stopped: {self._refresher!r}")

    # -- gRPC: dgserve.v1.DGServe ---------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any) -> pb.GenerateResponse:
        arrived = time.perf_counter()
        span = self._tracing.server_span("Generate", grpc_context)
        out = _Outcome()
        try:
            self._authorize(grpc_context)
            plan = self._plan(request, span, grpc_context, stream=False)
            for attempt in range(1 + RETRIES_ON_DEAD_REPLICA):
                backend = await self._acquire(plan, out, span, attempt)
                try:
                    events = await self._call_unary(backend, plan)
                except Exception as e:
                    if attempt < RETRIES_ON_DEAD_REPLICA and _replica_died(e):
                        await self.refresh()  # drop the dead replica's slots, then try again
                        continue
                    raise
                finally:
                    self.admission.release(backend)
                failure = next((ev for ev in events if isinstance(ev, Failure)), None)
                if failure is not None:
                    if attempt < RETRIES_ON_DEAD_REPLICA and _replica_died(failure):
                        await self.refresh()
                        continue
                    raise ServingError(grpc.StatusCode[failure.code], failure.message)
                break
            out.chunks = [ev for ev in events if isinstance(ev, Chunk)]
            out.final = next((ev for ev in events if isinstance(ev, Final)), None)
            if out.final is None:
                raise ServingError(grpc.StatusCode.INTERNAL, f"backend {backend} answered without a result")
            telemetry.set_final(span, out.final)
            self._answered(span, out.backend, None, arrived)
            return self._response(plan, out, arrived)
        except Exception as e:
            self._set_status(grpc_context, e)
            self._answered(span, out.backend, e, arrived)
            return pb.GenerateResponse()
        except asyncio.CancelledError as e:  # client gone or deadline: counted, then let through
            self._answered(span, out.backend, e, arrived)
            raise

    async def _call_unary(self, backend: str, plan: Plan) -> list[Any]:
        call = self.handles[backend].generate_unary.remote(plan.dispatched())
        try:
            return await call
        except asyncio.CancelledError:
            call.cancel()  # client gone: abort in the replica, which frees the engine slot
            raise

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context: Any):
        arrived = time.perf_counter()
        span = self._tracing.server_span("GenerateStream", grpc_context)
        out = _Outcome()
        answered = False
        try:
            self._authorize(grpc_context)
            plan = self._plan(request, span, grpc_context, stream=True)
            rid = plan.request.request_id
            async with contextlib.aclosing(self._run(plan, out, span)) as events:
                async for backend, ev in events:
                    common = {"request_id": rid, "backend": BACKEND_ENUM[backend]}
                    if isinstance(ev, Chunk):
                        yield pb.GenerateStreamResponse(**common, chunk=pb.TextChunk(
                            index=ev.index, text=ev.text, token_ids=ev.token_ids, steps=ev.steps))
                    elif isinstance(ev, DraftProgress):
                        yield pb.GenerateStreamResponse(**common, draft=pb.DraftProgress(
                            canvas_index=ev.canvas_index, step=ev.step, accepted=ev.accepted,
                            token_ids=ev.token_ids, text=ev.text))
            f = out.final
            assert f is not None
            telemetry.set_final(span, f)
            self._answered(span, f.backend, None, arrived)
            answered = True
            yield pb.GenerateStreamResponse(
                request_id=rid, backend=BACKEND_ENUM[f.backend], replica=f.replica, finished=True,
                finish_reason=FINISH_ENUM[f.finish_reason], model=f.model, replica_in_flight=f.replica_in_flight,
                **self._stats_fields(f, out, arrived))
        except Exception as e:
            self._set_status(grpc_context, e)
            if not answered:
                self._answered(span, out.backend, e, arrived)
            raise ServingStreamAbort(str(e)) from None  # in a stream the code only sticks when we raise
        except BaseException:  # cancelled or closed (client gone): counted, then let through
            if not answered:
                self._answered(span, out.backend, asyncio.CancelledError(), arrived)
            raise

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context: Any) -> pb.ModelInfo:
        try:
            self._authorize(grpc_context)
        except ServingError as e:
            self._set_status(grpc_context, e)
            return pb.ModelInfo()
        d = self.infos[DIFFUSION]
        backends = []
        for name, info in self.infos.items():
            stats = self.replica_stats.get(name, {})
            backends.append(pb.BackendInfo(
                backend=BACKEND_ENUM[name], model=info.model, kind=info.kind,
                served_context_length=info.served_context_length, max_batch=info.max_batch,
                running_replicas=sum(1 for s in stats.values() if s.get("healthy")),
                canvas_length=info.canvas_length, tensor_parallel_size=info.tensor_parallel_size,
                router_in_flight=self.admission.in_use(name), router_capacity=self.admission.capacity(name),
                replicas=[pb.ReplicaStats(
                    replica=s["replica"], healthy=bool(s.get("healthy")), in_flight=max(0, s.get("in_flight", 0)),
                    peak_in_flight=s.get("peak_in_flight", 0), requests=s.get("requests", 0),
                    steps_per_canvas=s.get("steps_per_canvas", 0.0), tokens_per_second=s.get("tokens_per_s", 0.0),
                    engine_in_flight=s.get("engine_in_flight", -1))
                    for s in sorted(stats.values(), key=lambda s: s["replica"])]))
        return pb.ModelInfo(model=d.model, promised_context_length=self.cfg.promised_context_length,
                            served_context_length=d.served_context_length, canvas_length=d.canvas_length,
                            max_batch=d.max_batch, backends=backends, api_version="dgserve.v1",
                            queued=self.admission.waiting)

    # -- gRPC: grpc.health.v1.Health ------------------------------------------------------------
    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: Any):
        if request.service not in HEALTH_SERVICES:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}; known: {list(HEALTH_SERVICES)}")
            return health_pb2.HealthCheckResponse()
        status = health_pb2.HealthCheckResponse.SERVING if self.serving() \
            else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    # -- internals ------------------------------------------------------------------------------
    def _authorize(self, grpc_context: Any) -> None:
        """With ``security.auth``: UNAUTHENTICATED unless the call carries an accepted bearer token (checked here
        too, not only in the front, so a caller that reaches Serve's proxy directly still needs it)."""
        if self._tokens is not None:
            self._tokens.check(grpc_context.invocation_metadata())

    def _plan(self, request: pb.GenerateRequest, span: Span, grpc_context: Any, *, stream: bool) -> Plan:
        """Validate and plan; when traced, the request carries the router span's context to the backend."""
        plan = plan_request(request, fallback=FALLBACK in self.handles, overflow=self.cfg.router.overflow,
                            limits=self.cfg.security.limits)
        plan.deadline = deadline_from_metadata(grpc_context.invocation_metadata())
        if span.is_recording():
            telemetry.set_request(span, plan.request, stream=stream)
            telemetry.set_attributes(span, {"dgserve.routing.mode": pb.GenerateRequest.Routing.Name(request.routing)})
        if self._tracing.enabled:
            plan.request = dataclasses.replace(plan.request, trace_context=Tracing.carrier(span))
        return plan

    def _answered(self, span: Span, backend: str, exc: BaseException | None, arrived: float) -> None:
        code, details = (grpc.StatusCode.OK, "") if exc is None else grpc_status(exc)
        self._metrics.answered(backend, code.name, time.perf_counter() - arrived)
        telemetry.end_span(span, code.name, details)

    async def _acquire(self, plan: Plan, out: _Outcome, span: Span = INVALID_SPAN, attempt: int = 0) -> str:
        """A slot on one of the plan's backends (waiting in the queue if needed), or RESOURCE_EXHAUSTED.
        Records the routing decision (queue wait, overflow) and, when traced, a ``dgserve.route`` span."""
        rc = self.cfg.router
        t0 = time.perf_counter()
        route = self._tracing.start(telemetry.ROUTE_SPAN, parent=span) if span.is_recording() else INVALID_SPAN
        if route.is_recording():
            telemetry.set_attributes(route, self._route_attributes(plan, attempt))
        routing = _routing_class(plan)
        backend = self.admission.try_acquire(plan.backends)
        waited = backend is None
        try:
            if backend is None:
                backend = await self.admission.acquire(plan.backends, rc.queue_timeout_s)
        except (QueueFullError, QueueTimeoutError, asyncio.CancelledError) as e:
            waited_s = time.perf_counter() - t0
            self._metrics.routed(routing=routing, waited_s=waited_s, overflow=False)
            telemetry.set_attributes(route, {"dgserve.routing.queue_wait_s": waited_s})
            if isinstance(e, asyncio.CancelledError):
                telemetry.end_span(route, "CANCELLED", "cancelled while waiting for a slot", rpc=False)
                raise
            what = "can take the request now" if isinstance(e, QueueFullError) else "could take the request"
            err = ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no backend {what}: {e}; "
                               f"retry after {rc.retry_after_s:g}s", retry_after_s=rc.retry_after_s)
            telemetry.end_span(route, "RESOURCE_EXHAUSTED", str(err), rpc=False)
            raise err from None
        waited_s = time.perf_counter() - t0
        overflow = backend != plan.backends[0]
        self._metrics.routed(routing=routing, waited_s=waited_s, overflow=overflow)
        if route.is_recording():
            reason = "overflow" if overflow else "queue_wait" if waited else "capacity"
            telemetry.set_attributes(route, {"dgserve.backend": backend, "dgserve.routing.reason": reason,
                                             "dgserve.routing.queue_wait_s": waited_s})
            telemetry.end_span(route, rpc=False)
        out.queue_s += waited_s
        out.backend = backend
        return backend

    def _route_attributes(self, plan: Plan, attempt: int) -> dict[str, Any]:
        attrs: dict[str, Any] = {"dgserve.routing.candidates": plan.backends, "dgserve.routing.attempt": attempt,
                                 "dgserve.routing.queued_before": self.admission.waiting}
        if plan.request.pinned:
            attrs["dgserve.routing.constraint"] = "pinned_positions"
        elif plan.request.needs_diffusion:
            attrs["dgserve.routing.constraint"] = "infill"
        for b in plan.backends:
            attrs[f"dgserve.routing.{b}.slots"] = self.admission.capacity(b)
            attrs[f"dgserve.routing.{b}.slots_in_use"] = self.admission.in_use(b)
        return attrs

    async def _run(self, plan: Plan, out: _Outcome, span: Span = INVALID_SPAN):
        """Take a slot, stream the backend's events (Chunk / DraftProgress), keep the Final in ``out``.
        A replica that died before sending anything is retried once elsewhere."""
        for attempt in range(1 + RETRIES_ON_DEAD_REPLICA):
            backend = await self._acquire(plan, out, span, attempt)
            gen = None
            finished = yielded = False
            retry = False
            try:
                gen = self.handles[backend].options(stream=True).generate.remote(plan.dispatched())
                async for ev in gen:
                    if isinstance(ev, Failure):
                        finished = True
                        if not yielded and attempt < RETRIES_ON_DEAD_REPLICA and _replica_died(ev):
                            retry = True
                            break
                        raise ServingError(grpc.StatusCode[ev.code], ev.message)
                    if isinstance(ev, Final):
                        out.final = ev
                        finished = True
                        break
                    yielded = True
                    yield backend, ev
            except Exception as e:
                if yielded or attempt >= RETRIES_ON_DEAD_REPLICA or not _replica_died(e):
                    raise
                finished = retry = True
            finally:
                if gen is not None and not finished:
                    gen.cancel()  # client gone or error: abort in the replica, which frees the engine slot
                self.admission.release(backend)
            if retry:
                await self.refresh()
                continue
            if out.final is None:
                raise ServingError(grpc.StatusCode.INTERNAL, f"backend {backend} ended the stream without a result")
            return

    def _stats_fields(self, f: Final, out: _Outcome, arrived: float) -> dict[str, Any]:
        gen_s = max(f.seconds, 1e-9)
        fields: dict[str, Any] = {
            "usage": pb.Usage(prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens),
            "timings": pb.Timings(queue_ms=out.queue_s * 1e3, first_chunk_ms=f.first_chunk_s * 1e3,
                                  total_ms=(time.perf_counter() - arrived) * 1e3,
                                  tokens_per_second=f.completion_tokens / gen_s),
        }
        if f.backend == DIFFUSION:
            fields["denoising"] = pb.DenoisingStats(canvases=len(f.steps_per_canvas),
                                                    steps_per_canvas=f.steps_per_canvas,
                                                    tokens_per_step=f.tokens_per_step)
        return fields

    def _response(self, plan: Plan, out: _Outcome, arrived: float) -> pb.GenerateResponse:
        f = out.final
        assert f is not None
        return pb.GenerateResponse(
            request_id=plan.request.request_id, text="".join(c.text for c in out.chunks),
            token_ids=[t for c in out.chunks for t in c.token_ids], finish_reason=FINISH_ENUM[f.finish_reason],
            backend=BACKEND_ENUM[f.backend], replica=f.replica, model=f.model, replica_in_flight=f.replica_in_flight,
            **self._stats_fields(f, out, arrived))

    @staticmethod
    def _set_status(grpc_context: Any, exc: BaseException) -> None:
        code, details = grpc_status(exc)
        grpc_context.set_code(code)
        grpc_context.set_details(details)
        retry = getattr(exc, "retry_after_s", None)
        if retry is not None:
            ms = str(int(retry * 1000))
            grpc_context.set_trailing_metadata([("retry-after-ms", ms), ("grpc-retry-pushback-ms", ms)])


class ServingStreamAbort(Exception):
    """Raised after the status was set on a stream (Serve keeps the code only when the method raises)."""


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """status_for plus the Ray/Serve errors a handle call can raise."""
    from ray import exceptions as rex
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (rex.RayActorError, rex.ActorDiedError, rex.ActorUnavailableError)):
        return grpc.StatusCode.UNAVAILABLE, f"the backend replica serving the request died: {type(exc).__name__}"
    if isinstance(exc, rex.TaskCancelledError):
        return grpc.StatusCode.CANCELLED, "request cancelled"
    if isinstance(exc, rex.RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        if cause is not exc:
            return grpc_status(cause)
        return grpc.StatusCode.INTERNAL, f"backend error: {type(exc).__name__}"
    return status_for(exc)


def _replica_died(err: BaseException | Failure) -> bool:
    """The backend replica (or its engine) died: the request itself was fine and may be retried."""
    if isinstance(err, Failure):
        return err.code == grpc.StatusCode.UNAVAILABLE.name
    return grpc_status(err)[0] == grpc.StatusCode.UNAVAILABLE


def _routing_class(plan: Plan) -> str:
    """What a request may run on (the queue-wait metric's ``routing`` label)."""
    if plan.backends == (FALLBACK,):
        return "autoregressive_only"
    return "any" if FALLBACK in plan.backends else "diffusion_only"


def _replica_context() -> tuple[str, int]:
    """(this app's name, number of router replicas)."""
    from ray import serve

    ctx = serve.get_replica_context()
    return ctx.app_name, max(1, int(getattr(ctx, "world_size", 1) or 1))


def _replica_actor_names(app: str) -> dict[str, list[str]]:
    """Replica actor names of every deployment of ``app`` ({deployment: [actor name]})."""
    import ray

    out: dict[str, list[str]] = {}
    prefix = f"SERVE_REPLICA::{app}#"
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"] if isinstance(entry, dict) else entry
        if name.startswith(prefix):
            deployment = name[len(prefix):].split("#", 1)[0]
            out.setdefault(deployment, []).append(name)
    return out
