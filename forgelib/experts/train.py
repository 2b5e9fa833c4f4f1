"""Training an SVF expert's ``z``: REINFORCE on the exact-match reward of the model's own answers, or cross-entropy.

REINFORCE (``method="reinforce"``): each step samples an answer (``temperature``, calculator on) to ``batch_size``
questions of the expert's cluster; reward 1 when the task checker accepts it, else 0; advantage = reward − the
batch's mean reward; loss = −mean_i(A_i · mean log-prob of the tokens the model wrote) + ``kl_weight`` ×
KL(expert ‖ base) on those tokens (the base: the same model with ``z = 0``). Tool results appended by the
calculator are not the model's actions and get no gradient (``ToolTrace.generated``).

Cross-entropy (``method="ce"``, the alternative): the same sampled answers, but only the correct ones, trained by
cross-entropy on the model's tokens (rejection-sampled self-distillation: the model's own answer style, with its
calculator calls, is kept — the pipeline's model answers in the style Phase 6 baked).

The optimizer is MuGrokfast with the Phase-7 preset (``z`` is 1-D: the AdamW group; QK-clip off, since it would
rescale the frozen base weights).
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
from typing import Any, Callable, Sequence

import torch

from ..params import require_non_negative, require_positive


@dataclasses.dataclass
class ExpertTrainConfig:
    method: str = "reinforce"
    """reinforce | ce"""
    steps: int = 20
    batch_size: int = 16
    lr: float = 2e-2
    kl_weight: float | None = None
    """None: the Phase-7 preset's (0.05)."""
    temperature: float = 1.0
    max_new_tokens: int = 40
    optimizer: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.method not in ("reinforce", "ce"):
            raise ValueError(f"method must be 'reinforce' or 'ce', got {self.method!r}")
        require_positive(self, "steps", "batch_size", "lr", "max_new_tokens")
        require_non_negative(self, "temperature")
        if self.method == "reinforce" and self.batch_size < 2:
            raise ValueError("REINFORCE needs batch_size >= 2: the advantage is the reward minus the batch mean")


@contextlib.contextmanager
def base_weights(svf):
    """Inside: every ``z`` is 0 (the base model's matrices); the expert's values come back afterwards."""
    saved = svf.get_z()
    svf.reset()
    try:
        yield svf
    finally:
        svf.load_z(saved)


def trace_batch(tokenizer, prompts: Sequence[str], traces) -> dict[str, torch.Tensor]:
    """Right-padded ``<|bos|>prompt completion`` ids with, per position t, ``own[t]`` = 1 when the token at t+1
    was written by the model (the positions whose predictions a policy gradient or cross-entropy uses)."""
    from ..data.tokenizer import encode_prompts, pad_id

    rows, owns = [], []
    for p, t in zip(encode_prompts(tokenizer, list(prompts)), traces):
        rows.append(p + list(t.ids))
        owns.append([0] * (len(p) - 1) + list(t.generated) + [0])
    width = max(len(r) for r in rows)
    pad = pad_id(tokenizer)
    return {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "own": torch.tensor([o[:width] + [0] * (width - len(o[:width])) for o in owns], dtype=torch.bool)}


def token_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities (B, T-1) of each next token, the logits (B, T-1, V))."""
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1), logits


def expert_loss(svf, batch: dict, rewards: torch.Tensor, method: str, kl_weight: float) -> tuple[torch.Tensor, dict]:
    """The loss of one step (module docstring) on a ``trace_batch`` with per-answer ``rewards`` (0/1)."""
    from ..optim.kl import kl_divergence

    logp, logits = token_logprobs(svf, batch)
    mask = batch["own"][:, : logp.shape[1]].to(logp.device)
    per_seq = (logp * mask).sum(1) / mask.sum(1).clamp(min=1)  # mean log-prob of the model's own tokens
    if method == "reinforce":
        advantage = (rewards - rewards.mean()).to(per_seq.device)
        main = -(advantage * per_seq).mean()
    else:
        keep = rewards.to(per_seq.device) > 0
        main = -(per_seq[keep]).mean() if bool(keep.any()) else per_seq.sum() * 0.0
    extras = {"reward": float(rewards.mean()), "main": float(main.detach())}
    loss = main
    if kl_weight > 0:
        with torch.no_grad(), reference(svf):
            _, base_logits = token_logprobs(svf, batch)
        kl = kl_divergence(logits, base_logits, mask, direction="reverse")
        extras["kl"] = float(kl.detach())
        loss = loss + kl_weight * kl
    return loss, extras


def reference(model):
    """The context in which ``model`` is its base: ``z = 0`` for an SVF model, the adapter disabled for peft."""
    return base_weights(model) if hasattr(model, "get_z") else model.disable_adapter()


def train_expert(svf, tokenizer, samples: Sequence, check: Callable[[Any, str], bool], config: ExpertTrainConfig,
                 seed: int = 0) -> list[dict]:
    """Train the current ``z`` of ``svf`` (or the active LoRA adapter of a peft model: the benchmark's
    comparison, same procedure) on ``samples`` (questions of one cluster); returns one row per step."""
    from ..optim import create_optimizer_from_phase
    from ..optim.presets import preset_config
    from ..tools import generate_with_tools

    kl_weight = preset_config(7).kl_weight if config.kl_weight is None else config.kl_weight
    optimizer = create_optimizer_from_phase(svf, phase_num=7, **{**config.optimizer, "lr": config.lr,
                                                                 "qk_clip_tau": None})
    rng, history = random.Random(seed), []
    torch.manual_seed(seed)
    for step in range(config.steps):
        batch_samples = [samples[rng.randrange(len(samples))] for _ in range(config.batch_size)]
        prompts = [s.prompt for s in batch_samples]
        svf.eval()
        traces = generate_with_tools(svf, tokenizer, prompts, config.max_new_tokens, batch_size=64,
                                     temperature=config.temperature)
        rewards = torch.tensor([float(check(s, t.text)) for s, t in zip(batch_samples, traces)])
        svf.train()
        loss, extras = expert_loss(svf, trace_batch(tokenizer, prompts, traces), rewards, config.method, kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step + 1, "loss": float(loss.detach()), **extras})
    svf.eval()
    return history
