"""The shipped Sudoku checkpoint (``dgserve/engine/sudoku/checkpoint``): official format, our
engine and transformers' reference give the same logits, and it solves held-out puzzles at
the rate measured by the full evaluation (docs/sudoku.md), within a binomial tolerance."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dgserve.engine.sudoku import data, grid
from dgserve.engine.sudoku.solve import default_checkpoint
from dgserve.engine.sudoku.tokenizer import VOCAB_SIZE, prompt_ids

CKPT = default_checkpoint()
N_PUZZLES = 16  # held-out test puzzles at 40 blanks: seconds on 2 CPU cores


@pytest.fixture(scope="module")
def reference():
    import transformers
    from transformers import DiffusionGemmaForBlockDiffusion

    transformers.logging.set_verbosity_error()
    return DiffusionGemmaForBlockDiffusion.from_pretrained(str(CKPT), dtype=torch.float32).eval()


def test_checkpoint_is_in_the_official_format():
    cfg = json.loads((CKPT / "config.json").read_text())
    assert cfg["model_type"] == "diffusion_gemma"
    assert cfg["architectures"] == ["DiffusionGemmaForBlockDiffusion"]
    assert cfg["canvas_length"] == 81 and cfg["text_config"]["num_experts"] >= 4
    gen = json.loads((CKPT / "generation_config.json").read_text())
    assert gen["sampler_config"]["_cls_name"] == "EntropyBoundSamplerConfig"
    with safe_open(str(CKPT / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.decoder.embed_tokens.weight").dtype == torch.bfloat16
    for name in ("model.decoder.embed_tokens.weight", "model.decoder.layers.0.experts.gate_up_proj",
                 "model.decoder.layers.0.router.per_expert_scale", "model.decoder.self_conditioning.up_proj.weight",
                 "model.decoder.layers.2.self_attn.k_proj.weight"):
        assert name in keys
    assert "model.decoder.layers.2.self_attn.v_proj.weight" not in keys  # full layers: V from k_proj
    assert (CKPT / "model.safetensors").stat().st_size < 8 * 2**20


def test_tokenizer_loads_with_autotokenizer():
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(str(CKPT))
    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == VOCAB_SIZE
    puzzle = grid.parse("53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79")
    assert tok("<bos>" + grid.format_grid(puzzle))["input_ids"] == prompt_ids(puzzle)


@pytest.mark.parametrize("self_conditioning", [False, True])
def test_engine_and_reference_logits_are_equal(reference, self_conditioning):
    from dgserve.engine.config import ModelConfig
    from dgserve.engine.kv_cache import KVCache
    from dgserve.engine.loader import load_model
    from transformers import DynamicCache

    cfg = ModelConfig.from_dir(CKPT)
    ours = load_model(CKPT, cfg, dtype=torch.float32, device=torch.device("cpu"), progress=False)
    puz, _ = data.eval_set("test", 40, 1)
    prompt = torch.tensor(prompt_ids(puz[0]))
    g = torch.Generator().manual_seed(0)
    canvas = torch.where(torch.from_numpy(puz[0] != 0), torch.from_numpy(data.to_grid_ids(puz[0])),
                         torch.randint(0, VOCAB_SIZE, (81,), generator=g))
    sc = torch.randn(1, 81, VOCAB_SIZE, generator=g) * 4 if self_conditioning else None
    cache = KVCache(cfg, 1, 256, 256, torch.float32, torch.device("cpu"))
    enc_ours = ours.forward_one(cache, slot=0, cache_len=0, new_ids=prompt, logits_for="new")
    got = ours.forward_one(cache, slot=0, cache_len=len(prompt), canvas_ids=canvas,
                           soft=None if sc is None else ours.soft_embeddings(sc[0].softmax(-1)))
    with torch.no_grad():
        enc = reference.model.encoder(input_ids=prompt[None], cache=DynamicCache(config=reference.config.text_config))
        cap = reference.config.text_config.final_logit_softcapping
        enc_ref = torch.tanh(reference.lm_head(enc.last_hidden_state)[0].float() / cap) * cap
        want = reference(cache=enc.cache, decoder_input_ids=canvas[None], self_conditioning_logits=sc).logits[0]
    assert (enc_ours - enc_ref).abs().max().item() <= 1e-4
    assert (got - want).abs().max().item() <= 1e-4
    assert want.std() > 1.0  # a trained model: logits far from uniform


def _measured_rate() -> float:
    meta = json.loads((CKPT / "dgserve_sudoku.json").read_text())
    return float(meta["evaluation"]["engine"]["40"]["solve_rate"])


def test_solves_held_out_puzzles_at_the_measured_rate():
    from dgserve.engine.sudoku.solve import EngineSolver

    puz, sol = data.eval_set("test", 40, N_PUZZLES)
    results = EngineSolver(CKPT).solve(list(puz), steps=32, seed=0)
    solved = sum(grid.is_valid_solution(r.grid, tuple(int(v) for v in p)) and r.grid == tuple(int(v) for v in s)
                 for r, p, s in zip(results, puz, sol))
    p = _measured_rate()
    # 3 standard deviations of a binomial(N, p) below the measured rate, at least one puzzle short
    floor = N_PUZZLES * p - max(1.0, 3 * math.sqrt(N_PUZZLES * p * (1 - p)))
    assert solved >= floor, f"solved {solved}/{N_PUZZLES}, measured rate {p:.3f} allows >= {floor:.1f}"
    for r, pz in zip(results, puz):  # givens are pinned: never changed, whatever the model says
        assert all(r.grid[i] == v for i, v in enumerate(pz) if v)


def test_sudoku_command_prints_the_solved_grid_last(capsys):
    from dgserve.cli import main

    puz, sol = data.eval_set("test", 30, 1)
    code = main(["sudoku", grid.format_grid(puz[0])])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines[-1]) == 81 and lines[-1].isdigit()
    assert (code == 0) == grid.is_valid_solution(grid.parse(lines[-1]), tuple(int(v) for v in puz[0]))
    assert code == 0  # a 30-blank puzzle: the measured solve rate is far above what one failure would suggest


def test_sudoku_command_rejects_a_bad_puzzle(capsys):
    from dgserve.cli import main

    assert main(["sudoku", "12345"]) == 2
    assert "81 cells" in capsys.readouterr().err
