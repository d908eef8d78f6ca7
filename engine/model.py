"""DiffusionGemma text model: one set of weights, two attention modes, one batched forward.

Every request in a step contributes a *segment* of the flat token batch:

* ``n_new`` causal tokens (a prefill chunk, or the commit of a finished canvas): they attend
  causally to the cache and to each other, and their K/V are written to the cache for good.
  This is the reference's "encoder" pass.
* ``n_canvas`` canvas tokens (the block being denoised): they attend bidirectionally to the
  whole cache (including this step's new tokens) and to the canvas. Their K/V go to scratch
  slots after the committed tokens and are overwritten by the commit. This is the "decoder".

So prefill + first denoise step, and commit + next canvas's first step, are one forward
each, and requests in different phases share one batched forward: linears and experts run
on all tokens at once; attention runs per segment over its own cache slice and mask.

Tensor parallelism (``tp``, see ``parallel/``): attention heads, MLP and expert intermediate
features and the vocabulary are split across ranks; the residual stream ``x`` (N, hidden)
is whole on every rank. Per layer: one all-reduce after ``o_proj``, one after the dense
``down_proj``, one after the experts. Per step: one for the embedding lookup, one all-gather
of the logits, one for the self-conditioning product. Without ``tp`` the model is the
single-device model, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerSpec, ModelConfig
from .kv_cache import KVCache
from .layers import MLP, Experts, RMSNorm, Router, apply_rope, rope_cos_sin, rope_inv_freq
from .parallel.group import TPGroup
from .parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from .parallel.sharding import head_shard, kv_head_shard


@dataclass
class AttnPart:
    """Rows of a segment that attend alike: its causal tokens, or its canvas. Each part is one
    SDPA call, so a canvas attends exactly as in a canvas-only step (the kernel's blocking
    depends on the number of queries; mixing causal rows in would change its rounding)."""

    rows: slice  # rows of the flat batch
    key_hi: int  # keys are positions key_lo[kind] .. key_hi - 1
    key_lo: dict[bool, int] = field(default_factory=dict)  # per attention kind (sliding?)
    mask: dict[bool, torch.Tensor | None] = field(default_factory=dict)  # (rows, keys) bool, None = all


@dataclass
class Segment:
    """One request's part of a step (positions cache_len .. cache_len + n_new + n_canvas - 1)."""

    slot: int
    cache_len: int
    n_new: int
    n_canvas: int
    offset: int = 0  # first row in the flat batch
    parts: list[AttnPart] = field(default_factory=list)  # filled by DiffusionGemma.plan()

    @property
    def n_tokens(self) -> int:
        return self.n_new + self.n_canvas

    @property
    def end(self) -> int:
        return self.cache_len + self.n_tokens


@dataclass
class StepBatch:
    """The flat inputs of one forward (all on the model's device)."""

    input_ids: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    segments: list[Segment]
    canvas_rows: torch.Tensor  # (Nc,) rows that are canvas tokens (self-conditioning applies)
    soft: torch.Tensor | None  # (Ns, hidden) self-conditioning embeddings ...
    soft_rows: torch.Tensor | None  # (Ns,) ... for these positions within canvas_rows
    logits_rows: torch.Tensor  # (R,) rows whose logits are returned


def _rows(heads: slice, head_dim: int) -> slice:
    return slice(heads.start * head_dim, heads.stop * head_dim)


class Attention(nn.Module):
    """Tensor parallel: this rank's query heads and the KV heads they use (split, or replicated
    when there are fewer KV heads than ranks); o_proj is row-parallel (one all-reduce)."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, tp: TPGroup | None = None) -> None:
        super().__init__()
        h, d = cfg.hidden_size, spec.head_dim
        rank, size = (tp.rank, tp.size) if tp is not None else (0, 1)
        q_heads = head_shard(cfg.num_heads, rank, size)
        kv_heads = kv_head_shard(spec.num_kv_heads, rank, size)
        self.spec = spec
        self.gqa = q_heads.stop - q_heads.start != kv_heads.stop - kv_heads.start
        self.q_proj = ColumnParallelLinear(h, cfg.num_heads * d, _rows(q_heads, d))
        self.k_proj = ColumnParallelLinear(h, spec.num_kv_heads * d, _rows(kv_heads, d))
        self.v_proj = None if spec.k_eq_v else ColumnParallelLinear(h, spec.num_kv_heads * d, _rows(kv_heads, d))
        self.o_proj = RowParallelLinear(cfg.num_heads * d, h, _rows(q_heads, d), tp)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(d, cfg.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: StepBatch,
                cache: KVCache, layer: int) -> torch.Tensor:
        n, d = x.shape[0], self.spec.head_dim
        cos, sin = rope
        q = apply_rope(self.q_norm(self.q_proj(x).view(n, -1, d)), cos, sin)  # (N, Hq, D)
        k_raw = self.k_proj(x).view(n, -1, d)  # (N, Hkv, D)
        v = self.v_norm(k_raw if self.v_proj is None else self.v_proj(x).view(n, -1, d))
        k = apply_rope(self.k_norm(k_raw), cos, sin)
        out = torch.empty_like(q)
        sliding = self.spec.sliding
        for seg in batch.segments:
            rows = slice(seg.offset, seg.offset + seg.n_tokens)
            cache.write(layer, seg.slot, seg.cache_len, k[rows], v[rows])
            for part in seg.parts:
                kk, vv = cache.read(layer, seg.slot, part.key_lo[sliding], part.key_hi)  # (1, Hkv, S, D)
                qq = q[part.rows].transpose(0, 1).unsqueeze(0)  # (1, Hq, n, D)
                o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=part.mask[sliding], scale=1.0,
                                                   enable_gqa=self.gqa)
                out[part.rows] = o[0].transpose(0, 1)  # (n, Hq, D)
        return self.o_proj(out.reshape(n, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec, tp: TPGroup | None = None) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, spec, tp)
        self.mlp = MLP(h, cfg.intermediate_size, tp)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        self.moe = cfg.is_moe
        if self.moe:  # dense branch and experts run side by side, each with its own norms
            self.router = Router(cfg)
            self.experts = Experts(cfg, tp)
            self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: StepBatch,
                cache: KVCache, layer: int) -> torch.Tensor:
        h = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), rope, batch, cache, layer))
        ff = self.mlp(self.pre_feedforward_layernorm(h))
        if self.moe:
            weights, idx = self.router(h)  # the router sees the raw residual stream
            moe = self.experts(self.pre_feedforward_layernorm_2(h), weights, idx)
            ff = self.post_feedforward_layernorm_1(ff) + self.post_feedforward_layernorm_2(moe)
        return (h + self.post_feedforward_layernorm(ff)) * self.layer_scalar


class SelfConditioning(nn.Module):
    """canvas embedding = post_norm(embed + MLP(pre_norm(soft))); soft = previous step's soft tokens.

    Replicated under tensor parallelism, on purpose. It runs once per step (not per layer) on
    (Nc, hidden) inputs that are already whole on every rank (the self-conditioning product is
    all-reduced: its pre_norm needs whole rows), and it is small (3 x hidden x intermediate,
    17.8M parameters, 0.07% of the real model). Sharding it would add a second all-reduce of
    (Nc, hidden) per step to save about 2 * 17.8M FLOP per canvas token.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.pre_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_norm = RMSNorm(h, cfg.rms_norm_eps, with_scale=False)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)

    def signal(self, soft: torch.Tensor) -> torch.Tensor:
        s = self.pre_norm(soft)
        return self.down_proj(F.gelu(self.gate_proj(s), approximate="tanh") * self.up_proj(s))


class DiffusionGemma(nn.Module):
    """The text model (``model.decoder.*`` of the checkpoint; the encoder shares its weights)."""

    def __init__(self, cfg: ModelConfig, decoder_sliding_window: str = "reference", tp: TPGroup | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.symmetric_window = decoder_sliding_window == "symmetric"
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, spec, tp) for spec in cfg.layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)
        self._rope_keys = [(s.head_dim, s.rope_type, s.rope_theta, s.rope_partial, s.rope_factor) for s in cfg.layers]
        self._inv_freq: dict[tuple, torch.Tensor] = {}

    # -- helpers -------------------------------------------------------------------------
    def embed_scale(self) -> torch.Tensor:
        # the reference rounds sqrt(hidden) to the weight dtype (53.0 in bf16 for 2816)
        return torch.tensor(math.sqrt(self.cfg.hidden_size), dtype=self.embed_tokens.weight.dtype)

    def soft_embeddings(self, probs: torch.Tensor) -> torch.Tensor:
        """Self-conditioning input from a step's tempered probabilities: (M, V) fp32 -> (M, hidden)."""
        w = self.embed_tokens.weight
        return self.embed_tokens.weighted_sum(probs) * self.embed_scale().to(w.device)

    def load_shard(self, name: str, sl) -> torch.Tensor:
        """The loader's ``shard_fn``: this rank's part of checkpoint tensor ``name`` (our name)."""
        module, _, leaf = name.rpartition(".")
        owner = self.get_submodule(module)
        return owner.load_shard(leaf, sl) if hasattr(owner, "load_shard") else sl[:]

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        per_key: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, spec in zip(self._rope_keys, self.cfg.layers):
            if key not in per_key:
                inv = self._inv_freq.get(key)
                if inv is None or inv.device != positions.device:
                    inv = self._inv_freq[key] = rope_inv_freq(spec).to(positions.device)
                per_key[key] = rope_cos_sin(inv, positions, dtype)
        return [per_key[k] for k in self._rope_keys]

    def plan(self, segments: list[Segment], cache: KVCache, device: torch.device) -> None:
        """Reserve cache room and build each segment's attention parts: key ranges and masks
        (once per step, shared by all layers)."""
        w = self.cfg.sliding_window
        offset = 0
        for seg in segments:
            seg.offset, offset = offset, offset + seg.n_tokens
            cache.reserve(seg.slot, seg.cache_len, seg.n_tokens)
            s0 = cache.sliding_start[seg.slot]
            start = seg.cache_len + seg.n_new  # first canvas position
            seg.parts = []
            if seg.n_new:  # causal rows: k <= q, and k > q - w on sliding layers
                part = AttnPart(rows=slice(seg.offset, seg.offset + seg.n_new), key_hi=start)
                q = torch.arange(seg.cache_len, start, device=device)[:, None]
                for sliding in (False, True):
                    lo = max(s0, seg.cache_len - w + 1, 0) if sliding else 0
                    k = torch.arange(lo, start, device=device)[None, :]
                    part.key_lo[sliding] = lo
                    part.mask[sliding] = (k <= q) & (k > q - w) if sliding else k <= q
                seg.parts.append(part)
            if seg.n_canvas:  # canvas rows: the whole cache and canvas; sliding layers per the switch
                part = AttnPart(rows=slice(seg.offset + seg.n_new, seg.offset + seg.n_tokens), key_hi=seg.end)
                part.key_lo[False], part.mask[False] = 0, None
                lo = max(s0, start - w + 1, 0)  # reference: the last w-1 tokens before the canvas
                part.key_lo[True], part.mask[True] = lo, None
                if self.symmetric_window:  # vLLM: |q - k| < w
                    q = torch.arange(start, seg.end, device=device)[:, None]
                    k = torch.arange(lo, seg.end, device=device)[None, :]
                    band = (k - q).abs() < w
                    part.mask[True] = None if bool(band.all()) else band
                seg.parts.append(part)

    @torch.inference_mode()
    def forward_one(self, cache: KVCache, *, slot: int, cache_len: int, new_ids: torch.Tensor | None = None,
                    canvas_ids: torch.Tensor | None = None, soft: torch.Tensor | None = None,
                    logits_for: str = "canvas") -> torch.Tensor:
        """One request's forward outside the scheduler (tests, tools): returns fp32 logits of
        its new (``logits_for="new"``) or canvas tokens."""
        dev = self.embed_tokens.weight.device
        new_ids = new_ids if new_ids is not None else torch.empty(0, dtype=torch.long)
        n_new, n_canvas = len(new_ids), 0 if canvas_ids is None else len(canvas_ids)
        seg = Segment(slot=slot, cache_len=cache_len, n_new=n_new, n_canvas=n_canvas)
        self.plan([seg], cache, dev)
        parts = [new_ids] + ([canvas_ids] if canvas_ids is not None else [])
        canvas_rows = torch.arange(n_new, n_new + n_canvas, device=dev)
        rows = canvas_rows if logits_for == "canvas" else torch.arange(n_new, device=dev)
        batch = StepBatch(
            input_ids=torch.cat(parts).to(dev), positions=torch.arange(cache_len, seg.end, device=dev),
            segments=[seg], canvas_rows=canvas_rows, soft=soft,
            soft_rows=None if soft is None else torch.arange(n_canvas, device=dev), logits_rows=rows)
        return self(batch, cache)

    # -- forward -------------------------------------------------------------------------
    def forward(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """Runs one step; returns fp32 soft-capped logits for ``batch.logits_rows``: (R, V)."""
        w = self.embed_tokens.weight
        x = self.embed_tokens(batch.input_ids) * self.embed_scale().to(w.device)  # (N, H)
        if batch.canvas_rows.numel():
            c = x[batch.canvas_rows]  # (Nc, H)
            if batch.soft is not None:
                c = c.index_add(0, batch.soft_rows, self.self_conditioning.signal(batch.soft))
            x[batch.canvas_rows] = self.self_conditioning.post_norm(c)
        ropes = self._rope(batch.positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, ropes[i], batch, cache, i)
        h = self.norm(x[batch.logits_rows])
        logits = self.embed_tokens.logits(h).float()  # (R, V), tied lm_head
        cap = self.cfg.final_logit_softcapping
        if cap:  # in place: (R, V) is the largest activation of a step
            logits = logits.div_(cap).tanh_().mul_(cap)
        return logits
