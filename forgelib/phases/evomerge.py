"""Phase 2 — EvoMerge: evolve the three specialists into one model.

CMA-ES searches merge recipes (per-layer-group weights, densities, ``t``) for each configured method, with
task vectors taken against the trunk; every candidate is built in memory and scored on the **fitness**
split. Optionally a data-flow search then evolves which source's block runs at each depth. The champion is
scored once on the **test** split, next to each parent and the uniform linear merge.

Score (fitness and test alike): ``accuracy − loss_weight × answer-token NLL``, both measured on the split's
task samples (accuracy alone is too coarse and noisy at tiny scale, so the loss carries weight).

Gate: the champion's test score is at least the best parent's and above the uniform merge's.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .. import paths
from ..data.tasks import FAMILIES, build_mix
from ..evaluate import answer_correctness, mean_nll
from ..merge import MergeRecipe, evolve_layer_path, evolve_recipe, merge_models, save_recipe
from ..merge.models import uniform_recipe
from ..results import GateCheck, PhaseResult, write_json_atomic
from .base import UpstreamError

DEFAULT_FAMILIES = ["arith", "multistep", "modular", "sequence", "logic", "algebra", "recall"]


@dataclasses.dataclass
class Params:
    """Phase 2 parameters (the ``evomerge`` section). Defaults are the smoke set."""

    sources: list[str] = dataclasses.field(default_factory=lambda: ["reasoning", "memory", "speed"])
    """Upstream model roles to merge."""
    base: str = "trunk"
    """Upstream role of the merge base (task vectors are taken against it)."""
    methods: list[str] = dataclasses.field(default_factory=lambda: ["task_arithmetic", "ties"])
    """Merge methods searched (one CMA-ES run each, sharing the budget)."""
    budget: int = 40
    """Evaluations of the fitness function for the recipe search (the uniform merge counts as one)."""
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
    """Task families of the fitness and test sets."""
    levels: tuple[int, int] = (1, 2)
    """Task levels of the fitness and test sets."""
    fitness_per_family: int = 20
    """Fitness-split samples per family."""
    test_per_family: int = 24
    """Test-split samples per family."""
    loss_weight: float = 1.0
    """Score = accuracy − loss_weight × answer NLL. At tiny scale accuracy on a few hundred samples moves by
    noise alone (0.1 let the search overfit the fitness split in the smoke runs), so the loss carries weight."""
    max_len: int = 96
    """Longest evaluation sequence in tokens."""
    runtime: dict[str, Any] = dataclasses.field(default_factory=lambda: {"n_cycles": 2, "n_latent": 0,
                                                                         "use_memory": True})
    """Config settings of the merged model (Cognate runtime switches; {} for other architectures)."""

    def __post_init__(self):
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"families: unknown {unknown}; valid: {sorted(FAMILIES)}")
        if len(self.sources) < 2:
            raise ValueError(f"sources: merging needs at least two models, got {self.sources}")


@dataclasses.dataclass
class Scorer:
    """Measures ``accuracy − loss_weight × answer NLL`` of a model on one split's samples."""

    tokenizer: Any
    samples: list
    loss_weight: float
    max_len: int

    def details(self, model) -> dict[str, float]:
        correct = answer_correctness(model, self.tokenizer, self.samples, batch_size=64)
        acc = sum(correct) / len(correct)
        nll = mean_nll(model, self.tokenizer, self.samples, batch_size=64, max_len=self.max_len, answer_only=True)
        return {"accuracy": acc, "answer_nll": nll, "score": acc - self.loss_weight * nll}

    def __call__(self, model) -> float:
        return self.details(model)["score"]


def make_scorer(params: Params, tokenizer, split: str, per_family: int, seed: int) -> Scorer:
    samples = build_mix({f: 1.0 for f in params.families}, params.levels, per_family * len(params.families),
                        split, seed)
    return Scorer(tokenizer, samples, params.loss_weight, params.max_len)


def load_upstream_models(params: Params, ctx) -> tuple[dict, Any, Any, dict[str, str]]:
    """The source models, the base and the tokenizer from the upstream phase (checksums verified)."""
    from transformers import AutoTokenizer

    from ..models.loading import load_causal_lm

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


def _with_runtime(recipe: MergeRecipe, runtime: dict, base) -> MergeRecipe:
    settings = {k: v for k, v in runtime.items() if hasattr(base.config, k)}
    return dataclasses.replace(recipe, config=settings)


def search(params: Params, models: dict, base, fitness: Scorer, ctx):
    """CMA-ES over recipes, then (optionally) over layer paths seeded with the best recipe."""
    def fitness_fn(model) -> float:
        return fitness(_configured(model, params.runtime))

    def log(record: dict) -> None:
        ctx.log({"evomerge/fitness": record["fitness"], "evomerge/seconds": record["seconds"]}, step=record["index"])

    result = evolve_recipe(models, base, fitness_fn, methods=params.methods, budget=params.budget, seed=ctx.seed,
                           sigma0=params.sigma0, per_layer=params.per_layer, group_size=params.group_size,
                           base_name=params.base, progress=not ctx.quiet, log=log)
    paths_result = None
    if params.layer_path_budget:
        paths_result = evolve_layer_path(models, base, fitness_fn, recipe=result.champion,
                                         budget=params.layer_path_budget, seed=ctx.seed, base_name=params.base,
                                         progress=not ctx.quiet)
    return result, paths_result


def _configured(model, runtime: dict):
    for key, value in runtime.items():
        if hasattr(model.config, key):
            setattr(model.config, key, value)
    return model


def score_table(params: Params, models: dict, base, champion, test: Scorer) -> dict[str, dict]:
    """Test-split scores of every parent (with its own settings), the uniform merge and the champion."""
    rows = {name: test.details(model) for name, model in models.items()}
    uniform = merge_models(_with_runtime(uniform_recipe(list(models), params.base), params.runtime, base), models, base)
    rows["uniform_merge"] = test.details(uniform)
    rows["champion"] = test.details(champion)
    return rows


def run(params: Params, ctx) -> PhaseResult:
    """Phase 2 (see the module docstring)."""
    torch.manual_seed(ctx.seed)
    models, base, tokenizer, folders = load_upstream_models(params, ctx)
    fitness = make_scorer(params, tokenizer, "fitness", params.fitness_per_family, ctx.seed)
    test = make_scorer(params, tokenizer, "test", params.test_per_family, ctx.seed + 1)
    evo, path_evo = search(params, models, base, fitness, ctx)
    best = path_evo if path_evo is not None and path_evo.champion_fitness > evo.champion_fitness else evo
    recipe = _with_runtime(best.champion, params.runtime, base)
    champion = merge_models(recipe, models, base).eval()
    table = score_table(params, models, base, champion, test)
    portable = dataclasses.replace(recipe, models=[folders[m] for m in recipe.models], base=folders[params.base],
                                   layer_path=_portable_path(recipe.layer_path, folders))
    ctx.result.artifacts["recipe"] = paths.relative(save_recipe(portable, ctx.path("recipe.yaml")))
    report = {"evolution": {"generations": evo.generations, "evaluations": _strip(evo.evaluations),
                            "champion_fitness": evo.champion_fitness},
              "layer_path": None if path_evo is None else {"generations": path_evo.generations,
                                                           "champion_fitness": path_evo.champion_fitness},
              "test": table, "champion_recipe": recipe.to_dict()}
    ctx.result.artifacts["report"] = paths.relative(write_json_atomic(ctx.path("report.json"), report))
    ctx.save_model("champion", champion, tokenizer, metadata={"recipe": paths.relative(ctx.dir / "recipe.yaml")})
    _summarize(ctx, table, params, evo, recipe)
    return ctx.result


def _portable_path(layer_path, folders: dict[str, str]):
    if not layer_path:
        return layer_path
    return [[folders.get(src, src), layer] for src, layer in layer_path]


def _strip(evaluations: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "recipe"} | {"recipe_method": e["recipe"]["method"]}
            for e in evaluations]


def _summarize(ctx, table: dict, params: Params, evo, recipe: MergeRecipe) -> None:
    parents = {n: table[n]["score"] for n in params.sources}
    best_parent = max(parents, key=parents.get)
    champ = table["champion"]["score"]
    ctx.result.metrics.update({
        "champion_method": recipe.method, "champion_fitness": round(evo.champion_fitness, 4),
        "champion_test": round(champ, 4), "champion_test_acc": round(table["champion"]["accuracy"], 4),
        "best_parent": best_parent, "best_parent_test": round(parents[best_parent], 4),
        "uniform_test": round(table["uniform_merge"]["score"], 4), "evaluations": len(evo.evaluations)})
    ctx.result.gate.extend([
        GateCheck("champion_minus_best_parent", champ - parents[best_parent], 0.0, ">="),
        GateCheck("champion_minus_uniform", champ - table["uniform_merge"]["score"], 0.0, ">")])
