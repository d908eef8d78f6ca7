"""``DiffusionReplica``: one block-diffusion engine behind a Serve deployment.

Serve's ``max_ongoing_requests`` is the engine's batch cap (1-8), and the router never hands a
replica more than that. With ``tensor_parallel_size`` > 1 the deployment reserves a STRICT_PACK
placement group of one bundle per rank (see ``app.py``); the replica passes that group on to the
engine factory (the tensor-parallel launcher lives in the engine). The engine sits behind the
small :class:`EngineProtocol`, built by an importable factory, so tests run this very class with a
tiny real checkpoint.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol

from dgserve.engine.errors import ContextVerificationError, DGServeError, InvalidRequestError
from dgserve.engine.types import CanvasEvent, DraftEvent, EngineInfo, GenerationRequest, SamplingParams

from opentelemetry.trace import INVALID_SPAN

from . import telemetry
from .config import AppConfig
from .errors import failure_code_name
from .messages import (
    BackendDeadlineExceeded,
    BackendInfo,
    BackendRequest,
    Chunk,
    DraftProgress,
    Event,
    Failure,
    Final,
    within_deadline,
)
from .telemetry import ReplicaMetrics, Tracing

log = logging.getLogger("dgserve.serving")

DEFAULT_ENGINE_FACTORY = "dgserve.engine:AsyncEngine"
DIFFUSION_SAMPLING_FIELDS = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "confidence_threshold",
                             "stability_threshold")


class EngineProtocol(Protocol):
    """What the replica needs from an engine (``dgserve.engine.AsyncEngine`` implements it)."""

    tokenizer: Any

    def info(self) -> EngineInfo: ...
    def generate(self, request: GenerationRequest) -> AsyncIterator[CanvasEvent | DraftEvent]: ...
    def abort(self, request_id: str) -> Any: ...
    def num_in_flight(self) -> int: ...
    def check_health(self) -> None: ...
    def shutdown(self) -> None: ...


def import_object(path: str) -> Any:
    """``"package.module:attr"`` -> the object."""
    module, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"import path {path!r} must look like 'package.module:attr'")
    return getattr(importlib.import_module(module), attr)


def replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (unit use)
        return "local"


def check_served_context(backend: str, model: str, served: int, promised: int) -> None:
    """Start-up check shared by every backend: refuse to serve less than was promised."""
    if served < promised:
        raise ContextVerificationError(
            f"backend {backend!r} (model {model!r}) serves a context of {served} tokens, less than the promised "
            f"{promised} (promised_context_length)", requested=promised, served=served, cause="backend")


class ReplicaStats:
    """In-flight counts, peak, steps per canvas and tokens/s of one replica (what routing stats and
    metrics expose)."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.in_flight = 0
        self.peak_in_flight = 0
        self.requests = 0
        self.steps_per_canvas_ema = 0.0
        self._tokens: deque[tuple[float, int]] = deque()
        self._window_s = window_s

    def admit(self) -> int:
        self.in_flight += 1
        self.requests += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        return self.in_flight

    def done(self) -> None:
        self.in_flight -= 1

    def canvas(self, steps: int, tokens: int) -> None:
        a = 0.2
        self.steps_per_canvas_ema = steps if self.steps_per_canvas_ema == 0 else (
            a * steps + (1 - a) * self.steps_per_canvas_ema)
        self._tokens.append((time.monotonic(), tokens))

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        while self._tokens and self._tokens[0][0] < now - self._window_s:
            self._tokens.popleft()
        return sum(n for _, n in self._tokens) / self._window_s


class DiffusionReplica:
    """Serve deployment class (decorated in ``app.py``). ``config`` is ``AppConfig.model_dump()``."""

    def __init__(self, config: dict[str, Any], engine_factory: str = DEFAULT_ENGINE_FACTORY) -> None:
        cfg = AppConfig.model_validate(config)
        self.promised = cfg.promised_context_length
        self.replica = replica_id()
        self._tracing = Tracing.from_config(cfg.telemetry, "diffusion", self.replica)
        engine_cfg = cfg.engine_config()
        factory = import_object(engine_factory)
        kwargs: dict[str, Any] = {}
        if engine_cfg.tensor_parallel_size > 1:
            import ray

            self.placement_group = ray.util.get_current_placement_group()
            params = inspect.signature(factory).parameters
            if "placement_group" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
                kwargs["placement_group"] = self.placement_group
        with telemetry.verifying_context(self._tracing, "diffusion", "diffusion", self.promised) as span:
            try:
                self.engine: EngineProtocol = factory(engine_cfg, **kwargs)  # the engine verifies its context
            except ContextVerificationError as e:
                raise ContextVerificationError(
                    f"backend 'diffusion' (model {engine_cfg.model!r}) serves a context of {e.served} tokens, less "
                    f"than the promised {self.promised} (limited by {e.cause}): {e}",
                    requested=self.promised, served=e.served, cause=e.cause) from e
            self._info = i = self.engine.info()
            telemetry.set_attributes(span, {
                "gen_ai.request.model": i.model, "dgserve.context.served": i.served_context_length,
                "dgserve.context.requested": i.requested_context_length,
                "dgserve.context.max_position_embeddings": i.max_position_embeddings,
                "dgserve.kv_cache_bytes": i.kv_cache_bytes, "dgserve.max_batch": i.max_batch,
                "dgserve.tensor_parallel_size": i.tensor_parallel_size, "dgserve.device": i.device})
            check_served_context("diffusion", i.model, i.served_context_length, self.promised)
        self.stats = ReplicaStats()
        self._metrics = ReplicaMetrics("DiffusionReplica")
        log.info("diffusion replica %s serves %s: context %d, batch cap %d", self.replica, self._info.model,
                 self._info.served_context_length, self._info.max_batch)

    # -- introspection --------------------------------------------------------------------------
    def info(self) -> BackendInfo:
        i = self._info
        return BackendInfo(backend="diffusion", kind="diffusion", model=i.model,
                           served_context_length=i.served_context_length, max_batch=i.max_batch,
                           canvas_length=i.canvas_length, tensor_parallel_size=i.tensor_parallel_size)

    def healthy(self) -> bool:
        try:
            self.engine.check_health()
            return True
        except Exception:
            return False

    def check_health(self) -> None:
        """Serve's health check: raises (EngineDeadError) when the engine loop died."""
        self.engine.check_health()

    def record_routing_stats(self) -> dict[str, Any]:
        """Read by the router (through the replica actor) every ``router.capacity_refresh_s``."""
        self._metrics.in_flight(self.stats.in_flight)  # keeps the gauge alive while idle
        return {
            "replica": self.replica,
            "healthy": self.healthy(),
            "max_batch": self._info.max_batch,
            "in_flight": self.stats.in_flight,
            "peak_in_flight": self.stats.peak_in_flight,
            "engine_in_flight": self._engine_in_flight(),
            "requests": self.stats.requests,
            "steps_per_canvas": round(self.stats.steps_per_canvas_ema, 3),
            "tokens_per_s": round(self.stats.tokens_per_s(), 3),
        }

    def shutdown_engine(self) -> None:
        """Stop this replica's engine (fault injection / drain): its health check fails from now on and
        Serve replaces the replica."""
        self.engine.shutdown()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:
                pass

    def _engine_in_flight(self) -> int:
        try:
            return int(self.engine.num_in_flight())
        except Exception:
            return -1

    # -- generation -----------------------------------------------------------------------------
    async def generate_unary(self, req: BackendRequest) -> list[Event]:
        """All events in one reply (the unary API: one round trip instead of one per event)."""
        return [ev async for ev in self.generate(req) if not isinstance(ev, DraftProgress)]

    async def generate(self, req: BackendRequest) -> AsyncIterator[Event]:
        """Events of one request; a closed/cancelled stream aborts it in the engine at once, and so does
        the deadline the request carries."""
        in_flight = self.stats.admit()
        self._metrics.admitted(in_flight)
        span = self._span(req, in_flight) if self._tracing.enabled else INVALID_SPAN
        outcome = ("CANCELLED", "stream closed before the request finished")
        start = time.perf_counter()
        first: float | None = None
        stream = None
        try:
            try:
                greq = self._to_engine_request(req)
            except DGServeError as e:
                outcome = failure_code_name(e)
                yield Failure(*outcome)
                return
            stream = self.engine.generate(greq)
            async for ev in within_deadline(stream, req):
                if isinstance(ev, DraftEvent):
                    text = self.engine.tokenizer.decode(list(ev.draft_token_ids)) if self.engine.tokenizer else ""
                    yield DraftProgress(ev.canvas_index, ev.step, ev.accepted, tuple(ev.draft_token_ids), text)
                    continue
                if first is None:
                    first = time.perf_counter() - start
                    self._metrics.first_canvas(first)
                self.stats.canvas(ev.steps, len(ev.token_ids))
                self._metrics.canvas(ev.steps, len(ev.token_ids), ev.converged_by)
                telemetry.canvas_span(self._tracing, span, ev)
                if ev.token_ids or ev.text_delta:
                    yield Chunk(ev.canvas_index, ev.text_delta, tuple(ev.token_ids), ev.steps)
                if ev.finished:
                    final = self._final(ev, in_flight, first, start)
                    if isinstance(final, Failure):
                        outcome = (final.code, final.message)
                    else:
                        outcome = ("OK", "")
                        telemetry.set_final(span, final)
                    yield final
                    return
            outcome = ("INTERNAL", f"engine stream for {req.request_id} ended without a final canvas")
            yield Failure(*outcome)
        except asyncio.CancelledError:
            raise
        except (DGServeError, BackendDeadlineExceeded) as e:  # typed per-request errors, EngineDeadError, deadline
            outcome = failure_code_name(e)
            yield Failure(*outcome)
        except Exception as e:  # never leak a traceback to the client
            log.exception("request %s failed", req.request_id)
            outcome = failure_code_name(e)
            yield Failure(*outcome)
        finally:
            if stream is not None:
                await close_stream(stream)  # aborts the request in the engine and frees its slot
            self.stats.done()
            self._metrics.in_flight(self.stats.in_flight)
            telemetry.end_span(span, *outcome, rpc=False)

    def _span(self, req: BackendRequest, in_flight: int):
        """The replica's span of one request, a child of the router's span (its context rides in the request)."""
        span = self._tracing.start(f"{telemetry.operation_name(req)} {self._info.model}",
                                   parent=req.trace_context or None)
        telemetry.set_request(span, req)
        telemetry.set_attributes(span, {"gen_ai.request.model": self._info.model, "dgserve.backend": "diffusion",
                                        "dgserve.replica": self.replica, "dgserve.replica_in_flight": in_flight,
                                        "dgserve.canvas_length": self._info.canvas_length})
        return span

    def _final(self, ev: CanvasEvent, in_flight: int, first: float | None, start: float) -> Event:
        if ev.finish_reason not in ("stop", "length"):
            code = "CANCELLED" if ev.finish_reason == "cancelled" else "INTERNAL"
            return Failure(code, f"request {ev.request_id} ended with finish_reason {ev.finish_reason!r}")
        s = ev.stats
        seconds = time.perf_counter() - start
        return Final(
            finish_reason=ev.finish_reason, prompt_tokens=s.prompt_tokens if s else 0,
            completion_tokens=s.completion_tokens if s else 0, model=self._info.model, backend="diffusion",
            replica=self.replica, replica_in_flight=in_flight, first_chunk_s=first or seconds, seconds=seconds,
            steps_per_canvas=tuple(s.steps_per_canvas) if s else (), tokens_per_step=s.tokens_per_step if s else 0.0)

    def _to_engine_request(self, req: BackendRequest) -> GenerationRequest:
        tok = self.engine.tokenizer
        if tok is None:
            raise InvalidRequestError(f"model {self._info.model!r} has no tokenizer: text requests cannot be served")
        if req.messages:
            prompt = list(tok.apply_chat_template([{"role": r, "content": c} for r, c in req.messages]))
        elif req.prompt:
            prompt = list(tok.encode(req.prompt))
        else:
            prompt = []
        pinned = list(req.pinned)
        if req.infill_prefix:
            prompt += _continuation_ids(tok, req.infill_prefix) if prompt else list(tok.encode(req.infill_prefix))
        if req.infill_suffix:
            if req.max_new_tokens is None:
                raise InvalidRequestError("infill needs max_new_tokens: the suffix is pinned at the end of that window")
            suffix = _continuation_ids(tok, req.infill_suffix)
            if len(suffix) >= req.max_new_tokens:
                raise InvalidRequestError(f"infill suffix of {len(suffix)} tokens does not leave room to generate in "
                                          f"max_new_tokens {req.max_new_tokens}")
            start = req.max_new_tokens - len(suffix)
            pinned += [(start + i, t) for i, t in enumerate(suffix)]
        overrides = {k: v for k, v in req.sampling.items() if k in DIFFUSION_SAMPLING_FIELDS}
        params = SamplingParams(max_new_tokens=req.max_new_tokens, seed=req.seed,
                                stop_token_ids=tuple(req.stop_token_ids), **overrides)
        return GenerationRequest(request_id=req.request_id, prompt_token_ids=tuple(prompt), params=params,
                                 pinned=tuple(pinned), stream_drafts=req.stream_drafts)


def _continuation_ids(tok: Any, text: str) -> list[int]:
    """Token ids of text that continues a sequence (no BOS of its own)."""
    ids = list(tok.encode(text))
    bos = getattr(getattr(tok, "hf", None), "bos_token_id", None)
    if ids and bos is not None and ids[0] == bos:
        ids = ids[1:]
    return ids


async def close_stream(stream: Any) -> None:
    """Closes an async generator (which aborts an unfinished request in its backend), ignoring errors."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            pass
