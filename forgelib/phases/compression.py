"""Phase 8 — Compression: the Phase-7 model as one small artifact file, compressed in gated stages.

The input is the model Phase 7 hands on (Quiet-STaR wrapper, ternary projections, fp embeddings, norms and
thought extras) with its SVF experts and router. Every compressed model is a real artifact file
(``forgelib.quant.artifact``: ``save_compressed`` / ``load_compressed``), and every measurement reads the model
back from that file, so the bits are the file's and the scores are the loaded model's.

1. **Calibration**: the second moments of each layer's inputs on ``calibration_per_level`` train-split worked
   solutions per family and level (the Hessian diagonal ``vq`` weights its k-means with).
2. **Stages** (``stages``, in order): each assigns codecs to tensor groups or name patterns
   (``forgelib.quant.compress``) on top of the plan kept so far, writes the artifact, loads it back and asks it the
   guard's questions over every family of the input's suite (``StageGuard``: the Phase-7 system's answers are asked
   once and reused). A stage that does not keep every family at ``allowed_loss`` (the paired rule of
   ``forgelib.stats``, as many questions as that margin needs) or whose perplexity of the test questions' worked
   solutions rises above ``max_ppl_ratio`` × the input's is **rolled back**: the next stage starts from the
   previous kept plan. The last kept stage's file is the phase's model (``models/model/model.forge``), and its
   guard is the phase's guard.
3. **Sweep** (``sweep``): methods and baselines (RTN, HQQ, block floating point, SeedLM, VQ, hyper-compression),
   each alone on ``sweep_targets`` over the first stage's plan, measured the same way: the bits-vs-perplexity
   chart. Not used by the gate.

**Measured** (test split, greedy, calculator on, without Quiet-STaR thoughts as in Phases 5–7, persona prefixes
removed): exact-match accuracy of the two-pass routed system when the upstream has experts (the expert vectors and
router centroids ride in the artifact as extras), else of the model alone; perplexity of the test questions'
worked solutions (completion tokens, teacher-forced). Chance: 0 for the numeric families.

**Gate**: the guard at ``allowed_loss`` (the loss the phase states it may trade for size): the artifact, read back
from disk with the experts it carries, keeps every family of the input's suite (``forgelib.suite``); its
perplexity ≤ ``max_ppl_ratio`` × the input's; (when set) bits per weight ≤ ``max_bits_per_weight``.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..data.tasks import FAMILIES, generate_levels
from ..params import load_yaml_file, require_non_negative, require_positive
from ..progress import timed
from ..results import GateCheck, PhaseResult
from ..quietstar import base_lm
from .common import check_levels

HEADLINE = ("bits_per_weight", "artifact_bytes", "acc_input", "acc_final", "acc_retention", "ppl_retention",
            "stages_kept", "stages_rolled_back")
ARTIFACT = "model.forge"
STAGE_KEYS = {"name", "assign", "allowed_loss", "max_ppl_ratio"}


def _default_stages() -> list[dict]:
    return [{"name": "pack", "assign": {"ternary": {"codec": "ternary"}, "small": {"codec": "raw16"}}},
            {"name": "matrices", "assign": {"matrices": {"codec": "hqq", "bits": 2, "group": 64}}},
            {"name": "extras", "assign": {"extras": {"codec": "rtn", "bits": 8, "group": 64}}},
            {"name": "small", "assign": {"small": {"codec": "rtn", "bits": 8, "group": 64}}},
            {"name": "embeddings", "assign": {"embeddings": {"codec": "vq", "v": 4, "codebook_bits": 6,
                                                             "residual": True}}},
            {"name": "embeddings-2bit", "assign": {"embeddings": {"codec": "hqq", "bits": 2, "group": 64}}}]


def _default_sweep() -> list[dict]:
    return [{"name": "rtn4", "spec": {"codec": "rtn", "bits": 4, "group": 32}},
            {"name": "hqq2", "spec": {"codec": "hqq", "bits": 2, "group": 64}},
            {"name": "seedlm", "spec": {"codec": "seedlm", "K": 12, "C": 8, "P": 3}},
            {"name": "vq6", "spec": {"codec": "vq", "v": 4, "codebook_bits": 6}},
            {"name": "hyper", "spec": {"codec": "hyper", "n": 4, "index_bits": 12}}]


@dataclasses.dataclass
class Params:
    """Phase 8 parameters (the ``compression`` section). Defaults are the smoke set."""

    source: str = "model"
    families: list[str] = dataclasses.field(default_factory=lambda: ["arith", "multistep", "algebra", "tool"])
    levels: tuple[int, int] = (1, 3)
    test_per_level: int | None = 8
    """Test questions per family and level of ``families`` for each stage's perplexity and the accuracy the tables
    show (the gate on accuracy is each stage's guard over the whole suite); None: as many as ``allowed_loss`` needs
    at the ``guard`` section's confidence, power and assumed discordance (``forgelib.stats.questions_needed``)."""
    sweep_questions: int = 96
    """The first this many of the test questions measure each point of the sweep (a chart, not a gate)."""
    answer_prefixes: list[str] = dataclasses.field(default_factory=lambda: ["Answer:"])
    max_new_tokens: int = 40
    max_len: int = 96
    use_experts: bool = True
    """Measure the routed system with the upstream's experts (and carry them in the artifact) when it has them."""
    calibration_per_level: int = 8
    stages: list[dict] = dataclasses.field(default_factory=_default_stages)
    sweep: list[dict] = dataclasses.field(default_factory=_default_sweep)
    """Methods for the chart: ``{name, spec}``, each applied alone to ``sweep_targets`` over the first stage."""
    sweep_targets: list[str] = dataclasses.field(default_factory=lambda: ["embeddings", "matrices"])
    allowed_loss: float = 0.10
    """The accuracy (absolute) the phase may trade for size, stated: a stage is kept, and the final artifact passes,
    when its accuracy is non-inferior to the input's at this margin (paired, ``forgelib.stats``), on the test
    questions of ``families`` and, for the final artifact, family by family over the input's whole suite (the guard
    at this margin). A stage may state its own ``allowed_loss``."""
    max_ppl_ratio: float = 1.25
    """Perplexity of the test questions' worked solutions at most this × the input's (a secondary check)."""
    max_bits_per_weight: float | None = None
    """Gate: the artifact's bits per stored value at most this (None: not checked)."""

    def __post_init__(self):
        from ..quant.artifact import check_spec
        from ..quant.compress import GROUPS

        require_positive(self, "test_per_level", "max_new_tokens", "max_len", "max_ppl_ratio", "sweep_questions")
        require_non_negative(self, "calibration_per_level")
        check_levels(self, "levels")
        if not 0 < self.allowed_loss < 1:
            raise ValueError(f"allowed_loss must lie in (0, 1), got {self.allowed_loss}")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"families: unknown {unknown}; valid: {sorted(FAMILIES)}")
        if not self.stages:
            raise ValueError("stages: at least one stage is needed (e.g. {name: pack, assign: {ternary: {codec: "
                             "ternary}}})")
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, dict) or "name" not in stage or not isinstance(stage.get("assign"), dict):
                raise ValueError(f"stages[{i}] must be a mapping with 'name' and 'assign' ({{group or pattern: "
                                 f"codec spec}}), got {stage!r}")
            extra = set(stage) - STAGE_KEYS
            if extra:
                raise ValueError(f"stages[{i}] ({stage['name']}): unknown keys {sorted(extra)}; valid: "
                                 f"{sorted(STAGE_KEYS)}")
            for selector, spec in stage["assign"].items():
                check_spec(f"stages[{i}].{selector}", dict(spec))
        names = [s["name"] for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")
        for i, point in enumerate(self.sweep):
            if set(point) != {"name", "spec"}:
                raise ValueError(f"sweep[{i}] must be {{name, spec}}, got {point!r}")
            check_spec(f"sweep[{i}]", dict(point["spec"]))
        bad = [t for t in self.sweep_targets if t not in GROUPS]
        if bad:
            raise ValueError(f"sweep_targets: unknown groups {bad}; valid: {list(GROUPS)}")


# --- measuring ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class System:
    """What the phase measures: test questions, the grader, and (optionally) the Phase-7 experts and router."""

    test: list
    grader: Any
    tokenizer: Any
    params: Params
    experts: list[dict] | None = None
    centroids: torch.Tensor | None = None
    svf_config: dict = dataclasses.field(default_factory=dict)

    def extras(self) -> dict[str, torch.Tensor]:
        """The expert vectors and router centroids as artifact extras."""
        if not self.experts:
            return {}
        out = {f"expert{c}.{name}": z for c, zs in enumerate(self.experts) for name, z in zs.items()}
        out["router.centroids"] = self.centroids
        return out

    def from_extras(self, extras: dict[str, torch.Tensor]) -> "System":
        """This system with the experts and centroids read back from an artifact (as stored, i.e. compressed)."""
        found = experts_from_extras(extras)
        if not self.experts or found is None:
            return self
        return dataclasses.replace(self, experts=found[0], centroids=found[1])

    def measure(self, model) -> dict[str, Any]:
        """Accuracy (and per question), perplexity, seconds and the answers (``texts``) of ``model`` (a wrapper or
        an LM)."""
        from ..evaluate import perplexity

        lm, p = base_lm(model), self.params
        started = time.perf_counter()
        ppl = perplexity(lm, self.tokenizer, self.test, max_len=p.max_len, answer_only=True, with_steps=True)
        if self.experts:
            from ..experts import SVFConfig, apply_svf, remove_svf
            from ..experts.route import RoutingSettings, evaluate_settings

            svf = apply_svf(lm, SVFConfig(**self.svf_config))
            try:
                scored = evaluate_settings(svf, self.tokenizer, self.test, self.centroids, self.experts,
                                           RoutingSettings(), self.grader, p.max_new_tokens)
            finally:
                remove_svf(svf)
            correct, texts = scored["correct"], scored["texts"]
        else:
            from ..tools import generate_with_tools

            traces = generate_with_tools(lm, self.tokenizer, [s.prompt for s in self.test], p.max_new_tokens,
                                         batch_size=64)
            texts = [t.text for t in traces]
            correct = [int(self.grader(s, t)) for s, t in zip(self.test, texts)]
        return {"acc": round(sum(correct) / len(correct), 4), "ppl": round(ppl, 4), "correct": correct,
                "seconds": round(time.perf_counter() - started, 2), "texts": texts}


def test_per_level(params: Params, guard) -> int:
    """Questions per family and level: ``test_per_level``, or as many as ``allowed_loss`` needs (module docstring)."""
    import math

    from ..suite import GuardParams

    if params.test_per_level is not None:
        return params.test_per_level
    cells = len(params.families) * (params.levels[1] - params.levels[0] + 1)
    return math.ceil((guard or GuardParams()).needed(params.allowed_loss) / cells)


def load_system(ctx, tokenizer, params: Params) -> System:
    """The test questions, the grader and, when the upstream has them and ``use_experts``, its experts."""
    from .. import paths
    from ..baking.library import make_check

    test = generate_levels(params.families, params.levels, test_per_level(params, ctx.guard_params), "test",
                           ctx.seed + 1)
    system = System(test, make_check(params.answer_prefixes), tokenizer, params)
    folder = (ctx.upstream.artifacts or {}).get("experts") if ctx.upstream is not None else None
    if not params.use_experts or folder is None:
        return system
    experts, centroids, svf = phase7_experts(paths.resolve(folder))
    return dataclasses.replace(system, experts=experts, centroids=centroids, svf_config=svf)


def phase7_experts(folder: Path) -> tuple[list[dict], torch.Tensor, dict]:
    """(the expert ``z`` dicts in order, the router's centroids, the SVF settings of that Phase-7 run) of a
    Phase-7 ``experts/`` folder."""

    from ..experts import load_expert

    files = sorted(folder.glob("expert_*.safetensors"), key=lambda f: int(f.stem.split("_")[1]))
    router = torch.load(folder / "router.pt", weights_only=True)
    upstream_params = load_yaml_file(folder.parent / "params.yaml") or {}
    return [load_expert(f) for f in files], router["centroids"], (upstream_params.get("experts") or {}).get("svf") or {}


def experts_from_extras(extras: dict[str, torch.Tensor]) -> tuple[list[dict], torch.Tensor] | None:
    """(the expert ``z`` dicts in order, the router's centroids) an artifact carries, None without experts."""
    ids = sorted({int(n.split(".")[0].removeprefix("expert")) for n in extras if n.startswith("expert")})
    if not ids:
        return None
    return ([{n.split(".", 1)[1]: z for n, z in extras.items() if n.startswith(f"expert{c}.")} for c in ids],
            extras["router.centroids"])


def calibration(model, tokenizer, params: Params, seed: int) -> dict[str, torch.Tensor]:
    """Input second moments per tensor (``forgelib.quant.compress.input_hessians``) on train-split questions."""
    from ..data.tokenizer import encode_samples
    from ..quant.compress import input_hessians

    if not params.calibration_per_level:
        return {}
    samples = generate_levels(params.families, params.levels, params.calibration_per_level, "train", seed + 3)
    encoded = encode_samples(tokenizer, samples, params.max_len, with_steps=True)
    device = next(model.parameters()).device
    batches = [{k: encoded[k][i:i + 32].to(device) for k in ("input_ids", "attention_mask")}
               for i in range(0, len(samples), 32)]
    return input_hessians(model, base_lm(model), batches, [n for n, p in model.state_dict().items() if p.dim() == 2])


def compress_and_measure(model, system: System, plan: dict, path: Path, hessians: dict,
                         groups: dict[str, str] | None = None) -> dict[str, Any]:
    """Write the artifact of ``plan``, load it back, measure it; the row for tables and charts (with the bytes
    per tensor group when ``groups`` is given; the header under ``header``)."""
    from ..modelio import load_compressed
    from ..quant.artifact import load_extras, save_compressed
    from ..quant.compress import PeakMemory

    started = time.perf_counter()
    with PeakMemory() as memory:
        report = save_compressed(model, path, plan, tokenizer=system.tokenizer, hessians=hessians,
                                 extras=system.extras())
    seconds = time.perf_counter() - started
    loaded = load_compressed(path)
    scored = system.from_extras(load_extras(path)).measure(loaded)
    scored.pop("texts")
    return {**scored, "bits_per_weight": round(report["bits_per_weight"], 4), "file_bytes": report["file_bytes"],
            "header_bytes": report["header_bytes"], "weights": report["weights"],
            "weights_per_codec": report["weights_per_codec"], "compress_s": round(seconds, 2),
            "peak_mb": round(memory.peak / 2**20, 1), "bytes_per_group": bytes_per_group(report, groups or {})}


def bytes_per_group(report: dict, groups: dict[str, str]) -> dict[str, int]:
    """Payload bytes of the artifact per tensor group, and the header."""
    out: dict[str, int] = {"header": report["header_bytes"]}
    for name, nbytes in report["per_tensor_bytes"].items():
        key = groups.get(name, "other")
        out[key] = out.get(key, 0) + nbytes
    return out


def stage_gate(row: dict, reference: dict, allowed_loss: float, max_ppl_ratio: float, guard) -> list[GateCheck]:
    """The perplexity of the test questions' worked solutions at most ``max_ppl_ratio`` × the reference's (accuracy is
    the stage's guard: ``StageGuard``, per family over the input's suite at ``allowed_loss``)."""
    return [GateCheck("ppl_ratio", round(row["ppl"] / reference["ppl"], 4), max_ppl_ratio, "<=")]


# --- the phase ----------------------------------------------------------------------------------------


def _sweep(model, system: System, groups: dict[str, str], hessians: dict, params: Params, ctx,
           timing: dict) -> list[dict]:
    """The chart: each ``sweep`` point's spec on the ``sweep_targets`` over the first stage's plan, measured on the
    first ``sweep_questions`` test questions (its files deleted after); a row per point, its seconds to ``timing``."""
    from ..quant.compress import plan_from

    with timed(timing, "sweep"):
        first = plan_from(groups, params.stages[0]["assign"])
        sweep, charted = [], dataclasses.replace(system, test=system.test[:params.sweep_questions])
        for point in params.sweep:
            plan = plan_from(groups, {t: point["spec"] for t in params.sweep_targets}, first)
            row = compress_and_measure(model, charted, plan, ctx.path("sweep", f"{point['name']}.forge"), hessians,
                                       groups)
            sweep.append({**row, "name": point["name"], "spec": point["spec"]})
        shutil.rmtree(ctx.dir / "sweep", ignore_errors=True)  # the chart's files: measured, not kept
    return sweep


def run(params: Params, ctx) -> PhaseResult:
    """Phase 8 (see the module docstring)."""
    from ..quant.compress import plan_from, tensor_groups

    torch.manual_seed(ctx.seed)
    model, tokenizer = ctx.load_upstream_lm(params.source)
    system = load_system(ctx, tokenizer, params)
    guard = ctx.guard_params
    timing: dict[str, float] = {}
    with timed(timing, "measure_input"):
        reference = system.measure(model)
        reference.pop("texts")
    with timed(timing, "calibration"):
        hessians = calibration(model, tokenizer, params, ctx.seed)
    groups = tensor_groups(model, system.extras())
    stages, kept_plan, kept_path, kept_guard = [], {}, None, None
    guard_of = StageGuard(ctx, model, tokenizer, system, params)
    with timed(timing, "stages"):
        for i, stage in enumerate(params.stages):
            plan = plan_from(groups, stage["assign"], kept_plan)
            path = ctx.path("stages", f"{i + 1}_{stage['name']}.forge")
            row = compress_and_measure(model, system, plan, path, hessians, groups)
            allowed = stage.get("allowed_loss", params.allowed_loss)
            stage_guard = guard_of(path, allowed, stage["name"])
            checks = stage_gate(row, reference, allowed, stage.get("max_ppl_ratio", params.max_ppl_ratio), guard)
            checks += stage_guard.checks()
            row.update(name=stage["name"], assign=stage["assign"], gate=[dataclasses.asdict(c) for c in checks],
                       kept=all(c.passed for c in checks), path=str(path.relative_to(ctx.dir)),
                       guard={"table": stage_guard.table(),
                              "questions": sum(v.n for v in stage_guard.families.values()),
                              "seconds": round(stage_guard.seconds, 2)})
            stages.append(row)
            if row["kept"]:
                kept_plan, kept_path, kept_guard = plan, path, stage_guard
            ctx.log({f"stage/{k}": row[k] for k in ("acc", "ppl", "bits_per_weight")}, step=i + 1)
    if kept_path is None:  # every stage rolled back: the input stored as is (fp16 / ternary codes untouched)
        kept_path = ctx.path("stages", "0_input.forge")
        stages.insert(0, {**compress_and_measure(model, system, {}, kept_path, hessians, groups), "name": "input",
                          "assign": {}, "gate": [], "kept": True, "path": str(kept_path.relative_to(ctx.dir))})
        kept_guard = guard_of(kept_path, params.allowed_loss, "input")
    sweep = _sweep(model, system, groups, hessians, params, ctx, timing)
    final = next(s for s in reversed(stages) if s["kept"])
    report = {"reference": reference, "stages": stages, "sweep": sweep, "groups": groups, "plan": kept_plan,
              "input_bytes": input_bytes(ctx), "lineage": lineage(ctx), "timing": timing,
              "experts": len(system.experts or []), "n_test": len(system.test),
              "families": [s.family for s in system.test], "levels": [s.level for s in system.test]}
    ctx.write_report(report)
    save_final(ctx, kept_path, tokenizer)
    metrics, checks = summarize(report, final, params, guard)
    ctx.result.metrics.update(metrics)
    ctx.result.gate.extend(checks)
    ctx.record_guard(kept_guard)  # the kept artifact's own guard: the phase's guard, not asked again
    return ctx.result


class StageGuard:
    """The guard of each stage's artifact at its allowed loss: the Phase-7 system and the artifact read back from
    disk (with the experts it carries), family by family over the input's whole suite (``forgelib.suite.guard``). The
    system's answers are asked once (the upstream's guard gave most of them) and reused for every stage."""

    def __init__(self, ctx, model, tokenizer, system: System, params: Params):
        from ..suite import known_answers

        self.ctx, self.tokenizer, self.system, self.params = ctx, tokenizer, system, params
        self.input = self.asker(model, system, "phase-7 system")
        self.known = known_answers(ctx.upstream_dir) if ctx.upstream_dir is not None else {}

    def asker(self, lm, system: System, label: str):
        from ..suite import Asker

        return Asker(lm, self.tokenizer, experts=system.experts, centroids=system.centroids,
                     svf_config=system.svf_config, prefixes=self.params.answer_prefixes, label=label)

    def __call__(self, path: Path, allowed_loss: float, name: str):
        from ..modelio import load_compressed
        from ..quant.artifact import load_extras
        from ..suite import guard

        stored = self.system.from_extras(load_extras(path))
        report = guard(self.input, self.asker(load_compressed(path), stored, f"artifact ({name})"),
                       self.ctx.input_suite, self.ctx.guard_params, self.ctx.run.seed, allowed_loss,
                       known=self.known, workers=self.ctx.workers)
        for family, answers in report.answers.items():  # the input's answers so far: reused by the next stage
            self.known[family] = {"prompts": [q.prompt for q in report.questions[family]],
                                  "answers": answers["before"]}
        return report


def save_final(ctx, artifact: Path, tokenizer) -> Path:
    """The kept artifact (and the tokenizer beside it) as ``models/model``, registered (written atomically: a full
    disk leaves no partial folder and is named, see ``base.write_model_folder``)."""
    from ..modelio import load_compressed
    from .base import write_model_folder

    def write(tmp: Path) -> None:
        shutil.copyfile(artifact, tmp / ARTIFACT)
        tokenizer.save_pretrained(tmp)

    final = write_model_folder(ctx.dir / "models" / "model", write, "model 'model'", ctx.session)
    return ctx.register("model", final, model=load_compressed(final / ARTIFACT), metadata={"artifact": ARTIFACT})


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def input_bytes(ctx) -> dict[str, int]:
    """Bytes on disk of what Phase 8 starts from: the model folder and the experts folder."""
    out = {"model": folder_bytes(ctx.upstream_model_path())}
    folder = (ctx.upstream.artifacts or {}).get("experts")
    if folder:
        from .. import paths

        out["experts"] = folder_bytes(paths.resolve(folder))
    return out


def lineage(ctx) -> list[dict[str, Any]]:
    """Every earlier phase's models on disk (bytes) following the upstream chain back to Phase 1."""
    from .. import paths
    from ..results import upstream_chain

    results = [ctx.upstream] if ctx.upstream is not None else []
    up = (ctx.upstream.upstream or {}).get("folder") if ctx.upstream is not None else None
    results += [r for _, r in upstream_chain(up)] if up else []
    rows = []
    for result in results:
        for role, entry in result.models.items():
            path = paths.resolve(entry["path"])
            if path.exists():
                rows.append({"phase": result.phase, "number": result.number, "role": role,
                             "bytes": folder_bytes(path) if path.is_dir() else path.stat().st_size})
    return sorted(rows, key=lambda r: r["number"])


def summarize(report: dict, final: dict, params: Params, guard) -> tuple[dict[str, Any], list[GateCheck]]:
    ref = report["reference"]
    stages = report["stages"]
    specialists = sum(r["bytes"] for r in report["lineage"]
                      if r["phase"] == "cognate" and r["role"] in ("reasoning", "memory", "speed"))
    metrics = {"bits_per_weight": final["bits_per_weight"], "artifact_bytes": final["file_bytes"],
               "weights": final["weights"], "acc_input": ref["acc"], "acc_final": final["acc"],
               "acc_retention": round(final["acc"] / ref["acc"], 4) if ref["acc"] else float("nan"),
               "ppl_input": ref["ppl"], "ppl_final": final["ppl"], "ppl_retention": round(ref["ppl"] / final["ppl"], 4),
               "stages_kept": sum(1 for s in stages if s["kept"] and s["name"] != "input"),
               "stages_rolled_back": sum(1 for s in stages if not s["kept"]),
               "input_bytes": sum(report["input_bytes"].values())}
    if specialists:
        metrics["specialists_bytes"] = specialists
        metrics["compression_vs_specialists"] = round(specialists / final["file_bytes"], 2)
    stage = next((s for s in params.stages if s["name"] == final.get("name")), {})
    checks = [GateCheck(f"final_{c.name}", c.value, c.bound, c.op)
              for c in stage_gate(final, ref, stage.get("allowed_loss", params.allowed_loss),
                                  stage.get("max_ppl_ratio", params.max_ppl_ratio), guard)]
    if params.max_bits_per_weight is not None:
        checks.append(GateCheck("bits_per_weight", final["bits_per_weight"], params.max_bits_per_weight, "<="))
    return metrics, checks

