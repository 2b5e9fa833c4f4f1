"""Evolutionary search over merge recipes with CMA-ES (the ``cma`` package).

Parameter space (:func:`evolve_recipe`): for each candidate method, CMA-ES tunes the method's continuous
parameters -- per source model ``weights`` and ``density``, or the interpolation ``t`` -- either per layer
group or once for the whole model. Coordinates live in the unit cube (``cma`` bounds [0, 1]) and are mapped
linearly onto each parameter's range (weights [0, 2], densities [0.01, 1], t [0, 1]), so one step size
suits all of them. The discrete choice of method is made by running one CMA-ES per method, each with an
equal share of the evaluation budget (methods without continuous parameters get a single evaluation), and
keeping the best candidate overall: with a handful of methods this is simpler and less noisy than a
continuous relaxation of the method choice.

Data-flow space (:func:`evolve_layer_path`): which source's block runs at each depth. CMA-ES evolves one
real logit per (depth, source) pair; a candidate's path takes the argmax source at each depth.

Every candidate is built in memory (``merge_models``), scored by the caller's ``fitness_fn(model) -> float``
(higher is better; the phase uses measured loss/accuracy on its fitness split), logged, and counted against
the budget (an upper bound: a CMA-ES run that has converged stops early). All candidates share the recipe seed, so
randomised methods (DARE, DELLA) see the same masks
throughout and the champion rebuilds bit-exactly from its saved recipe. The optional ``test_fn`` scores the
champion once at the end (the test split). Note that ``cma`` reseeds numpy's global RNG from its seed.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import time
from typing import Any, Callable, Mapping, Sequence

import cma
import numpy as np
import torch
import yaml

from ..jobs import run_jobs
from ..progress import progress_bar
from .methods import MergeError, get_method
from .models import MergeRecipe, _layer_table, merge_models, model_groups, uniform_recipe

FitnessFn = Callable[[torch.nn.Module], float]
PARAM_RANGES = {"weights": (0.0, 2.0), "density": (0.01, 1.0), "t": (0.0, 1.0)}
_WORST = 1e30  # what CMA-ES is told for a non-finite fitness (it minimizes; only ranks matter)


@dataclasses.dataclass
class EvolutionResult:
    """Outcome of a search: the champion and the full record."""

    champion: MergeRecipe
    champion_fitness: float
    generations: list[dict[str, Any]]
    """One row per (method, generation): method, generation, best, mean, evaluations."""
    evaluations: list[dict[str, Any]]
    """One row per evaluation: index, method, generation, fitness, seconds, cached, recipe (dict)."""
    champion_test: float | None = None
    """The champion's score from ``test_fn`` (the test split), when one was given."""

    @property
    def best_per_generation(self) -> list[float]:
        """Best fitness of each generation, in search order."""
        return [g["best"] for g in self.generations]

    @property
    def mean_per_generation(self) -> list[float]:
        """Mean fitness of each generation, in search order."""
        return [g["mean"] for g in self.generations]


@dataclasses.dataclass
class _Coordinate:
    group: str | None  # None: a global parameter
    param: str
    model: int | None  # index into the per-model list, None for scalar parameters
    lo: float
    hi: float
    init: float


class RecipeSpace:
    """The continuous search space of one merge method; decodes unit-cube points into recipes."""

    def __init__(self, method: str, names: Sequence[str], groups: Sequence[str] | None,
                 fixed: Mapping[str, Any] | None = None, base_name: str | None = None,
                 group_size: int = 1, seed: int = 0):
        self.spec = get_method(method)
        self.names, self.groups = list(names), (list(groups) if groups else None)
        self.fixed, self.base_name = dict(fixed or {}), base_name
        self.group_size, self.seed = group_size, seed
        self.coords = [c for g in (self.groups or [None]) for c in self._group_coords(g)]

    def _range(self, param: str) -> tuple[float, float]:
        lo, hi = PARAM_RANGES[param]
        if param == "density" and self.spec.name == "della":  # della needs density +- epsilon in (0, 1)
            eps = float(self.fixed.get("epsilon", self._default("epsilon")))
            lo, hi = eps + 0.01, 1.0 - eps - 0.01
        return lo, hi

    def _default(self, param: str) -> Any:
        return inspect.signature(self.spec.fn).parameters[param].default

    def _init(self, param: str) -> float:
        if param == "weights":  # un-normalized methods start at the plain average of the task vectors
            normalize = self.fixed.get("normalize", self._default("normalize")
                                       if "normalize" in self.spec.parameters else True)
            return 1.0 if normalize else 1.0 / len(self.names)
        return 0.5

    def _group_coords(self, group: str | None) -> list[_Coordinate]:
        coords = []
        for param in self.spec.evolvable:
            lo, hi = self._range(param)
            models = range(len(self.names)) if param in ("weights", "density") else [None]
            coords += [_Coordinate(group, param, m, lo, hi, self._init(param)) for m in models]
        return coords

    @property
    def dim(self) -> int:
        """Number of continuous coordinates."""
        return len(self.coords)

    def x0(self) -> np.ndarray:
        """The starting point in unit coordinates."""
        return np.array([(c.init - c.lo) / (c.hi - c.lo) for c in self.coords], dtype=float)

    def decode(self, x: Sequence[float]) -> MergeRecipe:
        """The recipe at unit-cube point ``x`` (values clipped into [0, 1])."""
        parameters, groups = dict(self.fixed), {}
        for c, u in zip(self.coords, x):
            value = c.lo + float(min(max(u, 0.0), 1.0)) * (c.hi - c.lo)
            target = parameters if c.group is None else groups.setdefault(c.group, {})
            if c.model is None:
                target[c.param] = value
            else:
                target.setdefault(c.param, [0.0] * len(self.names))[c.model] = value
        return MergeRecipe(method=self.spec.name, models=list(self.names), base=self.base_name,
                           parameters=parameters, groups=groups, group_size=self.group_size, seed=self.seed)


class _Evaluator:
    """Builds, scores, logs and records candidates, and keeps the champion."""

    def __init__(self, models, base, fitness_fn: FitnessFn, log: Callable[[dict], None] | None, bar,
                 workers: int = 1):
        self.models, self.base, self.fitness_fn, self.log, self.bar = models, base, fitness_fn, log, bar
        self.workers = workers
        self.evaluations: list[dict[str, Any]] = []
        self.generations: list[dict[str, Any]] = []
        self.champion: tuple[float, MergeRecipe] | None = None
        self._cache: dict[str, float] = {}

    def _score(self, recipe: MergeRecipe) -> tuple[float, float]:
        start = time.perf_counter()
        model = merge_models(recipe, self.models, self.base)
        with torch.no_grad():
            return float(self.fitness_fn(model)), time.perf_counter() - start

    def many(self, recipes: Sequence[MergeRecipe], label: str, generation: int) -> list[float]:
        """Score a generation's candidates (``workers`` at a time; each distinct recipe once) and record them in
        order, as one call per candidate would."""
        keys = [yaml.safe_dump(r.to_dict()) for r in recipes]
        todo = {k: r for k, r in zip(keys, recipes) if k not in self._cache}
        scored = dict(zip(todo, run_jobs([functools.partial(self._score, r) for r in todo.values()], self.workers)))
        out = []
        for key, recipe in zip(keys, recipes):
            fitness, seconds = scored.pop(key, (None, 0.0))
            out.append(self(recipe, label, generation, fitness, seconds))
        return out

    def __call__(self, recipe: MergeRecipe, label: str, generation: int, fitness: float | None = None,
                 seconds: float = 0.0) -> float:
        key = yaml.safe_dump(recipe.to_dict())  # identical candidates (e.g. decoded paths) are scored once
        cached = key in self._cache and fitness is None
        if fitness is None and not cached:
            fitness, seconds = self._score(recipe)
        if fitness is not None:
            self._cache[key] = fitness
        fitness = self._cache[key]
        record = {"index": len(self.evaluations), "method": label, "generation": generation,
                  "fitness": fitness, "seconds": seconds, "cached": cached,
                  "recipe": recipe.to_dict()}
        self.evaluations.append(record)
        if self.log is not None:
            self.log(record)
        if math.isfinite(fitness) and (self.champion is None or fitness > self.champion[0]):
            self.champion = (fitness, recipe)
        self.bar.update(1)
        self.bar.set_postfix(best=f"{self.champion[0]:.4g}" if self.champion else "nan", method=label)
        return fitness

    def end_generation(self, label: str, generation: int, fitnesses: list[float]) -> None:
        finite = [f for f in fitnesses if math.isfinite(f)]
        self.generations.append({"method": label, "generation": generation, "evaluations": len(fitnesses),
                                 "best": max(finite) if finite else float("nan"),
                                 "mean": float(np.mean(finite)) if finite else float("nan")})

    def result(self, test_fn: FitnessFn | None) -> EvolutionResult:
        if self.champion is None:
            raise MergeError("no candidate had a finite fitness; check fitness_fn")
        fitness, recipe = self.champion
        test = None
        if test_fn is not None:
            with torch.no_grad():
                test = float(test_fn(merge_models(recipe, self.models, self.base)))
        return EvolutionResult(recipe, fitness, self.generations, self.evaluations, test)


def _run_cma(x0: np.ndarray, decode: Callable[[np.ndarray], MergeRecipe], budget: int, evaluator: _Evaluator,
             label: str, sigma0: float, popsize: int | None, seed: int, bounds: list | None) -> None:
    """One CMA-ES run of at most ``budget`` evaluations (ask/tell; CMA-ES minimizes -fitness)."""
    if len(x0) == 0:  # nothing continuous to tune: a single evaluation
        evaluator.end_generation(label, 0, [evaluator(decode(x0), label, 0)])
        return
    opts: dict[str, Any] = {"seed": seed, "verbose": -9}
    if bounds is not None:
        opts["bounds"] = bounds
    if popsize:
        opts["popsize"] = popsize
    if len(x0) == 1:  # cma cannot cap the step size of a 1-D search at the bound range (it raises)
        opts["maxstd"] = math.inf
    es = cma.CMAEvolutionStrategy(list(x0), sigma0, opts)
    used = generation = 0
    while used < budget and not es.stop():
        xs = es.ask()[: budget - used]
        fitnesses = evaluator.many([decode(x) for x in xs], label, generation)
        evaluator.end_generation(label, generation, fitnesses)
        if len(xs) == es.popsize:  # a generation cut short by the budget is scored but not told
            es.tell(xs, [-f if math.isfinite(f) else _WORST for f in fitnesses])
        used += len(xs)
        generation += 1


def _split_budget(budget: int, dims: Sequence[int]) -> list[int]:
    """One evaluation for each parameter-free method; the rest shared evenly by the others."""
    n_free, n_cma = sum(d == 0 for d in dims), sum(d > 0 for d in dims)
    rest = budget - n_free
    if rest < 0 or (n_cma and rest < n_cma):
        raise MergeError(f"budget {budget} is too small for {len(dims)} methods")
    shares, k = [], 0
    for d in dims:
        if d == 0:
            shares.append(1)
        else:
            shares.append(rest // n_cma + (1 if k < rest % n_cma else 0))
            k += 1
    return shares


def _check_fixed(methods: Sequence[str], fixed_params: Mapping[str, Mapping[str, Any]] | None) -> None:
    for method, params in (fixed_params or {}).items():
        if method not in methods:
            raise MergeError(f"fixed_params names method {method!r}, which is not searched; methods: {list(methods)}")
        spec = get_method(method)
        valid = [p for p in spec.parameters if p not in spec.evolvable and p not in ("seed", "generator")]
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise MergeError(f"fixed_params[{method!r}] has unknown parameter(s) {unknown}; valid: {valid}")


def evolve_recipe(models: Mapping[str, torch.nn.Module], base: torch.nn.Module, fitness_fn: FitnessFn,
                  methods: Sequence[str] = ("task_arithmetic", "ties", "dare_ties"), budget: int = 60,
                  popsize: int | None = None, seed: int = 0, sigma0: float = 0.25, per_layer: bool = True,
                  group_size: int = 1, fixed_params: Mapping[str, Mapping[str, Any]] | None = None,
                  base_name: str | None = None, include_uniform: bool = True, progress: bool = True,
                  log: Callable[[dict], None] | None = None, test_fn: FitnessFn | None = None,
                  workers: int = 1) -> EvolutionResult:
    """Search merge recipes of ``models`` (name -> model, sharing the trunk ``base``) with CMA-ES.

    ``budget`` counts evaluations of ``fitness_fn`` (higher is better) over all ``methods``; ``per_layer``
    tunes parameters per layer group (``group_size`` layers each) instead of once globally; ``fixed_params``
    sets non-searched parameters per method (e.g. ``{"breadcrumbs": {"gamma": 0.05}}``); ``sigma0`` is the
    initial step in unit coordinates. ``include_uniform`` spends the first evaluation on the plain average
    merge (labelled ``uniform``), so the champion is never worse than it on the fitness split.
    ``log(record)`` receives every evaluation. ``workers`` > 1 scores a generation's candidates that many at a time
    (``forgelib.jobs``: ``fitness_fn`` is then called from several threads, each with its own candidate; the
    search is the same). See the module docstring.
    """
    if not isinstance(models, Mapping) or not models:
        raise MergeError("models must be a non-empty mapping of name -> model")
    if not methods or "passthrough" in methods:
        raise MergeError(f"methods must name parameter-space merge methods (layer stacking is searched by "
                         f"evolve_layer_path), got {list(methods)}")
    if "slerp" in methods and len(models) > 2:
        raise MergeError(f"slerp merges two endpoints; got {len(models)} models")
    _check_fixed(methods, fixed_params)
    groups = model_groups(base, group_size) if per_layer else None
    spaces = [RecipeSpace(m, list(models), groups, (fixed_params or {}).get(m), base_name, group_size, seed)
              for m in methods]
    shares = _split_budget(budget - int(include_uniform), [s.dim for s in spaces])
    with progress_bar(total=sum(shares) + int(include_uniform), desc="evomerge", disable=not progress,
                      unit="evaluations") as bar:
        evaluator = _Evaluator(models, base, fitness_fn, log, bar, workers)
        if include_uniform:
            uniform = uniform_recipe(list(models), base_name)
            evaluator.end_generation("uniform", 0, [evaluator(uniform, "uniform", 0)])
        for i, (space, share) in enumerate(zip(spaces, shares)):
            _run_cma(space.x0(), space.decode, share, evaluator, space.spec.name, sigma0, popsize,
                     1 + 1000 * seed + i, [0.0, 1.0])
    return evaluator.result(test_fn)


def evolve_layer_path(models: Mapping[str, torch.nn.Module], base: torch.nn.Module, fitness_fn: FitnessFn,
                      depth: int | None = None, recipe: MergeRecipe | None = None, budget: int = 60,
                      popsize: int | None = None, seed: int = 0, sigma0: float = 1.0,
                      base_name: str | None = None, progress: bool = True,
                      log: Callable[[dict], None] | None = None, test_fn: FitnessFn | None = None) -> EvolutionResult:
    """Data-flow search: which source's block runs at each depth ``d`` (block ``d mod L`` of an ``L``-layer
    source; ``depth`` defaults to ``L``, larger values stack blocks repeatedly like recursion cycles).

    Sources are ``"base"`` and the models, plus ``"merged"`` when a parameter-space ``recipe`` is given
    (its merged model then also supplies the non-layer parameters). CMA-ES evolves a logit per
    (depth, source), decoded by argmax; identical decoded paths are scored once (cached) but still count
    against ``budget``.
    """
    names = list(recipe.models) if recipe is not None else list(models)
    n_layers = len(_layer_table(base.state_dict()))
    depth = depth or n_layers
    sources = ["base", *names] + (["merged"] if recipe is not None and recipe.method != "passthrough" else [])
    template = recipe or MergeRecipe("passthrough", names, base_name, seed=seed, layer_path=[["base", 0]])

    def decode(x: np.ndarray) -> MergeRecipe:
        logits = np.asarray(x, dtype=float).reshape(depth, len(sources))  # (depth, S)
        path = [[sources[int(np.argmax(row))], d % n_layers] for d, row in enumerate(logits)]
        return dataclasses.replace(template, layer_path=path)

    with progress_bar(total=budget, desc="evomerge paths", disable=not progress, unit="evaluations") as bar:
        evaluator = _Evaluator(models, base, fitness_fn, log, bar)
        _run_cma(np.zeros(depth * len(sources)), decode, budget, evaluator, "layer_path", sigma0, popsize,
                 1 + 1000 * seed, None)
    return evaluator.result(test_fn)
