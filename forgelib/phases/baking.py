"""Phase 6 — Baking: tool and persona prompts baked into the weights (Prompt Baking, KL + LoRA).

The Phase-5 model is loaded trainable (BitLinear layers on latent weights) and its base language model is worked
on (thoughts stay as they were; answers are measured without them, as in Phase 5).

1. **Zero-shot effect**: each prompt of the library (``prompts``: a tool prompt asking for the Phase-5 calculator,
   a persona prompt asking for an ``Answer: n`` style) before the test questions of the input model.
2. **Prompt teaching** (``teach_steps``, ``forgelib.baking.teach``): the pipeline's models never saw an
   instruction, so a prompt changes nothing useful; supervised training on fresh train-split questions of
   ``families``, each with no prompt, one prompt, or all of them, in the matching style. A share ``replay`` of the
   questions replays every family of the input suite (``ctx.input_suite``: every family the input model knew, at
   its levels) plainly — no prompt, the normal worked solution — so that teaching three families does not erase
   the others. The *taught* model is the one whose prompts are baked (saved as ``taught``).
3. **Effect check**: per prompt, its adherence on the test questions with the prompt minus without it (taught
   model). A prompt whose effect is below ``min_effect`` is reported, not baked.
4. **Cycles** (``max_cycles``): the effective prompts in turn (tool, persona, tool, ...), each cycle one bake
   (``forgelib.baking.bake_prompt``: trajectories sampled from the current model with the prompt, LoRA student
   without it, KL, the adapter merged at the end: sequential baking; a prompt baked again is prompt pursuit).
   The teacher of every cycle is the *taught* model with the cycle's prompt *and every prompt baked before it*
   before the question (library order: the ``all`` style teaching taught); the student is the current model.
   Measured on the smoke chain (loose-s0), each alternative corrupted answers: with its own prompt only, the
   persona bake pulled the baked-in tool use back (0.93 → 0.80: the taught model reads a persona prompt alone as
   "no calculator"; gap closed 0.48); with the current (tool-baked) model as the teacher, that teacher answered
   with both prompts at 0.28 instead of the taught model's 0.50 (the final copy after ``Answer:`` broke:
   ``…<|result|>67#Answer: 884``), and the baked model's no-prompt accuracy fell to 0.25; with the taught teacher
   it is 0.44 (prompted taught model 0.50).
   Each bake's **retain term** (``retain_unrelated``) holds every suite family the prompts do not target: KL to the
   unprompted model on trajectories of their train questions, at their levels. After each full pass the *library
   gap* on held-out questions is measured: ``1 − KL(taught + all prompts ‖ current) / KL(taught + all prompts ‖
   taught)``; the cycles stop when a pass raises it by less than ``plateau_delta``, and that pass is undone (the
   model after the previous pass is handed on; its cycles are reported with ``kept: false``). Measured on the cpu
   set: a second pass of pursuit lowered the no-prompt accuracy 0.58 → 0.38 while the library gap rose by 0.013.

**Measured** (test split, ``test_per_level`` per family and level, greedy, calculator on, persona prefixes
removed before the task checker): accuracy, tool-use rate and persona adherence of the input model, the taught
model (no prompt, each prompt, all prompts) and the baked model with no prompt; per bake the held-out KL against
step (the half-baking curve) and the gap closed with its confidence bound; drift: KL(input ‖ baked) per answer
token on reference worked solutions of the suite's other families, and their accuracy before and after (the
guard's answers).

**Gate** (``forgelib.stats``'s rule; the ``guard`` section's confidence and power):

- *gap closed*, per baked prompt (its last kept bake) and for the library (the last kept pass): the one-sided
  lower confidence bound of the held-out gap closed is above ``min_gap_closed``. The bound is the delta-method
  bound of a ratio of paired per-input KL sums (``forgelib.baking.gap``); the held-out inputs are as many as
  ``gap_margin`` needs (a bake whose true gap closed is ``min_gap_closed + gap_margin`` passes with the guard's
  power): first the number the assumed ``gap_spread`` needs, then more where the observed spread needs more
  (``max_heldout`` caps it);
- *earlier bakes retained*: per baked prompt, its no-prompt adherence at the end is non-inferior to its adherence
  right after its own last bake (paired over the test questions, margin ``adherence_margin``);
- *the guard* (``ctx.guard``): the Phase-5 model as loaded against the handed-on model, every family of the input
  suite at its levels, no family lost beyond the guard's margin (``keeps_<family>``; this is also the check that
  the answer styles do not corrupt answers: the guard grades with the ``Answer:`` prefix removed, so
  ``7+8=`` → ``#Answer: 155`` counts as wrong);
- at least one prompt baked.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
from typing import Any

import torch
import torch.nn.functional as F

from ..baking import BakePrompt, PromptBakingConfig, bake_prompt, merge_baked, teach_prompts
from ..baking.bake import heldout_kl, prompt_kl_rows, teacher_pairs
from ..baking.gap import gap_bound, inputs_needed
from ..baking.library import adheres, correct, prefix
from ..data.tasks import FAMILIES, generate, generate_levels, suite_families
from ..params import check_fields, require_non_negative, require_positive
from ..progress import timed
from ..quietstar import base_lm
from ..results import GateCheck, PhaseResult
from ..stats import compare, lower_bound, noninferior
from .common import check_levels, check_optimizer

HEADLINE = ("acc_before", "acc_after", "acc_retention", "tool_use_rate_before", "tool_use_rate_after",
            "persona_adherence_before", "persona_adherence_after", "gap_closed_library")


def _default_prompts() -> list[dict[str, Any]]:
    return [{"name": "calculator", "kind": "tool", "text": "use calc: "},
            {"name": "answer-style", "kind": "persona", "text": "say Answer: ", "answer_prefix": "Answer: "}]


@dataclasses.dataclass
class Params:
    """Phase 6 parameters (the ``baking`` section). Defaults are the smoke set."""

    source: str = "model"
    """Upstream model role (Phase 5 hands on ``model``)."""
    prompts: list[dict[str, Any]] = dataclasses.field(default_factory=_default_prompts)
    """The prompt library: ``{name, kind: tool|persona, text, answer_prefix}`` (``forgelib.baking.BakePrompt``). A
    persona's prefix should be one the chain's answer checker removes (``forgelib.suite.ANSWER_PREFIXES``), or the
    guard and every later phase grade its answers wrong."""
    families: list[str] = dataclasses.field(default_factory=lambda: ["arith", "multistep", "algebra"])
    """Task families the prompts are taught, baked and measured on (every other family of the input suite is
    replayed in teaching and held by the bakes' retain term)."""
    levels: tuple[int, int] = (1, 3)
    """Question levels (lowest, highest) of ``families`` for teaching, trajectories and measurement."""
    teach_steps: int = 300
    """Prompt-teaching steps (0: the model already follows the prompts)."""
    teach_batch_size: int = 16
    """Questions per teaching step."""
    teach_optimizer: dict[str, Any] = dataclasses.field(default_factory=lambda: {"lr": 1e-3})
    """MuGrokfast overrides of the Phase-6 preset for teaching (all weights; straight-through on BitLinear)."""
    replay: float = 0.3
    """Share of the teaching questions replayed plainly (no prompt, the normal worked solution) from the input suite's
    families the prompts do not target (a family drawn uniformly, at its levels; the targeted ones are taught
    unprompted too). Measured at smoke with the whole suite replayed at 0.5: sequence 0.87 -> 0.76 through teaching;
    only the untargeted ones at 0.5: see parameters/smoke.yaml."""
    replay_distill: float = 0.0
    """Weight of KL(input model ‖ taught model) on the answer tokens of teaching's plain questions (replayed and
    unprompted; ``forgelib.baking.teach.plain_distill_loss``), beside their cross-entropy: without a prompt the taught
    model is held to answer as its input did. 0: cross-entropy only."""
    bake: dict[str, Any] = dataclasses.field(default_factory=dict)
    """``PromptBakingConfig`` fields of every bake (steps, lr, lora_r, trajectories, temperature, half_baking...)."""
    calibration_per_level: int = 16
    """Train-split questions per family and level the trajectories start from (also those of the retain term)."""
    test_per_level: int = 16
    """Test-split questions per family and level for accuracy, tool use and adherence (the adherence check's
    note names the number it needs when these are too few)."""
    max_new_tokens: int = 40
    """Completion budget of the measurements and of the bakes' trajectories (unless ``bake`` sets its own)."""
    max_cycles: int = 2
    """Bakes in all, the effective prompts in turn (a second pass re-bakes each: prompt pursuit)."""
    plateau_delta: float = 0.02
    """A pass that raises the library gap closed (point estimate) by less than this is undone and ends the cycles."""
    min_effect: float = 0.2
    """Prompted minus unprompted adherence (taught model, test questions) a prompt needs to be baked."""
    min_gap_closed: float = 0.5
    """Gate target: the lower confidence bound of each baked prompt's held-out gap closed, and of the library's,
    must lie above this."""
    gap_margin: float = 0.2
    """Sizes the held-out inputs: as many as make a bake whose true gap closed is ``min_gap_closed + gap_margin``
    pass with the guard's power (``forgelib.baking.gap.inputs_needed``)."""
    gap_spread: float = 0.35
    """Assumed per-input spread of the gap closed (sd of one input's linearised gap): sizes the first round of
    held-out inputs; where the observed spread needs more, more are drawn (measured on the smoke chain: 0.10 for
    the library, 0.15 for the tool bake, 0.35 for the persona bake)."""
    max_heldout: int = 1000
    """Cap on the held-out inputs of one gap-closed check (fitness-split questions of ``families`` × ``levels``)."""
    adherence_margin: float = 0.1
    """Gate: a prompt's no-prompt adherence at the end may trail its adherence right after its own last bake by at
    most this (paired non-inferiority over the test questions)."""
    drift_per_level: int = 16
    """Test-split questions per family and level of the suite's other families for the drift KL."""
    retain_unrelated: bool = True
    """Bake with the retain term on the suite's families the prompts do not target (``bake_prompt(retain_data=...)``;
    measured on the smoke chain: without it, baking the persona prompt took ``tool`` from 0.34 to 0.00 accuracy)."""
    retain_per_level: int | None = None
    """Train-split questions per family and level of the retain term (None: ``calibration_per_level``); each bake
    answers every one of them (its retain trajectories: at least ``bake.trajectories``)."""

    def __post_init__(self):
        require_positive(self, "calibration_per_level", "test_per_level", "max_new_tokens", "max_cycles",
                         "teach_batch_size", "drift_per_level", "gap_margin", "max_heldout")
        if self.retain_per_level is not None and self.retain_per_level < 1:
            raise ValueError(f"retain_per_level must be None or >= 1, got {self.retain_per_level!r}")
        require_non_negative(self, "teach_steps", "plateau_delta", "min_effect", "gap_spread")
        if not 0 <= self.replay < 1:
            raise ValueError(f"replay must lie in [0, 1), got {self.replay}")
        if not 0 <= self.replay_distill <= 100:
            raise ValueError(f"replay_distill must lie in [0, 100], got {self.replay_distill}")
        if not 0 < self.adherence_margin < 1:
            raise ValueError(f"adherence_margin must lie in (0, 1), got {self.adherence_margin}")
        if not self.min_gap_closed < 1:
            raise ValueError(f"min_gap_closed must be < 1 (a gap closed is at most 1), got {self.min_gap_closed}")
        unknown = [f for f in sorted(set(self.families)) if f not in FAMILIES]
        if unknown:
            raise ValueError(f"families: unknown {unknown}; valid: {sorted(FAMILIES)}")
        check_levels(self, "levels")
        names = [BakePrompt.from_dict(p).name for p in self.prompts]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"prompts: need at least one prompt and distinct names, got {names}")
        self.teach_optimizer = check_optimizer(self.teach_optimizer, 6, "teach_optimizer")
        self.bake = check_fields(PromptBakingConfig, self.bake, "bake")  # unknown keys and types, naming the key
        if "optimizer" in self.bake:
            self.bake["optimizer"] = check_optimizer(self.bake["optimizer"], 6, "bake.optimizer")
        PromptBakingConfig(**self.bake)  # bad values fail here, naming the field

    @property
    def library(self) -> list[BakePrompt]:
        return [BakePrompt.from_dict(p) for p in self.prompts]

    def bake_config(self, seed: int) -> PromptBakingConfig:
        return PromptBakingConfig(**{"max_new_tokens": self.max_new_tokens, **self.bake, "seed": seed})

    def heldout_needed(self, confidence: float = 0.95, power: float = 0.999) -> int:
        """The first round of held-out inputs per gap-closed check (``gap_margin`` at the assumed ``gap_spread``)."""
        return min(self.max_heldout, inputs_needed(self.gap_margin, self.gap_spread, confidence, power))

    @property
    def heldout_per_level(self) -> int:
        """The first round of held-out inputs per family and level (the guard section's default confidence and
        power), for callers that draw them with ``questions`` (``forge bench baking``)."""
        cells = len(self.families) * (self.levels[1] - self.levels[0] + 1)
        return math.ceil(self.heldout_needed() / cells)

    @property
    def drift_families(self) -> list[str]:
        """Every task family the prompts do not target: what a caller without the input suite (``forge bench
        baking``) holds and measures for drift; the phase itself takes the input suite's other families."""
        return [f for f in sorted(suite_families()) if f not in self.families]

    def unrelated(self, suite: dict) -> dict[str, tuple[int, int]]:
        """The input suite's families the prompts do not target, at their levels: replayed, retained, drift-measured."""
        return {f: (int(lo), int(hi)) for f, (lo, hi) in sorted(suite.items()) if f not in self.families}


# --- measuring ----------------------------------------------------------------------------------------


def questions(params: Params, split: str, per_level: int, seed: int, families: list[str] | None = None) -> list:
    """``per_level`` questions of ``families`` (default the prompted ones) at every level of ``params.levels``."""
    return generate_levels(families or params.families, params.levels, per_level, split, seed)


def suite_questions(suite: dict, per_level: int, split: str, seed: int) -> list:
    """``per_level`` questions of every family of ``suite`` at each of its levels, shuffled (seeded): a bake cycles
    through its inputs in order, so every family must come early."""
    out = [s for f, (lo, hi) in sorted(suite.items()) for lv in range(int(lo), int(hi) + 1)
           for s in generate(f, lv, per_level, split, seed, allow_fewer=True)]
    random.Random(seed).shuffle(out)
    return out


def heldout_inputs(params: Params, n: int, seed: int) -> list:
    """The first ``n`` fitness-split questions of ``families`` × ``levels``, interleaved over family and level (the
    first m of the list hold every family and level in proportion; held-out for the gap closed)."""
    cells = [(f, lv) for f in params.families for lv in range(params.levels[0], params.levels[1] + 1)]
    per = math.ceil(n / len(cells))
    pools = [generate(f, lv, per, "fitness", seed, allow_fewer=True) for f, lv in cells]
    out = [pool[j] for j in range(per) for pool in pools if j < len(pool)]
    return out[:n]


def answers(model, tokenizer, prompts: list[BakePrompt], samples: list, params: Params) -> list[str]:
    """Greedy completions (calculator on) of the samples' questions with ``prompts``' texts before them."""
    from ..tools import generate_with_tools

    traces = generate_with_tools(model, tokenizer, [prefix(prompts) + s.prompt for s in samples],
                                 params.max_new_tokens, batch_size=64)
    return [t.text for t in traces]


def measure(model, tokenizer, prompts: list[BakePrompt], samples: list, params: Params) -> dict[str, Any]:
    """Per question: correct (styles normalized) and adherence to each library prompt (``adheres``: 0/1 per
    question, for paired comparisons); their rates; ``copy_errors``: wrong answers whose last calculator result
    was the right answer (the final copy broke, e.g. ``7+8=`` → ``…<|result|>15#Answer: 155``); a few examples."""
    library = params.library
    texts = answers(model, tokenizer, prompts, samples, params)
    row: dict[str, Any] = {"prompts": [p.name for p in prompts],
                           "correct": [int(correct(s, t, library)) for s, t in zip(samples, texts)]}
    row["accuracy"] = sum(row["correct"]) / len(samples)
    row["adheres"] = {p.name: [int(adheres(t, p)) for t in texts] for p in library}
    row["copy_errors"] = sum(1 for s, t, c in zip(samples, texts, row["correct"]) if not c and _result(t) == s.answer)
    row["adherence"] = {name: sum(a) / len(a) for name, a in row["adheres"].items()}
    row["examples"] = [{"question": s.prompt, "answer": t} for s, t in zip(samples[::max(1, len(samples) // 6)],
                                                                          texts[::max(1, len(samples) // 6)])]
    return row


def _result(text: str) -> str | None:
    """The last calculator result of a completion (None without one)."""
    from ..data.base import TOOL_RESULT

    if TOOL_RESULT not in text:
        return None
    tail = text.rsplit(TOOL_RESULT, 1)[1]
    return tail.split("#", 1)[0].split(";", 1)[0].split("<", 1)[0].strip()


def drift_samples(params: Params, seed: int, suite: dict | None = None) -> list:
    """Test-split questions (``drift_per_level`` per family and level) of ``suite`` (default: every family the
    prompts do not target, at levels 1-2)."""
    suite = suite if suite is not None else {f: (1, 2) for f in params.drift_families}
    return [s for f, (lo, hi) in sorted(suite.items()) for lv in range(int(lo), int(hi) + 1)
            for s in generate(f, lv, params.drift_per_level, "test", seed, allow_fewer=True)]


@torch.no_grad()
def drift(reference, model, tokenizer, params: Params, seed: int, suite: dict | None = None,
          accuracy: bool = True) -> dict[str, Any]:
    """KL(reference ‖ model) per answer token on reference worked solutions of ``suite``'s questions (default: see
    ``drift_samples``; teacher-forced: the unrelated behaviour both should share) and, with ``accuracy``, their
    accuracy before and after (the phase takes those from the guard instead)."""
    from ..data.tokenizer import encode_samples

    samples = drift_samples(params, seed, suite)
    families = sorted({s.family for s in samples})
    if not samples:
        return {"families": [], "kl_per_token": float("nan"), "n": 0}
    enc = encode_samples(tokenizer, samples, 128, answer_only_loss=True, with_steps=True, drop_long=True)
    mask = enc["labels"][:, 1:] != -100
    logp = lambda m: F.log_softmax(  # noqa: E731
        m(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, :-1].float(), -1)
    ref, new = logp(reference), logp(model)
    kl = (F.kl_div(new, ref, log_target=True, reduction="none").sum(-1) * mask).sum() / mask.sum()
    out = {"families": families, "kl_per_token": float(kl), "n": len(samples)}
    if accuracy:
        out["acc_before"] = measure(reference, tokenizer, [], samples, params)["accuracy"]
        out["acc_after"] = measure(model, tokenizer, [], samples, params)["accuracy"]
    return out


# --- the gap closed -----------------------------------------------------------------------------------


@dataclasses.dataclass
class GapPlan:
    """How many held-out inputs a gap-closed check uses: the pool it draws them from (``max_heldout`` long), the
    first round, and the rule's confidence and power (the guard section's)."""

    pool: list
    first: int
    confidence: float
    power: float

    def check(self, name: str, rows: dict, params: Params):
        return gap_bound(name, rows["kl_unbaked"], rows["kl_baked"], params.min_gap_closed, params.gap_margin,
                         self.confidence, self.power, available=len(self.pool))

    def more(self, bound) -> list:
        """The inputs to add to the first round where the observed spread needs more (none otherwise; a pair too
        long for the context was left out of the first round, so ``bound.n`` may be below ``first``)."""
        return self.pool[self.first:self.first + bound.needed - bound.n] if bound.needed > bound.n else []


def _joined(a: dict, b: dict) -> dict:
    return {k: list(a[k]) + list(b[k]) for k in a}


def _per_position(rows: dict, key: str) -> float:
    return sum(rows[key]) / max(sum(rows["positions"]), 1)


def library_rows(taught, model, tokenizer, baked_prompts: list[BakePrompt], inputs: list, params: Params,
                 seed: int) -> tuple[Any, dict]:
    """((pairs, teacher log-probs) of the taught model with every baked prompt on ``inputs``, the per-input KL sums
    of the taught model without prompt ("unbaked") and of ``model`` ("baked"; None: not yet measured)): the
    library gap's data."""
    pairs, logp = teacher_pairs(taught, tokenizer, prefix(baked_prompts), inputs, len(inputs),
                                params.bake_config(seed), seed)
    unbaked, positions = prompt_kl_rows(taught, pairs, logp)
    baked = prompt_kl_rows(model, pairs, logp)[0] if model is not None else None
    return (pairs, logp), {"kl_unbaked": unbaked, "kl_baked": baked, "positions": positions}


# --- run ----------------------------------------------------------------------------------------------


def _teach(model, tokenizer, library: list[BakePrompt], params: Params, ctx, others: dict, suite: dict,
           report: dict, timing: dict, reference=None) -> None:
    """Teach the model the library's prompts for ``teach_steps`` steps (none at 0; ``report["teach_loss"]``),
    replaying ``others`` (else the suite); its seconds go to ``timing``."""
    with timed(timing, "teach", cpu=True):
        if params.teach_steps:
            history = teach_prompts(model, tokenizer, library, params.families,
                                    range(params.levels[0], params.levels[1] + 1), params.teach_steps,
                                    params.teach_batch_size, seed=ctx.seed, optimizer=params.teach_optimizer,
                                    tracker=ctx.tracker, device=ctx.device, replay=others or suite,
                                    replay_share=params.replay, reference=reference,
                                    distill_weight=params.replay_distill)
            report["teach_loss"] = {"first": history.first_loss, "last": history.last_loss}
        model.eval()


def _measure_taught(model, tokenizer, library: list[BakePrompt], test: list, params: Params, report: dict,
                    timing: dict) -> tuple[dict[str, dict], list[BakePrompt]]:
    """Measure the taught model without a prompt, with each and with all (``report["taught"]``, ``"effect"``,
    ``"not_baked"``); returns (those measurements, the prompts whose effect reaches ``min_effect``: to bake)."""
    with timed(timing, "measure_taught", cpu=True):
        taught = {"none": measure(model, tokenizer, [], test, params),
                  **{p.name: measure(model, tokenizer, [p], test, params) for p in library}}
        if len(library) > 1:
            taught["all"] = measure(model, tokenizer, library, test, params)
        report["taught"] = taught
        effect = {p.name: taught[p.name]["adherence"][p.name] - taught["none"]["adherence"][p.name] for p in library}
        report["effect"] = effect
        baked_prompts = [p for p in library if effect[p.name] >= params.min_effect]
        report["not_baked"] = {p.name: f"effect {effect[p.name]:.3f} < min_effect {params.min_effect}"
                               for p in library if p not in baked_prompts}
    return taught, baked_prompts


def _drift(reference, model, tokenizer, params: Params, ctx, others: dict, guard, report: dict,
           timing: dict) -> None:
    """``report["drift"]``: the drift on the unrelated families, with their accuracy before and after from the
    guard's answers (NaN where it asked none)."""
    with timed(timing, "drift", cpu=True):
        report["drift"] = drift(reference, model, tokenizer, params, ctx.seed + 4, others, accuracy=False)
    report["drift"].update(acc_before=float("nan"), acc_after=float("nan"))
    asked = [f for f in others if f in guard.answers]
    if asked:
        for side, key in (("before", "acc_before"), ("after", "acc_after")):
            got = [x for f in asked for x in guard.answers[f][side]]
            report["drift"][key] = sum(got) / len(got) if got else float("nan")
        report["drift"]["accuracy_from"] = "guard questions of " + ", ".join(asked)


def run(params: Params, ctx) -> PhaseResult:
    """Phase 6 (see the module docstring)."""
    from ..suite import Asker, GuardParams

    torch.manual_seed(ctx.seed)
    guard_params = ctx.guard_params or GuardParams()
    suite = ctx.input_suite
    others = params.unrelated(suite)
    wrapper, tokenizer = ctx.load_upstream_lm(params.source, trainable=True)
    model = base_lm(wrapper).to(ctx.device)
    library, timing = params.library, {}
    test = questions(params, "test", params.test_per_level, ctx.seed + 1)
    calibration = questions(params, "train", params.calibration_per_level, ctx.seed + 3)
    plans = {key: GapPlan(heldout_inputs(params, params.max_heldout, seed), params.heldout_needed(
        guard_params.confidence, guard_params.power), guard_params.confidence, guard_params.power)
             for key, seed in (("prompt", ctx.seed + 2), ("library", ctx.seed + 7))}
    retain = suite_questions(others, params.retain_per_level or params.calibration_per_level, "train", ctx.seed + 6) \
        if params.retain_unrelated and others else None
    with timed(timing, "measure_input", cpu=True):
        reference = copy.deepcopy(model).eval()
        report: dict[str, Any] = {"library": [dataclasses.asdict(p) for p in library], "levels": list(params.levels),
                                  "families": params.families, "suite": {f: list(v) for f, v in suite.items()},
                                  "unrelated": {f: list(v) for f, v in others.items()}, "replay": params.replay,
                                  "retain_questions": len(retain or []),
                                  "heldout_first_round": plans["prompt"].first}
        report["input"] = {"none": measure(model, tokenizer, [], test, params),
                           **{p.name: measure(model, tokenizer, [p], test, params) for p in library}}
    _teach(model, tokenizer, library, params, ctx, others, suite, report, timing, reference)
    taught, baked_prompts = _measure_taught(model, tokenizer, library, test, params, report, timing)
    ctx.save_model("taught", wrapper, tokenizer, metadata={"baking": "prompt-taught model (before baking)"})
    taught_model = copy.deepcopy(model).eval()
    with timed(timing, "bake", cpu=True):
        model, report["cycles"], report["passes"], after = run_cycles(model, taught_model, tokenizer, baked_prompts,
                                                                      calibration, plans, test, params, ctx, retain)
    report["after"] = after or taught["none"]  # the handed-on model's measurement (the taught one when none baked)
    wrapper.base = model
    ctx.save_model("model", wrapper, tokenizer, metadata={"baking": {"baked": [p.name for p in baked_prompts]}})
    with timed(timing, "guard", cpu=True):
        guard = ctx.guard(Asker(reference, tokenizer, label="phase-5 model"),
                          Asker(model, tokenizer, label="phase-6 model"))
    _drift(reference, model, tokenizer, params, ctx, others, guard, report, timing)
    report["timing"] = timing
    ctx.write_report(report)
    metrics, checks = summarize(report, params, guard_params.confidence, guard_params.power)
    ctx.result.metrics.update(metrics)
    ctx.result.gate.extend(checks)
    return ctx.result


def run_cycles(model, taught_model, tokenizer, baked_prompts: list[BakePrompt], calibration: list,
               plans: dict[str, GapPlan], test: list, params: Params, ctx,
               retain: list | None = None) -> tuple[Any, list, list, dict | None]:
    """The bake cycles (module docstring): (the merged model, a row per cycle, a row per full pass, the handed-on
    model's measurement on ``test``: the last kept cycle's, None when nothing was baked)."""
    cycles, passes = [], []
    if not baked_prompts:
        return model, cycles, passes, None
    lib_plan = plans["library"]
    lib_inputs = lib_plan.pool[:lib_plan.first]
    lib_pairs, lib_rows = library_rows(taught_model, None, tokenizer, baked_prompts, lib_inputs, params,
                                       ctx.seed + 5)
    kl_start = _per_position(lib_rows, "kl_unbaked")
    best, kept, start, kept_after = 0.0, copy.deepcopy(model), 0, None  # the model after the last kept pass
    plan = plans["prompt"]
    for i in range(params.max_cycles):
        prompt = baked_prompts[i % len(baked_prompts)]
        teacher = baked_prompts[:i + 1]  # this prompt and every one baked before it, in library order
        text = prefix(teacher)
        config = params.bake_config(ctx.seed + 10 + i)
        baked = bake_prompt(model, text, tokenizer, calibration, config, eval_data=plan.pool[:plan.first],
                            tracker=ctx.tracker, desc=f"bake{i}", retain_data=retain, teacher=taught_model)
        rows = baked.baking_report["heldout"]
        bound = plan.check(prompt.name, rows, params)
        extra = plan.more(bound)  # the observed spread needs more held-out inputs: draw them (same teacher)
        if extra:
            rows = _joined(rows, heldout_kl(baked, tokenizer, text, extra, config, config.seed + 3, taught_model))
            bound = plan.check(prompt.name, rows, params)
        row = {**{k: v for k, v in baked.baking_report.items() if k not in ("train_loss", "prompt", "heldout")},
               "cycle": i, "prompt": prompt.name, "text": text, "teacher_prompts": [p.name for p in teacher],
               "kept": True}
        row.update(kl_unbaked=_per_position(rows, "kl_unbaked"), kl_baked=_per_position(rows, "kl_baked"),
                   gap_closed=bound.gap, gap=bound.as_row(), heldout=rows, curve_inputs=plan.first)
        row["train_loss"] = baked.baking_report["train_loss"][::max(1, len(baked.baking_report["train_loss"]) // 50)]
        model = merge_baked(baked).eval()
        after = measure(model, tokenizer, [], test, params)
        row["adherence_after"], row["adheres_after"] = after["adherence"], after["adheres"]
        row["accuracy_after"] = after["accuracy"]
        cycles.append(row)
        if (i + 1) % len(baked_prompts) == 0 or i == params.max_cycles - 1:
            now = prompt_kl_rows(model, *lib_pairs)[0]
            gap = 1.0 - sum(now) / sum(lib_rows["kl_unbaked"]) if kl_start > 0 else float("nan")
            gain = gap - best
            passes.append({"after_cycle": i, "gap_closed_library": gap, "kl_start": kl_start, "gain": gain,
                           "kept": not (passes and gain < params.plateau_delta)})
            if not passes[-1]["kept"]:  # plateau: this pass is undone, the previous pass's model handed on
                for r in cycles[start:]:
                    r["kept"] = False
                model = kept
                break
            best, kept, start, kept_after = gap, copy.deepcopy(model), len(cycles), after
    last = next(p for p in reversed(passes) if p["kept"])
    last.update(library_bound(taught_model, model, tokenizer, baked_prompts, lib_pairs, lib_rows, lib_plan, params,
                              ctx.seed + 8))
    return model, cycles, passes, kept_after


def library_bound(taught_model, model, tokenizer, baked_prompts, lib_pairs, lib_rows: dict, plan: GapPlan,
                  params: Params, seed: int) -> dict:
    """The handed-on model's library gap closed with its bound (more held-out inputs where the spread needs them)."""
    rows = dict(lib_rows, kl_baked=prompt_kl_rows(model, *lib_pairs)[0])
    bound = plan.check("library", rows, params)
    extra = plan.more(bound)
    if extra:
        _, more = library_rows(taught_model, model, tokenizer, baked_prompts, extra, params, seed)
        rows = _joined(rows, more)
        bound = plan.check("library", rows, params)
    return {"gap_closed_library": bound.gap, "gap": bound.as_row(), "heldout": rows}


def summarize(report: dict, params: Params, confidence: float = 0.95,
              power: float = 0.999) -> tuple[dict[str, Any], list[GateCheck]]:
    """Metrics and gate checks from the report (see the module docstring; the guard adds its own checks)."""
    before, after = report["input"]["none"], report["after"]
    library = {p["name"]: p for p in report["library"]}
    tool = next((n for n, p in library.items() if p["kind"] == "tool"), None)
    persona = next((n for n, p in library.items() if p["kind"] == "persona"), None)
    prompted = report["taught"].get("all") or report["taught"][next(iter(library))]  # the target of baking
    metrics: dict[str, Any] = {"acc_before": round(before["accuracy"], 4), "acc_after": round(after["accuracy"], 4),
                               "acc_retention": round(after["accuracy"] / before["accuracy"], 4)
                               if before["accuracy"] else None,
                               "acc_taught_prompted": round(prompted["accuracy"], 4)}
    # reported, not gated (the guard gates accuracy against the input): how much of the prompted accuracy the
    # weights kept, and the answers the final copy broke
    c = compare(prompted["correct"], after["correct"])
    metrics["acc_after_minus_taught_prompted"] = round(c.diff, 4)
    metrics["acc_after_minus_taught_prompted_lower_bound"] = round(lower_bound(c, confidence), 4)
    for key, row in (("taught_prompted", prompted), ("after", after)):
        if "copy_errors" in row:
            metrics[f"copy_errors_{key}"] = row["copy_errors"]
    if tool:
        metrics["tool_use_rate_before"] = round(before["adherence"][tool], 4)
        metrics["tool_use_rate_after"] = round(after["adherence"][tool], 4)
    if persona:
        metrics["persona_adherence_before"] = round(before["adherence"][persona], 4)
        metrics["persona_adherence_after"] = round(after["adherence"][persona], 4)
    last = {row["prompt"]: row for row in report["cycles"] if row.get("kept", True)}
    checks = [GateCheck("prompts_baked", len(last), 1, ">=")]
    for name, row in last.items():
        gap = row["gap"]
        metrics[f"gap_closed_{name}"] = _round(gap["gap"])
        metrics[f"gap_closed_{name}_lower_bound"] = _round(gap["lower"])
        metrics[f"heldout_{name}"] = gap["n"]
        checks.append(GateCheck(f"gap_closed_{name}_lower_bound", _round(gap["lower"]), params.min_gap_closed, ">",
                                note=gap["note"]))
        kept = noninferior(f"adherence_kept_{name}", row["adheres_after"][name], after["adheres"][name],
                           params.adherence_margin, confidence, power)
        metrics[f"adherence_kept_{name}_diff"] = kept.diff
        checks.append(GateCheck(f"adherence_kept_{name}_lower_bound", kept.lower, -params.adherence_margin, ">",
                                note=kept.note))
    kept_passes = [p for p in report["passes"] if p.get("kept", True)]
    if kept_passes:
        gap = kept_passes[-1]["gap"]
        metrics["gap_closed_library"] = _round(gap["gap"])
        metrics["gap_closed_library_lower_bound"] = _round(gap["lower"])
        checks.append(GateCheck("gap_closed_library_lower_bound", _round(gap["lower"]), params.min_gap_closed, ">",
                                note=gap["note"]))
    metrics["cycles"] = len(report["cycles"])
    metrics["cycles_kept"] = sum(1 for row in report["cycles"] if row.get("kept", True))
    metrics["drift_kl"] = _round(report["drift"]["kl_per_token"])
    return metrics, checks


def _round(x, digits: int = 4):
    return round(x, digits) if isinstance(x, (int, float)) and math.isfinite(x) else None
