"""Serving subcommands: ``serve`` (local mode), ``generate --server`` (gRPC client), ``demo``.

``generate`` is shared with the engine's in-process ``generate --model``: when the engine area
registered it first, this adds the client options to that parser and answers when ``--server``
is given.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROUTINGS = ("any", "diffusion", "autoregressive")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the gRPC API locally (private Ray + Serve) until Ctrl-C")
    p.add_argument("--config", type=Path, help="AppConfig YAML (default: tiny diffusion model + SmolLM2 fallback)")
    p.add_argument("--port", type=int, help="gRPC port (default: router.grpc_port of the config, 9000)")
    p.set_defaults(func=cmd_serve)

    gen = sub._name_parser_map.get("generate")
    if gen is None:
        gen = sub.add_parser("generate", help="send a request to a running dgserve (--server)")
        gen.add_argument("--prompt", required=True, help="prompt text")
        gen.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
        gen.add_argument("--max-new-tokens", type=int, default=None)
        gen.add_argument("--seed", type=int, default=None)
        gen.add_argument("--steps", type=int, default=None, help="max denoising steps per canvas")
        gen.add_argument("--json", action="store_true", help="print the response as JSON")
        local_func = None
    else:
        local_func = gen.get_default("func")
    client = gen.add_argument_group("client of a running server (dgserve serve)")
    client.add_argument("--server", metavar="HOST:PORT", help="send the request to this dgserve gRPC endpoint")
    client.add_argument("--stream", action="store_true", help="print each committed canvas as it arrives")
    client.add_argument("--drafts", action="store_true", help="with --stream: also show draft progress")
    client.add_argument("--routing", choices=ROUTINGS, default="any", help="backend preference (default: any)")
    client.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds (default: 120)")
    client.add_argument("--traceparent", metavar="W3C", help="continue this W3C trace (00-<trace id>-<span id>-01): "
                        "sent as gRPC metadata, the router's span becomes its child")
    gen.set_defaults(func=_dispatch_generate(local_func))

    p = sub.add_parser("traces", help="receive OTLP/gRPC traces and print each one as a tree (no collector "
                       "needed: point telemetry.otlp_endpoint or OTEL_EXPORTER_OTLP_ENDPOINT here)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=4317, help="port (default: 4317, the OTLP/gRPC port)")
    p.add_argument("--settle", type=float, default=6.0, help="print a trace once no span of it arrived for this "
                   "many seconds (spans are batched for up to 5 s; default: 6)")
    p.set_defaults(func=cmd_traces)

    p = sub.add_parser("demo", help="start the local stack, send demo requests, shut down")
    p.add_argument("--port", type=int, default=None, help="gRPC port (default: a free one)")
    p.set_defaults(func=cmd_demo)


def _dispatch_generate(local_func: Any):
    def run(args: argparse.Namespace) -> int:
        if args.server:
            return cmd_generate(args)
        if local_func is not None:
            return local_func(args)
        print("dgserve generate: --server HOST:PORT is required", file=sys.stderr)
        return 2
    return run


# --- serve ---------------------------------------------------------------------------------------

def _load_config(path: Path | None, port: int | None):
    from dgserve.serving.config import AppConfig
    from dgserve.serving.local import default_config

    if path is None:
        return default_config(port)
    cfg = AppConfig.from_yaml(path)
    if port is not None:
        cfg = cfg.model_copy(update={"router": cfg.router.model_copy(update={"grpc_port": port})})
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    from dgserve.serving import local

    try:
        cfg = _load_config(args.config, args.port)
    except (OSError, ValueError) as e:
        print(f"dgserve serve: bad config: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"dgserve: starting Ray and Serve (state in {local.state_dir()}) ...", file=sys.stderr)
    try:
        with local.local_stack(cfg) as target:
            print(f"dgserve: serving dgserve.v1.DGServe and grpc.health.v1.Health on {target} "
                  f"(app {cfg.name!r}, promised context {cfg.promised_context_length}); Ctrl-C stops", flush=True)
            stop.wait()
            print("dgserve: shutting down ...", file=sys.stderr)
    except local.DeployError as e:
        print(f"dgserve serve: {e}", file=sys.stderr)
        return 1
    return 0


# --- generate --server ---------------------------------------------------------------------------

def _request(args: argparse.Namespace):
    from dgserve.serving.client import make_request

    sampling = {"max_denoising_steps": args.steps} if getattr(args, "steps", None) else {}
    if args.chat:
        return make_request(messages=[("user", args.prompt)], max_new_tokens=args.max_new_tokens, seed=args.seed,
                            routing=args.routing, stream_drafts=args.drafts, **sampling)
    return make_request(args.prompt, max_new_tokens=args.max_new_tokens, seed=args.seed, routing=args.routing,
                        stream_drafts=args.drafts, **sampling)


def _summary(msg: Any) -> str:
    from dgserve.v1 import dgserve_pb2 as pb

    backend = pb.Backend.Name(msg.backend).removeprefix("BACKEND_").lower()
    parts = [f"backend={backend}", f"replica={msg.replica}", f"model={msg.model}",
             f"tokens={msg.usage.completion_tokens}", f"finish={pb.FinishReason.Name(msg.finish_reason)[14:].lower()}",
             f"queue={msg.timings.queue_ms:.1f}ms", f"total={msg.timings.total_ms:.0f}ms",
             f"tok/s={msg.timings.tokens_per_second:.1f}"]
    if msg.denoising.canvases:
        parts.append(f"steps/canvas={list(msg.denoising.steps_per_canvas)}")
    return " ".join(parts)


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from dgserve.serving.client import Client

    req = _request(args)
    metadata = [("traceparent", args.traceparent)] if getattr(args, "traceparent", None) else []
    with Client(args.server) as client:
        try:
            if not args.stream:
                resp = client.generate(req, timeout=args.timeout, metadata=metadata)
                if args.json:
                    print(json.dumps(MessageToDict(resp), indent=2))
                else:
                    print(resp.text)
                    print(_summary(resp), file=sys.stderr)
                return 0
            for msg in client.stream(req, timeout=args.timeout, metadata=metadata):
                kind = msg.WhichOneof("event")
                if args.json:
                    print(json.dumps(MessageToDict(msg)), flush=True)
                elif kind == "chunk":
                    print(msg.chunk.text, end="", flush=True)
                elif kind == "draft":
                    print(f"\n[draft canvas {msg.draft.canvas_index} step {msg.draft.step}: "
                          f"{msg.draft.accepted} accepted]", file=sys.stderr, flush=True)
                if msg.finished and not args.json:
                    print()
                    print(_summary(msg), file=sys.stderr)
            return 0
        except grpc.RpcError as e:
            print(f"dgserve generate: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1


# --- traces --------------------------------------------------------------------------------------

def cmd_traces(args: argparse.Namespace) -> int:
    from dgserve.serving.otlp_receiver import Receiver, format_trace

    last_seen: dict[str, float] = {}
    lock = threading.Lock()

    def arrived(spans: list) -> None:
        with lock:
            for s in spans:
                last_seen[s.trace_id] = time.monotonic()

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        receiver = Receiver(args.port, args.host, on_spans=arrived).start()
    except RuntimeError as e:
        print(f"dgserve traces: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    print(f"dgserve traces: OTLP/gRPC receiver on {receiver.endpoint}; Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.5):
            with lock:
                settled = [t for t, at in last_seen.items() if time.monotonic() - at >= args.settle]
                for t in settled:
                    del last_seen[t]
            for t in settled:
                print(format_trace(receiver.trace(t)), flush=True)
    finally:
        receiver.stop()
    return 0


# --- demo ----------------------------------------------------------------------------------------

DEMO_PROMPT = "Write one sentence about why the sky is blue."


def cmd_demo(args: argparse.Namespace) -> int:
    import grpc

    from dgserve.serving import local
    from dgserve.serving.client import make_request

    port = args.port or local.free_port()
    cfg = local.default_config(port)
    print(f"dgserve demo: starting the local stack (Ray + Serve, state in {local.state_dir()}); the first run "
          "also writes the tiny diffusion checkpoint and dequantizes SmolLM2 (a minute on 2 cores) ...", flush=True)
    t0 = time.perf_counter()
    try:
        with local.local_stack(cfg) as target:
            from dgserve.serving.client import Client

            print(f"dgserve demo: serving on {target} after {time.perf_counter() - t0:.0f}s", flush=True)
            with Client(target) as client:
                info = client.info()
                print(f"  diffusion model {info.model!r}: context {info.served_context_length} (promised "
                      f"{info.promised_context_length}), canvas {info.canvas_length}, batch cap {info.max_batch}")
                for routing, note in (("diffusion", "tiny checkpoint with random weights: its text is noise"),
                                      ("autoregressive", "the SmolLM2-135M-Instruct fallback")):
                    req = make_request(messages=[("user", DEMO_PROMPT)], max_new_tokens=48, seed=0, routing=routing)
                    print(f"\n> {routing} ({note}), streaming:", flush=True)
                    final = None
                    for msg in client.stream(req, timeout=300):
                        if msg.WhichOneof("event") == "chunk":
                            print(msg.chunk.text, end="", flush=True)
                        if msg.finished:
                            final = msg
                    print()
                    print(f"  {_summary(final)}", flush=True)
    except local.DeployError as e:
        print(f"dgserve demo: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"dgserve demo: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print("\ndgserve demo: stopped the local stack.")
    return 0
