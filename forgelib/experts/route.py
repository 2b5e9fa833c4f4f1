"""Two-pass inference with SVF experts, mixtures for unseen tasks, and the search over routing settings.

Pass 1 (``route``): the question's feature (``discover.question_features``: the base model's own mean hidden
state) goes to the nearest cluster centroid — the clustering that proposed the experts routes to them. Pass 2:
the chosen expert's ``z`` is loaded and the model answers (greedy, calculator on). Centroids beyond the experts
(``base centroids``: the families of the model's suite that no expert trained for) route to the base model.

``RoutingSettings``: ``strength`` scales the chosen ``z``; ``gate`` is a confidence gate — when the two nearest
centroids are closer in distance than ``gate`` (an ambiguous question), the mean of their two experts is used.
``search_settings`` is an evolutionary search (CMA-ES, the ``cma`` package) over these two settings scored on
held-out questions by accuracy and latency: it runs once per trade-off weight ``w`` (maximizing
``accuracy − w · seconds per question``) and reports every evaluated setting and the Pareto front. It is a search over
two routing knobs, not over architectures.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import torch

@dataclasses.dataclass
class RoutingSettings:
    strength: float = 1.0
    gate: float = 0.0


def assignments(features: torch.Tensor, centroids: torch.Tensor, settings: RoutingSettings) -> list[tuple[int, ...]]:
    """Per question, the experts whose mean ``z`` answers it: the nearest, or the two nearest under the gate."""
    d = torch.cdist(features, centroids)
    if d.shape[1] < 2:
        return [(0,)] * len(features)
    two = d.topk(2, largest=False)
    out = []
    for (first, second), (i, j) in zip(two.values.tolist(), two.indices.tolist()):
        out.append(tuple(sorted((i, j))) if second - first < settings.gate else (i,))
    return out


def answer_groups(svf, tokenizer, prompts: Sequence[str], groups: Sequence[tuple[int, ...]],
                  experts: Sequence[dict], strength: float = 1.0, max_new_tokens: int = 40) -> list[str]:
    """Greedy answers (calculator on), each prompt with the mean of its group's experts times ``strength``
    (an empty group: the base model). A centroid index ``>= len(experts)`` is one of the router's base centroids
    (questions of the families no expert trained for): it stands for the base, ``z = 0``, in the mean."""
    from ..tools import generate_with_tools
    from .svf import mix

    out = [""] * len(prompts)
    saved = svf.get_z()
    try:
        for group in sorted(set(groups)):
            idx = [i for i, g in enumerate(groups) if g == group]
            members = [k for k in group if k < len(experts)]
            if members:
                svf.load_z(mix([experts[k] for k in members], [strength / len(group)] * len(members)))
            else:
                svf.reset()
            traces = generate_with_tools(svf, tokenizer, [prompts[i] for i in idx], max_new_tokens, batch_size=64)
            for i, t in zip(idx, traces):
                out[i] = t.text
    finally:
        svf.load_z(saved)
    return out


def evaluate_settings(svf, tokenizer, samples, centroids, experts, settings: RoutingSettings,
                      check: Callable, max_new_tokens: int = 40) -> dict[str, float]:
    """Accuracy, seconds per question (pass 1 included), per-question correctness (``correct``) and the answers
    (``texts``) of two-pass answering under ``settings``."""
    from .discover import question_features
    from .train import base_weights

    started = time.perf_counter()
    with base_weights(svf):  # pass 1 reads the base model's hidden states
        features = question_features(svf, tokenizer, [s.prompt for s in samples])
    groups = assignments(features, centroids, settings)
    texts = answer_groups(svf, tokenizer, [s.prompt for s in samples], groups, experts, settings.strength,
                          max_new_tokens)
    seconds = (time.perf_counter() - started) / len(samples)
    correct = [int(check(s, t)) for s, t in zip(samples, texts)]
    return {"accuracy": sum(correct) / len(samples), "seconds": seconds, "correct": correct, "texts": texts}


def pareto_front(points: Sequence[dict]) -> list[dict]:
    """Points not dominated in (accuracy up, seconds down)."""
    front = []
    for p in points:
        if not any(q["accuracy"] >= p["accuracy"] and q["seconds"] <= p["seconds"] and
                   (q["accuracy"] > p["accuracy"] or q["seconds"] < p["seconds"]) for q in points):
            front.append(p)
    return sorted(front, key=lambda p: p["seconds"])


def search_settings(evaluate: Callable[[RoutingSettings], dict], weights: Sequence[float] = (0.0, 1.0),
                    budget: int = 8, seed: int = 0) -> dict[str, Any]:
    """CMA-ES over (strength in [0, 2], gate in [0, 0.5]) per trade-off weight (module docstring)."""
    import cma

    points: list[dict] = []
    for w in weights:
        es = cma.CMAEvolutionStrategy([1.0, 0.1], 0.3, {"bounds": [[0.0, 0.0], [2.0, 0.5]], "seed": seed + 1,
                                                        "popsize": 4, "verbose": -9})
        evaluated = 0  # cma's own maxfevals stops only after it is exceeded: the budget is counted here
        while evaluated < budget and not es.stop():
            xs = es.ask()[:budget - evaluated]  # the last generation may be cut to the budget
            evaluated += len(xs)
            scores = []
            for x in xs:
                settings = RoutingSettings(strength=float(x[0]), gate=float(x[1]))
                scored = evaluate(settings)
                row = {**dataclasses.asdict(settings), "accuracy": scored["accuracy"], "seconds": scored["seconds"],
                       "weight": w}
                points.append(row)
                scores.append(-(row["accuracy"] - w * row["seconds"]))
            if len(xs) == es.popsize:  # cma learns from whole generations only
                es.tell(xs, scores)
    best = {w: max((p for p in points if p["weight"] == w), key=lambda p: p["accuracy"] - w * p["seconds"])
            for w in weights}
    return {"points": points, "pareto": pareto_front(points), "best": {str(w): b for w, b in best.items()}}
