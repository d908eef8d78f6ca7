"""Local mode: one machine, a private Ray, the whole app behind Serve's gRPC proxy on localhost.

Ray's temp dir lives in the state dir (``dgserve.paths.state_dir()/ray``) and Ray's token auth is
off (``RAY_AUTH_MODE=disabled``), so nothing is written under ``~/.ray``. The default config serves
the trained Sudoku DiffusionGemma checkpoint shipped in the package (``dgserve.engine.sudoku``,
docs/sudoku.md) with the SmolLM2 fallback; ``diffusion_model="tiny"`` (``--diffusion-model tiny``)
serves the tiny random-weight checkpoint instead (generated once into the state dir).

Local mode always puts the gRPC front (``serving/front.py``) on the public port: TLS when
``security.tls`` is set, plaintext only when ``security.allow_plaintext`` is (the built-in default
config allows it, on loopback), bearer tokens, message-size and per-client limits. Serve's gRPC proxy
moves to ``security.proxy_port`` (a free port when unset). Note: Ray 2.60's gRPC proxy listens on
every interface (``[::]:port``) whatever we do; the router checks the token again behind it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dgserve.paths import state_dir

from .config import AppConfig

log = logging.getLogger("dgserve.serving")

LOCAL_PROMISED_CONTEXT = 2048
MAX_TEMP_DIR_CHARS = 40  # Ray puts unix sockets under <temp>/session_<date>_<pid>/sockets/...: 107-char limit


class DeployError(RuntimeError):
    """The application did not start; the message carries every failing deployment's reason."""


def tiny_model_dir() -> Path:
    """The bundled small diffusion checkpoint: generated once into the state dir."""
    from dgserve.engine.tiny import make_tiny_model

    path = state_dir() / "models" / "tiny-diffusiongemma"
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        log.info("writing the tiny diffusion checkpoint to %s", path)
        make_tiny_model(path)
    return path


DIFFUSION_MODELS = ("sudoku", "tiny")  # choices of the local mode's diffusion model; the first is the default
SUDOKU_MODEL_NAME = "sudoku-diffusiongemma"


def sudoku_model_dir() -> Path | None:
    """The trained Sudoku checkpoint shipped as package data, or None when this install lacks its weights."""
    from dgserve.engine.sudoku.solve import default_checkpoint

    path = default_checkpoint()
    return path if (path / "config.json").exists() and (path / "model.safetensors").exists() else None


def diffusion_model(which: str = DIFFUSION_MODELS[0]) -> tuple[Path, str]:
    """(checkpoint directory, model name) of the local mode's diffusion model: ``"sudoku"`` (the bundled
    trained checkpoint; the tiny one, with a warning, when the install lacks it) or ``"tiny"``."""
    if which not in DIFFUSION_MODELS:
        raise ValueError(f"diffusion model must be one of {DIFFUSION_MODELS}, got {which!r}")
    if which == "sudoku":
        path = sudoku_model_dir()
        if path is not None:
            return path, SUDOKU_MODEL_NAME
        log.warning("the bundled Sudoku checkpoint is missing from this install; serving the tiny random one")
    return tiny_model_dir(), "tiny-diffusiongemma"


def default_config(port: int | None = None, diffusion: str = DIFFUSION_MODELS[0]) -> AppConfig:
    """The embedded default: the bundled Sudoku diffusion model (``diffusion="tiny"``: the tiny random one;
    1 replica, batch cap 4) + SmolLM2 fallback, plaintext explicitly allowed on loopback only."""
    model, name = diffusion_model(diffusion)
    cfg: dict[str, Any] = {
        "promised_context_length": LOCAL_PROMISED_CONTEXT,
        "diffusion": {"engine": {"model": str(model), "model_name": name,
                                 "max_batch": 4, "device": "cpu"}},
        "fallback": {"kind": "smollm2", "max_batch": 8, "default_max_new_tokens": 64},
        "security": {"allow_plaintext": True, "listen_host": "127.0.0.1"},
    }
    if port is not None:
        cfg["router"] = {"grpc_port": port}
    return AppConfig.model_validate(cfg)


def ray_temp_dir() -> Path:
    """``<state>/ray``, or a short per-state-dir folder in the system temp dir when that path is too long
    for Ray's unix sockets."""
    path = state_dir() / "ray"
    if len(str(path)) > MAX_TEMP_DIR_CHARS:
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        path = Path(tempfile.gettempdir()) / f"dgserve-ray-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(num_cpus: int | None = None, *, max_message_bytes: int | None = None) -> None:
    """A private local Ray (no dashboard, temp dir in the state dir, auth off); ``max_message_bytes`` caps
    the request size Serve's gRPC proxy accepts (Ray's default is 2 GiB)."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    if max_message_bytes is not None:
        os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = str(max_message_bytes)
    os.environ.setdefault("DGSERVE_STATE_DIR", str(state_dir()))  # replicas find the model cache there
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    if ray.is_initialized():
        return
    ray.init(_temp_dir=str(ray_temp_dir()), num_cpus=num_cpus or max(2, os.cpu_count() or 2),
             include_dashboard=False, log_to_driver=False, configure_logging=False)


def start_serve(grpc_port: int) -> None:
    from ray import serve
    from ray.serve.config import gRPCOptions

    from .config import GRPC_SERVICER_FUNCTIONS

    serve.start(
        http_options={"host": "127.0.0.1", "port": free_port()},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS)),
    )


def deploy(config: AppConfig, **build_kwargs: Any) -> None:
    """Deploy (or replace) the app and wait until it runs; DeployError names every failing deployment."""
    from ray import serve

    from .app import build_app

    try:
        serve.run(build_app(config, **build_kwargs), name=config.name, route_prefix="/", blocking=False)
    except RuntimeError as e:
        raise DeployError(f"application {config.name!r} failed to start: {deployment_failures(config.name) or e}") \
            from None


def deployment_failures(app: str) -> str:
    from ray import serve

    try:
        status = serve.status().applications[app]
    except KeyError:
        return ""
    msgs = [f"{name}: {_last_error_line(d.message)}" for name, d in status.deployments.items() if d.message]
    return "; ".join(msgs) or status.message


def _last_error_line(message: str) -> str:
    """The exception line at the end of a deployment's failure message (no traceback)."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if not lines:
        return message
    last = lines[-1]
    head, sep, rest = last.partition(": ")
    if sep and "." in head and " " not in head:  # "pkg.module.SomeError: text" -> "SomeError: text"
        return f"{head.rsplit('.', 1)[-1]}: {rest}"
    return last


def wait_healthy(target: str, timeout_s: float = 60.0) -> None:
    """Until grpc.health.v1 answers SERVING through the proxy (the proxy starts routing a moment after
    the app is up)."""
    from .client import Client

    deadline = time.monotonic() + timeout_s
    last: str = ""
    with Client(target) as client:
        while time.monotonic() < deadline:
            try:
                if client.health(timeout=2.0) == "SERVING":
                    return
                last = "NOT_SERVING"
            except Exception as e:  # proxy not routing yet
                last = str(e)
            time.sleep(0.2)
    raise DeployError(f"{target} did not become healthy within {timeout_s}s (last: {last})")


def shutdown() -> None:
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        serve.shutdown()
    ray.shutdown()


def with_front(config: AppConfig) -> AppConfig:
    """``config`` with a proxy port for the front (a free one when ``security.proxy_port`` is unset)."""
    if config.security.proxy_port is not None:
        return config
    security = config.security.model_copy(update={"proxy_port": free_port()})
    return config.model_copy(update={"security": security})


@contextlib.contextmanager
def local_stack(config: AppConfig, *, startup_timeout_s: float = 600.0, **build_kwargs: Any) -> Iterator[str]:
    """Start Ray + Serve behind the front, deploy ``config``, yield ``"127.0.0.1:PORT"`` (the front's port);
    shut everything down on exit. Refuses plaintext that was not explicitly allowed before starting anything."""
    from .front import Front, FrontThread
    from .security import check_transport

    check_transport(config.security)
    config = with_front(config)
    front = FrontThread(Front.from_config(config))  # reads its TLS and token files now: fails before Ray starts
    start_ray(max_message_bytes=config.security.limits.max_message_bytes)
    try:
        start_serve(config.serve_grpc_options()["port"])
        deploy(config, **build_kwargs)
        wait_healthy(f"127.0.0.1:{config.security.proxy_port}", timeout_s=startup_timeout_s)
        port = front.start()
        yield f"127.0.0.1:{port}"
    finally:
        front.stop()
        shutdown()
