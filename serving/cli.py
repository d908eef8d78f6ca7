"""Serving subcommands: ``serve`` (local mode), ``generate --server`` (gRPC client), ``demo``, ``front``
(the TLS/auth front of Serve's gRPC proxy: the Kubernetes sidecar).

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
    p.add_argument("--config", type=Path, help="AppConfig YAML (default: the bundled Sudoku diffusion model + "
                   "SmolLM2 fallback)")
    p.add_argument("--port", type=int, help="gRPC port (default: router.grpc_port of the config, 9000)")
    _add_diffusion_model_arg(p)
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
    add_client_security_args(client)
    gen.set_defaults(func=_dispatch_generate(local_func))

    p = sub.add_parser("front", help="run the gRPC front (TLS / mutual TLS, bearer token, limits) before Serve's "
                       "gRPC proxy; the Kubernetes sidecar (docs/security.md)")
    p.add_argument("--port", type=int, required=True, help="public port to listen on")
    p.add_argument("--host", default="[::]", help="address to listen on (default: every interface)")
    p.add_argument("--upstream", required=True, metavar="HOST:PORT", help="Serve's gRPC proxy")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain (tls.crt)")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key (tls.key)")
    p.add_argument("--tls-client-ca", metavar="FILE", help="PEM CA bundle: mutual TLS, client certificates required")
    p.add_argument("--tls-client-cert-optional", action="store_true",
                   help="with --tls-client-ca: verify a client certificate only when one is presented")
    p.add_argument("--allow-plaintext", action="store_true", help="serve without TLS (refused otherwise)")
    p.add_argument("--token-file", metavar="FILE", help="accepted bearer token(s), one per line")
    p.add_argument("--max-message-bytes", type=int, default=None, help="largest request message (default 4 MiB)")
    p.add_argument("--max-concurrent-per-client", type=int, default=None,
                   help="requests in flight per client (default 64; 0 = no cap)")
    p.set_defaults(func=cmd_front)

    p = sub.add_parser("traces", help="receive OTLP/gRPC traces and print each one as a tree (no collector "
                       "needed: point telemetry.otlp_endpoint or OTEL_EXPORTER_OTLP_ENDPOINT here)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=4317, help="port (default: 4317, the OTLP/gRPC port)")
    p.add_argument("--settle", type=float, default=6.0, help="print a trace once no span of it arrived for this "
                   "many seconds (spans are batched for up to 5 s; default: 6)")
    p.set_defaults(func=cmd_traces)

    p = sub.add_parser("demo", help="start the local stack, send demo requests, shut down")
    p.add_argument("--port", type=int, default=None, help="gRPC port (default: a free one)")
    _add_diffusion_model_arg(p)
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

def _add_diffusion_model_arg(p: argparse.ArgumentParser) -> None:
    from dgserve.serving.local import DIFFUSION_MODELS

    p.add_argument("--diffusion-model", choices=DIFFUSION_MODELS, default=DIFFUSION_MODELS[0],
                   help="the local stack's diffusion model (ignored with --config): the bundled trained Sudoku "
                   "checkpoint (default) or the tiny random-weight one")


def _load_config(path: Path | None, port: int | None, diffusion: str = "sudoku"):
    from dgserve.serving.config import AppConfig
    from dgserve.serving.local import default_config

    if path is None:
        return default_config(port, diffusion)
    cfg = AppConfig.from_yaml(path)
    if port is not None:
        cfg = cfg.model_copy(update={"router": cfg.router.model_copy(update={"grpc_port": port})})
    return cfg


def add_client_security_args(group: Any) -> None:
    """TLS and token options of every client command (generate, loadtest)."""
    group.add_argument("--tls-ca", metavar="FILE", help="connect with TLS, trusting this PEM CA bundle")
    group.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    group.add_argument("--tls-cert", metavar="FILE", help="mutual TLS: this client's PEM certificate")
    group.add_argument("--tls-key", metavar="FILE", help="mutual TLS: this client's PEM private key")
    group.add_argument("--server-name", metavar="NAME", help="verify the server certificate against this name "
                       "(default: the host of --server/--target)")
    group.add_argument("--token-file", metavar="FILE", help="send the bearer token in this file "
                       "(or set DGSERVE_TOKEN)")


def client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``Client(target, **client_kwargs(args))`` from the options of :func:`add_client_security_args`."""
    import os

    from dgserve.serving.security import channel_credentials

    out: dict[str, Any] = {}
    if args.tls or args.tls_ca or args.tls_cert:
        out["credentials"] = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    if args.server_name:
        out["server_name"] = args.server_name
    token = Path(args.token_file).read_text().strip().splitlines()[0] if args.token_file else \
        os.environ.get("DGSERVE_TOKEN")
    if token:
        out["token"] = token.strip()
    return out


def cmd_front(args: argparse.Namespace) -> int:
    import asyncio

    from dgserve.engine.errors import ConfigError
    from dgserve.serving.config import LimitSettings, TLSSettings
    from dgserve.serving.front import Front

    limits: dict[str, Any] = {}
    if args.max_message_bytes is not None:
        limits["max_message_bytes"] = args.max_message_bytes
    if args.max_concurrent_per_client is not None:
        limits["max_concurrent_per_client"] = args.max_concurrent_per_client or None
    try:
        tls = None
        if args.tls_cert or args.tls_key:
            tls = TLSSettings(cert_file=args.tls_cert or "", key_file=args.tls_key or "",
                              client_ca_file=args.tls_client_ca, require_client_cert=not args.tls_client_cert_optional)
        front = Front(upstream=args.upstream, port=args.port, host=args.host, tls=tls,
                      allow_plaintext=args.allow_plaintext, token_file=args.token_file,
                      limits=LimitSettings(**limits))
    except (ConfigError, ValueError) as e:
        print(f"dgserve front: {e}", file=sys.stderr)
        return 2

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        port = await front.start()
        print(f"dgserve front: {front.transport} on {args.host}:{port} -> {args.upstream}", flush=True)
        await stop.wait()
        await front.stop(5.0)

    try:
        asyncio.run(run())
    except OSError as e:
        print(f"dgserve front: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dgserve.engine.errors import ConfigError
    from dgserve.serving import local
    from dgserve.serving.security import endpoint_summary

    try:
        cfg = _load_config(args.config, args.port, args.diffusion_model)
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
            print(f"dgserve: endpoint {endpoint_summary(cfg)}", file=sys.stderr, flush=True)
            stop.wait()
            print("dgserve: shutting down ...", file=sys.stderr)
    except (local.DeployError, ConfigError) as e:
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
    with Client(args.server, **client_kwargs(args)) as client:
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
    cfg = local.default_config(port, args.diffusion_model)
    sudoku = cfg.diffusion.engine.model_name == local.SUDOKU_MODEL_NAME
    first_run = "dequantizes SmolLM2" if sudoku else "writes the tiny diffusion checkpoint and dequantizes SmolLM2"
    print(f"dgserve demo: starting the local stack (Ray + Serve, state in {local.state_dir()}); the first run "
          f"also {first_run} (a minute on 2 cores) ...", flush=True)
    t0 = time.perf_counter()
    try:
        with local.local_stack(cfg) as target:
            from dgserve.serving.client import Client

            print(f"dgserve demo: serving on {target} after {time.perf_counter() - t0:.0f}s", flush=True)
            with Client(target) as client:
                info = client.info()
                print(f"  diffusion model {info.model!r}: context {info.served_context_length} (promised "
                      f"{info.promised_context_length}), canvas {info.canvas_length}, batch cap {info.max_batch}")
                demos = [("autoregressive", "the SmolLM2-135M-Instruct fallback")]
                if sudoku:
                    _demo_sudoku(client)
                else:
                    demos.insert(0, ("diffusion", "tiny checkpoint with random weights: its text is noise"))
                for routing, note in demos:
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


def _demo_sudoku(client: Any) -> bool:
    """One held-out Sudoku through the stack (given cells pinned, DIFFUSION_ONLY, drafts streamed);
    prints the puzzle beside the model's grid and whether it is solved."""
    from dgserve.engine.sudoku import grid
    from dgserve.engine.sudoku.remote import DEMO_PUZZLE, build_request
    from dgserve.engine.sudoku.tokenizer import ids_grid

    puzzle = grid.parse(DEMO_PUZZLE)
    req = build_request(puzzle, steps=32, seed=0)
    req.stream_drafts = True
    blanks = sum(1 for v in puzzle if not v)
    print(f"\n> diffusion (the bundled Sudoku checkpoint: a held-out puzzle with {blanks} blanks, given cells "
          "pinned, DIFFUSION_ONLY), streaming drafts:", flush=True)
    ids: list[int] = []
    final = None
    for msg in client.stream(req, timeout=300):
        kind = msg.WhichOneof("event")
        if kind == "draft":
            print(f"  step {msg.draft.step}: {msg.draft.accepted} of the {blanks} blank cells accepted", flush=True)
        elif kind == "chunk":
            ids.extend(msg.chunk.token_ids)
        if msg.finished:
            final = msg
    solved = ids_grid(ids[:81]) if len(ids) >= 81 else tuple(ids_grid(ids)) + (0,) * (81 - len(ids))
    print("  puzzle         model's grid")
    for r in range(9):
        print(f"  {_sudoku_row(puzzle, r)}    {_sudoku_row(solved, r)}")
    ok = grid.is_valid_solution(solved, puzzle)
    print(f"  {'solved' if ok else 'NOT solved'}: {grid.format_grid(solved, blank='0')}")
    print(f"  {_summary(final)}", flush=True)
    return ok


def _sudoku_row(g: Any, r: int) -> str:
    return " ".join("".join(str(v) if v else "." for v in g[9 * r + 3 * b: 9 * r + 3 * b + 3]) for b in range(3))
