"""The prompt library of Phase 6: tool and persona prompts whose effect can be checked, and their answer styles.

A ``BakePrompt`` is a text ``u`` put before a question, plus the behaviour it asks for:

* ``kind: tool`` — compute with the calculator of Phase 5: every worked step ``EXPR=VALUE`` becomes
  ``<|tool|>EXPR<|/tool|><|result|>VALUE`` (only where the calculator gives exactly VALUE);
  ``71+35=`` → ``<|tool|>71+35<|/tool|><|result|>106#106``. Checked by ``uses_tool``: the completion calls it.
* ``kind: persona`` — an answer style: the final answer is written as ``answer_prefix`` + answer
  (``#Answer: 106``). Checked by ``adheres``: the text after the last ``#`` starts with the prefix.

``styled(sample, prompts)`` is the sample as a model following ``prompts`` would answer it (the prompts' texts
before the question, every style applied); ``normalize(text, prompts)`` undoes the persona prefixes, so the task
checker grades a styled answer (``forgelib.data.tasks.check``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from ..data.base import ANSWER_MARK, STEP_SEP, TOOL_CLOSE, TOOL_OPEN, TOOL_RESULT, Sample
from ..data.tasks import check
from ..tools import calculator

KINDS = ("tool", "persona")


@dataclasses.dataclass(frozen=True)
class BakePrompt:
    """One prompt of the library: ``name``, ``kind`` (tool | persona), the ``text`` put before a question, and
    for a persona the ``answer_prefix`` written before the final answer."""

    name: str
    kind: str
    text: str
    answer_prefix: str = "Answer: "

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"prompt {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.text:
            raise ValueError(f"prompt {self.name!r}: text is empty")
        if self.kind == "persona" and (not self.answer_prefix or ANSWER_MARK in self.answer_prefix):
            raise ValueError(f"prompt {self.name!r}: answer_prefix must be non-empty and free of {ANSWER_MARK!r}")

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> "BakePrompt":
        unknown = sorted(set(spec) - {f.name for f in dataclasses.fields(cls)})
        missing = sorted({"name", "kind", "text"} - set(spec))
        if missing:
            raise ValueError(f"prompt {spec.get('name')!r}: missing keys {missing} "
                             "(each prompt needs name, kind, text)")
        if unknown:
            raise ValueError(f"prompt {spec.get('name')!r}: unknown keys {unknown}; valid: name, kind, text, "
                             "answer_prefix")
        return cls(**spec)


def prefix(prompts: Sequence[BakePrompt]) -> str:
    """The text put before a question for ``prompts`` (their texts, in order)."""
    return "".join(p.text for p in prompts)


def tool_step(step: str) -> str:
    """``EXPR=VALUE`` as a calculator call when the calculator gives exactly VALUE, else the step unchanged."""
    expr, _, value = step.rpartition("=")
    if expr and calculator(expr) == value:
        return f"{TOOL_OPEN}{expr}{TOOL_CLOSE}{TOOL_RESULT}{value}"
    return step


def styled(sample: Sample, prompts: Sequence[BakePrompt]) -> Sample:
    """``sample`` as answered under ``prompts``: their texts before the question, the tool style on the worked
    steps, the persona prefixes before the answer."""
    steps, answer = list(sample.steps or []), sample.answer
    for p in prompts:
        if p.kind == "tool":
            steps = [tool_step(s) for s in steps]
        else:
            answer = p.answer_prefix + answer
    return Sample(prefix(prompts) + sample.prompt, answer, sample.family, sample.level, steps or None,
                  dict(sample.meta, styled=[p.name for p in prompts]))


def uses_tool(text: str) -> bool:
    """Does a completion call the calculator?"""
    return TOOL_OPEN in text


def answer_part(text: str) -> str:
    """The text after the last answer mark (the whole text when there is none)."""
    return text.rsplit(ANSWER_MARK, 1)[-1].strip()


def adheres(text: str, prompt: BakePrompt) -> bool:
    """Does a completion follow ``prompt``'s behaviour (a calculator call / the persona's answer prefix)?"""
    if prompt.kind == "tool":
        return uses_tool(text)
    return ANSWER_MARK in text and answer_part(text).startswith(prompt.answer_prefix.strip())


def make_check(prefixes: Sequence[str]):
    """The task checker applied after ``prefixes`` (answer styles) are removed from the answer: a baked persona's
    "Answer: 15" is graded as 15."""
    return lambda sample, text: check(sample, strip_answer_prefixes(text, prefixes))


def strip_answer_prefixes(text: str, prefixes: Sequence[str]) -> str:
    """The completion with ``prefixes`` removed, in order, from the start of its answer (the text after the last
    answer mark) — what the task checker should grade."""
    if ANSWER_MARK not in text:
        return text
    body, _, answer = text.rpartition(ANSWER_MARK)
    answer = answer.strip()
    for prefix_ in prefixes:
        if prefix_ and answer.startswith(prefix_):
            answer = answer[len(prefix_):].strip()
    return body + ANSWER_MARK + answer


def normalize(text: str, prompts: Sequence[BakePrompt]) -> str:
    """The completion with the personas' answer prefixes removed from its answer (for the task checker)."""
    # styled() put the last persona first
    personas = [p.answer_prefix.strip() for p in reversed(prompts) if p.kind == "persona"]
    return strip_answer_prefixes(text, personas)


def correct(sample: Sample, text: str, prompts: Sequence[BakePrompt]) -> bool:
    """Task correctness of a completion in any of the library's styles."""
    return check(sample, normalize(text, prompts))


__all__ = ["BakePrompt", "KINDS", "adheres", "answer_part", "correct", "normalize", "prefix", "strip_answer_prefixes",
           "styled", "tool_step", "uses_tool", "STEP_SEP"]
