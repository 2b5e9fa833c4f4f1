"""Phase 8 views: bits per weight against perplexity for every stage, method and baseline; the stage table with
gates and rollbacks; the end-to-end size from Phase 1's fp32 specialists to the final artifact; and a playground
that answers from the final artifact beside the Phase-7 model it came from."""
from __future__ import annotations

import json

import matplotlib.pyplot as plt

from .. import paths
from ..results import load_report  # noqa: F401  (the notebooks import it from here)


def stage_frame(report: dict):
    """One row per stage: what it assigned, bits per weight, accuracy and perplexity against the input, its gate
    and whether it was kept or rolled back."""
    import pandas as pd

    ref = report["reference"]
    from .format import human_bytes, sig

    rows = [{"stage": "input (Phase 7)", "codecs": "as handed on", "bits/weight": None, "size": "",
             "accuracy": ref["acc"], "perplexity": sig(ref["ppl"]), "acc retention": 1.0, "gate": "", "kept": ""}]
    for s in report["stages"]:
        gate = "; ".join(f"{g['name']} {g['value']:.3f} {g['op']} {g['bound']:.3f}" for g in s["gate"])
        rows.append({"stage": s["name"], "codecs": ", ".join(f"{k}: {v.get('codec')}" for k, v in s["assign"].items()),
                     "bits/weight": s["bits_per_weight"], "size": human_bytes(s["file_bytes"]), "accuracy": s["acc"],
                     "perplexity": sig(s["ppl"]),
                     "acc retention": round(s["acc"] / ref["acc"], 3) if ref["acc"] else None, "gate": gate,
                     "kept": "kept" if s["kept"] else "rolled back"})
    frame = pd.DataFrame(rows).set_index("stage")
    frame.attrs["note"] = (f"{report['n_test']} test questions, exact match (chance about 0: open-ended answers); "
                           f"each stage starts from the last kept one; bits count the whole file")
    return frame


def sweep_frame(report: dict):
    """Every method of the sweep (each alone on the sweep's tensor groups): bits, quality, time, memory."""
    import pandas as pd

    from .format import sig

    ref = report["reference"]
    rows = {p["name"]: {"codec": json.dumps(p["spec"]), "bits/weight": p["bits_per_weight"], "accuracy": p["acc"],
                        "acc retention": round(p["acc"] / ref["acc"], 3) if ref["acc"] else None,
                        "perplexity": sig(p["ppl"]), "ppl retention": round(ref["ppl"] / p["ppl"], 3),
                        "compress s": p["compress_s"], "peak MB": p["peak_mb"]} for p in report["sweep"]}
    return pd.DataFrame(rows).T


def plot_bits_vs_ppl(report: dict) -> "plt.Figure":
    """Perplexity (and accuracy) against bits per weight of the whole file: stages (kept or rolled back) and the
    sweep's methods and baselines."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ref = report["reference"]
    for ax, key, label in ((axes[0], "ppl", "perplexity (worked solutions)"), (axes[1], "acc", "exact-match accuracy")):
        for p in report["sweep"]:
            ax.scatter(p["bits_per_weight"], p[key], marker="s", s=36, alpha=0.8)
            ax.annotate(p["name"], (p["bits_per_weight"], p[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        kept = [s for s in report["stages"] if s["kept"]]
        ax.plot([s["bits_per_weight"] for s in kept], [s[key] for s in kept], "o-", color="k", label="kept stages")
        dropped = [s for s in report["stages"] if not s["kept"]]
        ax.scatter([s["bits_per_weight"] for s in dropped], [s[key] for s in dropped], marker="x", color="C3", s=60,
                   label="rolled back", zorder=3)
        for s in report["stages"]:
            ax.annotate(s["name"], (s["bits_per_weight"], s[key]), fontsize=7, xytext=(3, -9),
                        textcoords="offset points")
        ax.axhline(ref[key], color="grey", ls="--", lw=1, label="Phase-7 model")
        ax.set_xlabel("bits per weight (whole file)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_title("Perplexity against size (squares: methods alone)")
    axes[1].set_title("Accuracy against size")
    fig.tight_layout()
    return fig


def size_frame(report: dict, result):
    """Bytes on disk from Phase 1's specialists through every phase's model to the final artifact."""
    import pandas as pd

    rows = [{"phase": f"{r['number']} {r['phase']}", "model": r["role"],
             "bytes": r["bytes"]} for r in report["lineage"]]
    rows.append({"phase": "8 compression", "model": "artifact", "bytes": result.metrics["artifact_bytes"]})
    frame = pd.DataFrame(rows)
    frame["vs artifact"] = (frame["bytes"] / result.metrics["artifact_bytes"]).round(1)
    return frame


def plot_sizes(report: dict, result) -> "plt.Figure":
    frame = size_frame(report, result)
    fig, ax = plt.subplots(figsize=(8, 3.4))
    labels = [f"{p}\n{m}" for p, m in zip(frame["phase"], frame["model"])]
    ax.bar(range(len(frame)), frame["bytes"] / 1024, color=["C0"] * (len(frame) - 1) + ["C3"])
    ax.set_xticks(range(len(frame)), labels, fontsize=6, rotation=60, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("KiB on disk (log)")
    ax.set_title("From the Phase-1 models to the final artifact")
    fig.tight_layout()
    return fig


def answer_lines(system, model, question: str) -> list[str]:
    """The two-pass answer of ``model`` with ``system``'s experts (the plain answer when it has none)."""
    from ..quietstar import base_lm
    from ..tools import generate_with_tools

    lm, n = base_lm(model), system.params.max_new_tokens
    if not system.experts:
        return [repr(generate_with_tools(lm, system.tokenizer, [question], n)[0].text)]
    from ..experts import SVFConfig, apply_svf, remove_svf
    from ..experts.discover import question_features, route
    from ..experts.train import base_weights

    svf = apply_svf(lm, SVFConfig(**system.svf_config))
    try:
        with base_weights(svf):
            chosen = int(route(question_features(svf, system.tokenizer, [question]), system.centroids)[0])
        svf.load_z(system.experts[chosen])
        text = generate_with_tools(svf, system.tokenizer, [question], n)[0].text
    finally:
        remove_svf(svf)
    return [f"expert {chosen}: {text!r}"]


def artifact_playground(result, ctx):
    """Type a question and press Enter: the answer of the final artifact (loaded from its file) beside the
    Phase-7 model's, both two-pass routed with their experts."""
    from transformers import AutoTokenizer

    from ..phases.compression import ARTIFACT, load_system
    from ..quant.artifact import load_extras
    from ..modelio import load_compressed
    from .cognate import playground_widget, prompt_examples, suite_answers

    folder = paths.resolve(result.models["model"]["path"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    system = load_system(ctx, tokenizer, ctx.params)
    artifact = load_compressed(folder / ARTIFACT)
    packed = system.from_extras(load_extras(folder / ARTIFACT))
    upstream, _ = ctx.load_upstream_lm(ctx.params.source)
    size = f"{result.metrics['artifact_bytes']:,} bytes, {result.metrics['bits_per_weight']:.2f} bits/weight"
    run = lambda q: ([f"artifact ({size}): " + line for line in answer_lines(packed, artifact, q)] +  # noqa: E731
                     ["Phase-7 model: " + line for line in answer_lines(system, upstream, q)])
    families = ctx.params.families
    lo, hi = ctx.params.levels
    return playground_widget(run, prompt_examples(families, lo), suite_answers(families, range(lo, hi + 1)))
