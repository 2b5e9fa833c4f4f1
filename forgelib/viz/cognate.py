"""Phase 1 views: per-family accuracy table, ACT cycle histogram, and a prompt playground widget."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import matplotlib.pyplot as plt

from .. import paths
from ..results import load_report  # noqa: F401  (the notebooks import it from here)


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


def real_text_frame(report: dict):
    """Each model's perplexity on held-out real English prose and its ratio to the trunk's (a pretrained trunk only;
    empty otherwise, one ``unavailable`` row when the corpus is not installed)."""
    import pandas as pd

    measured = report.get("real_text_perplexity")
    if not measured:
        return pd.DataFrame()
    if "unavailable" in measured:
        return pd.DataFrame({"real-text perplexity": [measured["unavailable"]]}, index=["unavailable"])
    ppl, trunk = measured["perplexity"], measured["perplexity"].get("trunk")
    label = f"perplexity ({measured['documents']} test documents, windows of {measured['window']})"
    return pd.DataFrame({label: ppl, "/ trunk": {name: (round(v / trunk, 3) if v is not None and trunk else None)
                                                 for name, v in ppl.items()}})


def runtime_frame(report: dict):
    """Models × runtime settings (recursion, cycles, latent updates, supervision steps, memory, halting) as each
    model was trained and saved (empty for a report written before they were recorded)."""
    import pandas as pd

    return pd.DataFrame(report.get("runtime", {})).T


def cycles_frame(report: dict):
    """Test-time cycles of each model trained with recursion (Phase 1's ``cycles_curve``): own-family accuracy at 1
    cycle, at the trained count and at twice it, the paired gains with their lower bounds, and the cycles the model
    was handed on with (``cycles_decision``: the trained count only when it beat one cycle). Empty when no model
    recurses, or for a report written before it was measured."""
    import pandas as pd

    rows = {}
    decisions = report.get("cycles_decision", {})
    for name, curve in report.get("cycles_curve", {}).items():
        row = {f"acc at {c} cycle{'s' if c != '1' else ''}": a for c, a in curve["accuracy"].items()}
        for key, gain in curve["gains"].items():
            a, b = key.split("_minus_")
            row[f"gain {a} vs {b} (lower bound)"] = f"{gain['diff']:+.3f} ({gain['lower_bound']:+.3f})"
        if name in decisions:
            row["handed on at (cycles)"] = decisions[name]["cycles"]
        rows[f"{name} (trained at {curve['trained_cycles']}, {'+'.join(curve['families'])}, n={curve['n']})"] = row
    return pd.DataFrame(rows).T


def plot_act_histogram(report: dict) -> "plt.Figure":
    """Share of tokens that used 1, 2, … recursion cycles (inference, ACT halting on), one bar per model (a model
    with recursion ``trm`` counts supervision steps)."""
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
    ax.set_xlabel("cycles (trm: supervision steps) used per token")
    ax.set_ylabel("share of tokens")
    ax.set_title("ACT: cycles per token on the test split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def prompt_examples(families: Iterable[str] | None = None, level: int = 1, seed: int = 0) -> list[tuple[str, str, str]]:
    """One ``(family, prompt, expected answer)`` per task family, drawn from the suite's test split: the prompt
    format each family expects (the model answers with worked steps, then ``#`` and the answer)."""
    from ..data.tasks import generate, suite_families

    out = []
    for family in families or sorted(suite_families()):
        sample = generate(family, level, 1, "test", seed)[0]
        out.append((family, sample.prompt, sample.answer))
    return out


def suite_answers(families: Iterable[str] | None = None, levels: Iterable[int] = (1, 2), per_level: int = 200,
                  seed: int = 0) -> dict[str, str]:
    """``{prompt: expected answer}`` for a sample of the suite (every split, up to ``per_level`` prompts per
    family, level and split; fewer where a small level has fewer distinct prompts in a split), to name the
    expected answer when a typed prompt is one of the suite's problems."""
    from ..data.tasks import SPLITS, TaskSpaceExhaustedError, generate, suite_families

    answers = {}
    for family in families or sorted(suite_families()):
        for level in levels:
            for split in SPLITS:
                n = per_level
                while n > 0:
                    try:
                        answers.update({s.prompt: s.answer for s in generate(family, level, n, split, seed)})
                        break
                    except TaskSpaceExhaustedError:  # e.g. algebra level 3 holds ~150 'fitness' prompts
                        n //= 2
    return answers


def playground_lines(prompt: str, run: Callable[[str], Iterable[str]], answers: dict[str, str]) -> list[str]:
    """What the playground shows for ``prompt``: the expected answer when it is a suite sample, then ``run``'s
    lines (one per model)."""
    expected = answers.get(prompt)
    head = [f"expected answer: {expected!r} (a suite sample)" if expected is not None
            else "expected answer: unknown (not one of the suite's sampled prompts)"]
    return head + list(run(prompt))


def playground_widget(run: Callable[[str], Iterable[str]], examples: list[tuple[str, str, str]],
                      answers: dict[str, str], value: str = ""):
    """A prompt box that runs ``run`` on Enter or the Run button only (``continuous_update=False``: typing
    sends nothing), above a table of example prompts per family with their expected answers."""
    import html

    import ipywidgets as w

    text = w.Text(value=value or examples[0][1], description="prompt", continuous_update=False,
                  placeholder="a prompt, e.g. one of the examples below; Enter runs it",
                  layout=w.Layout(width="80%"))
    button = w.Button(description="Run", tooltip="run every model on the prompt")
    out = w.Output()
    rows = "".join(f"<tr><td>{html.escape(f)}</td><td><code>{html.escape(p)}</code></td>"
                   f"<td><code>{html.escape(a)}</code></td></tr>" for f, p, a in examples)
    table = w.HTML("<b>Example prompts</b> (copy one into the box)<table><tr><th>family</th><th>prompt</th>"
                   f"<th>expected answer</th></tr>{rows}</table>")

    def submit(change: Any = None) -> None:
        out.clear_output()
        with out:
            print("\n".join(playground_lines(text.value, run, answers)))

    text.observe(submit, names="value")
    button.on_click(submit)
    submit()
    return w.VBox([w.HBox([text, button]), out, table])


def specialist_playground(result, roles=("trunk", "reasoning", "memory", "speed"), max_new_tokens: int = 48):
    """Type a prompt and press Enter (or Run): each model's greedy answer and the cycles each prompt token used,
    the expected answer when the prompt is a suite sample, and one example prompt per family."""
    import torch

    from ..data.tokenizer import encode_prompts
    from ..modelio import load_causal_lm
    from transformers import AutoTokenizer

    models = {r: load_causal_lm(paths.resolve(result.models[r]["path"])).eval() for r in roles}
    tokenizer = AutoTokenizer.from_pretrained(paths.resolve(result.models["tokenizer"]["path"]))

    def run(prompt: str) -> list[str]:
        ids = torch.tensor(encode_prompts(tokenizer, [prompt]))
        lines = []
        with torch.no_grad():
            for role, model in models.items():
                gen = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
                reply = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
                cycles = model(input_ids=ids).act_cycles[0].tolist()
                lines.append(f"{role:>9}: {reply!r:36} cycles per prompt token {cycles}")
        return lines

    report = load_report(result)
    families = sorted(report.get("chance") or next(iter(report["models"].values()))["accuracy"])
    lo, hi = report.get("levels", [1, 2])  # the phase's (lowest, highest) training level
    return playground_widget(run, prompt_examples(families, lo), suite_answers(families, range(lo, hi + 1)))
