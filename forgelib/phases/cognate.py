"""Phase 1 — Cognate: train the tokenizer, pretrain a shared trunk, fork three specialists.

Every model trains on fresh samples streamed from the task generators (train split by prompt hash; the
budget is steps, not a pool size), batched by length, with the loss on the completion (worked steps and
answer) only, under the Phase-1 MuGrokfast preset with the learning rate and weight decay measured for
the task suite (``LM_OPTIMIZER``), warm-up and cosine decay. Three specialists of identical shapes (every
model carries the memory and halting parameters, so Phase 2 can merge them) continue from the trunk with
their own seed, data mix and runtime settings: ``reasoning`` (recursion cycles), ``memory`` (Titans memory
on, recall heavy) and ``speed`` (one cycle, early halting). The trunk is kept as the merge base. Any stage may run
TRM's recursion instead of the cycles (``recursion: trm``, see ``Stage.recursion``); the report's ``runtime`` holds
each model's settings as saved. A model trained with recursion is judged and handed on at its trained cycles only
when they beat the same weights at one cycle on its own families (``hand_on_cycles: auto``, ``cycles_decision``;
else at one cycle, the report saying why). With a pretrained ``init_from`` (``smollm2``, a ``.gguf`` file, a Llama
folder) that model is the trunk and its tokenizer the phase's (``Params.init_from``; ``parameters/smollm2.yaml``).

Gate (measured on the test split, which no model trained on): each specialist's exact-match accuracy on
its own families is above the trunk's (answer NLL breaks an exact tie only); pairwise argmax disagreement
between the specialists is above the bound; the trunk's training loss fell; no NaN (training stops on
one); with a pretrained trunk and ``max_real_text_ppl_ratio``, each specialist's perplexity on held-out real English
prose at most that many times the trunk's (``Stage.real_text_kl`` holds a specialist to its trunk's language while it
trains). The report states each family's chance level (the best constant answer).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
import random
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch

from ..data.base import LEVELS
from ..data.stream import LengthBucketedBatches, TaskStream
from ..data.tasks import FAMILIES, build_mix, format_sample
from ..data.tokenizer import ensure_special_tokens, train_tokenizer
from ..evaluate import (accuracy_by_family, answer_correctness, argmax_predictions, chance_accuracy, encode_for_eval,
                        mean_nll)
from ..jobs import own_copy, run_jobs
from ..models import CognateConfig, CognateConfigError, CognateForCausalLM
from ..models.gguf_file import is_gguf_path
from ..models.loading import cognate_from_llama, read_model_config
from ..models.real import REAL_MODELS, real_model_path
from ..optim import create_optimizer_from_phase
from ..params import require_non_negative, require_positive, short
from ..results import GateCheck, PhaseResult
from ..stats import questions_needed
from ..supervision import SupervisionSteps
from .. import paths
from ..utils.diversity import argmax_disagreement
from ..train import TrainConfig, TrainHistory, default_loss, load_checkpoint, train
from .common import STAGE_RUNTIME_KEYS, check_levels, check_optimizer

ROLES = ("reasoning", "memory", "speed")
HEARTBEAT_S = 60.0  # specialists trained side by side (no bar) print a progress line at most this often
# The metrics the pipeline summary shows for this phase (its "headline" column).
HEADLINE = ("trunk_acc_mean", "chance_mean", "reasoning_acc_own", "memory_acc_own", "speed_acc_own",
            "min_disagreement")

# The optimizer of Phase 1's language-model training: the Phase-1 MuGrokfast preset (tuned on the grokking
# task, where weight decay 1.0 was needed) with the learning rate and weight decay measured on the task suite
# (1 thread, arith levels 1-3, 240 s, fresh samples): weight decay 1.0 -> 68% exact match, 0.1 -> 83%.
LM_OPTIMIZER = {"lr": 3e-3, "weight_decay": 0.1}
# The settings of recursion "trm" only, at CognateConfig's defaults (a stage running "cycles" must leave them so).
TRM_ONLY = {"supervision_steps": 1, "grad_last_cycle_only": True, "halt_exploration_prob": 0.1}


@dataclasses.dataclass
class ModelShape:
    """Shapes shared by the trunk and every specialist (identical shapes make Phase 2's merging meaningful)."""

    hidden_size: int = 64
    """Width of the residual stream."""
    intermediate_size: int = 176
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int = 2
    """Blocks in the shared stack that the recursion reuses."""
    num_attention_heads: int = 4
    """Query heads (must divide hidden_size)."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention; must divide num_attention_heads)."""
    max_position_embeddings: int = 128
    """Longest sequence."""
    sliding_window: Optional[int] = None
    """Attention window (None: full causal attention); the memory carries what lies beyond it."""
    tie_word_embeddings: bool = True
    """Share the input embedding and the LM head."""
    memory_chunk_size: int = 16
    """Chunk length of the memory's parallel update (1 = exact token-by-token)."""

    def __post_init__(self):
        require_positive(self, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "num_key_value_heads", "max_position_embeddings", "sliding_window", "memory_chunk_size")
        # What CognateConfig would refuse only once the phase builds its model (after the session was created).
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                             f"({self.hidden_size})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                             f"({self.num_attention_heads})")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"hidden_size / num_attention_heads ({self.hidden_size // self.num_attention_heads}) "
                             "must be even (RoPE rotates pairs)")


@dataclasses.dataclass
class Stage:
    """One model's training: data mix, budget and runtime settings."""

    mix: dict[str, float] = dataclasses.field(default_factory=dict)
    """Task families and their weights in this model's training data."""
    families: list[str] = dataclasses.field(default_factory=list)
    """The families this model is judged on by the gate (specialists only)."""
    steps: int = 100
    """Optimizer steps."""
    seed: int = 0
    """Added to the phase seed (data order, initialisation)."""
    n_latent: int = 0
    """Latent updates per recursion cycle."""
    n_cycles: int = 1
    """Recursion cycles (answer-state updates)."""
    use_memory: bool = False
    """Run the Titans-style memory."""
    halt_threshold: float = 0.5
    """ACT: halting probability at which a token stops updating (training and inference alike)."""
    recursion: Literal["cycles", "trm"] = "cycles"
    """``cycles``: every cycle's loss in one backward (deep supervision), trained by ``forgelib.train``'s loop;
    ``trm``: TRM's recursion (``forgelib.models.trm``: ``n_latent`` >= 1 latent updates per answer update,
    ``supervision_steps`` steps over a detached carry), trained TRM's way when ``supervision_steps`` > 1: one
    optimizer step per supervision step (``forgelib.supervision``; ``steps`` counts optimizer steps, so the stage
    sees about steps / supervision_steps batches, each for up to supervision_steps steps; ``train.data_workers``
    does not prefetch for it). A stage switching a
    model trained with ``cycles`` to ``trm`` adds no parameter: TRM runs the same block stack, final norm, LM head
    and halting head (y starts as the token embeddings, z as zeros). The halting head is the trunk's as trained:
    every model trains it (its BCE target, "this cycle's argmax is the next token", is TRM's per step too), even a
    one-cycle trunk that never halts with it; from the first supervision step on, a token whose halting
    probability reaches ``halt_threshold`` keeps its state. The memory parameters stay as the trunk left them
    (untrained unless it used them) whatever the recursion."""
    supervision_steps: int = 1
    """``trm``: supervision steps per forward (TRM's N_sup; test time runs them all, halting per token)."""
    grad_last_cycle_only: bool = True
    """``trm``: the first n_cycles - 1 cycles of each supervision step run without gradient (TRM's deep
    recursion)."""
    halt_exploration_prob: float = 0.1
    """``trm``, training: the probability that a sequence is kept from halting before a random step in
    [2, supervision_steps] (TRM's exploration)."""
    lr: Optional[float] = None
    """Learning rate of this stage (None: the ``optimizer`` section's, or the preset's)."""
    warmup_steps: Optional[int] = None
    """Warm-up steps of this stage (None: ``train.warmup_steps``)."""
    replay: float = 0.0
    """Share of this stage's samples drawn from the trunk's mix (specialists: keeps the families outside their
    own mix from being forgotten, which a merge in Phase 2 cannot undo)."""
    levels: Optional[tuple[int, int]] = None
    """Task levels of this stage's training stream and, for a specialist, of its comparison with the trunk and its
    cycles curve (None: the phase's ``levels``). A specialist that goes one level beyond the trunk has room to beat
    it where the trunk is near its ceiling (the cpu set's trunk answers 0.95-0.99 of its families at levels 1-3)."""
    memory_gate_bias: float = 4.0
    """When this stage switches the memory on in a model trained without it, each memory's output gate starts
    with zero weights and this bias (attention share sigmoid(4) = 0.98), so the specialist starts from the
    trunk's function instead of a 12% blend of an untrained memory (measured at smoke scale: the first loss
    jumped from 0.09 to 3.7 and recall fell from 0.81 to 0.50 after 300 steps)."""

    lora_r: int = 0
    """0: the stage trains every weight (full fine-tuning); r >= 1: a LoRA adapter of rank r (peft) on every
    projection (q/k/v/o, gate/up/down) trains instead, with the memory and halting parameters, and is merged into
    the weights when the stage ends (the model handed on has the trunk's shapes, so Phase 2 merges it as any other).
    For a pretrained trunk: the frozen weights keep more of what the model knew (real text, chat)."""
    lora_alpha: Optional[float] = None
    """LoRA scale numerator (None: 2 * lora_r)."""
    real_text_kl: float = 0.0
    """Weight of a term added to every step's loss: KL(model the stage starts from || model) on windows of real
    English prose (``real_text_rows`` windows of ``max_len`` tokens from the real-text calibration split, never the
    test split the perplexity is measured on). It holds the model to the language its start model had while it learns
    the tasks, without teaching it the corpus (the target is the start model's own prediction, not the text). A
    pretrained ``init_from`` only; 0 = off."""
    real_text_rows: int = 4
    """Prose windows per step of that term."""

    def __post_init__(self):
        require_positive(self, "n_cycles", "real_text_rows")
        require_non_negative(self, "steps", "n_latent", "warmup_steps", "lr", "lora_r", "lora_alpha", "real_text_kl")
        if self.recursion != "trm":
            stray = {k: getattr(self, k) for k, v in TRM_ONLY.items() if getattr(self, k) != v}
            if stray:
                raise ValueError(f"{', '.join(f'{k}={short(v)}' for k, v in stray.items())}: setting(s) of recursion "
                                 f"'trm', but this stage's recursion is {short(self.recursion)}; set recursion: trm "
                                 f"or leave {sorted(stray)} out")
        check_levels(self, "levels")
        try:  # the model's own checks (e.g. recursion 'trm' needs n_latent >= 1), before anything trains
            CognateConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                          memory_modules=True, **self.runtime())
        except CognateConfigError as exc:
            raise ValueError(str(exc)) from None

    def runtime(self) -> dict[str, Any]:
        """The Cognate config settings of this stage (``STAGE_RUNTIME_KEYS``)."""
        return {key: getattr(self, key) for key in STAGE_RUNTIME_KEYS}


HAND_ON_CYCLES = ("auto", "trained", "one")
"""``Params.hand_on_cycles``'s choices."""


@dataclasses.dataclass
class Params:
    """Phase 1 parameters (the ``cognate`` section). Defaults are the smoke set."""

    vocab_size: int = 320
    """Byte-level BPE vocabulary size (special tokens and 256 bytes included)."""
    tokenizer_samples: int = 2000
    """Task-suite samples the tokenizer is trained on."""
    levels: tuple[int, int] = (1, 2)
    """Task difficulty levels used for training and evaluation."""
    level_weights: dict[int, float] = dataclasses.field(default_factory=dict)
    """Relative weight of each training level (missing levels weigh 1)."""
    max_len: int = 64
    """Longest training sequence in tokens (longer samples are left out and counted)."""
    with_steps: bool = True
    """Train and evaluate on worked solutions (``step;step#answer``): measured at smoke scale (levels 1-2,
    120 s) 0.82 mean exact match with steps vs 0.67 without (modular 0.41 without steps at levels 1-3)."""
    answer_only_loss: bool = True
    """Loss on the completion only (the prompt is given at test time)."""
    batch_size: int = 16
    """Sequences per optimizer step (fresh samples from the generators every step)."""
    bucket: int = 16
    """Length bucketing: a pool of this many batches is sorted by length before batching (1 = off)."""
    eval_per_family: int = 16
    """Test-split samples per family for accuracy and loss."""
    headroom_levels: Optional[tuple[int, int]] = None
    """Harder levels (lo, hi) on which the trunk's accuracy is also measured (headroom for later phases)."""
    model: ModelShape = dataclasses.field(default_factory=ModelShape)
    """Shapes shared by all four models."""
    trunk: Stage = dataclasses.field(default_factory=lambda: Stage(
        mix={f: 1.0 for f in ("arith", "multistep", "modular", "sequence", "logic", "algebra", "recall")},
        steps=600, n_latent=0, n_cycles=1))
    """The shared trunk's training."""
    reasoning: Stage = dataclasses.field(default_factory=lambda: Stage(
        mix={"multistep": 3, "algebra": 3, "arith": 1}, families=["multistep", "algebra"], steps=250, seed=1,
        n_latent=1, n_cycles=2))
    """The reasoning specialist: more recursion, multistep/algebra heavy."""
    memory: Stage = dataclasses.field(default_factory=lambda: Stage(
        mix={"recall": 4, "sequence": 1}, families=["recall"], steps=250, seed=2, n_cycles=2,
        use_memory=True))
    """The memory specialist: Titans memory on, recall heavy."""
    speed: Stage = dataclasses.field(default_factory=lambda: Stage(
        mix={"arith": 2, "logic": 2, "modular": 1}, families=["arith", "logic"], steps=250, seed=3, n_cycles=1,
        halt_threshold=0.3))
    """The speed specialist: one cycle, early halting."""
    optimizer: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(LM_OPTIMIZER))
    """Overrides of the Phase-1 MuGrokfast preset (keys: forgelib.optim.MuGrokfastConfig fields, checked with
    their types and ranges when the parameters load)."""
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        log_every=10, warmup_steps=50, schedule="cosine", min_lr_ratio=0.1))
    """Training-loop settings; ``train.steps`` is not used (each Stage has its own ``steps``)."""
    min_disagreement: float = 0.02
    """Gate: smallest allowed pairwise argmax disagreement between specialists on the test split."""
    min_accuracy_gain: float = 0.0
    """Gate: each specialist beats the trunk on its own families: the one-sided lower confidence bound of the paired
    accuracy difference (specialist − trunk, ``forgelib.stats``) must exceed this."""
    expected_gain: float = 0.05
    """Sizes that comparison: as many own-family test questions as detecting this gain needs at the ``guard``
    section's confidence with power ``power`` (``forgelib.stats.questions_needed``)."""
    power: float = 0.99
    """Power of each specialist's comparison at ``expected_gain`` (three of them per chain: at 0.9 a chain whose
    specialists truly gain ``expected_gain`` would fail one in four times)."""
    min_above_chance: float = 0.1
    """Gate: on every family of its mix, the trunk's accuracy (one-sided lower confidence bound) exceeds the family's
    chance level (the best constant answer) by more than this: the trunk learnt each family."""
    init_from: Optional[str] = None
    """Start the trunk from this checkpoint (``checkpoints/<stage>/checkpoint-N`` of an earlier run) or Cognate
    model folder instead of from scratch; it must have the configured shapes (a clear error otherwise). Or from a
    pretrained model: a real model's name (``smollm2``, ``forgelib.models.real``), a ``.gguf`` file or a Llama
    model folder. Its weights become the trunk's (``cognate_from_llama``: the same logits, with fresh memory and
    halting parameters that stay off until a stage switches them on) and its tokenizer replaces the phase's BPE
    (Agent Forge's special tokens added, their embeddings appended; its chat template frames every prompt of every
    phase, ``forgelib.data.tokenizer.prompt_frame``); ``model``, ``vocab_size`` and ``tokenizer_samples`` are then
    not used. ``trunk.steps: 0`` keeps the pretrained model as the trunk, as shipped."""
    real_text_docs: int = 2
    """With a pretrained ``init_from``: every model's perplexity on the first this many documents of the real-text test
    split (``forgelib.data.realtext``, ``make setup-text``), windows of ``max_len`` every half, in the report's
    ``real_text_perplexity`` (0 = off; not installed: the report says so)."""
    max_real_text_ppl_ratio: Optional[float] = None
    """Gate, with a pretrained trunk: each specialist's real-text perplexity at most this many times the trunk's (a
    specialist that lost the language its trunk had fails, a diverging one too); None = reported only."""

    @property
    def specialists(self) -> dict[str, Stage]:
        return {name: getattr(self, name) for name in ROLES}

    def unused(self) -> dict[str, str]:
        """The parameters this configuration does not use, each with the reason (the notebook's context table says
        so beside their values): a pretrained ``init_from`` brings its own shapes and tokenizer."""
        try:  # a real model's name counts even when it is not installed (the run says so)
            pretrained = self.init_from in REAL_MODELS or pretrained_source(self.init_from) is not None
        except (OSError, ValueError):  # a path the run will refuse, naming why
            pretrained = False
        why = "not used: the pretrained init_from brings its shapes and its tokenizer"
        return {key: why for key in ("vocab_size", "tokenizer_samples", "model")} if pretrained else {}

    hand_on_cycles: str = "auto"
    """The test-time cycles of each model trained with recursion (``n_cycles`` > 1), as it is judged and handed on:
    'auto' -- its trained count only when that beats the same weights at one cycle on its own families' test
    questions (the cycles curve: paired accuracy gain above ``cycles_min_gain`` at the ``guard`` section's
    confidence; every cycle is one more pass of the block stack per token and must earn it), else one cycle (same
    weights); 'trained' or 'one' force it (the verdict is still reported, ``cycles_decision``)."""
    cycles_min_gain: float = 0.0
    """'auto': the accuracy gain of the trained cycles over one cycle that its lower confidence bound must exceed."""

    def __post_init__(self):
        require_non_negative(self, "real_text_docs")
        if self.hand_on_cycles not in HAND_ON_CYCLES:
            raise ValueError(f"hand_on_cycles must be one of {list(HAND_ON_CYCLES)}, got {self.hand_on_cycles!r}")
        if not 0 <= self.cycles_min_gain < 1:
            raise ValueError(f"cycles_min_gain must lie in [0, 1), got {self.cycles_min_gain}")
        if self.max_real_text_ppl_ratio is not None and self.max_real_text_ppl_ratio < 1:
            raise ValueError(f"max_real_text_ppl_ratio must be >= 1 (or null), got {self.max_real_text_ppl_ratio}")
        require_positive(self, "vocab_size", "tokenizer_samples", "max_len", "batch_size", "bucket",
                         "eval_per_family", "expected_gain")
        if not 0.5 <= self.power < 1:
            raise ValueError(f"power must lie in [0.5, 1), got {self.power}")
        if not -1 < self.min_accuracy_gain < 1:  # checked here, not after every model has trained
            raise ValueError(f"min_accuracy_gain must lie in (-1, 1), got {self.min_accuracy_gain}")
        check_levels(self, "levels", "headroom_levels")
        wrong = sorted(k for k, w in self.level_weights.items() if k not in LEVELS or w < 0)
        if wrong:
            raise ValueError(f"level_weights: levels {wrong} are not levels 1..10 or weigh less than 0")
        self.optimizer = check_optimizer(self.optimizer, 1)
        if self.train.steps != TrainConfig().steps:
            raise ValueError(f"train.steps ({self.train.steps}) is not used by Phase 1; set the steps of each "
                             f"stage instead: trunk.steps, {'.steps, '.join(ROLES)}.steps")
        for name, stage in self.specialists.items():
            if stage.steps < 1:
                raise ValueError(f"{name}.steps must be >= 1, got {stage.steps}")
        if self.trunk.steps < 1 and not self.init_from:
            raise ValueError("trunk.steps is 0 but there is no init_from to take the trunk from: give the trunk "
                             "steps, or init_from (a checkpoint, a Cognate folder or a pretrained model)")
        for name, stage in [("trunk", self.trunk), *self.specialists.items()]:
            unknown = sorted(set(stage.mix) - set(FAMILIES))
            if unknown or not stage.mix:
                raise ValueError(f"{name}.mix: unknown or no families {unknown}; valid: {sorted(FAMILIES)}")
            if not 0.0 <= stage.replay < 1.0:
                raise ValueError(f"{name}.replay must lie in [0, 1), got {stage.replay}")
            if stage.real_text_kl and not self.init_from:
                raise ValueError(f"{name}.real_text_kl is {stage.real_text_kl} but the trunk is not a pretrained "
                                 f"model: the term holds a pretrained model to its language (set init_from, or "
                                 f"real_text_kl: 0)")
        lora = [name for name, stage in [("trunk", self.trunk), *self.specialists.items()] if stage.lora_r]
        if lora and self.train.checkpoint_every:
            raise ValueError(f"train.checkpoint_every is {self.train.checkpoint_every} but {', '.join(lora)} train(s) "
                             f"a LoRA adapter (lora_r): its checkpoints would hold the adapter-wrapped model, which "
                             f"init_from cannot resume; set train.checkpoint_every: 0 or lora_r: 0")
        if self.max_real_text_ppl_ratio is not None and not (self.init_from and self.real_text_docs):
            raise ValueError("max_real_text_ppl_ratio gates the real-text perplexity, measured only with a pretrained "
                             "init_from and real_text_docs >= 1")


# --- data ---------------------------------------------------------------------------------------------


def pretrained_source(init_from: Optional[str]) -> Optional[Path]:
    """The pretrained model ``init_from`` names (a real model's name, a ``.gguf`` file, a Llama model folder), else
    None (no ``init_from``, a training checkpoint or a Cognate folder)."""
    if not init_from:
        return None
    if init_from in REAL_MODELS:
        return real_model_path(init_from)
    path = paths.resolve(init_from)
    if is_gguf_path(path):
        return path
    if path.is_dir() and (path / "config.json").is_file() and read_model_config(path).get("model_type") == "llama":
        return path
    return None


def pretrained_tokenizer(source: Path, save_dir):
    """The pretrained model's tokenizer with Agent Forge's special tokens added (its own bos/eos/pad kept), saved to
    ``save_dir`` (where every later phase loads it)."""
    from ..modelio import load_tokenizer_for

    tokenizer = load_tokenizer_for(source)
    ensure_special_tokens(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def tokenizer_families(params: Params) -> list[str]:
    """The families of the tokenizer's corpus, in registration order: the chain's suite and any other family (a
    benchmark family such as ``sudoku``) a stage's mix names."""
    named = {f for stage in (params.trunk, *params.specialists.values()) for f in stage.mix}
    return [f for f in FAMILIES if FAMILIES[f].suite or f in named]


def build_tokenizer(params: Params, seed: int, save_dir):
    """Train the byte-level BPE on a task-suite corpus covering every family of the suite and every one a stage's mix
    names (train split only); with a pretrained ``init_from``, that model's tokenizer (``pretrained_tokenizer``)."""
    source = pretrained_source(params.init_from)
    if source is not None:
        return pretrained_tokenizer(source, save_dir)
    corpus = build_mix({f: 1.0 for f in tokenizer_families(params)}, params.levels, params.tokenizer_samples,
                       "train", seed)
    texts = [format_sample(s, with_answer=True, with_steps=True) for s in corpus]
    return train_tokenizer(texts, vocab_size=params.vocab_size, save_dir=save_dir)


def stage_mix(params: Params, stage: Stage) -> dict[str, float]:
    """The stage's family weights with ``stage.replay`` of the trunk's mix blended in (shares sum to 1)."""
    own, base = sum(stage.mix.values()), sum(params.trunk.mix.values())
    mix = {f: (1 - stage.replay) * w / own for f, w in stage.mix.items()}
    for f, w in params.trunk.mix.items():
        mix[f] = mix.get(f, 0.0) + stage.replay * w / base
    return mix


def stage_levels(params: Params, stage: Stage) -> tuple[int, int]:
    """The levels a stage trains (and a specialist is compared) at: its own, else the phase's."""
    return tuple(stage.levels or params.levels)


def training_batches(tokenizer, params: Params, stage: Stage, seed: int) -> LengthBucketedBatches:
    """Endless length-bucketed batches of fresh train-split samples of the stage's mix (with its replay), at the
    stage's levels."""
    stream = TaskStream(stage_mix(params, stage), stage_levels(params, stage), "train", seed,
                        level_weights=params.level_weights)
    return LengthBucketedBatches(tokenizer, stream, params.batch_size, params.max_len, with_steps=params.with_steps,
                                 answer_only_loss=params.answer_only_loss, bucket=params.bucket, seed=seed)


def phase_families(params: Params) -> list[str]:
    return sorted(set(params.trunk.mix).union(*(s.mix for s in params.specialists.values())))


def test_samples(params: Params, seed: int, levels=None):
    """The evaluation set: ``eval_per_family`` test-split samples of every family the phase uses."""
    families = phase_families(params)
    return build_mix({f: 1.0 for f in families}, levels or params.levels, params.eval_per_family * len(families),
                     "test", seed)


# --- models -------------------------------------------------------------------------------------------


def pretrained_trunk(params: Params, source: Path, tokenizer, seed: int) -> CognateForCausalLM:
    """The pretrained Llama at ``source`` as a Cognate trunk: its weights (the same logits with recursion, memory and
    halting off), the memory and halting parameters built fresh (seeded), its memory's step ``stable`` (the plain
    chunked memory diverged over prose on SmolLM2's hidden states), the trunk stage's runtime, the embeddings
    extended by the rows of the special tokens ``tokenizer`` added (their mean and spread: transformers'
    ``resize_token_embeddings``)."""
    from ..modelio import load_model

    llama = load_model(source)
    torch.manual_seed(seed)
    model = cognate_from_llama(llama, memory_modules=True, use_act=True, **params.trunk.runtime(),
                               memory_chunk_size=params.model.memory_chunk_size, memory_step="stable",
                               pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    del llama
    if len(tokenizer) != model.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    return model.train(False)


def make_trunk(params: Params, tokenizer, seed: int) -> CognateForCausalLM:
    """A fresh Cognate model with memory and halting parameters built (used or not by each stage); with a pretrained
    ``init_from``, that model (``pretrained_trunk``)."""
    source = pretrained_source(params.init_from)
    if source is not None:
        return pretrained_trunk(params, source, tokenizer, seed)
    torch.manual_seed(seed)
    shape = dataclasses.asdict(params.model)
    config = CognateConfig(vocab_size=len(tokenizer), **shape, memory_modules=True, use_act=True,
                           **params.trunk.runtime(), pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    model = CognateForCausalLM(config)
    if params.init_from:
        load_checkpoint(model, None, paths.resolve(params.init_from))
    return model


def apply_stage(model: CognateForCausalLM, stage: Stage) -> CognateForCausalLM:
    """Set a model's runtime settings (``Stage.runtime``: recursion included; no parameter changes shape or is
    added, see ``Stage.recursion`` for what a switch to ``trm`` starts from); a memory switched on starts nearly
    closed (see ``Stage.memory_gate_bias``)."""
    if stage.use_memory and not model.config.use_memory:
        with torch.no_grad():
            for attention in model.attention_modules():
                attention.memory.out_gate.weight.zero_()
                attention.memory.out_gate.bias.fill_(stage.memory_gate_bias)
    for key, value in stage.runtime().items():
        setattr(model.config, key, value)
    return model


def stage_loop(stage: Stage, batches, seed: int) -> tuple[Any, Any, Optional[SupervisionSteps]]:
    """(batches, loss hook, supervision) of the stage's training: TRM's one optimizer step per supervision step
    (``forgelib.supervision``, its halting exploration drawn from its own generator seeded with ``seed``) when the
    stage runs recursion ``trm`` with more than one supervision step; else the batches and the model's own loss."""
    if stage.recursion != "trm" or stage.supervision_steps == 1:
        return batches, default_loss, None
    supervision = SupervisionSteps(stage.supervision_steps, generator=torch.Generator().manual_seed(seed))
    return supervision.batches(batches), supervision.loss, supervision


# The parameters a LoRA stage trains in full beside its adapter: the memory (when the stage runs it) and the halting
# head, both small and both new to a pretrained trunk.
LORA_FULL_TRAINED = ("self_attn.memory.", "halt_head.")


def with_stage_lora(model: CognateForCausalLM, stage: Stage):
    """``model`` wrapped in place by peft with the stage's LoRA adapter (``Stage.lora_r``): only the adapter, the
    memory (when the stage runs it) and the halting head train. ``merge_stage_lora`` folds it back."""
    from peft import LoraConfig, get_peft_model

    from ..baking.bake import target_modules

    alpha = stage.lora_alpha if stage.lora_alpha is not None else 2 * stage.lora_r
    config = LoraConfig(r=stage.lora_r, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                        target_modules=target_modules(model))
    wrapped = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if any(part in name for part in LORA_FULL_TRAINED) and ("memory" not in name or stage.use_memory):
            param.requires_grad_(True)
    return wrapped


def merge_stage_lora(wrapped) -> CognateForCausalLM:
    """The plain model of ``with_stage_lora``'s wrapper, its adapter merged into the weights (peft
    ``merge_and_unload``: the same model object, every parameter trainable again)."""
    model = wrapped.merge_and_unload()
    model.requires_grad_(True)
    return model


def real_text_windows(tokenizer, max_len: int, rows: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless (rows, max_len) id batches of real English prose: the calibration split's documents in a seeded
    random order, each cut into consecutive windows of ``max_len`` tokens (its last, shorter part left out),
    tokenized as they are needed; once every document is used, again in a new order."""
    from ..data.realtext import load_texts
    from ..data.tokenizer import plain_ids

    texts = load_texts("calibration")
    rng, buffer = random.Random(f"real-text|{seed}"), []
    while True:
        order, found = list(range(len(texts))), False
        rng.shuffle(order)
        for i in order:
            ids = plain_ids(tokenizer, [texts[i]])[0]
            buffer += [ids[k:k + max_len] for k in range(0, len(ids) - max_len + 1, max_len)]
            found = found or len(ids) >= max_len
            while len(buffer) >= rows:
                yield torch.tensor(buffer[:rows], dtype=torch.long)
                del buffer[:rows]
        if not found:
            raise ValueError(f"no real-text calibration document has {max_len} tokens: no window to train on")


def real_text_kl_loss(loss_fn, start, windows: Iterator[torch.Tensor], weight: float):
    """``loss_fn`` plus ``weight`` · KL(start || model) over every position of the next prose window batch (``start``:
    the frozen model the stage began from); the KL is logged as ``real_text_kl``."""
    from ..evaluate import kl_divergence

    def loss(model, batch: dict):
        value, extras = loss_fn(model, batch)
        ids = next(windows).to(batch["input_ids"].device)
        with torch.no_grad():
            target = start(input_ids=ids).logits
        kl = kl_divergence(target, model(input_ids=ids).logits)
        return value + weight * kl, {**extras, "real_text_kl": float(kl.detach())}

    return loss


def frozen_copy(model):
    """A copy of ``model`` in eval mode without gradients (a teacher that training cannot move)."""
    twin = copy.deepcopy(model).eval()
    return twin.requires_grad_(False)


def train_stage(model, tokenizer, params: Params, stage: Stage, name: str, ctx, step_offset: int, *,
                alone: bool = True, start=None):
    """Train ``model`` on the stage's mix with the Phase-1 MuGrokfast preset; returns the history.

    ``alone=False``: the stage trains beside others (``train_specialists``): no bar and nothing sent to the tracker
    while it runs (its rows are in the history; ``log_history`` sends them afterwards, in step order).
    ``start``: the model the stage's ``real_text_kl`` holds it to (a specialist's trunk; default ``model`` as it is
    before training)."""
    seed = ctx.seed + stage.seed
    torch.manual_seed(seed)  # nothing in the step draws from it; kept so that later draws see the same state
    batches = training_batches(tokenizer, params, stage, seed)
    teacher = frozen_copy(start if start is not None else model) if stage.real_text_kl else None
    overrides = {**params.optimizer, **({"lr": stage.lr} if stage.lr is not None else {})}
    config = dataclasses.replace(params.train, steps=stage.steps)
    if stage.warmup_steps is not None:
        config = dataclasses.replace(config, warmup_steps=stage.warmup_steps)
    checkpoints = ctx.dir / "checkpoints" / name if config.checkpoint_every else None
    source, loss_fn, supervision = stage_loop(stage, batches, seed)
    if teacher is not None:
        loss_fn = real_text_kl_loss(loss_fn, teacher, real_text_windows(tokenizer, params.max_len,
                                                                        stage.real_text_rows, seed), stage.real_text_kl)
    trained = with_stage_lora(model, stage) if stage.lora_r else model
    optimizer = create_optimizer_from_phase(trained, phase_num=1, **overrides)
    history = train(trained, source, optimizer, config, loss_fn=loss_fn, tracker=ctx.tracker if alone else None,
                    device=ctx.device, desc=name, quiet=ctx.quiet or not alone, step_offset=step_offset,
                    checkpoint_dir=checkpoints, heartbeat_s=None if alone or ctx.quiet else HEARTBEAT_S)
    if stage.lora_r:
        merge_stage_lora(trained)  # in place: ``model`` holds the merged weights
    history.data = dataclasses.asdict(batches.stats) | {"padding_fraction": batches.stats.padding_fraction}
    if supervision is not None:  # batches trained, each for up to supervision_steps optimizer steps
        history.data["supervision_episodes"] = supervision.episodes
    if alone:
        ctx.log({f"{name}/{k}": v for k, v in history.data.items()}, step=step_offset + stage.steps)
    return history


def log_history(ctx, name: str, history, step_offset: int, steps: int) -> None:
    """What ``train_stage(alone=False)`` kept back: the training rows and the data counts, to the tracker."""
    for row in history.rows:
        ctx.log({k: v for k, v in row.items() if k != "step"}, step=step_offset + row["step"])
    ctx.log({f"{name}/{k}": v for k, v in history.data.items()}, step=step_offset + steps)


def train_specialists(trunk, tokenizer, params: Params, ctx, offset: int) -> tuple[dict, dict]:
    """The three specialists, each a copy of the trained trunk with its stage's runtime, trained on its stage's mix
    (``run.workers`` of them side by side: each owns its model, optimizer and seeded data, so the weights are those
    of training them one after the other). Returns (models, histories) in ``ROLES`` order."""
    workers = ctx.workers
    models, offsets = {}, {}
    for name in ROLES:
        models[name] = apply_stage(copy.deepcopy(trunk), params.specialists[name])
        offsets[name], offset = offset, offset + params.specialists[name].steps
    alone = workers <= 1
    jobs = [functools.partial(train_stage, models[n], own_copy(tokenizer, workers), params, params.specialists[n], n,
                              ctx, offsets[n], alone=alone, start=trunk) for n in ROLES]
    if not alone and not ctx.quiet:
        print(f"training the specialists {', '.join(ROLES)}: {workers} at a time (run.workers)")
    histories = dict(zip(ROLES, run_jobs(jobs, workers)))
    for name in ROLES if not alone else ():
        log_history(ctx, name, histories[name], offsets[name], params.specialists[name].steps)
        if not ctx.quiet:
            h = histories[name]
            print(f"  {name}: {params.specialists[name].steps} steps in {h.seconds:.1f} s, loss {h.first_loss:.3f} "
                  f"-> {h.last_loss:.3f}")
    return models, histories


# --- evaluation ---------------------------------------------------------------------------------------


def answer_nll_by_family(model, tokenizer, samples, max_len: int, with_steps: bool = False) -> dict[str, float]:
    """Mean completion-token NLL per family (teacher-forced, test split)."""
    out = {}
    for family in sorted({s.family for s in samples}):
        subset = [s for s in samples if s.family == family]
        out[family] = mean_nll(model, tokenizer, subset, max_len=max_len, answer_only=True, with_steps=with_steps)
    return out


@torch.no_grad()
def act_statistics(model, encoded) -> dict[str, Any]:
    """Per-token ACT cycles (inference mode) and memory gate entropy on real positions of ``encoded``."""
    model.eval()
    device = next(model.parameters()).device
    out = model(input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device),
                logits_to_keep=1)  # no (N, T, vocab) logits: a real vocabulary's would take gigabytes
    real = encoded["attention_mask"].bool().to(device)
    cycles = out.act_cycles[real].float().cpu()  # (N_real,)
    stats = {"mean_cycles": float(cycles.mean()), "cycles": cycles.tolist()}
    entropy = getattr(out, "gate_entropy", None)
    stats["gate_entropy"] = float(entropy) if entropy is not None else float("nan")
    return stats


def _model_measures(model, tokenizer, samples, encoded, params: Params) -> dict[str, Any]:
    max_len = params.max_len + 16
    return {"accuracy": accuracy_by_family(model, tokenizer, samples, batch_size=64, with_steps=params.with_steps),
            "answer_nll": answer_nll_by_family(model, tokenizer, samples, max_len, params.with_steps),
            **act_statistics(model, encoded)}


def evaluate_models(models: dict, tokenizer, params: Params, seed: int, workers: int = 1) -> dict[str, Any]:
    """Accuracy and answer loss per family, ACT cycles and gate entropy for every model (test split; ``workers``
    models at a time); the chance level per family (the best constant answer); the trunk's accuracy at the headroom
    levels; each model's runtime settings (``runtime``: ``STAGE_RUNTIME_KEYS`` as its config holds them)."""
    samples = test_samples(params, seed)
    max_len = params.max_len + 16
    encoded = encode_for_eval(tokenizer, samples, max_len, with_steps=params.with_steps)
    reference = build_mix({f: 1.0 for f in phase_families(params)}, params.levels, 300 * len(phase_families(params)),
                          "train", seed)
    report: dict[str, Any] = {"n_test": len(samples), "levels": list(params.levels),
                              "chance": chance_accuracy(samples, reference), "models": {},
                              "runtime": {name: {k: getattr(model.config, k) for k in STAGE_RUNTIME_KEYS}
                                          for name, model in models.items()}}
    jobs = [functools.partial(_model_measures, model, own_copy(tokenizer, workers), samples, encoded, params)
            for model in models.values()]
    report["models"] = dict(zip(models, run_jobs(jobs, workers)))
    if params.headroom_levels:
        hard = test_samples(params, seed + 1, levels=tuple(params.headroom_levels))
        report["headroom"] = {"levels": list(params.headroom_levels), "trunk_accuracy": accuracy_by_family(
            models["trunk"], tokenizer, hard, batch_size=64, with_steps=params.with_steps)}
    predictions = dict(zip(ROLES, run_jobs([functools.partial(argmax_predictions, models[name], encoded, 32)
                                            for name in ROLES], workers)))  # each model once, not once per pair
    real = encoded["attention_mask"].bool()
    report["disagreement"] = {f"{a}-{b}": argmax_disagreement(predictions[a], predictions[b], real)
                              for a, b in itertools.combinations(ROLES, 2)}
    return report


def specialist_comparisons(models: dict, tokenizer, params: Params, seed: int, guard,
                           workers: int = 1) -> dict[str, Any]:
    """Per specialist: the trunk and the specialist on the same own-family test questions, the superiority verdict
    (``forgelib.stats.superior``). As many questions as the verdict needs for ``power``: a pilot of a quarter of
    what detecting ``expected_gain`` needs at the ``guard`` section's assumed discordance, then rounds sized at the
    observed discordance and at the measured gain over ``min_accuracy_gain`` where it is larger than
    ``expected_gain`` (a clear gain needs no more questions; a small one is sized at ``expected_gain``), capped by
    ``guard.max_questions`` per family. (Measured at smoke: reasoning +0.1 asked 2,600 questions sized at 0.03
    alone; the pilot decides it.)"""
    from ..stats import compare, superior
    from ..suite import questions

    out = {}
    for name in ROLES:
        fams = params.specialists[name].families or list(params.specialists[name].mix)
        cap = guard.max_questions * len(fams)
        levels = stage_levels(params, params.specialists[name])
        per_family = {f: questions(f, levels, guard.max_questions, seed + 101) for f in fams}
        trunk, own, asked = [], [], 0
        n = math.ceil(questions_needed(params.expected_gain, guard.confidence, params.power, guard.discordance) / 4)
        for _ in range(3):
            want = min(cap, n)
            k = math.ceil(want / len(fams))
            new = [q for f in fams for q in per_family[f][asked:k]]
            if new:
                got = run_jobs([functools.partial(answer_correctness, models[m], own_copy(tokenizer, workers), new,
                                                  batch_size=128, with_steps=params.with_steps)
                                for m in ("trunk", name)], workers)
                trunk, own = trunk + got[0], own + got[1]
            asked = max(asked, k)
            c = compare(trunk, own)
            n = questions_needed(max(params.expected_gain, c.diff - params.min_accuracy_gain), guard.confidence,
                                 params.power, c.sizing_discordance)
        out[name] = {**superior(f"{name}_vs_trunk", trunk, own, params.min_accuracy_gain, guard.confidence,
                                params.power).as_row(), "levels": list(levels)}
    return out


def real_text_perplexities(models: dict, tokenizer, texts: list[str], max_len: int) -> dict[str, float | None]:
    """Each model's strided perplexity on ``texts`` (windows of ``max_len`` every ``max_len // 2``); None where it is
    not finite (a diverging model)."""
    from ..evaluate import strided_perplexity

    out = {}
    for name, model in models.items():
        value = strided_perplexity(model, tokenizer, texts, max_len=max_len, stride=max(1, max_len // 2), batch_size=4)
        out[name] = round(value, 3) if math.isfinite(value) else None
    return out


def real_text_report(models: dict, tokenizer, params: Params) -> dict[str, Any] | None:
    """``real_text_perplexities`` on the real-text test split when the trunk is a pretrained model (None otherwise, or
    ``{"unavailable": why}`` when the corpus is not installed)."""
    if not params.real_text_docs or pretrained_source(params.init_from) is None:
        return None
    from ..data.realtext import RealTextUnavailableError, load_texts

    try:
        texts = load_texts("test")[:params.real_text_docs]
    except RealTextUnavailableError as err:
        return {"unavailable": str(err)}
    return {"documents": len(texts), "window": params.max_len,
            "perplexity": real_text_perplexities(models, tokenizer, texts, params.max_len)}


def cycles_curve(models: dict, tokenizer, params: Params, seed: int, guard, workers: int = 1) -> dict[str, Any]:
    """Test-time cycles of every model trained with recursion (``n_cycles`` > 1): its own families' accuracy at 1
    cycle, at its trained count and at twice it, on the same ``eval_per_family`` test questions per family (the
    first of the guard's pool), with the paired gain of the trained count over 1 cycle and of twice it over the
    trained count (``forgelib.stats.compare``; lower bounds at the guard's confidence). Reported whatever the sign:
    it says whether the recursion earns its cycles (``forge bench cognate`` measures the one-layer curve)."""
    from ..stats import compare, lower_bound
    from ..suite import questions

    out = {}
    for name, model in models.items():
        trained = int(getattr(model.config, "n_cycles", 1))
        if trained <= 1:
            continue
        stage = params.specialists.get(name, params.trunk)
        fams = stage.families or list(stage.mix)
        test = [q for f in fams for q in questions(f, stage_levels(params, stage), params.eval_per_family, seed + 103)]
        counts = sorted({1, trained, 2 * trained})
        copies = []
        for c in counts:
            twin = copy.deepcopy(model)
            twin.config.n_cycles = c
            copies.append(twin)
        got = run_jobs([functools.partial(answer_correctness, twin, own_copy(tokenizer, workers), test, batch_size=128,
                                          with_steps=params.with_steps) for twin in copies], workers)
        correct = dict(zip(counts, got))
        gains = {}
        for a, b in ((1, trained), (trained, 2 * trained)):
            c = compare(correct[a], correct[b])
            gains[f"{b}_minus_{a}"] = {"diff": round(c.diff, 4),
                                       "lower_bound": round(lower_bound(c, guard.confidence), 4), "n": c.n}
        out[name] = {"trained_cycles": trained, "families": fams, "n": len(test),
                     "accuracy": {str(c): round(sum(v) / len(v), 4) for c, v in correct.items()}, "gains": gains,
                     "correct": {str(c): [int(x) for x in v] for c, v in correct.items()}}
    return out


def cycles_decision(curve: dict, params: Params, guard) -> dict[str, dict[str, Any]]:
    """At how many cycles each model of the cycles curve is judged and handed on (``Params.hand_on_cycles``): under
    'auto' its trained count when the paired accuracy gain over the same weights at one cycle, on the curve's
    questions, has its lower confidence bound above ``cycles_min_gain`` (``forgelib.stats.superior``), else one
    cycle; 'trained' / 'one' force it (the verdict is still reported). Per model: {trained_cycles, cycles, rule,
    verdict, reason}."""
    from ..stats import superior

    out = {}
    for name, c in curve.items():
        trained = c["trained_cycles"]
        verdict = superior(f"{name}_cycles", c["correct"]["1"], c["correct"][str(trained)], params.cycles_min_gain,
                           guard.confidence, guard.power)
        if params.hand_on_cycles == "auto":
            keep = verdict.passed
            rule = (f"hand_on_cycles: auto -- keeps its trained cycles when their paired accuracy gain over one cycle "
                    f"has its {guard.confidence:g} lower bound above {params.cycles_min_gain:g}")
        else:
            keep, rule = params.hand_on_cycles == "trained", f"hand_on_cycles: {params.hand_on_cycles} (set)"
        reason = (f"at {trained} cycles {verdict.after:.3f}, at 1 cycle {verdict.before:.3f} on the same {verdict.n} "
                  f"test questions of {'+'.join(c['families'])}: gain {verdict.diff:+.3f}, lower bound "
                  f"{verdict.lower:+.3f}")
        out[name] = {"trained_cycles": trained, "cycles": trained if keep else 1, "rule": rule,
                     "verdict": verdict.as_row(), "reason": reason}
    return out


def own_family_score(report: dict, name: str, families: list[str], key: str) -> float:
    values = [report["models"][name][key][f] for f in families]
    return sum(values) / len(values)


TIE_BREAK = 1e-3
"""Weight of the NLL tie-breaker in the specialist gate: smaller than one test sample's share of accuracy."""


def specialist_gain(report: dict, name: str, families: list[str]) -> dict[str, float]:
    """Accuracy gain of a specialist over the trunk on ``families``, its NLL gain, and the gate's value:
    accuracy gain + TIE_BREAK · tanh(NLL gain), so accuracy decides and the NLL only breaks an exact tie."""
    acc = own_family_score(report, name, families, "accuracy") - own_family_score(report, "trunk", families, "accuracy")
    nll = own_family_score(report, "trunk", families, "answer_nll") - own_family_score(report, name, families,
                                                                                       "answer_nll")
    return {"accuracy_gain": acc, "nll_gain": nll, "gate_value": acc + TIE_BREAK * math.tanh(nll)}


def gate_checks(report: dict, params: Params, guard) -> list[GateCheck]:
    """The phase gate (see the module docstring)."""
    from ..stats import proportion_bounds

    checks = []
    for name, v in report["specialists_vs_trunk"].items():
        checks.append(GateCheck(f"{name}_minus_trunk_own_families_lower_bound", v["lower"], params.min_accuracy_gain,
                                ">", note=v["note"]))
    n = report["n_test"] // max(1, len(report["models"]["trunk"]["accuracy"]))
    for family, acc in report["models"]["trunk"]["accuracy"].items():  # a trunk the phase taught learnt each family
        if params.trunk.steps and family in params.trunk.mix and params.trunk.mix[family] > 0:
            lower = proportion_bounds(round(acc * n), n, guard.confidence)[0]
            checks.append(GateCheck(f"trunk_{family}_lower_bound_minus_chance",
                                    round(lower - report["chance"].get(family, 0.0), 4), params.min_above_chance, ">"))
    checks.append(GateCheck("min_disagreement", min(report["disagreement"].values()), params.min_disagreement, ">="))
    return checks + real_text_checks(report, params)


def real_text_checks(report: dict, params: Params) -> list[GateCheck]:
    """``max_real_text_ppl_ratio``: each specialist's real-text perplexity over the trunk's, at most the bound (a
    diverging model's ratio is NaN and fails; a corpus that is not installed fails every check, saying so)."""
    if params.max_real_text_ppl_ratio is None:
        return []
    measured = report.get("real_text_perplexity") or {}
    ppl = measured.get("perplexity") or {}
    note = measured.get("unavailable", "") or ("" if ppl else "real-text perplexity not measured")
    checks = []
    for name in ROLES:
        mine, trunk = ppl.get(name), ppl.get("trunk")
        ratio = round(mine / trunk, 4) if mine is not None and trunk else None
        checks.append(GateCheck(f"{name}_real_text_ppl_ratio", ratio, params.max_real_text_ppl_ratio, "<=",
                                note=note or ("" if ratio is not None else "perplexity not finite")))
    return checks


def headline(report: dict, params: Params, histories: dict) -> dict[str, float]:
    """The few numbers the pipeline table shows."""
    trained = params.trunk.steps > 0  # a pretrained trunk kept as shipped has no training numbers
    metrics: dict[str, float] = ({"trunk_loss_first": round(histories["trunk"].first_loss, 4),
                                  "trunk_loss_last": round(histories["trunk"].last_loss, 4)} if trained else {})
    metrics["trunk_acc_mean"] = round(own_family_score(report, "trunk", sorted(params.trunk.mix), "accuracy"), 4)
    metrics["chance_mean"] = round(sum(report["chance"].values()) / len(report["chance"]), 4)
    for name in ROLES:
        fams = list(params.specialists[name].families) or list(params.specialists[name].mix)
        metrics[f"{name}_acc_own"] = round(own_family_score(report, name, fams, "accuracy"), 4)
        metrics[f"trunk_acc_{name}_families"] = round(own_family_score(report, "trunk", fams, "accuracy"), 4)
    if "headroom" in report:
        values = list(report["headroom"]["trunk_accuracy"].values())
        metrics["trunk_acc_headroom"] = round(sum(values) / len(values), 4)
    for name, curve in report.get("cycles_curve", {}).items():  # the trained cycles against one, own families
        gain = curve["gains"][f"{curve['trained_cycles']}_minus_1"]
        metrics[f"{name}_cycles_gain"], metrics[f"{name}_cycles_gain_lower_bound"] = gain["diff"], gain["lower_bound"]
    for name, chosen in report.get("cycles_decision", {}).items():
        metrics[f"{name}_handed_on_cycles"] = chosen["cycles"]
    metrics["reasoning_mean_cycles"] = round(report["models"]["reasoning"]["mean_cycles"], 3)
    metrics["memory_gate_entropy"] = round(report["models"]["memory"]["gate_entropy"], 4)
    metrics["min_disagreement"] = round(min(report["disagreement"].values()), 4)
    ppl = (report.get("real_text_perplexity") or {}).get("perplexity") or {}
    for name, value in ppl.items():  # a pretrained trunk: the language each model kept (None: not finite)
        metrics[f"{name}_real_text_ppl"] = value
    if trained:
        metrics["trunk_tokens_per_s"] = round(histories["trunk"].tokens_per_s, 1)
        metrics["trunk_padding_fraction"] = round(histories["trunk"].data.get("padding_fraction", float("nan")), 4)
    return metrics


# --- the phase ----------------------------------------------------------------------------------------


def run(params: Params, ctx) -> PhaseResult:
    """Phase 1 (see the module docstring)."""
    tokenizer = build_tokenizer(params, ctx.seed, ctx.path("tokenizer"))
    ctx.register("tokenizer", ctx.dir / "tokenizer", metadata={"vocab_size": len(tokenizer)})
    trunk = make_trunk(params, tokenizer, ctx.seed)
    ctx.log({"params": sum(p.numel() for p in trunk.parameters())}, step=0)
    histories = {"trunk": train_stage(trunk, tokenizer, params, params.trunk, "trunk", ctx, 0)
                 if params.trunk.steps else TrainHistory()}  # 0 steps: the pretrained trunk as shipped
    specialists, trained = train_specialists(trunk, tokenizer, params, ctx, params.trunk.steps)
    models, histories = {"trunk": trunk, **specialists}, {**histories, **trained}
    workers, guard = ctx.workers, ctx.guard_params
    curve = cycles_curve(models, tokenizer, params, ctx.seed + 7, guard, workers)
    decision = cycles_decision(curve, params, guard)
    for name, chosen in decision.items():  # judged and handed on at the cycles that earned their cost
        models[name].config.n_cycles = chosen["cycles"]
        if not ctx.quiet:
            print(f"{name}: handed on at {chosen['cycles']} cycle(s), trained at {chosen['trained_cycles']}: "
                  f"{chosen['reason']}")
    report = evaluate_models(models, tokenizer, params, ctx.seed + 7, workers)
    report["histories"] = {k: {"first_loss": h.first_loss, "last_loss": h.last_loss, "seconds": h.seconds,
                               "tokens_per_s": h.tokens_per_s, **h.data} for k, h in histories.items()}
    report["specialist_gain"] = {name: specialist_gain(report, name, params.specialists[name].families
                                                       or list(params.specialists[name].mix)) for name in ROLES}
    report["specialists_vs_trunk"] = specialist_comparisons(models, tokenizer, params, ctx.seed + 7, guard, workers)
    report["cycles_curve"], report["cycles_decision"] = curve, decision
    real_text = real_text_report(models, tokenizer, params)
    if real_text is not None:
        report["real_text_perplexity"] = real_text
    ctx.write_report(report)
    for name, model in models.items():
        ctx.save_model(name, model, tokenizer, metadata={"role": name, "architecture": "cognate"})
    ctx.result.suite = {f: list(params.levels) for f, w in sorted(params.trunk.mix.items()) if w > 0}
    ctx.result.metrics.update(headline(report, params, histories))
    ctx.result.gate.extend(gate_checks(report, params, guard))
    return ctx.result


def validate_output(result: PhaseResult, ctx) -> None:
    """Every model and the tokenizer must have been handed on."""
    missing = [r for r in ("tokenizer", "trunk", *ROLES) if r not in result.models]
    if missing:
        raise ValueError(f"phase 1 did not hand on {missing}")
    for key, value in result.metrics.items():
        if isinstance(value, float) and math.isnan(value) and key != "memory_gate_entropy":
            raise ValueError(f"phase 1 metric {key} is NaN")
