"""`forge bench finetune`: one optimizer step of a full fine-tune against one of a LoRA fine-tune of Phase 1's trunk,
side by side in one run.

The trunk is built as Phase 1 builds it from ``--params`` (default ``parameters/smollm2.yaml``: SmolLM2-135M-Instruct
as shipped, ``make setup-real``; the smoke set's trunk is a random model of its shapes, nothing trained). Both arms
start from copies of it with the specialist stage ``--stage`` applied (default ``speed``): ``full`` trains every weight
(``lora_r: 0``), ``lora`` the stage's LoRA adapter of rank ``--lora-r`` (default the stage's own, else 16) on every
projection with the memory (when the stage runs it) and the halting head, as ``Stage.lora_r`` trains in Phase 1.
Each arm has the Phase-1 optimizer of the parameter file and the stage's loss (its ``real_text_kl`` term included);
both take the same batches of the stage's training stream, one step each per round in alternation, so the load of a
shared machine falls on both alike; the first ``--warmup`` rounds are not timed. Reported per arm: the median and
every timed step's seconds, the trainable parameters, each step's loss; and the ratio full / LoRA of the medians.
Both arms start from the same function (a LoRA adapter starts at zero), so their first losses are equal.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import tempfile
import time

import torch

from .options import build_parser

ARMS = ("full", "lora")


def arm_models(trunk, stage, lora_r: int) -> dict:
    """``{"full": model, "lora": peft-wrapped model}``: copies of ``trunk`` with ``stage`` applied, the second with
    its LoRA adapter of rank ``lora_r`` (``cognate.with_stage_lora``)."""
    from ..phases import cognate

    full = cognate.apply_stage(copy.deepcopy(trunk), dataclasses.replace(stage, lora_r=0))
    lora_stage = dataclasses.replace(stage, lora_r=lora_r)
    lora = cognate.with_stage_lora(cognate.apply_stage(copy.deepcopy(trunk), lora_stage), lora_stage)
    return {"full": full, "lora": lora}


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def measure(params, stage_name: str, lora_r: int | None, rounds: int, warmup: int, seed: int = 0) -> dict:
    """The benchmark on ``params`` (Phase 1's ``Params``): see the module docstring."""
    from ..optim import create_optimizer_from_phase
    from ..phases import cognate

    if not 0 <= warmup < rounds:
        raise ValueError(f"need 0 <= warmup < rounds, got warmup {warmup}, rounds {rounds}")
    stage = params.specialists[stage_name]
    rank = lora_r or stage.lora_r or 16
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = cognate.build_tokenizer(params, seed, folder)
    trunk = cognate.make_trunk(params, tokenizer, seed)
    models = arm_models(trunk, stage, rank)
    batches = cognate.training_batches(tokenizer, params, stage, seed)
    steps = [next(batches) for _ in range(rounds)]
    overrides = {**params.optimizer, **({"lr": stage.lr} if stage.lr is not None else {})}
    runs, start = {}, cognate.frozen_copy(trunk) if stage.real_text_kl else None  # one teacher for both arms
    for arm, model in models.items():
        loss_fn = cognate.default_loss
        if start is not None:  # the same prose windows for both arms
            windows = cognate.real_text_windows(tokenizer, params.max_len, stage.real_text_rows, seed)
            loss_fn = cognate.real_text_kl_loss(loss_fn, start, windows, stage.real_text_kl)
        runs[arm] = {"model": model.train(), "loss_fn": loss_fn, "seconds": [], "losses": [],
                     "optimizer": create_optimizer_from_phase(model, phase_num=1, **overrides)}
    for k, batch in enumerate(steps):
        for arm in ARMS:
            run = runs[arm]
            started = time.perf_counter()
            loss = _step(run, batch, params.train.grad_clip)
            if k >= warmup:
                run["seconds"].append(round(time.perf_counter() - started, 4))
            run["losses"].append(round(loss, 5))
    out = {arm: {"trainable_parameters": trainable(runs[arm]["model"]), "seconds": runs[arm]["seconds"],
                 "median_seconds": statistics.median(runs[arm]["seconds"]), "losses": runs[arm]["losses"]}
           for arm in ARMS}
    return {"stage": stage_name, "lora_r": rank, "rounds": rounds, "warmup": warmup,
            "batch_size": params.batch_size, "max_len": params.max_len, "arms": out,
            "full_over_lora_seconds": round(out["full"]["median_seconds"] / out["lora"]["median_seconds"], 3),
            "parameters": sum(p.numel() for p in trunk.parameters())}


def _step(run: dict, batch: dict, grad_clip: float) -> float:
    model, optimizer = run["model"], run["optimizer"]
    loss, _ = run["loss_fn"](model, batch)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def main(argv: list[str] | None = None) -> int:
    """CLI: ``forge bench finetune [--params FILE] [--stage speed] [--lora-r R] [--rounds 6] [--warmup 1]``."""
    from ..phases import cognate
    from . import phase_params
    from .grokking import write_result

    args = build_parser("finetune").parse_args(argv)
    torch.set_num_threads(args.threads)
    params = phase_params("cognate", args.params)
    if args.stage not in cognate.ROLES:
        raise SystemExit(f"--stage must be one of {', '.join(cognate.ROLES)}, got {args.stage!r}")
    started = time.perf_counter()
    result = {"benchmark": "finetune", "settings": vars(args),
              **measure(params, args.stage, args.lora_r, args.rounds, args.warmup, args.seed)}
    result["seconds"] = round(time.perf_counter() - started, 1)
    path = write_result(result, args.out, "finetune")
    print(json.dumps({k: v for k, v in result.items() if k != "arms"}, indent=1))
    for arm in ARMS:
        a = result["arms"][arm]
        print(f"{arm}: {a['trainable_parameters']:,} trainable parameters, median {a['median_seconds']:.3f} s a step "
              f"({', '.join(f'{s:.2f}' for s in a['seconds'])}), losses {a['losses']}")
    print(f"written: {path}")
    return 0
