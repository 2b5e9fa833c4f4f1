"""Every benchmark's command line, in one light module: ``forge bench --help`` lists the benchmarks with what each
measures, and ``forge bench NAME --help`` prints NAME's options without importing torch or the benchmark itself.

A benchmark's ``main(argv)`` parses with ``build_parser(NAME)``; its description is its module docstring as plain
text (``forgelib.helptext.plain_text``, read from the source file, not imported). The choices the parsers offer
(arms, methods, optimizers, contenders) live here and the benchmark modules import them.
"""
from __future__ import annotations

import argparse
import ast
import textwrap
from pathlib import Path
from typing import Callable

from ..helptext import HelpFormatter, plain_text, width

SUMMARIES = {
    "baking": "Prompt Baking (KL) vs supervised fine-tuning on the same trajectories, half-baking and a plain "
              "LoRA merge: held-out gap closed, accuracy, prompt adherence, drift",
    "bitnet": "ternary weights by QAT with and without distillation vs post-training ternarization: accuracy "
              "retention, perplexity ratio, bytes per format, packed tokens/s",
    "chain": "the whole pipeline over several seeds and thread counts: every gate's slack, per-family accuracy, "
             "the chain gate (do the verdicts hold on another machine?)",
    "cognate": "the Phase-1 model: training tokens/s vs Llama, accuracy vs test-time recursion cycles (ACT on "
               "and off), memory recall beyond the attention window",
    "compression": "every compression codec and baseline alone on two models: bits per weight of the whole "
                   "file, accuracy and perplexity retention, seconds, peak memory; SeedLM vs BFP at matched bits",
    "curriculum": "the adaptive curriculum vs uniform levels vs a fixed easy-to-hard schedule at the same steps: "
                  "steps to a target accuracy, final accuracy per level, calculator use",
    "evomerge": "Phase 2's evolved merge vs the trunk, single-weight task arithmetic, uniform, TIES and "
                "DARE-TIES merges: test accuracy, wins, wall time",
    "experts": "SVF experts vs LoRA experts (matched parameters, and rank 16) per discovered cluster: routed "
               "and oracle accuracy, routing accuracy, the CEM mixture on an unseen family",
    "grokking": "steps and seconds to grok a*b mod 97 for Adam, Grokfast, AdamW, Muon and MuGrokfast",
    "learn": "learning curves: accuracy against wall-clock and tokens for Cognate, a Llama of the same shape "
             "and Cognate with two cycles",
    "optim-lm": "MuGrokfast (Phase-1 preset) vs AdamW on the task suite: validation loss at a fixed token "
                "budget, optimizer and training step time",
    "finetune": "one optimizer step of a full fine-tune against a LoRA fine-tune of Phase 1's trunk (default "
                "SmolLM2), side by side on the same batches: seconds per step, trainable parameters",
    "recursion": "Phase 1's recursion vs equal parameters and equal compute: trunks at one and two cycles, deeper, "
                 "shallower; the reasoning fine-tune at one and two cycles",
    "realquant": "Phase 8's codecs on a real pretrained model (SmolLM2-135M) against the GGUF file as shipped: bits "
                 "per weight counted from the files, held-out real-text perplexity, encode seconds",
    "quietstar": "Quiet-STaR vs plain continued training, pause tokens and random-token thoughts at equal "
                 "training compute: test accuracy and answer NLL",
}
"""One line per benchmark: what it measures (``forge bench --help``)."""

BAKING_ARMS = ("kl", "sft", "half", "plain_lora")
CURRICULUM_ARMS = ("curriculum", "uniform", "easy_to_hard")
EXPERTS_ARMS = ("svf", "lora_matched", "lora_r16")
QUIETSTAR_ARMS = ("plain", "quietstar", "pause", "random")
LEARN_CONTENDERS = ("cognate", "llama", "cognate-t2")
RECURSION_TRUNKS = {"trunk-T1": (1.0, 1, True), "trunk-T2": (1.0, 2, True), "trunk-T2-noact": (1.0, 2, False),
                    "deep-T1": (2.0, 1, True), "shallow-T2-noact": (0.5, 2, False)}
"""``forge bench recursion`` (a): (layers as a multiple of the phase's, trained cycles, ACT halting)."""
RECURSION_SPECIALISTS = {"T1": (1, True), "T2": (2, True), "T2-noact": (2, False)}
"""``forge bench recursion`` (b): the reasoning specialist's (trained cycles, ACT halting)."""
EVOMERGE_WEIGHT_GRID = [round(0.1 * i, 1) for i in range(11)]
CURRICULUM_TEST_PER_LEVEL = 32
"""Test questions per family and level of each arm's final scores (the phase's own test counts follow its gate)."""

COMPRESSION_METHODS = {
    "rtn8": {"codec": "rtn", "bits": 8, "group": 64},
    "rtn4": {"codec": "rtn", "bits": 4, "group": 32},
    "rtn3": {"codec": "rtn", "bits": 3, "group": 64},
    "rtn2": {"codec": "rtn", "bits": 2, "group": 64},
    "hqq4": {"codec": "hqq", "bits": 4, "group": 64},
    "hqq3": {"codec": "hqq", "bits": 3, "group": 64},
    "hqq2": {"codec": "hqq", "bits": 2, "group": 64},
    "bfp3.5": {"codec": "bfp", "mantissa_bits": 3, "block": 8},
    "seedlm3.5": {"codec": "seedlm", "K": 12, "C": 8, "P": 3},
    "bfp3.0": {"codec": "bfp", "mantissa_bits": 2, "block": 4},
    "seedlm3.0": {"codec": "seedlm", "K": 12, "C": 8, "P": 2},
    "vq6r": {"codec": "vq", "v": 4, "codebook_bits": 6, "residual": True},
    "vq6": {"codec": "vq", "v": 4, "codebook_bits": 6},
    "vq8": {"codec": "vq", "v": 4, "codebook_bits": 8},
    "hyper3": {"codec": "hyper", "n": 4, "index_bits": 12},
    "hyper4": {"codec": "hyper", "n": 2, "index_bits": 8},
}
"""``forge bench compression``'s methods: codec and settings, each applied alone."""

REALQUANT_CODECS = {
    "raw16": {"codec": "raw16"},
    "rtn": {"codec": "rtn"},  # bits from --bits, group from --group
    "hqq": {"codec": "hqq"},
    "bfp": {"codec": "bfp", "mantissa_bits": 3, "block": 8, "exp_bits": 4},
    "seedlm": {"codec": "seedlm", "K": 12, "C": 8, "P": 3},
    "vq": {"codec": "vq", "v": 4, "codebook_bits": 6, "residual": True},
    "hyper": {"codec": "hyper", "n": 4, "index_bits": 12},
}
"""``forge bench realquant``'s codecs and their settings (rtn and hqq take ``--bits`` and ``--group``)."""
REALQUANT_SUBSET_CODECS = ("seedlm", "vq", "hyper")
"""The codecs ``forge bench realquant`` runs on ``--subset`` only: measured on SmolLM2 on one core, each would take
far too long on every linear layer (SeedLM ~70 µs, VQ ~18 µs, hyper ~10 µs per weight against HQQ's 0.2 µs)."""
REALQUANT_EMBEDDINGS = {"q8": {"codec": "rtn", "bits": 8, "group": 32}, "raw16": {"codec": "raw16"},
                        "raw32": {"codec": "raw32"}}
"""How ``forge bench realquant`` stores the embeddings (no codec under test touches them): ``q8`` is GGUF's Q8_0
layout (8-bit codes, one fp16 scale max|w|/127 per 32 weights), which gives back a Q8_0 tensor's values exactly."""

# MuonGrokfast from the Phase-1 preset with the settings as overrides. "grokfast_*" keys on a torch kind
# add the Grokfast-EMA filter to the gradients before the step (the paper's way of using it).
GROKKING_OPTIMIZERS: dict[str, tuple[str, dict]] = {
    "paper-adam": ("torch:Adam", {"lr": 1e-3, "betas": (0.9, 0.98), "weight_decay": 0.0}),
    "paper-grokfast": ("torch:Adam", {"lr": 1e-3, "betas": (0.9, 0.98), "weight_decay": 0.005,
                                      "grokfast_alpha": 0.98, "grokfast_lambda": 2.0}),
    "adamw": ("torch:AdamW", {"lr": 1e-3, "betas": (0.9, 0.98), "weight_decay": 1.0}),
    "muon": ("muongrokfast", {"grokfast_lambda": 0.0}),
    "mugrokfast": ("muongrokfast", {}),
}

THREADS_HELP = "torch threads, set explicitly so that runs on a shared machine compare"
PARAMS_HELP = "parameter file whose {} section the benchmark uses"


def _out_help(name: str) -> str:
    return f"JSON output file, relative to the repository root (default: outputs/bench/{name}-TIME.json)"


def _common(parser: argparse.ArgumentParser, name: str, seeds: tuple[int, str] | None = None) -> None:
    """--seeds (when the benchmark has them), --threads and --out, as every benchmark words them."""
    if seeds:
        parser.add_argument("--seeds", type=int, default=seeds[0], help=f"number of seeds 0..N-1; {seeds[1]}")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--out", default=None, help=_out_help(name))


def _phase_folder(parser: argparse.ArgumentParser, number: int, role: str = "start model") -> None:
    parser.add_argument(f"--phase{number}", default=None, metavar="FOLDER",
                        help=f"a Phase {number} output folder, the {role} (default: the newest completed one)")


def _grokking(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--optimizers", default="paper-grokfast,adamw,muon,mugrokfast",
                        help=f"comma-separated, from {', '.join(sorted(GROKKING_OPTIMIZERS))}; "
                             "name[key=value,...] adds overrides")
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds per optimizer (a seed fixes the split, initial weights and batches)")
    parser.add_argument("--max-steps", type=int, default=3000,
                        help="step cap per run; a run that does not reach --stop-at is reported censored")
    parser.add_argument("--eval-every", type=int, default=20, help="steps between validation accuracy checks")
    parser.add_argument("--stop-at", type=float, default=0.99, help="stop a run at this validation accuracy "
                                                                     "(0 or below: never)")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--device", default="cpu", help="torch device to train on, e.g. cpu or cuda")
    parser.add_argument("--reference", default="mugrokfast", help="optimizer whose speedups over the others "
                                                                   "are reported")
    parser.add_argument("--out", default=None, help=_out_help("grokking"))
    parser.add_argument("--quiet", action="store_true", help="print no progress lines while training")


def _optim_lm(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training-token budget per optimizer")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of both optimizers")
    parser.add_argument("--hidden", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--vocab", type=int, default=512, help="tokenizer vocabulary size")
    parser.add_argument("--max-len", type=int, default=96, help="longest sample in tokens (longer ones dropped)")
    parser.add_argument("--max-level", type=int, default=3, help="task levels 1 to N")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per training step")
    parser.add_argument("--warmup", type=int, default=10, help="linear warm-up steps")
    parser.add_argument("--train-samples", type=int, default=20000, help="training samples generated")
    parser.add_argument("--val-samples", type=int, default=400, help="held-out validation samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the initial weights")
    _common(parser, "optim-lm")


def _cognate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", default="throughput,cycles,memory",
                        help="comma-separated measurements to run: throughput (a), cycles (b), memory (c)")
    parser.add_argument("--hidden", type=int, default=128, help="model width of (a) and (c)")
    parser.add_argument("--layers", type=int, default=2, help="layers of (a) and (c)")
    parser.add_argument("--batch", type=int, default=16, help="rows per training step of (a)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per row of (a)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per throughput round of (a)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of (a): Llama, then Cognate")
    parser.add_argument("--train-steps", type=int, default=400, help="training budget of (c)")
    parser.add_argument("--max-len", type=int, default=96, help="longest training sample of (b) and (c), tokens")
    parser.add_argument("--cycles-train", type=int, default=4, help="recursion cycles (b) trains with")
    parser.add_argument("--cycles-steps", type=int, default=3000, help="training steps of (b)")
    parser.add_argument("--cycles-act", default="on,off", help="(b) with ACT halting on, off, or both")
    parser.add_argument("--cycles-max-level", type=int, default=3, help="task levels 1 to N of (b)")
    parser.add_argument("--eval-samples", type=int, default=120, help="test samples of (b) and (c)")
    parser.add_argument("--window", type=int, default=16, help="attention window of (c), tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the initial weights")
    _common(parser, "cognate")


def _recursion(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="parameters/smoke.yaml", help=PARAMS_HELP.format("cognate (Phase 1)"))
    parser.add_argument("--trunks", default=",".join(RECURSION_TRUNKS),
                        help=f"(a) comma-separated, from {', '.join(RECURSION_TRUNKS)} (trunk-T1 always trains: "
                             "(b) starts from it)")
    parser.add_argument("--specialists", default=",".join(RECURSION_SPECIALISTS),
                        help=f"(b) comma-separated, from {', '.join(RECURSION_SPECIALISTS)} (empty: no (b))")
    parser.add_argument("--seed-start", type=int, default=0, help="first seed (to split seeds over processes)")
    parser.add_argument("--per-family", type=int, default=100,
                        help="test questions per family ((b): twice this per own family)")
    parser.add_argument("--steps", type=int, default=None, help="(a) steps of each trunk (default: the trunk stage's)")
    parser.add_argument("--specialist-steps", type=int, default=None,
                        help="(b) steps of each fine-tune (default: the reasoning stage's)")
    parser.add_argument("--mix", default=None,
                        help="(a) the trunks' families instead of the trunk stage's mix (with --specialists ''): "
                             "comma-separated family[:weight] (e.g. sudoku: the benchmark family whose depth is its "
                             "chain of forced fills)")
    parser.add_argument("--levels", default=None, help="question levels LOW,HIGH instead of the phase's")
    parser.add_argument("--no-steps", action="store_true",
                        help="train and ask for the answer alone, no worked steps (the depth is then the model's own)")
    _common(parser, "recursion", (3, "each a new initialisation and data stream"))


def _evomerge(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--phase1", default=None, metavar="FOLDER",
                        help="a Phase 1 output folder whose models are merged (default: run the smoke set once)")
    parser.add_argument("--rerun-phase1", action="store_true",
                        help="rerun Phase 1 (smoke set, run seed = seed) for every seed")
    parser.add_argument("--budget", type=int, default=40,
                        help="fitness evaluations of the evolved search and of DARE-TIES' masks")
    parser.add_argument("--weight-grid", type=float, nargs="+", default=EVOMERGE_WEIGHT_GRID, metavar="W",
                        help="single-weight task arithmetic: the weights tried on the fitness split "
                             "(default: 0 to 1 in steps of 0.1)")
    _common(parser, "evomerge", (3, "they vary only the search (CMA-ES seed, DARE masks)"))


def _learn(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="parameters/smoke.yaml", help=PARAMS_HELP.format("cognate (Phase 1)"))
    parser.add_argument("--contenders", default=",".join(LEARN_CONTENDERS),
                        help=f"comma-separated, from {', '.join(LEARN_CONTENDERS)}")
    parser.add_argument("--seed-start", type=int, default=0, help="first seed (to split seeds over processes)")
    parser.add_argument("--seconds", type=float, default=60.0, help="training wall-clock per run")
    parser.add_argument("--points", type=int, default=6, help="evaluations along each curve")
    parser.add_argument("--eval-per-family", type=int, default=None,
                        help="test questions per family at each evaluation (default: the parameter file's)")
    _common(parser, "learn", (3, "each a new initialisation and data stream"))


def _quietstar(parser: argparse.ArgumentParser) -> None:
    _phase_folder(parser, 2)
    parser.add_argument("--params", default="parameters/smoke.yaml", help=PARAMS_HELP.format("quietstar"))
    parser.add_argument("--steps", type=int, default=None,
                        help="Quiet-STaR steps; the other arms get equal compute (default: the parameter file's)")
    parser.add_argument("--test-per-family", type=int, default=None,
                        help="test questions per family (default: the parameter file's)")
    parser.add_argument("--arms", nargs="+", default=list(QUIETSTAR_ARMS), choices=QUIETSTAR_ARMS,
                        help="arms to train and score")
    _common(parser, "quietstar", (3, "they vary the training seed only"))


def _bitnet(parser: argparse.ArgumentParser) -> None:
    _phase_folder(parser, 3)
    parser.add_argument("--params", default="parameters/smoke.yaml", help=PARAMS_HELP.format("bitnet"))
    parser.add_argument("--steps", type=int, default=None, help="QAT steps (default: the parameter file's)")
    parser.add_argument("--test-per-family", type=int, default=None,
                        help="test questions per family (default: the parameter file's)")
    parser.add_argument("--speed-repeats", type=int, default=7,
                        help="interleaved rounds of the packed vs full-precision speed test (median reported)")
    _common(parser, "bitnet", (3, "they vary the QAT training seed only"))


def _curriculum(parser: argparse.ArgumentParser) -> None:
    _phase_folder(parser, 4)
    parser.add_argument("--params", default="parameters/smoke.yaml", help=PARAMS_HELP.format("curriculum"))
    parser.add_argument("--rounds", type=int, default=None, help="training rounds (default: the parameter file's)")
    parser.add_argument("--steps-per-round", type=int, default=None,
                        help="training steps per round (default: the parameter file's)")
    parser.add_argument("--test-per-level", type=int, default=CURRICULUM_TEST_PER_LEVEL,
                        help="test questions per family and level of each arm's final scores")
    parser.add_argument("--probe-level", type=int, default=2, help="the level every arm is probed at after "
                                                                    "each round")
    parser.add_argument("--probe", type=int, default=16, help="test questions per family for each probe")
    parser.add_argument("--target", type=float, default=0.5, help="mean probe accuracy that counts as reached")
    parser.add_argument("--arms", nargs="+", default=list(CURRICULUM_ARMS), choices=CURRICULUM_ARMS,
                        help="arms to train and score")
    _common(parser, "curriculum", (3, "they vary the training seed only"))


def _baking(parser: argparse.ArgumentParser) -> None:
    _phase_folder(parser, 6, "start model (its taught model)")
    parser.add_argument("--params", default="parameters/smoke.yaml", help=PARAMS_HELP.format("baking"))
    parser.add_argument("--steps", type=int, default=None, help="bake steps (default: the parameter file's)")
    parser.add_argument("--lr", type=float, default=None, help="bake learning rate (default: the parameter file's)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="trajectory sampling temperature (default: the parameter file's)")
    parser.add_argument("--arms", nargs="+", default=list(BAKING_ARMS), choices=BAKING_ARMS,
                        help="arms to bake and score")
    _common(parser, "baking", (3, "they vary the bake only"))


def _experts(parser: argparse.ArgumentParser) -> None:
    _phase_folder(parser, 7, "start (the model it handed on)")
    parser.add_argument("--params", default="parameters/smoke.yaml", help=PARAMS_HELP.format("experts"))
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per expert (default: the parameter file's)")
    parser.add_argument("--arms", nargs="+", default=list(EXPERTS_ARMS), choices=EXPERTS_ARMS,
                        help="arms to train and score")
    _common(parser, "experts", (3, "they vary the expert training only"))


def _compression(parser: argparse.ArgumentParser) -> None:
    _phase_folder(parser, 7, "compressed system")
    parser.add_argument("--phase3", default=None, metavar="FOLDER",
                        help="a Phase 3 folder for the full-precision model (default: the one in Phase 7's chain)")
    parser.add_argument("--phase8", default=None, metavar="FOLDER",
                        help="a Phase 8 folder whose artifact is placed on the chart (default: the newest)")
    parser.add_argument("--params", default="parameters/smoke.yaml", help=PARAMS_HELP.format("compression"))
    parser.add_argument("--methods", nargs="+", default=list(COMPRESSION_METHODS), choices=list(COMPRESSION_METHODS),
                        metavar="METHOD", help=f"methods to run, each alone, from {', '.join(COMPRESSION_METHODS)}")
    parser.add_argument("--parts", nargs="+", default=["phase7", "fp"], choices=["phase7", "fp"],
                        help="phase7: the Phase-7 system; fp: the full-precision Phase-3 model")
    _common(parser, "compression")


def _finetune(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="parameters/smollm2.yaml", help=PARAMS_HELP.format("cognate"))
    parser.add_argument("--stage", default="speed", help="the specialist stage both arms train: reasoning, memory "
                                                         "or speed")
    parser.add_argument("--lora-r", type=int, default=None,
                        help="rank of the LoRA arm (default: the stage's lora_r, else 16)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of one step of each arm, in alternation")
    parser.add_argument("--warmup", type=int, default=1, help="first rounds not timed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the trunk (a trained one) and the batches")
    _common(parser, "finetune")


def _realquant(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2",
                        help="the reference model: a real model's name (smollm2) or any model source path (a .gguf "
                             "file, a model folder); a GGUF file's own bits are measured too")
    parser.add_argument("--codecs", nargs="+", default=list(REALQUANT_CODECS), choices=list(REALQUANT_CODECS),
                        metavar="CODEC", help=f"codecs to run, from {', '.join(REALQUANT_CODECS)}")
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4], metavar="B",
                        help="bit widths of rtn and hqq")
    parser.add_argument("--group", type=int, default=64, help="group size of rtn and hqq (weights per fp16 scale)")
    parser.add_argument("--subset", default="model.layers.15.mlp.down_proj.weight",
                        help="name pattern (fnmatch) of the linear weights that seedlm, vq and hyper compress (too "
                             "slow for every layer); 'model.layers.*' runs them on all")
    parser.add_argument("--subset-codecs", nargs="+", default=list(REALQUANT_SUBSET_CODECS),
                        choices=list(REALQUANT_CODECS), metavar="CODEC",
                        help="the codecs run on --subset only (with an hqq 3-bit baseline on the same subset)")
    parser.add_argument("--embeddings", default="q8", choices=list(REALQUANT_EMBEDDINGS),
                        help="how every variant stores the embeddings: q8 (GGUF's Q8_0 layout), raw16 or raw32")
    parser.add_argument("--tokens", type=int, default=3000,
                        help="held-out text: the first test documents up to this many tokens (the last one cut)")
    parser.add_argument("--docs", type=int, default=None,
                        help="held-out text: the first N whole test documents instead of --tokens")
    parser.add_argument("--texts", default=None, metavar="JSON",
                        help="a JSON list of documents to score instead of the real-text test split")
    parser.add_argument("--calibration-texts", default=None, metavar="JSON",
                        help="a JSON list of documents for vq's calibration instead of the calibration split")
    parser.add_argument("--max-len", type=int, default=512, help="perplexity window, tokens")
    parser.add_argument("--stride", type=int, default=256, help="perplexity stride, tokens")
    parser.add_argument("--batch-size", type=int, default=4, help="perplexity windows per forward pass")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="greedy tokens of each sanity answer")
    _common(parser, "realquant")


def _chain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="parameters/smoke.yaml", help="parameter file every chain runs")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (run.seed), from --seed-start on")
    parser.add_argument("--seed-start", type=int, default=0, help="first seed")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts; every seed runs "
                                                         "once per count")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter override passed to every run (repeatable)")
    parser.add_argument("--prefix", default=None, help="session name prefix (default: bench-chain-PARAMS-TIME)")
    parser.add_argument("--report", default=None, metavar="JSON",
                        help="print the tables of an earlier run's JSON; run nothing")
    parser.add_argument("--out", default=None, help="JSON output file (default: outputs/bench/chain-PARAMS.json)")


ADD_OPTIONS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "baking": _baking, "bitnet": _bitnet, "chain": _chain, "cognate": _cognate, "compression": _compression,
    "curriculum": _curriculum, "evomerge": _evomerge, "experts": _experts, "finetune": _finetune,
    "grokking": _grokking, "learn": _learn, "optim-lm": _optim_lm, "quietstar": _quietstar, "realquant": _realquant,
    "recursion": _recursion}


def module_name(name: str) -> str:
    """The module of benchmark ``name`` (``optim-lm`` → ``forgelib.bench.optim_lm``)."""
    return f"{__package__}.{name.replace('-', '_')}"


def description(name: str) -> str:
    """Benchmark ``name``'s module docstring as plain text, read from its source file (nothing imported)."""
    source = Path(__file__).with_name(f"{name.replace('-', '_')}.py").read_text(encoding="utf-8")
    return plain_text(ast.get_docstring(ast.parse(source), clean=True))


def build_parser(name: str) -> argparse.ArgumentParser:
    """The parser of ``forge bench NAME``: plain-text description, every option with its help and default."""
    parser = argparse.ArgumentParser(prog=f"forge bench {name}", description=description(name),
                                     formatter_class=HelpFormatter)
    ADD_OPTIONS[name](parser)
    return parser


def overview() -> str:
    """``forge bench --help``: every benchmark with one line saying what it measures."""
    pad = max(map(len, SUMMARIES)) + 2
    lines = ["usage: forge bench NAME [OPTIONS...]", "",
             "Run one benchmark: it prints its results and writes them as JSON under outputs/bench/",
             "(under $FORGE_OUTPUTS/bench/ when that is set).", "", "benchmarks:"]
    for name, summary in sorted(SUMMARIES.items()):
        lines.append(textwrap.fill(summary, width(), initial_indent=f"  {name:<{pad}}",
                                   subsequent_indent=" " * (pad + 2), break_on_hyphens=False))
    lines += ["", "forge bench NAME --help lists a benchmark's own options."]
    return "\n".join(lines)
