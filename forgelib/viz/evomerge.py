"""Phase 2 views: fitness per generation, champion vs trunk vs parents vs uniform merge, and a merge-weight
widget."""
from __future__ import annotations


import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from .. import paths
from ..results import load_report  # noqa: F401  (the notebooks import it from here)


def plot_fitness(report: dict) -> "plt.Figure":
    """Best and mean fitness of every CMA-ES generation, in search order, coloured by method."""
    gens = report["evolution"]["generations"]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for k, method in enumerate(dict.fromkeys(g["method"] for g in gens)):
        xs = [i for i, g in enumerate(gens) if g["method"] == method]
        color = f"C{k}"
        ax.plot(xs, [gens[i]["best"] for i in xs], "o-", color=color, label=f"{method} (best)")
        ax.plot(xs, [gens[i]["mean"] for i in xs], "x--", color=color, alpha=0.5, label=f"{method} (mean)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation (search order)")
    ax.set_ylabel("fitness (fitness split)")
    ax.set_title("EvoMerge: best (solid) and mean (dashed) fitness per generation")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def score_frame(report: dict):
    """Test-split rows — trunk, parents, uniform merge, champion — with exact-match accuracy (over the union of
    the families), answer NLL, score, and the runtime settings each was scored with; a last ``chance`` row holds
    the accuracy of the best constant answer per family (when the report has it)."""
    import pandas as pd

    frame = pd.DataFrame(report["test"]).T[["accuracy", "answer_nll", "score"]].astype(float).round(4)
    settings = report.get("settings", {})
    frame["settings"] = [" ".join(f"{k}={v}" for k, v in settings.get(n, {}).items()) for n in frame.index]
    if "chance" in report:
        frame.loc["chance"] = [round(report["chance"]["overall"], 4), float("nan"), float("nan"),
                               "best constant answer per family"]
    return frame


def chance_frame(report: dict):
    """Chance accuracy per family of the test split (the best constant answer) and over all of them."""
    import pandas as pd

    chance = report.get("chance") or {"per_family": {}, "overall": float("nan")}
    frame = pd.DataFrame({"chance": pd.Series(chance["per_family"], dtype=float)})
    frame.loc["all"] = chance["overall"]
    return frame.round(3)


def plot_test_accuracy(report: dict) -> "plt.Figure":
    """Test-split accuracy of each contender (trunk first, champion last), answer NLL written on each bar."""
    rows = report["test"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    colors = ["C7" if n == report.get("trunk", "trunk") else "C3" if n == "champion" else
              "C1" if n == "uniform_merge" else "C0" for n in names]
    bars = ax.bar(names, [rows[n]["accuracy"] for n in names], color=colors)
    for bar, n in zip(bars, names):
        ax.annotate(f"NLL {rows[n]['answer_nll']:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    if "chance" in report:
        ax.axhline(report["chance"]["overall"], color="k", ls=":", lw=1, label="chance (best constant answer)")
        ax.legend(fontsize=7, loc="upper left")
    ax.set_ylim(0, max(1.0, max(rows[n]["accuracy"] for n in names) * 1.15))
    ax.set_ylabel("exact-match accuracy (test)")
    ax.set_title("EvoMerge: test accuracy (answer NLL on each bar)")
    fig.tight_layout()
    return fig


def merge_weight_sliders(result, upstream, samples_per_family: int = 4):
    """Two sliders over the task-arithmetic weights of the first two sources (the others keep 1/n);
    each move (on release) builds the merge in memory, under the champion's runtime settings, and shows its measured
    fitness on a small fitness-split sample."""
    import ipywidgets as w

    from ..merge import MergeRecipe, merge_models
    from ..phases.evomerge import Params, load_upstream_models, make_scorer
    from ..phases.base import load_upstream
    from ..registry import ModelRegistry

    params = Params(**_params_section(result))
    runtime = load_report(result)["champion_recipe"].get("config", {})
    ctx = _UpstreamOnly(load_upstream(upstream), ModelRegistry(paths.registry_path()))
    models, base, tokenizer, _ = load_upstream_models(params, ctx)
    scorer = make_scorer(params, tokenizer, "fitness", samples_per_family, seed=0)
    names = list(models)
    sliders = [weight_slider(n, len(names)) for n in names[:2]]
    out = w.Output()

    def show(change=None):
        weights = [s.value for s in sliders] + [1 / len(names)] * (len(names) - 2)
        recipe = MergeRecipe("task_arithmetic", names, params.base, parameters={"weights": weights}, config=runtime)
        details = scorer.details(merge_models(recipe, models, base))
        out.clear_output()
        with out:
            print(f"weights {dict(zip(names, [round(x, 2) for x in weights]))}  runtime {runtime}")
            print(f"fitness-sample accuracy {details['accuracy']:.3f}  answer NLL {details['answer_nll']:.3f}  "
                  f"score {details['score']:.3f}")

    for s in sliders:
        s.observe(show, names="value")
    show()
    return w.VBox([*sliders, out])


def weight_slider(name: str, n_sources: int, top: float = 1.5):
    """A merge-weight slider that starts at the uniform weight ``1/n_sources`` exactly: its step is
    ``1/(20·n_sources)`` (0.0167 for three sources), so the uniform weight lies on the grid and the browser
    does not snap it to a neighbour (as a 0.05 step did, showing 0.35 for 1/3)."""
    import ipywidgets as w

    step = 1.0 / (20 * n_sources)
    return w.FloatSlider(value=1.0 / n_sources, min=0.0, max=top, step=step, description=name,
                         readout_format=".3f", continuous_update=False)


class _UpstreamOnly:
    """The little of a PhaseContext that loading the upstream models needs."""

    def __init__(self, upstream, registry):
        self.upstream, self.registry = upstream, registry

    def upstream_model_path(self, role):
        from ..phases.base import upstream_model_path

        return upstream_model_path(self.upstream, role, self.registry)


def _params_section(result) -> dict:
    from ..params import load_yaml_file

    data = load_yaml_file(paths.resolve(result.artifacts["report"]).parent / "params.yaml")
    return data["evomerge"]
