"""Model-size-agnostic utilities of Agent Forge, one module per topic (``sizing``, ``diversity``, ``training``,
``runtime``); every name is importable from ``forgelib.utils``.

Everything here works on any ``torch.nn.Module`` (a ``transformers`` causal LM included), from a
30k-parameter test model to a multi-billion-parameter one:

- :func:`get_model_size` — parameter counts, bytes in memory and a size category;
- :func:`estimate_training_memory` / :func:`calculate_safe_batch_size` — a batch size (and gradient
  accumulation) that fits the memory available on the GPU, or in system RAM on a CPU;
- :func:`compute_diversity` / :func:`validate_diversity` — how different several models are;
- :func:`detect_training_issues` — NaN/inf, divergence and plateau in a loss history;
- :func:`set_seed` and :func:`resolve_device`.
"""
from __future__ import annotations

from .diversity import (DiversityError, argmax_disagreement, compute_diversity, parameter_cosine_distance,
                        validate_diversity)
from .runtime import DeviceUnavailableError, resolve_device, set_seed
from .sizing import (ACTIVATION_ELEMENTS_PER_TOKEN_HIDDEN, ADAMW_EXTRA_COPIES, LOGIT_FP32_COPIES, SIZE_CATEGORIES,
                     available_memory_bytes, calculate_safe_batch_size, estimate_training_memory, get_model_size,
                     model_dimensions, size_category)
from .training import ISSUE_KINDS, TrainingIssue, TrainingIssueError, detect_training_issues

__all__ = [
    "SIZE_CATEGORIES", "size_category", "get_model_size", "model_dimensions",
    "estimate_training_memory", "available_memory_bytes", "calculate_safe_batch_size",
    "argmax_disagreement", "parameter_cosine_distance", "compute_diversity", "validate_diversity",
    "DiversityError", "TrainingIssue", "TrainingIssueError", "ISSUE_KINDS",
    "detect_training_issues", "set_seed", "resolve_device", "DeviceUnavailableError",
    "ACTIVATION_ELEMENTS_PER_TOKEN_HIDDEN", "ADAMW_EXTRA_COPIES", "LOGIT_FP32_COPIES",
]
