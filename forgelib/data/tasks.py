"""The task suite: seeded generators of checkable problems, split train / fitness / test by prompt hash.

    >>> from forgelib.data.tasks import generate, check
    >>> s = generate("arith", level=1, n=1, split="train", seed=0)[0]
    >>> check(s, s.answer)
    True

A family is a module in `forgelib/data/families/` that registers itself with `register_family`.
"""
from __future__ import annotations

import random
from typing import Any, Iterable, Sequence

from forgelib.data import families as _families  # noqa: F401  (registers the built-in families)
from forgelib.data.base import (ANSWER_MARK, FAMILIES, LEVELS, STEP_SEP, Sample, TaskFamily,
                                TaskOptionError, UnknownFamilyError, check_level, exact_match, extract_answer,
                                get_family, register_family, stable_unit, suite_families)

__all__ = ["ANSWER_MARK", "FAMILIES", "LEVELS", "SPLITS", "STEP_SEP", "Sample", "TaskFamily",
           "TaskOptionError", "TaskSpaceExhaustedError", "UnknownFamilyError", "build_mix", "check",
           "completion_text", "extract_answer", "format_sample", "generate", "get_family",
           "register_family", "split_of", "suite_families"]

# Share of the prompt-hash space per split; the cumulative bounds decide a prompt's split.
SPLITS = {"train": 0.8, "fitness": 0.1, "test": 0.1}
_PATIENCE = 5000  # draws in a row without any new prompt before a family counts as exhausted


class TaskSpaceExhaustedError(TaskOptionError):
    """A family/level has fewer distinct prompts in a split than were asked for."""


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, from a stable hash of its text (the same on every machine)."""
    u = stable_unit(prompt)
    bound = 0.0
    for name, share in SPLITS.items():
        bound += share
        if u < bound:
            return name
    return name  # u is within rounding of 1.0: the last split


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise TaskOptionError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
    return split


def _check_options(family: TaskFamily, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(family.options))
    if unknown:
        raise TaskOptionError(f"family {family.name!r} has no option(s) {unknown}; "
                              f"valid options: {sorted(family.options) or 'none'}")


def generate(family: str, level: int, n: int, split: str = "train", seed: int = 0, allow_fewer: bool = False,
             **options: Any) -> list[Sample]:
    """`n` distinct samples of `family` at `level` whose prompts fall in `split`; deterministic in all args (the
    first k of n are the k asked alone: a larger `n` extends the same list).

    Keeps drawing until it has `n`; when the family's space at this level runs dry (no new prompt in many draws)
    it raises TaskSpaceExhaustedError naming how many it found, or with `allow_fewer` returns those.
    """
    fam, level, split = get_family(family), check_level(level), _check_split(split)
    _check_options(fam, options)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise TaskOptionError(f"n must be an int >= 0, got {n!r}")
    # the stream depends on every argument; options are merged with their defaults so that spelling out
    # a default draws the same samples as leaving it out
    rng = random.Random(f"{seed}|{family}|{level}|{split}|{sorted({**fam.options, **options}.items())}")
    seen: set[str] = set()
    out: list[Sample] = []
    stale = 0
    while len(out) < n:
        sample = fam.draw(rng, level, **options)
        if sample.prompt in seen:
            stale += 1
            if stale > _PATIENCE:
                if allow_fewer:
                    return out
                raise TaskSpaceExhaustedError(
                    f"family {family!r} level {level} gave only {len(out)} distinct {split!r} prompts of the "
                    f"{n} asked ({len(seen)} distinct prompts over all splits); ask for fewer or a higher level")
            continue
        stale = 0
        seen.add(sample.prompt)
        if split_of(sample.prompt) == split:
            out.append(sample)
    return out


def generate_levels(families: Sequence[str], levels: tuple[int, int], per_level: int, split: str = "train",
                    seed: int = 0) -> list[Sample]:
    """``per_level`` problems of every family at every level ``levels[0]..levels[1]`` (``generate`` with the same
    seed for each), family by family, level by level."""
    return [s for f in families for lv in range(levels[0], levels[1] + 1)
            for s in generate(f, lv, per_level, split, seed)]


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integer shares of `total` proportional to `weights` that sum to `total` (ties go to the first)."""
    s = float(sum(weights))
    exact = [total * w / s for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


def _levels(levels: int | tuple[int, int] | Iterable[int]) -> list[int]:
    """A tuple (lo, hi) is the inclusive range; a list is the levels themselves; an int is one level."""
    if isinstance(levels, int):
        return [check_level(levels)]
    if isinstance(levels, tuple) and len(levels) == 2:
        lo, hi = check_level(levels[0]), check_level(levels[1])
        if lo > hi:
            raise TaskOptionError(f"levels range must have lo <= hi, got {levels!r}")
        return list(range(lo, hi + 1))
    chosen = [check_level(level) for level in levels]
    if not chosen:
        raise TaskOptionError("levels must name at least one level")
    return chosen


def check_mix(mix: dict[str, float]) -> None:
    """Known families, weights >= 0, not all zero."""
    if not mix:
        raise TaskOptionError(f"mix must name at least one family; valid families: {sorted(FAMILIES)}")
    for name, weight in mix.items():
        get_family(name)
        if not weight >= 0:
            raise TaskOptionError(f"mix weight of {name!r} must be >= 0, got {weight!r}")
    if sum(mix.values()) <= 0:
        raise TaskOptionError(f"mix weights must not all be zero: {mix}")


def build_mix(mix: dict[str, float], levels: int | tuple[int, int] | Iterable[int], n: int,
              split: str = "train", seed: int = 0,
              family_options: dict[str, dict[str, Any]] | None = None) -> list[Sample]:
    """`n` samples drawn from families in proportion to `mix`, spread evenly over `levels`, shuffled.

    Counts use largest remainders, so they are exact and deterministic; `levels` is (lo, hi) inclusive,
    a list of levels, or one level. `family_options` passes options to a family's generator, e.g.
    `{"recall": {"distance": 300}}`.
    """
    family_options = family_options or {}
    stray = sorted(set(family_options) - set(mix))
    if stray:
        raise TaskOptionError(f"family_options names {stray}, which are not in the mix {sorted(mix)}")
    check_mix(mix)
    chosen = _levels(levels)
    samples: list[Sample] = []
    for name, count in zip(mix, largest_remainder(n, list(mix.values()))):
        for level, k in zip(chosen, largest_remainder(count, [1.0] * len(chosen))):
            samples += generate(name, level, k, split, seed, **family_options.get(name, {}))
    random.Random(f"mix|{seed}|{split}").shuffle(samples)
    return samples


def check(sample: Sample, output_text: str) -> bool:
    """Whether `output_text` (a model's completion) answers `sample`: exact match after stripping
    whitespace, of the text after the last ANSWER_MARK when the output shows a worked solution.

    Samples of unregistered families (e.g. loaded from a real dataset) use that same exact match.
    """
    family = FAMILIES.get(sample.family)
    return family.check(sample, output_text) if family else exact_match(sample, output_text)


def completion_text(sample: Sample, with_steps: bool = False) -> str:
    """What follows the prompt: the answer, or `step;step#answer` with the worked solution."""
    if with_steps and sample.steps:
        return STEP_SEP.join(sample.steps) + ANSWER_MARK + sample.answer
    return sample.answer


def format_sample(sample: Sample, with_answer: bool = True, with_steps: bool = False) -> str:
    """The sample as one training text; without the answer, a prompt (plus the worked steps if asked)."""
    if with_answer:
        return sample.prompt + completion_text(sample, with_steps)
    if with_steps and sample.steps:
        return sample.prompt + STEP_SEP.join(sample.steps) + ANSWER_MARK
    return sample.prompt
