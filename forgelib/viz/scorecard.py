"""Scorecard views: one compact table over every phase's model, accuracy per family in a second one, accuracy
against bytes on disk, accuracy per family as bars."""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib import ticker

from .format import human_bytes, sig

NOTE = ("same test questions for every model; greedy exact match with the calculator, no thoughts (chance about 0: "
        "open-ended answers); gate: the phase's own gate (gate-failed: it failed under run.gates: warn, not "
        "enforced); size: the model folder without its tokenizer (Phase 7 with its experts), the artifact file for "
        "Phase 8; bits/value: 8 × size / stored values (tied weights once); tokens/s: greedy decoding of one batch of "
        "16 questions by the model alone, the fastest of at least 3 timed runs after a warm-up. It is still noisy on a "
        "shared machine (runs of the same model differed by up to 2×): compare models within one scorecard, not "
        "across runs")


def model_label(row: dict) -> str:
    """``3 quietstar``; ``1 cognate trunk`` where a phase has several models (its role named)."""
    return row["phase"] if row["model"] == "model" else f"{row['phase']} {row['model']}"


def scorecard_frame(card: list[dict]):
    """One row per model, a few short columns: its phase's gate (``pass``, or ``gate-failed`` for a phase whose gate
    failed under ``run.gates: warn``), size, bits per value, perplexity (3 significant digits), accuracy, experts,
    tokens per second (``family_frame``: the accuracy per family)."""
    import pandas as pd

    rows = {model_label(r): {"gate": r.get("gate", ""), "size": human_bytes(r["bytes"]),
                             "bits/value": sig(r["bits_per_value"]), "ppl": sig(r["ppl"]),
                             "accuracy": round(r["accuracy"], 3), "experts": r["experts"],
                             "tokens/s": int(sig(r["tokens_per_s"], 2)) if r.get("tokens_per_s") else None}
            for r in card}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "model"
    frame.attrs["note"] = NOTE
    return frame


def family_frame(card: list[dict]):
    """Accuracy per task family (columns) of every model (rows), 2 decimals."""
    import pandas as pd

    families = [k.removeprefix("acc_") for k in card[0] if k.startswith("acc_")] if card else []
    frame = pd.DataFrame.from_dict({model_label(r): {f: r.get(f"acc_{f}") for f in families} for r in card},
                                   orient="index").round(2)
    frame.index.name = "model"
    return frame


def plot_scorecard(card: list[dict]) -> "plt.Figure":
    """Accuracy against size (left) and per family (right); one colour per model, named once in a shared legend
    below the plots (labels written beside the points overlapped: the full-precision models share one size)."""
    families = [k.removeprefix("acc_") for k in card[0] if k.startswith("acc_")] if card else []
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    markers = "os^Dv"
    for i, r in enumerate(card):
        a.scatter(r["bytes"] / 1024, r["accuracy"], color=f"C{i % 10}", marker=markers[i // 10 % len(markers)], s=50,
                  label=model_label(r), alpha=0.85)
    a.set_xscale("log")
    a.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
    a.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))  # 200, not 2×10²
    a.xaxis.set_minor_formatter(ticker.NullFormatter())
    a.set_xlabel("KiB on disk (log)")
    a.set_ylabel("exact-match accuracy")
    a.set_title("Every phase's model: accuracy against size")
    width = 0.8 / max(1, len(card))
    for i, r in enumerate(card):
        b.bar([j + i * width for j in range(len(families))], [r.get(f"acc_{f}") or 0 for f in families], width,
              color=f"C{i % 10}")
    b.set_xticks([j + 0.4 - width / 2 for j in range(len(families))], families, rotation=30, ha="right")
    b.set_ylabel("accuracy")
    b.set_title("Accuracy per family")
    fig.legend(*a.get_legend_handles_labels(), loc="lower center", ncol=min(6, max(1, len(card))), fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(card) - 1) // 6), 1, 1))
    return fig
