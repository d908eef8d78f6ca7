"""Reproducible Sudoku splits and the training batches built from them.

Splits are seeded and disjoint by construction (different seeds draw different random grids;
a collision among ~6.7e21 grids is not a practical concern, and ``split_overlap`` checks it):

- ``train``: carvings (a grid + the order of its uniqueness-preserving removals), so one
  stored carving gives a unique-solution puzzle at every blank count up to its maximum;
  batches then apply a random validity-preserving symmetry (digit relabelling, row/column
  permutations inside bands/stacks, band/stack permutations, transposition).
- ``val`` / ``test``: independent puzzles with exactly 30, 40 and 50 blanks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import grid
from .tokenizer import BOS, DIGIT0, VOCAB_SIZE

SPLIT_SEEDS = {"train": 1_000_003, "val": 2_000_003, "test": 3_000_017}
EVAL_BLANKS = (30, 40, 50)


@dataclass
class Carvings:
    solutions: np.ndarray  # (N, 81) int8, digits 1..9
    orders: np.ndarray  # (N, 81) int8, removal order, padded with -1
    lengths: np.ndarray  # (N,) int16, number of valid entries of ``orders``

    def __len__(self) -> int:
        return len(self.solutions)


def make_carvings(n: int, seed: int, progress: bool = False) -> Carvings:
    rng = random.Random(seed)
    sols = np.zeros((n, 81), np.int8)
    orders = np.full((n, 81), -1, np.int8)
    lengths = np.zeros(n, np.int16)
    it = range(n)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"carving (seed {seed})", mininterval=5)
    for k in it:
        c = grid.carve(rng)
        sols[k] = c.solution
        orders[k, : len(c.order)] = c.order
        lengths[k] = len(c.order)
    return Carvings(sols, orders, lengths)


def make_puzzles(n: int, blanks: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unique-solution puzzles with exactly ``blanks`` blanks: (puzzles, solutions), (n, 81) int8."""
    rng = random.Random(seed * 100 + blanks)
    puz = np.zeros((n, 81), np.int8)
    sol = np.zeros((n, 81), np.int8)
    for k in range(n):
        p, s = grid.generate(rng, blanks)
        puz[k], sol[k] = p, s
    return puz, sol


def save_carvings(c: Carvings, path: Path) -> None:
    np.savez_compressed(path, solutions=c.solutions, orders=c.orders, lengths=c.lengths)


def load_carvings(path: Path) -> Carvings:
    z = np.load(path)
    return Carvings(z["solutions"], z["orders"], z["lengths"])


def eval_set(split: str, blanks: int, n: int, cache_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` puzzles of a split at ``blanks`` blanks (generated once, cached as .npz).
    Puzzle k does not depend on n, so a short prefix (used by the tests) equals the full set's."""
    if split not in ("val", "test"):
        raise ValueError(f"eval splits are 'val' and 'test', got {split!r}")
    if cache_dir is not None:
        path = cache_dir / f"{split}_{blanks}.npz"
        if path.exists():
            z = np.load(path)
            if len(z["puzzles"]) >= n:
                return z["puzzles"][:n], z["solutions"][:n]
    puz, sol = make_puzzles(n, blanks, SPLIT_SEEDS[split])
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache_dir / f"{split}_{blanks}.npz", puzzles=puz, solutions=sol)
    return puz, sol


# --- symmetry augmentation ---------------------------------------------------------------

def random_symmetry(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random cell permutation (new cell i takes old cell perm[i]) and digit relabelling
    (``relabel[d]`` for d in 0..9, 0 -> 0) that map valid grids to valid grids."""
    bands = rng.permutation(3)
    rows = np.concatenate([b * 3 + rng.permutation(3) for b in bands])
    stacks = rng.permutation(3)
    cols = np.concatenate([s * 3 + rng.permutation(3) for s in stacks])
    perm = (rows[:, None] * 9 + cols[None, :]).reshape(81)
    if rng.random() < 0.5:
        perm = perm.reshape(9, 9).T.reshape(81)
    relabel = np.concatenate([[0], 1 + rng.permutation(9)])
    return perm, relabel


def sample_batch(c: Carvings, batch: int, rng: np.random.Generator, min_blanks: int = 20,
                 max_blanks: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(puzzles, solutions), (B, 81) int64: random carvings, blank count uniform in
    [min_blanks, min(max_blanks, carving length)], random symmetry per example."""
    idx = rng.integers(0, len(c), batch)
    puz = np.empty((batch, 81), np.int64)
    sol = np.empty((batch, 81), np.int64)
    for b, i in enumerate(idx):
        hi = min(max_blanks, int(c.lengths[i]))
        k = int(rng.integers(min(min_blanks, hi), hi + 1))
        s = c.solutions[i].astype(np.int64)
        p = s.copy()
        p[c.orders[i, :k].astype(np.int64)] = 0
        perm, relabel = random_symmetry(rng)
        sol[b] = relabel[s[perm]]
        puz[b] = relabel[p[perm]]
    return puz, sol


def to_prompt_ids(puzzles: np.ndarray) -> np.ndarray:
    """(B, 81) digits -> (B, 82) token ids: <bos> + one token per cell."""
    return np.concatenate([np.full((len(puzzles), 1), BOS, np.int64), DIGIT0 + puzzles.astype(np.int64)], axis=1)


def to_grid_ids(grids: np.ndarray) -> np.ndarray:
    return DIGIT0 + grids.astype(np.int64)


def corrupt(solutions: np.ndarray, puzzles: np.ndarray, rng: np.random.Generator,
            noise_power: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Uniform-state corruption of the solution canvas: noise level t = u ** noise_power with
    u ~ U(0, 1) per example (power 0.5: density 2t, more of the noisy canvases the sampler's
    early steps see),
    each blank cell replaced with probability t by a token drawn uniformly from the whole
    vocabulary (as the sampler's renoising does); given cells stay clean (pinned).
    Returns (canvas ids (B, 81), t (B,))."""
    b = len(solutions)
    t = rng.random(b) ** noise_power
    clean = to_grid_ids(solutions)
    noise = rng.integers(0, VOCAB_SIZE, clean.shape)
    hit = (rng.random(clean.shape) < t[:, None]) & (puzzles == 0)
    return np.where(hit, noise, clean), t
