"""Upstream verification: where a phase's run lives (``phase_dir``), which earlier run a phase takes as its input
(given, or the newest completed one), and its models resolved to the registry's paths only once their checksums
match (``upstream_model_path``, ``verified_model_path``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from .. import paths
from ..params import cut, load_yaml_file, short
from ..results import RESULT_FILE, PhaseResult
from ..session import check_session_name
from .errors import DamagedResultError, UpstreamError
from .specs import PhaseSpec


def phase_dir(session: str, spec: PhaseSpec) -> Path:
    """``outputs/<session>/<NN_phase>``; a session name that could leave outputs/ is refused."""
    return paths.outputs_root() / check_session_name(session) / spec.dirname


def completed_result(session: str, spec: PhaseSpec) -> PhaseResult | None:
    """The phase's result if it completed (status ok, gate held or failed under ``run.gates: warn``), else None."""
    try:
        result = PhaseResult.load(phase_dir(session, spec))
    except (FileNotFoundError, ValueError):
        return None
    return result if result.accepted else None


def checked_completed_result(session: str, spec: PhaseSpec, registry: Any) -> PhaseResult | None:
    """``completed_result``, but when that is None while ``registry`` records a completed run of the phase in the
    session, DamagedResultError naming the result.json: the phase completed, and its record must be restored, never
    recomputed or moved aside."""
    result_file = phase_dir(session, spec) / RESULT_FILE
    try:
        result = PhaseResult.load(result_file)
        if result.accepted:
            return result
        problem = f"it says status {short(result.status)}" + ("" if result.gate_passed else ", gate failed")
    except FileNotFoundError:
        problem = "the file is missing"
    except ValueError as exc:  # the message names the file and the field
        problem = str(exc).replace(f"{result_file}: ", "")
    runs = [run["id"] for run in registry.list_phase_runs(session, spec.name) if run["status"] == "completed"]
    if not runs:
        return None
    raise DamagedResultError(
        f"phase {spec.dirname} of session {session} completed (registry phase run {runs[-1]}) but its result "
        f"{paths.relative(result_file)} cannot be used: {cut(problem, 200)}; it is neither recomputed nor moved "
        f"aside: restore that file from a backup, or start a new session")


def legacy_suite(upstream: PhaseResult) -> dict:
    """The suite of a chain recorded before phases handed on suites: the Phase-1 trunk's mix at its levels (read
    from that phase's params.yaml), or {} when the chain has no Phase 1."""
    from ..results import upstream_chain
    from ..suite import make_suite

    folder = paths.outputs_root() / upstream.session / f"{upstream.number:02d}_{upstream.phase}"
    for phase_folder, result in upstream_chain(folder):
        if result.number == 1 and (phase_folder / "params.yaml").is_file():
            cognate = (load_yaml_file(phase_folder / "params.yaml") or {}).get("cognate") or {}
            mix = (cognate.get("trunk") or {}).get("mix") or {}
            return make_suite([f for f, w in mix.items() if w > 0], cognate.get("levels") or (1, 2))
    return {}


def upstream_model_path(upstream: PhaseResult, role: str | None, registry: Any) -> Path:
    """Resolve an upstream model to the registry's path, after its checksum matched (see verified_model_path)."""
    models = upstream.models
    if role is None:
        role = next((r for r in ("model", "champion") if r in models), None) or (
            next(iter(models)) if len(models) == 1 else None)
    if role not in models:
        raise UpstreamError(f"upstream phase {upstream.phase!r} has no model {role!r}; it has {sorted(models)}")
    return verified_model_path(upstream, role, registry)


def verified_model_path(result: PhaseResult, role: str, registry: Any) -> Path:
    """The path of ``result``'s model ``role`` exactly as its registry row holds it, once its files match the
    row's checksum. The row must exist and belong to the result's session, phase and role, and result.json
    must name the row's path: a result.json edited to point elsewhere (or at no row) is refused."""
    from ..registry import UnknownRecordError

    entry, source = result.models[role], _result_file(result)
    where = f"upstream model {role!r} of phase {result.phase!r} (session {result.session})"
    if entry.get("registry_id") is None:
        raise UpstreamError(f"{where} has no registry row (registry_id is null in {source}); only registered, "
                            "checksummed models are handed on")
    try:
        row = registry.get_model(entry["registry_id"])
    except (UnknownRecordError, TypeError, ValueError) as exc:
        raise UpstreamError(f"{where}: registry id {entry['registry_id']!r} named in {source} is not in the "
                            f"registry {getattr(registry, 'db_path', '')}") from exc
    owner = (row["session_id"], row["phase_name"], row["model_name"])
    if owner != (result.session, result.phase, role):
        raise UpstreamError(f"{where}: registry row {row['id']} belongs to session {owner[0]!r}, phase "
                            f"{owner[1]!r}, model {owner[2]!r}; {source} points at another run's model")
    if paths.resolve(entry["path"]).resolve() != Path(row["model_path"]).resolve():
        raise UpstreamError(f"{where}: {source} names {entry['path']} but registry row {row['id']} holds "
                            f"{row['model_path']}; only the registered path is loaded")
    try:
        return Path(registry.verify_model(row["id"]))
    except Exception as exc:  # the registry's own errors name the path and both hashes
        raise UpstreamError(f"upstream model {role!r} failed verification: {exc}") from exc


def _result_file(result: PhaseResult) -> str:
    """Where ``result``'s result.json lives (for messages)."""
    return str(paths.outputs_root() / result.session / f"{result.number:02d}_{result.phase}" / "result.json")


def describe_upstream(upstream: PhaseResult | None, how: str = "given") -> str:
    """One line naming the upstream phase run a phase uses: phase, session, folder, and how it was chosen."""
    if upstream is None:
        return "none"
    folder = paths.relative(paths.outputs_root() / upstream.session / f"{upstream.number:02d}_{upstream.phase}")
    return f"{upstream.number:02d}_{upstream.phase} of session {upstream.session} ({folder}); {how}"


def load_upstream(upstream: str | os.PathLike | PhaseResult | None) -> PhaseResult | None:
    """Accept a PhaseResult, a result.json path, or a phase output folder (relative to the repo root)."""
    if upstream is None or isinstance(upstream, PhaseResult):
        return upstream
    path = paths.resolve(upstream)
    try:
        return PhaseResult.load(path)
    except FileNotFoundError as exc:
        raise UpstreamError(f"upstream {upstream!s}: {exc}") from exc
    except ValueError as exc:
        raise UpstreamError(str(exc)) from exc


def latest_completed(specs: Iterable[PhaseSpec], number: int, prefer_session: str | None = None) -> PhaseResult | None:
    """The newest completed run of phase ``number``: in ``prefer_session`` if it has one, else any session's.

    Lets a phase notebook run standalone after an earlier run of the phase before it.
    """
    spec = next((s for s in specs if s.number == number), None)
    if spec is None:
        return None
    if prefer_session and (done := completed_result(prefer_session, spec)) is not None:
        return done
    candidates = sorted(paths.outputs_root().glob(f"*/{spec.dirname}/result.json"),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in candidates:
        done = completed_result(candidate.parent.parent.name, spec)
        if done is not None and not done.gate_failed:  # another session's gate-failed model is never picked
            return done
    return None


def upstream_record(upstream: PhaseResult) -> dict[str, str]:
    """Where an upstream result lives: its session, phase and folder (relative to the repo root)."""
    folder = paths.outputs_root() / upstream.session / f"{upstream.number:02d}_{upstream.phase}"
    return {"session": upstream.session, "phase": upstream.phase, "folder": paths.relative(folder)}


def upstream_line(spec: PhaseSpec, upstream: PhaseResult) -> str:
    """The line that says which earlier run a phase takes as its upstream (for the terminal and logs)."""
    record = upstream_record(upstream)
    return (f"[forge] {spec.dirname}: upstream {upstream.number:02d}_{upstream.phase} taken from session "
            f"{record['session']} ({record['folder']})")


def find_upstream(spec: PhaseSpec, upstream: str | os.PathLike | PhaseResult | None, all_specs: list[PhaseSpec],
                   session: str) -> tuple[PhaseResult | None, str]:
    """(the upstream result, how it was found): the given one, else (phase 2 on) the newest completed run of the
    phase before, which is printed."""
    upstream_result, how = load_upstream(upstream), "given"
    if upstream_result is None and spec.number > 1:
        upstream_result = latest_completed(all_specs, spec.number - 1, session)
        how = "not given: the newest completed run (this session's if it has one, else any session's)"
        if upstream_result is not None:  # picked, not given: say which
            print(upstream_line(spec, upstream_result) + f"; {how}")
    return upstream_result, how
