"""`forge bench bitnet`: ternary weights by QAT with and without distillation, against post-training
ternarization, with the bytes of every format and packed inference speed.

Start model: a Phase 3 output folder (``--phase3``, default the newest completed). Arms, each scored on the test
split with thoughts (Phase 4's scorer and settings from ``--params``):

- ``ptq``: the projections ternarized as they are (no training; the baseline a user would try first);
- ``qat_distill``: Phase 4's quantization-aware training (answer NLL + KL to the full-precision model);
- ``qat_no_distill``: the same training without the KL term.

Reported per arm: accuracy retention (ternary / full-precision accuracy) and perplexity ratio (exp of the answer
NLL difference), mean and 95 % t-interval over seeds. **Seeds** vary the QAT training seed only (data order);
the start model and the test set are the same (PTQ has no seed: measured once). Sizes: total bytes on disk of
fp32, fp16, 2-bit and base-3 folders (everything included) and bits per ternary weight. Speed: forward tokens/s
of the packed model (unpacking per layer) and of the full-precision model on the same batches, interleaved in
one run (``--speed-repeats`` rounds, median). JSON under outputs/bench/.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import tempfile
import time
from typing import Any

import torch

from .. import paths
from ..phases.bitnet import size_table, ternary_copy, train_qat
from ..phases.quietstar import score, test_samples
from ..results import dumps_json
from . import phase_folder, phase_params
from .quietstar import interval
from .options import build_parser


@torch.no_grad()
def tokens_per_second(models: dict, batch: torch.Tensor, repeats: int) -> dict[str, float]:
    """Forward tokens/s of each model's base on ``batch`` (B, T), rounds interleaved, median of ``repeats``."""
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(input_ids=batch)
            times[name].append(time.perf_counter() - start)
    return {name: round(batch.numel() / statistics.median(t), 1) for name, t in times.items()}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of ``forge bench bitnet``."""
    parser = build_parser("bitnet")
    return parser.parse_args(argv)


def _qat_arms(fp_model, tokenizer, test: list, data, fp_row: dict, params, seeds: int) -> tuple[list[dict], Any]:
    """Both QAT arms (with and without distillation) at training seeds 0 .. ``seeds`` - 1; (a row per seed, the
    first seed's distilled model)."""
    per_seed, trained = [], None
    for seed in range(seeds):
        row = {}
        for arm, weight in (("qat_distill", params.distill_weight), ("qat_no_distill", 0.0)):
            arm_params = dataclasses.replace(params, distill_weight=weight)
            t0 = time.perf_counter()
            model, _ = train_qat(ternary_copy(fp_model, arm_params), copy.deepcopy(fp_model.base), tokenizer,
                                 arm_params, seed=seed)
            seconds = time.perf_counter() - t0
            row[arm] = {**_quality(score(model, tokenizer, test, data), fp_row), "train_seconds": round(seconds, 2)}
            if arm == "qat_distill" and trained is None:
                trained = model
        per_seed.append(row)
    return per_seed, trained


def _packed_speed(fp_model, trained, tokenizer, test: list, params, repeats: int) -> dict[str, float]:
    """Forward tokens/s of the full-precision model, ``trained`` saved packed and read back, and ``trained`` as
    trained (fake quantization), on the first 32 test questions."""
    from ..data.tokenizer import encode_samples
    from ..modelio import load_quietstar

    with tempfile.TemporaryDirectory(prefix="forge-bench-bitnet-") as tmp:
        trained.export_packing = params.packing
        trained.save_pretrained(tmp)
        packed = load_quietstar(tmp, tokenizer).eval()
        enc = encode_samples(tokenizer, test[:32], params.max_len, with_steps=params.with_steps)
        batch = enc["input_ids"][:, :int(enc["attention_mask"].sum(1).max())]
        return tokens_per_second({"fp32": fp_model.base, "packed": packed.base, "fake_quant": trained.base},
                                 batch, repeats)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from ..results import PhaseResult
    from ..modelio import load_quietstar

    params = phase_params("bitnet", args.params)
    if args.steps is not None:
        params = dataclasses.replace(params, steps=args.steps)
    if args.test_per_family is not None:
        params = dataclasses.replace(params, test_per_family=args.test_per_family)
    folder = phase_folder("quietstar", args.phase3)
    model_dir = paths.resolve(PhaseResult.load(folder).models[params.source]["path"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fp_model = load_quietstar(model_dir, tokenizer).eval()
    data = params.data()
    test = test_samples(data, seed=1)
    started = time.perf_counter()
    fp_row = score(fp_model, tokenizer, test, data)
    ptq = ternary_copy(fp_model, params).eval()
    ptq_row = score(ptq, tokenizer, test, data)
    per_seed, trained = _qat_arms(fp_model, tokenizer, test, data, fp_row, params, args.seeds)
    sizes = size_table(fp_model, trained)
    speed = _packed_speed(fp_model, trained, tokenizer, test, params, args.speed_repeats)
    arms = ("qat_distill", "qat_no_distill")
    report = {"benchmark": "bitnet", "phase3": paths.relative(folder), "params_file": args.params,
              "what_the_seeds_vary": "the QAT training seed only (data order); one start model and one test set; "
                                     "PTQ is deterministic and measured once",
              "n_test": len(test), "steps": params.steps, "seeds": args.seeds, "packing": params.packing,
              "full_precision": {"accuracy": fp_row["accuracy"], "answer_nll": fp_row["answer_nll"]},
              "ptq": _quality(ptq_row, fp_row), "per_seed": per_seed,
              "acc_retention": {a: interval([r[a]["acc_retention"] for r in per_seed]) for a in arms},
              "ppl_ratio": {a: interval([r[a]["ppl_ratio"] for r in per_seed]) for a in arms},
              "sizes": sizes, "tokens_per_s": speed,
              "packed_speed_vs_fp32": round(speed["packed"] / speed["fp32"], 3),
              "seconds": round(time.perf_counter() - started, 1), "bitnet": dataclasses.asdict(params)}
    text = dumps_json(report, default=str)
    print(text)
    out = paths.bench_output("bitnet", args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


def _quality(row: dict, fp_row: dict) -> dict:
    return {"accuracy": row["accuracy"], "answer_nll": row["answer_nll"],
            "acc_retention": row["accuracy"] / fp_row["accuracy"] if fp_row["accuracy"] else float("nan"),
            "ppl_ratio": math.exp(min(row["answer_nll"] - fp_row["answer_nll"], 50.0))}
