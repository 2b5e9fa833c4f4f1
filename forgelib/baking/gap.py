"""The held-out gap closed of a bake, with a one-sided confidence bound, and the held-out inputs it needs.

Each held-out input ``i`` (a question and one trajectory sampled from the prompted model) gives two numbers: the
summed KL(prompted ‖ unbaked) ``a_i`` and KL(prompted ‖ baked) ``b_i`` over its compared positions. The gap
closed is the ratio estimate

    gap = 1 − R,    R = Σ b_i / Σ a_i

(= ``1 − KL_baked / KL_unbaked`` per compared position, the number ``bake_prompt`` reports). The pairs are
independent draws (input and trajectory), so R is a ratio of two means and its standard error follows from the
delta method (the linearisation of the ratio estimator, Cochran 1977, *Sampling Techniques* §6.4):

    d_i = b_i − R a_i,    s = sd(d_i),    se(R) = s / (ā sqrt(n)),    spread = s / ā

The one-sided lower confidence bound is taken on the log scale, where the ratio's skew is smaller: ``se(log R) =
se(R) / R``, ``lower = 1 − R · exp(z_conf · se(R) / R)`` (to first order ``gap − z_conf · se(R)``). Measured by
simulation (lognormal per-input KL, true gap 2/3, 4000 samples each; ``tests/test_baking_gap.py``): coverage of
the nominal 95 % 0.934 / 0.946 / 0.940 / 0.948 at n = 20 / 69 / 100 / 200, where the plain linear bound
``gap − z · se(R)`` gave 0.909 / 0.936 / 0.930 / 0.943. The gate asks ``lower > target`` (``min_gap_closed``). The
tests also check the bound against a brute-force percentile bootstrap of the pairs (at most 0.0006 apart at
n = 200-800).

**Inputs needed** (``inputs_needed``): ``spread`` is the standard deviation of one input's linearised gap
``−d_i / ā``, so (to first order) a bake whose true gap closed is ``target + margin`` passes with probability
``power`` when ``margin ≥ (z_conf + z_power) · spread / sqrt(n)``, i.e. ``n ≥ ((z_conf + z_power) · spread /
margin)²`` — the same sizing as ``forgelib.stats.questions_needed``, with the spread in place of the discordance. The
spread is
not known before the bake: the phase asks the number an assumed spread needs, then, if the observed spread needs
more, draws more held-out inputs (only the nuisance spread is re-estimated, never the gap).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from ..stats import z_value

__all__ = ["GapBound", "gap_bound", "inputs_needed", "ratio_gap"]


def inputs_needed(margin: float, spread: float, confidence: float = 0.95, power: float = 0.999) -> int:
    """Held-out inputs so that a bake whose true gap closed lies ``margin`` above the target passes the one-sided
    test at ``confidence`` with probability ``power``: ``ceil(((z_conf + z_power) · spread / margin)²)``, >= 2."""
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if not spread >= 0:
        raise ValueError(f"spread must be >= 0, got {spread}")
    z = z_value(confidence) + z_value(power)
    return max(2, math.ceil((z * spread / margin) ** 2))


def ratio_gap(unbaked: Sequence[float], baked: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(gap closed, its one-sided lower confidence bound, the per-input spread) of paired per-input KL sums
    (module docstring); (nan, nan, nan) when the prompt changes nothing (Σ unbaked = 0) or fewer than 2 pairs."""
    n = len(unbaked)
    if n != len(baked):
        raise ValueError(f"paired KL values need the same inputs: {n} unbaked, {len(baked)} baked")
    mean_a = sum(unbaked) / n if n else 0.0
    if n < 2 or not mean_a > 0:
        return math.nan, math.nan, math.nan
    ratio = sum(baked) / sum(unbaked)
    d = [b - ratio * a for a, b in zip(unbaked, baked)]
    mean_d = sum(d) / n  # 0 up to rounding
    spread = math.sqrt(sum((x - mean_d) ** 2 for x in d) / (n - 1)) / mean_a
    se = spread / math.sqrt(n)
    upper = ratio * math.exp(z_value(confidence) * se / ratio) if ratio > 0 else z_value(confidence) * se
    return 1.0 - ratio, 1.0 - upper, spread


@dataclasses.dataclass
class GapBound:
    """One gap-closed check: the estimate, its lower bound, the target, and whether the inputs sufficed."""

    name: str
    n: int
    gap: float
    lower: float
    spread: float
    """Per-input standard deviation of the linearised gap (module docstring)."""
    target: float
    margin: float
    confidence: float
    power: float
    needed: int
    """Held-out inputs this check needs at its observed spread."""
    passed: bool
    note: str = ""

    def as_row(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                for k, v in dataclasses.asdict(self).items()}


def gap_bound(name: str, unbaked: Sequence[float], baked: Sequence[float], target: float, margin: float,
              confidence: float = 0.95, power: float = 0.999, available: int | None = None) -> GapBound:
    """The gap closed of paired per-input KL sums with its lower bound; passes when the bound is above ``target``.
    The note names the inputs needed when the check failed on fewer (``available``: how many could be drawn)."""
    gap, lower, spread = ratio_gap(unbaked, baked, confidence)
    n = len(unbaked)
    if math.isnan(gap):
        return GapBound(name, n, gap, gap, spread, target, margin, confidence, power, n, False,
                        "no gap to close: the prompt changes nothing on the held-out inputs" if n >= 2
                        else f"{n} held-out input(s): at least 2 are needed")
    needed = inputs_needed(margin, spread, confidence, power)
    passed = lower > target
    note = ""
    if not passed and n < needed:
        limit = f"; only {available} could be drawn" if available is not None and available < needed else ""
        note = (f"too few held-out inputs to decide: {n} used, {needed} needed for margin {margin:g} at confidence "
                f"{confidence:g} and power {power:g} (observed spread {spread:.3f}){limit}")
    return GapBound(name, n, gap, lower, spread, target, margin, confidence, power, needed, passed, note)
