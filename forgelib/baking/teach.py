"""Prompt teaching: make a model that has never seen an instruction respond to the prompt library.

The pipeline's models were trained on bare questions only; measured on the Phase-5 model of the cpu set, a
prompt before the question changes nothing useful (few-shot demonstrations there: accuracy 0.88 → 0.00, tool
use 0 → 0–19 %). A prompt that changes nothing cannot be baked, so Phase 6 first teaches what its prompts mean —
the step instruction tuning gave the models of the Prompt Baking paper: supervised training (answer tokens) on
a stream of fresh train-split questions where each question gets, with equal chance, no prompt (its plain
worked solution: the unprompted behaviour is kept), one of the prompts, or all of them (both styles at once, so
sequentially baked prompts compose). ``teach_steps: 0`` skips it (a model that already follows the prompts).
"""
from __future__ import annotations

import itertools
import random
from typing import Any, Iterator, Sequence

import torch

from ..data.base import Sample
from ..data.tasks import generate
from ..data.tokenizer import encode_samples
from .library import BakePrompt, styled


def prompt_subsets(prompts: Sequence[BakePrompt]) -> list[tuple[BakePrompt, ...]]:
    """No prompt, each prompt alone, and all of them together (in library order)."""
    subsets = [()] + [(p,) for p in prompts]
    return subsets + ([tuple(prompts)] if len(prompts) > 1 else [])


def teaching_samples(prompts: Sequence[BakePrompt], families: Sequence[str], levels: Sequence[int], n: int,
                     rng: random.Random, split: str = "train", replay: Sequence[str] = ()) -> list[Sample]:
    """``n`` fresh questions of ``families`` × ``levels``, each styled under a random prompt subset; questions of
    the ``replay`` families (drawn as often as one prompted family) never get a prompt: their plain worked
    solutions keep what the prompts should not touch."""
    subsets = prompt_subsets(prompts)
    pool = list(families) + list(replay)
    out = []
    for _ in range(n):
        family = rng.choice(pool)
        sample = generate(family, rng.choice(list(levels)), 1, split, rng.randrange(1 << 30))[0]
        out.append(sample if family not in families else styled(sample, rng.choice(subsets)))
    return out


def teaching_batches(tokenizer, prompts: Sequence[BakePrompt], families: Sequence[str], levels: Sequence[int],
                     batch_size: int, max_len: int, seed: int,
                     replay: Sequence[str] = ()) -> Iterator[dict[str, torch.Tensor]]:
    """Endless answer-only-loss batches of ``teaching_samples`` (worked solutions; too long ones left out)."""
    rng = random.Random(seed)
    for _ in itertools.count():
        enc = encode_samples(tokenizer, teaching_samples(prompts, families, levels, batch_size, rng, replay=replay),
                             max_len,
                             answer_only_loss=True, with_steps=True, drop_long=True)
        width = int(enc["attention_mask"].sum(1).max())
        yield {k: v[:, :width] for k, v in enc.items()}


def teach_prompts(model: torch.nn.Module, tokenizer, prompts: Sequence[BakePrompt], families: Sequence[str],
                  levels: Sequence[int], steps: int, batch_size: int = 16, max_len: int = 128, seed: int = 0,
                  optimizer: dict[str, Any] | None = None, tracker: Any = None, device: str = "cpu",
                  replay: Sequence[str] = ()):
    """Train ``model`` (all its weights; BitLinear by straight-through) ``steps`` steps on prompted and
    unprompted questions of ``families`` and unprompted ones of the ``replay`` families (module docstring).
    Returns the TrainHistory."""
    from ..optim import create_optimizer_from_phase
    from ..quant.bitnet import BitLinear
    from ..train import TrainConfig, train

    ternary = any(isinstance(m, BitLinear) for m in model.modules())
    opt = create_optimizer_from_phase(model, phase_num=6, **{"lr": 1e-3, "ste_mode": ternary, **(optimizer or {})})
    batches = teaching_batches(tokenizer, prompts, families, levels, batch_size, max_len, seed, replay)
    return train(model, batches, opt, TrainConfig(steps=steps, log_every=max(1, steps // 4)), tracker=tracker,
                 device=device, desc="teach", quiet=True)
