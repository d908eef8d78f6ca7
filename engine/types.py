"""Plain data types crossing the engine boundary: requests in, events and results out.

These are what the serving layer (Ray Serve replicas, gRPC router) exchanges with the
engine; they are small, picklable dataclasses with no torch tensors inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters. ``None`` means: the checkpoint's generation_config.

    Attributes:
        max_new_tokens: tokens to generate at most (the last canvas is truncated to it).
        max_denoising_steps: step cap per canvas (N of the temperature schedule).
        entropy_bound: the entropy-bound sampler's budget (> 0).
        t_min: temperature at the last step; t_max: temperature at the first step.
        confidence_threshold: mean entropy under which a stable canvas commits (0 disables
            early stopping: every canvas runs ``max_denoising_steps``).
        stability_threshold: k; a canvas is stable after k+1 identical argmax canvases.
        seed: seeds this request's own random stream; the same seed gives the same
            output whatever else is in the batch. ``None`` draws a fresh seed.
        stop_token_ids: extra ids that end generation like EOS.
    """

    max_new_tokens: int | None = None
    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    confidence_threshold: float | None = None
    stability_threshold: int | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """One generation request, already tokenized.

    ``pinned`` fixes tokens at positions of the *generated* sequence (0-based offsets after
    the prompt; position p lives in canvas p // canvas_length). Pinned tokens are never
    renoised, are excluded from the entropy budget and appear unchanged in the output:
    infilling (a suffix pinned at the end) and templates (a JSON skeleton) use them.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    pinned: tuple[tuple[int, int], ...] = ()
    stream_drafts: bool = False


@dataclass(frozen=True)
class DraftEvent:
    """Progress of the canvas being denoised (only when ``stream_drafts`` is set)."""

    request_id: str
    canvas_index: int
    step: int
    accepted: int
    draft_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    completion_tokens: int
    canvases: int
    steps_per_canvas: tuple[int, ...]
    tokens_per_step: float
    seconds: float
    time_to_first_canvas: float


@dataclass(frozen=True)
class CanvasEvent:
    """A committed canvas: new output tokens and their text, emitted as soon as it commits.

    The last event of a request has ``finished=True``, ``finish_reason`` and ``stats``.
    """

    request_id: str
    canvas_index: int
    token_ids: tuple[int, ...]
    text_delta: str
    steps: int
    accepted_per_step: tuple[int, ...]
    finished: bool = False
    finish_reason: FinishReason | None = None
    stats: GenerationStats | None = None
    converged_by: Literal["stable", "step_cap"] = "step_cap"  # why the canvas committed
    mean_entropy: float = 0.0  # of the last step (nats, non-pinned positions)
    started_at: float = 0.0  # wall-clock (time.time()) of the canvas's first step ...
    committed_at: float = 0.0  # ... and of its commit: for trace spans


@dataclass(frozen=True)
class GenerationResult:
    """The whole output of a request (what the unary API returns)."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    stats: GenerationStats


@dataclass(frozen=True)
class EngineInfo:
    """What the engine really serves, as verified at start-up."""

    model: str
    canvas_length: int
    max_batch: int
    served_context_length: int
    requested_context_length: int
    max_position_embeddings: int
    vocab_size: int
    dtype: str
    device: str
    tensor_parallel_size: int
    kv_bytes_per_token: int
    kv_cache_bytes: int
    decoder_sliding_mode: str
    default_max_new_tokens: int = 256  # the checkpoint's generation_config defaults
    default_max_denoising_steps: int = 48
    context_limits: dict[str, int] = field(default_factory=dict)  # limit name -> tokens (start-up check)
    context_binding_limit: str = ""  # the limit that bounds the served context
