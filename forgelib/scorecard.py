"""The end-to-end scorecard: every phase's model of one session on the same held-out test questions.

Per model: stored values, bytes on disk (the model folder; Phase 7 with its experts; Phase 8 the artifact file),
bits per stored value, perplexity of the test questions' worked solutions, greedy exact-match accuracy overall and
per family (calculator on, no Quiet-STaR thoughts, persona prefixes removed: as Phases 5–8 measure), and
generated tokens per second. Phase 7's model answers two-pass routed with its experts, Phase 8's artifact with
the experts it carries (``forgelib.phases.compression.System``), every other model alone.

    card = scorecard("my-session")          # a list of rows; scorecard_frame(card) for the table
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from . import paths

SKIP_ROLES = {"tokenizer", "taught"}


@dataclasses.dataclass
class ScorecardParams:
    families: list[str] = dataclasses.field(default_factory=lambda: ["arith", "multistep", "algebra", "tool"])
    levels: tuple[int, int] = (1, 3)
    per_level: int = 4
    max_new_tokens: int = 40
    max_len: int = 96
    answer_prefixes: list[str] = dataclasses.field(default_factory=lambda: ["Answer:"])
    seed: int = 0


def session_models(session: str) -> list[dict[str, Any]]:
    """The models of the chain that ends at ``session``'s last completed phase (``chain_models``)."""
    from .phases import PHASES
    from .results import PhaseResult

    for spec in reversed(PHASES):
        folder = paths.outputs_root() / session / spec.dirname
        if (folder / "result.json").is_file() and PhaseResult.load(folder).ok:
            return chain_models(folder)
    raise FileNotFoundError(f"session {session!r} has no completed phase under {paths.outputs_root()}")


def chain_models(folder: str | Path) -> list[dict[str, Any]]:
    """The models of a phase folder and of every phase before it (``forgelib.results.upstream_chain``: one session,
    or a chain across sessions), in phase order: ``{number, phase, role, path, experts}`` (``experts``: Phase 7's
    folder of expert vectors, or None)."""
    from .results import upstream_chain

    rows = []
    for _, result in upstream_chain(folder):
        experts = result.artifacts.get("experts")
        rows[:0] = [{"number": result.number, "phase": result.phase, "role": role,
                     "path": paths.resolve(entry["path"]), "experts": paths.resolve(experts) if experts else None}
                    for role, entry in result.models.items() if role not in SKIP_ROLES]
    return rows


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _system(entry: dict, tokenizer, test, params: ScorecardParams):
    """The measuring System of ``forgelib.phases.compression`` for this model (experts where it has them: Phase 7's
    folder, or those a Phase-8 artifact carries, with the SVF settings of the Phase-7 run it came from)."""
    from .phases import compression
    from .phases.experts import make_check
    from .results import upstream_chain

    p = compression.Params(families=params.families, levels=params.levels, max_new_tokens=params.max_new_tokens,
                           max_len=params.max_len, answer_prefixes=params.answer_prefixes)
    system = compression.System(test, make_check(params.answer_prefixes), tokenizer, p)
    artifact = entry["path"] / compression.ARTIFACT
    if artifact.is_file():
        from .quant.artifact import load_extras

        found = compression.experts_from_extras(load_extras(artifact))
        phase7 = next((r for _, r in upstream_chain(entry["path"].parent.parent) if r.phase == "experts"), None)
        folder = (phase7.artifacts or {}).get("experts") if phase7 is not None else None
        if found is None:
            return system
        svf = compression.phase7_experts(paths.resolve(folder))[2] if folder else {}
        return dataclasses.replace(system, experts=found[0], centroids=found[1], svf_config=svf)
    if entry["experts"] is not None and entry["experts"].is_dir():
        experts, centroids, svf = compression.phase7_experts(entry["experts"])
        return dataclasses.replace(system, experts=experts, centroids=centroids, svf_config=svf)
    return system


def score_model(entry: dict, test, params: ScorecardParams) -> dict[str, Any]:
    """One scorecard row (module docstring)."""
    from transformers import AutoTokenizer

    from .thoughts import load_lm

    model = load_lm(entry["path"])
    tokenizer = AutoTokenizer.from_pretrained(entry["path"])
    system = _system(entry, tokenizer, test, params)
    started = time.perf_counter()
    scored = system.measure(model)
    seconds = time.perf_counter() - started
    texts = scored.get("texts") or []
    tokens = sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts)
    artifact = entry["path"] / "model.forge"
    if artifact.is_file():
        from .quant.artifact import artifact_report

        report = artifact_report(artifact)
        size, values = report["file_bytes"], report["weights"]
    else:
        size = _bytes(entry["path"]) + (_bytes(entry["experts"]) if entry["experts"] else 0)
        values = sum(t.numel() for t in {id(v): v for v in model.state_dict().values()}.values())
    row = {"phase": f"{entry['number']} {entry['phase']}", "model": entry["role"], "values": values, "bytes": size,
           "bits_per_value": round(8 * size / values, 3), "ppl": scored["ppl"], "accuracy": scored["acc"],
           "experts": len(system.experts or []), "tokens_per_s": round(tokens / seconds, 1) if tokens else None}
    for family in params.families:
        idx = [i for i, s in enumerate(test) if s.family == family]
        row[f"acc_{family}"] = round(sum(scored["correct"][i] for i in idx) / len(idx), 4) if idx else None
    return row


def scorecard(session: str | None = None, params: ScorecardParams | None = None,
              folder: str | Path | None = None) -> list[dict[str, Any]]:
    """Every model of ``session``'s chain (or of the chain ending at the phase ``folder``) scored on the same test
    questions."""
    from .data.tasks import generate_levels
    from .phases.base import quiet_library_bars

    quiet_library_bars()
    params = params or ScorecardParams()
    test = generate_levels(params.families, params.levels, params.per_level, "test", params.seed + 9000)
    entries = chain_models(folder) if folder is not None else session_models(session)
    return [score_model(entry, test, params) for entry in entries]


def targets(card: list[dict]) -> dict[str, Any]:
    """The end-to-end targets: the final artifact's size against the Phase-1 fp32 specialists (one, and all three)
    and its accuracy against the best specialist's."""
    specialists = [r for r in card if r["phase"].startswith("1 ") and r["model"] != "trunk"]
    final = next((r for r in reversed(card) if r["phase"].startswith("8 ")), None)
    if not specialists or final is None:
        return {}
    best = max(specialists, key=lambda r: r["accuracy"])
    return {"smaller_than_one_specialist": round(max(r["bytes"] for r in specialists) / final["bytes"], 1),
            "smaller_than_all_specialists": round(sum(r["bytes"] for r in specialists) / final["bytes"], 1),
            "best_specialist": best["model"], "best_specialist_accuracy": best["accuracy"],
            "artifact_accuracy": final["accuracy"], "at_least_best_specialist": final["accuracy"] >= best["accuracy"]}


def latest_session() -> str:
    """The newest session (by its Phase 8 result's finish time) whose Phase 8 completed."""
    from .results import PhaseResult

    found = []
    for file in paths.outputs_root().glob("*/08_compression/result.json"):
        result = PhaseResult.load(file)
        if result.ok:
            found.append((result.finished_at, result.session))
    if not found:
        raise FileNotFoundError(f"no session under {paths.outputs_root()} has a completed Phase 8: run `make run`")
    return max(found)[1]
