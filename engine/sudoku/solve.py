"""Solving puzzles with a trained checkpoint.

Three back ends, one result type:

- ``EngineSolver``: our block-diffusion engine (``dgserve.engine.Engine``), given cells pinned
  on the canvas. The shipped path (``dgserve sudoku``, tests, the reported numbers).
- ``ReferenceSolver``: transformers' ``DiffusionGemmaForBlockDiffusion.generate``, with the
  given cells pinned through a logits processor (one-hot logits at pinned cells: they are
  sampled as given, have zero entropy and so never use the entropy budget, and are never
  renoised). A cross-check of the engine.
- ``ARSolver``: the autoregressive twin, greedy, cells left to right, given cells forced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data
from .modelcfg import CANVAS
from .tokenizer import VOCAB_SIZE, ids_grid, prompt_ids

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"


def default_checkpoint() -> Path:
    """The checkpoint shipped inside the package (``dgserve/engine/sudoku/checkpoint``)."""
    return CHECKPOINT_DIR


@dataclass(frozen=True)
class Solution:
    grid: tuple[int, ...]  # 81 digits (0 where the model produced a non-digit token)
    steps: int  # denoising steps (diffusion) or decoding steps (AR)
    tokens_per_step: float  # cells committed per step (the 81 canvas tokens / steps)


def pinned_cells(puzzle: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(canvas offset, token id) of every given cell."""
    return tuple((i, data.DIGIT0 + int(v)) for i, v in enumerate(puzzle) if v)


class EngineSolver:
    """Solves with our engine; ``steps`` is the per-canvas step cap (N of the schedule)."""

    def __init__(self, model_dir: str | Path | None = None, max_batch: int = 8, threads: int | None = None):
        from dgserve.engine import Engine, EngineConfig

        if threads:
            torch.set_num_threads(threads)
        self.engine = Engine(EngineConfig(model=str(model_dir or default_checkpoint()), max_batch=max_batch,
                                          device="cpu", context_length=len(prompt_ids([0] * 81)) + CANVAS))
        self.max_batch = max_batch

    def solve(self, puzzles: Sequence[Sequence[int]], steps: int = 32, seed: int = 0,
              entropy_bound: float | None = None, confidence_threshold: float | None = None) -> list[Solution]:
        from dgserve.engine.types import GenerationRequest, SamplingParams

        out: list[Solution] = []
        for lo in range(0, len(puzzles), self.max_batch):
            chunk = puzzles[lo: lo + self.max_batch]
            reqs = [GenerationRequest(
                request_id=str(lo + k), prompt_token_ids=tuple(prompt_ids(p)),
                params=SamplingParams(max_new_tokens=CANVAS, max_denoising_steps=steps, seed=seed + lo + k,
                                      entropy_bound=entropy_bound, confidence_threshold=confidence_threshold),
                pinned=pinned_cells(p)) for k, p in enumerate(chunk)]
            for r in self.engine.generate_batch(reqs):
                n = max(1, sum(r.stats.steps_per_canvas))
                out.append(Solution(ids_grid(r.token_ids[:CANVAS]), n, CANVAS / n))
        return out


class _PinLogits:
    """Logits processor: one-hot logits (0 / -1e4) at pinned canvas cells."""

    def __init__(self, mask: torch.Tensor, tokens: torch.Tensor):
        self.mask, self.tokens = mask, tokens  # (B, 81) bool, (B, 81) long

    def __call__(self, input_ids, scores, cur_step=None):
        forced = torch.full_like(scores, -1e4).scatter_(-1, self.tokens[..., None], 0.0)
        return torch.where(self.mask[..., None], forced, scores)


class ReferenceSolver:
    """transformers' reference ``generate`` with pinned given cells."""

    def __init__(self, model_dir: str | Path | None = None, threads: int | None = None):
        from transformers import DiffusionGemmaForBlockDiffusion

        if threads:
            torch.set_num_threads(threads)
        self.model = DiffusionGemmaForBlockDiffusion.from_pretrained(
            str(model_dir or default_checkpoint()), dtype=torch.float32).eval()

    @torch.no_grad()
    def solve(self, puzzles: Sequence[Sequence[int]], steps: int = 32, seed: int = 0, batch: int = 64,
              entropy_bound: float | None = None, confidence_threshold: float | None = None) -> list[Solution]:
        from transformers import LogitsProcessorList
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

        out: list[Solution] = []
        g = torch.Generator().manual_seed(seed)
        for lo in range(0, len(puzzles), batch):
            puz = np.asarray(puzzles[lo: lo + batch], dtype=np.int64)
            prompt = torch.from_numpy(data.to_prompt_ids(puz))
            mask = torch.from_numpy(puz != 0)
            tokens = torch.from_numpy(data.to_grid_ids(puz))
            noise = torch.randint(0, VOCAB_SIZE, mask.shape, generator=g)
            torch.manual_seed(seed + lo)
            kw = {}
            if entropy_bound is not None:
                kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(entropy_bound))
            if confidence_threshold is not None:
                kw["confidence_threshold"] = float(confidence_threshold)
            res = self.model.generate(
                prompt, decoder_input_ids=torch.where(mask, tokens, noise), max_new_tokens=CANVAS,
                max_denoising_steps=steps, logits_processor=LogitsProcessorList([_PinLogits(mask, tokens)]), **kw)
            tpf = res.tokens_per_forward.tolist()
            for k, row in enumerate(res.sequences[:, -CANVAS:].tolist()):
                out.append(Solution(ids_grid(row), round(CANVAS / tpf[k]), float(tpf[k])))
        return out


class ARSolver:
    """Greedy left-to-right decoding with the autoregressive twin; given cells are forced."""

    def __init__(self, model_dir: str | Path, threads: int | None = None):
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    @torch.no_grad()
    def solve(self, puzzles: Sequence[Sequence[int]], batch: int = 100, **_) -> list[Solution]:
        from transformers.cache_utils import DynamicCache

        out: list[Solution] = []
        for lo in range(0, len(puzzles), batch):
            puz = np.asarray(puzzles[lo: lo + batch], dtype=np.int64)
            given = torch.from_numpy(data.to_grid_ids(puz))
            mask = torch.from_numpy(puz != 0)
            ids = torch.from_numpy(data.to_prompt_ids(puz))
            cache = DynamicCache(config=self.model.config)
            logits = self.model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
            cells = []
            for i in range(CANVAS):
                nxt = torch.where(mask[:, i], given[:, i], logits.argmax(-1))  # (B,)
                cells.append(nxt)
                if i + 1 < CANVAS:
                    logits = self.model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
            grid_ids = torch.stack(cells, 1).tolist()
            out += [Solution(ids_grid(row), CANVAS, 1.0) for row in grid_ids]
        return out
