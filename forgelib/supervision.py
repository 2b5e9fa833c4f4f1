"""TRM's deep supervision on the one training loop: one optimizer step per supervision step.

TRM (``pretrain.py::train_batch`` of SamsungSAILMontreal/TinyRecursiveModels) runs one supervision step per
optimizer step: the model's forward continues each sample from its detached carry, the loss of that one step is
backpropagated, the optimizer steps, and a sample stays in the batch (with its carry) until its halting head says
halt or it has had N_sup steps, when a fresh sample takes its place. A Cognate model with ``recursion="trm"`` can
also be trained with all of a batch's steps in one forward and one backward (``forgelib.train.default_loss``: the
mean of the steps' losses); this module is the TRM way, without touching ``forgelib.train.train``::

    sup = SupervisionSteps()                       # N_sup from the model's config.supervision_steps
    train(model, sup.batches(source), optimizer, config, loss_fn=sup.loss)

``batches`` hands each batch on for consecutive optimizer steps until every supervised token of it has halted or it
has had N_sup steps (a causal LM halts per token, see ``forgelib.models.trm``; the batch is replaced whole, not
sample by sample); ``loss`` runs one supervision step from the carry the previous step left (detached) and returns
that step's loss. ``config.steps`` counts optimizer steps, so a run sees about steps / N_sup batches. Several
processes: the source must have ``shard`` (``LengthBucketedBatches`` has); background workers (``data_workers``)
are not used.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .models.trm import TRMCarry


class SupervisionSteps:
    """The batch source and the loss hook of TRM-style training (see the module docstring).

    ``steps``: N_sup (None: the model's ``config.supervision_steps``); ``generator``: a CPU ``torch.Generator`` that
    TRM's halting exploration draws from (None: torch's global one; a run beside others in threads needs its own).
    After each ``loss`` call, ``carry`` is the carry of the current batch, ``step`` its supervision step (1-based) and
    ``episodes`` the batches started."""

    def __init__(self, steps: int | None = None, generator: torch.Generator | None = None):
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1 (supervision steps per batch), got {steps}")
        self.steps, self.generator = steps, generator
        self.carry: TRMCarry | None = None
        self.step = 0
        self.episodes = 0

    def batches(self, source: Iterator[dict]) -> "RepeatedBatches":
        """``source``'s batches, each handed on until its episode is over (:meth:`episode_over`)."""
        return RepeatedBatches(self, source)

    def episode_over(self, batch: dict) -> bool:
        """Whether ``batch`` has had its supervision steps: N_sup of them, or every supervised token halted."""
        carry = self.carry
        if carry is None:
            return False
        if carry.steps >= carry.horizon:
            return True
        supervised = batch["labels"][:, 1:].to(carry.halted.device) != -100  # (B, T-1): a next token to predict
        return bool((carry.halted[:, :-1] | ~supervised).all())

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """One supervision step of ``batch`` from the current carry (a new one at an episode's first step)."""
        if "labels" not in batch:
            raise ValueError("TRM supervision steps need labels in every batch")
        if self.carry is None:
            config = getattr(model, "module", model).config
            if getattr(config, "recursion", None) != "trm":
                raise ValueError(f"SupervisionSteps trains a recursion='trm' Cognate model, got "
                                 f"{getattr(config, 'model_type', '?')} with recursion "
                                 f"{getattr(config, 'recursion', None)!r}")
            self.carry = TRMCarry(self.steps or config.supervision_steps, generator=self.generator)
            self.episodes += 1
        out = model(**batch, trm_carry=self.carry, supervision_steps=1, use_cache=False)
        self.carry, self.step = out.trm_carry, out.trm_carry.steps
        extras = {"supervision_step": float(self.step)}
        for key in ("lm_loss", "act_loss", "act_cycles_mean"):
            value = getattr(out, key, None)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                extras[key] = float(value.detach())
        return out.loss, extras


class RepeatedBatches:
    """An endless batch iterator that hands each batch of ``source`` on until the owner's episode on it is over."""

    def __init__(self, owner: SupervisionSteps, source: Iterator[dict]):
        self.owner, self.source, self.current = owner, source, None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.current is None or self.owner.episode_over(self.current):
            self.current = next(self.source)
            self.owner.carry = None
        return self.current

    def shard(self, index: int, count: int) -> "RepeatedBatches":
        """This process's share (``forgelib.train.process_batches``): the source's own shard, repeated likewise."""
        shard = getattr(self.source, "shard", None)
        if shard is None:
            raise ValueError("several processes need a batch source with shard(index, count) "
                             "(e.g. LengthBucketedBatches) under SupervisionSteps")
        return RepeatedBatches(self.owner, shard(index, count))


__all__ = ["SupervisionSteps", "RepeatedBatches"]
