"""The entropy-bound denoising step, as pure functions (no model, no engine state).

One step over a batch of canvases (facts sheet, "One denoise step"):
  1. temperature T = t_min + (t_max - t_min) * max(N - s, 1) / N  (s = steps done)
  2. sample every position from softmax(z / T); keep argmax(z / T) as the argmax canvas
  3. entropy (natural log) of the tempered distribution at each position
  4. accept the lowest-entropy positions while cumsum(H) - cummax(H) <= entropy_bound
     (sorted ascending, so cummax is the current element; the first is always accepted)
  5. renoise the rejected positions with uniform ids over the whole vocabulary
  6. converged iff (k+1 identical argmax canvases AND mean entropy < confidence) or s >= N
  7. commit the clean argmax canvas; cut at the first EOS/stop id.

Pinned positions (infill, templates) hold their token in every canvas, never count in the
entropy budget or the mean entropy, and always count as accepted.

Randomness comes in as arguments (``StepNoise``), drawn by the caller from the request's
own generator: the same seed gives the same canvas whatever else runs in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def temperature(steps_done: int, n_steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """Linear schedule from t_max (first step) down to t_min + (t_max - t_min) / N (last step).

    Evaluated in float32 in the reference's order (remaining / N first), so a canvas is
    tempered by the very same number on both sides."""
    remaining = torch.tensor(max(n_steps - steps_done, 1), dtype=torch.int32)
    return t_min + (t_max - t_min) * (remaining / n_steps)


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: one uniform in [0, 1) per row of ``probs`` (..., V) -> ids (...)."""
    cdf = probs.cumsum(-1)  # (..., V)
    target = (uniforms * cdf[..., -1]).unsqueeze(-1).to(cdf.dtype)  # (..., 1)
    idx = torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


@dataclass(frozen=True)
class StepNoise:
    uniforms: torch.Tensor  # (B, C) in [0, 1): one draw per position for sampling
    renoise: torch.Tensor  # (B, C) ids uniform over the vocabulary


@dataclass
class StepResult:
    canvas: torch.Tensor  # (B, C) next canvas (accepted samples, renoised elsewhere)
    argmax: torch.Tensor  # (B, C) argmax canvas (what a commit emits)
    probs: torch.Tensor  # (B, C, V) tempered probabilities (the self-conditioning input)
    accepted: torch.Tensor  # (B, C) bool
    mean_entropy: torch.Tensor  # (B,) over non-pinned positions


def denoise_step(logits: torch.Tensor, canvas: torch.Tensor, pinned: torch.Tensor, pinned_ids: torch.Tensor,
                 temperatures: torch.Tensor, entropy_bounds: torch.Tensor, noise: StepNoise) -> StepResult:
    """logits (B, C, V) fp32 (tempered in place: the caller's tensor is consumed); canvas, pinned (bool),
    pinned_ids (B, C); temperatures, bounds (B,)."""
    z = logits.div_(temperatures[:, None, None])  # (B, C, V)
    probs = torch.softmax(z, dim=-1)
    # -sum p log p = logsumexp(z) - sum p z, and logsumexp(z) = max z - log p_max (p_max >= 1/V, so the
    # log is well conditioned): one max pass gives the argmax canvas and the normaliser, no second pass
    # over the vocabulary for logsumexp and no (B, C, V) temporary for log p. On CPU this trio (max,
    # gather, vecdot) costs about a third of argmax + logsumexp + a batched dot (docs/benchmarks.md).
    z_max, best = z.max(dim=-1)
    log_norm = z_max - probs.gather(-1, best.unsqueeze(-1)).squeeze(-1).log()
    entropy = (log_norm - torch.linalg.vecdot(probs, z)).clamp_(min=0)
    argmax = torch.where(pinned, pinned_ids, best)
    ranked, order = entropy.masked_fill(pinned, float("inf")).sort(dim=-1)  # pinned sort last
    within = (ranked.cumsum(-1) - ranked) <= entropy_bounds[:, None]  # inf - inf = nan -> False
    accepted = torch.zeros_like(within).scatter(-1, order, within) | pinned
    # a sample only matters where it is accepted: draw there alone (the uniforms were drawn for every
    # position, so the request's random stream does not depend on how many were accepted)
    new_canvas = torch.where(pinned, pinned_ids, noise.renoise.to(pinned_ids.dtype))
    take = (accepted & ~pinned).nonzero(as_tuple=True)
    new_canvas[take] = sample_from_probs(probs[take], noise.uniforms[take])
    free = (~pinned).sum(-1)
    mean_entropy = entropy.masked_fill(pinned, 0.0).sum(-1) / free.clamp(min=1)
    return StepResult(canvas=new_canvas, argmax=argmax, probs=probs, accepted=accepted, mean_entropy=mean_entropy)


def is_converged(history: list[torch.Tensor], argmax: torch.Tensor, mean_entropy: float, steps_done: int,
                 n_steps: int, stability: int, confidence: float) -> tuple[bool, list[torch.Tensor]]:
    """Convergence after a step; returns (converged, new history of the last ``stability`` argmax canvases).

    ``stability`` k means k+1 identical argmax canvases in a row (earliest at step k+1):
    the current one must equal each of the k before it. (vLLM #45965 shipped an off-by-one
    that committed after a single step.) confidence 0 disables early stopping.
    """
    stable = stability == 0 or (len(history) == stability and all(torch.equal(h, argmax) for h in history))
    history = (history + [argmax])[-stability:] if stability else []
    confident = mean_entropy < confidence
    return (stable and confident) or steps_done >= n_steps, history


def finalize_canvas(argmax: list[int], stop_ids: frozenset[int], remaining: int) -> tuple[list[int], str | None]:
    """Output tokens of a committed canvas and why generation ends (None: it goes on).

    Tokens after the first stop id are dropped (the reference pads them) and the stop id
    itself is not part of the output; at most ``remaining`` tokens are kept.
    """
    window = argmax[:remaining]
    for i, tok in enumerate(window):
        if tok in stop_ids:
            return window[:i], "stop"
    if len(argmax) >= remaining:
        return window, "length"
    return window, None
