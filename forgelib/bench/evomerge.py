"""`forge bench evomerge`: the evolved recipe vs fixed recipes at the same evaluation budget, several seeds.

Contenders, each scored on the test split with Phase 2's score (accuracy − loss_weight × answer NLL):
- ``evolved``: Phase 2's CMA-ES search with ``--budget`` fitness evaluations (seed = search seed);
- ``uniform``: the plain average (linear, equal weights) — nothing to tune, one evaluation;
- ``ties``: TIES with equal weights and density 0.5 (deterministic: the budget cannot buy it anything);
- ``dare_ties``: DARE-TIES, weights 1/n, density 0.5; the budget buys the best of ``--budget`` random masks on
  the fitness split.
The specialists come from a Phase 1 output folder (``--phase1``), or Phase 1 is run on the smoke set first.
Prints JSON (also written under outputs/bench/) with per-seed scores and wall time, medians and gains.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .. import paths
from ..merge import MergeRecipe, evolve_recipe, merge_models
from ..merge.models import uniform_recipe
from ..phases.evomerge import Params, _configured, make_scorer


def _phase1(folder: str | None) -> Path:
    """An existing Phase 1 folder, or a fresh smoke-set run in a temporary outputs folder."""
    if folder:
        return paths.resolve(folder)
    from ..phases import open_phase, run_phase

    os.environ["FORGE_OUTPUTS"] = tempfile.mkdtemp(prefix="forge-bench-evomerge-")
    ctx = open_phase("cognate", "parameters/smoke.yaml", {"run": {"quiet": True, "tracking": "none"}})
    run_phase(ctx)
    return ctx.dir


def _load(phase1: Path, params: Params):
    from transformers import AutoTokenizer

    from ..models.loading import load_causal_lm
    from ..results import PhaseResult

    result = PhaseResult.load(phase1)
    folder = lambda role: paths.resolve(result.models[role]["path"])  # noqa: E731
    models = {r: load_causal_lm(folder(r)).eval() for r in params.sources}
    return models, load_causal_lm(folder(params.base)).eval(), AutoTokenizer.from_pretrained(folder("tokenizer"))


def _score(recipe: MergeRecipe, models, base, scorer, params: Params) -> dict:
    with torch.no_grad():
        return scorer.details(_configured(merge_models(recipe, models, base), params.runtime))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 2)


def _dare_best_of(models, base, fitness, test, params: Params, budget: int, seed: int) -> dict:
    names = list(models)
    best = None
    for k in range(budget):
        recipe = MergeRecipe("dare_ties", names, params.base, parameters={"weights": [1 / len(names)] * len(names),
                                                                          "density": 0.5}, seed=1000 * seed + k)
        fit = _score(recipe, models, base, fitness, params)["score"]
        if best is None or fit > best[0]:
            best = (fit, recipe)
    return {**_score(best[1], models, base, test, params), "fitness": best[0]}


def run_seed(models, base, fitness, test, params: Params, budget: int, seed: int) -> dict:
    """All contenders for one search seed."""
    names = list(models)
    fitness_fn = lambda m: fitness(_configured(m, params.runtime))  # noqa: E731
    evo, evo_s = _timed(lambda: evolve_recipe(models, base, fitness_fn, methods=params.methods, budget=budget,
                                              seed=seed, sigma0=params.sigma0, per_layer=params.per_layer,
                                              base_name=params.base, progress=False))
    ties = MergeRecipe("ties", names, params.base, parameters={"weights": 1.0, "density": 0.5})
    out = {"evolved": {**_score(evo.champion, models, base, test, params), "fitness": evo.champion_fitness,
                       "method": evo.champion.method, "seconds": evo_s}}
    for label, fn in (("uniform", lambda: _score(uniform_recipe(names, params.base), models, base, test, params)),
                      ("ties", lambda: _score(ties, models, base, test, params)),
                      ("dare_ties", lambda: _dare_best_of(models, base, fitness, test, params, budget, seed))):
        row, secs = _timed(fn)
        out[label] = {**row, "seconds": secs}
    return out


def summarize(per_seed: list[dict]) -> dict:
    """Medians per contender and the evolved recipe's median gain over each (per-seed differences)."""
    labels = list(per_seed[0])
    med = {k: round(statistics.median(r[k]["score"] for r in per_seed), 4) for k in labels}
    gains = {f"evolved_minus_{k}": round(statistics.median(r["evolved"]["score"] - r[k]["score"] for r in per_seed), 4)
             for k in labels if k != "evolved"}
    wins = {f"evolved_beats_{k}": sum(r["evolved"]["score"] > r[k]["score"] for r in per_seed)
            for k in labels if k != "evolved"}
    return {"median_test_score": med, "median_gain": gains, "seeds_won": wins,
            "median_seconds": {k: statistics.median(r[k]["seconds"] for r in per_seed) for k in labels}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forge bench evomerge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase1", default=None, help="a Phase 1 output folder (default: run the smoke set)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = Params()
    phase1 = _phase1(args.phase1)
    models, base, tokenizer = _load(phase1, params)
    fitness = make_scorer(params, tokenizer, "fitness", params.fitness_per_family, seed=0)
    test = make_scorer(params, tokenizer, "test", params.test_per_family, seed=1)
    per_seed = [run_seed(models, base, fitness, test, params, args.budget, s) for s in range(args.seeds)]
    report = {"benchmark": "evomerge", "phase1": str(phase1), "budget": args.budget, "seeds": args.seeds,
              "params": dataclasses.asdict(params), "n_fitness": len(fitness.samples), "n_test": len(test.samples),
              "per_seed": per_seed, **summarize(per_seed)}
    text = json.dumps(report, indent=2, default=str)
    print(text)
    out = Path(args.out) if args.out else paths.repo_root() / "outputs" / "bench" / f"evomerge-{int(time.time())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0
