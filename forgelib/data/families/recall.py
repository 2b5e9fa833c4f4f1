"""`recall`: key-value pairs, then a query about one of them, e.g. `ab:3,cd:7,ef:1 ?cd=` -> `7`.

The number of pairs grows with the level (2 per level). `distance=D` instead places the queried pair
first and adds pairs until at least D characters lie between it and the query, so that a memory can be
tested beyond an attention window; `meta["distance"]` is the measured gap in characters, and
`forgelib.data.tokenizer.token_distance` measures it in a tokenizer's tokens (never more than characters
for a byte-level BPE, so ask for the window size in characters plus a margin and check in tokens).
"""
from __future__ import annotations

import random
import string

from forgelib.data.base import TaskOptionError, register_family


def _key_length(n_keys: int) -> int:
    """Shortest lowercase key length with room to draw `n_keys` distinct keys quickly."""
    length = 2
    while 26 ** length < 2 * n_keys:
        length += 1
    return length


class _Keys:
    """Draws distinct random lowercase keys of one length."""

    def __init__(self, rng: random.Random, length: int):
        self.rng, self.length, self.seen = rng, length, set()

    def draw(self) -> str:
        """A key not drawn before."""
        while True:
            key = "".join(self.rng.choice(string.ascii_lowercase) for _ in range(self.length))
            if key not in self.seen:
                self.seen.add(key)
                return key


def _pairs_for_distance(rng: random.Random, distance: int, top: int) -> tuple[list[str], int]:
    """Pairs whose first is queried and the rest fill at least `distance` characters; returns (pairs, 0)."""
    keys = _Keys(rng, _key_length(distance // 4 + 2))
    pairs = [f"{keys.draw()}:{rng.randint(0, top)}"]
    gap = 1  # the space before the query
    while gap < distance:
        pairs.append(f"{keys.draw()}:{rng.randint(0, top)}")
        gap += len(pairs[-1]) + 1
    return pairs, 0


def _check_options(distance: int | None, n_pairs: int | None) -> None:
    if distance is not None and n_pairs is not None:
        raise TaskOptionError("recall: give either distance or n_pairs, not both")
    for name, value, low in (("distance", distance, 0), ("n_pairs", n_pairs, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise TaskOptionError(f"recall: {name} must be an int >= {low} or None, got {value!r}")


@register_family("recall", "key-value pairs then a query (2 pairs per level, or an explicit distance)",
                 options={"distance": None, "n_pairs": None})
def make_recall(rng: random.Random, level: int, distance: int | None = None, n_pairs: int | None = None):
    """Values are 0-9 up to level 5 and 0-99 above."""
    _check_options(distance, n_pairs)
    top = 9 if level <= 5 else 99
    if distance is not None:
        pairs, query = _pairs_for_distance(rng, distance, top)
    else:
        count = n_pairs or 2 * level
        keys = _Keys(rng, _key_length(count))
        pairs = [f"{keys.draw()}:{rng.randint(0, top)}" for _ in range(count)]
        query = rng.randrange(count)
    listed = ",".join(pairs)
    key, value = pairs[query].split(":")
    pair_end = len(",".join(pairs[:query + 1]))  # character index just after the queried pair
    query_start = len(listed) + 1  # index of "?"
    meta = {"distance": query_start - pair_end, "n_pairs": len(pairs), "query_index": query,
            "pair_end": pair_end, "query_start": query_start}
    return f"{listed} ?{key}=", value, None, meta
