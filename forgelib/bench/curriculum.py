"""`forge bench curriculum`: the adaptive curriculum against uniform mixing of levels and a fixed easy-to-hard
schedule, at the same number of training steps.

Start model: a Phase 4 output folder (``--phase4``, default the newest completed), loaded trainable. Arms (Phase
5's settings from ``--params``; every arm trains ``rounds × steps_per_round`` steps with the same optimizer,
batch size and self-model head):

- ``curriculum``: Phase 5 itself (assessment, pools at each family's frontier, hints, variants, dreams);
- ``uniform``: fresh problems drawn uniformly from levels 1..``max_level`` of every family;
- ``easy_to_hard``: fresh problems of one level per family, raised on a fixed schedule (the rounds split evenly
  over levels 1..``max_level``), without looking at the answers.

After every round each arm is probed at a fixed level (``--probe-level``, every family, ``--probe`` test
questions): **steps to target** is the first step count at which the mean probe accuracy reaches ``--target``
(None if never). Final: test accuracy per family and level 1..``max_level``, and the calculator's record on the
``tool`` family. **Seeds** vary the training seed (data order, pools, dreams); the start model and the test
questions are the same. Means and 95 % intervals over seeds; JSON under outputs/bench/.
"""
from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from .. import paths
from ..curriculum import DreamBuffer, QuestionPool, assess_levels
from ..data.tasks import generate
from ..data.tokenizer import encode_samples
from ..optim import create_optimizer_from_phase
from ..phases.curriculum import (Params, SelfModelHead, Trainee, accuracy_at, assess_questions, curriculum_loss,
                                 run_round, tool_comparison)
from ..results import dumps_json
from . import phase_folder, phase_params
from ..train import TrainConfig, train
from .quietstar import interval
from .options import CURRICULUM_TEST_PER_LEVEL as TEST_PER_LEVEL, build_parser


def _load(folder: Path, params: Params):
    from transformers import AutoTokenizer

    from ..results import PhaseResult
    from ..modelio import load_quietstar

    model_dir = paths.resolve(PhaseResult.load(folder).models[params.source]["path"])
    return load_quietstar(model_dir, trainable=True).eval(), AutoTokenizer.from_pretrained(model_dir)


def _trainee(model, params: Params):
    hidden = model.get_input_embeddings().weight.shape[1]
    head = SelfModelHead(hidden, params.self_model_layer) if params.self_model_weight > 0 else None
    trainee = Trainee(model, head)
    overrides = {**params.optimizer, **({"lr": params.lr} if params.lr is not None else {})}
    return trainee, create_optimizer_from_phase(trainee, phase_num=5, **overrides)


def _train_on(trainee, optimizer, tokenizer, samples, params: Params, rng: random.Random, step: int) -> None:
    def batches():
        while True:
            picks = [samples[rng.randrange(len(samples))] for _ in range(params.batch_size)]
            enc = encode_samples(tokenizer, picks, params.max_len, answer_only_loss=True, with_steps=True,
                                 drop_long=True)
            length = int(enc["attention_mask"].sum(1).max())
            yield {k: v[:, :length] for k, v in enc.items()}

    train(trainee, batches(), optimizer, TrainConfig(steps=params.steps_per_round, log_every=params.steps_per_round),
          loss_fn=lambda m, b: curriculum_loss(m, b, params.self_model_weight), quiet=True, step_offset=step)
    trainee.model.eval()


def run_arm(arm: str, folder: Path, params: Params, seed: int, probe_level: int, probe: int,
            test_per_level: int = TEST_PER_LEVEL) -> dict:
    """Train one arm from the Phase-4 model with training seed ``seed``; probes per round and final scores."""
    torch.manual_seed(seed)
    model, tokenizer = _load(folder, params)
    trainee, optimizer = _trainee(model, params)
    rng = random.Random(seed)
    levels = list(range(1, params.max_level + 1))
    pools = dreams = None
    if arm == "curriculum":
        start = {f: a["level"] for f, a in assess_levels(
            lambda f, lv: accuracy_at(model, tokenizer, f, lv, assess_questions(params), "fitness", seed, params),
            params.families, levels, params.band).items()}
        pools = {f: QuestionPool({f: 1.0}, level=start[f], pool_size=params.pool_size, seed=seed + i,
                                 retire_after=params.retire_after, max_hints=params.max_hints,
                                 done_threshold=params.done_threshold) for i, f in enumerate(params.families)}
        dreams = DreamBuffer(capacity=512, seed=seed)
    ctx = SimpleNamespace(tracker=None, device="cpu")
    probes, step = [], 0
    for r in range(params.rounds):
        if arm == "curriculum":
            run_round(trainee, tokenizer, pools, dreams, params, optimizer, rng, step, ctx,
                      last=r == params.rounds - 1)
        else:
            if arm == "uniform":
                samples = [s for f in params.families for lv in levels
                           for s in generate(f, lv, max(1, params.fresh_per_round // len(levels)), "train",
                                             rng.randrange(1 << 30))]
            else:  # easy_to_hard: level by the round's place in the schedule
                lv = levels[min(len(levels) - 1, r * len(levels) // params.rounds)]
                samples = [s for f in params.families
                           for s in generate(f, lv, params.fresh_per_round, "train", rng.randrange(1 << 30))]
            _train_on(trainee, optimizer, tokenizer, samples, params, rng, step)
        step += params.steps_per_round
        acc = {f: accuracy_at(model, tokenizer, f, probe_level, probe, "test", 7, params) for f in params.families}
        probes.append({"step": step, "mean": sum(acc.values()) / len(acc), **acc})
    final = {f: {lv: accuracy_at(model, tokenizer, f, lv, test_per_level, "test", 8, params) for lv in levels}
             for f in params.families}
    tool = tool_comparison(model, tokenizer, 1, params, 9) if "tool" in params.families else None
    return {"probes": probes, "final": final, "final_mean": sum(a for by in final.values() for a in by.values())
            / sum(len(by) for by in final.values()), "tool": tool,
            "levels_reached": {f: p.level for f, p in pools.items()} if pools else None}


def steps_to(probes: list[dict], target: float):
    return next((p["step"] for p in probes if p["mean"] >= target), None)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("curriculum")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = phase_params("curriculum", args.params)
    changes = {k: v for k, v in (("rounds", args.rounds), ("steps_per_round", args.steps_per_round)) if v is not None}
    params = dataclasses.replace(params, **changes)
    folder = phase_folder("bitnet", args.phase4)
    started = time.perf_counter()
    per_seed = []
    for seed in range(args.seeds):
        row = {}
        for arm in args.arms:
            t0 = time.perf_counter()
            row[arm] = {**run_arm(arm, folder, params, seed, args.probe_level, args.probe, args.test_per_level),
                        "seconds": round(time.perf_counter() - t0, 1)}
            row[arm]["steps_to_target"] = steps_to(row[arm]["probes"], args.target)
        per_seed.append(row)
    summary = {arm: {"final_mean": interval([r[arm]["final_mean"] for r in per_seed]),
                     "steps_to_target": [r[arm]["steps_to_target"] for r in per_seed],
                     "tool_success_rate": interval([r[arm]["tool"]["with"]["tool_success_rate"] for r in per_seed])
                     if per_seed[0][arm]["tool"] else None,
                     "tool_acc_with": interval([r[arm]["tool"]["with"]["accuracy"] for r in per_seed])
                     if per_seed[0][arm]["tool"] else None}
               for arm in args.arms}
    if "curriculum" in args.arms:
        summary["curriculum_minus"] = {arm: interval([r["curriculum"]["final_mean"] - r[arm]["final_mean"]
                                                      for r in per_seed]) for arm in args.arms if arm != "curriculum"}
    report = {"benchmark": "curriculum", "phase4": paths.relative(folder), "params_file": args.params,
              "what_the_seeds_vary": "the training seed only (data, pools, dreams); one start model and one set of "
                                     "test questions", "steps": params.rounds * params.steps_per_round,
              "probe_level": args.probe_level, "target": args.target, "seeds": args.seeds,
              "seconds": round(time.perf_counter() - started, 1), "summary": summary, "per_seed": per_seed,
              "curriculum": dataclasses.asdict(params)}
    text = dumps_json(report, default=str)
    print(text)
    out = paths.bench_output("curriculum", args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0
