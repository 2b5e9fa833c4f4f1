"""Re-solving a prompt of a built-in task family: its exact answer and worked steps, from the text alone.

Questions written by a frontier model (``forgelib.curriculum.frontier``) come with an answer that may be wrong
and with no worked solution. The families' checkers only compare an output with the sample's own answer, so
``check(Sample(prompt, answer, ...), answer)`` holds for any pair and cannot catch a wrong answer. This module
parses a prompt with the grammar its family's generator writes and recomputes the answer (and, where the family
has one, the worked solution in the generator's exact step format, so that hints work on such a question as on
a generated one). A prompt that does not parse is not in the family's format: ``solve`` returns None.

The parsers are strict on purpose: they accept exactly what the generators render (e.g. ``T&F|T`` without
parentheses is rejected, because the logic generator always parenthesises nested operations), so an accepted
question looks to the model like any generated one. The level is *not* checked: a proposed question counts at the
level it was asked for. Round trip (tested): ``solve(s.family, s.prompt) == Solution(s.answer, s.steps)`` for
every generated sample of every family and level.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from forgelib.data import expressions
from forgelib.data.base import ANSWER_MARK, TOOL_CLOSE, TOOL_OPEN, TOOL_RESULT, signed
from forgelib.data.families.logic import tree_steps, tree_value
from forgelib.data.families import sudoku
from forgelib.data.families.sequence import sequence_answer

__all__ = ["Solution", "solve", "SOLVERS"]


@dataclass(frozen=True)
class Solution:
    """The exact answer of a prompt and its worked steps (None where the family writes none)."""

    answer: str
    steps: list[str] | None = None


class _NoParse(ValueError):
    """The text is not in the family's format."""


_NUM = r"(0|[1-9]\d*)"           # a non-negative integer as the generators render it (no leading zeros)
_INT = r"(-?(?:0|[1-9]\d*))"     # an integer that may be negative


# ---------------------------------------------------------------------------------------------- expressions
def _parse_expr(text: str, allow_parens: bool = True) -> expressions.Expr:
    """`12+7*(3-1)` as the flat token list of `forgelib.data.expressions` (groups as nested lists)."""
    expr, end = _parse_flat(text, 0, allow_parens)
    if end != len(text):
        raise _NoParse(f"unexpected {text[end:]!r}")
    return expr


def _parse_flat(text: str, i: int, allow_parens: bool) -> tuple[expressions.Expr, int]:
    out: expressions.Expr = []
    while True:
        if allow_parens and text.startswith("(", i):
            group, i = _parse_flat(text, i + 1, allow_parens)
            if not text.startswith(")", i) or len(group) < 3:
                raise _NoParse("unbalanced or trivial group")
            out.append(group)
            i += 1
        else:
            m = re.compile(_NUM).match(text, i)
            if not m:
                raise _NoParse(f"expected a number at {i}")
            out.append(int(m.group()))
            i = m.end()
        if i < len(text) and text[i] in "+-*":
            out.append(text[i])
            i += 1
            continue
        return out, i


def _solve_arith(prompt: str) -> Solution:
    if not prompt.endswith("="):
        raise _NoParse("no trailing '='")
    expr = _parse_expr(prompt[:-1])
    if len(expr) < 3:
        raise _NoParse("a lone number")
    steps: list[str] = []
    value = expressions.evaluate(expr, steps)
    return Solution(str(value), steps)


def _solve_tool(prompt: str) -> Solution:
    """A sum/difference of products `a*b+c*d=`: one calculator call with the generator's markup."""
    if not prompt.endswith("="):
        raise _NoParse("no trailing '='")
    text = prompt[:-1]
    if not re.fullmatch(rf"{_NUM}\*{_NUM}([+-]{_NUM}\*{_NUM})*", text):
        raise _NoParse("not a sum of products")
    value = expressions.evaluate(_parse_expr(text, allow_parens=False))
    return Solution(str(value), [f"{TOOL_OPEN}{text}{TOOL_CLOSE}{TOOL_RESULT}{value}"])


def _solve_modular(prompt: str) -> Solution:
    m = re.fullmatch(rf"\((.+)\) mod {_NUM}=", prompt)
    if not m:
        raise _NoParse("not '(expr) mod p='")
    expr, p = _parse_expr(m.group(1), allow_parens=False), int(m.group(2))
    if len(expr) < 3 or p < 2:
        raise _NoParse("a lone number or a modulus below 2")
    steps: list[str] = []
    value = expressions.evaluate(expr, steps)
    residue = value % p
    steps.append(f"{value} mod {p}={residue}")
    return Solution(str(residue), steps)


# ---------------------------------------------------------------------------------------------- algebra
def _exact_div(num: int, den: int) -> int:
    if den == 0 or num % den:
        raise _NoParse("no integer solution")
    return num // den


def _solve_algebra(prompt: str) -> Solution:
    """The eight equation forms of the algebra generator, each with its own worked steps."""
    if not prompt.endswith(", x="):
        raise _NoParse("no trailing ', x='")
    eq = prompt[:-len(", x=")]
    if m := re.fullmatch(rf"x\+{_NUM}={_INT}", eq) or re.fullmatch(rf"{_NUM}\+x={_INT}", eq):
        b, r = int(m.group(1)), int(m.group(2))
        x = r - b
        return Solution(str(x), [f"{r}-{b}={x}"])
    if m := re.fullmatch(rf"x-{_NUM}={_INT}", eq):
        b, r = int(m.group(1)), int(m.group(2))
        x = r + b
        return Solution(str(x), [f"{r}+{b}={x}"])
    if m := re.fullmatch(rf"{_NUM}x={_INT}", eq):
        a, r = int(m.group(1)), int(m.group(2))
        x = _exact_div(r, _coef(a))
        return Solution(str(x), [f"{r}/{a}={x}"])
    if m := re.fullmatch(rf"{_NUM}x([+-]){_NUM}={_INT}", eq):
        a, op, b, r = _coef(int(m.group(1))), m.group(2), int(m.group(3)), int(m.group(4))
        ax = r - b if op == "+" else r + b
        x = _exact_div(ax, a)
        undo = f"{r}-{b}={ax}" if op == "+" else f"{r}+{b}={ax}"
        return Solution(str(x), [undo, f"{ax}/{a}={x}"])
    if m := re.fullmatch(rf"{_NUM}\(x\+{_NUM}\)={_INT}", eq):
        a, b, r = _coef(int(m.group(1))), int(m.group(2)), int(m.group(3))
        xb = _exact_div(r, a)
        return Solution(str(xb - b), [f"{r}/{a}={xb}", f"{xb}-{b}={xb - b}"])
    if m := re.fullmatch(rf"{_NUM}x\+{_NUM}={_NUM}x([+-]{_NUM})", eq):
        big, b, c, d = int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4))
        a = big - c
        if c < 1 or a < 1 or m.group(4) != signed(d):
            raise _NoParse("not the generator's two-sided form")
        ax = d - b
        x = _exact_div(ax, a)
        return Solution(str(x), [f"{big}x-{c}x={a}x", f"{d}-{b}={ax}", f"{ax}/{a}={x}"])
    raise _NoParse("not one of the equation forms")


def _coef(a: int) -> int:
    """The generators' coefficients are at least 2 (`1x` and `0x` are not in the format)."""
    if a < 2:
        raise _NoParse("coefficient below 2")
    return a


# ---------------------------------------------------------------------------------------------- logic
def _parse_atom(text: str, i: int):
    """atom := T | F | ~atom | (atom op atom); returns (tree, end) in the logic generator's tree form."""
    if text.startswith("~", i):
        child, i = _parse_atom(text, i + 1)
        return ("~", child, None), i
    if text.startswith(("T", "F"), i):
        return text[i] == "T", i + 1
    if text.startswith("(", i):
        node, i = _parse_binary(text, i + 1)
        if not text.startswith(")", i):
            raise _NoParse("unbalanced parentheses")
        return node, i + 1
    raise _NoParse(f"unexpected {text[i:i + 1]!r}")


def _parse_binary(text: str, i: int):
    left, i = _parse_atom(text, i)
    if i >= len(text) or text[i] not in "&|":
        raise _NoParse("expected & or |")
    op = text[i]
    right, i = _parse_atom(text, i + 1)
    return (op, left, right), i


def _tf(value: bool) -> str:
    return "T" if value else "F"


def _solve_logic(prompt: str) -> Solution:
    """A comparison (`37<52=`, or `12+30>41=` with two worked steps) or a boolean expression."""
    if not prompt.endswith("="):
        raise _NoParse("no trailing '='")
    text = prompt[:-1]
    if m := re.fullmatch(rf"{_NUM}([<>]){_NUM}", text):
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        return Solution(_tf(a < b if op == "<" else a > b), None)
    if m := re.fullmatch(rf"{_NUM}\+{_NUM}([<>]){_NUM}", text):
        x, y, op, b = int(m.group(1)), int(m.group(2)), m.group(3), int(m.group(4))
        left = x + y
        value = _tf(left < b if op == "<" else left > b)
        return Solution(value, [f"{x}+{y}={left}", f"{left}{op}{b}={value}"])
    # the top level is `atom op atom` without parentheses, or a single (negated) atom
    try:
        tree, end = _parse_binary(text, 0)
    except _NoParse:
        tree, end = _parse_atom(text, 0)
    if end != len(text) or isinstance(tree, bool):
        raise _NoParse("not a boolean expression in the generator's format")
    steps: list[str] = []
    tree_steps(tree, steps)
    return Solution(_tf(tree_value(tree)), steps)


# ---------------------------------------------------------------------------------------------- multistep
_FIRST = [
    (re.compile(rf"([A-Z][a-z]+) has {_NUM} boxes of {_NUM} ([a-z]+)\."),
     lambda a, b: (f"{a}*{b}={a * b}", a * b)),
    (re.compile(rf"([A-Z][a-z]+) has {_NUM} ([a-z]+)\."), None),
]
_OPERATIONS: list[tuple[re.Pattern, Callable[..., tuple[str, int]]]] = [
    (re.compile(rf"[A-Z][a-z]* gives away {_NUM}\."), lambda have, k: (f"{have}-{k}={have - k}", have - k)),
    (re.compile(rf"[A-Z][a-z]* gets {_NUM} packs of {_NUM}\."),
     lambda have, k, m: (f"{have}+{k}*{m}={have + k * m}", have + k * m)),
    (re.compile(r"[A-Z][a-z]* doubles them\."), lambda have: (f"{have}*2={have * 2}", have * 2)),
    (re.compile(rf"[A-Z][a-z]* keeps 1 of {_NUM} equal shares\."),
     lambda have, d: (f"{have}/{d}={_exact_div(have, d)}", _exact_div(have, d))),
    (re.compile(rf"[A-Z][a-z]* finds {_NUM} more\."), lambda have, k: (f"{have}+{k}={have + k}", have + k)),
]


def _solve_multistep(prompt: str) -> Solution:
    """Sentences of the word-problem templates, one worked step each (and one for `boxes of`)."""
    sentences = re.split(r"(?<=[.?]) ", prompt)
    if len(sentences) < 2:
        raise _NoParse("fewer than two sentences")
    first, last, middle = sentences[0], sentences[-1], sentences[1:-1]
    steps: list[str] = []
    if m := _FIRST[0][0].fullmatch(first):
        step, have = _FIRST[0][1](int(m.group(2)), int(m.group(3)))
        steps.append(step)
        items = m.group(4)
    elif m := _FIRST[1][0].fullmatch(first):
        have, items = int(m.group(2)), m.group(3)
    else:
        raise _NoParse("first sentence is not 'X has N items.'")
    for sentence in middle:
        for pattern, apply in _OPERATIONS:
            if m := pattern.fullmatch(sentence):
                step, have = apply(have, *map(int, m.groups()))
                break
        else:
            raise _NoParse(f"unknown sentence {sentence!r}")
        if have < 0:
            raise _NoParse("a count below zero")
        steps.append(step)
    if last != f"How many {items}?" or not steps:
        raise _NoParse("no closing question about the items, or no step")
    return Solution(str(have), steps)


# ---------------------------------------------------------------------------------------------- recall, sequence
def _solve_recall(prompt: str) -> Solution:
    m = re.fullmatch(rf"((?:[a-z]+:{_NUM},)*[a-z]+:{_NUM}) \?([a-z]+)=", prompt)
    if not m:
        raise _NoParse("not 'k:v,k:v ?k='")
    pairs = [pair.split(":") for pair in m.group(1).split(",")]
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys) or len({len(k) for k in keys}) != 1 or keys.count(m.group(4)) != 1:
        raise _NoParse("keys not distinct, of unequal length, or the queried key is missing")
    return Solution(dict(pairs)[m.group(4)], None)


def _solve_sequence(prompt: str) -> Solution:
    listed = rf"{_NUM}(?:,{_NUM})*"
    if m := re.fullmatch(rf"count {_NUM} in ({listed})=", prompt):
        values = [int(v) for v in m.group(2).split(",")]
        return Solution(sequence_answer("count", values, int(m.group(1))), None)
    if m := re.fullmatch(rf"(max|min|sort|rev) ({listed})=", prompt):
        values = [int(v) for v in m.group(2).split(",")]
        return Solution(sequence_answer(m.group(1), values, 0), None)
    raise _NoParse("not 'op list=' or 'count t in list='")


def _solve_sudoku(prompt: str) -> Solution:
    m = re.fullmatch(r"sudoku ([1-9.]+(?:/[1-9.]+)+)=", prompt)
    rows = m.group(1).split("/") if m else []
    n = len(rows)
    if n not in sudoku.BOXES or any(len(row) != n for row in rows):
        raise _NoParse("not 'sudoku rows=' with n rows of n cells, n in 4, 6, 9")
    grid = [0 if ch == "." else int(ch) for row in rows for ch in row]
    near = sudoku.peers(n)
    if any(v > n or (v and any(grid[p] == v for p in near[c])) for c, v in enumerate(grid)):
        raise _NoParse("a digit out of range or repeated in a row, column or box")
    fills = sudoku.naked_singles(grid, n)
    if not fills:  # stuck, or nothing to fill
        raise _NoParse("not solvable by naked singles")
    for cell, value in fills:
        grid[cell] = value
    return Solution(sudoku.render(grid, n), sudoku.worked_steps(fills, n))


SOLVERS: dict[str, Callable[[str], Solution]] = {
    "algebra": _solve_algebra, "arith": _solve_arith, "logic": _solve_logic, "modular": _solve_modular,
    "multistep": _solve_multistep, "recall": _solve_recall, "sequence": _solve_sequence, "tool": _solve_tool,
    "sudoku": _solve_sudoku,
}
"""family -> solver; a solver raises on a prompt that is not in its family's format."""


def solve(family: str, prompt: str) -> Solution | None:
    """The answer and worked steps of `prompt` read as a question of `family`; None when it is not in the
    family's format, or when the family has no solver here (a family registered later)."""
    solver = SOLVERS.get(family)
    if solver is None or not isinstance(prompt, str) or ANSWER_MARK in prompt:
        return None
    try:
        return solver(prompt)
    except (_NoParse, RecursionError):
        return None
