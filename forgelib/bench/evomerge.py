"""`forge bench evomerge`: Phase 2's evolved merge vs the trunk and fixed or lightly tuned merges.

Contenders, each scored once on the test split with Phase 2's scorer (exact-match accuracy over the union of
the families first, answer NLL as the tie-breaker; ``score`` = accuracy − loss_weight × answer NLL is also
given). Every merge picks its runtime setting among Phase 2's ``runtime_choices`` on the fitness split.
- ``evolved``: Phase 2's search (runtime screen, CMA-ES, runtime re-pick) with ``--budget`` fitness
  evaluations (seed = search seed);
- ``trunk``: the merge base as Phase 1 saved it (its own settings; nothing to tune);
- ``single_weight``: task arithmetic ``trunk + w·Σ(source − trunk)`` with one scalar ``w`` for all sources,
  chosen on the fitness split over ``--weight-grid`` (default 0, 0.1, …, 1.0; ``w = 0`` is the trunk's
  weights) × the runtime choices (11 × 4 = 44 fitness evaluations with the defaults);
- ``uniform``: the plain average (linear, equal weights);
- ``ties``: TIES with equal weights and density 0.5;
- ``dare_ties``: DARE-TIES, weights 1/n, density 0.5: the best (mask, runtime) of ``--budget`` evaluations.

What varies between seeds: **only the search** (the CMA-ES seed, and DARE's masks). Every seed uses the same
Phase-1 models (one Phase-1 run: ``--phase1``, or one smoke-set run) and the same fitness and test sets, so
the spread over seeds is search noise, not training or test-set noise. ``--rerun-phase1`` reruns Phase 1 on
the smoke set for every seed (run seed = seed), so that the seeds also vary the specialists and the trunk.
Prints JSON (also written under outputs/bench/) with per-seed rows and wall time, medians, and the evolved
merge's wins (by the Phase 2 gate's rule) and median accuracy gains over each contender.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .. import paths
from ..merge import MergeRecipe, merge_models
from ..merge.models import uniform_recipe
from ..phases.evomerge import Params, make_scorer, ranks_at_least, runtime_settings, search
from ..results import dumps_json
from .options import EVOMERGE_WEIGHT_GRID as DEFAULT_WEIGHT_GRID, build_parser

TEST_PER_FAMILY = 24
"""Test-split questions per family of the benchmark's test scorer (Phase 2 itself now tests on the guard's)."""


def _phase1(folder: str | None, seed: int = 0) -> Path:
    """An existing Phase 1 folder, or a fresh smoke-set run (run seed ``seed``) in a temporary outputs folder."""
    if folder:
        return paths.resolve(folder)
    from ..phases import open_phase, run_phase

    os.environ["FORGE_OUTPUTS"] = tempfile.mkdtemp(prefix="forge-bench-evomerge-")
    ctx = open_phase("cognate", "parameters/smoke.yaml",
                     {"run": {"quiet": True, "tracking": "none", "seed": seed}})
    run_phase(ctx)
    return ctx.dir


def _load(phase1: Path, params: Params):
    from transformers import AutoTokenizer

    from ..modelio import load_causal_lm
    from ..results import PhaseResult

    result = PhaseResult.load(phase1)
    folder = lambda role: paths.resolve(result.models[role]["path"])  # noqa: E731
    models = {r: load_causal_lm(folder(r)).eval() for r in params.sources}
    return models, load_causal_lm(folder(params.base)).eval(), AutoTokenizer.from_pretrained(folder("tokenizer"))


def single_weight_recipe(names: list[str], base: str | None, weight: float) -> MergeRecipe:
    """Task arithmetic with one weight for every source: ``trunk + weight · Σ(source − trunk)``."""
    return MergeRecipe("task_arithmetic", list(names), base,
                       parameters={"weights": [float(weight)] * len(names), "normalize": False})


def _score(recipe: MergeRecipe, models, base, scorer) -> dict:
    with torch.no_grad():
        return scorer.details(merge_models(recipe, models, base))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 2)


def best_on_fitness(recipes: list[MergeRecipe], runtimes: list[dict], models, base,
                    fitness) -> tuple[MergeRecipe, float]:
    """The best (recipe, runtime) pair on the fitness split (the first on ties); the recipe carries its runtime
    in ``config``. ``fitness(model) -> float``."""
    best = None
    for recipe in recipes:
        for runtime in runtimes:
            candidate = dataclasses.replace(recipe, config=dict(runtime))
            with torch.no_grad():
                value = float(fitness(merge_models(candidate, models, base)))
            if best is None or value > best[1]:
                best = (candidate, value)
    return best


def single_weight_search(models, base, fitness, params: Params, grid=DEFAULT_WEIGHT_GRID,
                         runtimes: list[dict] | None = None) -> tuple[MergeRecipe, float]:
    """Fitness-tuned single-weight task arithmetic: the best ``w`` of ``grid`` × runtime choices."""
    runtimes = runtime_settings(params, base) if runtimes is None else runtimes
    return best_on_fitness([single_weight_recipe(list(models), params.base, w) for w in grid], runtimes,
                           models, base, fitness)


def _fixed(recipe: MergeRecipe, models, base, fitness, test, runtimes) -> dict:
    chosen, fit = best_on_fitness([recipe], runtimes, models, base, fitness)
    return {**_score(chosen, models, base, test), "fitness": fit, "runtime": chosen.config}


def _dare_best_of(models, base, fitness, test, params: Params, budget: int, seed: int, runtimes) -> dict:
    names = list(models)
    masks = [MergeRecipe("dare_ties", names, params.base, parameters={"weights": [1 / len(names)] * len(names),
                                                                      "density": 0.5}, seed=1000 * seed + k)
             for k in range(max(1, budget // len(runtimes)))]
    chosen, fit = best_on_fitness(masks, runtimes, models, base, fitness)
    return {**_score(chosen, models, base, test), "fitness": fit, "runtime": chosen.config, "mask_seed": chosen.seed}


def run_seed(models, base, fitness, test, params: Params, budget: int, seed: int,
             grid=DEFAULT_WEIGHT_GRID) -> dict:
    """All contenders for one search seed."""
    names = list(models)
    runtimes = runtime_settings(params, base)
    # the merge search alone (the phase also lets the unmerged trunk and parents compete; here they are
    # contenders of their own, so "evolved" measures what merging finds)
    search_params = dataclasses.replace(params, budget=budget, unmerged_candidates=False)
    evo, evo_s = _timed(lambda: search(search_params, models, base, fitness, seed=seed))
    out = {"evolved": {**_score(evo.champion, models, base, test), "fitness": evo.champion_fitness,
                       "method": evo.champion.method, "runtime": evo.champion.config, "seconds": evo_s}}
    trunk, secs = _timed(lambda: {**test.details(base), "fitness": fitness(base)})
    out["trunk"] = {**trunk, "seconds": secs}

    def single_weight() -> dict:
        recipe, fit = single_weight_search(models, base, fitness, params, grid, runtimes)
        return {**_score(recipe, models, base, test), "fitness": fit, "weight": recipe.parameters["weights"][0],
                "runtime": recipe.config}

    ties = MergeRecipe("ties", names, params.base, parameters={"weights": 1.0, "density": 0.5})
    for label, fn in (("single_weight", single_weight),
                      ("uniform", lambda: _fixed(uniform_recipe(names, params.base), models, base, fitness, test,
                                                 runtimes)),
                      ("ties", lambda: _fixed(ties, models, base, fitness, test, runtimes)),
                      ("dare_ties", lambda: _dare_best_of(models, base, fitness, test, params, budget, seed,
                                                          runtimes))):
        row, secs = _timed(fn)
        out[label] = {**row, "seconds": secs}
    return out


def summarize(per_seed: list[dict]) -> dict:
    """Medians per contender; the evolved merge's wins by the gate's rule (accuracy, NLL on a tie) and its
    median accuracy gain over each contender (per-seed differences)."""
    labels = list(per_seed[0])
    median = lambda key: {k: round(statistics.median(r[k][key] for r in per_seed), 4) for k in labels}  # noqa: E731
    others = [k for k in labels if k != "evolved"]
    return {"median_test_accuracy": median("accuracy"), "median_test_nll": median("answer_nll"),
            "median_test_score": median("score"),
            "median_accuracy_gain": {f"evolved_minus_{k}": round(statistics.median(
                r["evolved"]["accuracy"] - r[k]["accuracy"] for r in per_seed), 4) for k in others},
            "seeds_evolved_at_least": {k: sum(ranks_at_least(r["evolved"], r[k]) for r in per_seed) for k in others},
            "median_seconds": {k: statistics.median(r[k]["seconds"] for r in per_seed) for k in labels}}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("evomerge")
    args = parser.parse_args(argv)
    out = paths.bench_output("evomerge", args.out)  # before a fresh Phase 1 points FORGE_OUTPUTS at a temporary folder
    if args.rerun_phase1 and args.phase1:
        parser.error("--rerun-phase1 runs Phase 1 itself; leave out --phase1")
    torch.set_num_threads(args.threads)
    params = Params()
    per_seed, phase1_runs = [], []
    setup = None
    for s in range(args.seeds):
        if setup is None or args.rerun_phase1:
            phase1 = _phase1(args.phase1, seed=s if args.rerun_phase1 else 0)
            phase1_runs.append(str(phase1))
            models, base, tokenizer = _load(phase1, params)
            fitness = make_scorer(params, tokenizer, "fitness", params.fitness_per_family, seed=0)
            test = make_scorer(params, tokenizer, "test", TEST_PER_FAMILY, seed=1)
            setup = (models, base, fitness, test)
        per_seed.append(run_seed(*setup, params, args.budget, s, args.weight_grid))
    varies = ("each seed reruns Phase 1 (smoke set, run seed = seed) and the search; the fitness and test "
              "sets are the same for every seed" if args.rerun_phase1 else
              "seeds vary only the search (CMA-ES seed and DARE masks), over one Phase-1 run and one fitness "
              "and one test set")
    report = {"benchmark": "evomerge", "what_the_seeds_vary": varies, "phase1_runs": phase1_runs,
              "budget": args.budget, "seeds": args.seeds, "weight_grid": args.weight_grid,
              "params": dataclasses.asdict(params), "n_fitness": len(setup[2].samples),
              "n_test": len(setup[3].samples), "per_seed": per_seed, **summarize(per_seed)}
    text = dumps_json(report, default=str)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0
