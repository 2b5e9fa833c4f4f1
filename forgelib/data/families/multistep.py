"""`multistep`: templated word problems with 1-6 arithmetic steps and a worked solution.

Example (2 steps): `Ana has 3 boxes of 4 pens. She gives away 5. How many pens?` -> `7`,
steps `3*4=12`, `12-5=7`.
"""
from __future__ import annotations

import random

from forgelib.data.base import register_family

_PEOPLE = (("Ana", "She"), ("Ben", "He"), ("Cy", "He"), ("Dee", "She"), ("Eli", "He"), ("Fay", "She"),
           ("Gus", "He"), ("Ivy", "She"), ("Jo", "She"), ("Max", "He"))
_ITEMS = ("pens", "cards", "coins", "apples", "eggs", "books", "shells", "stamps", "beads", "rocks")
_STEPS_BY_LEVEL = {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 7: 4, 8: 5, 9: 5, 10: 6}


def _operation(rng: random.Random, who: str, have: int, top: int) -> tuple[str, str, int]:
    """One sentence that changes the count: (sentence, step, new count). Keeps counts whole and >= 0."""
    kind = rng.choice(("gain", "lose", "packs", "double", "share"))
    if kind == "lose" and have > 0:
        k = rng.randint(1, have)
        return f"{who} gives away {k}.", f"{have}-{k}={have - k}", have - k
    if kind == "packs":
        k, m = rng.randint(2, 5), rng.randint(2, top)
        return f"{who} gets {k} packs of {m}.", f"{have}+{k}*{m}={have + k * m}", have + k * m
    if kind == "double":
        return f"{who} doubles them.", f"{have}*2={have * 2}", have * 2
    divisors = [d for d in range(2, 7) if have and have % d == 0]
    if kind == "share" and divisors:
        d = rng.choice(divisors)
        return f"{who} keeps 1 of {d} equal shares.", f"{have}/{d}={have // d}", have // d
    k = rng.randint(1, top)
    return f"{who} finds {k} more.", f"{have}+{k}={have + k}", have + k


@register_family("multistep", "word problems with 1-6 steps (more steps and larger numbers by level)")
def make_multistep(rng: random.Random, level: int):
    """Starts with a count (or boxes of a count, itself one step) and applies one sentence per step."""
    name, pronoun = rng.choice(_PEOPLE)
    items, top = rng.choice(_ITEMS), 5 + 2 * level
    n_steps = _STEPS_BY_LEVEL[level]
    a = rng.randint(2, top)
    if rng.random() < 0.5:
        b = rng.randint(2, top)
        sentences, steps, have = [f"{name} has {a} boxes of {b} {items}."], [f"{a}*{b}={a * b}"], a * b
    else:
        sentences, steps, have = [f"{name} has {a} {items}."], [], a
    while len(steps) < n_steps:
        sentence, step, have = _operation(rng, pronoun, have, top)
        sentences.append(sentence)
        steps.append(step)
    prompt = " ".join(sentences + [f"How many {items}?"])
    return prompt, str(have), steps, {"n_steps": n_steps}
