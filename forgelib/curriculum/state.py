"""JSON-safe state helpers shared by the curriculum classes: random generators and samples.

Every random choice of the curriculum comes from a ``random.Random`` kept in the object's state, so that a run
saved and loaded again makes the same choices as one that never stopped. ``Random.getstate()`` is a tuple
``(version, tuple of 625 ints, gauss_next)``; JSON has no tuples, so it is stored as a list and turned back.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any

from forgelib.data.base import Sample

__all__ = ["rng_to_json", "rng_from_json", "sample_to_json", "sample_from_json"]


def rng_to_json(rng: random.Random) -> list:
    """The generator's full state as JSON-safe lists."""
    version, internal, gauss_next = rng.getstate()
    return [version, list(internal), gauss_next]


def rng_from_json(data: list) -> random.Random:
    """A generator in exactly the state `rng_to_json` recorded."""
    version, internal, gauss_next = data
    rng = random.Random()
    rng.setstate((version, tuple(internal), gauss_next))
    return rng


def sample_to_json(sample: Sample) -> dict[str, Any]:
    """A Sample as a plain dict (its fields)."""
    return dataclasses.asdict(sample)


def sample_from_json(data: dict[str, Any]) -> Sample:
    """The Sample `sample_to_json` wrote."""
    data = dict(data)
    if data.get("steps") is not None:
        data["steps"] = list(data["steps"])
    data["meta"] = dict(data.get("meta") or {})
    return Sample(**data)
