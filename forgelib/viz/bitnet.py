"""Phase 4 views: file sizes per format, quality of the full-precision, post-training-ternarized and QAT models,
the share of -1/0/+1 per layer, and a widget showing one layer's weights before and after quantization."""
from __future__ import annotations


import matplotlib.pyplot as plt

from .. import paths
from ..results import load_report  # noqa: F401  (the notebooks import it from here)

QUALITY_LABELS = {"fp": "Phase-3 model (full precision)", "ptq": "ternary without training (PTQ)",
                  "ternary": "ternary after QAT (handed on)"}


def size_frame(report: dict):
    """Total bytes on disk of the model (weights + thought extras) per format, measured from written files, and
    the ratio to fp32; for the packed formats the bits per ternary weight (codes, and with the scales). Sizes read
    in KiB/MiB (the exact byte counts are in the report); a cell that does not apply to a format is blank."""
    import pandas as pd

    from .format import human_bytes

    sizes = report["sizes"]
    fp32 = sizes["fp32"]["total_bytes"]

    def size(row: dict, key: str) -> str:
        return human_bytes(row[key]) if row.get(key) is not None else ""

    def bits(row: dict, key: str) -> str:
        return f"{row[key]:.3f}" if row.get(key) is not None else ""

    rows = {label: {"total": size(row, "total_bytes"), "× smaller than fp32": f"{fp32 / row['total_bytes']:.2f}",
                    "ternary codes": size(row, "packed_bytes"),
                    "bits / ternary weight": bits(row, "bits_per_ternary_weight"),
                    "… with scales": bits(row, "bits_per_ternary_weight_with_scales"),
                    "other tensors": size(row, "other_bytes")} for label, row in sizes.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def quality_frame(report: dict):
    """Test-split accuracy (with thoughts), per family, and answer NLL of each model; chance last."""
    import pandas as pd

    rows = {}
    for key, row in report["test"].items():
        rows[QUALITY_LABELS.get(key, key)] = {"accuracy": row["accuracy"], "answer NLL": row["answer_nll"],
                                              **{f"acc {f}": a for f, a in row["per_family"].items()}}
    chance = report["chance"]
    rows["chance"] = {"accuracy": chance["overall"], "answer NLL": float("nan"),
                      **{f"acc {f}": a for f, a in chance["per_family"].items()}}
    return pd.DataFrame(rows).T.astype(float).round(4)


def plot_ternary_shares(report: dict, which: str = "qat") -> "plt.Figure":
    """Share of weights at -1, 0 and +1 in every ternary layer (``which``: 'qat' or 'ptq')."""
    shares = report["ternary_share"][which]
    names = list(shares)
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.22 * len(names)))
    left = [0.0] * len(names)
    for value, color in (("-1", "C3"), ("0", "0.7"), ("+1", "C0")):
        widths = [shares[n][value] for n in names]
        ax.barh(range(len(names)), widths, left=left, color=color, label=value)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(names)), [n.replace("model.layers.", "L") for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the layer's weights")
    ax.set_title(f"Ternary values per layer ({'after QAT' if which == 'qat' else 'post-training, before QAT'})")
    ax.legend(ncol=3, fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot_layer_weights(fp_weight, codes, scale, name: str = "") -> "plt.Figure":
    """Histogram of one layer's full-precision weights (Phase 3) with the ternary levels ±scale and 0 marked,
    and the counts of its ternary codes after QAT."""
    import numpy as np

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 2.8))
    values = fp_weight.flatten().float().numpy()
    a.hist(values, bins=60, color="C0", alpha=0.8)
    for level in (-scale, 0.0, scale):
        a.axvline(level, color="C3", ls="--", lw=1)
    a.set_title(f"{name}: Phase-3 weights (red: ternary levels)", fontsize=9)
    counts = [int((codes == v).sum()) for v in (-1, 0, 1)]
    b.bar(["-1", "0", "+1"], counts, color=["C3", "0.6", "C0"])
    b.set_title(f"after QAT: codes × {scale:.4f}", fontsize=9)
    fig.tight_layout()
    np.seterr(all="ignore")
    return fig


def layer_weight_widget(result):
    """Pick a ternary layer: its Phase-3 weight distribution and its ternary codes after QAT."""
    import ipywidgets as w

    from ..quant import packed_bitlinear_modules
    from ..modelio import load_quietstar

    report = load_report(result)
    packed = load_quietstar(paths.resolve(result.models["model"]["path"]))
    fp = load_quietstar(paths.resolve(report["upstream_model"]))
    layers = packed_bitlinear_modules(packed.base)
    fp_weights = dict(fp.base.named_parameters())
    choice = w.Dropdown(options=list(layers), description="layer", layout=w.Layout(width="60%"))
    out = w.Output()

    def show(change=None) -> None:
        out.clear_output(wait=True)
        layer = layers[choice.value]
        with out:
            plot_layer_weights(fp_weights[f"{choice.value}.weight"].detach(), layer.ternary_codes(),
                               float(layer.weight_scale), choice.value)
            plt.show()

    choice.observe(show, names="value")
    show()
    return w.VBox([choice, out])
