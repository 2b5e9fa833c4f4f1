"""TRM recursion for Cognate (``CognateConfig.recursion = "trm"``), as far as a causal LM allows.

What TRM does (SamsungSAILMontreal/TinyRecursiveModels, ``models/recursive_reasoning/trm.py``,
``TinyRecursiveReasoningModel_ACTV1_Inner.forward`` and ``TinyRecursiveReasoningModel_ACTV1.forward``;
``models/losses.py::ACTLossHead``; ``pretrain.py::train_batch``), with the names used here (y = TRM's z_H, the
answer; z = TRM's z_L, the latent; x = the embedded input; ``net`` = the one shared block stack):

* latent recursion: ``n_latent`` (TRM's L_cycles) updates ``z = net(z + y + x)``, then ``y = net(y + z)``;
* deep recursion: ``n_cycles`` (TRM's H_cycles) latent recursions, the first ``n_cycles - 1`` under
  ``torch.no_grad`` and the last with gradient (``grad_last_cycle_only``);
* deep supervision: up to ``supervision_steps`` (TRM's N_sup / halt_max_steps) deep recursions, each followed by
  the output head and its loss; the carry (y, z) is detached between steps (TRM: one optimizer step per supervision
  step, see ``forgelib.supervision``);
* halting: the Q head reads the answer state after each step; its BCE target is "the current answer is right"
  (TRM: every supervised token of the puzzle right, ``seq_is_correct``); in training an episode halts when the
  halting logit is > 0, with exploration (probability ``halt_exploration_prob``: no halting before a step drawn
  uniformly in [2, N_sup]); TRM dropped ACT's continue loss (``no_ACT_continue``).

What differs, and why (a causal LM that generates token by token):

* halting is per token, not per sequence: the decision at position t may use positions <= t only (causality,
  and cached generation equal to uncached); TRM reads its Q head at position 0, which in a causal model sees
  nothing, and "the whole answer is right" is not known while it is being written. The BCE target of position t
  is "this step's argmax at t equals token t + 1" over every position the halting decides on (the labels where
  given, else the next input token, padding excluded: see ``modeling_cognate._halt_targets``; a halted prompt
  token stops refining too). A halted token keeps (y, z) for the remaining steps (its keys and values at later
  calls come from that state) and leaves the later steps' losses, as a halted TRM sample leaves the batch;
* y starts as x and z as zeros (TRM: fixed random vectors ``H_init``/``L_init``), as in the cycles mode: the first
  answer update starts from the token embeddings, which a model converted from Llama or trained in the cycles mode
  knows;
* halting: a halting probability >= ``halt_threshold`` (0.5 by default: TRM's logit > 0, up to logit = 0 exactly);
* the blocks are Llama's pre-norm blocks (TRM: post-norm), so that Llama weights load unchanged;
* at inference the halting head is used as in training (a halted token is frozen; ``act_freeze=False`` runs every
  step for every token, which is what TRM's evaluation does: it always runs ``halt_max_steps``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class TRMCarry:
    """The state carried from one supervision step to the next (all detached).

    horizon: N_sup of the episode (exploration draws within it); y, z: (B, T, D) answer and latent state (None
    before the first step: y = x, z = 0); halted: (B, T) bool, tokens frozen by halting; used: (B, T) long, steps
    each token ran; steps: steps done; min_steps: (B,) long, no halting before this step (exploration) or None;
    generator: a CPU ``torch.Generator`` the exploration draws from (None: torch's global one; a training run beside
    others in threads, ``forgelib.jobs``, needs its own: each of them seeds the global one)."""

    horizon: int
    y: torch.Tensor | None = None
    z: torch.Tensor | None = None
    halted: torch.Tensor | None = None
    used: torch.Tensor | None = None
    steps: int = 0
    min_steps: torch.Tensor | None = None
    generator: torch.Generator | None = None

    def started(self, x: torch.Tensor, explore: float, training: bool) -> "TRMCarry":
        """This carry with its states filled for input ``x`` (B, T, D) when it has none yet."""
        if self.y is not None:
            return self
        B, T = x.shape[:2]
        min_steps = None
        if training and explore > 0 and self.horizon > 1:  # TRM's exploration, drawn per sequence
            min_steps = self._exploration(B, explore, x.device)
        return TRMCarry(self.horizon, x, torch.zeros_like(x), torch.zeros(B, T, dtype=torch.bool, device=x.device),
                        torch.zeros(B, T, dtype=torch.long, device=x.device), 0, min_steps, self.generator)

    def _exploration(self, batch: int, explore: float, device) -> torch.Tensor:
        """(B,) long: with probability ``explore`` a step drawn uniformly in [2, horizon] before which the sequence
        may not halt, else 0."""
        if self.generator is None:
            low = torch.randint(2, self.horizon + 1, (batch,), device=device)
            return torch.where(torch.rand(batch, device=device) < explore, low, torch.zeros_like(low))
        low = torch.randint(2, self.horizon + 1, (batch,), generator=self.generator)
        chosen = torch.rand(batch, generator=self.generator) < explore
        return torch.where(chosen, low, torch.zeros_like(low)).to(device)


@dataclass
class TRMStep:
    """One supervision step's outputs: the normalised answer state (B, T, D), its halting logits (B, T) or None, and
    the tokens the step updated (B, T) bool (not halted before it: the step's losses cover these)."""

    state: torch.Tensor
    halt_logits: torch.Tensor | None
    active: torch.Tensor


def _keep(frozen: torch.Tensor | None, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return new if frozen is None else torch.where(frozen[..., None], old, new)


def latent_recursion(net: Callable, x, y, z, n_latent: int, call: int, frozen=None):
    """TRM's latent recursion: ``n_latent`` updates ``z = net(z + y + x)``, then ``y = net(y + z)``; frozen (B, T)
    tokens keep their states. ``net(hidden, call_idx)``; returns (y, z, next call index)."""
    for _ in range(n_latent):
        z = _keep(frozen, z, net(z + y + x, call))
        call += 1
    y = _keep(frozen, y, net(y + z, call))
    return y, z, call + 1


def deep_recursion(net: Callable, x, y, z, n_latent: int, n_cycles: int, grad_last_only: bool, call: int,
                   frozen=None):
    """TRM's deep recursion: ``n_cycles`` latent recursions, the first ``n_cycles - 1`` without gradient when
    ``grad_last_only``. Returns (y, z, next call index)."""
    for cycle in range(n_cycles):
        quiet = grad_last_only and cycle < n_cycles - 1
        with torch.no_grad() if quiet else contextlib.nullcontext():
            y, z, call = latent_recursion(net, x, y, z, n_latent, call, frozen)
    return y, z, call


def supervision_steps(net: Callable, norm: Callable, halt_head, x: torch.Tensor, carry: TRMCarry, n_steps: int, *,
                      n_latent: int, n_cycles: int, grad_last_only: bool, threshold: float, freeze: bool,
                      first_call: int = 0) -> tuple[list[TRMStep], TRMCarry]:
    """Run ``n_steps`` supervision steps from ``carry`` (``TRMCarry.started``); each step is a deep recursion from
    the detached carry, then the halting head on the normalised answer state. Returns the steps and the new carry."""
    y, z, halted, used, done = carry.y, carry.z, carry.halted, carry.used, carry.steps  # y = x at the start
    steps, call = [], first_call
    for _ in range(n_steps):
        frozen = halted if (freeze and bool(halted.any())) else None
        y, z, call = deep_recursion(net, x, y, z, n_latent, n_cycles, grad_last_only, call, frozen)
        state = norm(y)  # (B, T, D)
        logit = halt_head(state).squeeze(-1) if halt_head is not None else None  # (B, T)
        steps.append(TRMStep(state, logit, ~halted))
        done += 1
        used = torch.where(halted, used, torch.full_like(used, done))
        if logit is not None and freeze:
            newly = (torch.sigmoid(logit.detach()) >= threshold) & ~halted
            if carry.min_steps is not None:
                newly &= (done >= carry.min_steps)[:, None]
            halted = halted | newly
        y, z = y.detach(), z.detach()  # the carry between supervision steps carries no gradient
    return steps, TRMCarry(carry.horizon, y, z, halted, used, done, carry.min_steps, carry.generator)


def halt_correct(logits: torch.Tensor, halt_next: torch.Tensor) -> torch.Tensor:
    """The halting head's BCE target of one step: per position t, whether the greedy token equals ``halt_next[t]``
    (the token t + 1 the halting is judged on, -100 = no target). logits (B, T, V), halt_next (B, T-1) ->
    (B, T-1) bool."""
    return logits[:, :-1].argmax(-1) == halt_next


def step_losses(step_logits: list, steps: list[TRMStep], targets: torch.Tensor, halt_next: torch.Tensor | None,
                act_loss_weight: float) -> dict:
    """Per supervision step: cross-entropy over the supervised tokens the step updated, and the halting BCE over the
    positions it decides on (``halt_next`` != -100) among them; the loss is the mean over steps of
    ``ce + act_loss_weight * bce`` (TRM weighs its steps equally; with one step per optimizer step it is the step's
    own loss). targets, halt_next: (B, T-1) next tokens (-100 = none)."""
    ces, bces = [], []
    for logits, step in zip(step_logits, steps):
        active = step.active[:, :-1]  # (B, T-1)
        per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                    reduction="none").view_as(targets)
        counted = active & (targets != -100)
        ces.append((per_token * counted).sum() / counted.sum().clamp_min(1))
        if step.halt_logits is not None and halt_next is not None:
            valid = active & (halt_next != -100)
            bce = F.binary_cross_entropy_with_logits(step.halt_logits[:, :-1].float(),
                                                     halt_correct(logits, halt_next).float(), reduction="none")
            bces.append((bce * valid).sum() / valid.sum().clamp_min(1))
    ce = torch.stack(ces)  # (steps,)
    total = ce.mean()
    result = dict(lm_loss=total.detach(), cycle_losses=ce.detach())
    if bces:
        bce = torch.stack(bces)
        total = total + act_loss_weight * bce.mean()
        result["act_loss"] = bce.mean().detach()
    result["loss"] = total
    return result


__all__ = ["TRMCarry", "TRMStep", "latent_recursion", "deep_recursion", "supervision_steps", "halt_correct",
           "step_losses"]
