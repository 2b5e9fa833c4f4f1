"""Phase 5 — Curriculum: train the ternary model at the edge of its ability, with a calculator, self-modeling
and dreaming.

The Phase-4 model is loaded trainable (``load_quietstar(path, trainable=True)``: BitLinear layers whose latent
weights reproduce the packed codes) and trained with the Phase-5 MuGrokfast preset (STE mode).

1. **Assessment** (fitness split, ``assess_per_level`` questions per level): per family the frontier level, the
   highest level whose accuracy is still ≥ the band's lower edge (``forgelib.curriculum.assess_levels``).
2. **Rounds** (``rounds``): per family a ``QuestionPool`` at its own level (so families advance on their own).
   Each round asks every pool ``ask_per_family`` questions; the model answers them greedily with the calculator
   (``forgelib.tools.generate_with_tools``: a ``<|tool|>expr<|/tool|>`` call gets ``<|result|>value``) and the
   task checker grades them. A question retires after 3 unhelped correct answers in a row; a failed one spawns a
   variant and shows one more step of its worked solution next time (a hint). Then ``steps_per_round`` training
   steps on the worked solutions of the questions just asked (their hinted form included) mixed with
   ``dream_share`` replayed dreams. A pool whose level is done moves up one level.
3. **Dreaming**: each round the model answers ``dream_per_round`` fresh problems of the levels below each
   family's current level, sampling at ``dream_temperature``; the answers the checker verifies go to a
   ``DreamBuffer`` and are replayed in training (consolidating earlier levels with the model's own solutions).
4. **Self-modeling**: an auxiliary linear head predicts the model's own hidden state of layer
   ``self_model_layer`` from its final hidden state (MSE, weight ``self_model_weight``); it exists only during
   training and is not part of the handed-on model.

5. **Frontier questions** (optional, ``frontier``): with an endpoint and a key in the environment, each round asks an
   OpenAI-compatible model for new questions per family; only those the family's own solver confirms join the pool.

The state (pools, dream buffer, round, model weights) is written after every round under ``state/``; a run
given ``resume_from`` (a phase folder of an interrupted run) continues from its last completed round.

**Measured** (test split, ``test_per_level`` questions per family and level, greedy, with the calculator):
accuracy per family and level from 1 to the level reached, for the input model and the trained model; the
``tool`` family with and without the calculator; the calculator's success rate (calls that returned a value).
``think`` (default off, for time) says whether the model writes Quiet-STaR thoughts while answering.

**Gate**: per family the accuracy at the level reached ≥ the band's lower edge; the mean accuracy over the
levels below the reached ones ≥ the input model's − ``retention_margin`` − ``gate_z`` paired standard errors
(the same test questions before and after); ``tool`` accuracy with the calculator
> without it. A level is left when its pool is nearly empty (``done_threshold``) or a round's answers at it
reach the band's upper edge.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..curriculum import DreamBuffer, QuestionPool, assess_levels
from ..data.base import Sample
from ..data.tasks import FAMILIES, check, generate
from ..data.tokenizer import encode_samples
from ..optim import create_optimizer_from_phase
from ..params import require_non_negative, require_positive
from ..results import GateCheck, PhaseResult, write_json_atomic
from ..tools import generate_with_tools, tool_correctness
from ..train import TrainConfig, train
from .base import UpstreamError

HEADLINE = ("tool_acc_with", "tool_acc_without", "tool_success_rate", "acc_reached_mean", "acc_earlier_mean",
            "acc_earlier_before")


@dataclasses.dataclass
class Params:
    """Phase 5 parameters (the ``curriculum`` section). Defaults are the smoke set."""

    source: str = "model"
    """Upstream model role (Phase 4 hands on ``model``)."""
    families: list[str] = dataclasses.field(default_factory=lambda: ["arith", "multistep", "algebra", "tool"])
    """Families of the curriculum (each with its own pool and level)."""
    band: tuple[float, float] = (0.3, 0.8)
    """Target accuracy band: the frontier is the highest level with accuracy ≥ band[0]; ≥ band[1] is mastered."""
    max_level: int = 4
    """Highest level assessed and trained."""
    assess_per_level: int = 8
    """Fitness-split questions per family and level for the assessment."""
    rounds: int = 8
    ask_per_family: int = 16
    """Questions asked per family and round."""
    pool_size: int = 16
    done_threshold: int = 4
    """A level is done when at most this many of its questions are still active -- or when a round's answers
    at that level reach the band's upper edge (mastered)."""
    retire_after: int = 3
    max_hints: int = 2
    steps_per_round: int = 60
    fresh_per_round: int = 64
    """Fresh train-split problems per family at its current level added to each round's training set (beside
    the pool's active questions): a pool of a few dozen questions alone is memorized within a round (measured:
    training loss 2.3 -> 0.8 in 120 steps while test accuracy fell)."""
    batch_size: int = 16
    max_len: int = 96
    max_new_tokens: int = 48
    lr: float | None = None
    """Learning rate (None: the Phase-5 preset's)."""
    optimizer: dict[str, Any] = dataclasses.field(default_factory=lambda: {"grokfast_lambda": 0.0, "lr": 5e-4})
    """MuGrokfast overrides of the Phase-5 preset (smoke: Grokfast off, see parameters/smoke.yaml)."""
    dream_per_round: int = 32
    dream_temperature: float = 1.0
    dream_share: float = 0.25
    """Share of each training batch taken from the dream buffer (when it holds enough)."""
    self_model_weight: float = 0.1
    self_model_layer: int = 1
    """Index into the base model's hidden states (0 = embeddings, 1 = after the first layer, ...)."""
    think: bool = False
    """Answer with Quiet-STaR thoughts (slower); the handed-on model keeps its thought machinery either way."""
    test_per_level: int = 32
    tool_test: int = 24
    """Test-split ``tool`` questions (at the level the tool family reached) for the with/without comparison."""
    retention_margin: float = 0.05
    gate_z: float = 1.645
    """Retention may further trail by ``gate_z`` paired standard errors (same test questions before and after)."""
    resume_from: str | None = None
    """A phase folder of an interrupted run whose ``state/`` to continue from."""
    frontier: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Optional questions from a frontier model: ``{endpoint, model, api_key_env, per_round}`` (an OpenAI-compatible
    ``/chat/completions`` API). Used only when ``endpoint`` is set and the key variable (default OPENAI_API_KEY) is
    in the environment; each round asks for ``per_round`` (default 4) new questions per family at its level, and
    only those the family's own solver confirms (train split, new prompts) join the pool. Off by default."""

    def __post_init__(self):
        require_positive(self, "max_level", "assess_per_level", "rounds", "ask_per_family", "pool_size",
                         "retire_after", "steps_per_round", "batch_size", "max_len", "max_new_tokens",
                         "fresh_per_round",
                         "test_per_level", "tool_test")
        require_non_negative(self, "max_hints", "dream_per_round", "dream_temperature", "self_model_weight",
                             "retention_margin", "self_model_layer")
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"families: unknown {unknown}; valid: {sorted(FAMILIES)}")
        if not 0 <= self.band[0] <= self.band[1] <= 1:
            raise ValueError(f"band must be (lo, hi) with 0 <= lo <= hi <= 1, got {self.band}")
        if not 0 <= self.dream_share < 1:
            raise ValueError(f"dream_share must be in [0, 1), got {self.dream_share}")


# --- the self-model head ------------------------------------------------------------------------------


class SelfModelHead(nn.Module):
    """Predicts the model's hidden state of layer ``layer`` from its final hidden state (one Linear)."""

    def __init__(self, hidden_size: int, layer: int):
        super().__init__()
        self.layer = layer
        self.proj = nn.Linear(hidden_size, hidden_size)

    def loss(self, hidden_states: tuple, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the real positions (``mask`` (B, T)) between the prediction from the last
        hidden state and the target layer's state (a detached target: the model learns to be predictable from
        its own summary, not to collapse the earlier layer)."""
        if not 0 <= self.layer < len(hidden_states) - 1:
            raise ValueError(f"self_model_layer {self.layer} is not an earlier hidden state (the model has "
                             f"{len(hidden_states)} hidden states; the last is the final one)")
        pred = self.proj(hidden_states[-1])  # (B, T, D)
        target = hidden_states[self.layer].detach()
        per_pos = ((pred.float() - target.float()) ** 2).mean(-1)  # (B, T)
        weights = mask.to(per_pos.dtype)
        return (per_pos * weights).sum() / weights.sum().clamp(min=1)


class Trainee(nn.Module):
    """The model being trained plus its training-only self-model head (the optimizer sees both)."""

    def __init__(self, model: nn.Module, head: SelfModelHead | None):
        super().__init__()
        self.model, self.head = model, head


def curriculum_loss(trainee: Trainee, batch: dict, weight: float) -> tuple[torch.Tensor, dict]:
    """Answer-token cross-entropy of the base model + ``weight`` × the self-model MSE."""
    base = trainee.model.base if hasattr(trainee.model, "base") else trainee.model
    out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
               output_hidden_states=trainee.head is not None)
    logits = out.logits
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    extras = {"nll": float(nll.detach())}
    loss = nll
    if trainee.head is not None and weight > 0:
        self_loss = trainee.head.loss(out.hidden_states, batch["attention_mask"])
        loss = loss + weight * self_loss
        extras["self_model_mse"] = float(self_loss.detach())
    return loss, extras


# --- answering, dreaming, measuring -------------------------------------------------------------------


def _thinking(model, think: bool):
    return contextlib.nullcontext() if think or not hasattr(model, "no_thoughts") else model.no_thoughts()


def answer(model, tokenizer, prompts: list[str], params: Params) -> list[str]:
    """Greedy completions with the calculator (what follows each prompt, tool markup and results included)."""
    with _thinking(model, params.think):
        traces = generate_with_tools(model, tokenizer, prompts, params.max_new_tokens, batch_size=32)
    return [t.text for t in traces]


def dream_completions(model, tokenizer, prompts: list[str], params: Params) -> list[str]:
    """Completions of the base model sampled at ``dream_temperature``, with the calculator answering its calls
    (a dream is the model's own attempt; the checker decides which are kept)."""
    base = model.base if hasattr(model, "base") else model
    traces = generate_with_tools(base, tokenizer, prompts, params.max_new_tokens, batch_size=32,
                                 temperature=params.dream_temperature)
    return [t.text for t in traces]


def correctness_at(model, tokenizer, family: str, level: int, n: int, split: str, seed: int,
                   params: Params) -> list[int]:
    """Per question (``n`` of ``family`` at ``level`` from ``split``): is the greedy answer (calculator on) right."""
    samples = generate(family, level, n, split, seed)
    outputs = answer(model, tokenizer, [s.prompt for s in samples], params)
    return [int(check(s, o)) for s, o in zip(samples, outputs)]


def accuracy_at(model, tokenizer, family: str, level: int, n: int, split: str, seed: int, params: Params) -> float:
    correct = correctness_at(model, tokenizer, family, level, n, split, seed, params)
    return sum(correct) / len(correct)


def accuracy_table(model, tokenizer, levels: dict[str, int], params: Params, seed: int) -> dict[str, dict[int, list]]:
    """Test-split per-question results per family at levels 1..levels[family] (the same questions for every
    model measured with the same seed, so differences can be paired)."""
    return {f: {lv: correctness_at(model, tokenizer, f, lv, params.test_per_level, "test", seed, params)
                for lv in range(1, levels[f] + 1)} for f in params.families}


def as_sample(prompt: str, completion: str, family: str, level: int, answer_text: str) -> Sample:
    """A training sample whose worked solution is ``completion`` (``step;step#answer``)."""
    body = completion.split("#")[0]
    return Sample(prompt, answer_text, family, level, steps=body.split(";") if body else None)


# --- state --------------------------------------------------------------------------------------------


def save_state(folder: Path, pools: dict[str, QuestionPool], dreams: DreamBuffer, round_index: int,
               history: list, trainee: Trainee, rng: random.Random, optimizer=None) -> None:
    """Pools, dream buffer, round counter, history, model weights (latent, trainable; the self-model head too)
    and the optimizer state under ``folder``, each file written atomically."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), folder / "optimizer.pt.tmp")
        (folder / "optimizer.pt.tmp").replace(folder / "optimizer.pt")
    torch.save(torch.get_rng_state(), folder / "torch_rng.pt.tmp")  # dream sampling draws from it
    (folder / "torch_rng.pt.tmp").replace(folder / "torch_rng.pt")
    for family, pool in pools.items():
        pool.save(folder / f"pool_{family}.json")
    state = {k: v.detach().cpu().contiguous() for k, v in trainee.state_dict().items()}
    tmp = folder / "trainee.safetensors.tmp"
    save_file(dict(_untied(state)), str(tmp))
    tmp.replace(folder / "trainee.safetensors")
    from ..curriculum.state import rng_to_json

    write_json_atomic(folder / "state.json", {"round": round_index, "history": history, "dreams": dreams.to_dict(),
                                              "rng": rng_to_json(rng)})


def _untied(state: dict) -> dict:
    seen, out = {}, {}
    for key, value in state.items():
        ptr = (value.data_ptr(), tuple(value.shape))
        if ptr not in seen:
            seen[ptr] = key
            out[key] = value.clone()
    return out


def load_state(folder: Path, families: list[str], trainee: Trainee, optimizer=None):
    """The state ``save_state`` wrote (a clear error when the folder holds none)."""
    from safetensors.torch import load_file

    from ..curriculum.state import rng_from_json

    if not (folder / "state.json").is_file():
        raise UpstreamError(f"resume_from: {folder} holds no curriculum state (state.json); give the folder of a "
                            f"phase-5 run that completed at least one round")
    state = json.loads((folder / "state.json").read_text())
    pools = {f: QuestionPool.load(folder / f"pool_{f}.json") for f in families}
    missing, unexpected = trainee.load_state_dict(load_file(str(folder / "trainee.safetensors")), strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise UpstreamError(f"resume_from: the saved weights do not fit this model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    if optimizer is not None and (folder / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    if (folder / "torch_rng.pt").is_file():
        torch.set_rng_state(torch.load(folder / "torch_rng.pt", weights_only=True))
    return pools, DreamBuffer.from_dict(state["dreams"]), state["round"], state["history"], rng_from_json(state["rng"])


# --- run ----------------------------------------------------------------------------------------------


def load_source(params: Params, ctx):
    return ctx.load_upstream_lm(params.source, trainable=True)  # UpstreamError naming the roles it has if missing


def run(params: Params, ctx) -> PhaseResult:
    """Phase 5 (see the module docstring)."""
    torch.manual_seed(ctx.seed)
    model, tokenizer = load_source(params, ctx)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    assessment = assess_levels(
        lambda f, lv: accuracy_at(model, tokenizer, f, lv, params.assess_per_level, "fitness", ctx.seed, params),
        params.families, range(1, params.max_level + 1), params.band)
    start = {f: a["level"] for f, a in assessment.items()}
    timing["assess_s"] = round(time.perf_counter() - t0, 2)
    hidden = model.get_input_embeddings().weight.shape[1]
    head = SelfModelHead(hidden, params.self_model_layer) if params.self_model_weight > 0 else None
    trainee = Trainee(model, head)
    overrides = {**params.optimizer, **({"lr": params.lr} if params.lr is not None else {})}
    optimizer = create_optimizer_from_phase(trainee, phase_num=5, **overrides)
    pools = {f: QuestionPool({f: 1.0}, level=start[f], pool_size=params.pool_size, seed=ctx.seed + i,
                             retire_after=params.retire_after, max_hints=params.max_hints,
                             done_threshold=params.done_threshold)
             for i, f in enumerate(params.families)}
    dreams, history, first, rng = DreamBuffer(capacity=512, seed=ctx.seed), [], 0, random.Random(ctx.seed)
    frontier = frontier_client(params)
    if params.resume_from:
        from .. import paths

        pools, dreams, first, history, rng = load_state(paths.resolve(params.resume_from) / "state", params.families,
                                                        trainee, optimizer)
    t0 = time.perf_counter()
    step = first * params.steps_per_round
    for round_index in range(first, params.rounds):
        if frontier is not None:
            history_extra = ask_frontier(frontier, pools, params)
        row = run_round(trainee, tokenizer, pools, dreams, params, optimizer, rng, step, ctx,
                        last=round_index == params.rounds - 1)
        if frontier is not None:
            row["frontier"] = history_extra
        step += params.steps_per_round
        history.append({"round": round_index, **row})
        save_state(ctx.dir / "state", pools, dreams, round_index + 1, history, trainee, rng, optimizer)
    timing["rounds_s"] = round(time.perf_counter() - t0, 2)
    model.eval()
    reached = {f: min(p.level or params.max_level, params.max_level) for f, p in pools.items()}
    t0 = time.perf_counter()
    before_model, _ = load_source(params, ctx)
    before_c = accuracy_table(before_model, tokenizer, reached, params, ctx.seed + 1)
    after_c = accuracy_table(model, tokenizer, reached, params, ctx.seed + 1)
    rate = lambda table: {f: {lv: sum(c) / len(c) for lv, c in by.items()} for f, by in table.items()}  # noqa: E731
    before, after = rate(before_c), rate(after_c)
    tool = tool_comparison(model, tokenizer, reached["tool"], params, ctx.seed + 2) \
        if "tool" in params.families else None
    timing["test_s"] = round(time.perf_counter() - t0, 2)
    report = {"assessment": assessment, "start_levels": start, "level_reached": reached, "history": history,
              "acc_by_level": {"before": before, "after": after}, "tool": tool, "timing": timing,
              "correct_by_level": {"before": before_c, "after": after_c},
              "pools": {f: p.summary() for f, p in pools.items()}, "dreams": dreams.counts(),
              "question_pool": {f: [dict(row, history=p.questions[row["qid"]].history) for row in p.table()]
                                for f, p in pools.items()}, "band": list(params.band)}
    ctx.write_report(report)
    ctx.save_model("model", model, tokenizer, metadata={"curriculum": {"level_reached": reached}})
    metrics, checks = summarize(report, params)
    ctx.result.metrics.update(metrics)
    ctx.result.gate.extend(checks)
    return ctx.result


def frontier_client(params: Params):
    """A ``FrontierClient`` when ``frontier`` names an endpoint and its key is in the environment, else None."""
    from ..curriculum import frontier as fr

    if not params.frontier or not fr.enabled(params.frontier):
        return None
    config = {k: v for k, v in params.frontier.items() if k != "per_round"}
    return fr.FrontierClient.from_config(config)


def ask_frontier(client, pools: dict[str, QuestionPool], params: Params) -> dict[str, dict[str, int]]:
    """Ask the frontier model for new questions per family at its current level (examples: a few pool
    questions); the checked ones join the pool. Returns per family the proposals accepted and rejected."""
    out = {}
    for family, pool in pools.items():
        if pool.finished:
            continue
        examples = [pool.questions[q].sample for q in pool.active_ids()[:3]]
        proposed = client.propose_questions(family, pool.level, examples, int(params.frontier.get("per_round", 4)))
        added = pool.add_questions(proposed, origin="frontier")
        out[family] = {"accepted": len(added), "rejected": len(client.last_rejected)}
    return out


def tool_comparison(model, tokenizer, level: int, params: Params, seed: int) -> dict[str, Any]:
    samples = generate("tool", level, params.tool_test, "test", seed)
    budget = params.max_new_tokens
    with _thinking(model, params.think):
        _, with_tool = tool_correctness(model, tokenizer, samples, True, budget)
        _, without = tool_correctness(model, tokenizer, samples, False, budget)
    return {"level": level, "with": with_tool, "without": without}


def run_round(trainee: Trainee, tokenizer, pools: dict[str, QuestionPool], dreams: DreamBuffer, params: Params,
              optimizer, rng: random.Random, step: int, ctx, last: bool = False) -> dict[str, Any]:
    """Ask, grade, dream, train ``steps_per_round`` steps, advance finished pools; returns the round's record."""
    model = trainee.model
    model.eval()
    row = {"levels": {}, "correct": {}, "asked": {}}
    for family, pool in pools.items():
        if pool.finished:
            continue
        items = pool.next_batch(params.ask_per_family)
        outputs = answer(model, tokenizer, [item.prompt for item in items], params)
        right = [pool.answer(item, out, step=step) for item, out in zip(items, outputs)]
        row["levels"][family], row["asked"][family], row["correct"][family] = pool.level, len(items), sum(right)
    # dreams: fresh problems below each family's current level, answered by sampling, verified by the checker
    dream_samples = []
    for family, pool in pools.items():
        below = [lv for lv in range(1, (pool.level or 1))]
        if below:
            dream_samples += generate(family, rng.choice(below), max(1, params.dream_per_round // len(pools)),
                                      "train", rng.randrange(1 << 30))
    if dream_samples and params.dream_per_round:
        outputs = dream_completions(model, tokenizer, [s.prompt for s in dream_samples], params)
        row["dreams_added"] = dreams.add(list(zip(dream_samples, outputs)), check)
    # training batches: the pools' active questions (failed ones stay until retired) and fresh problems at each
    # family's current level (the frontier), with their worked solutions, plus replayed dreams
    frontier = []
    for family, pool in pools.items():
        if pool.finished:
            continue
        frontier += [pool.questions[q].sample for q in pool.active_ids()]
        frontier += generate(family, pool.level, params.fresh_per_round, "train", rng.randrange(1 << 30))
    n_dream = int(params.batch_size * params.dream_share) if len(dreams) >= params.batch_size else 0

    def batches():
        while True:
            picks = [frontier[rng.randrange(len(frontier))] for _ in range(params.batch_size - n_dream)]
            picks += [as_sample(d.prompt, d.completion, d.family, d.level, d.answer) for d in dreams.sample(n_dream, rng)]
            enc = encode_samples(tokenizer, picks, params.max_len, answer_only_loss=True, with_steps=True,
                                 drop_long=True)
            length = int(enc["attention_mask"].sum(1).max())
            yield {k: v[:, :length] for k, v in enc.items()}

    config = TrainConfig(steps=params.steps_per_round, log_every=max(1, params.steps_per_round // 2))
    history = train(trainee, batches(), optimizer, config, loss_fn=lambda m, b: curriculum_loss(m, b,
                    params.self_model_weight), tracker=ctx.tracker, device=ctx.device, desc="curriculum",
                    quiet=True, step_offset=step)
    row["loss"] = history.last_loss
    row["self_model_mse"] = history.rows[-1].get("curriculum/self_model_mse") if history.rows else None
    for family, pool in pools.items():
        asked = row["asked"].get(family, 0)
        mastered = asked and row["correct"][family] / asked >= params.band[1]
        if not pool.finished and (pool.level_done() or mastered) and (pool.level or 0) < params.max_level \
                and not last:  # a level entered in the last round would be handed on untrained
            pool.advance()
            row.setdefault("advanced", []).append(family)
    return row


def summarize(report: dict, params: Params) -> tuple[dict[str, Any], list[GateCheck]]:
    """Metrics and gate checks from the report (see the module docstring)."""
    from .evomerge import paired_se

    reached, before_c, after_c = (report["level_reached"], report["correct_by_level"]["before"],
                                  report["correct_by_level"]["after"])
    before, after = report["acc_by_level"]["before"], report["acc_by_level"]["after"]
    at_reached = {f: after[f][reached[f]] for f in reached}
    earlier = [(f, lv) for f in reached for lv in range(1, reached[f])]
    mean = lambda table: sum(table[f][lv] for f, lv in earlier) / len(earlier) if earlier else float("nan")  # noqa: E731
    pooled = lambda table: [c for f, lv in earlier for c in table[f][lv]]  # noqa: E731
    metrics: dict[str, Any] = {f"level_reached_{f}": lv for f, lv in reached.items()}
    metrics.update({f"acc_reached_{f}": round(a, 4) for f, a in at_reached.items()})
    metrics["acc_reached_mean"] = round(sum(at_reached.values()) / len(at_reached), 4)
    metrics["acc_earlier_mean"] = round(mean(after), 4) if earlier else None
    metrics["acc_earlier_before"] = round(mean(before), 4) if earlier else None
    checks = [GateCheck(f"acc_at_level_reached_{f}", round(a, 4), params.band[0], ">=") for f, a in at_reached.items()]
    if earlier:
        se = paired_se({"correct": pooled(after_c)}, {"correct": pooled(before_c)})
        metrics["acc_earlier_minus_before_se"] = round(se, 4)
        checks.append(GateCheck("acc_earlier_minus_before", round(mean(after) - mean(before), 4),
                                round(-(params.retention_margin + params.gate_z * se), 4), ">="))
    tool = report.get("tool")
    if tool:
        metrics.update({"tool_acc_with": round(tool["with"]["accuracy"], 4),
                        "tool_acc_without": round(tool["without"]["accuracy"], 4),
                        "tool_success_rate": round(tool["with"]["tool_success_rate"], 4)})
        checks.append(GateCheck("tool_acc_with_minus_without",
                                round(tool["with"]["accuracy"] - tool["without"]["accuracy"], 4), 0.0, ">"))
    return metrics, checks
