"""KL regularization toward a frozen reference model (the loss helper of phases 3 and 7)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .config import KL_DIRECTIONS


def kl_divergence(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor | None = None,
                  direction: str = "forward", temperature: float = 1.0) -> torch.Tensor:
    """Mean per-position KL between the model's and the reference's next-token distributions.

    logits, ref_logits: (..., V); mask: (...) with 1/True where the position counts.
    "forward" = KL(reference || model) (mass-covering, the distillation form); "reverse" =
    KL(model || reference) (mode-seeking, the RL-regularizer form). Uses ``F.kl_div`` on log-probs.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ")
    logp = F.log_softmax(logits.float() / temperature, dim=-1)  # (..., V)
    logq = F.log_softmax(ref_logits.float() / temperature, dim=-1)  # (..., V)
    if direction == "forward":  # sum q (log q - log p)
        per_pos = F.kl_div(logp, logq, log_target=True, reduction="none").sum(-1)  # (...)
    else:  # sum p (log p - log q)
        per_pos = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)  # (...)
    if mask is None:
        return per_pos.mean()
    mask = mask.to(per_pos.dtype)
    return (per_pos * mask).sum() / mask.sum().clamp(min=1.0)


class ReferenceKL:
    """``weight * KL`` between a model's logits and a frozen reference model's, on the same batch.

    The reference is put in eval mode with gradients off; its logits are computed without autograd.
    Usage in a training loop: ``loss = ce + kl(out.logits, input_ids, attention_mask)``.
    """

    def __init__(self, reference: nn.Module, weight: float, direction: str = "forward",
                 temperature: float = 1.0):
        if weight < 0:
            raise ValueError(f"KL weight must be >= 0, got {weight}")
        if direction not in KL_DIRECTIONS:
            raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {direction!r}")
        self.reference = reference.eval().requires_grad_(False)
        self.weight, self.direction, self.temperature = weight, direction, temperature

    @classmethod
    def from_model(cls, model: nn.Module, weight: float, **kwargs) -> "ReferenceKL":
        """Freeze a deep copy of ``model`` as it is now (the usual "stay close to the start" setup)."""
        return cls(copy.deepcopy(model), weight, **kwargs)

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted KL for one batch; logits (B, T, V) from the trained model on ``input_ids`` (B, T)."""
        if self.weight == 0:
            return logits.new_zeros(())
        with torch.no_grad():
            ref = self.reference(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        return self.weight * kl_divergence(logits, ref, attention_mask, self.direction, self.temperature)
