"""Model size and memory: parameter counts, bytes, a size category, the memory training needs and a batch size
(with gradient accumulation) that fits the GPU or, on a CPU, system RAM. Works on any ``torch.nn.Module``."""
from __future__ import annotations

import math
import warnings
from typing import Any, Iterable

import torch
from torch import nn


#: Size categories by parameter count: a model belongs to the first category whose upper bound
#: (exclusive) exceeds its parameter count; 'large' is everything from 5B up.
SIZE_CATEGORIES: tuple[tuple[str, float], ...] = (
    ("micro", 1e6),      # < 1M: test and toy models
    ("tiny", 50e6),      # < 50M: the CPU-trainable Agent Forge models (e.g. the 25M Cognate)
    ("small", 500e6),    # < 500M
    ("medium", 5e9),     # < 5B
    ("large", math.inf),
)


def check_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def size_category(n_params: int) -> str:
    """The :data:`SIZE_CATEGORIES` name for a parameter count."""
    if n_params < 0:
        raise ValueError(f"n_params must be >= 0, got {n_params}")
    return next(name for name, upper in SIZE_CATEGORIES if n_params < upper)


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def get_model_size(model: nn.Module) -> dict:
    """Parameter counts and in-memory size of ``model``.

    Returns ``{'params', 'trainable_params', 'size_mb', 'size_category'}``; ``size_mb`` is the
    actual bytes of every parameter and buffer at its own dtype, in MiB (2**20 bytes). Tied weights
    count once (``parameters()`` de-duplicates them).
    """
    check_module(model)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    size_bytes = _tensor_bytes(params) + _tensor_bytes(model.buffers())
    return {"params": n_params,
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "size_mb": size_bytes / 2**20,
            "size_category": size_category(n_params)}


# ---------------------------------------------------------------------------- memory / batch size

#: Activation memory kept for the backward pass, in tensor elements per token, per hidden unit, per
#: transformer layer. Korthikanti et al. (2022) measure 34 bytes per token·hidden·layer for 16-bit
#: activations without recomputation (attention scores excluded, which fused SDPA kernels do not
#: store), i.e. 17 elements; scaled here by the model's own element size.
ACTIVATION_ELEMENTS_PER_TOKEN_HIDDEN = 17
#: The output logits are held in float32 twice per token (the logits and their gradient in the loss).
LOGIT_FP32_COPIES = 2
#: AdamW keeps two moment tensors per trainable parameter, plus the gradient itself.
ADAMW_EXTRA_COPIES = 2

_DIM_KEYS = {"num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
             "hidden_size": ("hidden_size", "n_embd", "d_model"),
             "vocab_size": ("vocab_size",)}


def _dims_from_modules(model: nn.Module) -> dict:
    """Fallback for modules without a config: widest embedding/linear input, longest ModuleList."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    lists = [len(m) for m in model.modules() if isinstance(m, nn.ModuleList)]
    widths = [m.embedding_dim for m in embeddings] or [m.in_features for m in linears] or [1]
    return {"num_layers": max(lists, default=1), "hidden_size": max(widths),
            "vocab_size": max((m.num_embeddings for m in embeddings), default=0)}


def model_dimensions(model: nn.Module) -> dict:
    """``{'num_layers', 'hidden_size', 'vocab_size'}`` from the model's (text) config, falling back
    to its modules for a plain ``nn.Module``."""
    check_module(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()  # multimodal configs keep the LM sizes in a sub-config
    dims = _dims_from_modules(model)
    for field, keys in _DIM_KEYS.items():
        value = next((getattr(config, k) for k in keys if getattr(config, k, None)), None)
        if value is not None:
            dims[field] = int(value)
    return dims


def estimate_training_memory(model: nn.Module, seq_len: int = 512) -> dict:
    """Bytes needed to train ``model`` with AdamW: a fixed part and a part per sample.

    fixed = parameters + buffers + trainable × (gradient + ADAMW_EXTRA_COPIES moments), all at the
    parameters' dtype; per_sample = layers × seq_len × hidden × ACTIVATION_ELEMENTS_PER_TOKEN_HIDDEN
    × element size + seq_len × vocab × 4 bytes × LOGIT_FP32_COPIES.
    """
    check_module(model)
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    params = list(model.parameters())
    trainable_bytes = _tensor_bytes(p for p in params if p.requires_grad)
    fixed = (_tensor_bytes(params) + _tensor_bytes(model.buffers())
             + trainable_bytes * (1 + ADAMW_EXTRA_COPIES))
    floats = [p for p in params if p.is_floating_point()]
    element = floats[0].element_size() if floats else 4
    dims = model_dimensions(model)
    activations = (dims["num_layers"] * seq_len * dims["hidden_size"]
                   * ACTIVATION_ELEMENTS_PER_TOKEN_HIDDEN * element)
    logits = seq_len * dims["vocab_size"] * 4 * LOGIT_FP32_COPIES
    return {"fixed_bytes": fixed, "per_sample_bytes": activations + logits,
            "activation_bytes": activations, "logit_bytes": logits, **dims}


def available_memory_bytes() -> int:
    """Free CUDA memory of the current device when CUDA is available, else available system RAM."""
    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return int(free)
    import psutil  # only needed on this path

    return int(psutil.virtual_memory().available)


def _validate_batch_args(device_vram_gb: float | None, target_batch_size: int, safety: float) -> None:
    if device_vram_gb is not None and not device_vram_gb > 0:
        raise ValueError(f"device_vram_gb must be > 0 (GiB), got {device_vram_gb!r}")
    if not isinstance(target_batch_size, int) or target_batch_size < 1:
        raise ValueError(f"target_batch_size must be an int >= 1, got {target_batch_size!r}")
    if not 0 < safety <= 1:
        raise ValueError(f"safety must be in (0, 1], got {safety!r}")


def calculate_safe_batch_size(model: nn.Module, device_vram_gb: float | None = None,
                              seq_len: int = 512, target_batch_size: int = 16,
                              safety: float = 0.7) -> tuple[int, int]:
    """``(batch_size, accumulation_steps)`` that fits ``safety`` × the memory and reaches the target.

    ``device_vram_gb`` is in GiB; None measures what is available (see
    :func:`available_memory_bytes`). When the target does not fit, the accumulation is the fewest
    steps that do, and the batch is then shrunk to ``ceil(target / accumulation)`` so that
    ``batch × accumulation`` is the smallest product ≥ the target. If not even one sample fits, it
    warns and returns ``(1, target_batch_size)``.
    """
    _validate_batch_args(device_vram_gb, target_batch_size, safety)
    estimate = estimate_training_memory(model, seq_len)
    total = device_vram_gb * 2**30 if device_vram_gb is not None else available_memory_bytes()
    room = total * safety - estimate["fixed_bytes"]
    max_batch = int(room // estimate["per_sample_bytes"]) if room > 0 else 0
    if max_batch < 1:
        warnings.warn(f"even one sample of {seq_len} tokens may not fit: need about "
                      f"{(estimate['fixed_bytes'] + estimate['per_sample_bytes']) / 2**30:.2f} GiB, "
                      f"budget {total * safety / 2**30:.2f} GiB", RuntimeWarning, stacklevel=2)
        return 1, target_batch_size
    if max_batch >= target_batch_size:
        return target_batch_size, 1
    accumulation = math.ceil(target_batch_size / max_batch)
    return math.ceil(target_batch_size / accumulation), accumulation
