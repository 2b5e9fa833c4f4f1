"""The end-to-end scorecard: every phase's model of one session on the same held-out test questions, and the chain
gate: the final artifact against the Phase-1 trunk.

Per model: stored values (tied weights once, a packed ternary layer by its weights), bytes on disk (the model
folder without its tokenizer; Phase 7 with its experts; Phase 8 the artifact file), bits per stored value,
perplexity of the test questions' worked solutions, greedy exact-match accuracy overall and per family (calculator
on, no Quiet-STaR thoughts, persona prefixes removed: as every phase's guard asks), and generated tokens per second
of the model alone (``tokens_per_second``: a warm-up, then the fastest of a few timed runs of one batch).
Phase 7's model answers two-pass routed with its experts, Phase 8's artifact with
the experts it carries (``forgelib.phases.compression.System``), every other model alone. The questions: every
family the chain knew (the trunk's suite and what later phases added, each at its levels; ``forgelib.suite``),
``per_family`` of each, the first of the guard's questions.

**The chain gate** (``chain_gate``): the Phase-1 trunk and the final artifact answer the guard's questions over every
family the trunk knew, as many as the rule needs (``forgelib.suite.guard``): each family non-inferior at the
``guard`` section's ``chain_family_margin`` (default: one phase's ``margin``), and all families pooled non-inferior at
its ``chain_margin``; ``at_or_above_trunk`` reports the strict target (every family within one phase's margin). A
failure names the phases
whose own guards measured a loss on the failing families. Written to ``09_scorecard/chain.json``; the pipeline
stops with an error when it fails.

    card = scorecard("my-session")          # a list of rows; scorecard_frame(card) for the table
    verdict = chain_gate("my-session")      # the chain's last gate
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

from . import paths
from .params import load_yaml_file

SKIP_ROLES = {"tokenizer", "taught"}


@dataclasses.dataclass
class ScorecardParams:
    families: list[str] | None = None
    """Families asked (None: every family of the chain's suites)."""
    levels: tuple[int, int] | None = None
    """Levels asked for every family (None: each family at its suite levels)."""
    per_family: int = 48
    """Questions per family for the table (the first of the guard's questions)."""
    max_new_tokens: int = 40
    max_len: int = 96
    answer_prefixes: list[str] = dataclasses.field(default_factory=lambda: ["Answer:"])
    seed: int | None = None
    """Run seed of the guard's questions (None: the session's own, from its phases' params.yaml)."""
    threads: int | None = None
    """torch CPU threads while scoring (None: the session's ``run.threads``; on a loaded 2-core machine two
    threads spin against each other: measured 399 s against 14 s for the same scorecard)."""


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
                     "path": paths.resolve(entry["path"]), "experts": paths.resolve(experts) if experts else None,
                     "gate_failed": result.gate_failed}
                    for role, entry in result.models.items() if role not in SKIP_ROLES]
    return rows


TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                             "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja"})
"""A model folder's tokenizer files: not the model's bytes (the Phase-8 artifact file leaves its tokenizer out too)."""
THROUGHPUT_QUESTIONS = 16
"""Questions decoded together (one batch) to time tokens per second."""
THROUGHPUT_RUNS = (3, 10)
"""Timed runs after the warm-up: at least the first, at most the second, and more than the first only until
``THROUGHPUT_SECONDS`` of decoding were timed; the fastest run counts (the one least disturbed by other work)."""
THROUGHPUT_SECONDS = 0.3


def _bytes(path: Path) -> int:
    """Bytes on disk of a file, or of a folder's files without its tokenizer (``TOKENIZER_FILES``)."""
    if not path.is_dir():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name not in TOKENIZER_FILES)


def stored_values(model) -> int:
    """Values a model stores: each tensor of its state once (a tied LM head is its embedding matrix), a packed
    ternary layer by its weights (out × in), not by the bytes they are packed into."""
    from .quant.bitnet import packed_bitlinear_modules

    packed = {f"{n}.weight_packed": m.out_features * m.in_features for n, m in packed_bitlinear_modules(model).items()}
    seen, total = set(), 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += packed.get(name, tensor.numel())
    return total


def tokens_per_second(lm, tokenizer, test, max_new_tokens: int) -> float | None:
    """Tokens the model generates per second, greedy (calculator on), on the first ``THROUGHPUT_QUESTIONS`` test
    questions in one batch: once to warm up, then timed runs (``THROUGHPUT_RUNS``, ``THROUGHPUT_SECONDS``), the
    fastest counted. None without questions or tokens."""
    from .tools import generate_with_tools

    prompts = [s.prompt for s in test[:THROUGHPUT_QUESTIONS]]
    if not prompts:
        return None
    generate_with_tools(lm, tokenizer, prompts, max_new_tokens, batch_size=len(prompts))  # warm-up
    times, tokens = [], 0
    while len(times) < THROUGHPUT_RUNS[0] or (sum(times) < THROUGHPUT_SECONDS and len(times) < THROUGHPUT_RUNS[1]):
        started = time.perf_counter()
        traces = generate_with_tools(lm, tokenizer, prompts, max_new_tokens, batch_size=len(prompts))
        times.append(time.perf_counter() - started)
        tokens = sum(t.n_generated for t in traces)  # the model's own tokens, not the calculator's results
    return round(tokens / min(times), 1) if tokens and min(times) > 0 else None


def measuring_system(entry: dict, tokenizer, test, params: ScorecardParams):
    """The measuring System of ``forgelib.phases.compression`` for this model (experts where it has them: Phase 7's
    folder, or those a Phase-8 artifact carries, with the SVF settings of the Phase-7 run it came from)."""
    from .phases import compression
    from .baking.library import make_check
    from .results import upstream_chain

    p = compression.Params(max_new_tokens=params.max_new_tokens, max_len=params.max_len,
                           answer_prefixes=params.answer_prefixes)
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
    from .quietstar import base_lm

    row, model, tokenizer = _scored_row(entry, test, params)
    row["tokens_per_s"] = tokens_per_second(base_lm(model), tokenizer, test, params.max_new_tokens)
    return row


def _scored_row(entry: dict, test, params: ScorecardParams) -> tuple[dict[str, Any], Any, Any]:
    """A scorecard row without its speed, the model and its tokenizer."""
    from transformers import AutoTokenizer

    from .modelio import load_lm

    model = load_lm(entry["path"])
    tokenizer = AutoTokenizer.from_pretrained(entry["path"])
    system = measuring_system(entry, tokenizer, test, params)
    scored = system.measure(model)
    artifact = entry["path"] / "model.forge"
    if artifact.is_file():
        from .quant.artifact import artifact_report

        report = artifact_report(artifact)
        size, values = report["file_bytes"], report["weights"]
    else:
        size = _bytes(entry["path"]) + (_bytes(entry["experts"]) if entry["experts"] else 0)
        values = stored_values(model)
    row = {"phase": f"{entry['number']} {entry['phase']}", "model": entry["role"],
           "gate": "gate-failed" if entry.get("gate_failed") else "pass", "values": values, "bytes": size,
           "bits_per_value": round(8 * size / values, 3), "ppl": scored["ppl"], "accuracy": scored["acc"],
           "experts": len(system.experts or []), "tokens_per_s": None}
    row["n"] = len(test)
    for family in sorted({s.family for s in test}):
        idx = [i for i, s in enumerate(test) if s.family == family]
        row[f"acc_{family}"] = round(sum(scored["correct"][i] for i in idx) / len(idx), 4) if idx else None
    return row, model, tokenizer


def scorecard(session: str | None = None, params: ScorecardParams | None = None,
              folder: str | Path | None = None) -> list[dict[str, Any]]:
    """Every model of ``session``'s chain (or of the chain ending at the phase ``folder``) scored on the same test
    questions."""
    from .jobs import run_jobs
    from .phases.base import quiet_library_bars
    from .suite import questions
    from .quietstar import base_lm

    quiet_library_bars()
    params = params or ScorecardParams()
    entries = chain_models(folder) if folder is not None else session_models(session)
    for note in (partial_note(entries), gate_failed_note(entries), thinking_note(entries), recursion_note(entries)):
        if note:
            print(f"[forge] scorecard: {note}", flush=True)
    suite, seed = chain_suite(entries, params)
    test = [q for f, levels in suite.items() for q in questions(f, levels, params.per_family, seed)]
    run = _stored_run(entries)
    threads = int(params.threads or run.get("threads") or 1)
    with _threads(threads):
        # the models answer side by side (run.workers); their speeds are measured one at a time, alone
        scored = run_jobs([functools.partial(_scored_row, entry, test, params) for entry in entries],
                          _stored_workers(run, threads))
        for row, model, tokenizer in scored:
            row["tokens_per_s"] = tokens_per_second(base_lm(model), tokenizer, test, params.max_new_tokens)
        return [row for row, _, _ in scored]


@contextlib.contextmanager
def _threads(n: int):
    """torch's CPU thread count set to ``n`` for the block, restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _stored_run(entries: list[dict]) -> dict:
    """The ``run`` section the chain's last phase ran with (its params.yaml), or {}."""
    stored = load_yaml_file(_phase_folder(entries[-1]) / "params.yaml") or {}
    return stored.get("run") or {}


def _stored_workers(run: dict, threads: int) -> int:
    """The chain's ``run.workers`` resolved for jobs of ``threads`` threads on the CPU, where ``load_lm`` loads the
    scored models (``forgelib.jobs``)."""
    from .jobs import resolve_workers

    return resolve_workers(int(run.get("workers") or 0), "cpu", threads)


def _phase_folder(entry: dict) -> Path:
    return entry["path"].parent.parent


def chain_settings(entries: list[dict]) -> tuple[dict, dict, Any]:
    """(the trunk's suite, the final model's suite, the guard section and run seed of the chain's last phase)."""

    from .phases.base import legacy_suite
    from .results import PhaseResult
    from .suite import GuardParams, suite_of

    first, last = PhaseResult.load(_phase_folder(entries[0])), PhaseResult.load(_phase_folder(entries[-1]))
    trunk = suite_of(first) or legacy_suite(last)
    final = suite_of(last) or trunk
    stored = load_yaml_file(_phase_folder(entries[-1]) / "params.yaml") or {}
    guard = GuardParams(**(stored.get("guard") or {}))
    return trunk, final, (guard, int((stored.get("run") or {}).get("seed", 0)))


def chain_suite(entries: list[dict], params: ScorecardParams) -> tuple[dict, int]:
    """The families and levels the scorecard asks (module docstring) and the seed of the guard's questions."""
    from .suite import suite_union

    trunk, final, (guard, seed) = chain_settings(entries)
    suite = suite_union(trunk, final)
    if params.families is not None:
        suite = {f: suite.get(f, (1, 1)) for f in params.families}
    if params.levels is not None:
        suite = {f: tuple(params.levels) for f in suite}
    return suite, (params.seed if params.seed is not None else seed) + guard.seed


def chain_gate(session: str | None = None, folder: str | Path | None = None, write: bool = True) -> dict[str, Any]:
    """The chain's last gate (module docstring): the trunk against the final model of the chain, per family over
    the trunk's suite and pooled; ``passed``, the table, and for a failure the phases that lost each family.
    Written to ``outputs/<session>/09_scorecard/chain.json`` when ``write`` and a session is given."""
    from transformers import AutoTokenizer

    from .phases.base import quiet_library_bars
    from .results import write_json_atomic
    from .stats import noninferior, noninferior_over
    from .suite import Asker, guard

    quiet_library_bars()
    entries = chain_models(folder) if folder is not None else session_models(session)
    trunk_entry = next((e for e in entries if e["number"] == 1 and e["role"] == "trunk"), None)
    if trunk_entry is None:
        raise ValueError(f"the chain ending at {paths.relative(_phase_folder(entries[-1]))} has no Phase-1 trunk to "
                         "hold its final model to (the chain gate needs the chain from Phase 1)")
    final_entry = entries[-1]
    trunk_suite, _, (params, seed) = chain_settings(entries)
    askers = []
    for entry in (trunk_entry, final_entry):
        from .modelio import load_lm

        tokenizer = AutoTokenizer.from_pretrained(entry["path"])
        system = measuring_system(entry, tokenizer, [], ScorecardParams())
        askers.append(Asker(load_lm(entry["path"]), tokenizer, experts=system.experts, centroids=system.centroids,
                            svf_config=system.svf_config, label=f"{entry['number']} {entry['phase']} {entry['role']}"))
    family_margin = params.chain_family_margin or params.margin
    run = _stored_run(entries)
    threads = int(run.get("threads") or 1)
    with _threads(threads):
        report = guard(askers[0], askers[1], trunk_suite, params, seed, margin=family_margin,
                       workers=_stored_workers(run, threads))
    pooled = noninferior_over("all", {f: (a["before"], a["after"]) for f, a in report.answers.items()},
                              params.chain_margin, params.confidence, params.power)
    failing = [f for f, v in report.families.items() if not v.passed]
    strict = {f: noninferior(f, a["before"], a["after"], params.margin, params.confidence, params.power).passed
              for f, a in report.answers.items()}
    verdict = {"passed": report.passed and pooled.passed, "trunk": askers[0].label, "final": askers[1].label,
               "margin": family_margin, "chain_margin": params.chain_margin, "pooled": pooled.as_row(),
               "at_or_above_trunk": all(strict.values()) and pooled.passed,
               "within_one_phase_margin": strict,
               "table": report.table()[:-1] + [dict(family="all (family mean)", levels="", n=pooled.n,
                                                    before=pooled.before, after=pooled.after, diff=pooled.diff,
                                                    lower_bound=pooled.lower, bound=-pooled.margin,
                                                    needed=pooled.needed,
                                                    verdict="pass" if pooled.passed else "FAIL", note=pooled.note)],
               "lost_by": {f: phases_that_lost(entries, f) for f in (failing or
                                                                    [f for f,
                                                                     v in report.families.items() if v.diff < 0])},
               "answers": report.answers, "gate_failed": gate_failed_phases(entries),
               "thinking": thinking_note(entries), "recursion": recursion_note(entries)}
    if write and session is not None:
        write_json_atomic(paths.outputs_root() / session / "09_scorecard" / "chain.json", verdict)
    return verdict


def phases_that_lost(entries: list[dict], family: str) -> list[dict[str, Any]]:
    """The phases of the chain whose guard measured a loss on ``family``: (phase, before, after, diff), worst
    first."""
    from .suite import read_guard

    out, seen = [], set()
    for entry in entries:
        folder = _phase_folder(entry)
        if folder in seen:
            continue
        seen.add(folder)
        data = read_guard(folder)
        row = ((data or {}).get("families") or {}).get(family)
        if row and row["diff"] < 0:
            out.append({"phase": f"{entry['number']} {entry['phase']}", "before": row["before"], "after": row["after"],
                        "diff": row["diff"]})
    return sorted(out, key=lambda r: r["diff"])


def chain_message(verdict: dict) -> str:
    """One paragraph: which families the chain lost, by how much, and in which phases."""
    rows = [r for r in verdict["table"] if r["verdict"] != "pass"]
    parts = []
    for r in rows:
        who = verdict["lost_by"].get(r["family"], [])
        where = ", ".join(f"{w['phase']} {w['before']:.2f}→{w['after']:.2f}" for w in who) or "no single phase"
        parts.append(f"{r['family']}: {r['before']:.3f} → {r['after']:.3f} (lower bound {r['lower_bound']:.3f}, "
                     f"needs > {r['bound']:g}{'; ' + r['note'] if r['note'] else ''}; lost in: {where})")
    warned = verdict.get("gate_failed") or []
    return (f"the chain gate failed: {verdict['final']} does not answer as well as {verdict['trunk']}: "
            + "; ".join(parts) + (f"; gate-failed (not enforced) phases in the chain: {', '.join(warned)}"
                                  if warned else ""))


def gate_failed_phases(entries: list[dict]) -> list[str]:
    """The phases of the chain whose gate failed under ``run.gates: warn`` (``"5 curriculum"``)."""
    return sorted({f"{e['number']} {e['phase']}" for e in entries if e.get("gate_failed")})


def gate_failed_note(entries: list[dict]) -> str:
    """A warning naming the chain's gate-failed phases, or ''."""
    warned = gate_failed_phases(entries)
    return (f"GATE FAILED, not enforced (run.gates: warn), in phase(s) {', '.join(warned)}: their models are "
            "marked gate-failed (column 'gate')") if warned else ""


def thinking_note(entries: list[dict]) -> str:
    """Whether the chain's final model thinks, and why: Phase 3's decision as its report states it (the measured
    reason and the rule that decided, ``forgelib.phases.quietstar.thinking_decision``), or '' for a chain without
    Phase 3. The scorecard and the chain gate ask every model without thoughts."""
    from .results import PhaseResult, load_report

    phase3 = next((e for e in entries if e["number"] == 3), None)
    if phase3 is None:
        return ""
    report = load_report(PhaseResult.load(_phase_folder(phase3)))
    decision = report.get("decision")
    if decision is None:
        return ("thinking: this chain's Phase 3 predates its thinking decision (its model thinks when loaded); the "
                "scorecard asks every model without thoughts")
    if decision["thinking"]:
        return (f"thinking: Phase 3 handed its model on thinking ({decision['reason']}; {decision['rule']}); this "
                "scorecard asks every model without thoughts (the playground switches them on)")
    weights = report.get("weights") or {}
    whose = {"trained": "; it kept its trained weights", "input": "; with the Phase-2 model's weights"}.get(
        weights.get("weights"), "")
    if whose:
        whose += f" ({weights['reason'] or weights['rule']})"
    return (f"thinking: the final model does not think -- Phase 3 handed its model on without thoughts "
            f"({decision['reason']}; {decision['rule']}){whose}; `forge bench quietstar` measures thoughts against "
            f"pause tokens and continued training at equal compute")


def recursion_note(entries: list[dict]) -> str:
    """Whether the chain's models recurse, and why: Phase 1's cycles decision for each model it trained with
    recursion (the measured reason and the rule, ``forgelib.phases.cognate.cycles_decision``) and the cycles Phase 2's
    champion runs; '' for a chain without Phase 1 or without a model trained with recursion."""
    from .results import PhaseResult, load_report

    phase1 = next((e for e in entries if e["number"] == 1), None)
    result = PhaseResult.load(_phase_folder(phase1)) if phase1 is not None else None
    if result is None or "report" not in result.artifacts:
        return ""
    report = load_report(result)
    decisions = report.get("cycles_decision")
    if decisions is None:
        return ("recursion: this chain's Phase 1 predates its cycles decision (its models run the cycles they were "
                "trained with)") if report.get("cycles_curve") else ""
    if not decisions:
        return ""
    parts = [f"Phase 1 handed {name} on at {d['cycles']} cycle{'s' if d['cycles'] != 1 else ''}, trained at "
             f"{d['trained_cycles']} ({d['reason']}; {d['rule']})" for name, d in decisions.items()]
    phase2 = next((e for e in entries if e["number"] == 2), None)
    result = PhaseResult.load(_phase_folder(phase2)) if phase2 is not None else None
    if result is not None and "report" in result.artifacts:
        runtime = (load_report(result).get("runtime") or {}).get("champion_runtime")
        if runtime and "n_cycles" in runtime:
            n = runtime["n_cycles"]
            parts.append(f"Phase 2's champion runs {n} cycle{'s' if n != 1 else ''}")
    return ("recursion: " + "; ".join(parts) + "; `forge bench recursion` measures recursion against equal "
            "parameters and equal compute")


def partial_note(entries: list[dict]) -> str:
    """'' for a chain that reaches the last phase; else a line saying the scorecard covers only its completed part."""
    from .phases import PHASES

    if not entries or entries[-1]["number"] >= PHASES[-1].number:
        return ""
    last = entries[-1]
    return (f"partial: the chain ends at phase {last['number']} ({last['phase']}), the last one completed; phases "
            f"{last['number'] + 1}-{PHASES[-1].number} are not in this scorecard")


def targets(card: list[dict]) -> dict[str, Any]:
    """The end-to-end targets: the final artifact's size against the Phase-1 fp32 specialists (one, and all three)
    and its accuracy against the best specialist's. A chain without a Phase-8 artifact or without Phase-1
    specialists gets ``{"missing": what is missing}`` instead."""
    specialists = [r for r in card if r["phase"].startswith("1 ") and r["model"] != "trunk"]
    final = next((r for r in reversed(card) if r["phase"].startswith("8 ")), None)
    if final is None:
        return {"missing": "no Phase-8 artifact in this chain: the targets compare the final artifact with the "
                           "Phase-1 specialists (score a session whose Phase 8 completed)"}
    if not specialists:
        first = card[0]["phase"] if card else "nothing"
        return {"missing": f"no Phase-1 specialists in this chain (it starts at {first}): the targets compare the "
                           "final artifact with them (score a chain that starts at Phase 1)"}
    best = max(specialists, key=lambda r: r["accuracy"])
    return {"smaller_than_one_specialist": round(max(r["bytes"] for r in specialists) / final["bytes"], 1),
            "smaller_than_all_specialists": round(sum(r["bytes"] for r in specialists) / final["bytes"], 1),
            "best_specialist": best["model"], "best_specialist_accuracy": best["accuracy"],
            "artifact_accuracy": final["accuracy"], "at_least_best_specialist": final["accuracy"] >= best["accuracy"]}


def latest_session() -> str:
    """The newest session (by its last phase's finish time) whose Phase 8 completed; when none did, the newest
    session with any completed phase (its scorecard is partial: the chain up to that phase, said so when scored)."""
    from .phases import PHASES

    for specs in (PHASES[-1:], PHASES):
        found = _completed_sessions(specs)
        if found:
            session = max(found)[1]
            if specs is PHASES:
                print(f"[forge] scorecard: no session has a completed {PHASES[-1].dirname}; taking the newest "
                      f"session with a completed phase, {session} (a partial scorecard)", flush=True)
            return session
    raise FileNotFoundError(f"no session under {paths.outputs_root()} has a completed phase (every one failed or "
                            "none ran): fix the first phase's gate (`forge run --set ...`) or explore with "
                            "`forge run --gates warn`")


def _completed_sessions(specs: list) -> list[tuple[str, str]]:
    """(finish time, session) of every completed run of ``specs``' phases."""
    from .results import PhaseResult

    found = []
    for spec in specs:
        for file in paths.outputs_root().glob(f"*/{spec.dirname}/result.json"):
            try:
                result = PhaseResult.load(file)
            except ValueError:
                continue
            if result.accepted:
                found.append((result.finished_at, result.session))
    return found
