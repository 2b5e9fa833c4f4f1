"""Phase 7 views: accuracy per family for the base, every expert, the routed model and the oracle; how the model's
own clusters split the families (and the 2-D picture); each expert's singular-value scaling per matrix; the unseen
family's mixture; the routing search; and a playground showing which expert a typed question goes to."""
from __future__ import annotations


import matplotlib.pyplot as plt

from .. import paths
from ..results import load_report  # noqa: F401  (the notebooks import it from here)


def accuracy_frame(report: dict):
    """Test accuracy per family (rows) of the base, each expert, the routed model and the oracle (any expert)."""
    import pandas as pd

    t = report["test"]
    fams, table, k = t["families"], t["correct"], report["k"]
    rows = {}
    for fam in sorted(set(fams)):
        idx = [i for i, f in enumerate(fams) if f == fam]
        row = {name: sum(table[name][i] for i in idx) / len(idx) for name in table}
        row["oracle"] = sum(any(table[f"expert_{c}"][i] for c in range(k)) for i in idx) / len(idx)
        row["routed to"] = ", ".join(f"{c}: {sum(1 for i in idx if t['route'][i] == c)}" for c in range(k))
        rows[fam] = row
    frame = pd.DataFrame(rows).T
    frame.attrs["note"] = "exact match on the test split; chance is about 0 (open-ended answers)"
    return frame


def cluster_frame(report: dict):
    """Discovery questions per family and cluster, and the silhouette of every k tried."""
    import pandas as pd

    frame = pd.DataFrame(report["discovery"]).T
    frame.columns = [f"cluster {c}" for c in frame.columns]
    frame.attrs["silhouettes"] = {int(k): round(v, 3) for k, v in report["silhouettes"].items()}
    return frame


def plot_clusters(report: dict) -> "plt.Figure":
    """The discovery questions' hidden states in 2-D (PCA): colour = the model's cluster, marker = family."""
    proj = report["features_2d"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    markers = dict(zip(sorted(set(proj["family"])), "o^sDvP*X"))
    for family, marker in markers.items():
        idx = [i for i, f in enumerate(proj["family"]) if f == family]
        ax.scatter([proj["xy"][i][0] for i in idx], [proj["xy"][i][1] for i in idx], marker=marker, s=18,
                   c=[f"C{proj['label'][i]}" for i in idx], label=family, alpha=0.7)
    ax.set_title(f"Hidden states of the discovery questions (colour: cluster of {report['k']})")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=8, title="family (marker)")
    fig.tight_layout()
    return fig


def plot_scalings(report: dict) -> "plt.Figure":
    """Per expert, a heatmap of the factor each singular value is multiplied by (rows: matrices; columns: the
    singular values from largest to smallest); the colour scale is symmetric around 1 (unchanged)."""
    import numpy as np

    experts = report["scalings"]
    spread = max((abs(x - 1.0) for per in experts.values() for v in per.values() for x in v), default=0.0) or 0.1
    fig, axes = plt.subplots(1, len(experts), figsize=(5 * len(experts), 3.6), squeeze=False)
    for ax, (name, per_matrix) in zip(axes[0], experts.items()):
        names = list(per_matrix)
        width = max(len(v) for v in per_matrix.values())
        grid = np.full((len(names), width), np.nan)
        for r, n in enumerate(names):
            grid[r, :len(per_matrix[n])] = per_matrix[n]
        image = ax.imshow(grid, aspect="auto", cmap="coolwarm", vmin=1.0 - spread, vmax=1.0 + spread)
        ax.set_yticks(range(len(names)), [n.split("layers.")[-1] for n in names], fontsize=6)
        ax.set_xlabel("singular value index (largest first)")
        ax.set_title(name)
        fig.colorbar(image, ax=ax, fraction=0.04)
    fig.suptitle("Singular-value scaling of each expert (1 = unchanged)")
    fig.tight_layout()
    return fig


def unseen_frame(report: dict):
    """Test accuracy on the family no expert trained for: the base, each expert alone and their mixture; the
    mixture's weights as ``attrs["alphas"]`` and explained in ``attrs["note"]`` (empty frame: no unseen family)."""
    import pandas as pd

    u = report.get("unseen")
    if not u:
        return pd.DataFrame()
    frame = pd.DataFrame([u["test"]], index=[u["family"]]).round(3)
    frame.attrs["alphas"] = [round(a, 3) for a in u["alphas"]]
    weights = ", ".join(f"expert {k}: {a:+.2f}" for k, a in enumerate(u["alphas"]))
    frame.attrs["note"] = (f"mixture weights ({weights}): the per-expert coefficients the mixture search (CEM, on "
                           f"{u['family']} questions no expert trained on) found; the mixture's vector is Σ α_k·z_k "
                           "of the experts' SVF vectors z_k, so a negative weight subtracts that expert's "
                           "adjustment, 0 leaves it out and 1 adds it as trained")
    return frame


def plot_search(report: dict) -> "plt.Figure":
    """Every routing setting the search evaluated: accuracy against seconds per question; the Pareto front joined."""
    s = report.get("search") or {"points": [], "pareto": []}
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.scatter([p["seconds"] * 1000 for p in s["points"]], [p["accuracy"] for p in s["points"]], s=16, alpha=0.6)
    front = s["pareto"]
    ax.plot([p["seconds"] * 1000 for p in front], [p["accuracy"] for p in front], "o-", color="C3",
            label="Pareto front")
    ax.set_xlabel("ms per question (both passes)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Routing search: strength and confidence gate (CMA-ES)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def routed_lines(svf, tokenizer, experts, centroids, question: str, max_new_tokens: int = 40) -> list[str]:
    """What the playground prints: the chosen expert and the distances, the base answer and each expert's."""
    from ..experts.discover import question_features, route
    from ..experts.train import base_weights
    from ..tools import generate_with_tools

    with base_weights(svf):
        feats = question_features(svf, tokenizer, [question])
        base = generate_with_tools(svf, tokenizer, [question], max_new_tokens)[0].text
    import torch

    distances = torch.cdist(feats, centroids)[0].tolist()
    chosen = int(route(feats, centroids)[0])
    lines = [f"pass 1: expert {chosen} (distances to the centroids {[round(d, 3) for d in distances]})",
             f"base (no expert)  : {base!r}"]
    saved = svf.get_z()
    for c, z in enumerate(experts):
        svf.load_z(z)
        text = generate_with_tools(svf, tokenizer, [question], max_new_tokens)[0].text
        lines.append(f"expert {c}{' (chosen)' if c == chosen else '         '}: {text!r}")
    svf.load_z(saved)
    return lines


def expert_playground(result, max_new_tokens: int = 40):
    """Type a question and press Enter (or Run): which expert pass 1 chooses, and the answers without an expert and
    with each expert; example questions per family below."""
    import torch
    from transformers import AutoTokenizer

    from ..experts import apply_svf, load_expert
    from ..quietstar import base_lm
    from ..modelio import load_lm
    from .cognate import playground_widget, prompt_examples, suite_answers

    folder = paths.resolve(result.models["model"]["path"])
    model = base_lm(load_lm(folder))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    experts_dir = paths.resolve(result.artifacts["experts"])
    router = torch.load(experts_dir / "router.pt", weights_only=True)
    svf = apply_svf(model.eval())
    experts = [load_expert(experts_dir / f"expert_{c}.safetensors") for c in range(router["k"])]
    report = load_report(result)
    families = sorted(report["discovery"])
    lo, hi = report.get("levels", [1, 2])
    return playground_widget(lambda q: routed_lines(svf, tokenizer, experts, router["centroids"], q, max_new_tokens),
                             prompt_examples(families, lo), suite_answers(families, range(lo, hi + 1)))
