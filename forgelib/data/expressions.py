"""Integer expressions built as token lists, rendered and evaluated by the generator that made them.

An expression is a flat list `[operand, op, operand, op, ...]` with ops in `+ - *`; an operand is an int
or a nested flat list (a parenthesized group). The generator evaluates its own trees (no parsing, no
`eval`), recording the worked steps a person would write: groups first, then `*`, then `+`/`-` left to right.
The `arith`, `modular` and `tool` families build their prompts with it; `forgelib.curriculum.verify` parses
prompts back into it.
"""
from __future__ import annotations

import random

Expr = list  # [int | Expr, str, int | Expr, ...]


def render(expr: Expr) -> str:
    """`12+7*3`, with parentheses around nested groups."""
    return "".join(f"({render(x)})" if isinstance(x, list) else str(x) for x in expr)


def evaluate(expr: Expr, steps: list[str] | None = None) -> int:
    """Value of `expr` with the usual precedence; appends `a*b=c`-style steps to `steps` if given."""
    steps = [] if steps is None else steps
    values = [evaluate(x, steps) if isinstance(x, list) else x for x in expr[0::2]]
    ops = expr[1::2]
    terms, signs = [values[0]], []
    for op, value in zip(ops, values[1:]):
        if op == "*":
            steps.append(f"{terms[-1]}*{value}={terms[-1] * value}")
            terms[-1] *= value
        else:
            signs.append(op)
            terms.append(value)
    total = terms[0]
    for op, term in zip(signs, terms[1:]):
        new = total + term if op == "+" else total - term
        steps.append(f"{total}{op}{term}={new}")
        total = new
    return total


def flat(rng: random.Random, n_operands: int, max_operand: int, ops: str, max_multiplier: int) -> Expr:
    """A flat expression; the operand right of each `*` stays small so the product stays mental."""
    expr: Expr = [rng.randint(0, max_operand)]
    for _ in range(n_operands - 1):
        op = rng.choice(ops)
        expr += [op, rng.randint(0, max_multiplier if op == "*" else max_operand)]
    return expr


def group_pair(rng: random.Random, expr: Expr) -> Expr:
    """Wrap one adjacent `a+b` / `a-b` pair in parentheses (unchanged when there is none)."""
    spots = [i for i in range(1, len(expr), 2) if expr[i] in "+-"]
    if not spots:
        return expr
    i = rng.choice(spots)
    return expr[:i - 1] + [expr[i - 1:i + 2]] + expr[i + 2:]


def number(rng: random.Random, digits: int) -> int:
    """A random integer with exactly `digits` digits."""
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)
