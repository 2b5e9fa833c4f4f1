"""How the curriculum measures: question counts that follow from a stated rule, held-out level decisions, paired
comparisons sized by an internal pilot.

Everything here takes the model as a callable ``ask(samples) -> [0/1 per sample]`` (asked once for a whole list,
so that the caller can batch the generation), so it is tested without a model. The confidence bounds are those of
``forgelib.stats`` (Wilson for one accuracy, Agresti–Min for a paired difference).

**Estimating an accuracy** (``estimate_questions``, the assessment): ``n = z² p(1−p) / τ²`` with ``z`` the two-sided
quantile of ``power``: the measured accuracy lies within ``±τ`` of the true one with probability ``power``
(``p = 1/2``, the worst case, when nothing is known).

**Deciding a level** (``decision_questions``, ``decide_levels``): a level is *mastered* when the one-sided lower
confidence bound (Wilson, at ``confidence``) of its accuracy on held-out questions lies above ``threshold`` (the
band's upper edge ``p`` minus a margin ``τ``). ``n = ((z_conf·√(p0(1−p0)) + z_power·√(p(1−p))) / τ)²`` with
``p0 = p − τ`` (the one-sample binomial test's number): a model whose true accuracy is the band's edge passes with
probability ``power``; one whose true accuracy is at most the threshold passes with probability at most
``1 − confidence`` (per decision). To save time a first share
of the questions is asked alone; a family whose *upper* bound already lies below the threshold stops there (it
cannot be mastered: stopping early for futility never makes a wrong advance more likely).

**Comparing two models** (``paired_answers``): the questions a paired test needs follow from
``forgelib.stats.questions_needed`` at an assumed discordance; once both models answered them, the observed
discordance sets the number again and the missing questions are asked (only the nuisance discordance is
re-estimated, never the difference).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

from forgelib.data.base import Sample
from forgelib.data.tasks import generate
from forgelib.stats import compare, proportion_bounds, questions_needed, z_value

__all__ = ["LevelDecision", "decide_levels", "decision_questions", "estimate_questions", "paired_answers",
           "spread_questions"]

Ask = Callable[[Sequence[Sample]], list]


def estimate_questions(margin: float, power: float, p: float = 0.5) -> int:
    """Questions for one accuracy to lie within ``±margin`` of the truth with probability ``power`` (module
    docstring), at a true accuracy ``p``."""
    _check(margin, power, p)
    z = z_value((1 + power) / 2)
    return max(1, math.ceil(z * z * p * (1 - p) / margin ** 2))


def decision_questions(margin: float, confidence: float, power: float, p: float) -> int:
    """Held-out questions of one level decision (module docstring): a true accuracy ``p`` passes the threshold
    ``p0 = p − margin`` with probability ``power`` at one-sided ``confidence`` (the one-sample binomial test's
    number, ``((z_conf·√(p0(1−p0)) + z_power·√(p(1−p))) / margin)²``)."""
    _check(margin, power, p)
    p0 = max(0.0, p - margin)
    z = z_value(confidence) * math.sqrt(p0 * (1 - p0)) + z_value(power) * math.sqrt(p * (1 - p))
    return max(1, math.ceil((z / margin) ** 2))


def _check(margin: float, power: float, p: float) -> None:
    if not 0 < margin < 1:
        raise ValueError(f"margin must lie in (0, 1), got {margin}")
    if not 0 < power < 1:
        raise ValueError(f"power must lie in (0, 1), got {power}")
    if not 0 <= p <= 1:
        raise ValueError(f"p must lie in [0, 1], got {p}")


@dataclasses.dataclass
class LevelDecision:
    """One family's held-out decision at its level."""

    family: str
    level: int
    n: int
    correct: int
    lower: float
    """One-sided lower confidence bound of the accuracy (Wilson)."""
    upper: float
    threshold: float
    mastered: bool
    """lower > threshold."""
    stopped_early: bool = False
    """The first share of the questions already put the upper bound below the threshold."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    def as_row(self) -> dict:
        return {**dataclasses.asdict(self), "accuracy": round(self.accuracy, 4), "lower": round(self.lower, 4),
                "upper": round(self.upper, 4), "threshold": round(self.threshold, 6)}


def decide_levels(ask: Ask, questions: dict[str, list[Sample]], threshold: float, confidence: float,
                  first_share: float = 0.25) -> dict[str, LevelDecision]:
    """Per family: is the level of its held-out ``questions`` mastered (module docstring)? ``ask`` is called at most
    twice, each time with the questions of every family still undecided (one batch)."""
    if not 0 < first_share <= 1:
        raise ValueError(f"first_share must lie in (0, 1], got {first_share}")
    answers: dict[str, list[int]] = {f: [] for f in questions}
    first = {f: max(1, math.ceil(first_share * len(qs))) if qs else 0 for f, qs in questions.items()}
    stopped = set()
    for stage in ("first", "rest"):
        batch = {f: (qs[:first[f]] if stage == "first" else qs[first[f]:]) for f, qs in questions.items()
                 if f not in stopped}
        flat = [s for qs in batch.values() for s in qs]
        got, k = (list(ask(flat)) if flat else []), 0
        for f, qs in batch.items():
            answers[f] += [int(x) for x in got[k:k + len(qs)]]
            k += len(qs)
        if stage == "first":
            for f, a in answers.items():
                if a and len(a) < len(questions[f]) and proportion_bounds(sum(a), len(a), confidence)[1] < threshold:
                    stopped.add(f)
    out = {}
    for f, a in answers.items():
        lower, upper = proportion_bounds(sum(a), len(a), confidence)
        level = questions[f][0].level if questions[f] else 0
        out[f] = LevelDecision(f, level, len(a), sum(a), lower, upper, threshold, bool(a) and lower > threshold,
                               f in stopped)
    return out


def spread_questions(family: str, levels: Sequence[int], n: int, split: str, seed: int) -> list[Sample]:
    """The first ``n`` questions of ``family`` from ``split``, spread evenly over ``levels`` and interleaved level by
    level (so that the first m of a longer list hold every level in proportion; a larger ``n`` extends the same
    list). Fewer when a level's supply in the split runs out."""
    levels = sorted(set(levels))
    if not levels or n <= 0:
        return []
    per = [n // len(levels) + (1 if i < n % len(levels) else 0) for i in range(len(levels))]
    pools = [generate(family, lv, k, split, seed, allow_fewer=True) for lv, k in zip(levels, per)]
    out = []
    for j in range(max(per)):
        out += [pool[j] for pool in pools if j < len(pool)]
    return out[:n]


def paired_answers(questions: Sequence[Sample], ask_before: Ask, ask_after: Ask, margin: float, confidence: float,
                   power: float, discordance: float) -> tuple[list[int], list[int]]:
    """Both models' answers (0/1) to the first questions of ``questions`` a paired test at ``margin`` needs: first
    the number the assumed ``discordance`` needs, then, if the observed discordance needs more, the missing ones
    (module docstring). Never more than ``questions`` holds."""
    n = min(len(questions), questions_needed(margin, confidence, power, discordance))
    before = [int(x) for x in ask_before(list(questions[:n]))]
    after = [int(x) for x in ask_after(list(questions[:n]))]
    if n:
        c = compare(before, after)
        more = min(len(questions), questions_needed(margin, confidence, power, c.sizing_discordance))
        if more > n:
            before += [int(x) for x in ask_before(list(questions[n:more]))]
            after += [int(x) for x in ask_after(list(questions[n:more]))]
    return before, after
