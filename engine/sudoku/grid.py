"""Sudoku grids: generator (unique solutions, difficulty = number of blanks), solver, checker.

A grid is a tuple of 81 ints in row-major order, 0 for a blank. Everything here is pure
Python and deterministic given a ``random.Random``: the same seed gives the same puzzles on
every machine, which is what makes the train/validation/test splits reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

N_CELLS = 81
ALL = 0x3FE  # bits 1..9
ROW = tuple(i // 9 for i in range(N_CELLS))
COL = tuple(i % 9 for i in range(N_CELLS))
BOX = tuple((i // 27) * 3 + (i % 9) // 3 for i in range(N_CELLS))
PEERS = tuple(
    tuple(j for j in range(N_CELLS) if j != i and (ROW[j] == ROW[i] or COL[j] == COL[i] or BOX[j] == BOX[i]))
    for i in range(N_CELLS)
)
_BITS = {1 << d: d for d in range(1, 10)}


def parse(text: str) -> tuple[int, ...]:
    """81 characters, digits 1-9 with '.' or '0' for a blank (whitespace ignored)."""
    chars = [c for c in text if not c.isspace()]
    if len(chars) != N_CELLS:
        raise ValueError(f"a Sudoku has 81 cells, got {len(chars)} characters")
    bad = [c for c in chars if c not in ".0123456789"]
    if bad:
        raise ValueError(f"cells must be digits 1-9, '.' or '0'; got {bad[0]!r}")
    return tuple(0 if c in ".0" else int(c) for c in chars)


def format_grid(grid: Sequence[int], blank: str = ".") -> str:
    return "".join(str(v) if v else blank for v in grid)


def is_valid_solution(grid: Sequence[int], puzzle: Sequence[int] | None = None) -> bool:
    """True iff ``grid`` is a complete Sudoku (every row, column and box holds 1..9 once) and,
    when ``puzzle`` is given, agrees with every given cell of it."""
    if len(grid) != N_CELLS or any(not isinstance(v, int) or not 1 <= v <= 9 for v in grid):
        return False
    for unit_of in (ROW, COL, BOX):
        seen = [0] * 9
        for i, v in enumerate(grid):
            u = unit_of[i]
            if seen[u] >> v & 1:
                return False
            seen[u] |= 1 << v
    if puzzle is not None:
        if len(puzzle) != N_CELLS:
            return False
        if any(p and p != g for p, g in zip(puzzle, grid)):
            return False
    return True


def _masks(grid: Sequence[int]) -> tuple[list[int], list[int], list[int]] | None:
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, v in enumerate(grid):
        if v:
            b = 1 << v
            if rows[ROW[i]] & b or cols[COL[i]] & b or boxes[BOX[i]] & b:
                return None  # two equal digits in one unit
            rows[ROW[i]] |= b
            cols[COL[i]] |= b
            boxes[BOX[i]] |= b
    return rows, cols, boxes


def _search(cells: list[int], rows: list[int], cols: list[int], boxes: list[int], limit: int,
            out: list[list[int]], rng: random.Random | None) -> int:
    """Depth-first search with the most-constrained cell first; counts up to ``limit`` solutions
    and keeps the first one in ``out``. ``rng`` shuffles candidate order (used to fill grids)."""
    best, best_mask, best_n = -1, 0, 10
    for i in range(N_CELLS):
        if cells[i] == 0:
            m = ALL & ~(rows[ROW[i]] | cols[COL[i]] | boxes[BOX[i]])
            n = m.bit_count()
            if n < best_n:
                best, best_mask, best_n = i, m, n
                if n <= 1:
                    break
    if best < 0:
        if not out:
            out.append(cells.copy())
        return 1
    if best_n == 0:
        return 0
    digits = [d for d in range(1, 10) if best_mask >> d & 1]
    if rng is not None:
        rng.shuffle(digits)
    r, c, b = ROW[best], COL[best], BOX[best]
    found = 0
    for d in digits:
        bit = 1 << d
        cells[best] = d
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
        found += _search(cells, rows, cols, boxes, limit - found, out, rng)
        rows[r] ^= bit
        cols[c] ^= bit
        boxes[b] ^= bit
        cells[best] = 0
        if found >= limit:
            break
    return found


def count_solutions(puzzle: Sequence[int], limit: int = 2) -> int:
    """Number of solutions of ``puzzle``, counted up to ``limit`` (2 is enough to test uniqueness)."""
    masks = _masks(puzzle)
    if masks is None:
        return 0
    return _search(list(puzzle), *masks, limit, [], None)


def solve(puzzle: Sequence[int]) -> tuple[int, ...] | None:
    """One solution of ``puzzle`` (the only one when it is unique), or None."""
    masks = _masks(puzzle)
    if masks is None:
        return None
    out: list[list[int]] = []
    _search(list(puzzle), *masks, 1, out, None)
    return tuple(out[0]) if out else None


def random_solution(rng: random.Random) -> tuple[int, ...]:
    """A random complete grid (randomised backtracking from an empty grid)."""
    out: list[list[int]] = []
    _search([0] * N_CELLS, [0] * 9, [0] * 9, [0] * 9, 1, out, rng)
    return tuple(out[0])


@dataclass(frozen=True)
class Carving:
    """A full grid and the order in which cells were blanked, each removal keeping the
    solution unique. The puzzle with ``k`` blanks is the solution with ``order[:k]`` blanked,
    for every ``k <= len(order)``."""

    solution: tuple[int, ...]
    order: tuple[int, ...]

    def puzzle(self, blanks: int) -> tuple[int, ...]:
        if not 0 <= blanks <= len(self.order):
            raise ValueError(f"this carving reaches {len(self.order)} blanks, asked for {blanks}")
        cells = list(self.solution)
        for i in self.order[:blanks]:
            cells[i] = 0
        return tuple(cells)


def carve(rng: random.Random, max_blanks: int = N_CELLS) -> Carving:
    """Blank cells of a random grid in random order, skipping any removal that would allow a
    second solution, until ``max_blanks`` blanks or no cell can be removed."""
    solution = random_solution(rng)
    cells = list(solution)
    candidates = list(range(N_CELLS))
    rng.shuffle(candidates)
    order: list[int] = []
    for i in candidates:
        if len(order) >= max_blanks:
            break
        v, cells[i] = cells[i], 0
        if count_solutions(cells, 2) == 1:
            order.append(i)
        else:
            cells[i] = v
    return Carving(solution, tuple(order))


def generate(rng: random.Random, blanks: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A (puzzle, solution) pair with exactly ``blanks`` blanks and a unique solution."""
    if not 0 <= blanks <= 64:
        raise ValueError(f"blanks must be in 0..64 (no unique Sudoku has fewer than 17 givens), got {blanks}")
    while True:
        c = carve(rng, blanks)
        if len(c.order) == blanks:
            return c.puzzle(blanks), c.solution
