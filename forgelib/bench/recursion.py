"""`forge bench recursion`: does Phase 1's recursion earn its cycles? Two studies per seed on Phase 1's own recipe
(``--params``, default the smoke set: its tokenizer, shape, streamed data, optimizer and steps), every model asked the
same held-out test questions (greedy exact match, worked steps), reported whatever the sign.

(a) trunks from scratch, the trunk stage's steps each: the phase's shape at one cycle (``trunk-T1``, the pipeline's
    trunk); the same parameters trained and run at two cycles, with ACT halting (``trunk-T2``, the model's default)
    and without (``trunk-T2-noact``); an equal-compute deeper model (twice the layers at one cycle, ``deep-T1``); half
    the layers at two cycles without ACT (``shallow-T2-noact``: the compute of the pipeline's trunk with half its
    parameters). Asked every family of the trunk's mix at the phase's levels (``--per-family`` each) at
    one cycle, at the trained count and at twice it.
(b) the reasoning specialist fine-tuned from (a)'s one-cycle trunk with its stage's data, steps and learning rate:
    at one cycle (``T1``: equal parameters and steps, no recursion), at two cycles with ACT (``T2``, the pipeline's)
    and without (``T2-noact``). Asked its own families (twice ``--per-family`` each) at 1, 2 and 4 cycles.

For every model: accuracy at each test-time cycle count, the paired gain of its trained count over one cycle (lower
bound at 0.95, ``forgelib.stats``), its paired difference against the one-cycle model of its study (a: the
one-cycle trunk, b: the one-cycle fine-tune) at their trained counts, parameters and training seconds. Seeds vary
initialisation and data (tokenizer fixed at seed 0).
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time
import types

import torch

from .. import paths
from ..phases import cognate as phase1
from ..results import dumps_json
from ..stats import compare, lower_bound
from ..suite import questions
from .options import RECURSION_SPECIALISTS, RECURSION_TRUNKS, build_parser

CONFIDENCE = 0.95


def _variants(text: str, valid: dict, parser, flag: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(names) - set(valid))
    if unknown:
        parser.error(f"{flag}: unknown variant(s) {unknown}; valid: {list(valid)}")
    return names


def _asked(model, tokenizer, test: list, cycles: list[int], with_steps: bool) -> dict[int, list[bool]]:
    """Per test-time cycle count, the per-question correctness (the model's config restored afterwards)."""
    trained = model.config.n_cycles
    model.eval()
    out = {}
    for c in cycles:
        model.config.n_cycles = c
        out[c] = phase1.answer_correctness(model, tokenizer, test, batch_size=128, with_steps=with_steps)
    model.config.n_cycles = trained
    return out


def _row(name: str, model, correct: dict[int, list[bool]], trained: int, seconds: float) -> dict:
    row = {"variant": name, "params": sum(p.numel() for p in model.parameters()), "trained_cycles": trained,
           "train_seconds": round(seconds, 1), "n": len(correct[trained]),
           "accuracy": {str(c): round(sum(v) / len(v), 4) for c, v in correct.items()}}
    if trained > 1:
        c = compare(correct[1], correct[trained])
        row["gain_trained_vs_1"] = {"diff": round(c.diff, 4), "lower_bound": round(lower_bound(c, CONFIDENCE), 4)}
    row["correct"] = [int(x) for x in correct[trained]]
    return row


def _train(model, tokenizer, params, stage, seed: int, start=None) -> float:
    ctx = types.SimpleNamespace(seed=seed, dir=None, tracker=None, device="cpu", quiet=True)
    started = time.perf_counter()
    phase1.train_stage(model, tokenizer, params, stage, "bench", ctx, 0, alone=False, start=start)
    return time.perf_counter() - started


def trunk_study(params, tokenizer, names: list[str], seed: int, per_family: int, steps: int | None) -> tuple:
    """(a): (rows, the one-cycle trunk at the phase's shape, trained here whether or not it is a listed variant)."""
    fams = sorted(f for f, w in params.trunk.mix.items() if w > 0)
    test = [q for f in fams for q in questions(f, tuple(params.levels), per_family, seed + 110)]
    rows, base = [], None
    for name in dict.fromkeys(["trunk-T1", *names]):  # the one-cycle trunk first: (b) starts from it
        depth, cycles, act = RECURSION_TRUNKS[name]
        layers = max(1, round(params.model.num_hidden_layers * depth))
        shape = dataclasses.replace(params.model, num_hidden_layers=layers)
        p = dataclasses.replace(params, model=shape, trunk=dataclasses.replace(
            params.trunk, n_cycles=cycles, steps=steps or params.trunk.steps))
        model = phase1.make_trunk(p, tokenizer, seed)
        if not act:
            model.model.halt_head = None
        seconds = _train(model, tokenizer, p, p.trunk, seed)
        if name == "trunk-T1":
            base = model
        if name in names:
            rows.append(_row(name, model, _asked(model, tokenizer, test, sorted({1, cycles, 2 * cycles}),
                                                 params.with_steps), cycles, seconds))
    return rows, base


def specialist_study(params, tokenizer, trunk, names: list[str], seed: int, per_family: int,
                     steps: int | None) -> list[dict]:
    """(b): the reasoning stage's fine-tune from ``trunk`` at each variant's cycles."""
    stage0 = params.specialists["reasoning"]
    fams = stage0.families or sorted(stage0.mix)
    test = [q for f in fams for q in questions(f, phase1.stage_levels(params, stage0), 2 * per_family,
                                                      seed + 111)]
    rows = []
    for name in names:
        cycles, act = RECURSION_SPECIALISTS[name]
        stage = dataclasses.replace(stage0, n_cycles=cycles, steps=steps or stage0.steps)
        model = phase1.apply_stage(copy.deepcopy(trunk), stage)
        if not act:
            model.model.halt_head = None
        seconds = _train(model, tokenizer, params, stage, seed, start=trunk)  # data seed: seed + the stage's
        rows.append(_row(name, model, _asked(model, tokenizer, test, [1, 2, 4], params.with_steps), cycles, seconds))
    return rows


def against(rows: list[dict], reference: str) -> None:
    """Each row's paired difference against the ``reference`` row (same questions, each at its trained count)."""
    ref = next((r for r in rows if r["variant"] == reference), None)
    for row in rows:
        if ref is not None and row is not ref:
            c = compare(ref["correct"], row["correct"])
            row[f"minus_{reference}"] = {"diff": round(c.diff, 4), "lower_bound": round(lower_bound(c, CONFIDENCE), 4)}


def summary(runs: list[dict], study: str) -> dict:
    """Per variant over the seeds: accuracy at its trained count (each seed and the mean), the gain over one cycle."""
    out: dict = {}
    for run in runs:
        for row in run[study]:
            s = out.setdefault(row["variant"], {"accuracy": [], "gain_trained_vs_1": [], "train_seconds": []})
            s["accuracy"].append(row["accuracy"][str(row["trained_cycles"])])
            s["train_seconds"].append(row["train_seconds"])
            if "gain_trained_vs_1" in row:
                s["gain_trained_vs_1"].append(row["gain_trained_vs_1"]["diff"])
    for s in out.values():
        s["mean_accuracy"] = round(statistics.mean(s["accuracy"]), 4)
        if s["gain_trained_vs_1"]:
            s["mean_gain_trained_vs_1"] = round(statistics.mean(s["gain_trained_vs_1"]), 4)
    return out


def parse_mix(text: str) -> dict[str, float]:
    """``family[:weight],...`` -> {family: weight} (weight 1 by default); a malformed entry raises ValueError."""
    mix = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, weight = part.partition(":")
        try:
            mix[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--mix: {part!r} is not family[:weight]") from None
    if not mix or any(w <= 0 for w in mix.values()):
        raise ValueError(f"--mix: {text!r} names no family with a positive weight")
    return mix


def with_options(params, args, parser):
    """The phase's parameters with ``--mix`` (the trunks' families), ``--levels`` and ``--no-steps`` applied (the
    Phase-1 parameters' own checks name a bad family or level)."""
    changes = {}
    if args.mix and args.specialists.strip():
        parser.error("--mix changes the trunks of (a); (b) fine-tunes the reasoning stage from the phase's own trunk "
                     "mix: pass --specialists '' with --mix")
    try:
        if args.mix:
            changes["trunk"] = dataclasses.replace(params.trunk, mix=parse_mix(args.mix))
        if args.levels:
            low, high = (int(x) for x in args.levels.split(","))
            changes["levels"] = (low, high)
        if args.no_steps:
            changes["with_steps"] = False
        return dataclasses.replace(params, **changes)
    except ValueError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("recursion")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    trunks = _variants(args.trunks, RECURSION_TRUNKS, parser, "--trunks")
    specialists = _variants(args.specialists, RECURSION_SPECIALISTS, parser, "--specialists")
    from . import phase_params

    params = phase_params("cognate", str(paths.resolve(args.params)))
    if params.init_from:
        parser.error(f"{args.params}: a pretrained init_from has its own shape; this benchmark trains from scratch")
    params = with_options(params, args, parser)
    tokenizer = phase1.build_tokenizer(params, 0, None)
    runs = []
    for seed in range(args.seed_start, args.seed_start + args.seeds):
        rows, trunk = trunk_study(params, tokenizer, trunks, seed, args.per_family, args.steps)
        against(rows, "trunk-T1")
        special = specialist_study(params, tokenizer, trunk, specialists, seed, args.per_family,
                                   args.specialist_steps) if specialists else []
        against(special, "T1")
        runs.append({"seed": seed, "trunks": rows, "specialists": special})
        print(f"seed {seed}: " + ", ".join(f"{r['variant']} {r['accuracy'][str(r['trained_cycles'])]:.3f}"
                                           for r in rows + special), flush=True)
    report = {"benchmark": "recursion", "params_file": args.params, "levels": list(params.levels),
              "mix": params.trunk.mix, "with_steps": params.with_steps,
              "seeds": args.seeds, "seed_start": args.seed_start, "threads": args.threads,
              "torch": torch.__version__, "summary": {"trunks": summary(runs, "trunks"),
                                                     "specialists": summary(runs, "specialists")}, "runs": runs}
    text = dumps_json(report)
    print(dumps_json(report["summary"]))
    out = paths.bench_output("recursion", args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0
