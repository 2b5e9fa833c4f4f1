"""Self-guided discovery: the model proposes the expert split itself by clustering its own hidden states.

A question's feature is the model's last hidden state averaged over the question's tokens, L2-normalized
(``question_features``). ``kmeans`` (k-means++ seeding, Lloyd iterations, the best of ``n_init`` starts) clusters
them; ``choose_k`` picks the number of clusters with the highest mean silhouette (``silhouette``: for each point,
``(b − a) / max(a, b)`` with ``a`` its mean distance to its own cluster and ``b`` to the nearest other cluster). The
same centroids route a new question at inference (pass 1 of two-pass inference: the nearest centroid).
"""
from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def question_features(model, tokenizer, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """(N, D) L2-normalized mean last hidden state over each question's tokens (``<|bos|>`` + question)."""
    from ..data.tokenizer import encode_prompts, pad_id

    rows, out = encode_prompts(tokenizer, list(prompts)), []
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.tensor([r + [pad_id(tokenizer)] * (width - len(r)) for r in chunk], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1].float()
        mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
    model.train(was)
    return torch.cat(out)


def kmeans(x: torch.Tensor, k: int, iters: int = 100, n_init: int = 4, seed: int = 0):
    """(labels (N,), centroids (k, D), inertia) of the best of ``n_init`` k-means++ starts."""
    if not 1 <= k <= len(x):
        raise ValueError(f"k must be in [1, {len(x)}], got {k}")
    g = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(n_init):
        centroids = x[torch.randint(len(x), (1,), generator=g)]
        while len(centroids) < k:  # k-means++: the next seed drawn with probability ~ squared distance
            d2 = torch.cdist(x, centroids).min(1).values ** 2
            probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / len(d2))  # all points seeded
            centroids = torch.cat([centroids, x[torch.multinomial(probs, 1, generator=g)]])
        for _ in range(iters):
            labels = torch.cdist(x, centroids).argmin(1)
            new = torch.stack([x[labels == j].mean(0) if (labels == j).any() else centroids[j] for j in range(k)])
            if torch.allclose(new, centroids):
                break
            centroids = new
        labels = torch.cdist(x, centroids).argmin(1)
        inertia = float(((x - centroids[labels]) ** 2).sum())
        if best is None or inertia < best[2]:
            best = (labels, centroids, inertia)
    return best


def silhouette(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette of the clustering (points alone in their cluster count 0, as in scikit-learn)."""
    d = torch.cdist(x, x)
    ks = labels.unique()
    if len(ks) < 2:
        return 0.0
    scores = []
    for i in range(len(x)):
        own = labels == labels[i]
        n_own = int(own.sum())
        if n_own == 1:
            scores.append(0.0)
            continue
        a = float(d[i][own].sum()) / (n_own - 1)
        b = min(float(d[i][labels == j].mean()) for j in ks if j != labels[i])
        scores.append((b - a) / max(a, b) if max(a, b) > 0 else 0.0)
    return sum(scores) / len(scores)


def choose_k(x: torch.Tensor, ks: Sequence[int], seed: int = 0) -> dict:
    """Cluster with every k of ``ks``; keep the one with the highest silhouette. Returns k, labels, centroids and the
    silhouette of every k tried."""
    tried = {}
    for k in ks:
        labels, centroids, inertia = kmeans(x, k, seed=seed)
        tried[int(k)] = {"silhouette": silhouette(x, labels), "inertia": inertia, "labels": labels,
                         "centroids": centroids}
    k = max(tried, key=lambda key: tried[key]["silhouette"])
    return {"k": k, "labels": tried[k]["labels"], "centroids": tried[k]["centroids"],
            "silhouettes": {key: v["silhouette"] for key, v in tried.items()},
            "inertias": {key: v["inertia"] for key, v in tried.items()}}


def route(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Pass 1: the nearest centroid of each question's feature."""
    return torch.cdist(features, centroids).argmin(1)
