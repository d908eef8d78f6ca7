"""Building blocks of the DiffusionGemma text stack: norms, RoPE, MLP and the MoE block.

Parameter names match the official checkpoint (``model.decoder.*`` minus the prefix), so
the loader copies tensors by name. Numerics follow the reference implementation: RMSNorm
in fp32 with ``x * pow(mean(x^2) + eps, -0.5) * weight`` (weight, not 1 + weight), router
softmax in fp32, tanh-approximated GELU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerSpec, ModelConfig
from .parallel.group import TPGroup
from .parallel.layers import ColumnParallelLinear, RowParallelLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        out = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.type_as(x)


def rope_inv_freq(spec: LayerSpec) -> torch.Tensor:
    """Inverse frequencies, length head_dim / 2 (zeros where proportional RoPE leaves dims unrotated)."""
    hd = spec.head_dim
    if spec.rope_type == "proportional":
        angles = int(spec.rope_partial * hd // 2)
        rotated = 1.0 / (spec.rope_theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.float) / hd))
        inv = torch.cat([rotated, torch.zeros(hd // 2 - angles)])
    else:  # default / linear: rotate int(head_dim * partial) dims
        dim = int(hd * spec.rope_partial)
        if dim != hd:
            raise ValueError(f"rope_type {spec.rope_type!r} with partial_rotary_factor {spec.rope_partial} "
                             f"(rotating {dim} of {hd} dims) is not supported")
        inv = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    return inv / spec.rope_factor


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions[:, None].float() * inv_freq[None, :]  # (N, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (N, D)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]  # (N, 1, D) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (N, H, D); rotate_half spans the whole head dim."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class MLP(nn.Module):
    """Gated GELU MLP (the dense branch of every layer). Tensor parallel: gate/up column-parallel,
    down row-parallel over the intermediate features (one all-reduce)."""

    def __init__(self, hidden: int, inter: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        cols = tp.shard(inter) if tp is not None else None
        self.gate_proj = ColumnParallelLinear(hidden, inter, cols)
        self.up_proj = ColumnParallelLinear(hidden, inter, cols)
        self.down_proj = RowParallelLinear(inter, hidden, cols, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Router(nn.Module):
    """Replicated under tensor parallelism, on purpose: every rank must route every token to the
    same experts, and the router is tiny (E x hidden, 0.36M parameters for the real model). Run
    on identical inputs (the all-reduced residual stream) the replicas agree exactly; a sharded
    router would need an extra all-gather of (N, E) logits per layer to save 0.3 MFLOP a token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))
        self.top_k = cfg.top_k_experts
        self.root_size = cfg.hidden_size ** -0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x) * self.scale * self.root_size
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)  # (N, E)
        weights, idx = torch.topk(probs, k=self.top_k, dim=-1)  # (N, K) each
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[idx], idx


MIN_EXPERT_ROWS = 16


class Experts(nn.Module):
    """Expert weights as 3-D tensors (official names: ``gate_up_proj`` and ``down_proj``, no ``.weight``).

    Batch invariance: GEMM libraries pick other kernels for a handful of rows (on x86 CPUs
    ``F.linear`` rows differ in the last bit below 16 rows), so an expert that gets 3 tokens
    alone but 20 in a batch would round differently and a seeded request would change with
    its neighbours. Each expert's group is therefore padded to ``MIN_EXPERT_ROWS`` rows.

    Tensor parallel: every rank runs every expert on its share ``cols`` of the intermediate
    features (gate_up column-parallel, down row-parallel) and one all-reduce sums the combined
    output. ``gate_up_proj`` packs [gate; up] along dim 1, so a shard is the same slice of each
    half. (Routing is replicated, so all ranks group the tokens identically.)

    Two paths over the same grouping. On CUDA, one grouped GEMM per projection
    (``F.grouped_mm`` with the groups' end offsets): a handful of kernels per layer and no
    host synchronisation, where the per-expert loop launches ~8 kernels for each of up to 128
    experts and reads the counts on the host (measured on an H100 at the real layer shapes: the
    loop made a batch-1 canvas several times slower than transformers' grouped path). On CPU,
    the per-expert loop with the padding above (batch invariance; bitwise parity with the
    reference in fp32). ``grouped`` = None picks by device; tests force either path.
    """

    grouped: bool | None = None

    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.tp = tp
        self.inter = i
        self.cols = tp.shard(i) if tp is not None else slice(0, i)
        n = self.cols.stop - self.cols.start
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * n, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, n))

    def load_shard(self, name: str, sl) -> torch.Tensor:
        c0, c1, i = self.cols.start, self.cols.stop, self.inter
        if name == "gate_up_proj":  # (E, 2I, H) -> (E, 2I/size, H): this rank's gate rows, then its up rows
            return torch.cat([sl[:, c0:c1], sl[:, i + c0:i + c1]], dim=1)
        return sl[:, :, c0:c1]  # down_proj (E, H, I) -> (E, H, I/size)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x: (N, H); weights, idx: (N, K). Tokens are grouped by expert: one GEMM pair per expert hit."""
        n, k = idx.shape
        flat = idx.reshape(-1)  # (N*K,) assignment -> expert
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0])
        xs = x[order // k]  # (N*K, H) token rows in expert order
        grouped = self.grouped if self.grouped is not None else (x.is_cuda and hasattr(F, "grouped_mm"))
        ys = self._grouped(xs, counts) if grouped else self._looped(xs, counts.tolist())
        y = torch.empty_like(ys)
        y[order] = ys  # back to (token, k) order
        out = (y.view(n, k, -1) * weights[..., None]).sum(1).to(x.dtype)  # (N, H)
        return out if self.tp is None else self.tp.all_reduce(out)

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)  # each group's end row
        gate, up = F.grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        return F.grouped_mm(F.gelu(gate, approximate="tanh") * up, self.down_proj.transpose(1, 2), offs=offs)

    def _looped(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ys = torch.empty_like(xs)
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            rows = xs[start:start + c]
            if c < MIN_EXPERT_ROWS:
                rows = torch.cat([rows, rows.new_zeros(MIN_EXPERT_ROWS - c, rows.shape[1])])
            gate, up = F.linear(rows, self.gate_up_proj[e]).chunk(2, dim=-1)  # (c', I) each
            ys[start:start + c] = F.linear(F.gelu(gate, approximate="tanh") * up, self.down_proj[e])[:c]  # (c, H)
            start += c
        return ys
