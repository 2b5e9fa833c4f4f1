"""Scorecard views: one table over every phase's model, accuracy against bytes on disk, accuracy per family."""
from __future__ import annotations

import matplotlib.pyplot as plt


def scorecard_frame(card: list[dict]):
    import pandas as pd

    frame = pd.DataFrame(card).set_index(["phase", "model"])
    frame.attrs["note"] = ("same test questions for every model; greedy exact match with the calculator, no "
                           "thoughts (chance about 0: open-ended answers); bytes: the model folder (Phase 7 with its "
                           "experts), the artifact file for Phase 8; tokens/s over the whole measurement")
    return frame


def plot_scorecard(card: list[dict]) -> "plt.Figure":
    families = [k.removeprefix("acc_") for k in card[0] if k.startswith("acc_")] if card else []
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for i, r in enumerate(card):
        a.scatter(r["bytes"] / 1024, r["accuracy"], color=f"C{i % 10}", s=40)
        a.annotate(f"{r['phase'].split()[0]}:{r['model']}", (r["bytes"] / 1024, r["accuracy"]), fontsize=7,
                   xytext=(3, 3), textcoords="offset points")
    a.set_xscale("log")
    a.set_xlabel("KiB on disk (log)")
    a.set_ylabel("exact-match accuracy")
    a.set_title("Every phase's model: accuracy against size")
    width = 0.8 / max(1, len(card))
    for i, r in enumerate(card):
        a_vals = [r.get(f"acc_{f}") or 0 for f in families]
        b.bar([j + i * width for j in range(len(families))], a_vals, width,
              label=f"{r['phase'].split()[0]}:{r['model']}",
              color=f"C{i % 10}")
    b.set_xticks([j + 0.4 - width / 2 for j in range(len(families))], families)
    b.set_ylabel("accuracy")
    b.set_title("Accuracy per family")
    b.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig
