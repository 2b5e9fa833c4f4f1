"""`forge bench quietstar`: Quiet-STaR against plain continued training, pause tokens and random-token thoughts
at equal training compute.

Every arm starts from the same Phase-2 model and trains on the same stream of fresh train-split samples (Phase
3's families and levels) with the Phase-3 optimizer and the KL to the start model:

- ``plain``: continued training, base NLL only (no thought machinery);
- ``quietstar``: thoughts sampled and reinforced (Phase 3's settings);
- ``pause``: the same number of content-free pause tokens (no REINFORCE, one pass);
- ``random``: uniformly random thought tokens (no REINFORCE, one pass).

**Equal compute** is counted in forward tokens (a forward pass costs about 2 × parameters FLOPs per token, and
the backward pass twice that, for every arm alike): per step, ``plain`` runs B·T tokens, a thinking arm
``passes · B · (T + Q · (n_thought + 1 + n_true))`` (one base pass, then one pass per thought token, the end token
and the teacher-forced tokens at the Q positions of each row whose targets the loss counts:
``forgelib.quietstar.training.step_forward_tokens``; attention's extra cost over the longer key sets is not
counted). Quiet-STaR runs ``--steps`` steps; every other arm gets the steps that spend the same number of tokens on
the same training stream, each seed's own (``equal_compute_steps`` walks it: pause and random run twice Quiet-STaR's
steps with 2 passes, plain about P · (1 + Q/T · (n_thought + 1 + n_true)) times as many). The KL reference's
forward (B·T per step) is the same per step for every arm and is not counted. The forward tokens every arm really
ran are counted by a hook on the base model and reported (``forward_tokens``).

**Seeds** vary the training seed only (data order, thought sampling, the new heads' initialisation); the start
model and the test set are the same for every seed. Reported per arm: test-split exact-match accuracy (thinking
arms evaluate with their thoughts, greedy) and answer NLL, mean and 95 % t-interval over seeds, and the paired
per-seed differences of Quiet-STaR minus each other arm. JSON under outputs/bench/.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time

import torch
import torch.nn.functional as F

from .. import paths
from ..optim import ReferenceKL, create_optimizer_from_phase, preset_config
from ..phases.quietstar import Params, score, test_samples, train_arm, training_batches
from ..quietstar.training import step_forward_tokens
from ..results import dumps_json
from . import phase_folder, phase_params
from ..train import train
from .options import QUIETSTAR_ARMS as ARMS, build_parser

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def step_tokens(arm: str, params: Params, batch: dict) -> int:
    """Forward tokens of one training step of ``arm`` on ``batch`` (see the module docstring)."""
    if arm == "plain":
        return int(batch["input_ids"].numel())
    passes = params.thoughts.n_passes if arm == "quietstar" else 1
    return step_forward_tokens(params.thoughts, batch, passes)


def equal_compute_steps(params: Params, quietstar_steps: int, batches) -> dict[str, int]:
    """Steps per arm that spend Quiet-STaR's forward tokens on ``batches``, the training stream every arm trains on
    (``training_batches`` with one seed): Quiet-STaR's first ``quietstar_steps`` batches set the budget; every
    other arm runs the batches of the same stream until its tokens come closest to it."""
    batches = iter(batches)
    seen: list[dict] = []

    def batch(i: int) -> dict:
        while len(seen) <= i:
            seen.append(next(batches))
        return seen[i]

    budget = sum(step_tokens("quietstar", params, batch(i)) for i in range(quietstar_steps))
    steps = {}
    for arm in ARMS:
        spent, n = 0, 0
        while True:
            cost = step_tokens(arm, params, batch(n))
            if spent + cost > budget and budget - spent < spent + cost - budget:
                break
            spent, n = spent + cost, n + 1
            if spent >= budget:
                break
        steps[arm] = max(1, n)
    return steps


def interval(values: list[float]) -> dict[str, float]:
    """Mean and 95 % t-interval half-width over seeds (0 for one seed)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return {"mean": round(mean, 4), "ci95": 0.0, "n": len(values)}
    t = T_975.get(len(values) - 1, 1.96)
    return {"mean": round(mean, 4), "ci95": round(t * statistics.stdev(values) / math.sqrt(len(values)), 4),
            "n": len(values)}


class TokenCounter:
    """Counts the (batch × sequence) tokens of every forward call of a model."""

    def __init__(self, model: torch.nn.Module):
        self.tokens = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if module.training and x is not None:
            self.tokens += int(x.shape[0] * x.shape[1])

    def close(self) -> None:
        self.handle.remove()


def train_plain(base, tokenizer, params: Params, steps: int, seed: int):
    """Continued training of a copy of ``base``: answer NLL + KL to ``base`` (Phase-3 optimizer). Returns
    (model, history, forward tokens counted)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base).train()
    counter = TokenCounter(model)
    weight = preset_config(3).kl_weight if params.kl_weight is None else params.kl_weight
    kl = ReferenceKL(copy.deepcopy(base), weight) if weight > 0 else None

    def loss_fn(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        extra = kl(logits, batch["input_ids"], batch["attention_mask"]) if kl is not None else 0.0
        return nll + extra, {"base_nll": float(nll.detach())}

    overrides = {**params.optimizer, **({"lr": params.lr} if params.lr is not None else {})}
    optimizer = create_optimizer_from_phase(model, phase_num=3, **overrides)
    config = dataclasses.replace(params.train, steps=steps, warmup_steps=params.warmup_steps, eval_every=0)
    history = train(model, training_batches(tokenizer, params, seed), optimizer, config, loss_fn=loss_fn,
                    desc="plain", quiet=True)
    counter.close()
    return model.eval(), history, counter.tokens


def train_thinking(base, tokenizer, params: Params, arm: str, steps: int, seed: int):
    """One thinking arm (quietstar, pause or random) for ``steps`` steps; (model, history, forward tokens)."""
    mode = {"quietstar": "sample", "pause": "pause", "random": "random"}[arm]
    passes = params.thoughts.n_passes if arm == "quietstar" else 1
    config = dataclasses.replace(params.thoughts, thought_mode=mode, n_passes=passes)
    counters = []
    model, history = train_arm(base, tokenizer, dataclasses.replace(params, steps=steps, curve_every=0), config,
                               seed=seed, name=arm, quiet=True,
                               on_model=lambda m: counters.append(TokenCounter(m.base)))
    counters[0].close()
    return model, history, counters[0].tokens


def run_seed(base, tokenizer, params: Params, steps: dict[str, int], seed: int, test, arms=ARMS) -> dict:
    """Train and score every arm once with training seed ``seed``."""
    out = {}
    for arm in arms:
        started = time.perf_counter()
        if arm == "plain":
            model, history, tokens = train_plain(base, tokenizer, params, steps[arm], seed)
        else:
            model, history, tokens = train_thinking(base, tokenizer, params, arm, steps[arm], seed)
        train_s = time.perf_counter() - started
        row = score(model, tokenizer, test, params)
        out[arm] = {"accuracy": row["accuracy"], "answer_nll": row["answer_nll"], "per_family": row["per_family"],
                    "steps": steps[arm], "forward_tokens": tokens, "train_seconds": round(train_s, 2),
                    "final_loss": round(history.last_loss, 4)}
    return out


def summarize(per_seed: list[dict]) -> dict:
    """Per arm: mean and 95 % interval of accuracy and answer NLL; Quiet-STaR minus each other arm (paired by
    seed): accuracy gain and NLL gain (other's NLL minus Quiet-STaR's), mean and interval."""
    arms = list(per_seed[0])
    out = {"accuracy": {a: interval([r[a]["accuracy"] for r in per_seed]) for a in arms},
           "answer_nll": {a: interval([r[a]["answer_nll"] for r in per_seed]) for a in arms},
           "forward_tokens": {a: statistics.median(r[a]["forward_tokens"] for r in per_seed) for a in arms}}
    if "quietstar" in arms:
        out["quietstar_gain"] = {
            f"over_{a}": {"accuracy": interval([r["quietstar"]["accuracy"] - r[a]["accuracy"] for r in per_seed]),
                          "answer_nll": interval([r[a]["answer_nll"] - r["quietstar"]["answer_nll"]
                                                  for r in per_seed])}
            for a in arms if a != "quietstar"}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("quietstar")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from ..modelio import load_causal_lm
    from ..results import PhaseResult

    params = phase_params("quietstar", args.params)
    if args.steps is not None:
        params = dataclasses.replace(params, steps=args.steps)
    if args.test_per_family is not None:
        params = dataclasses.replace(params, test_per_family=args.test_per_family)
    folder = phase_folder("evomerge", args.phase2)
    result = PhaseResult.load(folder)
    model_dir = paths.resolve(result.models[params.source]["path"])
    base = load_causal_lm(model_dir).eval()
    for key, value in params.runtime.items():
        setattr(base.config, key, value)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    test = test_samples(params, seed=1)
    # each seed trains on its own stream: its arms' steps spend equal tokens on that stream
    steps = [equal_compute_steps(params, params.steps, training_batches(tokenizer, params, s))
             for s in range(args.seeds)]
    started = time.perf_counter()
    per_seed = [run_seed(base, tokenizer, params, steps[s], s, test, args.arms) for s in range(args.seeds)]
    start_row = score(base, tokenizer, test, params)
    report = {"benchmark": "quietstar", "phase2": paths.relative(folder), "params_file": args.params,
              "what_the_seeds_vary": "the training seed only (data order, thought sampling, new heads' init); "
                                     "one start model and one test set for every seed",
              "equal_compute": {"rule": "forward tokens on each seed's training stream (see `forge bench "
                                        "quietstar --help`)", "steps_per_seed": steps},
              "start_model": {"accuracy": start_row["accuracy"], "answer_nll": start_row["answer_nll"]},
              "n_test": len(test), "seeds": args.seeds, "seconds": round(time.perf_counter() - started, 1),
              "quietstar": dataclasses.asdict(params), "per_seed": per_seed, **summarize(per_seed)}
    text = dumps_json(report, default=str)
    print(text)
    out = paths.bench_output("quietstar", args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0
