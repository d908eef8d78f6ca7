"""A small in-process OTLP/gRPC trace receiver (``opentelemetry-proto``'s ``TraceServiceServicer``).

What the tests export to, and ``dgserve traces`` for looking at a local stack's traces without a
collector: it prints every trace as a tree of spans with their durations and dgserve/GenAI attributes.
Not a collector: spans are kept in memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_id: str  # "" for a root span (or a span whose parent is in the client)
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str = ""
    events: tuple[str, ...] = field(default=())

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def _attrs(kvs: Iterable[Any]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """``with Receiver() as r:`` serves on ``r.endpoint`` (127.0.0.1:port) and collects ``r.spans``."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1",
                 on_spans: Callable[[list[ReceivedSpan]], None] | None = None) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        self.endpoint = f"{host}:{self.port}"
        self._spans: list[ReceivedSpan] = []
        self._cond = threading.Condition()
        self._on_spans = on_spans

    # -- gRPC -----------------------------------------------------------------------------------
    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any):
        got = []
        for rs in request.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(ReceivedSpan(
                        trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(),
                        name=s.name, kind=s.kind, start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                        attributes=_attrs(s.attributes), resource=resource, status_code=s.status.code,
                        status_message=s.status.message, events=tuple(e.name for e in s.events)))
        with self._cond:
            self._spans.extend(got)
            self._cond.notify_all()
        if self._on_spans is not None:
            self._on_spans(got)
        return trace_service_pb2.ExportTraceServiceResponse()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Receiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- reading --------------------------------------------------------------------------------
    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            return list(self._spans)

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], Any], timeout_s: float = 30.0) -> Any:
        """Wait until ``predicate(spans)`` is truthy and return its value; TimeoutError (with what arrived)
        otherwise."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                got = predicate(list(self._spans))
                if got:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({s.name for s in self._spans})
                    raise TimeoutError(f"no matching spans within {timeout_s}s; received {len(self._spans)} "
                                       f"spans named {names}")
                self._cond.wait(left)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return sorted((s for s in self.spans if s.trace_id == trace_id), key=lambda s: s.start_ns)


SHOWN_ATTRIBUTES = ("dgserve.component", "dgserve.backend", "dgserve.routing.reason", "dgserve.routing.queue_wait_s",
                    "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "dgserve.canvas.steps",
                    "dgserve.canvas.converged_by", "dgserve.canvas.tokens", "dgserve.context.served",
                    "dgserve.context.promised", "dgserve.context.verified", "error.type")


def format_trace(spans: list[ReceivedSpan]) -> str:
    """One trace as an indented tree: ``name  12.3 ms  key=value ...``."""
    ids = {s.span_id for s in spans}
    children: dict[str, list[ReceivedSpan]] = {}
    for s in sorted(spans, key=lambda s: s.start_ns):
        children.setdefault(s.parent_id if s.parent_id in ids else "", []).append(s)
    lines = [f"trace {spans[0].trace_id}" if spans else "trace (empty)"]

    def walk(parent: str, depth: int) -> None:
        for s in children.get(parent, []):
            shown = " ".join(f"{k.rsplit('.', 1)[-1]}={_short(s.attributes[k])}" for k in SHOWN_ATTRIBUTES
                             if k in s.attributes)
            lines.append(f"{'  ' * (depth + 1)}{s.name}  {s.seconds * 1e3:.1f} ms  {shown}".rstrip())
            walk(s.span_id, depth + 1)

    walk("", 0)
    return "\n".join(lines)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
