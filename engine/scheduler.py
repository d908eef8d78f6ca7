"""Which requests run in the next forward, and what each contributes; what a step's result
means for each request (convergence, commit, finish).

No batch-wide barrier: every request is in its own phase. A request whose canvas converged
commits on its next step while the others keep denoising, and requests join (a free slot)
and leave (finished or aborted) at any step. Long prompts are prefilled in chunks under a
per-step token budget so one long prompt never stalls the canvases of the others.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .kv_cache import KVCache
from .sampler import finalize_canvas, is_converged
from .sequence import Phase, Sequence
from .types import CanvasEvent, DraftEvent, GenerationStats

Event = CanvasEvent | DraftEvent


@dataclass
class Scheduled:
    seq: Sequence
    new_tokens: list[int]  # causal tokens written this step (prompt chunk or commit)
    with_canvas: bool
    uniforms: torch.Tensor | None = None  # (C,) sampling draws from the request's generator
    renoise: torch.Tensor | None = None  # (C,) renoise ids


@dataclass
class CanvasOutput:
    """What the runner returns for a request that had a canvas in the step."""

    canvas: torch.Tensor  # (C,)
    argmax: torch.Tensor  # (C,)
    soft: torch.Tensor  # (C, hidden)
    accepted: int  # positions accepted this step (pinned positions not counted)
    mean_entropy: float


class Scheduler:
    def __init__(self, cfg: ModelConfig, max_batch: int, prefill_chunk: int, cache: KVCache,
                 detokenize: Callable[[list[int]], str], device: torch.device) -> None:
        self.cfg = cfg
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.cache = cache
        self.detokenize = detokenize
        self.device = device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_batch - 1, -1, -1))

    # -- admission ---------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.phase = Phase.FINISHED
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                self._release(seq)
                return seq
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, seq: Sequence) -> None:
        seq.phase = Phase.FINISHED
        self.running.remove(seq)
        self.free_slots.append(seq.slot)
        seq.canvas = seq.soft = None

    # -- one step ------------------------------------------------------------------------
    def schedule(self) -> list[Scheduled]:
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            seq.phase = Phase.PREFILL
            self.cache.reset_slot(seq.slot)
            self.running.append(seq)
        budget = self.prefill_chunk
        plan = []
        for seq in self.running:
            if seq.phase is Phase.PREFILL:
                # chunk boundaries depend on the request alone (batch invariance): a chunk that
                # does not fit this step's budget waits for the next step instead of shrinking
                n = min(len(seq.prompt) - seq.prefilled, self.prefill_chunk)
                if n > budget:
                    continue
                budget -= n
                tokens = list(seq.prompt[seq.prefilled:seq.prefilled + n])
                with_canvas = seq.prefilled + n == len(seq.prompt)
            else:
                tokens, with_canvas = seq.pending_commit, True
            item = Scheduled(seq, tokens, with_canvas)
            if with_canvas:
                if seq.canvas is None:
                    self._start_canvas(seq)
                c = self.cfg.canvas_length
                item.uniforms = torch.rand(c, generator=seq.generator, dtype=torch.float64)
                item.renoise = torch.randint(0, self.cfg.vocab_size, (c,), generator=seq.generator)
            plan.append(item)
        return plan

    def _start_canvas(self, seq: Sequence) -> None:
        c = self.cfg.canvas_length
        canvas = torch.randint(0, self.cfg.vocab_size, (c,), generator=seq.generator)
        mask = torch.zeros(c, dtype=torch.bool)
        ids = torch.zeros(c, dtype=torch.long)
        base = seq.canvas_index * c
        for pos, tok in seq.pinned.items():
            if base <= pos < base + c:
                mask[pos - base], ids[pos - base] = True, tok
        canvas = torch.where(mask, ids, canvas)
        seq.canvas, seq.pin_mask, seq.pin_ids = (t.to(self.device) for t in (canvas, mask, ids))
        seq.soft, seq.steps, seq.history, seq.accepted = None, 0, [], []
        seq.canvas_started_at = time.time()

    def postprocess(self, plan: list[Scheduled], outputs: dict[str, CanvasOutput]) -> list[Event]:
        events: list[Event] = []
        for item in plan:
            seq = item.seq
            seq.cache_len += len(item.new_tokens)
            if seq.phase is Phase.PREFILL:
                seq.prefilled += len(item.new_tokens)
                if seq.prefilled == len(seq.prompt):
                    seq.phase = Phase.DENOISE
            else:
                seq.pending_commit = []
            out = outputs.get(seq.request_id)
            if out is not None:
                events += self._advance_canvas(seq, out)
        return events

    def _advance_canvas(self, seq: Sequence, out: CanvasOutput) -> list[Event]:
        p = seq.params
        seq.steps += 1
        seq.accepted.append(out.accepted)
        done, seq.history = is_converged(seq.history, out.argmax, out.mean_entropy, seq.steps,
                                         p.max_denoising_steps, p.stability_threshold, p.confidence_threshold)
        converged_by = "step_cap" if seq.steps >= p.max_denoising_steps else "stable"
        events: list[Event] = []
        if seq.request.stream_drafts:
            events.append(DraftEvent(seq.request_id, seq.canvas_index, seq.steps, out.accepted,
                                     tuple(out.argmax.tolist())))
        if not done:
            seq.canvas, seq.soft = out.canvas, out.soft
            return events
        argmax = out.argmax.tolist()
        tokens, reason = finalize_canvas(argmax, p.stop_ids, seq.remaining)
        seq.output += tokens
        seq.steps_per_canvas.append(seq.steps)
        seq.accepted_total += sum(seq.accepted)
        if seq.t_first_canvas is None:
            seq.t_first_canvas = time.perf_counter()
        text = self.detokenize(seq.output)
        delta = text[len(seq.text):] if text.startswith(seq.text) else text
        seq.text = text
        event = CanvasEvent(seq.request_id, seq.canvas_index, tuple(tokens), delta, seq.steps, tuple(seq.accepted),
                            converged_by=converged_by, mean_entropy=out.mean_entropy,
                            started_at=seq.canvas_started_at, committed_at=time.time())
        if reason is None:
            seq.pending_commit = argmax  # the clean argmax canvas goes into the cache next step
            seq.canvas = seq.soft = None
            seq.canvas_index += 1
        else:
            self._release(seq)
            event = CanvasEvent(**{**event.__dict__, "finished": True, "finish_reason": reason,
                                   "stats": self.stats(seq)})
        events.append(event)
        return events

    def stats(self, seq: Sequence) -> GenerationStats:
        now = time.perf_counter()
        steps = sum(seq.steps_per_canvas)
        return GenerationStats(
            prompt_tokens=len(seq.prompt), completion_tokens=len(seq.output), canvases=len(seq.steps_per_canvas),
            steps_per_canvas=tuple(seq.steps_per_canvas),
            tokens_per_step=len(seq.output) / steps if steps else 0.0,
            seconds=now - seq.t_arrival,
            time_to_first_canvas=(seq.t_first_canvas or now) - seq.t_arrival,
        )
