"""Phase 7 — Experts: self-guided SVF experts (Transformer²), two-pass routing, mixtures for an unseen task.

The Phase-6 model's base language model gets SVF expert vectors (``forgelib.experts``: one ``z`` per attention/MLP
matrix; ternary layers keep their stored codes, an expert's layer computes with ``U diag(σ ⊙ s(z)) Vᵀ`` of the
ternary matrix).

1. **Discovery**: the model's own hidden states of ``discover_per_family`` train questions per family (levels
   ``levels``) are clustered (k-means, k in ``k_range`` chosen by the silhouette). Each cluster is one expert's
   training set: the split is the model's, not the family list (the report shows how families fall into clusters).
2. **Experts**: per cluster a ``z`` trained by REINFORCE on the exact-match reward of the model's own sampled answers
   with a KL term to the base (``train``; ``method: ce`` trains by cross-entropy on its correct answers instead).
3. **Two-pass inference**: pass 1 routes a question to the nearest centroid of its base hidden state, pass 2
   answers with that expert.
4. **Unseen family** (``unseen_family``): a CEM search over mixtures ``Σ α_k z_k`` scored on ``few_shot``
   questions of a family no expert trained on; measured on its test questions.
5. **Routing search**: CMA-ES over the routing strength and confidence gate (``forgelib.experts.route``), held-out
   accuracy against seconds per question; the best setting at weight 0 is reported (not used by the gate).

**Measured** (test split, greedy, calculator on, without Quiet-STaR thoughts as in Phases 5–6, the persona's answer
prefix removed): per question the base (``z = 0``), every expert, the routed answer; per cluster (its test
questions = those routed to it) base vs its expert; ``acc_oracle`` = a question counts when any expert answers
it; ``routing_acc`` = among the questions some expert answers, the share routed to an expert that does.

**Router**: the discovered centroids route to the experts; the families of the input suite that no expert trains on
get base centroids (``base_per_family``), which route their questions to the base model unchanged.

**Gate** (``forgelib.stats``'s paired rule): on the test questions routed to it, each expert is non-inferior to the
base at ``margin``; the routing accuracy's lower confidence bound clears ``min_routing_acc``; the guard: the routed
system (experts and router) keeps every family of the input suite (``forgelib.suite``), which replaces the old
"routed accuracy not below the base" check over the experts' families only.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..baking.library import make_check
from ..data.tasks import FAMILIES, generate, generate_levels
from ..params import check_fields, require_non_negative, require_positive
from ..progress import timed
from ..results import GateCheck, PhaseResult
from ..quietstar import base_lm
from .common import check_levels, check_optimizer

HEADLINE = ("n_experts", "expert_params", "acc_base", "acc_routed", "acc_oracle", "routing_acc")


@dataclasses.dataclass
class CemSettings:
    """The keys of ``cem`` (``forgelib.experts.svf.cem_search``'s settings) and their types."""

    iterations: int = 10
    population: int = 16
    elite: int = 4
    init_std: float = 1.0
    bounds: tuple[float, float] = (-1.0, 2.0)
    noise_decay: float = 0.8


def check_cem(settings: dict) -> dict:
    """``cem`` with its keys, types and ranges checked (ValueError naming the key)."""
    checked = check_fields(CemSettings, settings, "cem")
    full = dataclasses.replace(CemSettings(), **checked)
    try:
        require_positive(full, "iterations", "population", "elite", "init_std")
    except ValueError as exc:
        raise ValueError(f"cem.{exc}") from None
    if full.elite > full.population:
        raise ValueError(f"cem: elite ({full.elite}) must not exceed population ({full.population})")
    if not 0 <= full.noise_decay <= 1 or not full.bounds[0] < full.bounds[1]:
        raise ValueError(f"cem: noise_decay must lie in [0, 1] and bounds be (low, high) with low < high, got "
                         f"{full.noise_decay} and {full.bounds}")
    return checked


@dataclasses.dataclass
class Params:
    """Phase 7 parameters (the ``experts`` section). Defaults are the smoke set."""

    source: str = "model"
    families: list[str] = dataclasses.field(default_factory=lambda: ["arith", "multistep", "algebra", "tool"])
    levels: tuple[int, int] = (1, 3)
    discover_per_family: int = 48
    k_range: tuple[int, int] = (2, 4)
    svf: dict[str, Any] = dataclasses.field(default_factory=dict)
    """``SVFConfig`` fields (target_modules, rescale)."""
    train: dict[str, Any] = dataclasses.field(default_factory=lambda: {"steps": 15})
    """``ExpertTrainConfig`` fields (method, steps, batch_size, lr, kl_weight, temperature, max_new_tokens)."""
    test_per_level: int | None = None
    """Test questions per family and level; None: enough for each expert's check, i.e. 1.5 × k × the number
    ``margin`` needs under the ``guard`` rule, spread over the families and levels (k: the experts discovered)."""
    unseen_per_level: int = 8
    """Test questions per level of the unseen family (the mixture's report; not gated)."""
    validate_per_level: int = 16
    """Fitness-split questions per family and level on which each trained expert must be shown better than the base
    (paired superiority), or it is retired (``z = 0``: its cluster answered by the base model)."""
    answer_prefixes: list[str] = dataclasses.field(default_factory=lambda: ["Answer:"])
    """Answer styles removed before the task checker (the persona Phase 6 baked)."""
    unseen_family: str | None = "modular"
    few_shot: int = 8
    cem: dict[str, Any] = dataclasses.field(default_factory=lambda: {"iterations": 3, "population": 6, "elite": 2})
    search_budget: int = 4
    """Routing settings evaluated per trade-off weight (0: no search)."""
    search_per_family: int = 4
    max_new_tokens: int = 40
    margin: float = 0.10
    """Gate: on the test questions routed to it, each expert's accuracy may trail the base's by at most this (paired
    non-inferiority, ``forgelib.stats``); the gain is reported whatever its sign."""
    min_routing_acc: float = 0.5
    """Gate: the one-sided lower confidence bound of the routing accuracy (among the test questions some expert
    answers, the share routed to one that does) must clear this."""
    base_per_family: int = 32
    """Train questions per family of the input suite that no expert trains on (e.g. logic, recall): their mean
    hidden state becomes a base centroid of the router, which sends such questions to the base model (z = 0)
    unchanged instead of to the nearest expert."""

    def __post_init__(self):
        from ..experts.svf import SVFConfig
        from ..experts.train import ExpertTrainConfig

        require_positive(self, "discover_per_family", "test_per_level", "unseen_per_level", "validate_per_level",
                         "few_shot", "max_new_tokens")
        require_non_negative(self, "search_budget", "base_per_family")
        if not 0 < self.margin < 1:
            raise ValueError(f"margin must lie in (0, 1), got {self.margin}")
        unknown = [f for f in [*self.families, *([self.unseen_family] if self.unseen_family else [])]
                   if f not in FAMILIES]
        if unknown:
            raise ValueError(f"families: unknown {unknown}; valid: {sorted(FAMILIES)}")
        if self.unseen_family in self.families:
            raise ValueError(f"unseen_family {self.unseen_family!r} is one of the experts' families")
        if not 2 <= self.k_range[0] <= self.k_range[1]:
            raise ValueError(f"k_range must be (lo, hi) with 2 <= lo <= hi, got {self.k_range}")
        check_levels(self, "levels")
        self.svf = check_fields(SVFConfig, self.svf, "svf")
        SVFConfig(**self.svf)
        self.train = check_fields(ExpertTrainConfig, self.train, "train")
        if "optimizer" in self.train:
            self.train["optimizer"] = check_optimizer(self.train["optimizer"], 7, "train.optimizer")
        ExpertTrainConfig(**self.train)
        self.cem = check_cem(self.cem)


def correctness(svf, tokenizer, samples, z: dict | None, grader, params: Params) -> list[int]:
    from ..tools import generate_with_tools

    saved = svf.get_z()
    svf.load_z(z) if z is not None else svf.reset()
    texts = [t.text for t in generate_with_tools(svf, tokenizer, [s.prompt for s in samples], params.max_new_tokens,
                                                 batch_size=64)]
    svf.load_z(saved)
    return [int(grader(s, t)) for s, t in zip(samples, texts)]


def discover(model, tokenizer, params: Params, seed: int) -> tuple[list, torch.Tensor, dict]:
    """(the discovery questions, their features, ``choose_k``'s clustering) of the model's own hidden states."""
    from ..experts.discover import choose_k, question_features

    per_level = max(1, params.discover_per_family // (params.levels[1] - params.levels[0] + 1))
    pool = generate_levels(params.families, params.levels, per_level, "train", seed)
    feats = question_features(model, tokenizer, [s.prompt for s in pool])
    return pool, feats, choose_k(feats, range(params.k_range[0], params.k_range[1] + 1), seed=seed)


def validate_experts(svf, tokenizer, experts: list[dict], router, grader, params: Params, seed: int,
                     folder, confidence: float = 0.95) -> dict[str, Any]:
    """Each trained expert against the base on held-out (fitness-split) questions routed to its cluster: an expert
    is kept only when it is shown better there (paired superiority at ``confidence``, ``forgelib.stats``); otherwise
    it is retired (its ``z`` set to 0, which is the base model; its file rewritten so), so the routed system never
    hands a cluster to an expert that did not measurably help. Measured at smoke: 15 REINFORCE steps changed a fifth
    of an expert's answers and left it 0.67 -> 0.58 on its cluster's test questions after a held-out tie (30
    questions) or a held-out lead of 2 (63 questions)."""
    from ..experts import save_expert
    from ..stats import superior
    from ..experts.discover import question_features, route
    from ..experts.train import base_weights

    held = generate_levels(params.families, params.levels, params.validate_per_level, "fitness", seed + 5)
    with base_weights(svf):
        routes = route(question_features(svf, tokenizer, [s.prompt for s in held]), router).tolist()
    out = {}
    for c, z in enumerate(experts):
        mine = [s for s, r in zip(held, routes) if r == c]
        if not mine:
            out[f"expert_{c}"] = {"n": 0, "base": None, "expert": None, "kept": True}
            continue
        base = correctness(svf, tokenizer, mine, None, grader, params)
        own = correctness(svf, tokenizer, mine, z, grader, params)
        verdict = superior(f"expert_{c}_held_out", base, own, 0.0, confidence)
        kept = verdict.passed
        out[f"expert_{c}"] = {"n": len(mine), "base": sum(base) / len(mine), "expert": sum(own) / len(mine),
                              "lower_bound": verdict.lower, "kept": kept}
        if not kept:
            experts[c] = {n: torch.zeros_like(v) for n, v in z.items()}
            svf.load_z(experts[c])
            save_expert(svf, folder / f"expert_{c}.safetensors", {"cluster": c, "retired": True})
            svf.reset()
    return out


def test_per_level(params: Params, k: int, guard) -> int:
    """``test_per_level``, or enough for each of ``k`` experts' own check (see the field)."""
    import math

    if params.test_per_level is not None:
        return params.test_per_level
    cells = len(params.families) * (params.levels[1] - params.levels[0] + 1)
    return math.ceil(1.5 * k * guard.needed(params.margin) / cells)


def base_centroids(svf, tokenizer, suite: dict, params: Params, seed: int) -> tuple[list[str], torch.Tensor | None]:
    """(the suite's families no expert trains on, their base centroids (F, D)): per family the mean hidden state of
    ``base_per_family`` train questions at its suite levels (the router sends their questions to the base)."""
    from ..experts.discover import question_features
    from ..experts.train import base_weights

    others = [f for f in suite if f not in params.families]
    if not others or not params.base_per_family:
        return [], None
    rows = []
    with base_weights(svf):
        for f in others:
            lo, hi = suite[f]
            per = max(1, params.base_per_family // (hi - lo + 1))
            pool = generate_levels([f], (lo, hi), per, "train", seed + 11)
            rows.append(question_features(svf, tokenizer, [s.prompt for s in pool]).mean(0))
    return others, torch.stack(rows)


def train_experts(svf, tokenizer, clusters: list[list], grader, params: Params, seed: int, folder=None):
    """One ``z`` per cluster (each from ``z = 0``), saved under ``folder`` when given; (experts, histories)."""
    from ..experts import save_expert
    from ..experts.train import ExpertTrainConfig, train_expert

    config = ExpertTrainConfig(**{"max_new_tokens": params.max_new_tokens, **params.train})
    experts, histories = [], []
    for c, members in enumerate(clusters):
        svf.reset()
        histories.append(train_expert(svf, tokenizer, members, grader, config, seed=seed + c))
        experts.append(svf.get_z())
        if folder is not None:
            save_expert(svf, folder / f"expert_{c}.safetensors", {"cluster": c, "n_train": len(members)})
    svf.reset()
    return experts, histories


def _test_table(svf, tokenizer, experts: list[dict], router: torch.Tensor, validation: dict, grader, params: Params,
                k: int, ctx) -> tuple[list, list[int], dict[str, list[int]]]:
    """The test questions, where the router sends each, and per answerer (``base``, each ``expert_<c>``, ``routed``)
    which it answers right; (test questions, routes, that table)."""
    from ..experts.discover import question_features, route
    from ..experts.train import base_weights

    test = generate_levels(params.families, params.levels, test_per_level(params, k, ctx.guard_params), "test",
                           ctx.seed + 1)
    with base_weights(svf):
        test_route = route(question_features(svf, tokenizer, [s.prompt for s in test]), router).tolist()
    table = {"base": correctness(svf, tokenizer, test, None, grader, params)}
    for c, z in enumerate(experts):  # a retired expert (z = 0) is the base model: its answers are the base's
        kept = validation.get(f"expert_{c}", {}).get("kept", True)
        table[f"expert_{c}"] = correctness(svf, tokenizer, test, z, grader, params) if kept else list(table["base"])
    table["routed"] = [table[f"expert_{r}"][i] if r < k else table["base"][i] for i, r in enumerate(test_route)]
    return test, test_route, table


def _unseen_and_search(svf, tokenizer, experts: list[dict], router: torch.Tensor, grader, params: Params, ctx,
                       report: dict, timing: dict) -> None:
    """The unseen family's expert mixture and the routing search, each when asked for (``report["unseen"]``,
    ``report["search"]``); their seconds go to ``timing``."""
    with timed(timing, "unseen"):
        if params.unseen_family:
            report["unseen"] = unseen_mixture(svf, tokenizer, experts, grader, params, ctx.seed)
    with timed(timing, "search"):
        if params.search_budget:
            report["search"] = routing_search(svf, tokenizer, router, experts, grader, params, ctx.seed)


def run(params: Params, ctx) -> PhaseResult:
    """Phase 7 (see the module docstring)."""
    from ..experts import SVFConfig, apply_svf

    torch.manual_seed(ctx.seed)
    wrapper, tokenizer = ctx.load_upstream_lm(params.source)
    grader, timing = make_check(params.answer_prefixes), {}
    with timed(timing, "discover"):
        svf = apply_svf(base_lm(wrapper), SVFConfig(**params.svf))
        pool, feats, found = discover(svf, tokenizer, params, ctx.seed)
        k, centroids, labels = found["k"], found["centroids"], found["labels"].tolist()
    with timed(timing, "train"):
        clusters = [[s for s, lab in zip(pool, labels) if lab == c] for c in range(k)]
        experts, histories = train_experts(svf, tokenizer, clusters, grader, params, ctx.seed, ctx.dir / "experts")
    others, extra = base_centroids(svf, tokenizer, ctx.input_suite, params, ctx.seed)
    router = centroids if extra is None else torch.cat([centroids, extra.to(centroids.dtype)])
    with timed(timing, "validate"):
        validation = validate_experts(svf, tokenizer, experts, router, grader, params, ctx.seed, ctx.dir / "experts",
                                      ctx.guard_params.confidence)
    with timed(timing, "test"):
        test, test_route, table = _test_table(svf, tokenizer, experts, router, validation, grader, params, k, ctx)
    report = {"k": k, "levels": list(params.levels), "families": params.families, "base_families": others,
              "validation": validation,
              "silhouettes": found["silhouettes"], "discovery": cluster_table(pool, labels, k),
              "features_2d": projection(feats, labels, pool), "histories": histories,
              "test": {"families": [s.family for s in test], "levels": [s.level for s in test], "route": test_route,
                       "correct": table}, "expert_params": svf.expert_params,
              "scalings": {f"expert_{c}": layer_scalings(svf, z) for c, z in enumerate(experts)}}
    _unseen_and_search(svf, tokenizer, experts, router, grader, params, ctx, report, timing)
    report["timing"] = timing
    ctx.write_report(report)
    torch.save({"centroids": router, "k": k, "base_families": others}, ctx.path("experts", "router.pt"))
    from ..experts import remove_svf

    remove_svf(svf)  # the parametrizations come off in place: the wrapper holds the Phase-6 model again
    ctx.save_model("model", wrapper, tokenizer, metadata={"experts": {"k": k, "folder": "experts/"}})
    metrics, checks = summarize(report, params, ctx.guard_params)
    ctx.result.metrics.update(metrics)
    ctx.result.gate.extend(checks)
    from .. import paths
    from ..suite import Asker

    ctx.result.artifacts["experts"] = paths.relative(ctx.dir / "experts")
    ctx.guard(Asker(wrapper, tokenizer, prefixes=params.answer_prefixes, label="phase-6 model"),
              Asker(wrapper, tokenizer, experts=experts, centroids=router, svf_config=params.svf,
                    prefixes=params.answer_prefixes, label="routed experts"))
    return ctx.result


def cluster_table(pool, labels, k) -> dict[str, list[int]]:
    """Per family, how many of its discovery questions fell into each cluster."""
    out: dict[str, list[int]] = {}
    for s, lab in zip(pool, labels):
        out.setdefault(s.family, [0] * k)[lab] += 1
    return out


def projection(feats: torch.Tensor, labels, pool) -> dict[str, list]:
    """The 2-D PCA projection of the discovery features (for the cluster picture)."""
    centered = feats - feats.mean(0)
    _, _, v = torch.pca_lowrank(centered, q=2, center=False)
    xy = (centered @ v[:, :2]).tolist()
    return {"xy": xy, "label": list(labels), "family": [s.family for s in pool]}


def layer_scalings(svf, z: dict) -> dict[str, list[float]]:
    saved = svf.get_z()
    svf.load_z(z)
    out = {n: [round(float(x), 4) for x in v] for n, v in svf.scalings().items()}
    svf.load_z(saved)
    return out


def unseen_mixture(svf, tokenizer, experts, grader, params: Params, seed: int) -> dict[str, Any]:
    """CEM over mixture weights on ``few_shot`` fitness questions of the unseen family; test accuracy of base,
    each expert alone and the mixture."""
    from ..experts import cem_search, mix

    shots = generate(params.unseen_family, params.levels[0], params.few_shot, "fitness", seed + 7)
    test = generate_levels([params.unseen_family], params.levels, params.unseen_per_level, "test", seed + 8)
    score = lambda a: sum(correctness(svf, tokenizer, shots, mix(experts, a), grader, params)) / len(shots)  # noqa: E731
    alphas, few_shot_acc, history = cem_search(score, len(experts), seed=seed, **params.cem)
    rows = {"base": correctness(svf, tokenizer, test, None, grader, params),
            "mixture": correctness(svf, tokenizer, test, mix(experts, alphas), grader, params)}
    for c, z in enumerate(experts):
        rows[f"expert_{c}"] = correctness(svf, tokenizer, test, z, grader, params)
    return {"family": params.unseen_family, "alphas": alphas, "few_shot_acc": few_shot_acc, "history": history,
            "test": {k: sum(v) / len(v) for k, v in rows.items()}, "correct": rows}


def routing_search(svf, tokenizer, centroids, experts, grader, params: Params, seed: int) -> dict[str, Any]:
    from ..experts.route import evaluate_settings, search_settings

    held = generate_levels(params.families, params.levels, params.search_per_family, "fitness", seed + 9)
    return search_settings(lambda s: evaluate_settings(svf, tokenizer, held, centroids, experts, s, grader,
                                                       params.max_new_tokens),
                           budget=params.search_budget, seed=seed)


def summarize(report: dict, params: Params, guard) -> tuple[dict[str, Any], list[GateCheck]]:
    """Headline metrics and the phase's own checks (see the module docstring); the guard adds its own."""
    from ..stats import noninferior, proportion_bounds

    t = report["test"]
    table, route_ = t["correct"], t["route"]
    n, k = len(route_), report["k"]
    rate = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    oracle = [int(any(table[f"expert_{c}"][i] for c in range(k))) for i in range(n)]
    solvable = [i for i in range(n) if oracle[i]]
    routed_right = [table["routed"][i] for i in solvable]
    routing_acc = rate(routed_right)
    metrics = {"n_experts": k, "expert_params": report["expert_params"], "acc_base": round(rate(table["base"]), 4),
               "acc_routed": round(rate(table["routed"]), 4), "acc_oracle": round(rate(oracle), 4),
               "routing_acc": round(routing_acc, 4)}
    checks, unused = [], []
    for c in range(k):
        idx = [i for i in range(n) if route_[i] == c]
        if not idx:  # no test question goes to this expert: nothing to compare (reported)
            unused.append(c)
            continue
        base_c = [table["base"][i] for i in idx]
        exp_c = [table[f"expert_{c}"][i] for i in idx]
        metrics[f"acc_cluster{c}_base"], metrics[f"acc_cluster{c}_expert"] = round(rate(base_c),
                                                                                   4), round(rate(exp_c), 4)
        v = noninferior(f"expert{c}", base_c, exp_c, params.margin, guard.confidence, guard.power)
        checks.append(GateCheck(f"expert{c}_minus_base_lower_bound", v.lower, -params.margin, ">", note=v.note))
    metrics["unused_experts"] = len(unused)
    metrics["retired_experts"] = sum(not v["kept"] for v in (report.get("validation") or {}).values())
    lower = proportion_bounds(sum(routed_right), len(routed_right), guard.confidence)[0] if routed_right else 0.0
    metrics["routing_acc_lower_bound"] = round(lower, 4)
    checks.append(GateCheck("routing_acc_lower_bound", round(lower, 4), params.min_routing_acc, ">="))
    if "unseen" in report:
        metrics["unseen_acc_base"] = round(report["unseen"]["test"]["base"], 4)
        metrics["unseen_acc_mixture"] = round(report["unseen"]["test"]["mixture"], 4)
    return metrics, checks
