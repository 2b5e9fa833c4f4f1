"""The pieces every task family shares: the Sample record, the family registry, and the answer format.

Kept free of heavy imports so that the family modules (and anything that only needs samples) load fast.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Callable

LEVELS = tuple(range(1, 11))
STEP_SEP = ";"      # joins the steps of a worked solution
ANSWER_MARK = "#"   # separates a worked solution from the final answer; no prompt or answer contains it

# The calculator markup shared with the tokenizer's special tokens (see tokenizer.SPECIAL_TOKENS).
TOOL_OPEN, TOOL_CLOSE, TOOL_RESULT = "<|tool|>", "<|/tool|>", "<|result|>"


def stable_unit(text: str) -> float:
    """A number in [0, 1) from a stable hash of ``text`` (sha256, the same on every machine): the splits of the task
    prompts and of the real-text documents are ranges of it."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2 ** 64


class UnknownFamilyError(KeyError):
    """A task family name that is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise print the message inside quotes
        return str(self.args[0])


class TaskOptionError(ValueError):
    """A bad argument to a task generator (level, split, option, count)."""


@dataclass
class Sample:
    """One problem with an exact answer.

    `steps` is a worked solution (a list of short steps) where the family has one; `meta` holds
    family-specific facts about the sample (e.g. the recall distance), never needed to check the answer.
    """

    prompt: str
    answer: str
    family: str
    level: int
    steps: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# A maker draws one problem: (rng, level, **options) -> (prompt, answer, steps, meta).
Maker = Callable[..., tuple[str, str, "list[str] | None", dict]]


def extract_answer(text: str) -> str:
    """The final answer in a model's output: the text after the last ANSWER_MARK, else the whole text."""
    return text.rsplit(ANSWER_MARK, 1)[-1].strip()


def exact_match(sample: Sample, output_text: str) -> bool:
    """Exact match of the extracted answer after stripping whitespace."""
    return extract_answer(output_text) == sample.answer.strip()


@dataclass(frozen=True)
class TaskFamily:
    """A registered family: a seeded generator of one sample and an exact-answer checker.

    `options` maps each optional keyword the maker accepts to its default, so that a misspelt
    option fails with the list of valid ones.
    """

    name: str
    maker: Maker
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    checker: Callable[[Sample, str], bool] = exact_match
    suite: bool = True
    """Part of the chain's task suite (the Phase-1 tokenizer's corpus, the families a phase measures beside its own);
    a benchmark family (``sudoku``) is not: it is trained and asked only where a mix names it."""

    def draw(self, rng: random.Random, level: int, **options: Any) -> Sample:
        """Draw one sample at `level` from the random stream `rng`."""
        prompt, answer, steps, meta = self.maker(rng, level, **{**self.options, **options})
        return Sample(prompt=prompt, answer=answer, family=self.name, level=level, steps=steps, meta=meta)

    def check(self, sample: Sample, output_text: str) -> bool:
        """Whether `output_text` answers `sample` correctly."""
        return self.checker(sample, output_text)


FAMILIES: dict[str, TaskFamily] = {}


def register_family(name: str, description: str, options: dict[str, Any] | None = None,
                    checker: Callable[[Sample, str], bool] = exact_match,
                    suite: bool = True) -> Callable[[Maker], Maker]:
    """Decorator registering a maker function as the task family `name` (``suite``: see ``TaskFamily.suite``)."""
    def wrap(maker: Maker) -> Maker:
        if name in FAMILIES:
            raise ValueError(f"task family {name!r} is already registered")
        FAMILIES[name] = TaskFamily(name, maker, description, dict(options or {}), checker, suite)
        return maker
    return wrap


def suite_families() -> list[str]:
    """The chain's task suite: the registered families with ``suite`` set, in registration order."""
    return [name for name, family in FAMILIES.items() if family.suite]


def get_family(name: str) -> TaskFamily:
    """The registered family `name`; an unknown name fails with the list of valid names."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownFamilyError(
            f"unknown task family {name!r}; valid families: {sorted(FAMILIES)}") from None


def check_level(level: int) -> int:
    """Validate a difficulty level (an int in 1..10)."""
    if isinstance(level, bool) or not isinstance(level, int) or level not in LEVELS:
        raise TaskOptionError(f"level must be an int in 1..10, got {level!r}")
    return level


def signed(value: int) -> str:
    """`+5` or `-5`: a term appended to an expression without writing `+-5`."""
    return f"+{value}" if value >= 0 else f"-{-value}"
