"""Phase 5 views: accuracy of the asked questions per round, level reached per family, accuracy per level before
and after, pool statistics (retired, variants, hints), the calculator's record, and a question-pool browser."""
from __future__ import annotations

import json

import matplotlib.pyplot as plt

from ..results import load_report  # noqa: F401  (the notebooks import it from here)


def plot_rounds(report: dict) -> "plt.Figure":
    """Share of the asked questions answered right per round and family, annotated with the level asked."""
    history = report["history"]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    families = sorted({f for row in history for f in row["asked"]})
    for k, family in enumerate(families):
        xs = [row["round"] for row in history if row["asked"].get(family)]
        ys = [row["correct"][family] / row["asked"][family] for row in history if row["asked"].get(family)]
        ax.plot(xs, ys, "o-", color=f"C{k}", label=family)
        for row, y in zip([r for r in history if r["asked"].get(family)], ys):
            ax.annotate(f"L{row['levels'][family]}", (row["round"], y), fontsize=7, xytext=(2, 3),
                        textcoords="offset points")
    lo, hi = report["band"]
    ax.axhspan(lo, hi, color="0.9", zorder=0, label="target band")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("round")
    ax.set_ylabel("asked questions answered right")
    ax.set_title("Curriculum rounds (label: level asked)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def level_frame(report: dict):
    """Per family: start level (assessment), level reached, and test accuracy per level before and after (the levels
    the guard or the teaching checks asked; a family whose levels none of them asked, e.g. ``tool`` before it
    mastered a level, shows its levels only)."""
    import pandas as pd

    rows = {}
    before, after = report["acc_by_level"]["before"], report["acc_by_level"]["after"]
    for family, reached in report["level_reached"].items():
        row = {"start level": report["start_levels"][family], "level reached": reached}
        for level in sorted(after.get(family, {}), key=int):
            row[f"L{level} before"] = round(before[family][level], 3)
            row[f"L{level} after"] = round(after[family][level], 3)
        rows[family] = row
    return pd.DataFrame(rows).T


def pool_frame(report: dict):
    """Per family's question pool: questions, retired, active, variants spawned, answers given, accuracy."""
    import pandas as pd

    keys = ("questions", "retired", "active", "pending", "with_hint", "variants_spawned", "answers", "accuracy")
    frame = pd.DataFrame({f: {k: s.get(k) for k in keys} for f, s in report["pools"].items()}).T
    frame["answers given with a hint"] = [sum(1 for row in report["question_pool"].get(f, []) for h in row["history"]
                                              if h.get("hints")) for f in frame.index]
    return frame


def tool_frame(report: dict):
    """The ``tool`` family answered with and without the calculator: accuracy, calls, calls that returned a value."""
    import pandas as pd

    tool = report.get("tool")
    if not tool:
        return pd.DataFrame()
    keys = ("accuracy", "calls", "calls_ok", "tool_success_rate", "samples_with_call", "samples")
    return pd.DataFrame({"with calculator": {k: tool["with"][k] for k in keys},
                         "without": {k: tool["without"][k] for k in keys}}).T


def question_browser(report: dict):
    """Pick a family and a question: its prompt, answer, lineage, hints and every answer the model gave."""
    import html

    import ipywidgets as w

    pools = report["question_pool"]
    family = w.Dropdown(options=sorted(pools), description="family")
    question = w.Dropdown(description="question", layout=w.Layout(width="70%"))
    out = w.HTML()

    def fill(change=None) -> None:
        rows = pools[family.value]
        question.options = [(f"#{r['qid']} {r['status']}: {r['prompt'][:40]}", i) for i, r in enumerate(rows)]

    def show(change=None) -> None:
        if question.value is None:
            out.value = ""
            return
        row = pools[family.value][question.value]
        items = "".join(f"<li>{html.escape(str(h))}</li>" for h in row.get("history", []))
        facts = {k: v for k, v in row.items() if k not in ("history", "prompt")}
        out.value = (f"<b>{html.escape(row['prompt'])}</b><br><code>{html.escape(json.dumps(facts))}</code>"
                     f"<ol>{items}</ol>")

    family.observe(fill, names="value")
    question.observe(show, names="value")
    fill()
    show()
    return w.VBox([w.HBox([family, question]), out])
