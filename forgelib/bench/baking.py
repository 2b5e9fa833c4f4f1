"""`forge bench baking`: Prompt Baking (KL) against supervised fine-tuning on the same trajectories, per prompt.

Start model: the ``taught`` model of a Phase 6 output folder (``--phase6``, default the newest completed): the model
whose prompts the phase bakes. For each prompt of the library, each seed bakes it once from that model (not
sequentially) in every arm, with the phase's bake settings (``--params``, its ``baking`` section):

- ``kl``: Prompt Baking (``bake_prompt``: KL(prompted ‖ student), ternary-aware LoRA, merged);
- ``sft``: the same adapter trained by cross-entropy on the same sampled trajectories, the same steps;
- ``half``: the ``kl`` adapter at half strength (``scale_adapter(0.5)``: half-baking);
- ``plain_lora`` (ternary models only): peft's plain LoRA beside the ternary layers, measured before and after
  ``merge_and_unload`` re-quantizes it (what the ternary-aware adapter avoids).

Measured per arm: held-out gap closed ``1 − KL(prompted ‖ baked) / KL(prompted ‖ unbaked)``, no-prompt test
accuracy and adherence to the prompt, against the prompted model's (the taught model with the prompt: the target
of baking) and the unprompted one's; drift (KL per answer token and accuracy on the drift families); wall time of
the bake. **Seeds** vary the bake only (trajectory sampling, adapter initialisation, batch order); the start model
and the test questions are the same. Means and 95 % intervals over seeds; JSON under outputs/bench/.
"""
from __future__ import annotations

import copy
import dataclasses
import time

import torch

from .. import paths
from ..baking import bake_prompt, merge_baked, prompt_kl, scale_adapter
from ..baking.bake import gap_closed
from ..phases.baking import Params, drift, measure, questions
from ..results import dumps_json
from . import phase_folder, phase_model, phase_params
from .quietstar import interval
from .options import build_parser


def _score(model, reference, tokenizer, prompt, test, params: Params, seed: int) -> dict:
    row = measure(model, tokenizer, [], test, params)
    d = drift(reference, model, tokenizer, params, seed)
    return {"accuracy": row["accuracy"], "adherence": row["adherence"][prompt.name], "drift_kl": d["kl_per_token"],
            "drift_accuracy": d["acc_after"]}


def run_prompt(prompt, taught, tokenizer, params: Params, seed: int, arms, test, held, calibration, retain) -> dict:
    """Every arm of one prompt and seed, each from a fresh copy of the taught model."""
    from ..quant.bitnet import BitLinear

    ternary = any(isinstance(m, BitLinear) for m in taught.modules())
    out = {}
    config = params.bake_config(seed)
    for arm in [a for a in arms if a != "half"]:
        if arm == "plain_lora" and not ternary:
            continue
        cfg = dataclasses.replace(config, ternary_aware=arm != "plain_lora")
        t0 = time.perf_counter()
        baked = bake_prompt(copy.deepcopy(taught), prompt.text, tokenizer, calibration, cfg, eval_data=held,
                            loss="sft" if arm == "sft" else "kl", retain_data=retain)
        seconds = time.perf_counter() - t0
        report, heldout = baked.baking_report, baked.baking_heldout
        if arm == "kl" and "half" in arms:
            half = copy.deepcopy(baked)
            scale_adapter(half, 0.5)
            kl_half = prompt_kl(half, *heldout)
            out["half"] = {"gap_closed": gap_closed(kl_half, report["kl_unbaked"]),
                           **_score(merge_baked(half).eval(), taught, tokenizer, prompt, test, params, seed)}
        row = {"gap_closed": report["gap_closed"], "kl_unbaked": report["kl_unbaked"], "kl_baked": report["kl_baked"],
               "seconds": round(seconds, 2)}
        merged = merge_baked(baked).eval()
        if arm == "plain_lora":  # the merge re-quantizes W + BA: measure what it keeps
            row["gap_closed_unmerged"] = row.pop("gap_closed")
            row["gap_closed"] = gap_closed(prompt_kl(merged, *heldout), report["kl_unbaked"])
        out[arm] = {**row, **_score(merged, taught, tokenizer, prompt, test, params, seed)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("baking")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = phase_params("baking", args.params)
    changes = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("temperature", args.temperature))
               if v is not None}
    params = dataclasses.replace(params, bake={**params.bake, **changes})
    folder = phase_folder("baking", args.phase6)
    taught, tokenizer = phase_model(folder, "taught", trainable=True)
    test = questions(params, "test", params.test_per_level, 1)
    held = questions(params, "fitness", params.heldout_per_level, 2)
    calibration = questions(params, "train", params.calibration_per_level, 3)
    retain = questions(params, "train", params.calibration_per_level, 6, params.drift_families) \
        if params.retain_unrelated else None
    started = time.perf_counter()
    prompted = {p.name: measure(taught, tokenizer, [p], test, params) for p in params.library}
    unprompted = measure(taught, tokenizer, [], test, params)
    per_seed = []
    for seed in range(args.seeds):
        per_seed.append({p.name: run_prompt(p, taught, tokenizer, params, seed, args.arms, test, held, calibration,
                                            retain) for p in params.library})
    summary = {}
    for p in params.library:
        arms = [a for a in args.arms if a in per_seed[0][p.name]]
        summary[p.name] = {
            "prompted": {"accuracy": prompted[p.name]["accuracy"], "adherence": prompted[p.name]["adherence"][p.name]},
            "unprompted": {"accuracy": unprompted["accuracy"], "adherence": unprompted["adherence"][p.name]},
            **{arm: {key: interval([r[p.name][arm][key] for r in per_seed])
                     for key in per_seed[0][p.name][arm] if key not in ("kl_unbaked",)} for arm in arms}}
        if "kl" in arms and "sft" in arms:
            summary[p.name]["kl_minus_sft"] = {key: interval([r[p.name]["kl"][key] - r[p.name]["sft"][key]
                                                              for r in per_seed])
                                               for key in ("gap_closed", "accuracy", "adherence")}
    report = {"benchmark": "baking", "phase6": paths.relative(folder), "params_file": args.params,
              "what_the_seeds_vary": "the bake only (trajectory sampling, adapter initialisation, batch order); one "
                                     "taught start model and one set of test questions",
              "target": "gap closed >= 0.9 on held-out inputs", "seeds": args.seeds,
              "seconds": round(time.perf_counter() - started, 1), "summary": summary, "per_seed": per_seed,
              "baking": dataclasses.asdict(params)}
    text = dumps_json(report, default=str)
    print(text)
    out = paths.bench_output("baking", args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0
