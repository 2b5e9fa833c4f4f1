"""Phase 3 — Quiet-STaR: the Phase-2 model learns to think before each answer token.

The upstream model (Phase 2's champion, with the runtime settings its recipe saved in its config) is wrapped
in a ``forgelib.quietstar.QuietStarModel`` and trained on fresh train-split samples of the reasoning families
(answer-only labels, worked solutions): base NLL + mixed NLL of the next ``n_true`` tokens after each thought
+ REINFORCE on the thoughts + KL to the frozen Phase-2 model (the Phase-3 MuGrokfast preset's ``kl_weight``).

**The honest ablation.** The same training (same steps, data stream and optimizer) runs with content-free
pause tokens in place of the thoughts (``pause_arm``): a gain that pause tokens also give comes from the
extra computation or from continued training, not from what the model thinks. ``forge bench quietstar``
adds plain continued training and random-token thoughts at equal training compute.

**Measured** on the test split (``test_per_family`` samples per family): exact-match accuracy of the greedy
worked solution's answer and the answer-token NLL, for the Phase-2 model (``*_base``), the Quiet-STaR model
with thoughts (``*_thoughts``) and without them (``*_no_thoughts``: the same trained weights, thoughts off) and
the pause model (``*_pause``). Chance is the best constant answer per family.

**Thinking or not** (``hand_on: auto``): the model is handed on thinking only when thinking beats the same trained
weights without thoughts on the test questions (paired accuracy gain, lower confidence bound above
``think_min_gain``): thoughts cost ``n_passes × (n_thought + 2)`` forwards per answer token and must earn them.
Otherwise it is handed on plain (``QuietStarModel.thinking`` false, saved with it): Phases 4-8 and the scorecard
then measure and answer without thoughts, and the scorecard says so (measured at smoke, 3 training seeds, equal
forward compute in ``forge bench quietstar``: thoughts do not beat pause tokens or plain continued training).
**Whose weights** (``plain_weights: auto``): a model handed on plain keeps its trained weights only when the guard
shows them better than the Phase-2 model in family mean (``plain_weights_decision``); otherwise the Phase-2 weights
are handed on (the thought weights beside them), and the guard and the scorecard see the Phase-2 model's answers.

**Gate** (test split, ``forgelib.stats``'s paired rule): (1) when handed on thinking, thinking does not hurt: the
per-question answer NLL with thoughts minus the same weights' NLL with thoughts off has a one-sided upper
confidence bound ≤ ``nll_margin``; (2) the handed-on model's accuracy (with thoughts when it thinks, else without)
is non-inferior to the Phase-2 model's at ``margin`` (lower confidence bound of the paired difference > −margin),
on as many questions as the margin needs; (3) the guard: the trained
weights, asked as later phases ask them (thoughts off, calculator on), keep every family the Phase-2 model knew
(``forgelib.suite``; training replays them: ``replay``). The NLL against the Phase-2 model and the gain over the
pause baseline are reported whatever their sign (``gain_over_pause_acc`` with its lower bound,
``gain_over_pause_nll``).
The handed-on model (role ``model``) is the base weights as a normal HF folder plus ``quietstar.safetensors``
(mixing head, thought embeddings) and ``quietstar.json`` next to them (``forgelib.modelio.load_model``).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from ..data.tasks import FAMILIES
from ..evaluate import mean_nll
from ..optim import ReferenceKL, preset_config
from ..params import require_non_negative, require_positive
from ..progress import timed
from ..results import GateCheck, PhaseResult
from ..quietstar import QuietStarConfig, QuietStarModel, quietstar_loss, quietstar_optimizer
from ..train import TrainConfig, train
from .common import chance_levels, check_levels, check_optimizer, check_runtime, score, test_samples, training_batches
from ..stats import compare, lower_bound, mean_bounds, noninferior, noninferior_over, superior

HAND_ON = ("auto", "thinking", "plain")
"""``Params.hand_on``'s choices."""

PLAIN_WEIGHTS = ("auto", "trained", "input")
"""``Params.plain_weights``' choices."""

HEADLINE = ("acc_thoughts", "acc_base", "acc_pause", "nll_thoughts", "nll_base", "nll_pause", "chance_test_acc")


@dataclasses.dataclass
class Params:
    """Phase 3 parameters (the ``quietstar`` section). Defaults are the smoke set."""

    source: str = "champion"
    """Upstream model role to start from (Phase 2 hands on ``champion``)."""
    runtime: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Config settings laid over the upstream model's (e.g. ``{use_memory: false}``: thoughts cannot run with the
    Titans memory)."""
    mix: dict[str, float] = dataclasses.field(default_factory=lambda: {"arith": 1.0, "multistep": 1.0,
                                                                       "algebra": 1.0})
    """Training families and their weights; the test set has ``test_per_family`` samples of each."""
    levels: tuple[int, int] = (1, 3)
    """Task levels of training and test (one above Phase 2's: at levels 1-2 the smoke model's answer NLL is 0.06
    and thoughts have nothing to add -- measured, the mixing head stayed closed)."""
    with_steps: bool = True
    """Worked solutions in training and evaluation (as Phases 1-2)."""
    max_len: int = 96
    """Longest training/evaluation sequence in tokens."""
    batch_size: int = 16
    bucket: int = 16
    steps: int = 100
    """Optimizer steps per trained model (the thought model and the pause model each)."""
    lr: float | None = 1e-4
    """Learning rate (None: the Phase-3 preset's 5e-4; at 5e-4 the smoke model's answer NLL rose 0.059 -> 0.063
    in 120 steps of continued training)."""
    warmup_steps: int = 10
    thoughts: QuietStarConfig = dataclasses.field(default_factory=QuietStarConfig)
    """The Quiet-STaR settings (``forgelib.quietstar.QuietStarConfig``)."""
    kl_weight: float | None = None
    """Weight of the KL to the frozen Phase-2 model (None: the Phase-3 preset's ``kl_weight``)."""
    optimizer: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Further MuGrokfast overrides of the Phase-3 preset."""
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(steps=1, log_every=10))
    """Training-loop settings (its ``steps`` is replaced by ``steps``)."""
    pause_arm: bool = True
    """Also train the pause-token ablation (same steps and data) and report ``*_pause``."""
    test_per_family: int | None = None
    """Test-split samples per family of the thinking check; None: as many as ``margin`` needs at the ``guard``
    section's confidence, power and assumed discordance (``forgelib.stats.questions_needed``), spread over the
    families."""
    replay: float = 0.3
    """Share of training samples drawn from every family the input model knew, at its levels (``forgelib.suite``):
    without it the other families drift while the thought machinery trains on three."""
    curve_every: int = 50
    """Measure the answer NLL with and without thoughts on ``curve_samples`` every N steps (0: at the end only)."""
    curve_samples: int = 24
    heatmap_samples: int = 4
    """Test samples whose per-token mixing weights the report keeps (the notebook's heatmap)."""
    margin: float = 0.10
    """Gate: accuracy with thoughts may trail the Phase-2 model's by at most this (paired non-inferiority,
    ``forgelib.stats``, on the test questions of ``mix``)."""
    nll_margin: float = 0.02
    """Gate (when the model is handed on thinking): the answer NLL with thoughts may exceed the same weights' NLL
    with thoughts off by at most this (nats per answer token; the one-sided confidence bound of the paired
    per-question difference)."""
    hand_on: str = "auto"
    """Whether the handed-on model thinks: 'auto' -- only when thinking beats the same weights without thoughts on
    the test questions (paired accuracy gain above ``think_min_gain`` at the ``guard`` section's confidence:
    thinking costs ``n_passes x (n_thought + 2)`` forwards per token and must earn them); 'thinking' or 'plain' to
    force it. A model handed on plain keeps its thought weights (the playground can still switch them on) and
    answers as its base everywhere it is loaded (``QuietStarModel.thinking``, saved with it)."""
    think_min_gain: float = 0.0
    """'auto': the accuracy gain of thinking over not thinking that its lower confidence bound must exceed."""
    plain_weights: str = "auto"
    """Whose weights a model handed on plain (not thinking) answers with: 'auto' -- the trained weights only when
    they answer the input suite better than the Phase-2 model (the guard's questions over every family, the paired
    family-mean difference's lower confidence bound above ``plain_min_gain``), else the Phase-2 model's own: the
    continued training must earn the drift it brings, as the thoughts must earn their compute (measured: without
    thoughts the trained weights trailed the Phase-2 model in family mean by 0.002-0.012 at smoke seeds 0-4 and
    by 0.024 at the cpu set, every family's loss then adding up through the chain); 'trained' / 'input' force it.
    A model handed on thinking keeps its trained weights."""
    plain_min_gain: float = 0.0
    """'auto': the family-mean gain of the trained weights over the Phase-2 model that its lower bound must exceed."""

    def __post_init__(self):
        require_positive(self, "max_len", "batch_size", "bucket", "steps", "test_per_family", "curve_samples")
        require_non_negative(self, "warmup_steps", "curve_every", "heatmap_samples", "nll_margin")
        if not 0 < self.margin < 1:
            raise ValueError(f"margin must lie in (0, 1), got {self.margin}")
        if not 0 <= self.replay < 1:
            raise ValueError(f"replay must lie in [0, 1), got {self.replay}")
        unknown = sorted(set(self.mix) - set(FAMILIES))
        if unknown:
            raise ValueError(f"mix: unknown families {unknown}; valid: {sorted(FAMILIES)}")
        if self.hand_on not in HAND_ON:
            raise ValueError(f"hand_on must be one of {list(HAND_ON)}, got {self.hand_on!r}")
        if not 0 <= self.think_min_gain < 1:
            raise ValueError(f"think_min_gain must lie in [0, 1), got {self.think_min_gain}")
        if self.plain_weights not in PLAIN_WEIGHTS:
            raise ValueError(f"plain_weights must be one of {list(PLAIN_WEIGHTS)}, got {self.plain_weights!r}")
        if not -1 < self.plain_min_gain < 1:
            raise ValueError(f"plain_min_gain must lie in (-1, 1), got {self.plain_min_gain}")
        if self.kl_weight is not None and not self.kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0 or null, got {self.kl_weight}")
        require_positive(self, "lr")
        check_levels(self, "levels")
        self.runtime = check_runtime(self.runtime)
        self.optimizer = check_optimizer(self.optimizer, 3)


# --- data and scoring ---------------------------------------------------------------------------------


def load_source(params: Params, ctx) -> tuple[Any, Any]:
    """The upstream model (checksum verified) with ``runtime`` applied, and its tokenizer."""
    from transformers import AutoTokenizer

    from ..modelio import load_causal_lm

    folder = ctx.upstream_model_path(params.source)  # UpstreamError naming the roles it has when missing
    model = load_causal_lm(folder).eval()
    for key, value in params.runtime.items():
        if not hasattr(model.config, key):
            raise ValueError(f"runtime: {key!r} is not a setting of the upstream model's config")
        setattr(model.config, key, value)
    return model, AutoTokenizer.from_pretrained(folder)


# --- training -----------------------------------------------------------------------------------------


def train_arm(base, tokenizer, params: Params, config: QuietStarConfig, *, seed: int, name: str,
              tracker=None, device: str = "cpu", quiet: bool = True, curve=None,
              on_model=None, suite: dict | None = None) -> tuple[QuietStarModel, Any]:
    """Wrap a copy of ``base`` with ``config`` and train it ``params.steps`` steps (KL to ``base``);
    ``on_model(model)`` is called before training (the benchmark counts forward tokens there)."""
    torch.manual_seed(seed)
    model = QuietStarModel(copy.deepcopy(base), tokenizer, config)
    if on_model is not None:
        on_model(model)
    preset = preset_config(3)
    weight = preset.kl_weight if params.kl_weight is None else params.kl_weight
    kl = ReferenceKL(copy.deepcopy(base), weight) if weight > 0 else None
    overrides = {**params.optimizer, **({"lr": params.lr} if params.lr is not None else {})}
    optimizer = quietstar_optimizer(model, **overrides)
    train_config = dataclasses.replace(params.train, steps=params.steps, warmup_steps=params.warmup_steps,
                                       eval_every=params.curve_every)
    batches = training_batches(tokenizer, params, seed, suite, params.replay)
    history = train(model, batches, optimizer, train_config, loss_fn=lambda m, b: quietstar_loss(m, b, kl=kl),
                    tracker=tracker, evaluate=curve, device=device, desc=name, quiet=quiet)
    return model.eval(), history


def nll_curve(tokenizer, samples, params: Params):
    """The evaluation hook: answer NLL with and without thoughts on ``samples``."""
    def evaluate(model: QuietStarModel) -> dict[str, float]:
        with_thoughts = mean_nll(model, tokenizer, samples, batch_size=64, max_len=params.max_len,
                                 answer_only=True, with_steps=params.with_steps)
        with model.no_thoughts():
            without = mean_nll(model, tokenizer, samples, batch_size=64, max_len=params.max_len, answer_only=True,
                               with_steps=params.with_steps)
        return {"nll_thoughts": with_thoughts, "nll_no_thoughts": without}
    return evaluate


@torch.no_grad()
def mixing_heatmap(model: QuietStarModel, tokenizer, samples, params: Params) -> list[dict[str, Any]]:
    """Per token of each sample's full text: the mixing weight given to the thought that predicts it, and
    that thought (what the notebook's heatmap and tables show)."""
    from ..data.tokenizer import encode_samples

    rows = []
    for sample in samples:
        enc = encode_samples(tokenizer, [sample], params.max_len, answer_only_loss=True, with_steps=params.with_steps)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        length = int(mask.sum())
        out = model(ids[:, :length].to(model.base.device), mask[:, :length].to(model.base.device))
        tokens = [tokenizer.decode([int(t)]) for t in ids[0, 1:length]]  # the predicted tokens
        rows.append({"prompt": sample.prompt, "tokens": tokens,
                     "weights": [round(float(w), 4) for w in out.mix_weights[0, :length - 1]],
                     "thoughts": [tokenizer.decode(out.thought_tokens[0, t].tolist()) for t in range(length - 1)],
                     "answer": [bool(lbl != -100) for lbl in enc["labels"][0, 1:length].tolist()]})
    return rows


# --- run ----------------------------------------------------------------------------------------------


def thinking_decision(table: dict[str, dict], params: Params, guard) -> dict[str, Any]:
    """Does the handed-on model think? The same trained weights with and without thoughts on the same test
    questions (``forgelib.stats.superior``: the paired accuracy gain of thinking, its lower confidence bound above
    ``think_min_gain``) decide it under ``hand_on: auto``; 'thinking' / 'plain' force it (the verdict is still
    reported). Returns {thinking, rule, verdict, reason}."""
    verdict = superior("thinking_vs_not", table["no_thoughts"]["correct"], table["thoughts"]["correct"],
                       params.think_min_gain, guard.confidence, guard.power)
    if params.hand_on != "auto":
        thinking, rule = params.hand_on == "thinking", f"hand_on: {params.hand_on} (set, not measured)"
    else:
        thinking, rule = verdict.passed, (f"hand_on: auto -- thinks when the paired accuracy gain of thinking over "
                                          f"the same weights without thoughts has its {guard.confidence:g} lower "
                                          f"bound above {params.think_min_gain:g}")
    reason = (f"with thoughts {verdict.after:.3f}, without {verdict.before:.3f} on the same {verdict.n} test "
              f"questions: gain {verdict.diff:+.3f}, lower bound {verdict.lower:+.3f}")
    return {"thinking": thinking, "rule": rule, "verdict": verdict.as_row(), "reason": reason}


def gate_checks(table: dict[str, dict], params: Params, guard, thinking: bool = True,
                input_weights: bool = False) -> tuple[list[GateCheck], dict]:
    """The handed-on model against the Phase-2 model: accuracy non-inferior at ``margin`` (``forgelib.stats``), with
    thoughts when it thinks, else the same weights without them. When it thinks, thinking must also not raise the
    answer NLL (paired per-question difference, upper confidence bound ≤ ``nll_margin``); the NLL difference is
    reported either way. ``input_weights``: the model is handed on with the Phase-2 model's weights
    (``plain_weights_decision``): the accuracy verdict of the trained weights is reported, not a check (the handed-on
    model is the one it would compare with). (checks, the verdicts for the report)"""
    thoughts, off, base = table["thoughts"], table["no_thoughts"], table["base"]
    diffs = [a - b for a, b in zip(thoughts["sample_nll"], off["sample_nll"])]  # > 0: thinking hurt
    mean, _, upper = mean_bounds(diffs, guard.confidence)
    label = "thoughts" if thinking else "no_thoughts"
    acc = noninferior(f"{label}_vs_base", base["correct"], table[label]["correct"], params.margin, guard.confidence,
                      guard.power)
    checks = [] if input_weights else [GateCheck(f"acc_{label}_minus_base_lower_bound", acc.lower, -params.margin, ">",
                                                 note=acc.note)]
    if thinking:
        checks.insert(0, GateCheck("nll_thoughts_minus_no_thoughts_upper_bound", round(upper, 6), params.nll_margin,
                                   "<="))
    return checks, {"nll_thoughts_minus_no_thoughts": {"mean": mean, "upper_bound": upper}, "accuracy": acc.as_row()}


def run(params: Params, ctx) -> PhaseResult:
    """Phase 3 (see the module docstring)."""
    torch.manual_seed(ctx.seed)
    base, tokenizer = load_source(params, ctx)
    untrained = QuietStarModel(base, tokenizer, params.thoughts).eval()  # fails early on memory / missing tokens
    test = test_samples(params, ctx.seed + 1, guard=ctx.guard_params)
    curve_set = test_samples(params, ctx.seed + 2, per_family=max(1, params.curve_samples // len(params.mix)))
    curve = nll_curve(tokenizer, curve_set, params)
    table, histories, timing = {"base": score(base, tokenizer, test, params)}, {}, {}
    arms = {"thoughts": params.thoughts}
    if params.pause_arm:
        arms["pause"] = dataclasses.replace(params.thoughts, thought_mode="pause", n_passes=1)
    models, start = {}, {"step": 0, **curve(untrained)}
    for name, config in arms.items():
        with timed(timing, f"train_{name}"):
            models[name], history = train_arm(base, tokenizer, params, config, seed=ctx.seed, name=name,
                                              tracker=ctx.tracker, device=ctx.device, quiet=ctx.quiet, curve=curve,
                                              suite=ctx.input_suite)
        histories[name] = {"rows": history.rows, "evals": [start, *history.evals], "seconds": history.seconds}
        with timed(timing, f"score_{name}"):
            table[name] = score(models[name], tokenizer, test, params)
    with models["thoughts"].no_thoughts():
        table["no_thoughts"] = score(models["thoughts"], tokenizer, test, params)
    model = models["thoughts"]
    heatmap = mixing_heatmap(model, tokenizer, test[:params.heatmap_samples], params)
    chance = chance_levels(params, test, ctx.seed + 3)
    report = {"test": table, "training": histories, "timing": timing, "heatmap": heatmap, "chance": chance,
              "n_test": len(test), "families": sorted(params.mix), "levels": list(params.levels),
              "thoughts": dataclasses.asdict(params.thoughts),
              "runtime": {k: getattr(base.config, k) for k in ("n_cycles", "n_latent", "use_memory")
                          if hasattr(base.config, k)}}
    decision = report["decision"] = thinking_decision(table, params, ctx.guard_params)
    model.thinking = decision["thinking"]
    weights, guarded = plain_weights_decision(base, model, tokenizer, params, ctx)
    report["weights"] = weights
    checks, report["verdicts"] = gate_checks(table, params, ctx.guard_params, decision["thinking"],
                                             weights["weights"] == "input")
    ctx.write_report(report)
    ctx.save_model("model", model, tokenizer, metadata={"quietstar": dataclasses.asdict(params.thoughts),
                                                        "thinking": decision["thinking"]})
    _summarize(ctx, table, chance, ctx.guard_params.confidence)
    metrics = ctx.result.metrics
    metrics["thinks"] = int(decision["thinking"])
    metrics["think_gain_acc"] = decision["verdict"]["diff"]
    metrics["think_gain_acc_lower_bound"] = decision["verdict"]["lower"]
    metrics["hands_on_trained_weights"] = int(weights["weights"] == "trained")
    if not ctx.quiet:
        print(f"handed on {'thinking' if decision['thinking'] else 'without thoughts'}: {decision['reason']}")
        print(f"weights handed on: {weights['weights']} ({weights['reason'] or weights['rule']})")
    ctx.result.gate.extend(checks)
    from ..suite import Asker

    if guarded is not None:  # the trained weights' guard, already asked by the decision
        ctx.record_guard(guarded)
    else:
        ctx.guard(Asker(base, tokenizer, label="phase-2 model"), Asker(model, tokenizer, label="phase-3 model"))
    return ctx.result


def family_mean_gain(report, min_gain: float, guard):
    """The guard report's family-mean gain of ``after`` over ``before`` as a superiority verdict at ``min_gain``
    (``forgelib.stats.noninferior_over``'s stratified lower bound: each family weighs the same)."""
    strata = {f: (a["before"], a["after"]) for f, a in report.answers.items()}
    mean = noninferior_over("trained_weights_vs_phase2", strata, 0.0, guard.confidence, guard.power)
    return dataclasses.replace(mean, kind="superior", margin=min_gain, passed=mean.lower > min_gain)


def plain_weights_decision(base, model: QuietStarModel, tokenizer, params: Params, ctx) -> tuple[dict, Any]:
    """Which weights the handed-on ``model`` answers with (``Params.plain_weights``): a thinking model keeps its
    trained weights; a plain one keeps them under 'auto' only when the guard (every family of the input suite, the
    Phase-2 model against the trained weights asked as later phases ask them) finds the family mean's paired gain's
    lower bound above ``plain_min_gain``. Otherwise the Phase-2 model's weights are copied into ``model``'s base (its
    thought weights stay). Returns ({weights: trained|input, rule, verdict, reason}, the trained weights' guard
    report to record when they are handed on, else None)."""
    from ..quietstar import base_lm
    from ..suite import Asker

    if model.thinking:
        return {"weights": "trained", "rule": "a model handed on thinking keeps its trained weights",
                "verdict": None, "reason": ""}, None
    report, verdict, reason = None, None, ""
    if params.plain_weights == "auto":
        report = ctx.guard(Asker(base, tokenizer, label="phase-2 model"),
                           Asker(model, tokenizer, label="phase-3 model"), record=False)
        pooled = family_mean_gain(report, params.plain_min_gain, ctx.guard_params)
        keep, verdict = pooled.passed, pooled.as_row()
        rule = (f"plain_weights: auto -- the trained weights when their family-mean gain over the Phase-2 model on "
                f"the guard's questions has its {ctx.guard_params.confidence:g} lower bound above "
                f"{params.plain_min_gain:g}")
        reason = (f"trained weights {pooled.after:.3f}, Phase-2 model {pooled.before:.3f} in family mean over "
                  f"{pooled.n} guard questions of {len(report.families)} families: gain {pooled.diff:+.3f}, lower "
                  f"bound {pooled.lower:+.3f}")
    else:
        keep, rule = params.plain_weights == "trained", f"plain_weights: {params.plain_weights} (set, not measured)"
    if not keep:
        base_lm(model).load_state_dict(base.state_dict())
        report = None
    return {"weights": "trained" if keep else "input", "rule": rule, "verdict": verdict, "reason": reason}, report


def _summarize(ctx, table: dict, chance: dict, confidence: float = 0.95) -> None:
    metrics = ctx.result.metrics
    for label, row in table.items():
        metrics[f"acc_{label}"] = round(row["accuracy"], 4)
        metrics[f"nll_{label}"] = round(row["answer_nll"], 4)
    if "pause" in table:
        c = compare(table["pause"]["correct"], table["thoughts"]["correct"])
        metrics["gain_over_pause_acc"] = round(c.diff, 4)
        metrics["gain_over_pause_acc_lower_bound"] = round(lower_bound(c, confidence), 4)
        metrics["gain_over_pause_nll"] = round(table["pause"]["answer_nll"] - table["thoughts"]["answer_nll"], 4)
    metrics["chance_test_acc"] = round(chance["overall"], 4)
