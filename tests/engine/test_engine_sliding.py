"""The decoder's sliding-window switch: 'reference' (transformers/MLX) and 'symmetric' (vLLM).

The reference mode is checked against transformers in test_engine_parity.py; here both
modes' masks are checked against their definitions, and the modes against each other."""

from __future__ import annotations

import pytest
import torch

from dgserve.engine.config import ModelConfig
from dgserve.engine.kv_cache import KVCache
from dgserve.engine.loader import load_model
from dgserve.engine.model import Segment
from dgserve.engine.tiny import make_tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """Window 64 > prompt + canvas: both modes see everything."""
    return make_tiny_model(tmp_path_factory.mktemp("wide") / "m", seed=4, sliding_window=64)


def models(path):
    cfg = ModelConfig.from_dir(path)
    return cfg, {mode: load_model(path, cfg, dtype=torch.float32, device=CPU, decoder_sliding_window=mode,
                                  progress=False) for mode in ("reference", "symmetric")}


def canvas_logits(model, cfg, prompt, canvas):
    cache = KVCache(cfg, 1, 512, 256, torch.float32, CPU)
    return model.forward_one(cache, slot=0, cache_len=0, new_ids=prompt, canvas_ids=canvas)


def test_modes_agree_when_the_window_covers_prompt_and_canvas(wide_dir):
    cfg, m = models(wide_dir)
    prompt, canvas = torch.arange(2, 20), torch.arange(50, 50 + cfg.canvas_length)  # 18 + 32 < 64
    assert torch.equal(canvas_logits(m["reference"], cfg, prompt, canvas),
                       canvas_logits(m["symmetric"], cfg, prompt, canvas))


def test_modes_differ_beyond_the_window(tiny_dir):
    cfg, m = models(tiny_dir)  # window 16 < canvas 32
    prompt, canvas = torch.arange(2, 60), torch.arange(50, 50 + cfg.canvas_length)
    diff = (canvas_logits(m["reference"], cfg, prompt, canvas) - canvas_logits(m["symmetric"], cfg, prompt, canvas))
    assert diff.abs().max().item() > 1e-3


@pytest.mark.parametrize("mode", ["reference", "symmetric"])
def test_sliding_masks_follow_their_definition(tiny_dir, mode):
    cfg, m = models(tiny_dir)
    w, c = cfg.sliding_window, cfg.canvas_length
    cache = KVCache(cfg, 1, 512, 256, torch.float32, CPU)
    seg = Segment(slot=0, cache_len=40, n_new=10, n_canvas=c)  # 40 cached, 10 new causal tokens, a canvas
    m[mode].plan([seg], cache, CPU)
    causal, canvas = seg.parts
    start = 50  # first canvas position

    def visible(part, sliding):
        lo = part.key_lo[sliding]
        rows = part.rows.stop - part.rows.start
        mask = part.mask[sliding]
        mask = torch.ones(rows, part.key_hi - lo, dtype=torch.bool) if mask is None else mask
        return {(r, lo + j) for r in range(rows) for j in range(part.key_hi - lo) if mask[r, j]}

    # causal rows (positions 40..49): k <= q, and k > q - w on sliding layers
    assert visible(causal, False) == {(r, k) for r in range(10) for k in range(0, 41 + r)}
    assert visible(causal, True) == {(r, k) for r in range(10) for k in range(41 + r - w, 41 + r)}
    # canvas rows (positions 50..81): full layers see everything
    assert visible(canvas, False) == {(r, k) for r in range(c) for k in range(0, start + c)}
    if mode == "reference":  # the last w-1 tokens before the canvas, and the whole canvas
        want = {(r, k) for r in range(c) for k in range(start - w + 1, start + c)}
    else:  # |q - k| < w
        want = {(r, k) for r in range(c) for k in range(0, start + c) if abs(start + r - k) < w}
    assert visible(canvas, True) == want
