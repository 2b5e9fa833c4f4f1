"""What several phases share: the data and scoring settings of a phase that trains and scores a model on task
families (``TaskData``; Phases 3 and 4), with its batches, test set, scorer and chance levels; and the checks of
settings several phases' parameters hold (level ranges, optimizer overrides, runtime switches). Phase modules
import from here, never from each other."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Optional

from ..data.base import LEVELS
from ..data.stream import LengthBucketedBatches, TaskStream
from ..data.tasks import build_mix
from ..evaluate import answer_correctness, chance_accuracy, family_accuracy, mean_nll, sample_nll
from ..optim import MuGrokfastConfig, OptimConfigError, preset_config
from ..params import check_fields


@dataclasses.dataclass
class TaskData:
    """The data and scoring settings the functions below read (a phase's ``Params`` has the same fields and may be
    passed as it is; ``Params.data()`` gives this form)."""

    mix: dict[str, float]
    levels: tuple[int, int]
    with_steps: bool = True
    max_len: int = 96
    batch_size: int = 16
    bucket: int = 16
    test_per_family: int | None = None
    margin: float = 0.10
    """The margin a test set sized by the rule is sized for (``test_samples``)."""


def training_batches(tokenizer, params: TaskData, seed: int, suite: dict | None = None,
                     replay: float = 0.0) -> LengthBucketedBatches:
    """Endless batches of ``mix`` at ``levels``, with ``replay`` of every family of ``suite`` at its levels."""
    from ..suite import replay_mix

    mix, family_levels = replay_mix(params.mix, params.levels, suite, replay) if suite and replay else \
        (params.mix, None)
    stream = TaskStream(mix, params.levels, "train", seed, family_levels=family_levels)
    return LengthBucketedBatches(tokenizer, stream, params.batch_size, params.max_len, with_steps=params.with_steps,
                                 answer_only_loss=True, bucket=params.bucket, seed=seed)


def test_samples(params: TaskData, seed: int, per_family: int | None = None, margin: float | None = None,
                 guard=None) -> list:
    """Test-split samples of the families of ``mix``: ``per_family`` (or ``params.test_per_family``) each, or as
    many as ``margin`` needs under the ``guard`` section's rule (``GuardParams.needed``), spread over them."""
    from ..suite import GuardParams

    families = sorted(f for f, w in params.mix.items() if w > 0)
    per = per_family or params.test_per_family
    if per is None:
        per = math.ceil((guard or GuardParams()).needed(margin or params.margin) / len(families))
    return build_mix({f: 1.0 for f in families}, params.levels, per * len(families), "test", seed)


def score(model, tokenizer, samples, params: TaskData) -> dict[str, Any]:
    """Accuracy (greedy worked solution, answer checked), per family, the answer-token NLL, and per sample the
    correctness and the mean answer NLL (for paired comparisons)."""
    correct = answer_correctness(model, tokenizer, samples, batch_size=64, with_steps=params.with_steps)
    per_sample = sample_nll(model, tokenizer, samples, batch_size=64, max_len=params.max_len,
                            with_steps=params.with_steps)
    nll = mean_nll(model, tokenizer, samples, batch_size=64, max_len=params.max_len, answer_only=True,
                   with_steps=params.with_steps)
    return {"accuracy": sum(correct) / len(correct), "answer_nll": nll,
            "per_family": family_accuracy(samples, correct), "correct": [int(c) for c in correct],
            "sample_nll": per_sample}


def chance_levels(params: TaskData, samples, seed: int) -> dict[str, Any]:
    families = sorted(f for f, w in params.mix.items() if w > 0)
    reference = build_mix({f: 1.0 for f in families}, params.levels, 300 * len(families), "train", seed)
    per_family = chance_accuracy(samples, reference)
    return {"per_family": per_family, "overall": sum(per_family[s.family] for s in samples) / len(samples)}


# --- checks of shared settings (called from the phases' ``Params.__post_init__``) --------------------------------


def check_levels(obj: Any, *names: str) -> None:
    """ValueError naming the first of ``obj``'s level ranges ``names`` (``(lowest, highest)``, None = unset) that
    the task families do not have (``forgelib.data.base.LEVELS``, 1..10) or that runs backwards."""
    lo_limit, hi_limit = LEVELS[0], LEVELS[-1]
    for name in names:
        value = getattr(obj, name)
        if value is not None and not lo_limit <= value[0] <= value[1] <= hi_limit:
            raise ValueError(f"{name} must be (lowest, highest) with {lo_limit} <= lowest <= highest <= {hi_limit} "
                             f"(the levels the task families have), got {tuple(value)}")


def check_optimizer(overrides: dict, phase_num: int, name: str = "optimizer") -> dict:
    """The MuGrokfast overrides ``overrides`` of phase ``phase_num``'s preset, keys and types checked
    (``forgelib.optim.MuGrokfastConfig``) and the resulting settings' ranges; ValueError naming ``name``."""
    checked = check_fields(MuGrokfastConfig, overrides, name)
    try:
        preset_config(phase_num, **checked)
    except OptimConfigError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return checked


@dataclasses.dataclass
class RuntimeSettings:
    """The Cognate config switches a phase may lay over a model without touching a weight (``runtime`` of Phases 2
    and 3): the allowed keys of those mappings and their types."""

    n_latent: int = 0
    n_cycles: int = 1
    use_memory: bool = False
    use_act: bool = True
    halt_threshold: float = 0.5
    memory_chunk_size: int = 16
    sliding_window: Optional[int] = None
    cycle_loss_weighting: Literal["linear", "uniform", "last"] = "linear"
    use_cache: bool = True
    track_qk_logits: bool = True
    recursion: Literal["cycles", "trm"] = "cycles"
    supervision_steps: int = 1
    grad_last_cycle_only: bool = True
    halt_exploration_prob: float = 0.1


# The Cognate config settings of a Phase-1 stage (``cognate.Stage.runtime``): what makes each Phase-1 model what it
# is beyond its weights (Phase 2 scores an unmerged parent with the ones in which it differs from the trunk).
STAGE_RUNTIME_KEYS = ("n_latent", "n_cycles", "use_memory", "halt_threshold", "recursion", "supervision_steps",
                      "grad_last_cycle_only", "halt_exploration_prob")


def check_runtime(settings: dict, name: str = "runtime") -> dict:
    """``settings`` (a ``runtime`` mapping) with its keys and types checked against :class:`RuntimeSettings` and
    their ranges; ValueError naming ``name`` and the key."""
    checked = check_fields(RuntimeSettings, settings, name)
    bounds = {"n_cycles": 1, "n_latent": 0, "memory_chunk_size": 1, "sliding_window": 1, "supervision_steps": 1}
    for key, low in bounds.items():
        if checked.get(key) is not None and checked[key] < low:
            raise ValueError(f"{name}.{key} must be >= {low}, got {checked[key]}")
    if "halt_threshold" in checked and not 0 < checked["halt_threshold"] <= 1:
        raise ValueError(f"{name}.halt_threshold must lie in (0, 1], got {checked['halt_threshold']}")
    if "halt_exploration_prob" in checked and not 0 <= checked["halt_exploration_prob"] <= 1:
        raise ValueError(f"{name}.halt_exploration_prob must lie in [0, 1], got {checked['halt_exploration_prob']}")
    return checked


__all__ = ["RuntimeSettings", "STAGE_RUNTIME_KEYS", "TaskData", "chance_levels", "check_levels", "check_optimizer",
           "check_runtime", "score", "test_samples", "training_batches"]
