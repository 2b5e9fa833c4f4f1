"""Model-size-agnostic utilities of Agent Forge.

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

import inspect
import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Iterable

import torch
from torch import nn

from .distributed import local_index, process_count

__all__ = [
    "SIZE_CATEGORIES", "size_category", "get_model_size", "model_dimensions",
    "estimate_training_memory", "available_memory_bytes", "calculate_safe_batch_size",
    "argmax_disagreement", "parameter_cosine_distance", "compute_diversity", "validate_diversity",
    "DiversityError", "TrainingIssue", "TrainingIssueError", "ISSUE_KINDS",
    "detect_training_issues", "set_seed", "resolve_device", "DeviceUnavailableError",
]

# ---------------------------------------------------------------------------- model size

#: Size categories by parameter count: a model belongs to the first category whose upper bound
#: (exclusive) exceeds its parameter count; 'large' is everything from 5B up.
SIZE_CATEGORIES: tuple[tuple[str, float], ...] = (
    ("micro", 1e6),      # < 1M: test and toy models
    ("tiny", 50e6),      # < 50M: the CPU-trainable Agent Forge models (e.g. the 25M Cognate)
    ("small", 500e6),    # < 500M
    ("medium", 5e9),     # < 5B
    ("large", math.inf),
)


def _check_module(model: Any) -> None:
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
    _check_module(model)
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
    _check_module(model)
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
    _check_module(model)
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


# ---------------------------------------------------------------------------- diversity

class DiversityError(ValueError):
    """Models are too similar; ``report`` holds the measured numbers."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _as_batch(inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` from a (B, T) tensor or a mapping with ``input_ids``."""
    if isinstance(inputs, torch.Tensor):
        input_ids, mask = inputs, None
    elif isinstance(inputs, Mapping) and "input_ids" in inputs:
        input_ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    else:
        raise ValueError("inputs must be a (batch, seq) tensor of token ids or a mapping with "
                         f"'input_ids' (and optionally 'attention_mask'), got {type(inputs).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)  # (T,) -> (1, T)
    mask = torch.ones_like(input_ids) if mask is None else mask.reshape(input_ids.shape)
    return input_ids, mask.bool()


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def _argmax_predictions(model: nn.Module, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token argmax at every position, (B, T), with the model briefly in eval mode."""
    device = _model_device(model)
    accepts_mask = "attention_mask" in inspect.signature(model.forward).parameters
    was_training = model.training
    model.eval()
    try:
        ids = input_ids.to(device)
        out = (model(input_ids=ids, attention_mask=attention_mask.to(device).long())
               if accepts_mask else model(ids))
    finally:
        model.train(was_training)
    logits = getattr(out, "logits", out[0] if isinstance(out, tuple) else out)  # (B, T, V)
    return logits.argmax(dim=-1).cpu()  # (B, T)


def argmax_disagreement(pred_a: torch.Tensor, pred_b: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of unmasked positions where two (B, T) argmax predictions differ."""
    valid = int(mask.sum())
    if valid == 0:
        raise ValueError("attention_mask selects no position; cannot measure disagreement")
    return float(((pred_a != pred_b) & mask).sum()) / valid


def parameter_cosine_distance(model_a: nn.Module, model_b: nn.Module) -> float:
    """1 − cosine similarity of the two models' flattened parameters (same architecture needed).

    Written by hand because the sum runs tensor by tensor (float64) instead of concatenating all
    weights into one vector, which would double the memory of a large model.
    """
    params_a, params_b = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    if params_a.keys() != params_b.keys():
        only = sorted(params_a.keys() ^ params_b.keys())[:5]
        raise ValueError(f"models have different parameter names (e.g. {only}); parameter distance "
                         "needs the same architecture")
    dot = norm_a = norm_b = torch.zeros((), dtype=torch.float64)
    for name, tensor in params_a.items():
        if tensor.shape != params_b[name].shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(tensor.shape)} vs "
                             f"{tuple(params_b[name].shape)}")
        x = tensor.detach().flatten().to("cpu", torch.float64)  # (N,)
        y = params_b[name].detach().flatten().to("cpu", torch.float64)  # (N,)
        dot, norm_a, norm_b = dot + x @ y, norm_a + x @ x, norm_b + y @ y
    if norm_a == 0 or norm_b == 0:
        raise ValueError("a model has all-zero parameters; cosine distance is undefined")
    similarity = float(dot / torch.sqrt(norm_a * norm_b))
    return min(2.0, max(0.0, 1.0 - similarity))  # clamp rounding just outside [0, 2]


def _summary(values: dict[str, float], name: str) -> dict:
    numbers = list(values.values())
    return {name: values, f"min_{name}": min(numbers), f"mean_{name}": sum(numbers) / len(numbers)}


def compute_diversity(models: Sequence[nn.Module], inputs: Any = None) -> dict:
    """Pairwise diversity of two or more models.

    ``param_distance``: 1 − cosine similarity of the flattened weights, per pair. With ``inputs``
    (a (B, T) tensor of token ids or a mapping with ``input_ids``/``attention_mask``) also
    ``disagreement``: the fraction of unmasked positions whose argmax next-token predictions
    differ. Pairs are keyed ``"i-j"``; ``min_*`` and ``mean_*`` summarise each measure.
    """
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"compute_diversity needs at least 2 models, got {len(models)}")
    for model in models:
        _check_module(model)
    pairs = list(combinations(range(len(models)), 2))
    report: dict[str, Any] = {"n_models": len(models), "pairs": [f"{i}-{j}" for i, j in pairs]}
    report.update(_summary({f"{i}-{j}": parameter_cosine_distance(models[i], models[j])
                            for i, j in pairs}, "param_distance"))
    if inputs is None:
        return report
    input_ids, mask = _as_batch(inputs)
    predictions = [_argmax_predictions(m, input_ids, mask) for m in models]  # each (B, T)
    report.update(_summary({f"{i}-{j}": argmax_disagreement(predictions[i], predictions[j], mask)
                            for i, j in pairs}, "disagreement"))
    report["n_positions"] = int(mask.sum())
    return report


def validate_diversity(m1: nn.Module, m2: nn.Module, m3: nn.Module, inputs: Any = None,
                       min_disagreement: float = 0.01, min_param_distance: float = 1e-3) -> dict:
    """Check that three models are pairwise diverse; returns the :func:`compute_diversity` report.

    Raises ``DiversityError`` (with the measured numbers) when the least distant pair is below
    ``min_param_distance``, or, when ``inputs`` are given, the least disagreeing pair is below
    ``min_disagreement``. Without inputs only parameter distance is checked.
    """
    report = compute_diversity([m1, m2, m3], inputs)
    problems = []
    if report["min_param_distance"] < min_param_distance:
        problems.append(f"parameter cosine distance {report['param_distance']} has a pair below "
                        f"{min_param_distance}")
    if inputs is not None and report["min_disagreement"] < min_disagreement:
        problems.append(f"argmax disagreement {report['disagreement']} has a pair below "
                        f"{min_disagreement}")
    if problems:
        raise DiversityError("models are not diverse enough: " + "; ".join(problems), report)
    return report


# ---------------------------------------------------------------------------- training issues

#: Issue kinds that :func:`detect_training_issues` reports.
ISSUE_KINDS = ("nan", "divergence", "plateau")


@dataclass(frozen=True)
class TrainingIssue:
    """One finding about a loss history; ``str()`` gives its message."""

    kind: str
    step: int
    message: str

    def __str__(self) -> str:
        return self.message


class TrainingIssueError(RuntimeError):
    """A training issue of a kind listed in ``raise_on``; ``issue`` holds the finding."""

    def __init__(self, issue: TrainingIssue):
        super().__init__(issue.message)
        self.issue = issue


def _as_steps(history: Any) -> tuple[list[int], list[float]]:
    """Steps and losses from a sequence of losses (step = index), of (step, loss) pairs, or a
    mapping step -> loss."""
    if isinstance(history, Mapping):
        items = list(history.items())
    else:
        history = list(history)
        pairs = bool(history) and all(isinstance(h, (tuple, list)) and len(h) == 2 for h in history)
        items = history if pairs else list(enumerate(history))
    try:
        return [int(s) for s, _ in items], [float(v) for _, v in items]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"loss_history must hold numbers or (step, loss) pairs: {exc}") from exc


def _nan_issue(steps: list[int], losses: list[float]) -> TrainingIssue | None:
    for step, loss in zip(steps, losses):
        if not math.isfinite(loss):
            label = "NaN" if math.isnan(loss) else "inf"
            return TrainingIssue("nan", step, f"{label} loss at step {step}")
    return None


def _divergence_issue(steps: list[int], losses: list[float], window: int,
                      factor: float, min_increase: float = 0.0) -> TrainingIssue | None:
    """Recent mean above ``factor`` × the best mean of ``window`` consecutive losses seen before the recent
    window. Means, not single losses, because batches differ (a batch of short easy problems can score far
    below the average, and a later mixed batch is not divergence); the best is taken before the window so
    that a steep but healthy drop inside it is not called divergence; skipped for a best ≤ 0, where a ratio
    means nothing. The rise must also exceed ``min_increase`` (absolute): near zero a ratio means little
    (0.009 -> 0.036 nats is 4x, yet a model that answers almost everything right)."""
    if len(losses) <= window:
        return None
    earlier = losses[:-window]
    span = min(window, len(earlier))
    sums = list(itertools.accumulate(earlier, initial=0.0))  # prefix sums: every window mean in O(n)
    best = min(sums[i + span] - sums[i] for i in range(len(earlier) - span + 1)) / span
    recent = sum(losses[-window:]) / window
    if best <= 0 or recent <= factor * best or recent - best <= min_increase:
        return None
    return TrainingIssue("divergence", steps[-1],
                         f"loss diverged at step {steps[-1]}: mean of the last {window} losses "
                         f"{recent:.4g} > {factor:g} x best earlier mean of {span} losses {best:.4g}")


def _plateau_issue(steps: list[int], losses: list[float], patience: int,
                   tol: float) -> TrainingIssue | None:
    """No improvement of the best loss by more than ``tol`` (relative) in the last ``patience``
    entries."""
    if len(losses) <= patience:
        return None
    best_before, best_recent = min(losses[:-patience]), min(losses[-patience:])
    if best_before - best_recent > tol * abs(best_before):
        return None
    return TrainingIssue("plateau", steps[-1],
                         f"loss plateau at step {steps[-1]}: best loss {best_recent:.4g} in the last "
                         f"{patience} entries vs {best_before:.4g} before (tolerance {tol:g})")


def _check_issue_args(window: int, divergence_factor: float, plateau_patience: int,
                      plateau_tol: float, raise_on: Iterable[str]) -> set[str]:
    for name, value in (("window", window), ("plateau_patience", plateau_patience)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not divergence_factor > 0 or not plateau_tol >= 0:
        raise ValueError(f"divergence_factor must be > 0 and plateau_tol >= 0, got "
                         f"{divergence_factor!r} and {plateau_tol!r}")
    kinds = {raise_on} if isinstance(raise_on, str) else set(raise_on)
    unknown = kinds - set(ISSUE_KINDS)
    if unknown:
        raise ValueError(f"unknown raise_on kinds {sorted(unknown)}; valid: {', '.join(ISSUE_KINDS)}")
    return kinds


def detect_training_issues(loss_history: Any, window: int = 10, divergence_factor: float = 3.0,
                           plateau_patience: int = 50, plateau_tol: float = 1e-3, divergence_min_increase: float = 0.0,
                           raise_on: Iterable[str] = ("nan", "divergence")) -> list[TrainingIssue]:
    """Find NaN/inf losses, divergence and plateaus in a loss history.

    ``loss_history``: losses (the step is the index), (step, loss) pairs, or a step -> loss mapping.
    - nan: the first non-finite loss ("NaN loss at step k");
    - divergence: the mean of the last ``window`` losses exceeds ``divergence_factor`` × the best
      mean of ``window`` consecutive losses before that window (positive losses), and by more than
      ``divergence_min_increase`` in absolute terms;
    - plateau: the best loss of the last ``plateau_patience`` entries improves on the best before
      them by no more than ``plateau_tol`` × |that best| (a relative tolerance).
    Divergence and plateau look only at the losses before the first non-finite one. Kinds in
    ``raise_on`` raise ``TrainingIssueError``; the others are returned as ``TrainingIssue`` entries.
    """
    raising = _check_issue_args(window, divergence_factor, plateau_patience, plateau_tol, raise_on)
    steps, losses = _as_steps(loss_history)
    issues = []
    nan = _nan_issue(steps, losses)
    if nan is not None:
        cut = steps.index(nan.step)
        steps, losses = steps[:cut], losses[:cut]
    for issue in (nan, _divergence_issue(steps, losses, window, divergence_factor, divergence_min_increase),
                  _plateau_issue(steps, losses, plateau_patience, plateau_tol)):
        if issue is None:
            continue
        if issue.kind in raising:
            raise TrainingIssueError(issue)
        issues.append(issue)
    return issues


# ---------------------------------------------------------------------------- seed and device

class DeviceUnavailableError(ValueError):
    """An explicitly requested device is not available on this machine."""


_DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:<index>", "mps")


def set_seed(seed: int, deterministic: bool = False) -> int:
    """Seed Python's ``random``, NumPy and torch (all CUDA devices too); returns the seed.

    The same calls as ``transformers.set_seed`` (a test compares the streams), without importing
    ``transformers.trainer_utils``, which pulls in peft (about 3 s per process start); ``deterministic`` also
    switches torch to deterministic algorithms.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")  # NumPy's range
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
    return seed


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(pref: str = "auto") -> str:
    """A device string: 'auto' picks 'cuda' if available, else 'mps' if available, else 'cpu'.

    'cpu', 'cuda', 'cuda:<index>' and 'mps' are returned as asked when available; an unavailable
    one raises ``DeviceUnavailableError``, an unknown one ``ValueError`` with the valid choices.
    """
    choice = str(pref).strip().lower()
    if choice in ("auto", "cuda") and torch.cuda.is_available() and process_count() > 1:
        return f"cuda:{local_index() % torch.cuda.device_count()}"  # accelerate launch: one GPU per process
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if choice == "cpu":
        return "cpu"
    if choice == "mps":
        if not _mps_available():
            raise DeviceUnavailableError("device 'mps' requested but MPS is not available")
        return "mps"
    base, _, index = choice.partition(":")
    if base != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"unknown device {pref!r}; valid: {', '.join(_DEVICE_CHOICES)}")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {pref!r} requested but CUDA is not available")
    if index and int(index) >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"device {pref!r} requested but only "
                                     f"{torch.cuda.device_count()} CUDA device(s) exist")
    return choice
