"""The synchronous engine: load, verify, admit requests, step.

``step()`` is the whole loop body: schedule -> run -> postprocess. Diffusion specifics
(canvas, entropy bound, commit) live in the scheduler and the sampler, not here.
"""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import torch

from .config import EngineConfig, GenerationDefaults, ModelConfig
from .context import ContextReport, kv_budget_bytes, verify_context
from .cpu import keep_large_blocks
from .errors import ConfigError, ContextLengthExceededError, InvalidRequestError
from .kv_cache import KVCache
from .loader import load_model
from .parallel.group import TPGroup
from .parallel.sharding import shard_config
from .runner import ModelRunner
from .scheduler import Event, Scheduler
from .sequence import ResolvedParams, Sequence
from .tokenizer import Tokenizer
from .types import CanvasEvent, EngineInfo, GenerationRequest, GenerationResult

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MAX_STEPS = 4096  # refuse absurd step counts: a canvas must finish in bounded time
MAX_STABILITY = 64


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return dev


def resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32  # bf16 matmuls are slow on most CPUs
    return DTYPES.get(cfg.torch_dtype, torch.bfloat16)


class Engine:
    """One rank's engine. ``tp``: this rank's tensor-parallel group (``parallel.launch`` builds it;
    rank 0 is then a ``parallel.driver.TPEngine``, the other ranks follow its commands)."""

    def __init__(self, config: EngineConfig, *, progress: bool = True, tp: TPGroup | None = None) -> None:
        self.config = config
        self.tp = tp
        path = Path(config.model)
        if config.tensor_parallel_size != (tp.size if tp is not None else 1):
            raise ConfigError(f"tensor_parallel_size {config.tensor_parallel_size} needs that many ranks: start the "
                              f"engine with dgserve.engine.parallel.launch(config) or under torchrun")
        self.model_config = cfg = ModelConfig.from_dir(path)
        defaults = GenerationDefaults.from_dir(path, cfg.raw.get("text_config", cfg.raw))
        overrides = {k: getattr(config, k) for k in ("max_denoising_steps", "entropy_bound", "confidence_threshold")
                     if getattr(config, k) is not None}
        self.defaults = dataclasses.replace(defaults, **overrides)  # the app's defaults beat the checkpoint's
        if config.prefill_chunk_size < cfg.canvas_length:
            raise ConfigError(f"prefill_chunk_size {config.prefill_chunk_size} must be >= canvas_length "
                              f"{cfg.canvas_length} (a commit writes one canvas in one forward)")
        self.device = tp.device if tp is not None else resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, cfg, self.device)
        if self.device.type == "cpu":
            keep_large_blocks()
        self.tokenizer = Tokenizer.from_dir(path) if tp is None or tp.rank == 0 else None
        self.model = load_model(path, cfg, dtype=self.dtype, device=self.device,
                                decoder_sliding_window=config.decoder_sliding_window, progress=progress, tp=tp)
        dtype_bytes = torch.finfo(self.dtype).bits // 8
        cache_cfg = cfg if tp is None else shard_config(cfg, tp.size)  # this rank's KV heads
        budget = kv_budget_bytes(self.device, config.kv_cache_memory_bytes, config.gpu_memory_utilization)
        if tp is not None:  # every rank serves the same context: the fullest device decides
            budget = tp.agree_min(budget)
        self.context: ContextReport = verify_context(
            cache_cfg, requested=config.context_length, max_batch=config.max_batch,
            chunk_tokens=config.prefill_chunk_size, dtype_bytes=dtype_bytes, kv_budget=budget)
        self.context_length = config.context_length or self.context.served
        self.cache = KVCache(cache_cfg, config.max_batch, self.context_length, config.prefill_chunk_size,
                             self.dtype, self.device)
        self.runner = ModelRunner(self.model, self.cache, cfg, self.device, tp)
        self.scheduler = Scheduler(cfg, config.max_batch, config.prefill_chunk_size, self.cache,
                                   self._detokenize, self.device)
        self.model_name = config.model_name or path.resolve().name

    # -- info ----------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        cfg = self.model_config
        return EngineInfo(
            model=self.model_name, canvas_length=cfg.canvas_length, max_batch=self.config.max_batch,
            served_context_length=self.context_length,
            requested_context_length=self.config.context_length or self.context_length,
            max_position_embeddings=cfg.max_position_embeddings, vocab_size=cfg.vocab_size,
            dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
            tensor_parallel_size=self.config.tensor_parallel_size,
            kv_bytes_per_token=self.context.kv_bytes_per_token, kv_cache_bytes=self.cache.nbytes,
            decoder_sliding_mode=self.config.decoder_sliding_window,
            default_max_new_tokens=self.defaults.max_new_tokens,
            default_max_denoising_steps=self.defaults.max_denoising_steps,
            context_limits=dict(self.context.limits), context_binding_limit=self.context.cause,
        )

    def _detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    # -- requests ------------------------------------------------------------------------
    def make_sequence(self, req: GenerationRequest) -> Sequence:
        """Validates a request (typed errors naming the value and the limit) -> a new sequence."""
        cfg, d, p = self.model_config, self.defaults, req.params
        if not req.request_id:
            raise InvalidRequestError("request_id must not be empty")
        prompt = req.prompt_token_ids
        if len(prompt) == 0:
            raise InvalidRequestError("prompt is empty: at least one token is required")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
        max_new = d.max_new_tokens if p.max_new_tokens is None else p.max_new_tokens
        if max_new <= 0:
            raise InvalidRequestError(f"max_new_tokens must be positive, got {max_new}")
        limit = self.context_length
        if len(prompt) + max_new > limit:
            raise ContextLengthExceededError(
                f"prompt of {len(prompt)} tokens + max_new_tokens {max_new} = {len(prompt) + max_new} exceeds the "
                f"served context of {limit} tokens", requested=len(prompt) + max_new, limit=limit)
        steps = d.max_denoising_steps if p.max_denoising_steps is None else p.max_denoising_steps
        if not 1 <= steps <= MAX_STEPS:
            raise InvalidRequestError(f"max_denoising_steps must be in 1..{MAX_STEPS}, got {steps}")
        bound = d.entropy_bound if p.entropy_bound is None else p.entropy_bound
        if not bound > 0:
            raise InvalidRequestError(f"entropy_bound must be > 0, got {bound}")
        t_min = d.t_min if p.t_min is None else p.t_min
        t_max = d.t_max if p.t_max is None else p.t_max
        if not (t_min >= 0 and t_max >= t_min and t_max > 0 and t_max < 1e4):
            raise InvalidRequestError(f"temperatures need 0 <= t_min <= t_max, 0 < t_max < 1e4; got "
                                      f"t_min={t_min}, t_max={t_max}")
        conf = d.confidence_threshold if p.confidence_threshold is None else p.confidence_threshold
        if not conf >= 0:
            raise InvalidRequestError(f"confidence_threshold must be >= 0, got {conf}")
        stab = d.stability_threshold if p.stability_threshold is None else p.stability_threshold
        if not 0 <= stab <= MAX_STABILITY:
            raise InvalidRequestError(f"stability_threshold must be in 0..{MAX_STABILITY}, got {stab}")
        stop = set(d.eos_token_ids) | set(p.stop_token_ids)
        bad = [t for t in p.stop_token_ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise InvalidRequestError(f"stop token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
        pinned: dict[int, int] = {}
        for pos, tok in req.pinned:
            if not 0 <= pos < max_new:
                raise InvalidRequestError(f"pinned position {pos} is outside the generated range "
                                          f"[0, max_new_tokens={max_new})")
            if not 0 <= tok < cfg.vocab_size:
                raise InvalidRequestError(f"pinned token id {tok} at position {pos} is outside the vocabulary "
                                          f"[0, {cfg.vocab_size})")
            if pinned.get(pos, tok) != tok:
                raise InvalidRequestError(f"pinned position {pos} is given two different tokens "
                                          f"({pinned[pos]} and {tok})")
            pinned[pos] = tok
        seed = p.seed if p.seed is not None else secrets.randbits(63)
        if not 0 <= seed < 2**64:
            raise InvalidRequestError(f"seed must be in [0, 2**64), got {seed}")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        params = ResolvedParams(max_new, steps, float(bound), float(t_min), float(t_max), float(conf), stab, seed,
                                frozenset(stop))
        return Sequence(request=req, params=params, pinned=pinned, generator=gen)

    def add_request(self, req: GenerationRequest) -> Sequence:
        if any(s.request_id == req.request_id for s in (*self.scheduler.waiting, *self.scheduler.running)):
            raise InvalidRequestError(f"request_id {req.request_id!r} is already in flight")
        seq = self.make_sequence(req)
        self.add_sequence(seq)
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a sequence from ``make_sequence`` (the async front validates before queueing)."""
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Event]:
        plan = self.scheduler.schedule()
        outputs = self.runner.run(plan)
        return self.scheduler.postprocess(plan, outputs)

    def check_health(self) -> None:
        """Raises EngineDeadError when the engine cannot serve (a tensor-parallel rank died)."""

    def shutdown(self) -> None:
        """Releases what the engine holds beyond memory (tensor-parallel ranks); idempotent."""

    # -- convenience ---------------------------------------------------------------------
    def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Runs requests to completion (offline use: benchmarks, evaluation, the CLI)."""
        for r in requests:
            self.add_request(r)
        done: dict[str, GenerationResult] = {}
        tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
        while self.has_unfinished():
            for ev in self.step():
                if isinstance(ev, CanvasEvent):
                    tokens[ev.request_id] += ev.token_ids
                    if ev.finished:
                        ids = tokens[ev.request_id]
                        done[ev.request_id] = GenerationResult(ev.request_id, tuple(ids), self._detokenize(ids),
                                                               ev.finish_reason, ev.stats)
        return [done[r.request_id] for r in requests]
