"""`algebra`: one linear equation in x with an integer solution, e.g. `x+7=12, x=` -> `5`."""
from __future__ import annotations

import random

from forgelib.data.base import register_family, signed

# Each form builds (equation, steps) from a chosen solution x, coefficient a (>=2) and constant b (>=0).
_FORMS = {
    "x+a": lambda x, a, b, c: (f"x+{b}={x + b}", [f"{x + b}-{b}={x}"]),
    "a+x": lambda x, a, b, c: (f"{b}+x={x + b}", [f"{x + b}-{b}={x}"]),
    "x-a": lambda x, a, b, c: (f"x-{b}={x - b}", [f"{x - b}+{b}={x}"]),
    "ax": lambda x, a, b, c: (f"{a}x={a * x}", [f"{a * x}/{a}={x}"]),
    "ax+b": lambda x, a, b, c: (f"{a}x+{b}={a * x + b}", [f"{a * x + b}-{b}={a * x}", f"{a * x}/{a}={x}"]),
    "ax-b": lambda x, a, b, c: (f"{a}x-{b}={a * x - b}", [f"{a * x - b}+{b}={a * x}", f"{a * x}/{a}={x}"]),
    "a(x+b)": lambda x, a, b, c: (f"{a}(x+{b})={a * (x + b)}",
                                  [f"{a * (x + b)}/{a}={x + b}", f"{x + b}-{b}={x}"]),
    # a x + b = c x + d with a > c >= 1, d chosen so that x solves it
    "ax+b=cx+d": lambda x, a, b, c: (f"{a + c}x+{b}={c}x{signed(a * x + b)}",
                                      [f"{a + c}x-{c}x={a}x", f"{a * x + b}-{b}={a * x}", f"{a * x}/{a}={x}"]),
}

# level -> (forms, smallest x, largest x, largest coefficient, largest constant)
_LEVELS = {
    1: (("x+a", "a+x"), 0, 50, 2, 50),
    2: (("x+a", "a+x", "x-a"), 0, 99, 2, 99),
    3: (("x-a", "ax"), 0, 25, 9, 50),
    4: (("ax", "ax+b"), 0, 30, 9, 50),
    5: (("ax+b", "ax-b"), 0, 40, 9, 99),
    6: (("ax-b", "a(x+b)"), 0, 50, 12, 99),
    7: (("ax+b", "a(x+b)", "ax+b=cx+d"), -30, 30, 12, 99),
    8: (("ax+b", "ax-b", "a(x+b)", "ax+b=cx+d"), -60, 60, 15, 199),
    9: (("ax-b", "a(x+b)", "ax+b=cx+d"), -99, 99, 19, 499),
    10: (("a(x+b)", "ax+b=cx+d"), -199, 199, 25, 999),
}


@register_family("algebra", "solve a linear equation for integer x; more terms, negatives and larger numbers by level")
def make_algebra(rng: random.Random, level: int):
    """Chooses the solution first so every equation has exactly one integer answer."""
    forms, lo, hi, max_coef, max_const = _LEVELS[level]
    form = rng.choice(forms)
    x, a = rng.randint(lo, hi), rng.randint(2, max_coef)
    b, c = rng.randint(0, max_const), rng.randint(1, max_coef)
    equation, steps = _FORMS[form](x, a, b, c)
    return f"{equation}, x=", str(x), steps, {"form": form}
