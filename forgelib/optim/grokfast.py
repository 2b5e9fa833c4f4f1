"""Grokfast gradient filters: amplify the slow (low-frequency) part of each parameter's gradient.

Both filters return ``g + lambda * slow(g)`` and keep their memory in the optimizer state of the
parameter (so it is saved by ``state_dict()``):
- "ema": mu <- alpha*mu + (1-alpha)*g, with mu initialised to the first gradient (as the paper's
  reference code does, so the first filtered gradient is (1+lambda)*g);
- "ma":  the mean of the last ``window`` gradients, applied only once the window is full (warm-up).
Written by hand: no maintained library offers these filters; they are a few tensor operations.
"""
from __future__ import annotations

import torch

FILTERS = ("none", "ema", "ma")


def grokfast_ema(grad: torch.Tensor, state: dict, alpha: float, lamb: float) -> torch.Tensor:
    """EMA filter. Updates ``state["grokfast_ema"]`` in place and returns g + lamb*mu (a new tensor)."""
    mu = state.get("grokfast_ema")
    if mu is None:
        mu = grad.detach().clone(memory_format=torch.preserve_format)
        state["grokfast_ema"] = mu
    else:
        mu.mul_(alpha).add_(grad, alpha=1.0 - alpha)
    return grad.add(mu, alpha=lamb)


def grokfast_ma(grad: torch.Tensor, state: dict, window: int, lamb: float) -> torch.Tensor:
    """Moving-average filter over the last ``window`` gradients (a ring buffer of shape (window, *g)).

    Until ``window`` gradients have been seen the gradient passes unchanged (the reference's warm-up).
    Memory cost: ``window`` copies of the parameter, so prefer "ema" for large models.
    """
    buf = state.get("grokfast_window")
    if buf is None:
        buf = grad.new_zeros((window, *grad.shape))  # (W, *param)
        state["grokfast_window"] = buf
        state["grokfast_count"] = 0
    count = state["grokfast_count"]
    buf[count % window].copy_(grad)
    state["grokfast_count"] = count + 1
    if count + 1 < window:
        return grad
    return grad.add(buf.mean(dim=0), alpha=lamb)


def apply_grokfast(grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
    """Filter ``grad`` with the group's Grokfast settings; lambda 0 or filter "none" returns it as is."""
    kind, lamb = group["grokfast_filter"], group["grokfast_lambda"]
    if kind == "none" or lamb == 0.0:
        return grad
    if kind == "ema":
        return grokfast_ema(grad, state, group["grokfast_alpha"], lamb)
    if kind == "ma":
        return grokfast_ma(grad, state, group["grokfast_window"], lamb)
    raise ValueError(f"grokfast_filter must be one of {FILTERS}, got {kind!r}")
