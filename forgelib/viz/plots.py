"""Figures for the notebooks. Each function returns a matplotlib Figure and never calls ``show``."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import matplotlib.pyplot as plt


def plot_phase_durations(outcomes: Iterable) -> "plt.Figure":
    """Bar chart of each phase's wall-clock seconds (as recorded in its result), with its gate status."""
    outcomes = [o for o in outcomes if o.result is not None]
    fig, ax = plt.subplots(figsize=(6, 2.8))
    names = [o.spec.dirname for o in outcomes]
    secs = [o.result.duration_s for o in outcomes]
    colors = ["tab:green" if o.result.gate_passed else "tab:red" for o in outcomes]
    ax.barh(names, secs, color=colors)
    ax.set_xlabel("seconds (phase run)")
    ax.set_title("pipeline: phase durations (green = gate passed)")
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def plot_metric_rows(rows: Sequence[dict], keys: Sequence[str], title: str = "", logy: bool = False,
                     ylabel: str = "") -> "plt.Figure":
    """Line plot of ``keys`` against ``step`` from tracker rows (metrics.jsonl); missing keys are skipped."""
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int,
                                                                               float)) and r.get("step") is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_history(metrics_path: str | Path, prefix_keys: dict[str, str] | None = None,
                 title: str = "loss") -> "plt.Figure":
    """Loss curves of every training run logged in a phase's metrics.jsonl (keys ending in '/loss')."""
    from ..tracking import read_jsonl

    rows = read_jsonl(metrics_path)
    keys = sorted({k for r in rows for k in r if k.endswith("/loss") and "/eval/" not in k})
    return plot_metric_rows(rows, keys, title=title, ylabel="training loss")
