"""`sudoku`: fill in a small Sudoku, e.g. `sudoku 1.34/34.2/2143/.321=` -> `1234/3412/2143/4321`.

Rows are joined by `/` and a blank is `.`. Levels 1-5 are 4x4 grids (2x2 boxes) with 2, 4, 6, 8, 10 blanks;
levels 6-10 are 6x6 grids (boxes of 2 rows by 3 columns) with 6, 10, 14, 18, 22 blanks (a 4x4 question with its
answer is ~40 tokens of the smoke tokenizer, within its 64-token context; a 6x6 one ~85: a 128-token context). The
option `size` (4, 6 or 9; a 9x9 grid has 3x3 boxes) keeps one size at every level and spreads its blanks over the ten
levels instead: level+1 blanks for 4x4 (2..11), 2*level+2 for 6x6 (4..22), 5*level+5 for 9x9 (10..55).

The solution grid is a random backtracking fill (it can be any valid grid; relabelling and row/column shuffles of one
base pattern would reach only one of the two essentially different 4x4 grids). Givens are then removed one at a
time in random order, a removal kept only while the puzzle stays solvable by naked singles alone (some blank with
exactly one candidate left, filled, and again until the grid is full). Such a puzzle has exactly one solution, since
each fill is forced. The worked steps (`r2c3=1`, row and column 1-based) are the fills of a solver that always fills
the first forced blank in row-major order.

A benchmark family (``suite=False``): the chain's tokenizer corpus and the families the phases measure do not include
it; a mix that names it trains on it (``forge bench recursion --mix sudoku``: the depth a grid needs is its chain of
forced fills).
"""
from __future__ import annotations

import functools
import random

from forgelib.data.base import TaskOptionError, register_family

BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}  # grid size -> (rows, columns) of one box
_GRIDS = 50  # solution grids tried before a (size, blanks) counts as out of reach


def _shape(level: int, size: int | None) -> tuple[int, int]:
    """(grid size, blanks) of a level: by level without `size`, else on that size's own ramp of ten levels."""
    if size is None:
        return (4, 2 * level) if level <= 5 else (6, 4 * level - 18)
    if isinstance(size, bool) or not isinstance(size, int) or size not in BOXES:
        raise TaskOptionError(f"sudoku: size must be one of 4, 6, 9 or None, got {size!r}")
    return size, {4: level + 1, 6: 2 * level + 2, 9: 5 * level + 5}[size]


@functools.lru_cache(maxsize=None)
def peers(n: int) -> tuple[tuple[int, ...], ...]:
    """For each cell (index row*n+column) of an n x n grid, the other cells of its row, column and box."""
    box_rows, box_cols = BOXES[n]
    out = []
    for cell in range(n * n):
        r, c = divmod(cell, n)
        top, left = r - r % box_rows, c - c % box_cols
        seen = {r * n + i for i in range(n)} | {i * n + c for i in range(n)}
        seen |= {(top + i) * n + left + j for i in range(box_rows) for j in range(box_cols)}
        seen.discard(cell)
        out.append(tuple(sorted(seen)))
    return tuple(out)


def naked_singles(grid: list[int], n: int) -> list[tuple[int, int]] | None:
    """The fills `(cell, value)` that solve `grid` (row-major values, 0 for a blank) by naked singles, each time
    filling the first blank in row-major order that has exactly one candidate; None when it gets stuck."""
    grid, near = list(grid), peers(n)
    used = [0] * (n * n)  # bit v-1 set: value v is taken by a peer
    for cell, value in enumerate(grid):
        if value:
            for p in near[cell]:
                used[p] |= 1 << (value - 1)
    full = (1 << n) - 1
    blanks = [cell for cell in range(n * n) if not grid[cell]]
    fills: list[tuple[int, int]] = []
    while blanks:
        for cell in blanks:
            free = full & ~used[cell]
            if free & (free - 1) == 0:  # one candidate left (or none: a contradiction)
                break
        else:
            return None
        if not free:
            return None
        grid[cell] = free.bit_length()
        fills.append((cell, grid[cell]))
        blanks.remove(cell)
        for p in near[cell]:
            used[p] |= free
    return fills


def _solution(rng: random.Random, n: int) -> list[int]:
    """A random valid full grid: a backtracking fill in row-major order, candidates in random order."""
    grid, near = [0] * (n * n), peers(n)

    def fill(cell: int) -> bool:
        if cell == n * n:
            return True
        taken = {grid[p] for p in near[cell]}
        values = [v for v in range(1, n + 1) if v not in taken]
        rng.shuffle(values)
        for value in values:
            grid[cell] = value
            if fill(cell + 1):
                return True
        grid[cell] = 0
        return False

    fill(0)
    return grid


def _puzzle(rng: random.Random, n: int, blanks: int) -> tuple[list[int], list[int]] | None:
    """(solution, puzzle) with `blanks` blanks solvable by naked singles, from one solution grid; None when that
    grid's random removal order gets stuck before `blanks`."""
    solution = _solution(rng, n)
    puzzle = list(solution)
    order = list(range(n * n))
    rng.shuffle(order)
    removed = 0
    for cell in order:
        if removed == blanks:
            break
        puzzle[cell] = 0
        if naked_singles(puzzle, n) is None:
            puzzle[cell] = solution[cell]
        else:
            removed += 1
    return (solution, puzzle) if removed == blanks else None


def worked_steps(fills: list[tuple[int, int]], n: int) -> list[str]:
    """The fills ``(cell, value)`` of an n x n grid as worked steps: ``r2c3=1`` (row and column 1-based)."""
    return [f"r{cell // n + 1}c{cell % n + 1}={value}" for cell, value in fills]


def render(grid: list[int], n: int) -> str:
    """Rows joined by `/`, a blank as `.`: `1.34/34.2/2143/.321`."""
    return "/".join("".join(str(v) if v else "." for v in grid[r * n:(r + 1) * n]) for r in range(n))


@register_family("sudoku", "fill in a 4x4 (levels 1-5) or 6x6 Sudoku solvable by naked singles; more blanks by level",
                 options={"size": None}, suite=False)
def make_sudoku(rng: random.Random, level: int, size: int | None = None):
    """Retries up to _GRIDS solution grids when the removals get stuck before the level's blanks."""
    n, blanks = _shape(level, size)
    for _ in range(_GRIDS):
        drawn = _puzzle(rng, n, blanks)
        if drawn is not None:
            break
    else:
        raise TaskOptionError(f"sudoku: no {n}x{n} puzzle with {blanks} blanks solvable by naked singles in "
                              f"{_GRIDS} grids; ask for a lower level")
    solution, puzzle = drawn
    steps = worked_steps(naked_singles(puzzle, n), n)
    return f"sudoku {render(puzzle, n)}=", render(solution, n), steps, {"size": n, "blanks": blanks}
