"""Phase 1 views: per-family accuracy table, ACT cycle histogram, and a prompt playground widget."""
from __future__ import annotations

import json

import matplotlib.pyplot as plt

from .. import paths


def load_report(result) -> dict:
    """The phase's report.json (per-model accuracy, answer loss, ACT cycles, disagreement)."""
    return json.loads(paths.resolve(result.artifacts["report"]).read_text())


def accuracy_frame(report: dict, key: str = "accuracy"):
    """Families × models table of ``key`` ('accuracy' or 'answer_nll') on the test split; the accuracy table
    has a ``chance`` column (the best constant answer per family) and a ``mean`` row."""
    import pandas as pd

    frame = pd.DataFrame({name: m[key] for name, m in report["models"].items()})
    if key == "accuracy" and "chance" in report:
        frame["chance"] = pd.Series(report["chance"])
    frame.loc["mean"] = frame.mean()
    return frame.round(3)


def headroom_frame(report: dict):
    """The trunk's accuracy per family at the harder headroom levels (empty when none were measured)."""
    import pandas as pd

    headroom = report.get("headroom")
    if not headroom:
        return pd.DataFrame()
    levels = "-".join(str(level) for level in headroom["levels"])
    frame = pd.DataFrame({f"trunk, levels {levels}": headroom["trunk_accuracy"]})
    frame.loc["mean"] = frame.mean()
    return frame.round(3)


def plot_act_histogram(report: dict) -> "plt.Figure":
    """Share of tokens that used 1, 2, … recursion cycles (inference, ACT halting on), one bar per model."""
    import numpy as np

    models = report["models"]
    top = int(max(max(m["cycles"], default=1) for m in models.values()))
    xs = np.arange(1, top + 1)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(6.5, 3))
    for k, (name, m) in enumerate(models.items()):
        counts = np.bincount(np.asarray(m["cycles"], dtype=int), minlength=top + 1)[1:]
        ax.bar(xs + (k - (len(models) - 1) / 2) * width, counts / max(1, counts.sum()), width,
               label=f"{name} (mean {m['mean_cycles']:.2f})")
    ax.set_xticks(xs)
    ax.set_xlabel("cycles used per token")
    ax.set_ylabel("share of tokens")
    ax.set_title("ACT: cycles per token on the test split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def specialist_playground(result, roles=("trunk", "reasoning", "memory", "speed"), max_new_tokens: int = 48):
    """Type a prompt; see each model's greedy answer and the cycles each prompt token used."""
    import ipywidgets as w
    import torch

    from ..data.tokenizer import encode_prompts
    from ..models.loading import load_causal_lm
    from transformers import AutoTokenizer

    models = {r: load_causal_lm(paths.resolve(result.models[r]["path"])).eval() for r in roles}
    tokenizer = AutoTokenizer.from_pretrained(paths.resolve(result.models["tokenizer"]["path"]))
    text = w.Text(value="34+50=", description="prompt")
    out = w.Output()

    def answer(change=None):
        out.clear_output()
        ids = torch.tensor(encode_prompts(tokenizer, [text.value]))
        with out, torch.no_grad():
            for role, model in models.items():
                gen = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
                reply = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
                cycles = model(input_ids=ids).act_cycles[0].tolist()
                print(f"{role:>9}: {reply!r:36} cycles per prompt token {cycles}")

    text.observe(answer, names="value")
    answer()
    return w.VBox([text, out])
