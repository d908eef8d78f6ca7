"""The entropy-bound step as pure functions: no model, hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from dgserve.engine.sampler import (
    StepNoise,
    denoise_step,
    finalize_canvas,
    is_converged,
    sample_from_probs,
    temperature,
)


def test_temperature_schedule_runs_from_t_max_to_just_above_t_min():
    n = 48
    temps = [temperature(s, n, 0.4, 0.8).item() for s in range(n)]
    assert temps[0] == pytest.approx(0.8)
    assert temps[-1] == pytest.approx(0.4 + 0.4 / 48)  # ~0.408, never t_min itself
    assert all(a > b for a, b in zip(temps, temps[1:]))
    assert temperature(100, n, 0.4, 0.8).item() == pytest.approx(temps[-1])  # clamped past the cap


def logits_with_entropies(levels: list[float], vocab: int = 8) -> torch.Tensor:
    """One canvas whose positions have increasing entropy: a peak of height `level` at token i % vocab."""
    rows = torch.zeros(len(levels), vocab)
    for i, h in enumerate(levels):
        rows[i, i % vocab] = h
    return rows[None]  # (1, C, V)


def run_step(logits, bound=0.1, pinned=None, pinned_ids=None, t=1.0, seed=0):
    b, c, v = logits.shape
    g = torch.Generator().manual_seed(seed)
    noise = StepNoise(uniforms=torch.rand(b, c, generator=g, dtype=torch.float64),
                      renoise=torch.randint(0, v, (b, c), generator=g))
    pinned = pinned if pinned is not None else torch.zeros(b, c, dtype=torch.bool)
    pinned_ids = pinned_ids if pinned_ids is not None else torch.zeros(b, c, dtype=torch.long)
    canvas = torch.full((b, c), v - 1)
    return denoise_step(logits, canvas, pinned, pinned_ids, torch.full((b,), t), torch.full((b,), bound), noise), noise


def entropy_of(row: torch.Tensor) -> float:
    p = row.softmax(-1)
    return float(-(p * p.log()).sum())


def test_accepts_lowest_entropy_positions_while_the_bound_holds():
    logits = logits_with_entropies([30.0, 6.0, 5.0, 1.0])  # entropies ascending with position
    h = [entropy_of(logits[0, i]) for i in range(4)]
    bound = h[0] + h[1] + h[2] - h[2] + 1e-6  # sum of three lowest minus their max: three fit
    res, noise = run_step(logits, bound=bound)
    assert res.accepted[0].tolist() == [True, True, True, False]
    assert res.canvas[0, 3] == noise.renoise[0, 3]  # rejected: renoised
    assert torch.allclose(res.mean_entropy, torch.tensor([sum(h) / 4]), atol=1e-5)


def test_at_least_one_position_is_always_accepted():
    logits = torch.zeros(1, 16, 8)  # uniform: every entropy is ln 8
    res, _ = run_step(logits, bound=1e-9)
    assert res.accepted.sum().item() == 1


def test_argmax_canvas_is_the_tempered_argmax_and_sampling_follows_the_cdf():
    logits = torch.tensor([[[0.0, 5.0, 1.0], [2.0, 0.0, 0.0]]])
    res, _ = run_step(logits, bound=10.0)
    assert res.argmax.tolist() == [[1, 0]]
    probs = torch.tensor([[0.2, 0.5, 0.3]])
    assert sample_from_probs(probs, torch.tensor([0.0])).item() == 0
    assert sample_from_probs(probs, torch.tensor([0.25])).item() == 1
    assert sample_from_probs(probs, torch.tensor([0.71])).item() == 2
    zero_first = torch.tensor([[0.0, 1.0]])  # a zero-probability token is never drawn
    assert sample_from_probs(zero_first, torch.tensor([0.0])).item() == 1


def test_pinned_positions_are_kept_and_stay_out_of_the_entropy_budget():
    # position 0 (pinned) and 2 uniform, 1 nearly uniform, 3 confident
    logits = logits_with_entropies([0.0, 0.5, 0.0, 30.0], vocab=8)
    pinned = torch.tensor([[True, False, False, False]])
    ids = torch.tensor([[5, 0, 0, 0]])
    res, _ = run_step(logits, bound=1e-3, pinned=pinned, pinned_ids=ids)
    assert res.canvas[0, 0].item() == 5 and res.argmax[0, 0].item() == 5
    # free positions sorted 3, 1, 2: 1 fits (only 3's ~0 entropy counts against it), 2 does not.
    # Had the pinned position's entropy counted, it would have taken 1's place.
    assert res.accepted[0].tolist() == [True, True, False, True]
    # mean entropy over the three free positions only
    want = (entropy_of(logits[0, 1]) + entropy_of(logits[0, 2]) + entropy_of(logits[0, 3])) / 3
    assert res.mean_entropy.item() == pytest.approx(want, abs=1e-5)


def test_stability_threshold_needs_k_plus_one_identical_canvases():
    """vLLM #45965 committed after one step: the first step can never converge."""
    a, b = torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4])
    done, hist = is_converged([], a, 0.0, 1, 48, stability=1, confidence=0.005)
    assert not done  # nothing to compare with yet, however confident
    done, hist = is_converged(hist, b, 0.0, 2, 48, 1, 0.005)
    assert not done  # changed
    done, hist = is_converged(hist, b, 0.0, 3, 48, 1, 0.005)
    assert done  # two identical canvases in a row, confident
    # k = 2 needs three identical canvases
    h: list[torch.Tensor] = []
    results = []
    for step in range(1, 5):
        d, h = is_converged(h, a, 0.0, step, 48, 2, 0.005)
        results.append(d)
    assert results == [False, False, True, True]


def test_confidence_gates_convergence_and_zero_disables_early_stop():
    a = torch.tensor([7, 7])
    _, hist = is_converged([], a, 0.1, 1, 48, 1, 0.005)
    assert not is_converged(hist, a, 0.1, 2, 48, 1, 0.005)[0]  # stable but not confident
    assert not is_converged(hist, a, 0.0, 2, 48, 1, 0.0)[0]  # confidence 0: never early
    assert is_converged(hist, a, math.inf, 48, 48, 1, 0.0)[0]  # the step cap always ends it


@pytest.mark.parametrize("argmax, remaining, want", [
    ([5, 6, 1, 7, 8], 10, ([5, 6], "stop")),  # cut at EOS, EOS not emitted
    ([5, 6, 7, 8], 10, ([5, 6, 7, 8], None)),  # no EOS, room left: go on
    ([5, 6, 7, 8], 3, ([5, 6, 7], "length")),  # max_new_tokens reached inside the canvas
    ([5, 6, 7, 1], 3, ([5, 6, 7], "length")),  # EOS beyond the limit does not count
    ([1, 6, 7], 10, ([], "stop")),
    ([5, 9, 7], 10, ([5], "stop")),  # a request's own stop id
])
def test_finalize_canvas(argmax, remaining, want):
    assert finalize_canvas(argmax, frozenset({1, 9}), remaining) == want
