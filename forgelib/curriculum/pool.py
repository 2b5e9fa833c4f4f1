"""The question pool of one curriculum level: ask, grade, retire, spawn variants, give hints, advance.

At a level the pool holds ``pool_size`` generated train-split questions (the family ``mix`` shared out by
largest remainders; each family at its own level, e.g. the one ``assess_levels`` found). The phase loop is::

    pool = QuestionPool({"arith": 1, "algebra": 1}, level={"arith": 4, "algebra": 2}, pool_size=64, seed=0)
    while not pool.finished:
        for item in pool.next_batch(16):                # BatchItem: item.prompt already holds the hint
            output = model_continues(item.prompt)       # the model's text after item.prompt
            pool.answer(item, output, step=global_step) # grade with tasks.check and record
        ...train on something...
        if pool.level_done() or step_budget_spent:      # the budget is the caller's rule
            pool.advance()
        pool.save(state_path)                           # atomic; QuestionPool.load resumes exactly

**Retirement.** A question is retired (leaves the pool) after ``retire_after`` (3) *consecutive correct answers
given without a hint*. A wrong answer resets the streak to 0; an answer given with a hint never counts toward
retirement and also resets the streak, so "consecutive" means unhelped answers in a row.

**Failure.** A wrong answer (a) spawns ``variants_per_failure`` variants: new questions of the same family and
level drawn from the generator with a fresh seed (new numbers, a prompt not yet seen at this level), each
recording ``variant_of`` (its parent's id; ``lineage`` walks back to the original), as long as the active
questions stay at most ``max_active`` (default twice ``pool_size``); and (b) raises the question's hint by one:
the next time it is asked it shows one more step of its worked solution (``sample.steps``), up to ``max_hints``.

**Hints.** Hint k is the first k worked steps written exactly as the model writes a worked solution
(``format_sample(..., with_steps=True)`` is ``prompt + step;step;...#answer``), so hint k is the prompt plus
``step1;...;stepk;`` and the model continues from there with the next step: every hinted prompt is a prefix of
the full worked-solution text. The last step carries the answer, so by default hints stop one step short of the
full solution (``hint_full_solution=False``): a one-step problem gets no hint, a three-step one at most two. A
correct answer with k hints lowers the hint to k-1 (the scaffold fades); the question retires only after it is
answered unhelped ``retire_after`` times in a row. Grading a hinted answer checks ``hint_text + output`` (what
the model's text reads like as a whole), see ``grade``.

**Batches.** ``next_batch(n)`` draws without repetition. Up to ``ceil(priority_share * n)`` places (half by
default) go to *pending* questions (last answer wrong, or a hint still showing), chosen uniformly among them;
the rest are drawn uniformly from all other active questions (and from pending ones not chosen, when too few
others remain). Pending questions come first in the batch. Fewer active questions than ``n``: all of them.

**Level done.** ``level_done()`` is true once at most ``done_threshold`` questions are active (default
``pool_size // 10``); a step budget per level is the caller's rule (``level_answers`` counts answers at this
level). ``refill()`` tops the active questions up to ``pool_size`` with fresh ones of the same levels (for a
caller that leaves a level on another rule, e.g. held-out questions). ``advance()`` archives the level (summary
and questions with their histories, for a browser widget) and moves every family one level up with a fresh pool;
a family already at the top level (10) leaves the mix, and when none is left ``finished`` becomes true.

**Resuming.** Every random choice (pool draws, variant seeds, batches) comes from ``self.rng``, which is part of
the state; ``to_dict``/``from_dict`` and ``save``/``load`` (atomic JSON) restore questions, streaks, hints,
levels, counters and the generator, so a loaded pool makes the same next batch as one that never stopped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from forgelib.data.base import ANSWER_MARK, LEVELS, STEP_SEP, Sample
from forgelib.data.tasks import (TaskOptionError, check, check_level, check_mix, generate, get_family,
                                 largest_remainder, split_of)
from forgelib.results import write_json_atomic

from .state import rng_from_json, rng_to_json, sample_from_json, sample_to_json

__all__ = ["Question", "BatchItem", "QuestionPool", "hint_text", "prompt_with_hint", "hint_cap"]

STATE_VERSION = 1
_CONFIG_KEYS = ("pool_size", "seed", "retire_after", "variants_per_failure", "max_active", "max_hints",
                "hint_full_solution", "done_threshold", "priority_share", "max_output_chars", "keep_archive")
_VARIANT_TRIES = 8  # fresh seeds tried for a variant whose prompt is new at this level


# ---------------------------------------------------------------------------------------------- hints
def hint_cap(sample: Sample, max_hints: int, full_solution: bool = False) -> int:
    """The most hints `sample` can get: `max_hints`, but no more than its worked steps (minus the last one,
    which holds the answer, unless `full_solution`)."""
    steps = len(sample.steps or [])
    return max(0, min(max_hints, steps if full_solution else steps - 1))


def hint_text(sample: Sample, k: int) -> str:
    """The worked-solution prefix after the prompt that shows the first `k` steps: `s1;...;sk;`, so the model
    goes on with step k+1 (or `s1;...;sn#` when k is all of them, so it goes on with the answer); '' for k=0."""
    steps = sample.steps or []
    if not 0 <= k <= len(steps):
        raise ValueError(f"hint {k} out of range: the sample has {len(steps)} worked steps")
    if k == 0:
        return ""
    return STEP_SEP.join(steps[:k]) + (ANSWER_MARK if k == len(steps) else STEP_SEP)


def prompt_with_hint(sample: Sample, k: int) -> str:
    """The prompt followed by hint `k`: a prefix of `format_sample(sample, with_steps=True)`."""
    return sample.prompt + hint_text(sample, k)


# ---------------------------------------------------------------------------------------------- records
@dataclass
class Question:
    """One question in the pool and everything that happened to it.

    `streak`: consecutive correct answers without a hint; `hints`: steps shown next time it is asked;
    `needs_retry`: its last answer was wrong; `history`: one dict per answer
    (`step`, `correct`, `hints`, `output`); `origin`: 'generator', 'variant', 'refill' or the source given to
    `add_questions` (e.g. 'frontier').
    """

    qid: int
    sample: Sample
    variant_of: int | None = None
    origin: str = "generator"
    streak: int = 0
    hints: int = 0
    retired: bool = False
    needs_retry: bool = False
    asked: int = 0
    correct: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return not self.retired

    @property
    def pending(self) -> bool:
        """Asked with priority: its last answer was wrong, or a hint is still showing."""
        return self.needs_retry or self.hints > 0

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["sample"] = sample_to_json(self.sample)
        data["history"] = [dict(h) for h in self.history]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Question":
        data = dict(data)
        data["sample"] = sample_from_json(data["sample"])
        data["history"] = [dict(h) for h in data.get("history", [])]
        return cls(**data)


@dataclass(frozen=True)
class BatchItem:
    """A question as asked: `prompt` is what the model continues (the question's prompt plus its hint)."""

    qid: int
    sample: Sample
    hints: int
    hint_text: str

    @property
    def prompt(self) -> str:
        return self.sample.prompt + self.hint_text


# ---------------------------------------------------------------------------------------------- the pool
class QuestionPool:
    """The questions of the current curriculum level and the rules that retire, vary, hint and advance them
    (see the module docstring).

    `mix` weights the families; `level` is one level for all of them or a level per family (every family of
    the mix must then be named). `family_options` passes generator options, e.g. `{"recall": {"distance": 60}}`.
    """

    def __init__(self, mix: dict[str, float], level: int | dict[str, int], pool_size: int = 64, *,
                 seed: int = 0, retire_after: int = 3, variants_per_failure: int = 1,
                 max_active: int | None = None, max_hints: int = 2, hint_full_solution: bool = False,
                 done_threshold: int | None = None, priority_share: float = 0.5,
                 family_options: dict[str, dict[str, Any]] | None = None, max_output_chars: int = 400,
                 keep_archive: bool = True):
        check_mix(mix)
        self.mix = {name: float(w) for name, w in mix.items() if w > 0}
        self.levels = {name: lv for name, lv in _levels_for(mix, level).items() if name in self.mix}
        stray = sorted(set(family_options or {}) - set(self.mix))
        if stray:
            raise TaskOptionError(f"family_options names {stray}, which are not in the mix {sorted(self.mix)}")
        _require_int("pool_size", pool_size, 1)
        _require_int("retire_after", retire_after, 1)
        _require_int("variants_per_failure", variants_per_failure, 0)
        _require_int("max_hints", max_hints, 0)
        _require_int("max_output_chars", max_output_chars, 0)
        max_active = 2 * pool_size if max_active is None else max_active
        _require_int("max_active", max_active, 1)
        done_threshold = pool_size // 10 if done_threshold is None else done_threshold
        _require_int("done_threshold", done_threshold, 0)
        if not 0.0 <= priority_share <= 1.0:
            raise TaskOptionError(f"priority_share must be in [0, 1], got {priority_share!r}")
        self.family_options = {name: dict(opts) for name, opts in (family_options or {}).items()}
        self._set_config(dict(
            pool_size=pool_size, seed=seed, retire_after=retire_after, variants_per_failure=variants_per_failure,
            max_active=max_active, max_hints=max_hints, hint_full_solution=bool(hint_full_solution),
            done_threshold=done_threshold, priority_share=float(priority_share),
            max_output_chars=max_output_chars, keep_archive=bool(keep_archive)))
        self.rng = random.Random(f"curriculum|{seed}")
        self.questions: dict[int, Question] = {}
        self.seen: set[str] = set()       # prompts used at this level (no variant repeats one)
        self.next_qid = 0
        self.stage = 0                    # levels advanced so far
        self.finished = False
        self.answers = 0                  # answers recorded over the whole run
        self.batches = 0
        self.archive: list[dict[str, Any]] = []
        self._reset_level_counters()
        self._fill()

    def _set_config(self, config: dict[str, Any]) -> None:
        """Set the rule settings (the constructor's keyword arguments) as attributes."""
        missing = sorted(set(_CONFIG_KEYS) - set(config))
        if missing:
            raise ValueError(f"curriculum pool config lacks {missing}")
        for key in _CONFIG_KEYS:
            setattr(self, key, config[key])

    @property
    def config(self) -> dict[str, Any]:
        """The rule settings (the constructor's keyword arguments but the mix, level and family options)."""
        return {key: getattr(self, key) for key in _CONFIG_KEYS}

    @property
    def level(self) -> int | None:
        """The level all families are at, or None when they differ (see `levels`)."""
        values = set(self.levels.values())
        return values.pop() if len(values) == 1 else None

    # ------------------------------------------------------------------ building the pool
    def _reset_level_counters(self) -> None:
        self.level_answers = 0
        self.level_correct = 0
        self.level_batches = 0
        self.variants_spawned = 0
        self.variants_skipped = 0         # wanted but the cap or an exhausted space stopped them

    def _fill(self) -> None:
        """A fresh pool of `pool_size` generated questions for the current levels."""
        names = list(self.levels)
        counts = largest_remainder(self.pool_size, [self.mix[name] for name in names])
        for name, count in zip(names, counts):
            seed = self.rng.getrandbits(32)
            for sample in generate(name, self.levels[name], count, "train", seed,
                                   **self.family_options.get(name, {})):
                self._add(sample, None, "generator")

    def _add(self, sample: Sample, variant_of: int | None, origin: str) -> Question:
        question = Question(self.next_qid, sample, variant_of, origin)
        self.questions[question.qid] = question
        self.seen.add(sample.prompt)
        self.next_qid += 1
        return question

    def _fresh_sample(self, family: str, level: int) -> Sample | None:
        """A new train-split question of `family` at `level` whose prompt is not yet in use at this level."""
        for _ in range(_VARIANT_TRIES):
            seed = self.rng.getrandbits(32)
            sample = generate(family, level, 1, "train", seed, **self.family_options.get(family, {}))[0]
            if sample.prompt not in self.seen:
                return sample
        return None

    def add_questions(self, samples: Iterable[Sample], origin: str = "frontier") -> list[int]:
        """Add outside questions (e.g. frontier-written ones) to the pool, while under `max_active`. A prompt
        already in use at this level, or outside the train split (never train on fitness/test prompts), is
        skipped. Returns the new question ids."""
        added = []
        for sample in samples:
            if len(self.active_ids()) >= self.max_active:
                break
            if sample.prompt not in self.seen and split_of(sample.prompt) == "train":
                added.append(self._add(sample, None, origin).qid)
        return added

    # ------------------------------------------------------------------ asking
    def active_ids(self) -> list[int]:
        """Ids of the questions not retired, in increasing order."""
        return [qid for qid, q in self.questions.items() if not q.retired]

    def next_batch(self, n: int, rng: random.Random | None = None) -> list[BatchItem]:
        """Up to `n` distinct active questions to ask, pending ones first (module docstring: Batches).

        Draws from the pool's own generator unless `rng` is given (then resuming exactly is the caller's job).
        """
        _require_int("n", n, 0)
        rng = self.rng if rng is None else rng
        active = self.active_ids()
        pending = [qid for qid in active if self.questions[qid].pending]
        k = min(len(pending), math.ceil(self.priority_share * n), n)
        chosen = rng.sample(pending, k)
        taken = set(chosen)
        rest = [qid for qid in active if qid not in taken and not self.questions[qid].pending]
        extra = rng.sample(rest, min(n - k, len(rest)))
        if len(chosen) + len(extra) < n:  # too few others: fill with the pending ones not yet chosen
            left = [qid for qid in pending if qid not in taken]
            extra += rng.sample(left, min(n - len(chosen) - len(extra), len(left)))
        self.batches += 1
        self.level_batches += 1
        return [self.item(qid) for qid in chosen + extra]

    def item(self, qid: int) -> BatchItem:
        """Question `qid` as it would be asked now (with its current hint)."""
        q = self.questions[qid]
        return BatchItem(qid, q.sample, q.hints, hint_text(q.sample, q.hints))

    def hint_limit(self, qid: int) -> int:
        """The most hints question `qid` can get."""
        return hint_cap(self.questions[qid].sample, self.max_hints, self.hint_full_solution)

    # ------------------------------------------------------------------ answering
    @staticmethod
    def grade(item: BatchItem, output_text: str) -> bool:
        """Whether the model's continuation of `item.prompt` answers it: `tasks.check` on the hint text plus
        the output (the answer after the last '#' of the whole worked solution)."""
        return check(item.sample, item.hint_text + output_text)

    def answer(self, item: BatchItem, output_text: str, step: int | None = None) -> bool:
        """Grade the model's continuation of `item.prompt` and record it; returns whether it was correct."""
        correct = self.grade(item, output_text)
        self.record(item.qid, correct, item.hints, output_text, step)
        return correct

    def record(self, question_id: int, correct: bool, hints_used: int, output: str = "",
               step: int | None = None) -> None:
        """Record one answer to question `question_id`, given with `hints_used` hint steps showing.

        Correct without a hint: the streak grows, and the question retires at `retire_after`. Correct with a
        hint: the streak resets and the hint drops by one. Wrong: the streak resets, the hint grows by one (up to
        the cap) and variants are spawned. An answer to a retired question is only added to its history.
        `step` (default: the running answer count) is stored in the history for the browser.
        """
        if question_id not in self.questions:
            raise KeyError(f"no question {question_id} in the pool at this level")
        _require_int("hints_used", hints_used, 0)
        q = self.questions[question_id]
        q.history.append({"step": self.answers if step is None else step, "correct": bool(correct),
                          "hints": hints_used, "output": output[:self.max_output_chars]})
        q.asked += 1
        self.answers += 1
        self.level_answers += 1
        if correct:
            q.correct += 1
            self.level_correct += 1
        if q.retired:
            return
        if correct:
            q.needs_retry = False
            if hints_used == 0:
                q.streak += 1
                q.retired = q.streak >= self.retire_after
                if q.retired:
                    q.hints = 0
            else:
                q.streak = 0
                q.hints = min(hints_used - 1, self.hint_limit(question_id))
            return
        q.streak = 0
        q.needs_retry = True
        q.hints = min(hints_used + 1, self.hint_limit(question_id))
        self._spawn_variants(q)

    def _spawn_variants(self, parent: Question) -> None:
        for _ in range(self.variants_per_failure):
            sample = None
            if len(self.active_ids()) < self.max_active:
                sample = self._fresh_sample(parent.sample.family, parent.sample.level)
            if sample is None:
                self.variants_skipped += 1
                continue
            self._add(sample, parent.qid, "variant")
            self.variants_spawned += 1

    def lineage(self, qid: int) -> list[int]:
        """`qid` and the questions it was varied from, back to the original: [qid, parent, grandparent, ...]."""
        chain = [qid]
        while (parent := self.questions[chain[-1]].variant_of) is not None:
            chain.append(parent)
        return chain

    # ------------------------------------------------------------------ levels
    def level_done(self) -> bool:
        """Whether at most `done_threshold` questions are still active."""
        return len(self.active_ids()) <= self.done_threshold

    def refill(self) -> list[int]:
        """Add fresh generated questions of the current levels (origin 'refill', prompts not yet used at this level)
        until ``pool_size`` are active again: a caller that leaves a level on another rule (e.g. held-out
        questions) keeps practising a level whose pool retired first. Returns the new question ids."""
        if self.finished:
            return []
        names = list(self.levels)
        missing = self.pool_size - len(self.active_ids())
        if missing <= 0:
            return []
        added = []
        for name, count in zip(names, largest_remainder(missing, [self.mix[name] for name in names])):
            for _ in range(count):
                sample = self._fresh_sample(name, self.levels[name])
                if sample is not None:
                    added.append(self._add(sample, None, "refill").qid)
        return added

    def advance(self) -> bool:
        """Archive this level and move every family one level up with a fresh pool. Families already at the top
        level leave the mix; returns False (and sets `finished`) when none is left."""
        if self.finished:
            return False
        self.archive.append({
            "stage": self.stage, "levels": dict(self.levels), "summary": self.summary(),
            "questions": [q.to_dict() for q in self.questions.values()] if self.keep_archive else []})
        self.levels = {name: lv + 1 for name, lv in self.levels.items() if lv < LEVELS[-1]}
        self.questions, self.seen = {}, set()
        self.stage += 1
        self._reset_level_counters()
        if not self.levels:
            self.finished = True
            return False
        self._fill()
        return True

    # ------------------------------------------------------------------ views
    def summary(self) -> dict[str, Any]:
        """Headline numbers of the current level (for logs and the archive)."""
        qs = list(self.questions.values())
        return {
            "stage": self.stage, "levels": dict(self.levels), "questions": len(qs),
            "active": sum(q.active for q in qs), "retired": sum(q.retired for q in qs),
            "pending": sum(q.active and q.pending for q in qs), "with_hint": sum(q.active and q.hints > 0 for q in qs),
            "variants_spawned": self.variants_spawned, "variants_skipped": self.variants_skipped,
            "answers": self.level_answers, "batches": self.level_batches,
            "accuracy": self.level_correct / self.level_answers if self.level_answers else float("nan"),
            "finished": self.finished,
        }

    def table(self) -> list[dict[str, Any]]:
        """One row per question of the current level (for a notebook table or browser widget)."""
        return [{"qid": q.qid, "family": q.sample.family, "level": q.sample.level, "prompt": q.sample.prompt,
                 "answer": q.sample.answer, "origin": q.origin, "variant_of": q.variant_of,
                 "status": "retired" if q.retired else "pending" if q.pending else "active",
                 "streak": q.streak, "hints": q.hints, "asked": q.asked, "correct": q.correct}
                for q in self.questions.values()]

    # ------------------------------------------------------------------ state
    def to_dict(self) -> dict[str, Any]:
        """The whole state as JSON-safe data (see `from_dict`)."""
        return {
            "version": STATE_VERSION, "mix": dict(self.mix), "levels": dict(self.levels),
            "family_options": self.family_options, "config": dict(self.config), "rng": rng_to_json(self.rng),
            "questions": [q.to_dict() for q in self.questions.values()], "seen": sorted(self.seen),
            "next_qid": self.next_qid, "stage": self.stage, "finished": self.finished,
            "answers": self.answers, "batches": self.batches,
            "level_counters": {"level_answers": self.level_answers, "level_correct": self.level_correct,
                               "level_batches": self.level_batches, "variants_spawned": self.variants_spawned,
                               "variants_skipped": self.variants_skipped},
            "archive": self.archive,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuestionPool":
        """The pool `to_dict` described, in the same state (no new draws)."""
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"curriculum pool state version {data.get('version')!r} is not {STATE_VERSION}")
        pool = cls.__new__(cls)
        pool.mix = dict(data["mix"])
        pool.levels = {name: int(lv) for name, lv in data["levels"].items()}
        pool.family_options = {name: dict(opts) for name, opts in data["family_options"].items()}
        pool._set_config(dict(data["config"]))
        pool.rng = rng_from_json(data["rng"])
        pool.questions = {}
        for qd in data["questions"]:
            q = Question.from_dict(qd)
            pool.questions[q.qid] = q
        pool.seen = set(data["seen"])
        pool.next_qid, pool.stage, pool.finished = data["next_qid"], data["stage"], data["finished"]
        pool.answers, pool.batches = data["answers"], data["batches"]
        for name, value in data["level_counters"].items():
            setattr(pool, name, value)
        pool.archive = list(data["archive"])
        return pool

    def save(self, path: str | Path) -> Path:
        """Write the state as JSON, atomically (an interrupted save leaves the previous file)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "QuestionPool":
        """The pool saved at `path`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def _require_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TaskOptionError(f"{name} must be an int >= {low}, got {value!r}")


def _levels_for(mix: dict[str, float], level: int | dict[str, int]) -> dict[str, int]:
    """Each family of the mix with its level (validated)."""
    for name in mix:
        get_family(name)
    if isinstance(level, dict):
        missing, stray = sorted(set(mix) - set(level)), sorted(set(level) - set(mix))
        if missing or stray:
            raise TaskOptionError(f"level must name exactly the families of the mix {sorted(mix)}: "
                                  f"missing {missing}, not in the mix {stray}")
        return {name: check_level(level[name]) for name in mix}
    return {name: check_level(level) for name in mix}
