"""Splits, symmetry augmentation, corruption and the tokenizer."""

from __future__ import annotations

import numpy as np

from dgserve.engine.sudoku import data, grid, tokenizer


def _t(a) -> tuple[int, ...]:
    return tuple(int(v) for v in a)


def test_augmented_batches_keep_unique_valid_puzzles():
    c = data.make_carvings(4, seed=11)
    puz, sol = data.sample_batch(c, 16, np.random.default_rng(0), min_blanks=30, max_blanks=50)
    assert ((puz == 0).sum(1) >= 30).all() and ((puz == 0).sum(1) <= 50).all()
    for p, s in zip(puz, sol):
        assert grid.is_valid_solution(_t(s), _t(p))
        assert grid.count_solutions(_t(p)) == 1


def test_split_seeds_differ_and_eval_prefix_is_stable(tmp_path):
    assert len(set(data.SPLIT_SEEDS.values())) == 3
    p5, s5 = data.eval_set("val", 30, 5, tmp_path)
    p3, s3 = data.make_puzzles(3, 30, data.SPLIT_SEEDS["val"])
    assert (p5[:3] == p3).all() and (s5[:3] == s3).all()
    t3, _ = data.make_puzzles(3, 30, data.SPLIT_SEEDS["test"])
    assert not (t3 == p3).all(axis=1).any()


def test_corruption_keeps_givens_and_noises_blanks_only():
    c = data.make_carvings(2, seed=5)
    puz, sol = data.sample_batch(c, 64, np.random.default_rng(1), 40, 40)
    canvas, t = data.corrupt(sol, puz, np.random.default_rng(2))
    clean = data.to_grid_ids(sol)
    given = puz != 0
    assert (canvas[given] == clean[given]).all()
    changed = (canvas != clean).mean(1)
    # the changed share of all cells grows with t (about t * 40/81 * 15/16)
    assert np.corrcoef(t, changed)[0, 1] > 0.8
    assert canvas.min() >= 0 and canvas.max() < tokenizer.VOCAB_SIZE


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    puzzle = grid.parse("53..7...." * 9)
    text = "".join(tokenizer.VOCAB[i] for i in tokenizer.prompt_ids(puzzle))
    assert tok(text)["input_ids"] == tokenizer.prompt_ids(puzzle)
    assert tok.decode(tokenizer.grid_ids(range(1, 10))) == "123456789"
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
