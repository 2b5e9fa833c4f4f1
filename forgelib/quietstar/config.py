"""The settings of a Quiet-STaR model (``QuietStarConfig``; the ``quietstar`` phase section embeds them)."""
from __future__ import annotations

import dataclasses
import math

THOUGHT_MODES = ("sample", "pause", "random")
THINK_AT = ("answer", "all")
REWARDS = ("mixed", "thought")


@dataclasses.dataclass
class QuietStarConfig:
    """Settings of a QuietStarModel (the ``quietstar`` phase section embeds them)."""

    n_thought: int = 4
    """Content tokens per thought (between the start and end tokens)."""
    n_true: int = 2
    """Teacher-forced future tokens scored after each thought."""
    n_passes: int = 2
    """Thoughts sampled per position in training (the REINFORCE baseline is their mean)."""
    mixing_hidden: int = 64
    """Width of the mixing head's hidden layer."""
    embedding_grad_scale: float = 100.0
    """How much faster the start/end/pause embeddings learn than the rest (they start untrained). The paper
    multiplies their gradient; under Adam-type updates (MuGrokfast's AdamW group) a gradient multiplier changes
    nothing but the global gradient clipping -- measured: at 100 the clipped norm was ~1200 and the rest of the
    model barely moved -- so ``quietstar_optimizer`` applies it to their learning rate instead."""
    think_at: str = "answer"
    """Where the loss counts: 'answer' (positions whose next token is labelled) or 'all' (every real token)."""
    thought_mode: str = "sample"
    """'sample' (Quiet-STaR), 'pause' (content-free pause tokens) or 'random' (uniform random tokens)."""
    temperature: float = 1.0
    """Thought sampling temperature in training."""
    inference_temperature: float = 0.0
    """Thought sampling temperature in evaluation and generation (0: greedy thoughts, deterministic)."""
    reward: str = "thought"
    """REINFORCE reward: log-likelihood of the true tokens under the 'mixed' or the post-'thought' prediction."""
    reinforce_weight: float = 1.0
    """Weight of the REINFORCE term."""
    base_loss_weight: float = 1.0
    """Weight of the base (no-thought) NLL."""
    thought_loss_weight: float = 1.0
    """Weight of the post-thought NLL of the true tokens (unmixed). Why: the mixed NLL reaches the thought branch
    only through ``w``, which starts at 0; a small model that never saw thought tokens predicts badly after
    them, so the head stays closed and nothing learns (measured at smoke: ``w`` stayed 0.000 for 120 steps).
    This term teaches the model to continue after a thought; the head then opens where thoughts help."""

    def __post_init__(self):
        for name in ("n_thought", "n_true", "n_passes", "mixing_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name, allowed in (("think_at", THINK_AT), ("thought_mode", THOUGHT_MODES), ("reward", REWARDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("embedding_grad_scale", "temperature", "inference_temperature", "reinforce_weight",
                     "base_loss_weight", "thought_loss_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.thought_mode == "sample" and self.temperature == 0 and self.reinforce_weight > 0:
            raise ValueError("REINFORCE needs sampled thoughts: temperature must be > 0")
