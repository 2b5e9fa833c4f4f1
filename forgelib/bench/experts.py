"""`forge bench experts`: SVF experts against LoRA experts, per self-discovered cluster, with the same training.

Start: the model a Phase 7 output folder handed on (``--phase7``, default the newest completed; the Phase-6 model,
its weights unchanged). The clusters are discovered once, as in Phase 7 (its parameters: ``--params``, the
``experts`` section). Then for every seed, one expert per cluster in each arm, all trained by the same REINFORCE
procedure and steps (``forgelib.experts.train.train_expert``):

- ``svf``: SVF ``z`` vectors (``expert_params`` = the sum of the adapted matrices' ranks);
- ``lora_matched``: peft LoRA, rank 1, on the subset of the same projections whose parameter count is closest to
  ``expert_params``;
- ``lora_r16``: peft LoRA rank 16 on every projection.

Measured on the test split: per family the accuracy of the base, of each arm routed by pass 1 (nearest centroid),
and of the SVF oracle router (a question counts when any SVF expert answers it); routing accuracy; the CEM mixture
of the SVF experts on the unseen family (few-shot). Parameter counts in the JSON. **Seeds** vary the expert
training (answer sampling, batch order, LoRA initialisation); the start model, the clusters and the test questions
are the same. Means and 95 % intervals over seeds; JSON under outputs/bench/.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import time

import torch

from .. import paths
from ..results import dumps_json
from . import phase_folder, phase_model, phase_params
from .quietstar import interval
from .options import build_parser


def lora_cost(model, targets, rank: int) -> int:
    from ..experts.svf import target_layers

    return sum(rank * (m.in_features + m.out_features) for m in target_layers(model, targets).values())


def matched_targets(model, budget: int) -> list[str]:
    """The subset of the projections whose rank-1 LoRA parameter count is closest to ``budget``."""
    from ..experts.svf import DEFAULT_TARGETS, target_layers

    present = [t for t in DEFAULT_TARGETS if any(n.endswith(t) for n in target_layers(model))]
    subsets = [list(c) for r in range(1, len(present) + 1) for c in itertools.combinations(present, r)]
    return min(subsets, key=lambda s: (abs(lora_cost(model, s, 1) - budget), len(s)))


def correct_with(model, tokenizer, samples, grader, max_new_tokens: int) -> list[int]:
    from ..tools import generate_with_tools

    texts = [t.text for t in generate_with_tools(model, tokenizer, [s.prompt for s in samples], max_new_tokens,
                                                 batch_size=64)]
    return [int(grader(s, t)) for s, t in zip(samples, texts)]


def lora_arm(base, tokenizer, clusters, test, route, grader, params, config, targets, rank, seed) -> dict:
    """One LoRA adapter per cluster (peft), trained like the SVF experts; routed test correctness."""
    from peft import LoraConfig, get_peft_model

    from ..experts.train import train_expert

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                           target_modules=targets), adapter_name="c0")
    for c in range(1, len(clusters)):
        model.add_adapter(f"c{c}", LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets))
    per_cluster = []
    for c, members in enumerate(clusters):
        model.set_adapter(f"c{c}")
        torch.manual_seed(seed + c)
        train_expert(model, tokenizer, members, grader, config, seed=seed + c)
        per_cluster.append(correct_with(model, tokenizer, test, grader, params.max_new_tokens))
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and ".c0." in n)
    return {"routed": [per_cluster[r][i] for i, r in enumerate(route)], "params_per_expert": n_params}


def run_seed(base, tokenizer, clusters, test, route, grader, params, arms, seed) -> dict:
    from ..experts import apply_svf, cem_search, mix, remove_svf
    from ..data.tasks import generate, generate_levels
    from ..experts.train import ExpertTrainConfig
    from ..phases.experts import correctness, train_experts

    config = ExpertTrainConfig(**{"max_new_tokens": params.max_new_tokens, **params.train})
    out = {}
    if "svf" in arms:
        t0 = time.perf_counter()
        svf = apply_svf(copy.deepcopy(base))
        experts, _ = train_experts(svf, tokenizer, clusters, grader, params, seed)
        per = [correctness(svf, tokenizer, test, z, grader, params) for z in experts]
        row = {"routed": [per[r][i] for i, r in enumerate(route)],
               "oracle": [int(any(p[i] for p in per)) for i in range(len(test))],
               "params_per_expert": svf.expert_params}
        solvable = [i for i in range(len(test)) if row["oracle"][i]]
        row["routing_acc"] = sum(row["routed"][i] for i in solvable) / len(solvable) if solvable else float("nan")
        if params.unseen_family:
            shots = generate(params.unseen_family, params.levels[0], params.few_shot, "fitness", seed + 7)
            unseen = generate_levels([params.unseen_family], params.levels, params.test_per_level, "test", 8)
            alphas, _, _ = cem_search(lambda a: sum(correctness(svf, tokenizer, shots, mix(experts, a), grader, params))
                                      / len(shots), len(experts), seed=seed, **params.cem)
            row["unseen_base"] = sum(correctness(svf, tokenizer, unseen, None, grader, params)) / len(unseen)
            mixed = correctness(svf, tokenizer, unseen, mix(experts, alphas), grader, params)
            row["unseen_mixture"] = sum(mixed) / len(unseen)
        remove_svf(svf)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        out["svf"] = row
    budget = out.get("svf", {}).get("params_per_expert") or apply_svf(copy.deepcopy(base)).expert_params
    for arm, targets, rank in (("lora_matched", matched_targets(base, budget), 1), ("lora_r16", None, 16)):
        if arm in arms:
            from ..experts.svf import DEFAULT_TARGETS

            t0 = time.perf_counter()
            out[arm] = {**lora_arm(base, tokenizer, clusters, test, route, grader, params, config,
                                   targets or list(DEFAULT_TARGETS), rank, seed),
                        "targets": targets or list(DEFAULT_TARGETS), "rank": rank,
                        "seconds": round(time.perf_counter() - t0, 1)}
    return out


def summarize(test, base_correct, per_seed, arms, params) -> dict:
    """Per arm: routed accuracy overall and per family (mean and 95 % interval over seeds), parameters per expert,
    seconds; for SVF also the oracle, routing accuracy and the unseen family's mixture."""
    families = sorted({s.family for s in test})
    by_family = lambda correct: {f: sum(c for c, s in zip(correct, test) if s.family == f)  # noqa: E731
                                 / sum(1 for s in test if s.family == f) for f in families}
    summary = {"base": {"accuracy": sum(base_correct) / len(test), "per_family": by_family(base_correct)}}
    for arm in arms:
        rows = [r[arm] for r in per_seed]
        summary[arm] = {"accuracy": interval([sum(r["routed"]) / len(test) for r in rows]),
                        "per_family": {f: interval([by_family(r["routed"])[f] for r in rows]) for f in families},
                        "params_per_expert": rows[0]["params_per_expert"],
                        "seconds": interval([r["seconds"] for r in rows])}
        if arm == "svf":
            summary[arm]["oracle"] = interval([sum(r["oracle"]) / len(test) for r in rows])
            # nan: no solvable question
            finite = [r["routing_acc"] for r in rows if r["routing_acc"] == r["routing_acc"]]
            summary[arm]["routing_acc"] = interval(finite) if finite else None
            if params.unseen_family:
                summary[arm]["unseen"] = {"family": params.unseen_family,
                                          "base": rows[0]["unseen_base"],
                                          "mixture": interval([r["unseen_mixture"] for r in rows])}
        else:
            summary[arm]["targets"], summary[arm]["rank"] = rows[0]["targets"], rows[0]["rank"]
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("experts")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ..data.tasks import generate_levels
    from ..experts.discover import question_features, route
    from ..phases.experts import discover, make_check  # the phase's grader (what it graded with)

    params = phase_params("experts", args.params)
    if args.steps:
        params = dataclasses.replace(params, train={**params.train, "steps": args.steps})
    folder = phase_folder("experts", args.phase7)
    base, tokenizer = phase_model(folder)
    for p in base.parameters():
        p.requires_grad_(False)
    grader = make_check(params.answer_prefixes)
    started = time.perf_counter()
    pool, _, found = discover(base, tokenizer, params, seed=0)
    clusters = [[s for s, lab in zip(pool, found["labels"].tolist()) if lab == c] for c in range(found["k"])]
    test = generate_levels(params.families, params.levels, params.test_per_level, "test", 1)
    test_route = route(question_features(base, tokenizer, [s.prompt for s in test]), found["centroids"]).tolist()
    base_correct = correct_with(base, tokenizer, test, grader, params.max_new_tokens)
    per_seed = [run_seed(base, tokenizer, clusters, test, test_route, grader, params, args.arms, seed)
                for seed in range(args.seeds)]
    summary = summarize(test, base_correct, per_seed, args.arms, params)
    report = {"benchmark": "experts", "phase7": paths.relative(folder), "params_file": args.params, "k": found["k"],
              "what_the_seeds_vary": "the expert training only (answer sampling, batch order, LoRA initialisation); "
                                     "one start model, one clustering, one set of test questions",
              "seeds": args.seeds, "seconds": round(time.perf_counter() - started, 1), "summary": summary,
              "per_seed": per_seed, "experts": dataclasses.asdict(params)}
    text = dumps_json(report, default=str)
    print(text)
    out = paths.bench_output("experts", args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0
