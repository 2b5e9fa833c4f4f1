"""How different several models are: argmax disagreement on the same inputs and parameter cosine distance
(``compute_diversity``, ``validate_diversity``)."""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import torch
from torch import nn

from .sizing import check_module


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
        check_module(model)
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
