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
    """The models of a phase folder and of every phase before it, following each ``result.json``'s upstream (one
    session, or a chain across sessions), in phase order: ``{number, phase, role, path, experts}`` (``experts``:
    Phase 7's folder of expert vectors, or None)."""
    from .results import PhaseResult

    rows, seen, folder = [], set(), paths.resolve(folder)
    while folder is not None and (folder / "result.json").is_file() and folder not in seen:
        seen.add(folder)
        result = PhaseResult.load(folder)
        experts = result.artifacts.get("experts")
        rows[:0] = [{"number": result.number, "phase": result.phase, "role": role,
                     "path": paths.resolve(entry["path"]), "experts": paths.resolve(experts) if experts else None}
                    for role, entry in result.models.items() if role not in SKIP_ROLES]
        up = (result.upstream or {}).get("folder")
        folder = paths.resolve(up) if up else None
    return rows


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _system(entry: dict, tokenizer, test, params: ScorecardParams):
    """The measuring System of ``forgelib.phases.compression`` for this model (experts where it has them)."""
    import torch
    import yaml

    from .experts import load_expert
    from .phases import compression
    from .phases.experts import make_check

    p = compression.Params(families=params.families, levels=params.levels, max_new_tokens=params.max_new_tokens,
                           max_len=params.max_len, answer_prefixes=params.answer_prefixes)
    system = compression.System(test, make_check(params.answer_prefixes), tokenizer, p)
    artifact = entry["path"] / compression.ARTIFACT
    if artifact.is_file():
        from .quant.artifact import load_extras

        extras = load_extras(artifact)
        k = sorted({int(n.split(".")[0].removeprefix("expert")) for n in extras if n.startswith("expert")})
        if not k:
            return system
        experts = [{n.split(".", 1)[1]: z for n, z in extras.items() if n.startswith(f"expert{c}.")} for c in k]
        up = _phase7_params(entry)
        return dataclasses.replace(system, experts=experts, centroids=extras["router.centroids"], svf_config=up)
    if entry["experts"] is not None and entry["experts"].is_dir():
        files = sorted(entry["experts"].glob("expert_*.safetensors"), key=lambda f: int(f.stem.split("_")[1]))
        router = torch.load(entry["experts"] / "router.pt", weights_only=True)
        svf = ((yaml.safe_load((entry["experts"].parent / "params.yaml").read_text()) or {}).get("experts") or {})
        return dataclasses.replace(system, experts=[load_expert(f) for f in files], centroids=router["centroids"],
                                   svf_config=svf.get("svf") or {})
    return system


def _phase7_params(entry: dict) -> dict:
    """The SVF settings of the Phase-7 run a Phase-8 artifact came from (its upstream's params.yaml)."""
    import yaml

    from .results import PhaseResult

    result = PhaseResult.load(entry["path"].parent.parent)
    folder = (result.upstream or {}).get("folder")
    if not folder:
        return {}
    params = yaml.safe_load((paths.resolve(folder) / "params.yaml").read_text()) or {}
    return (params.get("experts") or {}).get("svf") or {}


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
