"""Phase 5 — Curriculum: train the ternary model at the edge of its ability, with a calculator, self-modeling
and dreaming, keeping what it knew.

The Phase-4 model is loaded trainable (``load_quietstar(path, trainable=True)``: BitLinear layers whose latent
weights reproduce the packed codes) and trained with the Phase-5 MuGrokfast preset (STE mode).

1. **Assessment** (fitness split): per family the frontier level, the highest level whose accuracy is still ≥ the
   band's lower edge (``forgelib.curriculum.assess_by_level``: level by level, every family still measured asked
   in one batch). ``assess_per_level`` questions per family and level, or (null) as many as put each accuracy
   within ±``level_margin`` of the truth with probability ``power`` (``forgelib.curriculum.estimate_questions``).
2. **Rounds** (``rounds``): per family a ``QuestionPool`` at its own level (so families advance on their own).
   Each round asks every pool ``ask_per_family`` questions; the model answers them greedily with the calculator
   (``forgelib.tools.generate_with_tools``: a ``<|tool|>expr<|/tool|>`` call gets ``<|result|>value``) and the
   task checker grades them. A question retires after 3 unhelped correct answers in a row; a failed one spawns a
   variant and shows one more step of its worked solution next time (a hint); a pool with at most
   ``done_threshold`` active questions is refilled with fresh ones of its level. Then ``steps_per_round``
   training steps; each batch holds the worked solutions of the pools' questions and of ``fresh_per_round`` fresh
   problems per family at its level (a share ``review`` of them from the levels the family mastered in this phase,
   once it moved up), ``dream_share`` replayed dreams, and ``replay``: fresh train-split problems of
   every family the input model knew (``ctx.input_suite``), at its levels, uniform over the families -- without
   them the families outside the curriculum are forgotten (measured before: logic, recall and sequence lost).
3. **Levels advance on held-out questions** (``forgelib.curriculum.decide_levels``): after each round but the last,
   every family below ``max_level`` answers fresh fitness-split questions of its level (never trained on: training
   draws only train-split prompts). The level is mastered, and the family moves one level up, when the one-sided
   lower confidence bound of that accuracy lies above ``band[1] − level_margin``; the number of questions
   (``decide_questions``, or null: ``forgelib.curriculum.decision_questions``) lets a model whose true accuracy is
   ``band[1]`` advance with probability ``power``; a family whose first quarter of them already puts the upper bound
   below the threshold is not asked the rest. The pools' own answers (questions the model trains on) never move a
   level; the report's ``levels`` says which families moved, or the held-out accuracies and bounds when none did.
4. **Dreaming**: each round the model answers ``dream_per_round`` fresh problems of the levels below each
   family's current level, sampling at ``dream_temperature``; the answers the checker verifies go to a
   ``DreamBuffer`` and are replayed in training (consolidating earlier levels with the model's own solutions).
5. **Self-modeling**: an auxiliary linear head predicts the model's own hidden state of layer
   ``self_model_layer`` from its final hidden state (MSE, weight ``self_model_weight``); it exists only during
   training and is not part of the handed-on model.
6. **Frontier questions** (optional, ``frontier``): with an endpoint and a key in the environment, each round asks an
   OpenAI-compatible model for new questions per family; only those the family's own solver confirms join the pool.

The state (pools, dream buffer, round, model weights) is written after every round under ``state/``; a run
given ``resume_from`` (a phase folder of an interrupted run) continues from its last completed round.

**Hands on** the suite (``result.suite``): the input's, widened by every curriculum family at the levels it mastered
(levels 1 to the one below the level it ends at: it moved past them on held-out questions, or the assessment started
it above them); a family the input did not know (``tool``) is added once it mastered a level. The level a family ends
at is its frontier, still being learnt, and is not handed on as known.

**Gate** (test split, ``forgelib.stats``'s paired rule; both models asked as every phase asks, ``forgelib.suite.Asker``:
greedy, calculator on, thoughts off):

* **keeps** (``ctx.guard``): the handed-on model against the Phase-4 model on every family of the input suite,
  widened by the levels below each family's assessed start (the input answered them: ``guarded_suite``),
  ``keeps_<family>``: no family lost more than the ``guard`` section's margin.
* **teaches** (``teaches_<family>``): where the handed-on suite is wider than that (a new family such as ``tool``, or
  a level above the input's that the family moved past here), the handed-on model is superior to the Phase-4 model
  on test questions of those levels by more than ``gain`` (the one-sided lower confidence bound of the paired
  difference > ``gain``).
* **calculator** (``tool_with_minus_without_lower_bound``): on the ``tool`` questions of levels 1 to the level
  reached, the handed-on model answers better with the calculator than without it (lower bound > 0).

The numbers of teaching and calculator questions follow from ``forgelib.stats.questions_needed`` at ``gain``, the
guard's confidence and ``power`` (a true gain of twice ``gain``, or of ``gain`` over no gain for the calculator,
passes with probability ``power``): first at the guard's assumed discordance, then at the observed one
(``forgelib.curriculum.paired_answers``), at most the guard's ``max_questions``. ``think`` (default off, for time)
says whether the model writes Quiet-STaR thoughts while answering the pools and the level decisions.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import random
import re
import time
import typing
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..curriculum import (DreamBuffer, QuestionPool, assess_by_level, decide_levels, decision_questions,
                          estimate_questions, paired_answers, spread_questions)
from ..data.base import Sample
from ..data.stream import TaskStream
from ..data.tasks import FAMILIES, check, generate
from ..data.tokenizer import encode_samples
from ..optim import create_optimizer_from_phase
from ..params import check_fields, require_non_negative, require_positive
from ..results import GateCheck, PhaseResult, write_json_atomic
from ..stats import questions_needed, superior
from ..suite import suite_union
from ..quietstar import base_lm
from ..tools import calculator, generate_with_tools, tool_correctness, tool_stats
from ..train import TrainConfig, train
from .base import UpstreamError
from .common import check_optimizer

HEADLINE = ("tool_acc_with", "tool_acc_without", "tool_success_rate", "acc_reached_mean", "acc_earlier_mean",
            "acc_earlier_before")


@dataclasses.dataclass
class FrontierSettings:
    """The keys of ``frontier``: ``forgelib.curriculum.frontier.FrontierClient.from_config``'s settings and
    ``per_round``. There is no key for the API key: the client reads it only from the environment variable named
    by ``api_key_env``, so it is never stored (registry, params.yaml, tracker)."""

    endpoint: Optional[str] = None
    """The API's base URL (http:// or https://); unset: frontier questions are off."""
    model: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 30.0
    temperature: float = 0.7
    max_tokens: int = 2048
    per_round: int = 4


_SECRET_WORDS = ("key", "token", "secret", "password", "auth", "bearer")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def check_frontier(settings: dict) -> dict:
    """``frontier`` with its keys, types and ranges checked; ValueError naming the key (a value is never echoed:
    it may be a secret)."""
    allowed = [f.name for f in dataclasses.fields(FrontierSettings)]
    unknown = sorted(str(k)[:80] for k in settings if k not in allowed)
    if unknown:
        secret = any(word in name.lower() for name in unknown for word in _SECRET_WORDS)
        env = settings.get("api_key_env") if isinstance(settings.get("api_key_env"), str) else "OPENAI_API_KEY"
        raise ValueError(
            f"frontier: unknown key(s) {unknown}; allowed keys: {allowed}" + (
                f"; the API key is never a parameter: the frontier client reads it only from the environment "
                f"variable {env if _ENV_NAME.fullmatch(env) else 'OPENAI_API_KEY'} (the one api_key_env names)"
                if secret else ""))
    checked, hints = {}, typing.get_type_hints(FrontierSettings)
    for key, value in settings.items():
        try:
            checked.update(check_fields(FrontierSettings, {key: value}, "frontier"))
        except ValueError:
            kind = str(hints[key]).replace("typing.", "") if typing.get_args(hints[key]) else hints[key].__name__
            raise ValueError(f"frontier.{key}: expected {kind} (the value is not shown: it may be a secret)") from None
    full = dataclasses.replace(FrontierSettings(), **checked)
    if not _ENV_NAME.fullmatch(full.api_key_env):
        raise ValueError("frontier.api_key_env must be the name of an environment variable (letters, digits and _, "
                         "e.g. OPENAI_API_KEY), never the key itself")
    if full.endpoint is not None and not re.match(r"https?://\S+$", full.endpoint.strip()):
        raise ValueError("frontier.endpoint must be an http:// or https:// URL (e.g. https://api.openai.com/v1)")
    if full.endpoint is not None and not (full.model or "").strip():
        raise ValueError("frontier.model must name the frontier model when frontier.endpoint is set")
    if not full.timeout > 0 or full.max_tokens < 1 or full.per_round < 1 or full.temperature < 0:
        raise ValueError(f"frontier: timeout must be > 0, max_tokens and per_round >= 1, temperature >= 0; got "
                         f"{full.timeout}, {full.max_tokens}, {full.per_round}, {full.temperature}")
    return checked


@dataclasses.dataclass
class Params:
    """Phase 5 parameters (the ``curriculum`` section). Defaults are the smoke set."""

    source: str = "model"
    """Upstream model role (Phase 4 hands on ``model``)."""
    families: list[str] = dataclasses.field(default_factory=lambda: ["arith", "multistep", "algebra", "tool"])
    """Families of the curriculum (each with its own pool and level)."""
    band: tuple[float, float] = (0.3, 0.8)
    """Target accuracy band: training starts at the highest level with accuracy ≥ band[0]; a level whose held-out
    accuracy reaches band[1] (see ``level_margin``) is mastered and left."""
    max_level: int = 4
    """Highest level assessed and trained."""
    assess_per_level: int | None = None
    """Fitness-split questions per family and level for the assessment; null: as many as put each accuracy within
    ±``level_margin`` of the truth with probability ``power`` (``forgelib.curriculum.estimate_questions``)."""
    level_margin: float = 0.10
    """τ of the level rules: a level is mastered when the lower confidence bound of its held-out accuracy lies above
    ``band[1] − level_margin``; the assessment measures each accuracy to ±τ."""
    decide_questions: int | None = None
    """Fitness-split questions per family of each round's level decision; null: as many as let a model whose true
    accuracy is ``band[1]`` pass with probability ``power`` (``forgelib.curriculum.decision_questions``)."""
    rounds: int = 8
    """Curriculum rounds (ask, dream, train, decide the levels)."""
    ask_per_family: int = 16
    """Questions asked per family and round (from its pool: they are trained on, so they never decide a level)."""
    pool_size: int = 16
    """Questions of a family's pool at its level (variants of failed ones are added, up to twice as many)."""
    done_threshold: int = 4
    """A pool with at most this many active questions is refilled with fresh questions of its level."""
    retire_after: int = 3
    """Consecutive unhelped correct answers that retire a pool question."""
    max_hints: int = 2
    """Worked-solution steps shown at most after failures."""
    steps_per_round: int = 60
    """Training steps per round."""
    fresh_per_round: int = 64
    """Fresh train-split problems per family at its current level added to each round's training set (beside
    the pool's active questions): a pool of a few dozen questions alone is memorized within a round (measured:
    training loss 2.3 -> 0.8 in 120 steps while test accuracy fell)."""
    review: float = 0.5
    """Share of a family's fresh problems drawn from the levels it mastered in this phase, once it has moved up
    (uniform over them): measured at smoke seed 1, the tool family mastered level 1 (held out 0.80), moved to level 2
    for the last round and handed on 0.00 at level 1 (it wrote every 3x2-digit question as 3x3 digits) with only
    the replay's share of level 1."""
    replay: float = 0.25
    """Share of each training batch drawn from every family the input model knew (``ctx.input_suite``), at its levels
    (fresh train-split problems, uniform over the families): what keeps the families outside the curriculum."""
    batch_size: int = 16
    """Training batch size."""
    max_len: int = 96
    """Longest training sequence in tokens (longer ones are left out)."""
    max_new_tokens: int = 48
    """Budget of the model's answers to pool, dream and decision questions."""
    lr: float | None = None
    """Learning rate (None: the Phase-5 preset's)."""
    optimizer: dict[str, Any] = dataclasses.field(default_factory=lambda: {"grokfast_lambda": 0.0, "lr": 5e-4})
    """MuGrokfast overrides of the Phase-5 preset (smoke: Grokfast off, see parameters/smoke.yaml)."""
    dream_per_round: int = 32
    """Problems below the families' current levels answered by sampling each round; the verified ones are kept."""
    dream_temperature: float = 1.0
    """Sampling temperature of the dreams."""
    dream_share: float = 0.25
    """Share of each training batch taken from the dream buffer (when it holds enough)."""
    self_model_weight: float = 0.1
    """Weight of the self-model head's MSE in the loss (0: no head)."""
    self_model_layer: int = 1
    """Index into the base model's hidden states (0 = embeddings, 1 = after the first layer, ...)."""
    think: bool = False
    """Answer pool and decision questions with Quiet-STaR thoughts (slower); the gate asks without them, as every
    phase does; the handed-on model keeps its thought machinery either way."""
    gain: float = 0.10
    """Gate: where the phase teaches (a new family, a level above the input's), the handed-on model must beat the
    Phase-4 model by more than this (lower confidence bound of the paired accuracy difference). Also sizes the
    teaching and calculator comparisons (module docstring)."""
    power: float = 0.9
    """Chance that a true effect of the size the rules assume passes: sizes the assessment, the level decisions and
    the teaching and calculator comparisons."""
    resume_from: str | None = None
    """A phase folder of an interrupted run whose ``state/`` to continue from."""
    frontier: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Optional questions from a frontier model: ``{endpoint, model, api_key_env, per_round}`` (an OpenAI-compatible
    ``/chat/completions`` API). Used only when ``endpoint`` is set and the key variable (default OPENAI_API_KEY) is
    in the environment; each round asks for ``per_round`` (default 4) new questions per family at its level, and
    only those the family's own solver confirms (train split, new prompts) join the pool. Off by default."""

    def __post_init__(self):
        require_positive(self, "max_level", "assess_per_level", "decide_questions", "rounds", "ask_per_family",
                         "pool_size", "retire_after", "steps_per_round", "batch_size", "max_len", "max_new_tokens",
                         "fresh_per_round")
        require_non_negative(self, "max_hints", "dream_per_round", "dream_temperature", "self_model_weight",
                             "self_model_layer", "done_threshold")
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"families: unknown {unknown}; valid: {sorted(FAMILIES)}")
        if not 0 <= self.band[0] <= self.band[1] <= 1:
            raise ValueError(f"band must be (lo, hi) with 0 <= lo <= hi <= 1, got {self.band}")
        if not 0 <= self.review < 1:
            raise ValueError(f"review must lie in [0, 1) (the rest of a family's fresh problems are at its current "
                             f"level), got {self.review}")
        if not 0 <= self.dream_share < 1 or not 0 <= self.replay < 1 or not self.dream_share + self.replay < 1:
            raise ValueError(f"dream_share and replay must lie in [0, 1) with a sum below 1 (the rest of each batch "
                             f"is the curriculum's own), got {self.dream_share} and {self.replay}")
        for name in ("level_margin", "gain", "power"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {getattr(self, name)}")
        if self.max_level > 10:
            raise ValueError(f"max_level must be at most 10, got {self.max_level}")
        require_positive(self, "lr")
        self.optimizer = check_optimizer(self.optimizer, 5)
        self.frontier = check_frontier(self.frontier)


# --- the self-model head ------------------------------------------------------------------------------


class SelfModelHead(nn.Module):
    """Predicts the model's hidden state of layer ``layer`` from its final hidden state (one Linear)."""

    def __init__(self, hidden_size: int, layer: int):
        super().__init__()
        self.layer = layer
        self.proj = nn.Linear(hidden_size, hidden_size)

    def loss(self, hidden_states: tuple, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the real positions (``mask`` (B, T)) between the prediction from the last
        hidden state and the target layer's state (a detached target: the model learns to be predictable from
        its own summary, not to collapse the earlier layer)."""
        if not 0 <= self.layer < len(hidden_states) - 1:
            raise ValueError(f"self_model_layer {self.layer} is not an earlier hidden state (the model has "
                             f"{len(hidden_states)} hidden states; the last is the final one)")
        pred = self.proj(hidden_states[-1])  # (B, T, D)
        target = hidden_states[self.layer].detach()
        per_pos = ((pred.float() - target.float()) ** 2).mean(-1)  # (B, T)
        weights = mask.to(per_pos.dtype)
        return (per_pos * weights).sum() / weights.sum().clamp(min=1)


class Trainee(nn.Module):
    """The model being trained plus its training-only self-model head (the optimizer sees both)."""

    def __init__(self, model: nn.Module, head: SelfModelHead | None):
        super().__init__()
        self.model, self.head = model, head


def curriculum_loss(trainee: Trainee, batch: dict, weight: float) -> tuple[torch.Tensor, dict]:
    """Answer-token cross-entropy of the base model + ``weight`` × the self-model MSE."""
    base = trainee.model.base if hasattr(trainee.model, "base") else trainee.model
    out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
               output_hidden_states=trainee.head is not None)
    logits = out.logits
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    extras = {"nll": float(nll.detach())}
    loss = nll
    if trainee.head is not None and weight > 0:
        self_loss = trainee.head.loss(out.hidden_states, batch["attention_mask"])
        loss = loss + weight * self_loss
        extras["self_model_mse"] = float(self_loss.detach())
    return loss, extras


# --- answering, dreaming, measuring -------------------------------------------------------------------

ANSWER_BATCH = 128
"""Questions generated together (evaluation is cheap next to training when batched)."""


def _thinking(model, think: bool):
    return contextlib.nullcontext() if think or not hasattr(model, "no_thoughts") else model.no_thoughts()


def answer(model, tokenizer, prompts: list[str], params: Params, budget: int | None = None) -> list[str]:
    """Greedy completions with the calculator (what follows each prompt, tool markup and results included), at most
    ``budget`` (default ``max_new_tokens``) model tokens each; thoughts only with ``think``."""
    if not prompts:
        return []
    budget = min(params.max_new_tokens, budget or params.max_new_tokens)
    lm = model if params.think else base_lm(model)
    with _thinking(lm, params.think):
        traces = generate_with_tools(lm, tokenizer, prompts, budget, batch_size=ANSWER_BATCH)
    return [t.text for t in traces]


def answer_budget(tokenizer, samples: list[Sample]) -> int:
    """Model tokens a right answer to ``samples`` needs at most (their longest worked solution, as ``Asker``), plus a
    margin: generation runs until every row of a batch stops, so a row that rambles costs the whole batch."""
    from ..evaluate import completion_budget

    return completion_budget(tokenizer, samples, with_steps=True) + 8


def correct_answers(model, tokenizer, samples: list[Sample], params: Params) -> list[int]:
    """Per sample: is the greedy answer (calculator on, ``think`` as set) right (task checker)?"""
    if not samples:
        return []
    outputs = answer(model, tokenizer, [s.prompt for s in samples], params, answer_budget(tokenizer, samples))
    return [int(check(s, o)) for s, o in zip(samples, outputs)]


def dream_completions(model, tokenizer, prompts: list[str], params: Params, budget: int | None = None) -> list[str]:
    """Completions of the base model sampled at ``dream_temperature``, with the calculator answering its calls
    (a dream is the model's own attempt; the checker decides which are kept); at most ``budget`` (default
    ``max_new_tokens``) model tokens each."""
    budget = min(params.max_new_tokens, budget or params.max_new_tokens)
    traces = generate_with_tools(base_lm(model), tokenizer, prompts, budget, batch_size=ANSWER_BATCH,
                                 temperature=params.dream_temperature)
    return [t.text for t in traces]


def correctness_at(model, tokenizer, family: str, level: int, n: int, split: str, seed: int,
                   params: Params) -> list[int]:
    """Per question (``n`` of ``family`` at ``level`` from ``split``): is the greedy answer (calculator on) right."""
    return correct_answers(model, tokenizer, generate(family, level, n, split, seed), params)


def accuracy_at(model, tokenizer, family: str, level: int, n: int, split: str, seed: int, params: Params) -> float:
    correct = correctness_at(model, tokenizer, family, level, n, split, seed, params)
    return sum(correct) / len(correct)


def assess_questions(params: Params) -> int:
    """Fitness-split questions per family and level of the assessment (``assess_per_level`` or the rule's)."""
    return params.assess_per_level or estimate_questions(params.level_margin, params.power)


def decision_count(params: Params, confidence: float) -> int:
    """Fitness-split questions per family of a level decision (``decide_questions`` or the rule's)."""
    return params.decide_questions or decision_questions(params.level_margin, confidence, params.power,
                                                         params.band[1])


def assess(model, tokenizer, params: Params, seed: int) -> dict[str, dict]:
    """Where each family starts (module docstring, 1.): ``assess_by_level`` on fitness-split questions, one batch
    per level; each family's entry also says how many questions each level had."""
    n = assess_questions(params)
    asked: dict[str, dict[int, int]] = {f: {} for f in params.families}

    def accuracies_at(level: int, families: list[str]) -> dict[str, float]:
        questions = {f: generate(f, level, n, "fitness", seed, allow_fewer=True) for f in families}
        flat = [q for f in families for q in questions[f]]
        got, out, k = correct_answers(model, tokenizer, flat, params), {}, 0
        for f in families:
            m = len(questions[f])
            out[f] = sum(got[k:k + m]) / m if m else 0.0
            asked[f][level] = m
            k += m
        return out

    result = assess_by_level(accuracies_at, params.families, range(1, params.max_level + 1), params.band)
    for f, entry in result.items():
        entry["questions_by_level"] = asked[f]
    return result


def level_decisions(model, tokenizer, pools: dict[str, QuestionPool], params: Params, seed: int,
                    confidence: float) -> dict[str, Any]:
    """The held-out decision of every family below ``max_level`` (module docstring, 3.): fresh fitness-split
    questions of its current level, mastered when the lower confidence bound lies above ``band[1] − level_margin``."""
    n = decision_count(params, confidence)
    questions = {f: generate(f, pool.level, n, "fitness", seed + i, allow_fewer=True)
                 for i, (f, pool) in enumerate(pools.items())
                 if not pool.finished and pool.level is not None and pool.level < params.max_level}
    if not questions:
        return {}
    return decide_levels(lambda samples: correct_answers(model, tokenizer, list(samples), params), questions,
                         params.band[1] - params.level_margin, confidence)


def as_sample(prompt: str, completion: str, family: str, level: int, answer_text: str) -> Sample:
    """A training sample whose worked solution is ``completion`` (``step;step#answer``)."""
    body = completion.split("#")[0]
    return Sample(prompt, answer_text, family, level, steps=body.split(";") if body else None)


def replay_stream(suite: dict, seed: int) -> TaskStream | None:
    """Fresh train-split problems of every family of ``suite`` at its own levels, uniform over the families."""
    if not suite:
        return None
    levels = {f: (int(lo), int(hi)) for f, (lo, hi) in suite.items()}
    span = (min(lo for lo, _ in levels.values()), max(hi for _, hi in levels.values()))
    return TaskStream({f: 1.0 for f in levels}, span, "train", seed, family_levels=levels)


def batch_samples(frontier: list[Sample], replay: TaskStream | None, dreams: DreamBuffer, n_replay: int,
                  n_dream: int, params: Params, rng: random.Random) -> list[Sample]:
    """One training batch before encoding: ``n_dream`` replayed dreams, ``n_replay`` problems of the input suite
    (``replay``), the rest drawn from the curriculum's own problems (``frontier``)."""
    picks = [frontier[rng.randrange(len(frontier))] for _ in range(params.batch_size - n_dream - n_replay)]
    if n_replay:
        picks += replay.take(n_replay)
    picks += [as_sample(d.prompt, d.completion, d.family, d.level, d.answer) for d in dreams.sample(n_dream, rng)]
    return picks


def batch_shares(params: Params, dreams: DreamBuffer, suite: dict | None) -> tuple[int, int]:
    """(replayed suite problems, replayed dreams) per training batch; at least one place stays the curriculum's."""
    n_dream = int(params.batch_size * params.dream_share) if len(dreams) >= params.batch_size else 0
    n_replay = round(params.batch_size * params.replay) if suite else 0
    return max(0, min(n_replay, params.batch_size - n_dream - 1)), n_dream


# --- state --------------------------------------------------------------------------------------------


def save_state(folder: Path, pools: dict[str, QuestionPool], dreams: DreamBuffer, round_index: int,
               history: list, trainee: Trainee, rng: random.Random, optimizer=None) -> None:
    """Pools, dream buffer, round counter, history, model weights (latent, trainable; the self-model head too)
    and the optimizer state under ``folder``, each file written atomically."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), folder / "optimizer.pt.tmp")
        (folder / "optimizer.pt.tmp").replace(folder / "optimizer.pt")
    torch.save(torch.get_rng_state(), folder / "torch_rng.pt.tmp")  # dream sampling draws from it
    (folder / "torch_rng.pt.tmp").replace(folder / "torch_rng.pt")
    for family, pool in pools.items():
        pool.save(folder / f"pool_{family}.json")
    state = {k: v.detach().cpu().contiguous() for k, v in trainee.state_dict().items()}
    tmp = folder / "trainee.safetensors.tmp"
    save_file(dict(_untied(state)), str(tmp))
    tmp.replace(folder / "trainee.safetensors")
    from ..curriculum.state import rng_to_json

    write_json_atomic(folder / "state.json", {"round": round_index, "history": history, "dreams": dreams.to_dict(),
                                              "rng": rng_to_json(rng)})


def _untied(state: dict) -> dict:
    seen, out = {}, {}
    for key, value in state.items():
        ptr = (value.data_ptr(), tuple(value.shape))
        if ptr not in seen:
            seen[ptr] = key
            out[key] = value.clone()
    return out


def load_state(folder: Path, families: list[str], trainee: Trainee, optimizer=None):
    """The state ``save_state`` wrote (a clear error when the folder holds none)."""
    from safetensors.torch import load_file

    from ..curriculum.state import rng_from_json

    if not (folder / "state.json").is_file():
        raise UpstreamError(f"resume_from: {folder} holds no curriculum state (state.json); give the folder of a "
                            f"phase-5 run that completed at least one round")
    state = json.loads((folder / "state.json").read_text())
    pools = {f: QuestionPool.load(folder / f"pool_{f}.json") for f in families}
    missing, unexpected = trainee.load_state_dict(load_file(str(folder / "trainee.safetensors")), strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise UpstreamError(f"resume_from: the saved weights do not fit this model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    if optimizer is not None and (folder / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    if (folder / "torch_rng.pt").is_file():
        torch.set_rng_state(torch.load(folder / "torch_rng.pt", weights_only=True))
    return pools, DreamBuffer.from_dict(state["dreams"]), state["round"], state["history"], rng_from_json(state["rng"])


# --- run ----------------------------------------------------------------------------------------------


def load_source(params: Params, ctx):
    return ctx.load_upstream_lm(params.source, trainable=True)  # UpstreamError naming the roles it has if missing


def _confidence(ctx) -> float:
    """The chain's one-sided confidence (the ``guard`` section's)."""
    from ..suite import GuardParams

    return (getattr(ctx, "guard_params", None) or GuardParams()).confidence


def _input_suite(ctx) -> dict:
    """The upstream's suite of task families (a copy); UpstreamError when it names none."""
    suite = dict(ctx.input_suite)
    if not suite:
        raise UpstreamError("curriculum: the upstream names no suite of task families (result.json `suite`, or a "
                            "Phase 1 in its chain): nothing to replay and nothing for the guard to keep")
    return suite


def _trainee(model: nn.Module, params: Params) -> tuple[Trainee, Any]:
    """The model with its self-model head (none at ``self_model_weight`` 0) and the Phase-5 optimizer over both."""
    hidden = model.get_input_embeddings().weight.shape[1]
    head = SelfModelHead(hidden, params.self_model_layer) if params.self_model_weight > 0 else None
    trainee = Trainee(model, head)
    overrides = {**params.optimizer, **({"lr": params.lr} if params.lr is not None else {})}
    return trainee, create_optimizer_from_phase(trainee, phase_num=5, **overrides)


def _question_pools(params: Params, start: dict[str, int], seed: int) -> dict[str, QuestionPool]:
    """One question pool per curriculum family, at its assessed start level (seeded ``seed`` + its index)."""
    return {f: QuestionPool({f: 1.0}, level=start[f], pool_size=params.pool_size, seed=seed + i,
                            retire_after=params.retire_after, max_hints=params.max_hints,
                            done_threshold=params.done_threshold)
            for i, f in enumerate(params.families)}


def _run_rounds(trainee: Trainee, tokenizer, pools: dict[str, QuestionPool], dreams: DreamBuffer, params: Params,
                optimizer, rng: random.Random, first: int, history: list[dict], frontier, ctx, suite: dict,
                confidence: float, timing: dict) -> None:
    """Rounds ``first`` .. ``rounds - 1`` (each after asking ``frontier`` for new questions when there is one): each
    record appended to ``history`` and the state saved after it; their seconds go to ``timing["rounds_s"]``."""
    t0 = time.perf_counter()
    step = first * params.steps_per_round
    for round_index in range(first, params.rounds):
        if frontier is not None:
            history_extra = ask_frontier(frontier, pools, params)
        row = run_round(trainee, tokenizer, pools, dreams, params, optimizer, rng, step, ctx,
                        last=round_index == params.rounds - 1, suite=suite, confidence=confidence,
                        timing=timing)
        if frontier is not None:
            row["frontier"] = history_extra
        step += params.steps_per_round
        history.append({"round": round_index, **row})
        save_state(ctx.dir / "state", pools, dreams, round_index + 1, history, trainee, rng, optimizer)
    timing["rounds_s"] = round(time.perf_counter() - t0, 2)


def _evaluate(model, input_model, tokenizer, start: dict[str, int], reached: dict[str, int], suite: dict,
              params: Params, guard_params, ctx,
              timing: dict) -> tuple[Any, dict[str, int], dict[str, list[int]], dict[str, dict], dict | None]:
    """The guard of the trained model against the input one (over the input suite and the levels the assessment
    found the input answering: ``guarded_suite``), then the taught levels' comparisons and the calculator's;
    (guard report, mastered levels, taught levels, teaching comparisons, tool comparison or None)."""
    from ..suite import Asker

    # both as loaded for training (latent BitLinear weights): ~15 % faster than the packed models; measured at smoke,
    # 1 answer of 9,922 differed from the packed models' (a floating-point tie)
    before, after = Asker(input_model, tokenizer, label="phase-4 model"), Asker(model, tokenizer, label="phase-5 model")
    t0 = time.perf_counter()
    guarded = guarded_suite(suite, start)
    guard_report = ctx.guard(before, after, suite=guarded)
    timing["guard_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    mastered = mastered_levels(reached)
    taught = taught_levels(suite, mastered, start)
    teaching = teaching_comparisons(taught, before, after, params, guard_params, ctx.seed + 2)
    tool = calculator_comparison(model, tokenizer, reached["tool"], params, guard_params, ctx.seed + 3) \
        if "tool" in reached else None
    timing["teach_s"] = round(time.perf_counter() - t0, 2)
    return guard_report, mastered, taught, teaching, tool


def _report(params: Params, ctx, suite: dict, assessment: dict, start: dict[str, int], reached: dict[str, int],
            history: list[dict], guard_report, taught: dict[str, list[int]], teaching: dict[str, dict],
            tool: dict[str, Any] | None, timing: dict, pools: dict[str, QuestionPool], dreams: DreamBuffer,
            confidence: float) -> dict[str, Any]:
    """The phase's report (``ctx.result.suite`` already set to the output suite)."""
    correct = correct_by_level(guard_report, teaching)
    rate = lambda table: {f: {lv: sum(c) / len(c) for lv, c in by.items()} for f, by in table.items()}  # noqa: E731
    return {"assessment": assessment, "start_levels": start, "level_reached": reached, "history": history,
            "acc_by_level": {side: rate(t) for side, t in correct.items()}, "correct_by_level": correct,
            "tool": tool, "timing": timing, "band": list(params.band),
            "suite": {"input": {f: list(v) for f, v in suite.items()}, "output": ctx.result.suite,
                      "guarded": {f: list(v) for f, v in guarded_suite(suite, start).items()},
                      "taught": {f: list(lv) for f, lv in taught.items()}},
            "replay": {"share": params.replay, "per_batch": batch_shares(params, DreamBuffer(), suite)[0],
                       "families": sorted(suite)},
            "levels": level_summary(history, start, reached, params, confidence),
            "teaching": {f: {"levels": row["levels"], "verdict": row["verdict"], "before": row["before"],
                             "after": row["after"], "prompts": [q.prompt for q in row["questions"]]}
                         for f, row in teaching.items()},
            "pools": {f: p.summary() for f, p in pools.items()}, "dreams": dreams.counts(),
            "question_pool": {f: [dict(row, history=p.questions[row["qid"]].history) for row in p.table()]
                              for f, p in pools.items()}}


def run(params: Params, ctx) -> PhaseResult:
    """Phase 5 (see the module docstring)."""
    from ..suite import GuardParams

    torch.manual_seed(ctx.seed)
    guard_params = ctx.guard_params or GuardParams()
    suite = _input_suite(ctx)
    frontier = frontier_client(params)  # a refused endpoint stops the phase before any model is loaded
    model, tokenizer = load_source(params, ctx)
    input_model = copy.deepcopy(model).eval()  # the Phase-4 model as loaded, for the gate
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    model.eval()
    assessment = assess(model, tokenizer, params, ctx.seed)
    start = {f: a["level"] for f, a in assessment.items()}
    timing["assess_s"] = round(time.perf_counter() - t0, 2)
    trainee, optimizer = _trainee(model, params)
    pools = _question_pools(params, start, ctx.seed)
    dreams, history, first, rng = DreamBuffer(capacity=512, seed=ctx.seed), [], 0, random.Random(ctx.seed)
    if params.resume_from:
        from .. import paths

        pools, dreams, first, history, rng = load_state(paths.resolve(params.resume_from) / "state", params.families,
                                                        trainee, optimizer)
    _run_rounds(trainee, tokenizer, pools, dreams, params, optimizer, rng, first, history, frontier, ctx, suite,
                guard_params.confidence, timing)
    model.eval()
    reached = {f: min(p.level or params.max_level, params.max_level) for f, p in pools.items()}
    ctx.save_model("model", model, tokenizer, metadata={"curriculum": {"level_reached": reached}})
    guard_report, mastered, taught, teaching, tool = _evaluate(model, input_model, tokenizer, start, reached, suite,
                                                               params, guard_params, ctx, timing)
    output_suite = suite_union(suite, {f: (1, lv) for f, lv in mastered.items() if lv >= 1})
    ctx.result.suite = {f: list(v) for f, v in output_suite.items()}
    report = _report(params, ctx, suite, assessment, start, reached, history, guard_report, taught, teaching, tool,
                     timing, pools, dreams, guard_params.confidence)
    ctx.write_report(report)
    metrics, checks = summarize(report, params)
    ctx.result.metrics.update(metrics)
    ctx.result.gate.extend(checks)
    if not ctx.quiet:
        print(f"[curriculum] {report['levels']['note']}", flush=True)
    return ctx.result


def mastered_levels(reached: dict[str, int]) -> dict[str, int]:
    """Per curriculum family, the highest level it has mastered: the one below the level it ends at (it moved past
    it on held-out questions, or the assessment started it above it); 0 for none. The level it ends at is its
    frontier, still being learnt: it is not handed on as known."""
    return {f: max(0, lv - 1) for f, lv in reached.items()}


def taught_levels(suite: dict, reached: dict[str, int], start: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Per curriculum family, its mastered levels ``start``..``reached`` (default from 1) the input suite does not
    hold (all of them for a new family): the levels this phase moved past on held-out questions. A level below the
    assessment's ``start`` was not taught here: the input already answered it (``guarded_suite``)."""
    out = {}
    for family, level in reached.items():
        lo, hi = suite.get(family, (0, -1))
        first = max(1, (start or {}).get(family, 1))
        levels = [lv for lv in range(first, level + 1) if not lo <= lv <= hi]
        if levels:
            out[family] = levels
    return out


def guarded_suite(suite: dict, start: dict[str, int]) -> dict[str, tuple[int, int]]:
    """The input suite widened by each curriculum family's levels below its assessed ``start``: the input answered
    each of them at or above the band's lower edge (the assessment goes up while it does), so they are handed on as
    known (``mastered_levels``) and the guard keeps them as it keeps the input suite, instead of a teaching check
    asking the phase to have taught what the input already knew (measured at the cpu set: multistep started at
    level 5, its level 4, answered 0.73 by the input, failed ``teaches_multistep`` at a lower bound of -0.12)."""
    return suite_union(suite, {f: (1, lv - 1) for f, lv in start.items() if lv > 1})


def teaching_comparisons(taught: dict[str, list[int]], before, after, params: Params, guard,
                         seed: int) -> dict[str, dict]:
    """Per family with taught levels: test questions spread over them, as many as ``paired_answers`` sizes for a
    superiority test at ``gain``; both models' answers and the verdict (module docstring: the gate)."""
    out = {}
    cap = min(guard.max_questions, questions_needed(params.gain, guard.confidence, params.power, 1.0))
    for i, (family, levels) in enumerate(taught.items()):
        pool = spread_questions(family, levels, cap, "test", seed + i)
        b, a = paired_answers(pool, before.correct, after.correct, params.gain, guard.confidence, params.power,
                              guard.discordance)
        verdict = superior(f"teaches_{family}", b, a, params.gain, guard.confidence, params.power,
                           available=len(pool))
        out[family] = {"levels": levels, "questions": pool[:len(b)], "before": b, "after": a,
                       "verdict": verdict.as_row()}
    return out


def calculator_comparison(model, tokenizer, level: int, params: Params, guard, seed: int) -> dict[str, Any]:
    """The ``tool`` family at levels 1..``level`` (test split), answered by ``model`` with and without the calculator
    on the same questions (the same answer budget): the calls' record of each arm and the paired superiority
    verdict (calculator better at all; as many questions as a true gain of ``gain`` needs)."""
    from ..evaluate import completion_budget

    cap = min(guard.max_questions, questions_needed(params.gain, guard.confidence, params.power, 1.0))
    pool = spread_questions("tool", range(1, level + 1), cap, "test", seed)
    budget = completion_budget(tokenizer, pool, with_steps=True) + 8
    traces: dict[bool, list] = {True: [], False: []}
    lm = base_lm(model)  # thoughts off, as every phase asks

    def arm(use_tool: bool):
        def ask(samples):
            got = generate_with_tools(lm, tokenizer, samples, budget, tool=calculator if use_tool else None,
                                      batch_size=ANSWER_BATCH)
            traces[use_tool] += got
            return [int(check(s, t.text)) for s, t in zip(samples, got)]
        return ask

    without, with_tool = paired_answers(pool, arm(False), arm(True), params.gain, guard.confidence, params.power,
                                        guard.discordance)
    verdict = superior("tool_with_minus_without", without, with_tool, 0.0, guard.confidence, params.power,
                       available=len(pool))
    stats = {use: {"use_tool": use, "samples": len(answers), "accuracy": sum(answers) / len(answers),
                   **tool_stats(traces[use])} for use, answers in ((True, with_tool), (False, without))}
    return {"level": level, "levels": [1, level], "with": stats[True], "without": stats[False],
            "verdict": verdict.as_row()}


def tool_comparison(model, tokenizer, level: int, params: Params, seed: int, n: int | None = None) -> dict[str, Any]:
    """``n`` test-split ``tool`` questions at ``level`` answered with and without the calculator (no test; for the
    benchmark). ``n`` defaults to the number a true gain of ``gain`` needs at discordance 0.15."""
    samples = generate("tool", level, n or questions_needed(params.gain, 0.95, params.power, 0.15), "test", seed)
    budget = params.max_new_tokens
    with _thinking(model, params.think):
        _, with_tool = tool_correctness(model, tokenizer, samples, True, budget, batch_size=ANSWER_BATCH)
        _, without = tool_correctness(model, tokenizer, samples, False, budget, batch_size=ANSWER_BATCH)
    return {"level": level, "with": with_tool, "without": without}


def correct_by_level(guard_report, teaching: dict[str, dict]) -> dict[str, dict[str, dict[int, list[int]]]]:
    """Per side ('before', 'after'), family and level: the 0/1 answers to the guard's and the teaching questions."""
    out: dict[str, dict] = {"before": {}, "after": {}}
    sources = [(guard_report.questions[f], guard_report.answers[f]["before"], guard_report.answers[f]["after"])
               for f in guard_report.questions]
    sources += [(row["questions"], row["before"], row["after"]) for row in teaching.values()]
    for samples, b, a in sources:
        for sample, x, y in zip(samples, b, a):
            for side, value in (("before", x), ("after", y)):
                out[side].setdefault(sample.family, {}).setdefault(sample.level, []).append(int(value))
    return {side: {f: dict(sorted(by.items())) for f, by in sorted(t.items())} for side, t in out.items()}


def level_summary(history: list[dict], start: dict[str, int], reached: dict[str, int], params: Params,
                  confidence: float) -> dict[str, Any]:
    """The levels' story: per family its start, where it ended, the rounds it advanced, its last held-out decision,
    and a sentence saying which families advanced or why none did."""
    decisions = {}
    for row in history:
        for f, d in row.get("heldout", {}).items():
            decisions[f] = d
    advanced = {f: [row["round"] for row in history if f in row.get("advanced", [])] for f in start}
    threshold = round(params.band[1] - params.level_margin, 4)
    moved = sorted(f for f, rounds in advanced.items() if rounds)
    if moved:
        note = "advanced on held-out questions: " + ", ".join(f"{f} {start[f]}→{reached[f]}" for f in moved)
    else:
        best = ", ".join(f"{f} L{d['level']}: {d['correct']}/{d['n']} = {d['accuracy']:.3f} (lower bound "
                         f"{d['lower']:.3f})" for f, d in sorted(decisions.items()))
        note = (f"no family advanced: a level is left when the lower {confidence:g} confidence bound of its held-out "
                f"accuracy exceeds {threshold:g} (band[1] {params.band[1]:g} − level_margin {params.level_margin:g}); "
                f"last decisions: {best or 'none made'}")
    return {"threshold": threshold, "confidence": confidence, "advanced_in_rounds": advanced,
            "last_decision": decisions, "note": note}


def frontier_client(params: Params):
    """A ``FrontierClient`` when ``frontier`` names an endpoint and its key is in the environment, else None."""
    from ..curriculum import frontier as fr

    if not params.frontier or not fr.enabled(params.frontier):
        return None
    config = {k: v for k, v in params.frontier.items() if k != "per_round"}
    return fr.FrontierClient.from_config(config)


def ask_frontier(client, pools: dict[str, QuestionPool], params: Params) -> dict[str, dict[str, int]]:
    """Ask the frontier model for new questions per family at its current level (examples: a few pool
    questions); the checked ones join the pool. Returns per family the proposals accepted and rejected."""
    out = {}
    for family, pool in pools.items():
        if pool.finished:
            continue
        examples = [pool.questions[q].sample for q in pool.active_ids()[:3]]
        proposed = client.propose_questions(family, pool.level, examples, int(params.frontier.get("per_round", 4)))
        added = pool.add_questions(proposed, origin="frontier")
        out[family] = {"accepted": len(added), "rejected": len(client.last_rejected)}
    return out


def _ask_and_grade(model, tokenizer, pools: dict[str, QuestionPool], params: Params, step: int, row: dict) -> None:
    """Ask every unfinished family's next questions (one batch for all families) and grade the answers into the
    pools; each family's level, questions asked and right answers go to ``row``."""
    asked = {family: pool.next_batch(params.ask_per_family) for family, pool in pools.items() if not pool.finished}
    items = [item for family_items in asked.values() for item in family_items]  # one batch for all families
    outputs = answer(model, tokenizer, [item.prompt for item in items], params,
                     answer_budget(tokenizer, [item.sample for item in items]) if items else None)
    k = 0
    for family, family_items in asked.items():
        pool = pools[family]
        right = [pool.answer(item, out, step=step) for item, out in zip(family_items, outputs[k:k + len(family_items)])]
        k += len(family_items)
        row["levels"][family], row["asked"][family], row["correct"][family] = pool.level, len(family_items), sum(right)


def _dream(model, tokenizer, pools: dict[str, QuestionPool], dreams: DreamBuffer, params: Params,
           rng: random.Random, row: dict) -> None:
    """Dreams: fresh problems below each family's current level, answered by sampling, verified by the checker;
    the verified ones join ``dreams`` (``row["dreams_added"]``)."""
    dream_samples = []
    for family, pool in pools.items():
        below = [lv for lv in range(1, (pool.level or 1))]
        if below:
            dream_samples += generate(family, rng.choice(below), max(1, params.dream_per_round // len(pools)),
                                      "train", rng.randrange(1 << 30))
    if dream_samples and params.dream_per_round:
        outputs = dream_completions(model, tokenizer, [s.prompt for s in dream_samples], params,
                                    answer_budget(tokenizer, dream_samples))
        row["dreams_added"] = dreams.add(list(zip(dream_samples, outputs)), check)


def _frontier_samples(pools: dict[str, QuestionPool], params: Params, rng: random.Random) -> list[Sample]:
    """The curriculum's own training problems: each unfinished family's active pool questions (failed ones stay
    until retired) and fresh problems at its current level (the frontier), with their worked solutions."""
    frontier = []
    for family, pool in pools.items():
        if pool.finished:
            continue
        frontier += [pool.questions[q].sample for q in pool.active_ids()]
        below = [a["levels"][family] for a in pool.archive if family in a["levels"]]  # levels mastered here
        n_review = round(params.fresh_per_round * params.review) if below else 0
        frontier += generate(family, pool.level, params.fresh_per_round - n_review, "train", rng.randrange(1 << 30))
        picks = [rng.choice(below) for _ in range(n_review)] if len(set(below)) > 1 else below[:1] * n_review
        for level in sorted(set(picks)):
            frontier += generate(family, level, picks.count(level), "train", rng.randrange(1 << 30))
    return frontier


def _train_round(trainee: Trainee, tokenizer, frontier: list[Sample], replay: TaskStream | None, dreams: DreamBuffer,
                 n_replay: int, n_dream: int, params: Params, optimizer, rng: random.Random, step: int, ctx):
    """Train ``steps_per_round`` steps on batches of ``frontier`` problems, replayed suite problems and replayed
    dreams (``batch_samples``); returns the training history."""

    def batches():
        while True:
            picks = batch_samples(frontier, replay, dreams, n_replay, n_dream, params, rng)
            enc = encode_samples(tokenizer, picks, params.max_len, answer_only_loss=True, with_steps=True,
                                 drop_long=True)
            length = int(enc["attention_mask"].sum(1).max())
            yield {k: v[:, :length] for k, v in enc.items()}

    config = TrainConfig(steps=params.steps_per_round, log_every=max(1, params.steps_per_round // 2))
    return train(trainee, batches(), optimizer, config, loss_fn=lambda m, b: curriculum_loss(m, b,
                 params.self_model_weight), tracker=ctx.tracker, device=ctx.device, desc="curriculum",
                 quiet=True, step_offset=step)


def _decide(model, tokenizer, pools: dict[str, QuestionPool], params: Params, rng: random.Random, confidence: float,
            timing: dict | None, row: dict) -> None:
    """Decide the levels on held-out questions and advance the mastered families (``row["heldout"]`` and
    ``row["advanced"]``); the seconds are added to ``timing["decisions_s"]``."""
    started = time.perf_counter()
    decisions = level_decisions(model, tokenizer, pools, params, rng.randrange(1 << 30), confidence)
    if timing is not None:
        timing["decisions_s"] = round(timing.get("decisions_s", 0.0) + time.perf_counter() - started, 2)
    row["heldout"] = {f: d.as_row() for f, d in decisions.items()}
    for family, decision in decisions.items():
        if decision.mastered and pools[family].advance():
            row.setdefault("advanced", []).append(family)


def run_round(trainee: Trainee, tokenizer, pools: dict[str, QuestionPool], dreams: DreamBuffer, params: Params,
              optimizer, rng: random.Random, step: int, ctx, last: bool = False, suite: dict | None = None,
              confidence: float | None = None, timing: dict | None = None) -> dict[str, Any]:
    """Ask, grade, dream, train ``steps_per_round`` steps (replaying ``suite``), decide the levels on held-out
    questions (not in the ``last`` round: a level entered then would be handed on untrained); the round's record.
    The decisions' seconds are added to ``timing["decisions_s"]`` (not to the record: a resumed run's records equal
    an uninterrupted one's)."""
    confidence = _confidence(ctx) if confidence is None else confidence
    model = trainee.model
    model.eval()
    row = {"levels": {}, "correct": {}, "asked": {}}
    _ask_and_grade(model, tokenizer, pools, params, step, row)
    _dream(model, tokenizer, pools, dreams, params, rng, row)
    # training batches: the pools' active questions (failed ones stay until retired) and fresh problems at each
    # family's current level (the frontier), with their worked solutions, plus replayed dreams and the input suite
    frontier = _frontier_samples(pools, params, rng)
    n_replay, n_dream = batch_shares(params, dreams, suite)
    # the replay keeps what the input knew and what this phase taught so far: the levels below each family's
    # current one (measured at smoke without them: the tool family, moved from level 1 to 2, forgot level 1's
    # 3x2-digit format and copied every level-1 question as 3x3 digits, 0 % right)
    learnt = {f: (1, pool.level - 1) for f, pool in pools.items() if (pool.level or 1) > 1}
    replay = replay_stream(suite_union(suite or {}, learnt), rng.randrange(1 << 30)) if n_replay else None
    row["replayed"] = n_replay * params.steps_per_round
    history = _train_round(trainee, tokenizer, frontier, replay, dreams, n_replay, n_dream, params, optimizer, rng,
                           step, ctx)
    row["loss"] = history.last_loss
    row["self_model_mse"] = history.rows[-1].get("curriculum/self_model_mse") if history.rows else None
    model.eval()
    if not last:
        _decide(model, tokenizer, pools, params, rng, confidence, timing, row)
    for family, pool in pools.items():
        if not pool.finished and pool.level_done():
            row.setdefault("refilled", {})[family] = len(pool.refill())
    return row


def summarize(report: dict, params: Params) -> tuple[dict[str, Any], list[GateCheck]]:
    """Metrics and gate checks from the report (see the module docstring; the guard adds its own ``keeps_*``)."""
    reached = report["level_reached"]
    after = report["acc_by_level"]["after"]
    before = report["acc_by_level"]["before"]
    lookup = lambda table, f, lv: table.get(f, {}).get(lv, table.get(f, {}).get(str(lv)))  # noqa: E731
    metrics: dict[str, Any] = {f"level_reached_{f}": lv for f, lv in reached.items()}
    at_reached = {f: lookup(after, f, lv) for f, lv in reached.items() if lookup(after, f, lv) is not None}
    metrics.update({f"acc_reached_{f}": round(a, 4) for f, a in at_reached.items()})
    if at_reached:
        metrics["acc_reached_mean"] = round(sum(at_reached.values()) / len(at_reached), 4)
    earlier = [(f, lv) for f in reached for lv in range(1, reached[f])
               if lookup(after, f, lv) is not None and lookup(before, f, lv) is not None]
    mean = lambda table: sum(lookup(table, f, lv) for f, lv in earlier) / len(earlier)  # noqa: E731
    metrics["acc_earlier_mean"] = round(mean(after), 4) if earlier else None
    metrics["acc_earlier_before"] = round(mean(before), 4) if earlier else None
    metrics["levels_advanced"] = sum(len(r) for r in report.get("levels", {}).get("advanced_in_rounds", {}).values())
    checks = []
    for family, row in report.get("teaching", {}).items():
        v = row["verdict"]
        metrics[f"teaches_{family}_lower_bound"] = v["lower"]
        checks.append(GateCheck(f"teaches_{family}", v["lower"], v["margin"], ">", note=v["note"]))
    tool = report.get("tool")
    if tool:
        v = tool["verdict"]
        metrics.update({"tool_acc_with": round(tool["with"]["accuracy"], 4),
                        "tool_acc_without": round(tool["without"]["accuracy"], 4),
                        "tool_success_rate": round(tool["with"]["tool_success_rate"], 4),
                        "tool_with_minus_without_lower_bound": v["lower"]})
        checks.append(GateCheck("tool_with_minus_without_lower_bound", v["lower"], v["margin"], ">", note=v["note"]))
    return metrics, checks
