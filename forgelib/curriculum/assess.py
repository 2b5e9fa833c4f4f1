"""Where the curriculum starts: per family, the highest level the model still solves often enough.

The curriculum trains at the edge of what the model can do: a level it has mastered teaches little, one it
almost never solves gives no signal. Given a target band ``(lo, hi)`` of accuracy (e.g. ``(0.5, 0.85)``):

* accuracy >= ``hi``: the level is **mastered**;
* ``lo`` <= accuracy < ``hi``: the level is **in the band** (learnable now);
* accuracy < ``lo``: the level is **too hard**.

**Rule.** Levels are measured in increasing order, and a family stops being measured at the first level whose
accuracy falls below ``lo`` (the levels above it are assumed harder still: this saves most of the measuring
time). The family's *frontier level* is the highest measured level with accuracy >= ``lo`` — the last level
before the model falls out of the band. Its ``status`` says why:

* ``"in_band"``: the frontier's accuracy is inside the band (the usual case);
* ``"mastered"``: it is above the band (the next level is already too hard, or the frontier is the top level
  asked for): the curriculum starts there, the pool retires fast and ``advance`` moves on;
* ``"too_hard"``: even the lowest level asked for is below ``lo``; the frontier is that lowest level.

Accuracies are taken as measured (no smoothing); a family that dips below ``lo`` at one level and would recover
above it is treated as stopped at the dip, which is the safe reading of a noisy measurement. Measure on the
fitness split (``generate(..., split="fitness")``) so that the test split stays unseen.

``assess_by_level`` applies the same rule but measures level by level, every family still being measured at once
(one batched call per level: a model answers many questions together far faster than one family at a time).
"""
from __future__ import annotations

from typing import Callable, Iterable

from forgelib.data.base import check_level

__all__ = ["assess_by_level", "assess_levels"]


def _check_band(band: tuple[float, float]) -> tuple[float, float]:
    lo, hi = band
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"band must be (lo, hi) with 0 <= lo <= hi <= 1, got {band!r}")
    return float(lo), float(hi)


def _status(accuracy: float, lo: float, hi: float) -> str:
    return "mastered" if accuracy >= hi else "in_band" if accuracy >= lo else "too_hard"


def assess_family(accuracy_at: Callable[[str, int], float], family: str, levels: list[int],
                  lo: float, hi: float) -> dict:
    """The frontier of one family (module docstring): `{"level", "accuracy_by_level", "status"}`."""
    measured: dict[int, float] = {}
    frontier = None
    for level in levels:
        accuracy = float(accuracy_at(family, level))
        measured[level] = accuracy
        if accuracy < lo:
            break
        frontier = level
    if frontier is None:
        return {"level": levels[0], "accuracy_by_level": measured, "status": "too_hard"}
    return {"level": frontier, "accuracy_by_level": measured, "status": _status(measured[frontier], lo, hi)}


def assess_levels(accuracy_at: Callable[[str, int], float], families: Iterable[str],
                  levels: Iterable[int] = range(1, 11),
                  band: tuple[float, float] = (0.5, 0.85)) -> dict[str, dict]:
    """Per family, the frontier level (module docstring for the rule).

    `accuracy_at(family, level)` measures the model's accuracy (0..1), e.g. on fitness-split samples; it is
    called for levels in increasing order and no longer for a family once one level falls below `band[0]`.
    Returns `{family: {"level": int, "accuracy_by_level": {level: accuracy}, "status": str}}`.
    """
    lo, hi = _check_band(band)
    ordered = sorted({check_level(level) for level in levels})
    if not ordered:
        raise ValueError("levels must name at least one level")
    return {family: assess_family(accuracy_at, family, ordered, lo, hi) for family in families}


def assess_by_level(accuracies_at: Callable[[int, list[str]], dict[str, float]], families: Iterable[str],
                    levels: Iterable[int] = range(1, 11),
                    band: tuple[float, float] = (0.5, 0.85)) -> dict[str, dict]:
    """``assess_levels`` measured level by level: ``accuracies_at(level, families)`` returns the accuracy of each
    family named (those not yet stopped) at ``level``, called for levels in increasing order. The result is the
    one ``assess_levels`` gives for the same accuracies."""
    lo, _ = _check_band(band)
    ordered = sorted({check_level(level) for level in levels})
    if not ordered:
        raise ValueError("levels must name at least one level")
    families = list(families)
    table: dict[tuple[str, int], float] = {}
    going = list(families)
    for level in ordered:
        if not going:
            break
        got = accuracies_at(level, list(going))
        for family in going:
            table[family, level] = float(got[family])
        going = [f for f in going if table[f, level] >= lo]
    return assess_levels(lambda f, lv: table[f, lv], families, ordered, band)
