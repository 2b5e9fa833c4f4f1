"""`arith`: integer expressions with the usual precedence, e.g. `12+7*3=` -> `33`."""
from __future__ import annotations

import random

from forgelib.data import expressions
from forgelib.data.base import register_family

# level -> (operands, largest operand, operators, largest right factor of `*`, parentheses?)
_LEVELS = {
    1: (2, 99, "+", 0, False),
    2: (2, 99, "+-", 0, False),
    3: (3, 99, "+-", 0, False),
    4: (3, 99, "+-*", 9, False),
    5: (3, 999, "+-*", 12, False),
    6: (4, 999, "+-*", 12, False),
    7: (4, 999, "+-*", 12, True),
    8: (5, 999, "+-*", 12, True),
    9: (5, 9999, "+-*", 12, True),
    10: (6, 9999, "+-*", 12, True),
}


@register_family("arith", "integer expressions with + - * and parentheses; more and larger operands by level")
def make_arith(rng: random.Random, level: int):
    """One expression; steps are the evaluation steps in precedence order."""
    n_operands, max_operand, ops, max_multiplier, parens = _LEVELS[level]
    expr = expressions.flat(rng, n_operands, max_operand, ops, max_multiplier)
    if parens and rng.random() < 0.7:
        expr = expressions.group_pair(rng, expr)
    steps: list[str] = []
    value = expressions.evaluate(expr, steps)
    return f"{expressions.render(expr)}=", str(value), steps, {}
