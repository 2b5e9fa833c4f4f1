"""Newton–Schulz orthogonalization and Muon's shape-aware learning-rate rules.

Written by hand rather than calling `torch.optim.Muon`'s internals because that implementation always
iterates in bfloat16: on a CPU without bf16 hardware this makes a training step about 5x slower than
fp32. Here the iteration dtype is a parameter; in bfloat16 the arithmetic is the same sequence of
operations, so the result matches `torch.optim.Muon` exactly (tests/test_optim.py checks both).
"""
from __future__ import annotations

import math

import torch

#: Quintic coefficients (a, b, c): p(x) = a x + b x^3 + c x^5, chosen to maximise the slope at zero so
#: five steps pull every singular value above ~0.002 of the Frobenius norm into about [0.68, 1.21].
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7

NS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "float64": torch.float64}
NS_DTYPE_CHOICES = ("auto", *NS_DTYPES)
LR_RULES = ("original", "match_rms_adamw", "none")


def resolve_ns_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map an ``ns_dtype`` name to a dtype; "auto" is bf16 on CUDA (tensor cores) and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in NS_DTYPES:
        raise ValueError(f"ns_dtype must be one of {NS_DTYPE_CHOICES}, got {name!r}")
    return NS_DTYPES[name]


def newton_schulz(grad: torch.Tensor, steps: int = NS_STEPS,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = NS_EPS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately orthogonalize a 2-D matrix: G = U S V^T  ->  U S' V^T with S' near 1.

    Each step applies p(X) = a X + b (X X^T) X + c (X X^T)^2 X, which acts on every singular value
    separately as the scalar polynomial p. The input is first divided by its Frobenius norm so that all
    singular values lie in [0, 1]. Returns a tensor of ``dtype`` with the shape of ``grad``.
    """
    if grad.ndim not in (2, 3):
        raise ValueError(f"newton_schulz needs a 2-D matrix (or a stack of them), got shape {tuple(grad.shape)}")
    if not 0 < steps < 100:
        raise ValueError(f"steps must be in [1, 99], got {steps}")
    if grad.ndim == 3:
        return _newton_schulz_stack(grad, steps, coefficients, eps, dtype)
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:  # iterate on the wide orientation so the Gram matrix is the small one
        x = x.T  # (n, m) with n <= m
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T  # (n, n)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b*A + c*A@A
        x = torch.addmm(x, poly, x, beta=a)  # a*X + (b*A + c*A@A) @ X
    return x.T if tall else x


def _newton_schulz_stack(grad: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float,
                         dtype: torch.dtype) -> torch.Tensor:
    """The same iteration on a stack (B, n, m) of same-shaped matrices at once, each scaled by its own norm:
    one batched product per step instead of one per matrix (on a GPU the launches, not the arithmetic, cost)."""
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(1) > grad.size(2)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT  # (B, n, n)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if tall else x


def muon_lr_scale(shape: torch.Size | tuple[int, ...], rule: str) -> float:
    """Learning-rate multiplier for a (rows, cols) matrix, with the same rules as ``torch.optim.Muon``.

    "original": sqrt(max(1, rows/cols)); "match_rms_adamw": 0.2*sqrt(max(rows, cols)), which gives the
    update about the RMS of an AdamW update so one learning rate serves both groups; "none": 1.
    """
    rows, cols = shape[:2]
    if rule == "original":
        return math.sqrt(max(1.0, rows / cols))
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if rule == "none":
        return 1.0
    raise ValueError(f"adjust_lr_fn must be one of {LR_RULES}, got {rule!r}")
