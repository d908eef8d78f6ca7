"""Per-request state: where a request is in its own life (prefill, denoise step k, commit)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .types import GenerationRequest


class Phase(enum.Enum):
    WAITING = "waiting"  # queued, no slot yet
    PREFILL = "prefill"  # prompt chunks still to write
    DENOISE = "denoise"  # a canvas is being denoised (a commit may ride along)
    FINISHED = "finished"


@dataclass(frozen=True)
class ResolvedParams:
    """Sampling parameters with the checkpoint defaults filled in and validated."""

    max_new_tokens: int
    max_denoising_steps: int
    entropy_bound: float
    t_min: float
    t_max: float
    confidence_threshold: float
    stability_threshold: int
    seed: int
    stop_ids: frozenset[int]


@dataclass
class Sequence:
    request: GenerationRequest
    params: ResolvedParams
    pinned: dict[int, int]  # output position -> token id
    generator: torch.Generator
    phase: Phase = Phase.WAITING
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    cache_len: int = 0  # tokens in the cache (prompt + committed canvases)
    pending_commit: list[int] = field(default_factory=list)  # argmax canvas to write next step
    output: list[int] = field(default_factory=list)
    text: str = ""
    # the canvas being denoised
    canvas_index: int = 0
    canvas: torch.Tensor | None = None  # (C,) ids on the device
    soft: torch.Tensor | None = None  # (C, hidden) self-conditioning input for the next step
    pin_mask: torch.Tensor | None = None  # (C,) bool
    pin_ids: torch.Tensor | None = None  # (C,) long
    steps: int = 0
    history: list[torch.Tensor] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    steps_per_canvas: list[int] = field(default_factory=list)
    accepted_total: int = 0
    # timing
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first_canvas: float | None = None
    canvas_started_at: float = 0.0  # wall clock, for trace spans

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.request.prompt_token_ids

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.output)
