"""Phase 6 — Baking: tool and persona prompts baked into the weights (Prompt Baking, KL + LoRA).

The Phase-5 model is loaded trainable (BitLinear layers on latent weights) and its base language model is worked
on (thoughts stay as they were; answers are measured without them, as in Phase 5).

1. **Zero-shot effect**: each prompt of the library (``prompts``: a tool prompt asking for the Phase-5 calculator,
   a persona prompt asking for an ``Answer: n`` style) before the test questions of the input model.
2. **Prompt teaching** (``teach_steps``, ``forgelib.baking.teach``): the pipeline's models never saw an
   instruction, so a prompt changes nothing useful; supervised training on fresh train-split questions, each
   with no prompt, one prompt, or all of them, in the matching style. The *taught* model is the one whose
   prompts are baked (saved as ``taught``).
3. **Effect check**: per prompt, its adherence on the test questions with the prompt minus without it (taught
   model). A prompt whose effect is below ``min_effect`` is reported, not baked.
4. **Cycles** (``max_cycles``): the effective prompts in turn (tool, persona, tool, ...), each cycle one bake
   (``forgelib.baking.bake_prompt``: trajectories sampled from the current model with the prompt, LoRA student
   without it, KL, the adapter merged at the end: sequential baking; a prompt baked again is prompt pursuit).
   After each full pass the *library gap* on held-out questions is measured: ``1 − KL(taught + all prompts ‖
   current) / KL(taught + all prompts ‖ taught)``; the cycles stop when a pass raises it by less than
   ``plateau_delta``, and that pass is undone (the model after the previous pass is handed on; its cycles are
   reported with ``kept: false``). Measured on the cpu set: a second pass of pursuit lowered the no-prompt
   accuracy 0.58 → 0.38 while the library gap rose by 0.013.

**Measured** (test split, ``test_per_level`` per family and level, greedy, calculator on, persona prefixes
removed before the task checker): accuracy, tool-use rate and persona adherence of the input model, the taught
model (no prompt, each prompt, all prompts) and the baked model with no prompt; per bake the held-out KL against
step (the half-baking curve) and the gap closed; drift: KL(input ‖ baked) per answer token on reference worked
solutions of unrelated questions (``drift_families``) and their accuracy before and after.

**Gate**: every baked prompt's gap closed (its last bake, held-out) ≥ ``min_gap_closed``; the library gap ≥
``min_gap_closed`` and each baked prompt's no-prompt adherence at the end ≥ ``bake_retention`` × its value right
after its own last bake (earlier bakes retained); no-prompt accuracy ≥ the input model's − ``retention_margin``
− ``gate_z`` paired standard errors; at least one prompt baked.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import torch
import torch.nn.functional as F

from ..baking import BakePrompt, PromptBakingConfig, bake_prompt, merge_baked, teach_prompts
from ..baking.bake import prompt_kl, teacher_pairs
from ..baking.library import adheres, correct, prefix
from ..data.tasks import generate, generate_levels
from ..params import require_non_negative, require_positive
from ..results import GateCheck, PhaseResult
from ..thoughts import base_lm

HEADLINE = ("acc_before", "acc_after", "acc_retention", "tool_use_rate_before", "tool_use_rate_after",
            "persona_adherence_before", "persona_adherence_after", "gap_closed_library")


def _default_prompts() -> list[dict[str, Any]]:
    return [{"name": "calculator", "kind": "tool", "text": "use calc: "},
            {"name": "answer-style", "kind": "persona", "text": "say Answer: ", "answer_prefix": "Answer: "}]


@dataclasses.dataclass
class Params:
    """Phase 6 parameters (the ``baking`` section). Defaults are the smoke set."""

    source: str = "model"
    """Upstream model role (Phase 5 hands on ``model``)."""
    prompts: list[dict[str, Any]] = dataclasses.field(default_factory=_default_prompts)
    """The prompt library: ``{name, kind: tool|persona, text, answer_prefix}`` (``forgelib.baking.BakePrompt``)."""
    families: list[str] = dataclasses.field(default_factory=lambda: ["arith", "multistep", "algebra"])
    levels: tuple[int, int] = (1, 3)
    """Question levels (lowest, highest) for teaching, trajectories and measurement."""
    teach_steps: int = 300
    """Prompt-teaching steps (0: the model already follows the prompts)."""
    teach_batch_size: int = 16
    teach_optimizer: dict[str, Any] = dataclasses.field(default_factory=lambda: {"lr": 1e-3})
    """MuGrokfast overrides of the Phase-6 preset for teaching (all weights; straight-through on BitLinear)."""
    bake: dict[str, Any] = dataclasses.field(default_factory=dict)
    """``PromptBakingConfig`` fields of every bake (steps, lr, lora_r, trajectories, temperature, half_baking...)."""
    calibration_per_level: int = 16
    """Train-split questions per family and level the trajectories start from."""
    heldout_per_level: int = 8
    """Fitness-split questions per family and level for the held-out KL and gap closed."""
    test_per_level: int = 16
    max_new_tokens: int = 40
    max_cycles: int = 2
    plateau_delta: float = 0.02
    min_effect: float = 0.2
    min_gap_closed: float = 0.5
    bake_retention: float = 0.8
    drift_families: list[str] = dataclasses.field(default_factory=lambda: ["tool"])
    """Families the prompts should not change: replayed without a prompt during teaching (measured: without the
    replay, 300 teaching steps took the smoke model's ``tool`` accuracy from 0.34 to 0.00) and measured for drift."""
    drift_per_level: int = 16
    retain_unrelated: bool = True
    """Bake with the retain term on the drift families' train questions (``bake_prompt(retain_data=...)``)."""
    retention_margin: float = 0.05
    gate_z: float = 1.645

    def __post_init__(self):
        require_positive(self, "calibration_per_level", "heldout_per_level", "test_per_level", "max_new_tokens",
                         "max_cycles", "teach_batch_size", "drift_per_level")
        require_non_negative(self, "teach_steps", "plateau_delta", "min_effect", "retention_margin", "gate_z")
        from ..data.tasks import FAMILIES

        unknown = [f for f in sorted(set(self.families) | set(self.drift_families)) if f not in FAMILIES]
        if unknown:
            raise ValueError(f"families: unknown {unknown}; valid: {sorted(FAMILIES)}")
        if not 1 <= self.levels[0] <= self.levels[1]:
            raise ValueError(f"levels must be (lowest, highest) with 1 <= lowest <= highest, got {self.levels}")
        names = [BakePrompt.from_dict(p).name for p in self.prompts]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"prompts: need at least one prompt and distinct names, got {names}")
        PromptBakingConfig(**self.bake)  # unknown keys and bad values fail here, naming the field

    @property
    def library(self) -> list[BakePrompt]:
        return [BakePrompt.from_dict(p) for p in self.prompts]

    def bake_config(self, seed: int) -> PromptBakingConfig:
        return PromptBakingConfig(**{"max_new_tokens": self.max_new_tokens, **self.bake, "seed": seed})


# --- measuring ----------------------------------------------------------------------------------------


def questions(params: Params, split: str, per_level: int, seed: int, families: list[str] | None = None) -> list:
    return generate_levels(families or params.families, params.levels, per_level, split, seed)


def answers(model, tokenizer, prompts: list[BakePrompt], samples: list, params: Params) -> list[str]:
    """Greedy completions (calculator on) of the samples' questions with ``prompts``' texts before them."""
    from ..tools import generate_with_tools

    traces = generate_with_tools(model, tokenizer, [prefix(prompts) + s.prompt for s in samples],
                                 params.max_new_tokens, batch_size=64)
    return [t.text for t in traces]


def measure(model, tokenizer, prompts: list[BakePrompt], samples: list, params: Params) -> dict[str, Any]:
    """Per question: correct (styles normalized), and adherence to each library prompt; plus their rates."""
    library = params.library
    texts = answers(model, tokenizer, prompts, samples, params)
    row: dict[str, Any] = {"prompts": [p.name for p in prompts],
                           "correct": [int(correct(s, t, library)) for s, t in zip(samples, texts)]}
    row["accuracy"] = sum(row["correct"]) / len(samples)
    row["adherence"] = {p.name: sum(adheres(t, p) for t in texts) / len(texts) for p in library}
    row["examples"] = [{"question": s.prompt, "answer": t} for s, t in zip(samples[::max(1, len(samples) // 6)],
                                                                          texts[::max(1, len(samples) // 6)])]
    return row


def drift_samples(params: Params, seed: int) -> list:
    """Test-split questions of the drift families at levels 1-2."""
    return [s for f in params.drift_families for lv in (1, 2) for s in generate(f, lv, params.drift_per_level, "test",
                                                                                 seed)]


@torch.no_grad()
def drift(reference, model, tokenizer, params: Params, seed: int) -> dict[str, Any]:
    """KL(reference ‖ model) per answer token on reference worked solutions of the drift families' questions
    (teacher-forced; the unrelated behaviour both should share), and their accuracy before and after."""
    from ..data.tokenizer import encode_samples

    samples = drift_samples(params, seed)
    enc = encode_samples(tokenizer, samples, 128, answer_only_loss=True, with_steps=True, drop_long=True)
    mask = enc["labels"][:, 1:] != -100
    logp = lambda m: F.log_softmax(  # noqa: E731
        m(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, :-1].float(), -1)
    ref, new = logp(reference), logp(model)
    kl = (F.kl_div(new, ref, log_target=True, reduction="none").sum(-1) * mask).sum() / mask.sum()
    before = measure(reference, tokenizer, [], samples, params)
    after = measure(model, tokenizer, [], samples, params)
    return {"families": params.drift_families, "kl_per_token": float(kl), "acc_before": before["accuracy"],
            "acc_after": after["accuracy"], "n": len(samples)}


# --- run ----------------------------------------------------------------------------------------------


def library_gap(taught, tokenizer, baked_prompts: list[BakePrompt], held: list, params: Params, seed: int):
    """(pairs, teacher log-probs, KL(taught + all ‖ taught)) for the library gap (module docstring)."""
    pairs, logp = teacher_pairs(taught, tokenizer, prefix(baked_prompts), held, len(held), params.bake_config(seed),
                                seed)
    return pairs, logp, prompt_kl(taught, pairs, logp)


def run(params: Params, ctx) -> PhaseResult:
    """Phase 6 (see the module docstring)."""
    torch.manual_seed(ctx.seed)
    wrapper, tokenizer = ctx.load_upstream_lm(params.source, trainable=True)
    model = base_lm(wrapper).to(ctx.device)
    library, timing = params.library, {}
    test = questions(params, "test", params.test_per_level, ctx.seed + 1)
    held = questions(params, "fitness", params.heldout_per_level, ctx.seed + 2)
    calibration = questions(params, "train", params.calibration_per_level, ctx.seed + 3)
    t0 = time.perf_counter()
    reference = copy.deepcopy(model).eval()
    report: dict[str, Any] = {"library": [dataclasses.asdict(p) for p in library], "levels": list(params.levels),
                              "families": params.families}
    report["input"] = {"none": measure(model, tokenizer, [], test, params),
                       **{p.name: measure(model, tokenizer, [p], test, params) for p in library}}
    timing["measure_input_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    if params.teach_steps:
        history = teach_prompts(model, tokenizer, library, params.families, range(params.levels[0], params.levels[1] + 1),
                                params.teach_steps, params.teach_batch_size, seed=ctx.seed, optimizer=params.teach_optimizer,
                                tracker=ctx.tracker, device=ctx.device, replay=params.drift_families)
        report["teach_loss"] = {"first": history.first_loss, "last": history.last_loss}
    model.eval()
    timing["teach_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    taught = {"none": measure(model, tokenizer, [], test, params),
              **{p.name: measure(model, tokenizer, [p], test, params) for p in library}}
    if len(library) > 1:
        taught["all"] = measure(model, tokenizer, library, test, params)
    report["taught"] = taught
    effect = {p.name: taught[p.name]["adherence"][p.name] - taught["none"]["adherence"][p.name] for p in library}
    report["effect"] = effect
    baked_prompts = [p for p in library if effect[p.name] >= params.min_effect]
    report["not_baked"] = {p.name: f"effect {effect[p.name]:.3f} < min_effect {params.min_effect}"
                           for p in library if p not in baked_prompts}
    timing["measure_taught_s"] = round(time.perf_counter() - t0, 2)
    ctx.save_model("taught", wrapper, tokenizer, metadata={"baking": "prompt-taught model (before baking)"})
    taught_model = copy.deepcopy(model).eval()
    t0 = time.perf_counter()
    model, report["cycles"], report["passes"] = run_cycles(model, taught_model, tokenizer, baked_prompts, calibration,
                                                           held, test, params, ctx)
    timing["bake_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    report["after"] = measure(model, tokenizer, [], test, params)
    report["drift"] = drift(reference, model, tokenizer, params, ctx.seed + 4)
    timing["measure_after_s"] = round(time.perf_counter() - t0, 2)
    report["timing"] = timing
    wrapper.base = model
    ctx.write_report(report)
    ctx.save_model("model", wrapper, tokenizer, metadata={"baking": {"baked": [p.name for p in baked_prompts]}})
    metrics, checks = summarize(report, params)
    ctx.result.metrics.update(metrics)
    ctx.result.gate.extend(checks)
    return ctx.result


def run_cycles(model, taught_model, tokenizer, baked_prompts: list[BakePrompt], calibration: list, held: list,
               test: list, params: Params, ctx) -> tuple[Any, list, list]:
    """The bake cycles (module docstring): (the merged model, a row per cycle, a row per full pass)."""
    cycles, passes = [], []
    if not baked_prompts:
        return model, cycles, passes
    pairs, logp, kl_start = library_gap(taught_model, tokenizer, baked_prompts, held, params, ctx.seed + 5)
    retain = questions(params, "train", params.calibration_per_level, ctx.seed + 6, params.drift_families) \
        if params.retain_unrelated else None
    drift_questions = drift_samples(params, ctx.seed + 4)
    best, kept, start = 0.0, copy.deepcopy(model), 0  # the model after the last pass that was kept
    for i in range(params.max_cycles):
        prompt = baked_prompts[i % len(baked_prompts)]
        baked = bake_prompt(model, prompt.text, tokenizer, calibration, params.bake_config(ctx.seed + 10 + i),
                            eval_data=held, tracker=ctx.tracker, desc=f"bake{i}", retain_data=retain)
        row = {**{k: v for k, v in baked.baking_report.items() if k not in ("train_loss", "prompt")},
               "cycle": i, "prompt": prompt.name, "text": prompt.text, "kept": True}
        row["train_loss"] = baked.baking_report["train_loss"][::max(1, len(baked.baking_report["train_loss"]) // 50)]
        model = merge_baked(baked).eval()
        after = measure(model, tokenizer, [], test, params)
        row["adherence_after"] = after["adherence"]
        row["accuracy_after"] = after["accuracy"]
        row["drift_accuracy_after"] = measure(model, tokenizer, [], drift_questions, params)["accuracy"]
        cycles.append(row)
        if (i + 1) % len(baked_prompts) == 0 or i == params.max_cycles - 1:
            gap = 1.0 - prompt_kl(model, pairs, logp) / kl_start if kl_start > 0 else float("nan")
            gain = gap - best
            passes.append({"after_cycle": i, "gap_closed_library": gap, "kl_start": kl_start, "gain": gain,
                           "kept": not (passes and gain < params.plateau_delta)})
            if not passes[-1]["kept"]:  # plateau: this pass is undone, the previous pass's model handed on
                for r in cycles[start:]:
                    r["kept"] = False
                return kept, cycles, passes
            best, kept, start = gap, copy.deepcopy(model), len(cycles)
    return model, cycles, passes


def summarize(report: dict, params: Params) -> tuple[dict[str, Any], list[GateCheck]]:
    """Metrics and gate checks from the report (see the module docstring)."""
    from .evomerge import paired_se

    before, after = report["input"]["none"], report["after"]
    library = {p["name"]: p for p in report["library"]}
    tool = next((n for n, p in library.items() if p["kind"] == "tool"), None)
    persona = next((n for n, p in library.items() if p["kind"] == "persona"), None)
    metrics: dict[str, Any] = {"acc_before": round(before["accuracy"], 4), "acc_after": round(after["accuracy"], 4),
                               "acc_retention": round(after["accuracy"] / before["accuracy"], 4)
                               if before["accuracy"] else None,
                               "acc_taught_prompted": round(report["taught"].get("all", report["taught"]["none"])
                                                            ["accuracy"], 4)}
    if tool:
        metrics["tool_use_rate_before"] = round(before["adherence"][tool], 4)
        metrics["tool_use_rate_after"] = round(after["adherence"][tool], 4)
    if persona:
        metrics["persona_adherence_before"] = round(before["adherence"][persona], 4)
        metrics["persona_adherence_after"] = round(after["adherence"][persona], 4)
    last = {row["prompt"]: row for row in report["cycles"] if row.get("kept", True)}
    checks = [GateCheck("prompts_baked", len(last), 1, ">=")]
    for name, row in last.items():
        metrics[f"gap_closed_{name}"] = round(row["gap_closed"], 4)
        checks.append(GateCheck(f"gap_closed_{name}", round(row["gap_closed"], 4), params.min_gap_closed, ">="))
        kept = after["adherence"][name]
        checks.append(GateCheck(f"adherence_kept_{name}", round(kept, 4),
                                round(params.bake_retention * row["adherence_after"][name], 4), ">="))
    kept_passes = [p for p in report["passes"] if p.get("kept", True)]
    if kept_passes:
        gap = kept_passes[-1]["gap_closed_library"]
        metrics["gap_closed_library"] = round(gap, 4)
        checks.append(GateCheck("gap_closed_library", round(gap, 4), params.min_gap_closed, ">="))
    metrics["cycles"] = len(report["cycles"])
    metrics["cycles_kept"] = sum(1 for row in report["cycles"] if row.get("kept", True))
    metrics["drift_kl"] = round(report["drift"]["kl_per_token"], 4)
    se = paired_se(after, before)
    metrics["acc_after_minus_before_se"] = round(se, 4)
    checks.append(GateCheck("acc_after_minus_before", round(after["accuracy"] - before["accuracy"], 4),
                            round(-(params.retention_margin + params.gate_z * se), 4), ">="))
    return metrics, checks
