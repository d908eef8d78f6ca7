"""Turns a scheduled step into one batched forward plus one batched sampler call."""

from __future__ import annotations

import torch

from .config import ModelConfig
from .kv_cache import KVCache
from .model import DiffusionGemma, Segment, StepBatch
from .parallel.group import TPGroup
from .sampler import StepNoise, denoise_step, temperature
from .scheduler import CanvasOutput, Scheduled


class ModelRunner:
    def __init__(self, model: DiffusionGemma, cache: KVCache, cfg: ModelConfig, device: torch.device,
                 tp: TPGroup | None = None) -> None:
        self.model = model
        self.cache = cache
        self.cfg = cfg
        self.device = device
        self.tp = tp

    def build(self, plan: list[Scheduled]) -> StepBatch:
        c = self.cfg.canvas_length
        ids, positions, segments = [], [], []
        canvas_rows, soft, soft_rows = [], [], []
        row = 0
        for item in plan:
            seq = item.seq
            n_new = len(item.new_tokens)
            seg = Segment(slot=seq.slot, cache_len=seq.cache_len, n_new=n_new, n_canvas=c if item.with_canvas else 0)
            segments.append(seg)
            ids.append(torch.tensor(item.new_tokens, dtype=torch.long, device=self.device))
            if item.with_canvas:
                ids.append(seq.canvas)
                start = len(canvas_rows)
                canvas_rows.extend(range(row + n_new, row + n_new + c))
                if seq.soft is not None:
                    soft.append(seq.soft)
                    soft_rows.extend(range(start, start + c))
            row += seg.n_tokens
            positions.append(torch.arange(seq.cache_len, seq.cache_len + seg.n_tokens, device=self.device))
        self.model.plan(segments, self.cache, self.device)
        rows = torch.tensor(canvas_rows, dtype=torch.long, device=self.device)
        return StepBatch(
            input_ids=torch.cat(ids), positions=torch.cat(positions), segments=segments, canvas_rows=rows,
            soft=torch.cat(soft) if soft else None,
            soft_rows=torch.tensor(soft_rows, dtype=torch.long, device=self.device) if soft else None,
            logits_rows=rows,
        )

    @torch.inference_mode()
    def run(self, plan: list[Scheduled]) -> dict[str, CanvasOutput]:
        batch = self.build(plan)
        logits = self.model(batch, self.cache)  # (B*C, V) for the requests with a canvas
        items = [it for it in plan if it.with_canvas]
        if not items:
            return {}
        c, v = self.cfg.canvas_length, self.cfg.vocab_size
        dev = self.device
        seqs = [it.seq for it in items]
        temps = torch.stack([temperature(s.steps, s.params.max_denoising_steps, s.params.t_min, s.params.t_max)
                             for s in seqs]).to(dev)
        bounds = torch.tensor([s.params.entropy_bound for s in seqs], dtype=torch.float32, device=dev)
        noise = StepNoise(uniforms=torch.stack([it.uniforms for it in items]).to(dev),
                          renoise=torch.stack([it.renoise for it in items]).to(dev))
        res = denoise_step(logits.view(len(items), c, v), torch.stack([s.canvas for s in seqs]),
                           torch.stack([s.pin_mask for s in seqs]), torch.stack([s.pin_ids for s in seqs]),
                           temps, bounds, noise)
        if self.tp is not None:  # rank 0's sampling decides for every rank
            self.tp.share_step_result(res)
        soft = self.model.soft_embeddings(res.probs.view(-1, v)).view(len(items), c, -1)
        accepted = (res.accepted & ~torch.stack([s.pin_mask for s in seqs])).sum(-1).tolist()
        mean_h = res.mean_entropy.tolist()
        return {
            s.request_id: CanvasOutput(canvas=res.canvas[i], argmax=res.argmax[i], soft=soft[i],
                                       accepted=accepted[i], mean_entropy=mean_h[i])
            for i, s in enumerate(seqs)
        }
