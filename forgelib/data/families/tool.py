"""`tool`: products too large to compute mentally, solved with one calculator call.

The worked solution is the calculator markup `<|tool|>expr<|/tool|><|result|>value`, the format the
curriculum phase's calculator answers.
"""
from __future__ import annotations

import random

from forgelib.data import expressions
from forgelib.data.base import TOOL_CLOSE, TOOL_OPEN, TOOL_RESULT, register_family

# level -> (number of products, digits of the left factor, digits of the right factor)
_LEVELS = {1: (1, 3, 2), 2: (1, 3, 3), 3: (1, 4, 3), 4: (1, 4, 4), 5: (2, 4, 3),
           6: (2, 4, 4), 7: (2, 5, 4), 8: (3, 4, 4), 9: (3, 5, 4), 10: (3, 6, 5)}


@register_family("tool", "large products (and sums of them) meant for the calculator tool")
def make_tool(rng: random.Random, level: int):
    """A sum/difference of products of multi-digit numbers."""
    n_products, left_digits, right_digits = _LEVELS[level]
    expr: expressions.Expr = []
    for i in range(n_products):
        if i:
            expr.append(rng.choice("+-"))
        expr += [expressions.number(rng, left_digits), "*", expressions.number(rng, right_digits)]
    text, value = expressions.render(expr), expressions.evaluate(expr)
    return f"{text}=", str(value), [f"{TOOL_OPEN}{text}{TOOL_CLOSE}{TOOL_RESULT}{value}"], {}
