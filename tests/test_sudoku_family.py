"""Tests of the `sudoku` task family, each against an independent reference written here (a brute-force
backtracking solver, a validity check, a replay of the worked steps), never the module's own helpers."""
from __future__ import annotations

import random
import re

import pytest

from forgelib.data.tasks import (ANSWER_MARK, LEVELS, STEP_SEP, TaskOptionError, check, completion_text, generate,
                                 get_family)

BOX = {4: (2, 2), 6: (2, 3), 9: (3, 3)}
BLANKS = {1: 2, 2: 4, 3: 6, 4: 8, 5: 10, 6: 6, 7: 10, 8: 14, 9: 18, 10: 22}  # the default size by level


# ---------------------------------------------------------------------------------------------------------
# The reference: grids as lists of rows of ints (0 for a blank)

def parse_rows(text: str) -> list[list[int]]:
    return [[0 if ch == "." else int(ch) for ch in row] for row in text.split("/")]


def parse_prompt(prompt: str) -> list[list[int]]:
    match = re.fullmatch(r"sudoku ([1-9./]+)=", prompt)
    assert match, prompt
    return parse_rows(match.group(1))


def units(n: int) -> list[list[tuple[int, int]]]:
    """Every row, column and box of an n x n grid as a list of (row, column)."""
    br, bc = BOX[n]
    rows = [[(r, c) for c in range(n)] for r in range(n)]
    cols = [[(r, c) for r in range(n)] for c in range(n)]
    boxes = [[(top + i, left + j) for i in range(br) for j in range(bc)]
             for top in range(0, n, br) for left in range(0, n, bc)]
    return rows + cols + boxes


def candidates(grid: list[list[int]], r: int, c: int) -> set[int]:
    n = len(grid)
    taken = {grid[i][j] for unit in units(n) if (r, c) in unit for i, j in unit}
    return set(range(1, n + 1)) - taken


def solutions(grid: list[list[int]], limit: int = 2) -> list[list[list[int]]]:
    """Up to `limit` solutions by backtracking (the blank with fewest candidates first)."""
    found: list[list[list[int]]] = []
    blanks = [(r, c) for r, row in enumerate(grid) for c, v in enumerate(row) if not v]
    if not blanks:
        return [[row[:] for row in grid]]
    r, c = min(blanks, key=lambda rc: len(candidates(grid, *rc)))
    for value in sorted(candidates(grid, r, c)):
        grid[r][c] = value
        found += solutions(grid, limit - len(found))
        grid[r][c] = 0
        if len(found) >= limit:
            break
    return found


def is_valid_solution(grid: list[list[int]]) -> bool:
    n = len(grid)
    return all(len(row) == n for row in grid) and all(
        sorted(grid[r][c] for r, c in unit) == list(range(1, n + 1)) for unit in units(n))


def check_sample(s, n: int, blanks: int) -> None:
    puzzle, answer = parse_prompt(s.prompt), parse_rows(s.answer)
    assert len(puzzle) == n and all(len(row) == n for row in puzzle), s.prompt
    assert is_valid_solution(answer), s.answer
    assert all(p in (0, a) for prow, arow in zip(puzzle, answer) for p, a in zip(prow, arow)), s.prompt
    assert sum(v == 0 for row in puzzle for v in row) == blanks and s.meta == {"size": n, "blanks": blanks}
    assert solutions([row[:] for row in puzzle]) == [answer], s.prompt
    assert ANSWER_MARK not in s.prompt + s.answer and not any(STEP_SEP in step for step in s.steps)


def replay(s) -> list[list[int]]:
    """Play the steps on the prompt's grid, each one the first forced blank (row-major) at its turn."""
    grid = parse_prompt(s.prompt)
    for step in s.steps:
        match = re.fullmatch(r"r(\d)c(\d)=(\d)", step)
        assert match, step
        r, c, value = int(match.group(1)) - 1, int(match.group(2)) - 1, int(match.group(3))
        assert grid[r][c] == 0 and candidates(grid, r, c) == {value}, (s.prompt, step)
        first = next((i, j) for i, row in enumerate(grid) for j, v in enumerate(row)
                     if not v and len(candidates(grid, i, j)) == 1)
        assert first == (r, c), (s.prompt, step)
        grid[r][c] = value
    return grid


# ---------------------------------------------------------------------------------------------------------
# The family

@pytest.mark.parametrize("level", LEVELS)
def test_every_level_has_one_solution_equal_to_the_answer(level):
    n = 4 if level <= 5 else 6
    samples = generate("sudoku", level, 15, split="train", seed=1)
    assert len({s.prompt for s in samples}) == 15
    for s in samples:
        check_sample(s, n, BLANKS[level])
        assert len(s.prompt) == {4: 27, 6: 49}[n]  # `sudoku `, n rows of n, n-1 slashes, `=`


def test_size_option_keeps_one_size_on_its_own_ramp():
    for s in generate("sudoku", 6, 3, split="test", seed=2, size=9):
        check_sample(s, 9, 35)
        assert replay(s) == parse_rows(s.answer)
    for size, level, blanks in ((4, 10, 11), (6, 1, 4), (6, 10, 22)):
        for s in generate("sudoku", level, 5, seed=3, size=size):
            check_sample(s, size, blanks)


@pytest.mark.parametrize("level", [1, 3, 5, 6, 8, 10])
def test_steps_are_forced_singles_that_end_at_the_answer(level):
    for s in generate("sudoku", level, 15, split="fitness", seed=4):
        assert len(s.steps) == BLANKS[level]
        assert replay(s) == parse_rows(s.answer)


def test_same_seed_same_sample():
    family = get_family("sudoku")
    for level in (2, 9):
        assert family.draw(random.Random(7), level) == family.draw(random.Random(7), level)
    assert generate("sudoku", 8, 10, seed=5) == generate("sudoku", 8, 10, seed=5)
    assert generate("sudoku", 8, 10, seed=5) != generate("sudoku", 8, 10, seed=6)


@pytest.mark.parametrize("bad", [3, 5, 8, 16, "4", 4.0, True])
def test_bad_size_is_refused_naming_the_allowed_values(bad):
    with pytest.raises(TaskOptionError, match="4, 6, 9"):
        generate("sudoku", 1, 2, size=bad)


def test_checker_accepts_the_answer_and_rejects_two_cells_swapped():
    for s in generate("sudoku", 7, 5, split="test", seed=8):
        assert check(s, s.answer) and check(s, completion_text(s, with_steps=True))
        cells = list(s.answer)
        i = 0
        j = next(k for k, ch in enumerate(cells) if ch not in "/" + cells[i])
        cells[i], cells[j] = cells[j], cells[i]
        swapped = "".join(cells)
        assert sorted(swapped) == sorted(s.answer) and not is_valid_solution(parse_rows(swapped))
        assert not check(s, swapped) and not get_family("sudoku").check(s, swapped)


def test_sudoku_is_a_benchmark_family_outside_the_chains_suite():
    """Registered (a mix may name it), but not in the chain's suite: the Phase-1 tokenizer's corpus leaves it out
    unless a stage trains on it, so adding the family changed no tokenizer and no model of the chain."""
    import dataclasses

    from forgelib.data.tasks import FAMILIES, suite_families
    from forgelib.phases import cognate

    assert "sudoku" in FAMILIES and not FAMILIES["sudoku"].suite
    suite = ["algebra", "arith", "logic", "modular", "multistep", "recall", "sequence", "tool"]
    assert suite_families() == suite == [f for f in FAMILIES if f != "sudoku"]
    params = cognate.Params()
    assert cognate.tokenizer_families(params) == suite
    trunk = dataclasses.replace(params.trunk, mix={"sudoku": 1, "arith": 1})
    assert cognate.tokenizer_families(dataclasses.replace(params, trunk=trunk)) == list(FAMILIES)  # all nine
