"""Phase 6 views: each prompt's effect before and after teaching and after baking, the held-out KL against step of
every bake (the half-baking curve), the cycles, drift on unrelated questions, and a playground that shows the
prompted, unprompted and baked answers side by side."""
from __future__ import annotations


import matplotlib.pyplot as plt

from .. import paths
from ..results import load_report  # noqa: F401  (the notebooks import it from here)


def effect_frame(report: dict):
    """Accuracy and adherence to each prompt on the test questions: the input model (no prompt / each prompt),
    the taught model (no prompt / each prompt / all), the baked model with no prompt."""
    import pandas as pd

    names = [p["name"] for p in report["library"]]
    rows = []
    for stage, measured in (("input (Phase 5)", report["input"]), ("taught", report["taught"])):
        for key, row in measured.items():
            rows.append({"model": stage, "prompt": "none" if key == "none" else key, "accuracy": row["accuracy"],
                         **{f"adherence {n}": row["adherence"][n] for n in names}})
    rows.append({"model": "baked", "prompt": "none", "accuracy": report["after"]["accuracy"],
                 **{f"adherence {n}": report["after"]["adherence"][n] for n in names}})
    frame = pd.DataFrame(rows).set_index(["model", "prompt"]).round(3)
    frame.attrs["note"] = ("accuracy: exact match after the answer mark (persona prefixes removed); chance is about "
                           "0 (open-ended integer answers)")
    return frame


def plot_kl_curves(report: dict) -> "plt.Figure":
    """Held-out KL(prompted ‖ student) against bake step for every cycle; the dashed level is the unbaked KL."""
    cycles = report["cycles"]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for k, row in enumerate(cycles):
        steps = [p["step"] for p in row["curve"]]
        ax.plot(steps, [p["kl"] for p in row["curve"]], "o-", color=f"C{k}",
                label=f"cycle {row['cycle']}: {row['prompt']} (gap closed {row['gap_closed']:.2f})")
        ax.axhline(row["kl_unbaked"], color=f"C{k}", ls="--", lw=0.8)
    ax.set_xlabel("bake step")
    ax.set_ylabel("held-out KL(prompted ‖ model) per token")
    ax.set_title("Baking: KL against step (dashed: unbaked)")
    if cycles:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def cycle_frame(report: dict):
    """One row per bake: prompt, kept (False: its pass did not raise the library gap enough and was undone),
    held-out KL unbaked/baked, gap closed, no-prompt adherence and accuracy after it, seconds; and the library gap
    after each full pass."""
    import pandas as pd

    rows = [{"cycle": r["cycle"], "prompt": r["prompt"], "kept": r.get("kept", True),
             "kl_unbaked": r["kl_unbaked"], "kl_baked": r["kl_baked"],
             "gap_closed": r["gap_closed"], "accuracy after": r["accuracy_after"],
             **{f"adherence {n}": v for n, v in r["adherence_after"].items()}, "seconds": r["seconds"]}
            for r in report["cycles"]]
    frame = pd.DataFrame(rows).round(3)
    for p in report["passes"]:
        frame.loc[frame["cycle"] == p["after_cycle"], "library gap closed"] = round(p["gap_closed_library"], 3)
    return frame


def drift_frame(report: dict):
    """Drift on unrelated questions: KL(input ‖ baked) per answer token and their accuracy before/after."""
    import pandas as pd

    d = report["drift"]
    return pd.DataFrame([{"families": ", ".join(d["families"]), "questions": d["n"], "KL per token": d["kl_per_token"],
                          "accuracy input": d["acc_before"], "accuracy baked": d["acc_after"]}]).round(3)


def side_by_side_lines(models: dict, tokenizer, prompt_text: str, question: str, max_new_tokens: int = 48) -> list[str]:
    """The answers the playground prints: the taught model with the prompts, without them, the baked model."""
    from ..tools import generate_with_tools

    runs = [("prompted (taught model)", models["taught"], prompt_text), ("unprompted (taught model)",
                                                                         models["taught"], ""),
            ("baked, no prompt", models["baked"], "")]
    lines = [f"prompt text: {prompt_text!r}"]
    for label, model, pre in runs:
        text = generate_with_tools(model, tokenizer, [pre + question], max_new_tokens)[0].text
        lines.append(f"{label:27}: {text!r}")
    return lines


def baking_playground(result, max_new_tokens: int = 48):
    """Type a question and press Enter (or Run): the taught model's answer with the baked prompts before it, its
    answer without them, and the baked model's answer without them; example questions per family below."""
    from transformers import AutoTokenizer

    from ..baking.library import BakePrompt, prefix
    from ..quietstar import base_lm
    from ..modelio import load_lm
    from .cognate import playground_widget, prompt_examples, suite_answers

    def base(role):
        return base_lm(load_lm(paths.resolve(result.models[role]["path"])))

    models = {"taught": base("taught"), "baked": base("model")}
    tokenizer = AutoTokenizer.from_pretrained(paths.resolve(result.models["model"]["path"]))
    report = load_report(result)
    baked = {r["prompt"] for r in report["cycles"]}
    text = prefix([BakePrompt(**p) for p in report["library"] if p["name"] in baked])
    lo, hi = report.get("levels", [1, 2])
    return playground_widget(lambda q: side_by_side_lines(models, tokenizer, text, q, max_new_tokens),
                             prompt_examples(report["families"], lo), suite_answers(report["families"], range(lo,
                                                                                                              hi + 1)))
