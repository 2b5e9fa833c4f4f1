"""`modular`: modular arithmetic, e.g. `(23+45) mod 97=` -> `68`."""
from __future__ import annotations

import random

from forgelib.data import expressions
from forgelib.data.base import register_family

_PRIMES = {1: (5, 7, 11), 2: (7, 11, 13), 3: (11, 13, 17), 4: (13, 17, 19), 5: (17, 19, 23),
           6: (23, 29, 31), 7: (31, 37, 41), 8: (41, 43, 47), 9: (53, 59, 61), 10: (89, 97)}


def _ops(level: int) -> str:
    return "+" if level <= 3 else "+-" if level <= 6 else "+-*"


@register_family("modular", "(a op b) mod p; larger operands, primes and operators by level")
def make_modular(rng: random.Random, level: int):
    """Operands up to 20+20*level; level 10 adds a third operand."""
    p = rng.choice(_PRIMES[level])
    max_operand = 20 + 20 * level
    expr = expressions.flat(rng, 3 if level == 10 else 2, max_operand, _ops(level), max_operand)
    steps: list[str] = []
    value = expressions.evaluate(expr, steps)
    residue = value % p  # Python's % is already the non-negative residue for p > 0
    steps.append(f"{value} mod {p}={residue}")
    return f"({expressions.render(expr)}) mod {p}=", str(residue), steps, {"modulus": p}
