"""The Sudoku generator, solver and checker (pure Python, no model)."""

from __future__ import annotations

import random

import pytest

from dgserve.engine.sudoku import grid

SOLVED = ("534678912672195348198342567859761423426853791713924856961537284287419635345286179")


def _grid(s: str) -> tuple[int, ...]:
    return grid.parse(s)


@pytest.mark.parametrize("blanks", [0, 30, 40, 50])
def test_generated_puzzles_have_exactly_one_solution(blanks):
    rng = random.Random(blanks)
    for _ in range(3):
        puzzle, solution = grid.generate(rng, blanks)
        assert sum(1 for v in puzzle if v == 0) == blanks
        assert grid.count_solutions(puzzle, limit=5) == 1
        assert grid.is_valid_solution(solution, puzzle)
        assert grid.solve(puzzle) == solution


def test_generation_is_reproducible_from_the_seed():
    a = grid.generate(random.Random(7), 40)
    b = grid.generate(random.Random(7), 40)
    c = grid.generate(random.Random(8), 40)
    assert a == b
    assert a != c


def test_every_prefix_of_a_carving_is_unique():
    c = grid.carve(random.Random(3))
    assert len(c.order) >= 45
    for k in (10, 30, len(c.order)):
        assert grid.count_solutions(c.puzzle(k)) == 1


def test_counts_multiple_solutions():
    # Blank two cells that can swap (a "deadly pattern" needs 4; blanking a whole row is enough).
    cells = list(_grid(SOLVED))
    for i in range(9):
        cells[i] = 0
    for i in range(9, 18):
        cells[i] = 0
    assert grid.count_solutions(cells, limit=2) == 2
    assert grid.count_solutions([0] * 81, limit=3) == 3


def test_checker_accepts_a_valid_grid():
    assert grid.is_valid_solution(_grid(SOLVED))


@pytest.mark.parametrize("mutate", ["swap_in_row", "change_one", "blank", "short", "ten"])
def test_checker_rejects_wrong_grids(mutate):
    cells = list(_grid(SOLVED))
    if mutate == "swap_in_row":  # rows stay valid, two columns break
        cells[0], cells[1] = cells[1], cells[0]
    elif mutate == "change_one":
        cells[40] = cells[40] % 9 + 1
    elif mutate == "blank":
        cells[5] = 0
    elif mutate == "short":
        cells = cells[:80]
    elif mutate == "ten":
        cells[3] = 10
    assert not grid.is_valid_solution(cells)


def test_checker_rejects_a_valid_grid_that_ignores_a_given():
    solution = _grid(SOLVED)
    puzzle = list(solution)
    puzzle[0] = 0
    other = list(solution)
    # relabel digits 1<->2 everywhere: still a valid Sudoku, but not this puzzle's solution
    other = [{1: 2, 2: 1}.get(v, v) for v in other]
    assert grid.is_valid_solution(other)
    assert not grid.is_valid_solution(other, puzzle)
    assert grid.is_valid_solution(solution, puzzle)


@pytest.mark.parametrize("text,error", [("1" * 80, "81 cells"), ("x" + "." * 80, "'x'")])
def test_parse_names_the_problem(text, error):
    with pytest.raises(ValueError, match=error):
        grid.parse(text)


def test_parse_accepts_dots_zeros_and_whitespace():
    text = SOLVED[:40] + "0" + SOLVED[41:]
    p = grid.parse(" \n".join([text[:40], text[40:]]).replace("0", "."))
    assert p[40] == 0 and len(p) == 81
