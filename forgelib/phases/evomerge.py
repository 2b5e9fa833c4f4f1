"""Phase 2 — EvoMerge: evolve the three specialists into one model, and check it against the right baselines.

**Search** (every candidate is built in memory and scored on the **fitness** split; ``budget`` evaluations in
all). The *unmerged* candidates come first: the trunk and each parent under its own saved settings (the
"no merge" options, ``1 + len(sources)`` evaluations; ``unmerged_candidates``). A merge candidate is a recipe
(per-layer-group weights, densities, ``t``; task vectors taken against the trunk) *plus* a runtime setting:
one of ``runtime_choices`` (Cognate config switches such as ``n_cycles`` and ``use_memory``, each laid over
``runtime``; for other architectures only keys the config has are applied, and
choices that then coincide count once). Every candidate is built on the trunk's config: a merge runs under the
trunk's recursion (Phase 1's ``recursion``, ``supervision_steps``, ``n_latent``, ...) unless ``runtime`` or a choice
sets it (checked against the trunk's config before the search: ``recursion: trm`` needs ``n_latent`` >= 1), and an
unmerged parent keeps each Phase-1 stage setting in which it differs from the trunk (``own_keys``: a ``trm`` parent
is scored and handed on as ``trm``). The search alternates over the two, one round of coordinate ascent:

1. *runtime screen* — the uniform merge (the recipe search's starting point) is scored under every runtime
   choice; the best is the runtime the recipe search uses;
2. *recipe search* — CMA-ES per merge method (``forgelib.merge.evolve_recipe``) under that runtime, on the
   rest of the budget;
3. *runtime re-pick* — the ``runtime_top_k`` best distinct recipes are scored under every other runtime
   choice. The champion is the best candidate over all evaluations, the unmerged ones included: when no
   merge beats the trunk or a parent on the fitness split, that model is handed on (its recipe is task
   arithmetic with weights 0 for the trunk, ``linear`` over the one parent otherwise; both rebuild it
   bit-identically) and the metric ``champion_source`` says so — Phase 2 never hands on a merge that measured worse than
   a model
   it could have kept.

Why this way: the runtime switches are a handful of discrete settings that change no weight, so a
categorical coordinate suits CMA-ES badly and one CMA-ES run per choice would divide the budget by the number
of choices. Screening at the starting point and re-picking for the best recipes costs ``n + k·(n−1)``
evaluations and still finds a runtime that suits the recipes the search ends on, not only the average.
Optionally a data-flow search (``layer_path_budget``) then evolves which source's block runs at each depth,
under the champion's runtime. The champion's recipe ``config`` holds its runtime, so ``forge merge
recipe.yaml --out DIR`` rebuilds it bit-identically.

**Score** (fitness and test alike): ``accuracy − loss_weight × answer NLL``. Accuracy is exact match of the
greedy completion over the union of the families; with ``with_steps`` the models write worked solutions
(``step;step#answer``): the generation budget covers them, the answer after ``#`` is checked, and the NLL is
that of the whole completion. Accuracy is primary: ``loss_weight`` is small (0.05), so the NLL only breaks
ties and separates candidates of (nearly) equal accuracy.

**Final selection**: the trunk, every parent (own settings), the uniform merge, the ``finalists`` best distinct
merges of the search and the search's champion are scored again on ``select_per_family`` fresh fitness-split
questions per family; the best there is the champion. A search on a small fitness set picks by luck (measured at
smoke: the trunk, chosen on 140 questions, trailed a parent by 5 points on the test questions and failed the gate).

**Test table and gate** (the ``guard`` section's test questions over every family the trunk knew; ``forgelib.stats``'s
paired rule): the guard compares the champion with the trunk family by family (``keeps_<family>``: no family lost
more than the guard's margin); on the same questions the champion's accuracy over all of them may trail the best
parent's and the uniform merge's by at most ``margin`` (``champion_minus_<x>_acc_lower_bound`` > −margin, the
one-sided lower confidence bound of the paired difference). The strict target — the champion above the trunk and
every parent — is reported as ``champion_above_all`` beside the raw accuracies; the answer NLL is reported, not gated.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

import torch
import yaml

from .. import paths
from ..data.tasks import FAMILIES, build_mix
from ..evaluate import answer_correctness, chance_accuracy, mean_nll
from ..jobs import run_jobs, thread_own
from ..merge import MergeRecipe, evolve_layer_path, evolve_recipe, merge_models, save_recipe
from ..merge.models import uniform_recipe
from ..params import require_non_negative, require_positive
from ..results import GateCheck, PhaseResult
from .base import UpstreamError
from .common import STAGE_RUNTIME_KEYS, check_levels, check_runtime

# The metrics the pipeline summary shows for this phase (its "headline" column).
HEADLINE = ("champion_method", "champion_test_acc", "trunk_test_acc", "best_parent_test_acc", "uniform_test_acc",
            "chance_test_acc")
DEFAULT_FAMILIES = ["arith", "multistep", "modular", "sequence", "logic", "algebra", "recall"]
DEFAULT_RUNTIME_CHOICES = [{"n_cycles": 1, "use_memory": False}, {"n_cycles": 1, "use_memory": True},
                           {"n_cycles": 2, "use_memory": False}, {"n_cycles": 2, "use_memory": True}]


@dataclasses.dataclass
class Params:
    """Phase 2 parameters (the ``evomerge`` section). Defaults are the smoke set."""

    sources: list[str] = dataclasses.field(default_factory=lambda: ["reasoning", "memory", "speed"])
    """Upstream model roles to merge."""
    base: str = "trunk"
    """Upstream role of the merge base (task vectors are taken against it); it is also a test contender."""
    methods: list[str] = dataclasses.field(default_factory=lambda: ["task_arithmetic", "ties"])
    """Merge methods searched (one CMA-ES run each, sharing the budget)."""
    budget: int = 40
    """Fitness evaluations of the search in all: runtime screen (one per runtime choice), CMA-ES, and runtime
    re-pick (``runtime_top_k`` × (choices − 1))."""
    per_layer: bool = True
    """Tune parameters per layer group (else once for the whole model)."""
    group_size: int = 1
    """Layers per layer group."""
    sigma0: float = 0.1
    """CMA-ES initial step in unit coordinates (0.1 of each range: the search starts at the plain average
    and steps of a quarter range mostly landed on much worse merges in the smoke runs)."""
    layer_path_budget: int = 0
    """Evaluations of the optional data-flow (layer path) search; 0 skips it."""
    families: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_FAMILIES))
    """Task families of the fitness and test sets (accuracy is over their union)."""
    levels: tuple[int, int] = (1, 2)
    """Task levels of the fitness and test sets."""
    fitness_per_family: int = 20
    """Fitness-split samples per family."""
    finalists: int = 4
    """The best distinct merge recipes of the search that, with the trunk, every parent and the uniform merge, are
    scored again on ``select_per_family`` fresh fitness-split questions; the champion is the best there (a small
    fitness set picks by luck: measured at smoke, the trunk chosen on 140 questions trailed a parent by 5 points on
    the test questions)."""
    select_per_family: int = 120
    """Fitness-split questions per family of the final selection."""
    loss_weight: float = 0.05
    """Score = accuracy − loss_weight × answer NLL. Small: accuracy is primary, the NLL breaks ties (the
    Phase-1 models now reach high accuracy; 1.0 was for accuracy at the floor)."""
    with_steps: bool = True
    """Score worked solutions (``step;step#answer``): generation budget, answer check and completion NLL."""
    max_len: int = 96
    """Longest evaluation sequence in tokens (prompt and completion, worked steps included)."""
    runtime: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Config settings shared by every runtime choice (each choice overrides them), e.g. ``{n_latent: 0}``."""
    runtime_choices: list[dict[str, Any]] = dataclasses.field(
        default_factory=lambda: [dict(c) for c in DEFAULT_RUNTIME_CHOICES])
    """Runtime settings the search chooses from (Cognate config switches; see the module docstring)."""
    runtime_top_k: int = 2
    """Best distinct recipes scored under every other runtime choice after the recipe search."""
    unmerged_candidates: bool = True
    """Score the trunk and each parent (own settings) as candidates too; the best of all is the champion."""
    margin: float = 0.05
    """Gate: the champion's accuracy over the guard's families (their mean, each weighing the same) may trail the best
    parent's and the uniform
    merge's by at most this (paired non-inferiority, ``forgelib.stats``; the trunk is guarded per family by the
    ``guard`` section)."""
    contender_discordance: float = 0.15
    """Sizes that comparison: the guard asks every family at least its share of the questions a suite-mean verdict
    at ``margin`` needs when the champion and a contender disagree on this share of them (measured at smoke:
    0.10-0.14; the guard's own count, sized at its wider margin, left seed 3 with 811 of the 1,233 needed)."""

    def __post_init__(self):
        require_positive(self, "budget", "group_size", "sigma0", "fitness_per_family", "select_per_family",
                         "finalists", "max_len")
        require_non_negative(self, "layer_path_budget", "loss_weight")
        if not 0 < self.contender_discordance <= 1:
            raise ValueError(f"contender_discordance must lie in (0, 1], got {self.contender_discordance}")
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"families: unknown {unknown}; valid: {sorted(FAMILIES)}")
        if len(self.sources) < 2:
            raise ValueError(f"sources: merging needs at least two models, got {self.sources}")
        if not self.runtime_choices:
            raise ValueError("runtime_choices: give at least one setting ([{}] keeps the trunk's config)")
        check_levels(self, "levels")
        self.runtime = check_runtime(self.runtime)
        self.runtime_choices = [check_runtime(c, f"runtime_choices[{i}]") for i, c in enumerate(self.runtime_choices)]
        if self.runtime_top_k < 1:
            raise ValueError(f"runtime_top_k must be >= 1, got {self.runtime_top_k}")
        if not 0 < self.margin < 1:
            raise ValueError(f"margin must lie in (0, 1), got {self.margin}")


# --- scoring ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Scorer:
    """Measures ``accuracy − loss_weight × answer NLL`` of a model on one split's samples."""

    tokenizer: Any
    samples: list
    loss_weight: float
    max_len: int
    with_steps: bool = True

    def details(self, model) -> dict[str, float]:
        tokenizer = thread_own(self.tokenizer)  # its own copy when scoring beside another candidate (forgelib.jobs)
        correct = answer_correctness(model, tokenizer, self.samples, batch_size=64, with_steps=self.with_steps)
        acc = sum(correct) / len(correct)
        nll = mean_nll(model, tokenizer, self.samples, batch_size=64, max_len=self.max_len, answer_only=True,
                       with_steps=self.with_steps)
        return {"accuracy": acc, "answer_nll": nll, "score": acc - self.loss_weight * nll,
                "correct": [int(c) for c in correct]}

    def __call__(self, model) -> float:
        return self.details(model)["score"]


def make_scorer(params: Params, tokenizer, split: str, per_family: int, seed: int) -> Scorer:
    samples = build_mix({f: 1.0 for f in params.families}, params.levels, per_family * len(params.families),
                        split, seed)
    return Scorer(tokenizer, samples, params.loss_weight, params.max_len, params.with_steps)


def ranks_at_least(a: dict, b: dict) -> bool:
    """Does row ``a`` rank at least as high as ``b``: higher accuracy, or equal accuracy and NLL not worse."""
    return a["accuracy"] > b["accuracy"] or (a["accuracy"] == b["accuracy"] and a["answer_nll"] <= b["answer_nll"])


def best_row(table: dict[str, dict], names: list[str]) -> str:
    """The name ranking highest among ``names`` (accuracy, then lower NLL; the first on a full tie)."""
    return max(names, key=lambda n: (table[n]["accuracy"], -table[n]["answer_nll"]))


def contender_checks(report, rows: dict[str, dict], parents: list[str], params: Params, guard) -> tuple[list, dict]:
    """The champion against the best parent and the uniform merge over the guard's families (suite-mean paired
    non-inferiority at ``margin``); the trunk is guarded per family by the guard itself. (checks, verdict rows)"""
    best = best_row(rows, parents)
    verdicts = {label: report.compare_pooled(f"champion_vs_{label}", rows[name]["answers"],
                                             rows["champion"]["answers"], params.margin, guard.confidence,
                                             guard.power)
                for label, name in (("best_parent", best), ("uniform", "uniform_merge"))}
    checks = [GateCheck(f"champion_minus_{label}_acc_lower_bound", v.lower, -v.margin, ">", note=v.note)
              for label, v in verdicts.items()]
    return checks, {label: v.as_row() for label, v in verdicts.items()}


# --- upstream -----------------------------------------------------------------------------------------


def load_upstream_models(params: Params, ctx) -> tuple[dict, Any, Any, dict[str, str]]:
    """The source models, the base and the tokenizer from the upstream phase (checksums verified)."""
    from transformers import AutoTokenizer

    from ..modelio import load_causal_lm

    roles = [params.base, *params.sources]
    missing = [r for r in roles if r not in ctx.upstream.models] if ctx.upstream else roles
    if missing:
        have = sorted(ctx.upstream.models) if ctx.upstream else []
        raise UpstreamError(f"phase 2 needs upstream models {missing}; the upstream has {have}")
    folders = {r: ctx.upstream_model_path(r) for r in roles}
    tokenizer_dir = ctx.upstream_model_path("tokenizer") if "tokenizer" in ctx.upstream.models else folders[params.base]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    loaded = {r: load_causal_lm(folders[r]).eval() for r in roles}
    base = loaded.pop(params.base)
    return loaded, base, tokenizer, {r: paths.relative(p) for r, p in folders.items()}


# --- runtime settings ---------------------------------------------------------------------------------


def runtime_settings(params: Params, base) -> list[dict[str, Any]]:
    """The distinct runtime settings to search: each choice over ``runtime``, restricted to keys the base's
    config has (a Cognate model must have every key: a typo is an error, not a silent no-op)."""
    config = base.config
    out: list[dict[str, Any]] = []
    for choice in params.runtime_choices:
        merged = {**params.runtime, **choice}
        unknown = sorted(k for k in merged if not hasattr(config, k))
        if unknown and getattr(config, "model_type", None) == "cognate":
            raise ValueError(f"runtime/runtime_choices: {unknown} are not fields of the Cognate config")
        settings = {k: v for k, v in merged.items() if hasattr(config, k)}
        if getattr(config, "model_type", None) == "cognate":
            _check_cognate(config, settings)
        if settings not in out:
            out.append(settings)
    return out


def _check_cognate(config, settings: dict[str, Any]) -> None:
    """The Cognate config's own checks of ``settings`` laid over ``config`` (e.g. recursion 'trm' needs
    n_latent >= 1), before the search, not in the middle of it."""
    try:
        type(config).from_dict({**config.to_dict(), **settings})
    except ValueError as exc:
        raise ValueError(f"runtime/runtime_choices {runtime_label(settings)} over the trunk's config: {exc}") from None


def own_keys(runtimes: list[dict[str, Any]], models: dict, base) -> list[str]:
    """The config keys an unmerged candidate takes from its own model: those of the runtime choices, and each
    Phase-1 stage setting (``STAGE_RUNTIME_KEYS``, the recursion among them) in which a parent differs from the
    trunk (every candidate is built on the trunk's config: without them a ``trm`` parent would be scored, and handed
    on, as ``cycles``)."""
    keys = [k for r in runtimes for k in r]
    keys += [k for k in STAGE_RUNTIME_KEYS if hasattr(base.config, k)
             and any(getattr(m.config, k, None) != getattr(base.config, k) for m in models.values())]
    return list(dict.fromkeys(keys))


def runtime_label(settings: dict[str, Any]) -> str:
    """``n_cycles=1 use_memory=True`` (``config`` for no settings)."""
    return " ".join(f"{k}={v}" for k, v in settings.items()) or "config"


def settings_of(model, keys) -> dict[str, Any]:
    """The model's current values of the config ``keys`` it has."""
    return {k: getattr(model.config, k) for k in keys if hasattr(model.config, k)}


def _with_runtime(recipe: MergeRecipe, runtime: dict, base) -> MergeRecipe:
    settings = {k: v for k, v in runtime.items() if hasattr(base.config, k)}
    return dataclasses.replace(recipe, config=settings)


def _configured(model, runtime: dict):
    """Set the runtime settings the model's config has (others are skipped) on ``model``; returns it."""
    for key, value in runtime.items():
        if hasattr(model.config, key):
            setattr(model.config, key, value)
    return model


# --- search -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SearchResult:
    """The champion (its recipe's ``config`` holds its runtime) and the record of the search."""

    champion: MergeRecipe
    champion_fitness: float
    search_runtime: dict[str, Any]
    """The runtime the recipe search ran under: the one that suited the uniform merge best in the screen."""
    runtimes: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    """Every evaluation: index, stage, method, generation, fitness, seconds, runtime, recipe."""
    generations: list[dict[str, Any]]
    recipe_search: Any
    layer_path: Any = None
    source: str = "merge"
    """``merge``, or the unmerged model handed on (the trunk's or a parent's role) when none beat it."""


def search_budget(params: Params, n_runtimes: int) -> tuple[int, int]:
    """(CMA-ES evaluations, re-pick evaluations) out of ``params.budget`` for ``n_runtimes`` settings."""
    repick = params.runtime_top_k * (n_runtimes - 1)
    unmerged = n_unmerged(params)
    cma = params.budget - unmerged - n_runtimes - repick
    if cma < len(params.methods):
        raise ValueError(f"budget {params.budget} is too small: the unmerged candidates take {unmerged}, the "
                         f"runtime screen {n_runtimes} and the re-pick {repick} evaluations, leaving {cma} for "
                         f"CMA-ES over {len(params.methods)} method(s); raise budget or lower runtime_top_k / "
                         f"runtime_choices")
    return cma, repick


def n_unmerged(params: Params) -> int:
    """Evaluations the unmerged candidates take: the trunk and each parent, or none."""
    return 1 + len(params.sources) if params.unmerged_candidates else 0


def unmerged_recipes(params: Params, models: dict, base, keys) -> list[tuple[str, MergeRecipe]]:
    """(source, recipe) for the trunk and each parent under its own settings: task arithmetic with every
    weight 0 is the trunk exactly, ``linear`` over one parent with weight 1 is that parent exactly."""
    zero = {"weights": [0.0] * len(models), "normalize": False}
    out = [(params.base, MergeRecipe("task_arithmetic", list(models), params.base, parameters=zero,
                                     config=settings_of(base, keys)))]
    out += [(name, MergeRecipe("linear", [name], params.base, parameters={"weights": 1.0},
                               config=settings_of(model, keys))) for name, model in models.items()]
    return out


class _Record:
    """The search's evaluation log: builds each candidate, scores it, keeps a row per evaluation."""

    def __init__(self, models: dict, base, fitness: Callable, log: Callable[[dict], None] | None, workers: int = 1):
        self.models, self.base, self.fitness, self.log, self.workers = models, base, fitness, log, workers
        self.evaluations: list[dict] = []
        self.generations: list[dict] = []

    def add(self, stage: str, method: str, generation: int, value: float, seconds: float, runtime: dict,
            recipe: MergeRecipe, source: str = "merge") -> None:
        row = {"index": len(self.evaluations), "stage": stage, "method": method, "generation": generation,
               "fitness": value, "seconds": seconds, "runtime": dict(runtime), "source": source,
               "recipe": recipe.to_dict()}
        self.evaluations.append(row)
        if self.log is not None:
            self.log(row)

    def _score(self, recipe: MergeRecipe, runtime: dict) -> tuple[float, float]:
        start = time.perf_counter()
        model = merge_models(dataclasses.replace(recipe, config=dict(runtime)), self.models, self.base)
        with torch.no_grad():
            value = float(self.fitness(model))
        return value, time.perf_counter() - start

    def evaluate_many(self, stage: str, items: list[tuple[MergeRecipe, dict, str]]) -> list[float]:
        """Score each (recipe, runtime, source), ``workers`` at a time, and record them in order."""
        scored = run_jobs([functools.partial(self._score, recipe, runtime) for recipe, runtime, _ in items],
                          self.workers)
        for (recipe, runtime, source), (value, seconds) in zip(items, scored):
            self.add(stage, recipe.method, 0, value, seconds, runtime, recipe, source)
        return [value for value, _ in scored]

    def end_stage(self, label: str, values: list[float]) -> None:
        finite = [v for v in values if math.isfinite(v)]
        self.generations.append({"method": label, "generation": 0, "evaluations": len(values),
                                 "best": max(finite) if finite else float("nan"),
                                 "mean": sum(finite) / len(finite) if finite else float("nan")})

    def best(self) -> dict:
        row = self.evaluations[max(range(len(self.evaluations)), key=lambda i: _finite(self.evaluations[i]["fitness"]))]
        if not math.isfinite(row["fitness"]):
            raise RuntimeError("no candidate had a finite fitness")
        return row


def search(params: Params, models: dict, base, fitness: Callable, seed: int = 0, progress: bool = False,
           log: Callable[[dict], None] | None = None, workers: int = 1) -> SearchResult:
    """Unmerged candidates, runtime screen, CMA-ES recipe search, runtime re-pick, optional layer paths (see
    the module docstring). ``fitness(model) -> float`` (higher is better; called from ``workers`` threads at once,
    each scoring its own candidate); every evaluation goes to ``log(record)``, in order."""
    runtimes = runtime_settings(params, base)
    cma_budget, _ = search_budget(params, len(runtimes))
    rec = _Record(models, base, fitness, log, workers)
    if params.unmerged_candidates:
        keys = own_keys(runtimes, models, base)
        values = rec.evaluate_many("unmerged", [(recipe, recipe.config, source) for source, recipe
                                                in unmerged_recipes(params, models, base, keys)])
        rec.end_stage("unmerged", values)
    # 1. runtime screen on the uniform merge
    screen = rec.evaluate_many("runtime_screen", [(uniform_recipe(list(models), params.base), r, "merge")
                                                  for r in runtimes])
    rec.end_stage("runtime screen", screen)
    search_runtime = runtimes[_argmax(screen)]
    # 2. CMA-ES over recipes under the screened runtime
    evo = evolve_recipe(models, base, lambda m: fitness(_configured(m, search_runtime)), methods=params.methods,
                        budget=cma_budget, seed=seed, sigma0=params.sigma0, per_layer=params.per_layer,
                        group_size=params.group_size, base_name=params.base, include_uniform=False,
                        progress=progress, workers=workers, log=lambda row: rec.add(
                            "recipe_search", row["method"], row["generation"], row["fitness"], row["seconds"],
                            search_runtime, MergeRecipe.from_dict(row["recipe"])))
    rec.generations += evo.generations
    # 3. runtime re-pick for the best distinct recipes
    others = [r for r in runtimes if r != search_runtime]
    if others:
        searched = [row for row in rec.evaluations if row["stage"] == "recipe_search"]
        repick = rec.evaluate_many("runtime_repick", [(recipe, r, "merge") for recipe
                                                      in _top_recipes(searched, params.runtime_top_k) for r in others])
        rec.end_stage("runtime re-pick", repick)
    best = rec.best()
    champion = dataclasses.replace(MergeRecipe.from_dict(best["recipe"]), config=dict(best["runtime"]))
    champion_fitness, source = best["fitness"], best["source"]
    path_evo = None
    if params.layer_path_budget and source == "merge":
        path_evo = evolve_layer_path(models, base, fitness, recipe=champion, budget=params.layer_path_budget,
                                     seed=seed, base_name=params.base, progress=progress)
        if path_evo.champion_fitness > champion_fitness:
            champion, champion_fitness = path_evo.champion, path_evo.champion_fitness
    return SearchResult(champion, champion_fitness, search_runtime, runtimes, rec.evaluations, rec.generations,
                        evo, path_evo, source)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: _finite(values[i]))


def _top_recipes(evaluations: list[dict], k: int) -> list[MergeRecipe]:
    """The ``k`` best distinct recipes of ``evaluations`` (by fitness, the earliest first on ties)."""
    seen, out = set(), []
    for row in sorted(evaluations, key=lambda r: -_finite(r["fitness"])):
        key = yaml.safe_dump(row["recipe"])
        if key not in seen and math.isfinite(row["fitness"]):
            seen.add(key)
            out.append(MergeRecipe.from_dict(row["recipe"]))
        if len(out) == k:
            break
    return out


# --- test table and run -------------------------------------------------------------------------------


def final_selection(found: SearchResult, params: Params, models: dict, base, select: Scorer,
                    workers: int = 1) -> list[dict]:
    """The finalists — the trunk and every parent (own settings), the uniform merge under the screened runtime, the
    ``finalists`` best distinct merges of the search and the search's champion — scored on the selection questions
    (``workers`` at a time), best first (``fitness`` is the selection score; ``search_fitness`` the search's)."""
    rows = [r for r in found.evaluations if math.isfinite(r["fitness"])]
    keep = [r for r in rows if r["source"] != "merge"]
    keep += [r for r in rows if r["stage"] == "runtime_screen" and r["runtime"] == found.search_runtime][:1]
    keep += sorted((r for r in rows if r["source"] == "merge" and r["stage"] != "runtime_screen"),
                   key=lambda r: -r["fitness"])
    seen, chosen = set(), []
    champion = {"recipe": found.champion.to_dict(), "runtime": dict(found.champion.config), "source": found.source,
                "fitness": found.champion_fitness, "stage": "search_champion"}
    for row in [champion, *keep]:
        recipe = dataclasses.replace(MergeRecipe.from_dict(row["recipe"]), config=dict(row["runtime"]))
        key = yaml.safe_dump(recipe.to_dict())
        if key in seen:
            continue
        if row["stage"] in ("recipe_search", "runtime_repick") and \
                sum(r["stage"] in ("recipe_search", "runtime_repick") for r, _ in chosen) >= params.finalists:
            continue
        seen.add(key)
        chosen.append((row, recipe))
    scores = run_jobs([functools.partial(_selection_score, select, recipe, models, base) for _, recipe in chosen],
                      workers)
    finals = [{"recipe": recipe.to_dict(), "source": row["source"], "stage": row["stage"], "method": recipe.method,
               "search_fitness": row["fitness"], "fitness": scored["score"], "accuracy": scored["accuracy"],
               "answer_nll": scored["answer_nll"]} for (row, recipe), scored in zip(chosen, scores)]
    return sorted(finals, key=lambda r: -r["fitness"])


def _selection_score(select: Scorer, recipe: MergeRecipe, models: dict, base) -> dict:
    with torch.no_grad():
        return select.details(merge_models(recipe, models, base))


NLL_PER_FAMILY = 64
"""The test table's answer NLL is measured on the first this many of each family's guard questions."""


def test_table(ctx, params: Params, models: dict, base, champion, tokenizer,
               uniform_runtime: dict[str, Any]) -> tuple[dict[str, dict], Any]:
    """The guard (the trunk against the champion, per family, ``ctx.guard``) and, on the same questions, every
    parent (own settings) and the uniform merge (under ``uniform_runtime``): per row the answers, accuracy overall
    and per family, and the answer NLL (on the first ``NLL_PER_FAMILY`` questions of each family). (rows, the
    guard's report)"""
    from ..stats import questions_needed
    from ..suite import Asker, GuardParams

    uniform = merge_models(_with_runtime(uniform_recipe(list(models), params.base), uniform_runtime, base),
                           models, base)
    suite = ctx.input_suite
    g = ctx.guard_params or GuardParams()
    least = math.ceil(questions_needed(params.margin, g.confidence, g.power, params.contender_discordance)
                      / max(1, len(suite)))
    report = ctx.guard(Asker(base, tokenizer, label=params.base), Asker(champion, tokenizer, label="champion"),
                       min_per_family=least)
    answers = {params.base: {f: a["before"] for f, a in report.answers.items()},
               "champion": {f: a["after"] for f, a in report.answers.items()}}
    others = [*models.items(), ("uniform_merge", uniform)]
    asked = run_jobs([functools.partial(report.ask, Asker(model, tokenizer, label=name)) for name, model in others],
                     ctx.workers)
    answers.update({name: got for (name, _), got in zip(others, asked)})
    samples = [q for qs in report.questions.values() for q in qs[:NLL_PER_FAMILY]]  # the NLL: a secondary number
    everyone = [(params.base, base), *models.items(), ("uniform_merge", uniform), ("champion", champion)]
    nlls = run_jobs([functools.partial(_answer_nll, model, tokenizer, samples, params) for _, model in everyone],
                    ctx.workers)
    rows = {}
    for (name, _), nll in zip(everyone, nlls):
        per_family = {f: sum(a) / len(a) for f, a in answers[name].items() if a}
        rows[name] = {"accuracy": sum(per_family.values()) / len(per_family), "answers": answers[name],
                      "per_family": per_family,  # accuracy: the suite's mean, each family weighing the same
                      "answer_nll": nll}
        rows[name]["score"] = rows[name]["accuracy"] - params.loss_weight * rows[name]["answer_nll"]
    return rows, report


def _answer_nll(model, tokenizer, samples: list, params: Params) -> float:
    return mean_nll(model, thread_own(tokenizer), samples, batch_size=128, max_len=params.max_len, answer_only=True,
                    with_steps=params.with_steps)


def chance_levels(params: Params, samples: list, seed: int) -> dict[str, Any]:
    """Chance on ``samples``: per family the accuracy of always giving the family's most frequent train-split
    answer (the best constant guess), and ``overall``, the same over all the samples."""
    reference = build_mix({f: 1.0 for f in params.families}, params.levels, 300 * len(params.families), "train",
                          seed)
    per_family = chance_accuracy(samples, reference)
    hits = sum(per_family[s.family] for s in samples) / len(samples)
    return {"per_family": per_family, "overall": hits}


def run(params: Params, ctx) -> PhaseResult:
    """Phase 2 (see the module docstring)."""
    torch.manual_seed(ctx.seed)
    models, base, tokenizer, folders = load_upstream_models(params, ctx)
    fitness = make_scorer(params, tokenizer, "fitness", params.fitness_per_family, ctx.seed)

    def log(record: dict) -> None:
        ctx.log({"evomerge/fitness": record["fitness"], "evomerge/seconds": record["seconds"]}, step=record["index"])

    found = search(params, models, base, fitness, seed=ctx.seed, progress=not ctx.quiet, log=log,
                   workers=ctx.workers)
    select = make_scorer(params, tokenizer, "fitness", params.select_per_family, ctx.seed + 5)
    finals = final_selection(found, params, models, base, select, ctx.workers)
    recipe = MergeRecipe.from_dict(finals[0]["recipe"])
    found = dataclasses.replace(found, champion=recipe, champion_fitness=finals[0]["fitness"],
                                source=finals[0]["source"])
    champion = merge_models(recipe, models, base).eval()
    table, guard_report = test_table(ctx, params, models, base, champion, tokenizer, found.search_runtime)
    keys = own_keys(found.runtimes, models, base)
    settings = {params.base: settings_of(base, keys), **{n: settings_of(m, keys) for n, m in models.items()},
                "uniform_merge": dict(found.search_runtime), "champion": dict(recipe.config)}
    portable = dataclasses.replace(recipe, models=[folders[m] for m in recipe.models], base=folders[params.base],
                                   layer_path=_portable_path(recipe.layer_path, folders),
                                   checksums={folders[r]: _registered_sha256(ctx, r)
                                              for r in (params.base, *recipe.models)})
    ctx.result.artifacts["recipe"] = paths.relative(save_recipe(portable, ctx.path("recipe.yaml")))
    path_evo = found.layer_path
    report = {"evolution": {"generations": found.generations, "evaluations": _strip(found.evaluations),
                            "champion_fitness": found.champion_fitness},
              "runtime": {"choices": found.runtimes, "search_runtime": found.search_runtime,
                          "uniform_runtime": found.search_runtime, "champion_runtime": recipe.config},
              "layer_path": None if path_evo is None else {"generations": path_evo.generations,
                                                           "champion_fitness": path_evo.champion_fitness},
              "test": {name: {k: v for k, v in row.items() if k != "answers"} for name, row in table.items()},
              "settings": settings, "trunk": params.base, "parents": list(params.sources),
              "with_steps": params.with_steps, "n_fitness": len(fitness.samples), "n_select": len(select.samples),
              "final_selection": [{k: v for k, v in row.items() if k != "recipe"} for row in finals],
              "n_test": sum(len(q) for q in guard_report.questions.values()),
              "champion_recipe": recipe.to_dict(), "champion_source": found.source, "margin": params.margin,
              "chance": chance_levels(params, [q for qs in guard_report.questions.values() for q in qs],
                                      ctx.seed + 2)}
    ctx.write_report(report)
    ctx.save_model("champion", champion, tokenizer, metadata={"recipe": paths.relative(ctx.dir / "recipe.yaml")})
    _summarize(ctx, table, params, found, recipe)
    checks, verdicts = contender_checks(guard_report, table, list(params.sources), params, ctx.guard_params)
    ctx.result.gate.extend(checks)
    report["contenders"] = verdicts  # the champion against the best parent and the uniform merge (verdict rows)
    report["test_answers"] = {name: row["answers"] for name, row in table.items()}
    ctx.write_report(report)
    ctx.result.metrics.update({f"champion_minus_{k}_acc_lower_bound": v["lower"] for k, v in verdicts.items()})
    ctx.result.metrics["chance_test_acc"] = round(report["chance"]["overall"], 4)
    return ctx.result


def _registered_sha256(ctx, role: str) -> str:
    """The checksum of upstream model ``role`` from its registry row (its files were checked against it when
    the model was loaded, so the folder is not hashed again)."""
    return ctx.registry.get_model(ctx.upstream.models[role]["registry_id"])["sha256"]


def _portable_path(layer_path, folders: dict[str, str]):
    if not layer_path:
        return layer_path
    return [[folders.get(src, src), layer] for src, layer in layer_path]


def _strip(evaluations: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "recipe"} | {"recipe_method": e["recipe"]["method"]}
            for e in evaluations]


def _summarize(ctx, table: dict, params: Params, found: SearchResult, recipe: MergeRecipe) -> None:
    best_parent = best_row(table, list(params.sources))
    rows = {"champion": table["champion"], "trunk": table[params.base], "best_parent": table[best_parent],
            "uniform": table["uniform_merge"]}
    above = all(table["champion"]["accuracy"] > table[n]["accuracy"] for n in (params.base, *params.sources))
    ctx.result.metrics.update({"champion_source": found.source, "champion_method": recipe.method,
                               "champion_runtime": runtime_label(recipe.config),
                               "champion_fitness": round(found.champion_fitness, 4), "best_parent": best_parent,
                               "champion_above_all": above})
    for label, row in rows.items():
        ctx.result.metrics[f"{label}_test_acc"] = round(row["accuracy"], 4)
    for label, row in rows.items():
        ctx.result.metrics[f"{label}_test_nll"] = round(row["answer_nll"], 4)
    ctx.result.metrics["evaluations"] = len(found.evaluations)
