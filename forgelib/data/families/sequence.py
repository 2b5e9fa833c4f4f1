"""`sequence`: operations on a list: max, min, sort, reverse, count, e.g. `sort 3,1,2=` -> `1,2,3`."""
from __future__ import annotations

import random

from forgelib.data.base import register_family

_OPS = ("max", "min", "sort", "rev", "count")


def _max_value(level: int) -> int:
    return 9 if level <= 4 else 99 if level <= 8 else 999


def sequence_answer(op: str, values: list[int], target: int) -> str:
    """The answer text of ``op`` on ``values`` (``target``: the value ``count`` counts); ``forgelib.curriculum.verify``
    re-solves parsed prompts with it."""
    if op == "max":
        return str(max(values))
    if op == "min":
        return str(min(values))
    if op == "count":
        return str(values.count(target))
    ordered = sorted(values) if op == "sort" else values[::-1]
    return ",".join(map(str, ordered))


@register_family("sequence", "max/min/sort/reverse/count of a list; longer lists and larger values by level")
def make_sequence(rng: random.Random, level: int):
    """A list of 2+level values; `count` asks for one value's occurrences (present or not)."""
    values = [rng.randint(0, _max_value(level)) for _ in range(2 + level)]
    op = rng.choice(_OPS)
    target = rng.choice(values) if rng.random() < 0.7 else rng.randint(0, _max_value(level))
    listed = ",".join(map(str, values))
    prompt = f"count {target} in {listed}=" if op == "count" else f"{op} {listed}="
    return prompt, sequence_answer(op, values, target), None, {"op": op}
