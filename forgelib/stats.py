"""The one gate rule: a paired comparison of two models on the same questions, with a stated margin.

Every gate of the chain that compares two models (a phase's output with its input, a merge with its parents, the
final artifact with the Phase-1 trunk) asks both the same held-out questions and looks at the pairs:

    lost   = questions the first model ("before") answered and the second ("after") did not
    gained = questions the second answered and the first did not
    diff   = (gained - lost) / n                 the accuracy difference after - before

**Non-inferiority** (``noninferior``): the phase may not lose more than a margin ``δ``. It passes when the one-sided
lower confidence bound of ``diff`` lies above ``-δ``; **superiority** (``superior``) when it lies above ``+gain``
(0 for "better at all"). The bound is the Agresti–Min adjusted Wald interval for matched proportions (0.5 added to
each cell of the 2×2 table; Agresti & Min 2005, Biometrics 61: coverage close to nominal down to small n; with
``lost = gained = 0`` it stays finite instead of claiming certainty). ``tests/test_stats.py`` checks it against
the exact McNemar test (binomial on the discordant pairs), a paired bootstrap and simulated coverage.

**Questions needed** (``questions_needed``): with no true change, ``diff`` is about normal with variance ψ/n, ψ the
discordance (the share of questions on which the two models disagree). The test passes with probability ``power``
when ``δ·sqrt(n/ψ) ≥ z_conf + z_power``, i.e. ``n ≥ (z_conf + z_power)² ψ / δ²`` (Connor 1987, for paired
proportions). ψ is not known before the models are asked: the guard (``forgelib.suite.guard``) asks the number an
assumed ψ
needs, then, if the observed ψ and difference need more, asks more (an internal pilot): the next round is sized for
the power at the measured difference, ``(z_conf + z_power)² ψ / (δ + diff)²`` (``forgelib.suite.needed_at``; the
distance floored at δ/3), so a family that clearly improved needs no more questions and one that lost part of the
margin is asked until its verdict is clear of one run's noise. The stopping point depends on the measured
difference, which moves the pass rate a little for a true difference near the margin. A
comparison that cannot reach the number (the questions of a family and level run out, or the cap
``max_questions``) says so, and names the number it needed.

Why this power by default (0.999 per check): a chain has about eight families × eight phases of checks, so a
phase that truly loses nothing must pass each one almost surely, or a long chain fails somewhere by chance.
"""
from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist
from typing import Sequence

__all__ = ["Comparison", "Verdict", "compare", "lower_bound", "upper_bound", "questions_needed", "noninferior",
           "superior", "mcnemar_exact_p", "mean_bounds", "proportion_bounds", "z_value"]


def z_value(probability: float) -> float:
    """The standard normal quantile: P(Z <= z) = probability."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"a probability in (0, 1) is needed, got {probability}")
    return NormalDist().inv_cdf(probability)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The 2×2 table of two models' answers to the same ``n`` questions."""

    n: int
    both: int
    lost: int
    """Right before, wrong after."""
    gained: int
    """Wrong before, right after."""
    neither: int

    @property
    def before(self) -> float:
        return (self.both + self.lost) / self.n if self.n else float("nan")

    @property
    def after(self) -> float:
        return (self.both + self.gained) / self.n if self.n else float("nan")

    @property
    def diff(self) -> float:
        """after − before."""
        return (self.gained - self.lost) / self.n if self.n else float("nan")

    @property
    def discordance(self) -> float:
        """Share of questions the two models answer differently (ψ)."""
        return (self.gained + self.lost) / self.n if self.n else float("nan")

    @property
    def sizing_discordance(self) -> float:
        """ψ for sizing the next round: at least one disagreement is assumed (never 0); 1 with no questions."""
        return max(self.discordance, 1.0 / self.n) if self.n else 1.0

    def __add__(self, other: "Comparison") -> "Comparison":
        return Comparison(self.n + other.n, self.both + other.both, self.lost + other.lost,
                          self.gained + other.gained, self.neither + other.neither)


def compare(before: Sequence, after: Sequence) -> Comparison:
    """The paired table of two per-question correctness lists (bools or 0/1) of equal length."""
    if len(before) != len(after):
        raise ValueError(f"paired answers need the same questions: {len(before)} before, {len(after)} after")
    b = [bool(x) for x in before]
    a = [bool(x) for x in after]
    both = sum(x and y for x, y in zip(b, a))
    lost = sum(x and not y for x, y in zip(b, a))
    gained = sum(y and not x for x, y in zip(b, a))
    return Comparison(len(b), both, lost, gained, len(b) - both - lost - gained)


def _adjusted(c: Comparison) -> tuple[float, float]:
    """(diff, standard error) of the Agresti–Min adjusted table (0.5 added to each of the four cells)."""
    n = c.n + 2.0
    p_lost, p_gained = (c.lost + 0.5) / n, (c.gained + 0.5) / n
    diff = p_gained - p_lost
    var = (p_gained + p_lost - diff ** 2) / n
    return diff, math.sqrt(max(var, 0.0))


def lower_bound(c: Comparison, confidence: float = 0.95) -> float:
    """One-sided lower confidence bound of after − before (Agresti–Min adjusted Wald), clipped to [−1, 1]."""
    if c.n == 0:
        return -1.0
    diff, se = _adjusted(c)
    return max(-1.0, min(1.0, diff - z_value(confidence) * se))


def upper_bound(c: Comparison, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound of after − before (see lower_bound)."""
    if c.n == 0:
        return 1.0
    diff, se = _adjusted(c)
    return max(-1.0, min(1.0, diff + z_value(confidence) * se))


def questions_needed(margin: float, confidence: float = 0.95, power: float = 0.999,
                     discordance: float = 0.15) -> int:
    """Questions a paired comparison needs so that, when the true difference is 0 and the models disagree on a
    share ``discordance`` of the questions, a non-inferiority test at ``margin`` passes with probability ``power``:
    ``ceil((z_conf + z_power)² · ψ / δ²)`` (for a superiority test, ``margin`` is the true gain to detect)."""
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if not 0.0 <= discordance <= 1.0:
        raise ValueError(f"discordance must lie in [0, 1], got {discordance}")
    z = z_value(confidence) + z_value(power)
    return max(1, math.ceil(z * z * discordance / (margin * margin)))


def proportion_bounds(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """One-sided (lower, upper) Wilson score bounds of a proportion ``successes / n``."""
    if n <= 0:
        return 0.0, 1.0
    z = z_value(confidence)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_bounds(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, one-sided lower bound, one-sided upper bound) of paired differences ``values`` (normal approximation
    with the sample standard deviation: the paired t rule at the sizes gates use)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a paired mean needs at least 2 values, got {n}")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = z_value(confidence) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def mcnemar_exact_p(lost: int, gained: int) -> float:
    """One-sided exact McNemar p-value for "after is better": P(X >= gained), X ~ Binomial(lost + gained, 1/2)."""
    m = lost + gained
    if m == 0:
        return 1.0
    return sum(math.comb(m, k) for k in range(gained, m + 1)) / 2 ** m


@dataclasses.dataclass
class Verdict:
    """One gate comparison: the table, the bound, the margin, and whether the questions sufficed."""

    name: str
    kind: str
    """'noninferior' (after − before > −margin) or 'superior' (after − before > margin)."""
    margin: float
    confidence: float
    power: float
    n: int
    before: float
    after: float
    diff: float
    lower: float
    discordance: float
    needed: int
    """Questions this comparison needs at its observed discordance (at least one disagreement assumed)."""
    passed: bool
    note: str = ""

    @property
    def bound(self) -> float:
        return -self.margin if self.kind == "noninferior" else self.margin

    def as_row(self) -> dict:
        return dataclasses.asdict(self)


def _short(n: int, needed: int, margin: float, confidence: float, power: float, psi: str) -> str:
    """The note of a comparison short of questions: how many it asked and how many its margin needs."""
    return (f"too few questions to decide: {n} asked, {needed} needed for margin {margin:g} at confidence "
            f"{confidence:g} and power {power:g} ({psi})")


def _verdict(name: str, kind: str, c: Comparison, margin: float, confidence: float, power: float,
             available: int | None) -> Verdict:
    lower = lower_bound(c, confidence)
    bound = -margin if kind == "noninferior" else margin
    psi = c.sizing_discordance
    needed = questions_needed(margin, confidence, power, psi) if margin > 0 else c.n
    passed = lower > bound
    note = ""
    if not passed and c.n < needed and c.diff > bound:  # more questions could still show it: say how many
        limit = f"; only {available} exist" if available is not None and available < needed else ""
        note = _short(c.n, needed, margin, confidence, power, f"observed discordance {c.discordance:.3f}") + limit
    return Verdict(name, kind, margin, confidence, power, c.n, round(c.before, 4), round(c.after, 4),
                   round(c.diff, 4), round(lower, 4), round(c.discordance, 4), needed, passed, note)


def noninferior(name: str, before: Sequence, after: Sequence, margin: float, confidence: float = 0.95,
                power: float = 0.999, available: int | None = None) -> Verdict:
    """Passes when after − before is above −``margin`` at one-sided ``confidence`` (see the module docstring)."""
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    return _verdict(name, "noninferior", compare(before, after), margin, confidence, power, available)


def noninferior_over(name: str, strata: dict[str, tuple[Sequence, Sequence]], margin: float,
                     confidence: float = 0.95, power: float = 0.999) -> Verdict:
    """Non-inferiority of the suite's mean: ``strata`` maps each family to its (before, after) answers; the
    difference is the unweighted mean of the families' differences, so a family asked more questions (the guard
    asks more where a family lost part of its margin) does not weigh more. Per family the Agresti–Min adjusted
    difference and variance; mean difference ``Σ d_f / F``, variance ``Σ var_f / F²``; the lower bound
    ``mean − z · se`` (a stratified Wald bound; tested against a stratified paired bootstrap). ``before``/``after``
    are the families' mean accuracies; ``discordance`` their mean ψ; ``needed`` the total that equal shares per
    family need at it (``questions_needed`` at the mean ψ)."""
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    tables = {f: compare(b, a) for f, (b, a) in strata.items()}
    tables = {f: c for f, c in tables.items() if c.n}
    if not tables:
        return Verdict(name, "noninferior", margin, confidence, power, 0, float("nan"), float("nan"),
                       float("nan"), -1.0, float("nan"), 0, False, "no questions")
    k = len(tables)
    adjusted = [_adjusted(c) for c in tables.values()]
    mean_adj = sum(d for d, _ in adjusted) / k
    se = math.sqrt(sum(e ** 2 for _, e in adjusted)) / k
    lower = max(-1.0, min(1.0, mean_adj - z_value(confidence) * se))
    n = sum(c.n for c in tables.values())
    before = sum(c.before for c in tables.values()) / k
    after = sum(c.after for c in tables.values()) / k
    psi = sum(c.sizing_discordance for c in tables.values()) / k
    needed = questions_needed(margin, confidence, power, psi) if margin > 0 else n
    passed = lower > -margin
    note = ""
    if not passed and n < needed and after - before > -margin:
        note = _short(n, needed, margin, confidence, power, f"mean discordance {psi:.3f}")
    return Verdict(name, "noninferior", margin, confidence, power, n, round(before, 4), round(after, 4),
                   round(after - before, 4), round(lower, 4), round(psi, 4), needed, passed, note)


def superior(name: str, before: Sequence, after: Sequence, gain: float = 0.0, confidence: float = 0.95,
             power: float = 0.9, available: int | None = None) -> Verdict:
    """Passes when after − before is above ``gain`` at one-sided ``confidence`` (a negative ``gain`` makes it a
    non-inferiority test at −gain)."""
    if not -1 < gain < 1:
        raise ValueError(f"gain must lie in (-1, 1), got {gain}")
    return _verdict(name, "superior", compare(before, after), gain, confidence, power, available)
