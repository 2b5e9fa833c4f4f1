"""`forge bench learn`: learning curves — exact-match accuracy per family against wall-clock and tokens.

Contenders, each trained from scratch on the same streamed data (fresh train-split samples of Phase 1's
trunk mix, worked steps, answer-only loss, length-bucketed batches) with Phase 1's optimizer and schedule,
for the same wall-clock budget (``--seconds``; the number of steps is set from a short timing of each
contender, so a slower model gets fewer steps — equal compute, not equal steps):

- ``cognate``: the Phase-1 trunk (Cognate, one cycle, no latent updates);
- ``llama``: ``LlamaForCausalLM`` of the same shape (same width, depth, heads, untied head where Cognate
  ties it: parameter counts are reported side by side) under the same trainer;
- ``cognate-t2``: Cognate with two recursion cycles and deep supervision (ACT on), at the same wall-clock.

Accuracy is measured on the test split at ``--points`` moments along the way (evaluation time is not
counted as training time). ``--seeds`` repeats everything with another model initialisation *and* another
data stream (the tokenizer and the test set stay fixed, so the seeds vary training only). Prints JSON (also
written under outputs/bench/) with every curve and the median final accuracy per contender.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time

import torch

from .. import paths
from ..evaluate import accuracy_by_family
from ..optim import create_optimizer_from_phase
from ..params import load_section
from ..phases import cognate as phase1
from ..results import dumps_json
from ..train import train
from .options import LEARN_CONTENDERS as CONTENDERS, build_parser


def make_model(name: str, params: phase1.Params, tokenizer, seed: int):
    """A fresh contender model of Phase 1's shape."""
    if name in ("cognate", "cognate-t2"):
        stage = dataclasses.replace(params.trunk, n_cycles=2 if name == "cognate-t2" else 1, n_latent=0)
        model = phase1.make_trunk(dataclasses.replace(params, trunk=stage, init_from=None), tokenizer, seed)
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = params.model
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape.hidden_size,
                         intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
                         num_attention_heads=shape.num_attention_heads,
                         num_key_value_heads=shape.num_key_value_heads,
                         max_position_embeddings=shape.max_position_embeddings,
                         tie_word_embeddings=shape.tie_word_embeddings, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


def _seconds_per_step(name, params, tokenizer, seed, steps: int = 40) -> float:
    """Quick timing: ``steps`` training steps after 5 warm-up steps (a 15-step timing set budgets that came
    out 25% short or long on a loaded machine)."""
    model = make_model(name, params, tokenizer, seed)
    batches = phase1.training_batches(tokenizer, params, params.trunk, seed + 1000)
    optimizer = create_optimizer_from_phase(model, phase_num=1, **params.optimizer)
    config = dataclasses.replace(params.train, steps=5, warmup_steps=0, log_every=1000, checkpoint_every=0)
    train(model, batches, optimizer, config, quiet=True)
    config = dataclasses.replace(config, steps=steps)
    return train(model, batches, optimizer, config, quiet=True).seconds / steps


def learning_curve(name, params, tokenizer, samples, seed: int, seconds: float, points: int) -> dict:
    """Train one contender for ``seconds`` of training time, evaluating at ``points`` moments."""
    steps = max(points, int(seconds / _seconds_per_step(name, params, tokenizer, seed)))
    model = make_model(name, params, tokenizer, seed)
    batches = phase1.training_batches(tokenizer, params, params.trunk, seed)
    optimizer = create_optimizer_from_phase(model, phase_num=1, **params.optimizer)
    config = dataclasses.replace(params.train, steps=steps, eval_every=max(1, steps // points), log_every=50,
                                 checkpoint_every=0)
    clock = {"start": time.perf_counter(), "eval": 0.0}
    curve = []

    def evaluate(m) -> dict:
        started = time.perf_counter()
        acc = accuracy_by_family(m, tokenizer, samples, batch_size=64, with_steps=params.with_steps)
        mean = sum(acc.values()) / len(acc)
        curve.append({"train_seconds": round(started - clock["start"] - clock["eval"], 2),
                      "tokens": batches.stats.real_tokens, "samples": batches.stats.samples,
                      "mean": round(mean, 4), "accuracy": {k: round(v, 4) for k, v in acc.items()}})
        clock["eval"] += time.perf_counter() - started
        return {"accuracy_mean": mean}

    train(model, batches, optimizer, config, evaluate=evaluate, quiet=True)
    for i, point in enumerate(curve):
        point["step"] = min(steps, (i + 1) * config.eval_every)
    return {"contender": name, "seed": seed, "steps": steps, "params": sum(p.numel() for p in model.parameters()),
            "train_seconds": curve[-1]["train_seconds"], "final_mean": curve[-1]["mean"],
            "final_accuracy": curve[-1]["accuracy"], "curve": curve}


def mean_at(curve: list[dict], seconds: float) -> float:
    """Accuracy of the last evaluation at or before ``seconds`` of training (0 before the first)."""
    reached = [point["mean"] for point in curve if point["train_seconds"] <= seconds]
    return reached[-1] if reached else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("learn")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; valid: {list(CONTENDERS)}")
    from ..phases import PHASES
    from ..phases.base import SHARED_SECTIONS

    overrides = {"cognate": {"eval_per_family": args.eval_per_family}} if args.eval_per_family else None
    params = load_section(paths.resolve(args.params), "cognate", phase1.Params, overrides,
                          [spec.name for spec in PHASES] + list(SHARED_SECTIONS))
    tokenizer = phase1.build_tokenizer(params, 0, None)
    samples = phase1.test_samples(params, 7)
    runs = [learning_curve(name, params, tokenizer, samples, seed, args.seconds, args.points)
            for seed in range(args.seed_start, args.seed_start + args.seeds) for name in contenders]
    common = min(r["train_seconds"] for r in runs)  # every contender has trained at least this long
    summary = {}
    for name in contenders:
        finals = [r["final_mean"] for r in runs if r["contender"] == name]
        at_common = [mean_at(r["curve"], common) for r in runs if r["contender"] == name]
        summary[name] = {"median_final_mean": statistics.median(finals), "finals": finals,
                         "median_mean_at_common_seconds": statistics.median(at_common),
                         "median_train_seconds": statistics.median(r["train_seconds"] for r in runs
                                                                   if r["contender"] == name),
                         "params": next(r["params"] for r in runs if r["contender"] == name),
                         "median_steps": statistics.median(r["steps"] for r in runs if r["contender"] == name)}
    report = {"benchmark": "learn", "params_file": args.params, "levels": list(params.levels),
              "seconds": args.seconds, "seeds": args.seeds, "threads": args.threads, "torch": torch.__version__,
              "test_samples": len(samples), "seeds_vary": "model initialisation and training data stream",
              "common_seconds": common,
              "summary": summary, "runs": runs}
    text = dumps_json(report)
    print(json.dumps({"summary": summary}, indent=2))
    out = paths.bench_output("learn", args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0
