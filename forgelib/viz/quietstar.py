"""Phase 3 views: the test table (Phase-2 model, thoughts, thoughts off, pause tokens, chance), whether the model
is handed on thinking and why, the thoughts benchmark's table (``forge bench quietstar``), answer NLL with and
without thoughts over training, a heatmap of mixing weights per token, and a thinking playground."""
from __future__ import annotations

import matplotlib.pyplot as plt

from .. import paths
from ..results import load_report  # noqa: F401  (the notebooks import it from here)

ROW_LABELS = {"base": "Phase-2 model (start)", "thoughts": "Quiet-STaR, thinking", "no_thoughts":
              "Quiet-STaR weights, thoughts off", "pause": "pause tokens (ablation)"}


def score_frame(report: dict):
    """Test-split accuracy (exact match of the worked solution's answer), per family, and answer NLL for each
    model; the last row is chance (the best constant answer per family)."""
    import pandas as pd

    rows = {}
    for key, row in report["test"].items():
        rows[ROW_LABELS.get(key, key)] = {"accuracy": row["accuracy"], "answer NLL": row["answer_nll"],
                                          **{f"acc {f}": a for f, a in row["per_family"].items()}}
    chance = report["chance"]
    rows["chance"] = {"accuracy": chance["overall"], "answer NLL": float("nan"),
                      **{f"acc {f}": a for f, a in chance["per_family"].items()}}
    return pd.DataFrame(rows).T.astype(float).round(4)


def decision_text(report: dict) -> str:
    """Whether Phase 3 handed its model on thinking, the rule and the measured numbers (``report["decision"]``)."""
    decision = report.get("decision")
    if decision is None:
        return "this run predates the thinking decision: its model is handed on thinking"
    verdict = decision["verdict"]
    text = (f"handed on {'THINKING' if decision['thinking'] else 'WITHOUT THOUGHTS'}: {decision['reason']} "
            f"(questions needed at the observed disagreement: {verdict['needed']})\nrule: {decision['rule']}")
    weights = report.get("weights")
    if weights is not None and not decision["thinking"]:
        whose = "its TRAINED weights" if weights["weights"] == "trained" else "the PHASE-2 MODEL'S weights"
        text += f"\nweights: {whose}" + (f": {weights['reason']}" if weights["reason"] else "")
        text += f"\nrule: {weights['rule']}"
    return text


ARM_LABELS = {"plain": "continued training", "quietstar": "Quiet-STaR", "pause": "pause tokens",
              "random": "random thoughts"}


def _arm_steps(equal: dict, arm: str):
    """An arm's training steps: one number (files before 12-07), else each seed's, '/'-joined where they differ."""
    if "steps" in equal:
        return equal["steps"][arm]
    values = sorted({seed[arm] for seed in equal.get("steps_per_seed", [])})
    return values[0] if len(values) == 1 else "/".join(map(str, values))


def bench_frame(files=None):
    """The thoughts benchmark at equal forward compute (``forge bench quietstar``, one JSON per start model): per
    start model and arm, test accuracy and answer NLL (mean ± 95 % t-interval over training seeds), steps and
    forward tokens, and Quiet-STaR's paired gain over each other arm. ``files``: JSON paths (default: every
    ``outputs/bench/quietstar*.json``); an empty frame whose ``attrs["note"]`` names the command when there is none."""
    import json

    import pandas as pd

    files = sorted(paths.outputs_root().glob("bench/quietstar*.json")) if files is None else [paths.resolve(f)
                                                                                                 for f in files]
    rows = []
    for f in files:
        data = json.loads(f.read_text())
        start = data["phase2"]
        for arm, acc in data["accuracy"].items():
            nll = data["answer_nll"][arm]
            gain = data.get("quietstar_gain", {}).get(f"over_{arm}", {}).get("accuracy")
            rows.append({"start model": start, "arm": ARM_LABELS.get(arm, arm), "seeds": acc["n"],
                         "accuracy": f"{acc['mean']:.3f} ± {acc['ci95']:.3f}",
                         "answer NLL": f"{nll['mean']:.3f} ± {nll['ci95']:.3f}",
                         "steps": _arm_steps(data["equal_compute"], arm),
                         "forward tokens": int(data["forward_tokens"][arm]),
                         "Quiet-STaR gain": "" if gain is None else f"{gain['mean']:+.3f} ± {gain['ci95']:.3f}"})
    frame = pd.DataFrame(rows)
    frame.attrs["note"] = ("equal forward compute per arm; seeds vary the training seed only (one start model and one "
                           "test set per file)" if rows else
                           "no thoughts benchmark yet: run `.venv/bin/forge bench quietstar --seeds 3` (writes "
                           "outputs/bench/quietstar-<time>.json; --phase2 FOLDER picks the start model)")
    return frame


def plot_nll_curves(report: dict) -> "plt.Figure":
    """Answer NLL on the curve samples over training, with thoughts (solid) and with them off (dashed), for the
    Quiet-STaR model and the pause-token model; step 0 is the Phase-2 model."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for k, (arm, history) in enumerate(report["training"].items()):
        steps = [e["step"] for e in history["evals"]]
        ax.plot(steps, [e["nll_thoughts"] for e in history["evals"]], "o-", color=f"C{k}", label=f"{arm}: thinking")
        ax.plot(steps, [e["nll_no_thoughts"] for e in history["evals"]], "x--", color=f"C{k}", alpha=0.6,
                label=f"{arm}: thoughts off")
    ax.set_xlabel("training step")
    ax.set_ylabel("answer NLL (nats/token)")
    ax.set_title("Answer NLL with and without thoughts (curve samples, test split)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_mixing_heatmap(report: dict, max_tokens: int = 40) -> "plt.Figure":
    """Mixing weight ``w`` given to the thought before each token (rows: test samples; columns: the tokens
    predicted, answer tokens in bold; a sample longer than ``max_tokens`` shows its last ``max_tokens``, where the
    answer is). 0 = the base prediction alone, 1 = the post-thought prediction alone."""
    rows = report["heatmap"]
    if not rows:
        fig, ax = plt.subplots(figsize=(6, 1))
        ax.text(0.5, 0.5, "no heatmap samples (heatmap_samples: 0)", ha="center")
        ax.axis("off")
        return fig
    width = min(max_tokens, max(len(r["tokens"]) for r in rows))
    import numpy as np

    grid = np.full((len(rows), width), np.nan)
    rows = [{**row, **{k: row[k][-width:] for k in ("tokens", "weights", "answer")}} for row in rows]
    for i, row in enumerate(rows):
        weights = row["weights"]
        grid[i, :len(weights)] = weights
    fig, ax = plt.subplots(figsize=(max(7, 0.5 * width + 2.5), 1.2 + 0.7 * len(rows)))
    top = max(0.05, float(np.nanmax(grid)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=top)
    for i, row in enumerate(rows):
        for j, (token, is_answer) in enumerate(zip(row["tokens"][:width], row["answer"][:width])):
            bright = not np.isnan(grid[i, j]) and grid[i, j] > 0.6 * top  # dark text on the light end of viridis
            special = token.startswith("<|") and token.endswith("|>")  # <|eos|> written eos, smaller: one cell
            ax.text(j, i, token[2:-2] if special else token.replace("$", r"\$"), ha="center", va="center",
                    fontsize=TOKEN_FONTSIZE - 2 if special else TOKEN_FONTSIZE, color="black" if bright else "white",
                    fontweight="bold" if is_answer else "normal")
    ax.set_yticks(range(len(rows)), [_cut(r["prompt"], 32) for r in rows], fontsize=LABEL_FONTSIZE)
    ax.set_xticks([])
    ax.set_title("Mixing weight per predicted token (bold: answer tokens)", fontsize=LABEL_FONTSIZE + 2)
    fig.colorbar(image, ax=ax, fraction=0.03, label="w")
    fig.tight_layout()
    return fig


TOKEN_FONTSIZE = 10
"""Points of the token written in each heatmap cell (a cell is half an inch wide)."""
LABEL_FONTSIZE = 9


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _pieces(tokenizer, ids) -> str:
    """A thought as its token pieces separated by '|' (so that single-character tokens stay visible)."""
    return "|".join(tokenizer.decode([i]) for i in ids)


def thought_lines(model, tokenizer, prompt: str, max_new_tokens: int = 48) -> list[str]:
    """What the playground prints for ``prompt``: the answer with thoughts, each thought and weight, and the
    answer of the same weights with thoughts off."""
    from ..quietstar import generate_with_thoughts

    trace = generate_with_thoughts(model, tokenizer, prompt, max_new_tokens)
    with model.no_thoughts():
        plain = generate_with_thoughts(model, tokenizer, prompt, max_new_tokens)
    lines = [f"answer (thinking):     {trace.text!r}", f"answer (thoughts off): {plain.text!r}",
             "token   | w     | thought before it"]
    lines += [f"{s['token']!r:7} | {s['weight']:.3f} | {_pieces(tokenizer, s['thought_ids'])!r}" for s in trace.steps]
    return lines


def thought_playground(result, max_new_tokens: int = 48):
    """Type a prompt and press Enter (or Run): the Quiet-STaR model's answer, the thought sampled before each
    answer token with its mixing weight, and the answer with thoughts off; example prompts per family below."""
    from ..modelio import load_quietstar
    from .cognate import playground_widget, prompt_examples, suite_answers

    model = load_quietstar(paths.resolve(result.models["model"]["path"]))
    model.thinking = True  # shown thinking even when handed on without thoughts (decision_text says which)
    tokenizer = _tokenizer(result)
    report = load_report(result)
    families = report["families"]
    lo, hi = report.get("levels", [1, 2])
    return playground_widget(lambda prompt: thought_lines(model, tokenizer, prompt, max_new_tokens),
                             prompt_examples(families, lo), suite_answers(families, range(lo, hi + 1)))


def _tokenizer(result):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(paths.resolve(result.models["model"]["path"]))
