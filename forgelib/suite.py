"""What a model knows, and the guard that keeps it: every phase asks its input and its output model the same
held-out questions over the whole suite the input knew, and fails when a family lost more than the margin.

**The suite** (``Suite``): the task families a model was trained on and the levels it reached, ``{family: (lo, hi)}``.
Phase 1 sets it (the trunk's mix at its levels); a phase that teaches a new family or level adds it (Phase 5); every
other phase hands on its input's suite unchanged. It travels in each phase's result.json (``suite``).

**Asking** (``Asker``): greedy completions with the calculator on (a model that never learnt the tool never calls
it), the answer styles of Phase 6 (``Answer: ``) removed before the task's checker, Quiet-STaR thoughts off (the
base LM answers, as Phases 5–8 and the scorecard ask), and, for a model with Phase-7 experts, two-pass routing.

**The guard** (``guard``): test-split questions of every family of the suite, spread over its levels, asked of the
input ("before") and the output ("after"); per family the paired non-inferiority rule of ``forgelib.stats`` at the
margin (``GuardParams.margin``; a compression phase states its own, larger, allowed loss), with as many questions
as the margin needs at the stated confidence and power: first the number the assumed discordance needs, then more
where the observed discordance and difference need more (``needed_at``: a family that lost part of the margin is
asked until its verdict has the power at the measured difference; ``max_questions`` caps it; a family whose questions
run out says so).
The suite's mean (each family weighing the same, ``forgelib.stats.noninferior_over``) is reported beside the
families. Result: ``guard.json`` in the phase folder (the table and every
question's answers), one gate check per family (``keeps_<family>``: the lower bound of after − before > −margin).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .jobs import run_jobs, thread_own
from .stats import Verdict, compare, noninferior, noninferior_over, questions_needed

GUARD_FILE = "guard.json"
ANSWER_PREFIXES = ("Answer:",)


@dataclasses.dataclass
class GuardParams:
    """The ``guard`` section: how every phase checks that it kept what its input model knew."""

    margin: float = 0.10
    """δ: the largest accuracy loss per family a phase may have (absolute, after − before > −δ at the confidence).
    A phase that trades accuracy for size states its own allowed loss in its section."""
    confidence: float = 0.95
    """One-sided confidence of each family's non-inferiority test."""
    power: float = 0.999
    """Chance that a phase which truly loses nothing passes one family's test (sizes the question count; high
    because a chain runs some fifty such tests)."""
    discordance: float = 0.08
    """Assumed share of questions whose answer the phase changes: sizes the first round of questions (more are
    asked where the observed share needs more: measured at smoke, Phases 2 and 3 changed 2-10 % of a family's
    answers)."""
    chain_margin: float = 0.03
    """The chain's last gate (``forgelib.scorecard.chain_gate``): over every family the Phase-1 trunk knew, pooled,
    the final artifact may trail the trunk by at most this."""
    chain_family_margin: float | None = None
    """The chain's last gate, each family alone: the final artifact may trail the trunk by at most this (None: the
    ``margin`` of one phase). The strict target, every family within ``margin`` and the pool within ``chain_margin``,
    is reported beside (``at_or_above_trunk``)."""
    max_questions: int = 2000
    """Cap on the questions per family (the test split's supply at low levels is also finite)."""
    seed: int = 4242
    """Added to the run seed to draw the guard's questions (the same questions in every phase of a run)."""
    batch_size: int = 128
    """Questions generated together."""

    def __post_init__(self):
        for name in ("margin", "chain_margin", "chain_family_margin"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {value}")
        for name in ("confidence", "power"):
            if not 0.5 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0.5, 1), got {getattr(self, name)}")
        if not 0 < self.discordance <= 1:
            raise ValueError(f"discordance must lie in (0, 1], got {self.discordance}")
        if self.max_questions < 1 or self.batch_size < 1:
            raise ValueError("max_questions and batch_size must be >= 1")

    def needed(self, margin: float | None = None, discordance: float | None = None) -> int:
        """Questions per family at ``margin`` (default the section's) and ``discordance`` (default the assumed)."""
        return questions_needed(self.margin if margin is None else margin, self.confidence, self.power,
                                self.discordance if discordance is None else discordance)


# --- the suite ------------------------------------------------------------------------------------------------


Suite = dict  # {family: (lo, hi)}


def make_suite(families: Sequence[str], levels: Sequence[int]) -> dict[str, tuple[int, int]]:
    lo, hi = int(levels[0]), int(levels[-1])
    return {f: (lo, hi) for f in sorted(families)}


def suite_union(a: dict, b: dict) -> dict[str, tuple[int, int]]:
    """Both suites: every family of either, its levels widened to cover both."""
    out = {f: tuple(v) for f, v in a.items()}
    for f, (lo, hi) in b.items():
        out[f] = (min(lo, out[f][0]), max(hi, out[f][1])) if f in out else (lo, hi)
    return dict(sorted(out.items()))


def suite_of(result) -> dict[str, tuple[int, int]]:
    """The suite a phase result hands on (``result.suite``), checked: known families, 1 <= lo <= hi <= 10."""
    from .data.tasks import FAMILIES

    suite = getattr(result, "suite", None) or {}
    out = {}
    for family, levels in suite.items():
        if family not in FAMILIES or not isinstance(levels, (list, tuple)) or len(levels) != 2:
            raise ValueError(f"result of phase {result.phase!r}: suite entry {family!r}: {levels!r} is not a known "
                             f"family with [lo, hi] levels")
        lo, hi = int(levels[0]), int(levels[1])
        if not 1 <= lo <= hi <= 10:
            raise ValueError(f"result of phase {result.phase!r}: suite levels of {family!r} must be 1 <= lo <= hi "
                             f"<= 10, got {levels!r}")
        out[family] = (lo, hi)
    return dict(sorted(out.items()))


def replay_mix(own: dict[str, float], levels: tuple[int, int], suite: dict, replay: float) -> tuple[dict, dict]:
    """A training mix that keeps what a model knows: ``own`` (the phase's families at ``levels``) with share
    ``1 − replay``, every family of ``suite`` at its own levels with share ``replay`` (uniform over families).
    Returns (mix, family_levels) for ``forgelib.data.stream.TaskStream``."""
    if not 0 <= replay < 1:
        raise ValueError(f"replay must lie in [0, 1), got {replay}")
    own = {f: w for f, w in own.items() if w > 0}
    total = sum(own.values())
    mix = {f: (1 - replay) * w / total for f, w in own.items()} if own and total > 0 else {}
    if not mix:
        replay = 1.0
    lo, hi = int(levels[0]), int(levels[-1])
    family_levels = {f: (lo, hi) for f in mix}
    for f, (slo, shi) in suite.items():
        mix[f] = mix.get(f, 0.0) + replay / len(suite)
        family_levels[f] = (min(slo, lo), max(shi, hi)) if f in own else (slo, shi)
    return mix, family_levels


def questions(family: str, levels: tuple[int, int], n: int, seed: int, pool: int | None = None) -> list:
    """``n`` guard questions of ``family`` (test split) over ``levels``: the first ``n`` of a pool of ``pool``
    distinct questions (default ``n``), spread evenly over the levels, in a seeded random order. Every prefix of the
    pool is a simple random sample of it, so a verdict asked on 80 questions and one extended to 2,000 measure the
    same population (drawn in order, a family whose kinds differ in size — sequence's `count` has the most prompts —
    shifts its mix as the small kinds run out: 25% `count` in the first 100 questions, 54% past the 1,000th). Calls
    with the same ``pool`` and ``seed`` give prefixes of the same list. Fewer when the test split of a level runs
    out."""
    return list(_pool(family, tuple(levels), max(n, pool or 0), seed)[:n])


@functools.lru_cache(maxsize=64)
def _pool(family: str, levels: tuple[int, int], size: int, seed: int) -> tuple:
    """The shuffled pool behind ``questions`` (kept per process: a phase's guards and the compression phase's
    stage guards ask the same pools; and on disk between processes, ``forgelib.data.pool_cache``: 2,000 test
    questions of one family take 0.4-1.5 s to generate, and every phase's kernel asks the same pools)."""
    from .data import pool_cache
    from .data.tasks import generate

    lo, hi = levels
    key = f"{family}-{lo}-{hi}-{size}-{seed}"
    stored = pool_cache.load(key, family, size)
    if stored is not None:
        return tuple(stored)
    per = [size // (hi - lo + 1) + (1 if i < size % (hi - lo + 1) else 0) for i in range(hi - lo + 1)]
    out = [q for i, k in enumerate(per) for q in generate(family, lo + i, k, "test", seed, allow_fewer=True)]
    random.Random(f"guard-order|{family}|{lo}-{hi}|{seed}|{size}").shuffle(out)
    pool_cache.store(key, out)
    return tuple(out)


# --- asking -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Asker:
    """A model as a user asks it (see the module docstring): ``correct(samples)`` per question, 0/1."""

    model: Any
    tokenizer: Any
    experts: list | None = None
    centroids: Any = None
    svf_config: dict = dataclasses.field(default_factory=dict)
    prefixes: Sequence[str] = ANSWER_PREFIXES
    max_new_tokens: int | None = None
    batch_size: int = 128
    label: str = ""

    def answers(self, samples: Sequence) -> list[str]:
        from .evaluate import completion_budget
        from .quietstar import base_lm

        if not samples:
            return []
        tokenizer = thread_own(self.tokenizer)  # a copy of its own when asked beside another model (forgelib.jobs)
        lm = base_lm(self.model)
        budget = self.max_new_tokens or completion_budget(tokenizer, samples, with_steps=True) + 8
        if self.experts and any(_nonzero(z) for z in self.experts):
            return self._routed(lm, tokenizer, samples, budget)  # (experts all z = 0, e.g. all retired: the base)
        from .tools import generate_with_tools

        return [t.text for t in generate_with_tools(lm, tokenizer, list(samples), budget, batch_size=self.batch_size)]

    def _routed(self, lm, tokenizer, samples, budget: int) -> list[str]:
        from .experts import SVFConfig, apply_svf, remove_svf
        from .experts.discover import question_features
        from .experts.route import RoutingSettings, answer_groups, assignments
        from .experts.train import base_weights

        svf = apply_svf(lm, SVFConfig(**self.svf_config))
        try:
            with base_weights(svf):
                features = question_features(svf, tokenizer, [s.prompt for s in samples])
            groups = assignments(features, self.centroids, RoutingSettings())
            return answer_groups(svf, tokenizer, [s.prompt for s in samples], groups, self.experts,
                                 max_new_tokens=budget)
        finally:
            remove_svf(svf)

    def correct(self, samples: Sequence) -> list[int]:
        from .baking.library import strip_answer_prefixes
        from .data.tasks import check

        texts = self.answers(samples)
        return [int(check(s, strip_answer_prefixes(t, self.prefixes))) for s, t in zip(samples, texts)]


def _nonzero(z: dict) -> bool:
    """Whether an expert's ``z`` vectors change the model at all (z = 0 is the base model)."""
    return any(bool(v.abs().sum() > 0) for v in z.values())


# --- the guard ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GuardReport:
    """Per family: the verdict and every question's answers before and after; the pooled suite."""

    margin: float
    families: dict[str, Verdict]
    pooled: Verdict
    answers: dict[str, dict[str, list[int]]]
    suite: dict[str, tuple[int, int]]
    seconds: float
    labels: tuple[str, str] = ("before", "after")
    questions: dict[str, list] = dataclasses.field(default_factory=dict)
    """The samples asked, per family (in the order of ``answers``)."""
    reused: dict[str, int] = dataclasses.field(default_factory=dict)
    """Per family, how many ``before`` answers came from the upstream's guard (checked again on a sample)."""

    def ask(self, asker: Asker) -> dict[str, list[int]]:
        """Another model's answers (0/1) to the same questions, per family."""
        flat = [s for f in self.questions for s in self.questions[f]]
        got, out, k = asker.correct(flat), {}, 0
        for f, samples in self.questions.items():
            out[f] = got[k:k + len(samples)]
            k += len(samples)
        return out

    def compare_pooled(self, name: str, reference: dict[str, list[int]], candidate: dict[str, list[int]],
                       margin: float, confidence: float, power: float) -> Verdict:
        """Non-inferiority of ``candidate`` against ``reference`` over the report's families, each family weighing
        the same (``forgelib.stats.noninferior_over``)."""
        return noninferior_over(name, {f: (reference[f], candidate[f]) for f in self.questions}, margin, confidence,
                                power)

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.families.values())

    def checks(self, prefix: str = "keeps_") -> list:
        from .results import GateCheck

        return [GateCheck(f"{prefix}{family}", v.lower, round(-v.margin, 6), ">", note=v.note)
                for family, v in self.families.items()]

    def lost(self) -> dict[str, float]:
        """Families whose measured accuracy fell, with the difference."""
        return {f: v.diff for f, v in self.families.items() if v.diff < 0}

    def table(self) -> list[dict]:
        rows = [dict(family=f, levels=f"{self.suite[f][0]}-{self.suite[f][1]}", **_row(v))
                for f, v in self.families.items()]
        rows.append(dict(family="all (family mean)", levels="", **_row(self.pooled)))
        return rows

    def to_dict(self) -> dict:
        return {"margin": self.margin, "labels": list(self.labels), "passed": self.passed, "reused": self.reused,
                "suite": {f: list(v) for f, v in self.suite.items()}, "seconds": round(self.seconds, 2),
                "table": self.table(), "families": {f: v.as_row() for f, v in self.families.items()},
                "pooled": self.pooled.as_row(), "answers": self.answers,
                "prompts": {f: [q.prompt for q in qs] for f, qs in self.questions.items()}}


def _row(v: Verdict) -> dict:
    return {"n": v.n, "before": v.before, "after": v.after, "diff": v.diff, "lower_bound": v.lower,
            "bound": -v.margin if v.kind == "noninferior" else v.margin, "needed": v.needed,
            "verdict": "pass" if v.passed else "FAIL", "note": v.note}


def guard(before: Asker, after: Asker, suite: dict, params: GuardParams, seed: int,
          margin: float | None = None, log: Callable[[str], None] | None = None,
          known: dict[str, dict[str, list]] | None = None, min_per_family: int = 0, workers: int = 1) -> GuardReport:
    """Ask both models the guard's questions of every family of ``suite`` and decide per family (module
    docstring). ``margin`` overrides the section's (a compression phase's allowed loss).

    ``known``: ``{family: {"prompts": [...], "answers": [...]}}``, answers the ``before`` model already gave (the
    upstream phase's guard asked its output the same questions, ``known_answers``): they are used where the prompts
    match, once ``before`` gives the same answers again on a check sample (``KNOWN_CHECK`` questions); a single
    difference and every question is asked again.

    ``min_per_family``: ask at least this many questions of each family (capped by what exists), for a phase that
    compares more models on the same questions at a tighter margin than the guard's (Phase 2's contenders).

    ``workers`` > 1: the two models are asked side by side (``forgelib.jobs``) unless they share a parameter."""
    margin = params.margin if margin is None else margin
    started = time.perf_counter()
    first = min(params.max_questions, params.needed(margin))
    answers: dict[str, dict[str, list[int]]] = {f: {"before": [], "after": []} for f in suite}
    pools = {f: questions(f, tuple(suite[f]), params.max_questions, seed + params.seed) for f in suite}
    reuse = _reusable(before, pools, known or {})
    wanted = {f: min(max(first, min_per_family), len(pools[f])) for f in suite}
    side = workers if workers > 1 and not _share_weights(before, after) else 1
    for _ in range(3):  # round 1: the assumed discordance's number; then what the observed one needs
        batch = {f: pools[f][len(answers[f]["after"]):wanted[f]] for f in suite}
        if not any(batch.values()):
            break
        _ask(before, after, batch, answers, reuse, side)
        for f in suite:
            # the observed discordance and difference decide how many more: the questions that give the verdict
            # its power when the true difference is the measured one (``needed_at``): a family that clearly
            # improved needs no more, one that lost part of the margin needs more, so that a verdict never sits
            # within one run's noise of its bound
            c = compare(answers[f]["before"], answers[f]["after"])
            wanted[f] = min(len(pools[f]), max(wanted[f], needed_at(margin, c, params)))
    verdicts = {f: noninferior(f, a["before"], a["after"], margin, params.confidence, params.power,
                               available=len(pools[f])) for f, a in answers.items()}
    pooled = noninferior_over("all", {f: (a["before"], a["after"]) for f, a in answers.items()}, margin,
                              params.confidence, params.power)
    asked = {f: pools[f][:len(answers[f]["before"])] for f in suite}
    report = GuardReport(margin, verdicts, pooled, answers, {f: tuple(v) for f, v in suite.items()},
                         time.perf_counter() - started, (before.label or "before", after.label or "after"), asked)
    report.reused = {f: min(len(reuse.get(f, [])), len(answers[f]["before"])) for f in suite}
    if log is not None:
        log(summary_line(report))
    return report


def needed_at(margin: float, c, params: GuardParams) -> int:
    """Questions a non-inferiority verdict at ``margin`` needs for the guard's power when the true difference is the
    measured ``c.diff`` and the discordance the observed one: ``(z_conf + z_power)² · ψ / (margin + diff)²``. The
    distance ``margin + diff`` is floored at a third of the margin: a family measured within a third of the margin of
    its bound gets the count of that distance (capped by ``max_questions``) and its verdict says if it is short."""
    return params.needed(max(margin + c.diff, margin / 3), c.sizing_discordance)


KNOWN_CHECK = 32
"""Known answers of the ``before`` model are used only after it gave the same answers again to this many of them."""


def _reusable(before: Asker, pools: dict[str, list], known: dict) -> dict[str, list[int]]:
    """Per family, the known answers of ``before`` to the first questions of its pool (as long as the prompts
    match), or nothing at all when ``before`` answers a check sample of them differently now."""
    reuse = {}
    for f, pool in pools.items():
        entry = known.get(f) or {}
        prompts, got = entry.get("prompts") or [], entry.get("answers") or []
        n = 0
        while n < min(len(prompts), len(got), len(pool)) and prompts[n] == pool[n].prompt:
            n += 1
        if n:
            reuse[f] = [int(x) for x in got[:n]]
    check = [(f, i) for f in reuse for i in range(min(len(reuse[f]), KNOWN_CHECK // max(1, len(reuse)) + 1))]
    if check and before.correct([pools[f][i] for f, i in check]) != [reuse[f][i] for f, i in check]:
        return {}
    return reuse


def _share_weights(a: Asker, b: Asker) -> bool:
    """Whether two askers' models hold a tensor in common (then they are not asked side by side: asking a model
    can patch its weights, e.g. the routed experts)."""
    import torch

    def storages(model) -> set[int]:
        if not isinstance(model, torch.nn.Module):
            return {id(model)}
        return {t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()) if t.numel()}

    model_a, model_b = getattr(a, "model", a), getattr(b, "model", b)
    return model_a is model_b or bool(storages(model_a) & storages(model_b))


def _ask(before: Asker, after: Asker, batch: dict[str, list], answers: dict, reuse: dict[str, list[int]],
         workers: int = 1) -> None:
    """Answers of both models to each family's ``batch`` (the continuation of what was asked), appended in order;
    ``before`` is asked only past its reusable answers (``workers`` > 1: both at once)."""
    start = {f: len(answers[f]["after"]) for f in batch}
    fresh = {f: [q for i, q in enumerate(batch[f]) if start[f] + i >= len(reuse.get(f, []))] for f in batch}
    flat_after = [q for f in batch for q in batch[f]]
    flat_before = [q for f in batch for q in fresh[f]]
    got_after, got_before = run_jobs([functools.partial(after.correct, flat_after) if flat_after else list,
                                      functools.partial(before.correct, flat_before) if flat_before else list],
                                     workers)
    ka = kb = 0
    for f in batch:
        n, m = len(batch[f]), len(fresh[f])
        known_part = reuse.get(f, [])[start[f]:start[f] + n - m]
        answers[f]["before"] += known_part + got_before[kb:kb + m]
        answers[f]["after"] += got_after[ka:ka + n]
        ka, kb = ka + n, kb + m


def known_answers(folder: str | Path) -> dict[str, dict[str, list]]:
    """The answers the output model of the phase in ``folder`` gave to its guard's questions (``guard.json``):
    ``{family: {"prompts", "answers"}}`` for the next phase's guard (``guard(known=...)``); {} without one."""
    data = read_guard(folder) or {}
    prompts, answers = data.get("prompts") or {}, data.get("answers") or {}
    return {f: {"prompts": prompts[f], "answers": answers[f]["after"]} for f in prompts if f in answers}


def summary_line(report: GuardReport) -> str:
    """One line: each family's before → after and the verdict."""
    parts = [f"{f} {v.before:.2f}→{v.after:.2f}{'' if v.passed else ' FAIL'}" for f, v in report.families.items()]
    return (f"guard (margin {report.margin:g}, {sum(v.n for v in report.families.values())} questions, "
            f"{report.seconds:.0f} s): " + ", ".join(parts))


def write_guard(report: GuardReport, folder: Path) -> Path:
    from .results import write_json_atomic

    return write_json_atomic(Path(folder) / GUARD_FILE, report.to_dict())


def read_guard(folder: str | Path) -> dict | None:
    """The guard.json of a phase folder, or None."""
    import json

    path = Path(folder) / GUARD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def guard_frame(folder: str | Path):
    """The guard's per-family table of a phase folder as a DataFrame (for notebooks); empty when it has none."""
    import pandas as pd

    data = read_guard(folder)
    return pd.DataFrame(data["table"]) if data else pd.DataFrame()


def pooled_mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values) if values else math.nan
