"""Prompt teaching: make a model that has never seen an instruction respond to the prompt library.

The pipeline's models were trained on bare questions only; measured on the Phase-5 model of the cpu set, a
prompt before the question changes nothing useful (few-shot demonstrations there: accuracy 0.88 → 0.00, tool
use 0 → 0–19 %). A prompt that changes nothing cannot be baked, so Phase 6 first teaches what its prompts mean —
the step instruction tuning gave the models of the Prompt Baking paper: supervised training (answer tokens) on
a stream of fresh train-split questions where each question gets, with equal chance, no prompt (its plain
worked solution: the unprompted behaviour is kept), one of the prompts, or all of them (both styles at once, so
sequentially baked prompts compose). A stated share of the questions (``replay_share``) replays every family the
input model knew (its suite, at its levels) plainly — no prompt, the normal worked solution — so that teaching the
prompts on a few families does not erase the others (measured on the smoke chain loose-s0, whose Phase-5 model
had lost logic, recall and sequence: at levels 1-2 they went 0.00 / 0.15 / 0.05 → 0.49 / 0.42 / 0.30 through
Phase 6 with the replay at 0.3; before, only ``tool`` was replayed). ``teach_steps: 0`` skips it (a model that
already follows the prompts).
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
                     rng: random.Random, split: str = "train", replay: dict[str, Sequence[int]] | None = None,
                     replay_share: float = 0.0) -> list[Sample]:
    """``teaching_rows``' samples."""
    return teaching_rows(prompts, families, levels, n, rng, split, replay, replay_share)[0]


def teaching_rows(prompts: Sequence[BakePrompt], families: Sequence[str], levels: Sequence[int], n: int,
                  rng: random.Random, split: str = "train", replay: dict[str, Sequence[int]] | None = None,
                  replay_share: float = 0.0) -> tuple[list[Sample], list[bool]]:
    """``n`` fresh questions: with chance ``replay_share`` one of the ``replay`` suite (a family drawn uniformly,
    a level uniformly from its ``(lo, hi)``) left plain — no prompt, its normal worked solution: what the model knew
    is trained on while the prompts are taught —, otherwise one of ``families`` × ``levels`` styled under a random
    prompt subset (``prompt_subsets``); with each, whether it is plain (no prompt: replayed, or the empty subset)."""
    if not 0 <= replay_share < 1:
        raise ValueError(f"replay_share must lie in [0, 1), got {replay_share}")
    subsets = prompt_subsets(prompts)
    suite = sorted((replay or {}).items())
    out, plain = [], []
    for _ in range(n):
        if suite and rng.random() < replay_share:
            family, (lo, hi) = rng.choice(suite)
            out.append(generate(family, rng.randint(int(lo), int(hi)), 1, split, rng.randrange(1 << 30))[0])
            plain.append(True)
            continue
        family = rng.choice(list(families))
        sample = generate(family, rng.choice(list(levels)), 1, split, rng.randrange(1 << 30))[0]
        subset = rng.choice(subsets)
        out.append(styled(sample, subset))
        plain.append(not subset)
    return out, plain


def teaching_batches(tokenizer, prompts: Sequence[BakePrompt], families: Sequence[str], levels: Sequence[int],
                     batch_size: int, max_len: int, seed: int, replay: dict[str, Sequence[int]] | None = None,
                     replay_share: float = 0.0, mark_plain: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Endless answer-only-loss batches of ``teaching_samples`` (worked solutions; too long ones left out).
    ``mark_plain``: the plain rows first, marked in ``plain_rows`` (B,) for ``plain_distill_loss``."""
    rng = random.Random(seed)
    for _ in itertools.count():
        samples, plain = teaching_rows(prompts, families, levels, batch_size, rng, replay=replay,
                                       replay_share=replay_share)
        if not mark_plain:
            enc = encode_samples(tokenizer, samples, max_len, answer_only_loss=True, with_steps=True, drop_long=True)
            width = int(enc["attention_mask"].sum(1).max())
            yield {k: v[:, :width] for k, v in enc.items()}
            continue
        encoded = [(want, encode_samples(tokenizer, [s for s, p in zip(samples, plain) if p is want], max_len,
                                         answer_only_loss=True, with_steps=True, drop_long=True))
                   for want in (True, False)]
        parts = [(want, e) for want, e in encoded if e["input_ids"].shape[0]]
        width = max(int(e["attention_mask"].sum(1).max()) for _, e in parts)
        batch = {k: torch.cat([_pad_to(e[k], width, k) for _, e in parts]) for k in ("input_ids", "attention_mask",
                                                                                  "labels")}
        batch["plain_rows"] = torch.cat([torch.full((e["input_ids"].shape[0],), want) for want, e in parts])
        yield batch


def _pad_to(t: torch.Tensor, width: int, key: str) -> torch.Tensor:
    """``t`` (N, T) cut or right-padded to ``width`` columns (labels with -100, the mask with 0, ids with 0: the
    padded positions are masked)."""
    if t.shape[1] >= width:
        return t[:, :width]
    fill = -100 if key == "labels" else 0
    return torch.cat([t, torch.full((t.shape[0], width - t.shape[1]), fill, dtype=t.dtype)], dim=1)


def plain_distill_loss(reference: torch.nn.Module, weight: float):
    """A loss hook for teaching: the answer tokens' cross-entropy plus ``weight`` × KL(reference ‖ model) on the
    answer tokens of the batch's plain rows (no prompt): without a prompt the taught model answers as its input
    model did (its distribution, not only the reference solution's tokens)."""
    import torch.nn.functional as F

    def loss_fn(model, batch):
        plain = batch.pop("plain_rows")
        out = model(**batch)
        loss, extras = out.loss, {}
        if weight and bool(plain.any()):
            ids, mask, labels = batch["input_ids"][plain], batch["attention_mask"][plain], batch["labels"][plain]
            with torch.no_grad():
                ref = reference(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
            answer = labels[:, 1:] != -100  # positions predicting an answer token
            own = F.log_softmax(out.logits[plain][:, :-1][answer].float(), -1)
            kl = F.kl_div(own, F.log_softmax(ref[answer].float(), -1), log_target=True, reduction="batchmean")
            loss = loss + weight * kl
            extras["kl_plain"] = float(kl.detach())
        return loss, extras

    return loss_fn


def teach_prompts(model: torch.nn.Module, tokenizer, prompts: Sequence[BakePrompt], families: Sequence[str],
                  levels: Sequence[int], steps: int, batch_size: int = 16, max_len: int = 128, seed: int = 0,
                  optimizer: dict[str, Any] | None = None, tracker: Any = None, device: str = "cpu",
                  replay: dict[str, Sequence[int]] | None = None, replay_share: float = 0.0,
                  reference: torch.nn.Module | None = None, distill_weight: float = 0.0):
    """Train ``model`` (all its weights; BitLinear by straight-through) ``steps`` steps on prompted and
    unprompted questions of ``families`` and, a share ``replay_share`` of them, plain questions of the ``replay``
    suite ``{family: (lo, hi)}`` (module docstring). ``reference`` and ``distill_weight`` > 0: the plain rows are
    also held to the reference's answer distribution (``plain_distill_loss``). Returns the TrainHistory."""
    from ..optim import create_optimizer_from_phase
    from ..quant.bitnet import BitLinear, Int8Linear
    from ..train import TrainConfig, train

    ternary = any(isinstance(m, (BitLinear, Int8Linear)) for m in model.modules())
    opt = create_optimizer_from_phase(model, phase_num=6, **{"lr": 1e-3, "ste_mode": ternary, **(optimizer or {})})
    distill = reference is not None and distill_weight > 0
    batches = teaching_batches(tokenizer, prompts, families, levels, batch_size, max_len, seed, replay, replay_share,
                               mark_plain=distill)
    extra = {"loss_fn": plain_distill_loss(reference, distill_weight)} if distill else {}
    return train(model, batches, opt, TrainConfig(steps=steps, log_every=max(1, steps // 4)), tracker=tracker,
                 device=device, desc="teach", quiet=True, **extra)
