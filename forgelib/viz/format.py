"""How numbers read in tables: sizes in KiB/MiB, integers as integers, a few significant digits."""
from __future__ import annotations

import math
from typing import Any


def human_bytes(n: float) -> str:
    """A byte count as a person reads it: ``182174`` -> ``178 KiB`` (1024-based), under 1 KiB in bytes."""
    n = int(n)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.0f} {unit}" if abs(value) >= 100 else f"{value:.3g} {unit}"
    return f"{n} B"


def sig(value: float | None, digits: int = 3) -> float | None:
    """``value`` rounded to ``digits`` significant digits (1.0846 -> 1.08); None and NaN pass through."""
    if value is None or not math.isfinite(value) or value == 0:
        return value
    return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))


def show(key: str, value: Any) -> str:
    """One table cell: a whole count of bytes (``key`` says ``bytes``; a ratio of sizes is not one) in KiB/MiB, a
    whole number as an integer with thousands separators, any other number with 4 significant digits; anything else
    as text."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        whole = isinstance(value, int) or value.is_integer()
        if whole and "bytes" in key:
            return human_bytes(value)
        if isinstance(value, int) or (whole and abs(value) >= 1000):
            return f"{int(value):,}"
        return f"{value:.4g}"
    return str(value)
