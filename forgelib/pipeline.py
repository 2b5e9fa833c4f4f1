"""The pipeline: run the phase notebooks in order with papermill, validate every handoff, resume.

Each phase runs as its own notebook (the executed copy under ``outputs/<session>/<NN_phase>/`` is the
immutable record of the run). After a phase, the handoff is validated: result.json says ok, the gate held,
every model loads and matches its registry checksum. A failed phase stops the pipeline; earlier phases'
outputs are never touched, and ``resume`` continues from the first phase not completed (with the session's stored
parameters: new ones are refused, see :func:`check_resume_params`). ``rerun_from`` ("S:PHASE") starts a new session
that runs PHASE onwards with new parameters, taking session S's completed phase before PHASE as its upstream.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from . import paths
from .params import check_stored_size, cut, flatten, merge_overrides, read_yaml, stored_size, to_dict, yaml_value
from .phases import PHASES, PhaseSpec, UnknownPhaseError, get_spec, select
from .phases.base import (DamagedResultError, GateFailedError, as_phase_error, check_device, checked_completed_result,
                          completed_result, latest_completed, load_guard_params, load_phase_params, new_session_id,
                          phase_dir, session_exists, upstream_line, upstream_record, verified_model_path)
from .registry import CorruptRegistryError
from .results import PhaseResult, write_json_atomic
from .session import HELD_ENV, SessionLock, check_session_name

DEFAULT_PARAMS = "parameters/smoke.yaml"


class PipelineError(RuntimeError):
    """The pipeline stopped; the message names the phase and the reason."""


class UnknownSessionError(PipelineError, KeyError):
    """A resume asked for a session the registry does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class RefusedError(PipelineError):
    """A request refused before anything ran or was written (``forge run`` exits with status 2): new parameters
    for a resume, or a ``--from`` that names no usable upstream."""


@dataclasses.dataclass
class PhaseOutcome:
    """One phase's line in the pipeline report."""

    spec: PhaseSpec
    status: str  # completed | skipped (already completed) | failed
    result: PhaseResult | None
    notebook: Path | None
    seconds: float


def validate_params_file(params_file: str | os.PathLike, specs: list[PhaseSpec], overrides: dict | None,
                         all_specs: list[PhaseSpec]) -> None:
    """Load every section of the parameter file with the overrides (``run``, ``guard`` and every phase's, the
    phases the run does not select too: a stored session config holds them all) and check that this machine has
    the device, before anything runs or is written: a typo or an impossible value fails first (a ParameterError
    naming the file and the key) and costs nothing."""
    run = None
    for spec in [*all_specs, *(s for s in specs if s not in all_specs)]:
        run, _ = load_phase_params(spec, params_file, overrides, all_specs)
    load_guard_params(params_file, overrides, all_specs)
    if run is not None:
        check_device(run, params_file)


def validate_handoff(result: PhaseResult, registry: Any, load_models: bool = True) -> dict:
    """Check a finished phase before the next one may start; returns the validation record.

    Checks: status ok, gate passed (or failed under ``run.gates: warn``: ``gate_failed`` records it), at least one
    model, each model's checksum matches the registry and (``load_models``) the model folder loads as a causal LM.
    """
    checks: dict[str, Any] = {"status_ok": result.ok, "gate_passed": result.gate_passed,
                              "gate_failed": result.gate_failed, "has_models": bool(result.models), "models": {}}
    for role in result.models:
        checks["models"][role] = _check_model(result, role, registry, load_models)
    checks["ok"] = bool(checks["status_ok"] and (result.gate_passed or result.gate_failed) and checks["has_models"]
                        and all(m["ok"] for m in checks["models"].values()))
    return checks


def _check_model(result: PhaseResult, role: str, registry: Any, load_models: bool) -> dict:
    out: dict[str, Any] = {"path": result.models[role].get("path"), "ok": False}
    try:
        path = verified_model_path(result, role, registry)
        out["checksum"] = "match"
        if load_models and Path(path).is_dir() and (Path(path) / "config.json").is_file():
            from .modelio import load_causal_lm
            from .phases.base import quiet_library_bars

            quiet_library_bars()
            load_causal_lm(path)
            out["loads"] = True
        elif load_models and Path(path).is_dir() and (Path(path) / "model.forge").is_file():
            from .modelio import load_compressed

            load_compressed(Path(path) / "model.forge")
            out["loads"] = True
        out["ok"] = True
    except CorruptRegistryError:  # not the model's fault, and nothing is to be written to that file
        raise
    except Exception as exc:  # recorded in the handoff row and raised by the caller
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def _set_aside(folder: Path) -> Path | None:
    """Move an incomplete phase folder aside (kept as a record, never deleted)."""
    if not folder.exists():
        return None
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    target = folder.with_name(f"{folder.name}.incomplete-{stamp}")
    shutil.move(str(folder), target)
    return target


def _execute_notebook(spec: PhaseSpec, session: str, params_file: str, overrides: dict | None,
                      upstream: str | None, log: Callable[[str], None] = print, kernel: Any = None) -> Path:
    """Run the phase notebook through papermill (in ``kernel`` when one was started ahead); meanwhile one progress
    line at a time goes to ``log``."""
    from .notebooks import execute
    from .progress import ProgressRelay

    out_dir = phase_dir(session, spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / Path(spec.notebook).name
    parameters = {"params_file": str(params_file), "overrides": overrides or {}, "session": session,
                  "upstream": upstream}
    try:
        with ProgressRelay(out_dir / "metrics.jsonl", spec.dirname, log):
            execute(paths.resolve(spec.notebook), output, parameters, kernel=kernel)
    except Exception as exc:  # papermill raises PapermillExecutionError with the cell's traceback
        raise PipelineError(_phase_failure_message(spec, out_dir, output, exc)) from exc
    return output


def _run_in_process(spec: PhaseSpec, session: str, params_file: str, overrides: dict | None, upstream: str | None,
                    all_specs: list[PhaseSpec]) -> None:
    """The phase's two notebook calls (``open_phase``, ``run_phase``) in this process: a machine without Jupyter,
    one Python start for the whole chain. The session lock is this process's (the pipeline holds it)."""
    from .phases import open_phase, run_phase

    try:
        run_phase(open_phase(spec, params_file, overrides, session, upstream, all_specs))
    except GateFailedError as exc:  # its message names the phase, the failed checks and the ways on
        raise PipelineError(str(exc)) from exc
    except Exception as exc:
        raise PipelineError(f"phase {spec.dirname} failed: {type(exc).__name__}: {exc} (see "
                            f"{paths.relative(phase_dir(session, spec))})") from exc


SCORECARD_NOTEBOOK, SCORECARD_AFTER = "notebooks/09_scorecard.ipynb", "compression"


def run_scorecard(session: str, log: Callable[[str], None] = print, kernel: Any = None,
                  notebook: bool = True) -> Path:
    """The scorecard for ``session`` (every phase's model on the same test questions) in
    ``outputs/<session>/09_scorecard/``: the pipeline's last step once Phase 8 completed. ``notebook``: the
    executed scorecard notebook (in ``kernel`` when one was started ahead); else (in-process runs) ``scorecard.json``
    with one row per model and the end-to-end targets."""
    import time

    out_dir = paths.outputs_root() / session / "09_scorecard"
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if notebook:
        from .notebooks import execute

        output = out_dir / Path(SCORECARD_NOTEBOOK).name
        log(f"[forge] 09_scorecard: running {SCORECARD_NOTEBOOK} (session {session})")
        try:
            execute(paths.resolve(SCORECARD_NOTEBOOK), output, {"session": session}, kernel=kernel)
        except Exception as exc:
            raise PipelineError(f"the scorecard failed: {type(exc).__name__}: "
                                f"{getattr(exc, 'evalue', None) or exc}; see {output}") from exc
    else:
        from .scorecard import chain_gate, scorecard, targets

        card = scorecard(session)
        output = write_json_atomic(out_dir / "scorecard.json",
                                   {"session": session, "models": card, "targets": targets(card)})
        chain_gate(session)
    warned = check_chain(out_dir).get("gate_failed") or []
    log(f"[forge] 09_scorecard: completed in {time.perf_counter() - started:.1f}s — {paths.relative(output)}; "
        "the chain gate held" + (f"; gate-failed (not enforced) phases in the chain: {', '.join(warned)}"
                                 if warned else ""))
    return output


def check_chain(out_dir: Path) -> dict:
    """The chain gate's verdict written by the scorecard (``chain.json``); PipelineError naming the families lost
    and the phases that lost them when it failed, or when the scorecard wrote none."""
    import json

    from .scorecard import chain_message

    path = out_dir / "chain.json"
    if not path.is_file():
        raise PipelineError(f"the scorecard wrote no chain gate verdict ({paths.relative(path)})")
    verdict = json.loads(path.read_text())
    if not verdict.get("passed"):
        raise PipelineError(chain_message(verdict) + f" (see {paths.relative(path)})")
    return verdict


def _phase_failure_message(spec: PhaseSpec, out_dir: Path, notebook: Path, exc: Exception) -> str:
    reason = f"{type(exc).__name__}: {getattr(exc, 'evalue', None) or exc}"
    try:
        result = PhaseResult.load(out_dir)
        reason = result.error or reason
    except (FileNotFoundError, ValueError):
        pass
    gate = f"{GateFailedError.__name__}: "
    if reason.startswith(gate):  # the gate's own paragraph names the phase, the failed checks and the ways on
        return f"{reason.removeprefix(gate)} (the executed notebook is kept at {paths.relative(notebook)})"
    return f"phase {spec.dirname} failed: {reason} (the executed notebook is kept at {paths.relative(notebook)})"


class Pipeline:
    """Runs phases of one session. Use :func:`run_pipeline` or :class:`PipelineOrchestrator`."""

    def __init__(self, params_file: str | os.PathLike = DEFAULT_PARAMS, phases: str | list | None = "all",
                 session: str | None = None, overrides: dict | None = None, specs: list[PhaseSpec] | None = None,
                 log: Callable[[str], None] = print, notebooks: bool = True, upstream_session: str | None = None):
        from .registry import ModelRegistry

        self.all_specs = list(specs) if specs is not None else list(PHASES)
        self.params_file = str(params_file)
        self.overrides = overrides or {}
        self.phase_selection = phases
        self.specs = select(phases, self.all_specs)
        self.session = check_session_name(session) if session else new_session_id()
        self.log = log
        self.notebooks = notebooks
        """False: each phase's calls run in this process (no papermill, no executed notebooks; the scorecard is a
        JSON file)."""
        self._warm: Any = None  # the next notebook's kernel, started as the current one begins
        self.upstream_session = upstream_session
        """``rerun_from``'s session S: the first selected phase's upstream is S's completed phase before it."""
        # Every parameter and what the session's registry row will hold, checked before anything is created (no
        # session folder, lock, registry file or row): a ParameterError naming the file and the key.
        validate_params_file(self.params_file, self.specs, self.overrides, self.all_specs)
        self.config = self._session_config()
        check_stored_size(self.config, f"session {self.session}'s configuration (parameter file, --set values, "
                                       "phases)")
        self.registry = ModelRegistry(paths.registry_path())

    @classmethod
    def resume(cls, session: str, specs: list[PhaseSpec] | None = None, log: Callable[[str], None] = print,
               notebooks: bool = True, params_file: str | os.PathLike | None = None,
               overrides: dict | None = None) -> "Pipeline":
        """A pipeline continuing ``session`` with the parameters it was started with. ``params_file`` and
        ``overrides``, when given, must not change any value the session's phases run with (``RefusedError``
        naming ``rerun_from`` otherwise): a resume never runs with other parameters than it started with."""
        check_session_name(session)
        config = _session_config(session)
        if config is None:
            raise UnknownSessionError(f"unknown session {session!r}; `forge registry sessions` lists the known ones")
        all_specs = list(specs) if specs is not None else list(PHASES)
        if params_file is not None or overrides:
            check_resume_params(session, config, params_file, overrides, all_specs)
        return cls(config.get("params_file", DEFAULT_PARAMS), config.get("phases", "all"), session,
                   config.get("overrides"), specs, log, notebooks, upstream_session=(config.get("from") or {}).get(
                       "session"))

    @classmethod
    def rerun_from(cls, source: str, phase: str | int, params_file: str | os.PathLike | None = None,
                   overrides: dict | None = None, phases: str | list | None = "all", session: str | None = None,
                   specs: list[PhaseSpec] | None = None, log: Callable[[str], None] = print,
                   notebooks: bool = True) -> "Pipeline":
        """A new session that runs ``phase`` onwards (``phases`` may limit them; it must begin at ``phase``) with
        session ``source``'s parameters changed by ``params_file`` (replaces its parameter file) and
        ``overrides`` (merged over its --set values), taking ``source``'s completed phase before ``phase`` as
        the upstream. ``source`` is only read. ``session``: the new session's name (default
        ``<source>-from<N>-<UTC time>``); an existing session is refused. Every refusal is a ``RefusedError``,
        raised before anything is written."""
        all_specs = list(specs) if specs is not None else list(PHASES)
        check_session_name(source)
        try:
            start = get_spec(int(phase) if str(phase).isdigit() else phase, all_specs)
        except UnknownPhaseError as exc:
            raise RefusedError(f"--from {source}:{phase}: {exc}") from None
        earlier = [s for s in all_specs if s.number < start.number]
        if not earlier:
            raise RefusedError(f"--from {source}:{phase}: {start.dirname} is the first phase, so nothing of session "
                               f"{source} would be reused; that is a new run: forge run [--params P] [--set k=v] "
                               "[--session NEW]")
        config = _session_config(source)
        if config is None and not (paths.outputs_root() / source).is_dir():
            raise RefusedError(f"--from {source}:{phase}: unknown session {source!r}; `forge registry sessions` "
                               "lists the known ones")
        prev = earlier[-1]
        if _source_completed(source, prev, f"--from {source}:{phase}") is None:
            done = [s.dirname for s in all_specs if completed_result(source, s) is not None]
            raise RefusedError(f"--from {source}:{phase}: session {source} has no completed {prev.dirname} "
                               f"({paths.relative(phase_dir(source, prev))}) to take as the upstream of "
                               f"{start.dirname}; its completed phases: {done or 'none'} (--from {source}:N "
                               "needs phase N-1 completed in that session)")
        chosen = _from_selection(source, start, phases, all_specs)
        session = _new_session_name(source, start, session)
        config = config or {}
        stored_overrides = config.get("overrides") or {}
        params_file = str(params_file) if params_file is not None else config.get("params_file", DEFAULT_PARAMS)
        overrides = {**stored_overrides, **(overrides or {})}
        pipe = cls(params_file, [s.name for s in chosen], session, overrides, specs, log, notebooks,
                   upstream_session=source)  # validates every parameter first
        log(f"[forge] session {session}: {', '.join(s.dirname for s in chosen)} with {params_file}"
            + (f" + {_set_text(overrides)}" if overrides else "") + f", after {prev.dirname} of session {source}")
        return pipe

    def run(self) -> list[PhaseOutcome]:
        """Run every selected phase not yet completed; stop at the first failure (PipelineError).

        The session's lock is held throughout (``SessionInUseError`` at once when another process runs it);
        the phase kernels started here inherit it through ``HELD_ENV``.
        """
        lock = SessionLock(self.session)
        claim, os.environ[HELD_ENV] = os.environ.get(HELD_ENV), f"{self.session}:{os.getpid()}"
        try:
            return self._run_locked()
        finally:
            if self._warm is not None:  # started for a notebook that did not come
                self._warm.shutdown()
                self._warm = None
            if claim is None:
                os.environ.pop(HELD_ENV, None)
            else:
                os.environ[HELD_ENV] = claim
            lock.release()

    def _run_locked(self) -> list[PhaseOutcome]:
        paths.contain_tool_caches()
        self._check_records()
        self._open_session()
        outcomes: list[PhaseOutcome] = []
        upstream = self._initial_upstream()
        for i, spec in enumerate(self.specs):
            try:
                outcome = self._run_one(spec, upstream)
            except OSError as exc:  # a full disk or a file in the way: named, and the session ends failed
                self.registry.update_session(self.session, status="failed", current_phase=spec.name)
                error = as_phase_error(exc, phase_dir(self.session, spec))
                if error is exc:
                    raise
                raise error from exc
            outcomes.append(outcome)
            upstream = outcome.result
            self.registry.update_session(self.session, progress=(i + 1) / len(self.specs))
        self.registry.update_session(self.session, status="completed")
        warned = [o.spec.dirname for o in outcomes if o.result is not None and o.result.gate_failed]
        self.log(f"[forge] session {self.session}: all {len(self.specs)} phase(s) completed"
                 + (f"; GATE FAILED, not enforced (run.gates: warn), in {', '.join(warned)}: their models are "
                    "registered as gate-failed" if warned else ""))
        if self.specs and self.specs[-1].name == SCORECARD_AFTER and paths.resolve(SCORECARD_NOTEBOOK).is_file():
            run_scorecard(self.session, self.log, kernel=self._next_kernel(ahead=False), notebook=self.notebooks)
        return outcomes

    def _next_kernel(self, ahead: bool = True) -> Any:
        """This notebook's kernel — the one started while the previous phase ran, else None (papermill starts one)
        — and, with ``ahead``, the next notebook's, started now: its start and imports (~4 s) overlap this phase on
        the core it leaves idle."""
        from .notebooks import WarmKernel

        current, self._warm = self._warm, None
        if ahead:
            try:
                self._warm = WarmKernel()
            except Exception:  # no kernel ahead: the next notebook starts its own, as without this
                self._warm = None
        return current

    def _check_records(self) -> None:
        """Before anything is written: the session's registry rows decode (a row changed outside forge is named),
        and every phase the registry records as completed here (the selected ones and the one before them) still has
        its result.json; one that cannot be read is a RefusedError naming it (never recomputed nor moved aside)."""
        self.registry.list_models(session_id=self.session)
        self.registry.list_handoffs(self.session)
        earlier = [s for s in self.all_specs if self.specs and s.number < self.specs[0].number]
        for spec in earlier[-1:] + self.specs:
            try:
                checked_completed_result(self.session, spec, self.registry)
            except DamagedResultError as exc:
                raise RefusedError(str(exc)) from None

    def _session_config(self) -> dict:
        """What the session's registry row records: parameter file, --set values, phases, ``from``."""
        config = {"params_file": self.params_file, "overrides": self.overrides,
                  "phases": self.phase_selection if isinstance(self.phase_selection, (str, type(None)))
                  else list(self.phase_selection)}
        if self.upstream_session:
            config["from"] = {"session": self.upstream_session, "phase": self.specs[0].name if self.specs else None}
        return config

    def _open_session(self) -> None:
        if not session_exists(self.registry, self.session):
            self.registry.create_session(self.session, self.config)
        for run in self.registry.interrupt_stale_runs(self.session):  # safe: this process holds the lock
            self.log(f"[forge] phase run {run['id']} ({run['phase_name']}) of session {self.session} was left "
                     "'running' by a process that ended: marked interrupted, its models retired")
        self.registry.update_session(self.session, status="running")

    def _initial_upstream(self) -> PhaseResult | None:
        """The completed phase just before the first selected one (for runs like ``--phases 2-3``): this
        session's, else the newest of any session's (named in the log and in the phase's result.json)."""
        earlier = [s for s in self.all_specs if s.number < self.specs[0].number] if self.specs else []
        if not earlier:
            return None
        if self.upstream_session:  # rerun_from: session S's phase, and no other
            done = completed_result(self.upstream_session, earlier[-1])
            if done is None:
                self.registry.update_session(self.session, status="failed", current_phase=self.specs[0].name)
                raise PipelineError(f"session {self.session} runs {self.specs[0].dirname} after "
                                    f"{earlier[-1].dirname} of session {self.upstream_session} (--from), which is "
                                    "no longer completed "
                                    f"({paths.relative(phase_dir(self.upstream_session, earlier[-1]))})")
            self.log(upstream_line(self.specs[0], done))
            self._check_handoff(earlier[-1], done, earlier=True)
            return done
        done = completed_result(self.session, earlier[-1]) or latest_completed(self.all_specs, earlier[-1].number)
        if done is None:
            self.registry.update_session(self.session, status="failed", current_phase=self.specs[0].name)
            raise PipelineError(f"phase {self.specs[0].dirname} needs a completed {earlier[-1].dirname}: none in "
                                f"session {self.session!r} or any other session; run --phases "
                                f"{earlier[-1].number} first (or the whole pipeline)")
        if done.session != self.session:
            self.log(upstream_line(self.specs[0], done))
        self._check_handoff(earlier[-1], done, earlier=True)
        return done

    def _run_one(self, spec: PhaseSpec, upstream: PhaseResult | None) -> PhaseOutcome:
        done = completed_result(self.session, spec)
        if done is not None:
            self._check_handoff(spec, done, earlier=True)  # its models must still exist and match
            self.log(f"[forge] {spec.dirname}: already completed in session {self.session}; kept as is")
            return PhaseOutcome(spec, "skipped", done, None, 0.0)
        self._set_aside(spec)
        how = spec.notebook if self.notebooks else "in this process"
        self.log(f"[forge] {spec.dirname}: running {how} (session {self.session})")
        started = time.perf_counter()
        upstream_arg = upstream_record(upstream)["folder"] if upstream else None
        try:
            if self.notebooks:
                notebook = _execute_notebook(spec, self.session, self.params_file, self.overrides, upstream_arg,
                                             self.log, kernel=self._next_kernel())
            else:
                notebook = _run_in_process(spec, self.session, self.params_file, self.overrides, upstream_arg,
                                           self.all_specs)
        except PipelineError:
            self.registry.update_session(self.session, status="failed", current_phase=spec.name)
            raise
        result = PhaseResult.load(phase_dir(self.session, spec))
        self._check_handoff(spec, result)
        if result.gate_failed and self.notebooks:  # in this process, run_phase printed it
            from .phases.base import gate_warning

            self.log(gate_warning(spec, result))
        seconds = time.perf_counter() - started
        self.log(f"[forge] {spec.dirname}: completed in {seconds:.1f}s — "
                 + ", ".join(f"{k}={_fmt(v)}" for k, v in list(result.metrics.items())[:6]))
        return PhaseOutcome(spec, "completed", result, notebook, seconds)

    def _set_aside(self, spec: PhaseSpec) -> None:
        """Move an incomplete earlier attempt's folder aside; its registry rows follow it there, retired (they never
        point at the folder the next attempt writes)."""
        folder = phase_dir(self.session, spec)
        moved = _set_aside(folder)
        if moved:
            self.registry.move_model_paths(self.session, folder, moved, f"left by an incomplete attempt of "
                                           f"{spec.dirname}, moved aside to {paths.relative(moved)}")
            self.log(f"[forge] {spec.dirname}: incomplete earlier attempt moved to {moved.name}")

    def _check_handoff(self, spec: PhaseSpec, result: PhaseResult, earlier: bool = False) -> None:
        """Validate and record the phase's handoff; ``earlier`` for a phase completed by an earlier run (kept,
        skipped or the upstream of the first selected phase), whose models must still verify."""
        validation = validate_handoff(result, self.registry)
        # One handoff row per phase; it names the phase's first model and holds every model's check.
        first = next(iter(result.models), None)
        first_id = result.models[first].get("registry_id") if first and validation["models"][first]["ok"] else None
        self.registry.record_handoff(self.session, spec.name, first_id,
                                     _next_name(spec, self.all_specs), validation["ok"], validation)
        if not validation["ok"]:
            self.registry.update_session(self.session, status="failed", current_phase=spec.name)
            if earlier:
                problems = "; ".join(f"{role}: {m.get('error')}" for role, m in validation["models"].items()
                                     if not m["ok"]) or f"status/gate no longer hold: {validation}"
                raise PipelineError(f"phase {spec.dirname} of session {result.session} completed earlier but its "
                                    f"handoff no longer holds ({problems}); start a new session or rerun it")
            raise PipelineError(f"handoff after {spec.dirname} is invalid: {validation}")

    def close(self) -> None:
        self.registry.close()


def _next_name(spec: PhaseSpec, specs: list[PhaseSpec]) -> str:
    later = [s for s in specs if s.number > spec.number]
    return later[0].name if later else "end"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_pipeline(params_file: str | os.PathLike | None = None, phases: str | list | None = "all",
                 session: str | None = None, overrides: dict | None = None, resume: bool = False,
                 specs: list[PhaseSpec] | None = None, log: Callable[[str], None] = print,
                 notebooks: bool = True, rerun_from: str | None = None) -> list[PhaseOutcome]:
    """Run (or, with ``resume=True``, continue) a session's phases; returns one outcome per phase.
    ``params_file``: default ``parameters/smoke.yaml``; with ``resume`` it and ``overrides`` may only repeat the
    session's stored values (``RefusedError`` otherwise). ``rerun_from="S:PHASE"``: a new session (``session``, or
    a name derived from S) running PHASE onwards with S's parameters changed by ``params_file``/``overrides``,
    after S's completed phase PHASE-1 (see ``Pipeline.rerun_from``). ``notebooks=False`` runs each phase's calls
    in this process instead of its notebook (see ``Pipeline``)."""
    if resume and rerun_from:
        raise RefusedError("resume continues a session, rerun_from starts a new one: give one of them")
    if resume:
        if not session:
            raise PipelineError("resume needs the session id to continue")
        pipe = Pipeline.resume(session, specs, log, notebooks, params_file, overrides)
    elif rerun_from:
        source, phase = parse_from(rerun_from)
        pipe = Pipeline.rerun_from(source, phase, params_file, overrides, phases, session, specs, log, notebooks)
    else:
        pipe = Pipeline(params_file if params_file is not None else DEFAULT_PARAMS, phases, session, overrides,
                        specs, log, notebooks)
    try:
        return pipe.run()
    finally:
        pipe.close()


def parse_from(value: str) -> tuple[str, str | int]:
    """``"S:PHASE"`` (``--from``) → ``(S, PHASE)``, PHASE a number or a name; ``RefusedError`` if malformed."""
    source, colon, phase = str(value).rpartition(":")
    if not colon or not source or not phase:
        raise RefusedError(f"--from expects SESSION:PHASE (e.g. 20240101-120000-ab12:2 or S:evomerge), "
                           f"got {value!r}")
    check_session_name(source)
    return source, int(phase) if phase.isdigit() else phase


def _session_config(session: str) -> dict | None:
    """The session's stored config (``params_file``, ``overrides``, ``phases``, ``from``); None if unknown."""
    from .registry import ModelRegistry

    with ModelRegistry(paths.registry_path()) as registry:
        if not session_exists(registry, session):
            return None
        return registry.get_session(session).get("config") or {}


def _source_completed(source: str, spec: PhaseSpec, flag: str) -> PhaseResult | None:
    """``source``'s completed ``spec`` (None if not completed); RefusedError when the registry says it completed but
    its result.json cannot be read."""
    from .registry import ModelRegistry

    if not paths.registry_path().is_file():
        return completed_result(source, spec)
    with ModelRegistry(paths.registry_path()) as registry:
        try:
            return checked_completed_result(source, spec, registry)
        except DamagedResultError as exc:
            raise RefusedError(f"{flag}: {exc}") from None


def _from_selection(source: str, start: PhaseSpec, phases: str | list | None,
                    all_specs: list[PhaseSpec]) -> list[PhaseSpec]:
    """The phases a ``--from source:start`` run runs: ``start`` onwards, or ``phases`` if it begins at ``start``."""
    if phases in (None, "all", ""):
        return [s for s in all_specs if s.number >= start.number]
    try:
        chosen = select(phases, all_specs)
    except UnknownPhaseError as exc:
        raise RefusedError(str(exc)) from None
    if chosen[0] is not start:
        raise RefusedError(f"--phases {phases} with --from {source}:{start.number}: the selection must begin at "
                           f"{start.dirname} (the phases before it are session {source}'s)")
    return chosen


def _new_session_name(source: str, start: PhaseSpec, session: str | None) -> str:
    """``session`` if no session of that name exists (else ``RefusedError``), or a fresh name
    ``<source>-from<N>-<UTC time>`` (``source`` shortened to keep within the session-name rule)."""
    from .registry import ModelRegistry

    def taken(name: str) -> bool:
        if (paths.outputs_root() / name).exists():
            return True
        with ModelRegistry(paths.registry_path()) as registry:
            return session_exists(registry, name)

    if session is not None:
        check_session_name(session)
        if taken(session):
            raise RefusedError(f"session {session!r} already exists; choose another --session for the new run "
                               f"(or `forge run --resume {session}` to continue that one)")
        return session
    suffix = f"-from{start.number}-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = check_session_name(source[:100 - len(suffix)] + suffix)
    while taken(name):  # another rerun of the same phase within the same second
        suffix = f"-from{start.number}-{secrets.token_hex(2)}"
        name = check_session_name(source[:100 - len(suffix)] + suffix)
    return name


_UNSET = object()


def _set_text(overrides: dict | None, limit: int = 2000) -> str:
    """Overrides as the ``--set`` arguments that give them (cut to about ``limit`` characters; overrides that
    would take more as text are not written out at all: YAML aliases can make a short --set a huge value)."""
    if stored_size(overrides or {}, limit) > limit:
        return f"--set values too long to show (over {limit} characters)"
    return cut(" ".join(f"--set {k}={yaml_value(v)}" for k, v in flatten(overrides or {}).items()), limit)


def _effective_params(params_file: str | os.PathLike, overrides: dict | None, specs: list[PhaseSpec],
                      all_specs: list[PhaseSpec]) -> dict:
    """``{"run.seed": 3, "beta.scale": 1.05, ...}``: every value ``specs`` run with: the ``run`` section and each
    phase's as loaded (defaults filled), any other shared section (not a phase's) as the file and overrides give it."""
    values: dict = {}
    for spec in specs:
        run, params = load_phase_params(spec, params_file, overrides, all_specs)
        values.update(flatten({"run": to_dict(run), spec.name: to_dict(params)}))
    own = {s.name for s in all_specs} | {"run"}
    tree = merge_overrides(read_yaml(paths.resolve(params_file)), overrides)
    values.update(flatten({k: v for k, v in tree.items() if k not in own}))
    return values


def check_resume_params(session: str, config: dict, params_file: str | os.PathLike | None, overrides: dict | None,
                        all_specs: list[PhaseSpec]) -> None:
    """Refuse (``RefusedError``) a resume given parameters that change a value of the session's stored ones (its
    registry config: parameter file + --set values, what every phase folder's params.yaml records): the resume
    would run with the stored ones. ``params_file`` replaces the stored file, ``overrides`` merge over the stored
    --set values; a request that changes no value (e.g. the same file) passes."""
    stored_file = config.get("params_file", DEFAULT_PARAMS)
    stored_overrides = config.get("overrides") or {}
    given_file = stored_file if params_file is None else str(params_file)
    merged = {**stored_overrides, **(overrides or {})}
    if paths.resolve(given_file).resolve() == paths.resolve(stored_file).resolve() and merged == stored_overrides:
        return
    specs = select(config.get("phases", "all"), all_specs)
    try:
        before = _effective_params(stored_file, stored_overrides, specs, all_specs)
    except (ValueError, KeyError, OSError) as exc:  # ParameterError is a ValueError
        before, changes = {}, [f"the stored parameters no longer load: {exc}"]
    try:
        after = _effective_params(given_file, merged, specs, all_specs)
    except (ValueError, KeyError, OSError) as exc:
        after, changes = {}, [f"the new parameters do not load: {exc}"]
    if before and after:
        changes = [f"{k}: {yaml_value(before[k]) if k in before else '(unset)'} -> "
                   f"{yaml_value(after[k]) if k in after else '(unset)'}"
                   for k in sorted(set(before) | set(after)) if before.get(k, _UNSET) != after.get(k, _UNSET)]
    if not changes:
        return
    given = ([f"--params {params_file}"] if params_file is not None else []) + (
        [_set_text(overrides)] if overrides else [])
    stored = f"{stored_file} + " + (_set_text(stored_overrides) if stored_overrides else "no --set values")
    shown = cut("; ".join(changes[:5]), 1000) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
    raise RefusedError(
        f"--resume continues session {session} with its stored parameters ({stored}); the {' '.join(given)} given "
        f"would be ignored ({shown}). To rerun from a phase with new parameters use: forge run --from "
        f"{session}:PHASE [--params P] [--set k=v ...] [--session NEW] (a new session that runs PHASE onwards "
        f"after {session}'s completed phase PHASE-1; {session} stays as it is)"
        + _from_example(session, specs, all_specs, " ".join(given)))


def _from_example(session: str, specs: list[PhaseSpec], all_specs: list[PhaseSpec], given: str) -> str:
    """``; e.g. forge run --from S:N ...`` for the first phase the resume would run, when S completed the one
    before it; a new run when S completed none."""
    pending = [s for s in specs if completed_result(session, s) is None]
    nxt = pending[0] if pending else None
    earlier = [s for s in all_specs if nxt is not None and s.number < nxt.number]
    if nxt is not None and not earlier:
        return f" (session {session} completed no phase: for a new run, forge run {given})"
    if nxt is not None and completed_result(session, earlier[-1]) is not None:
        return f"; e.g. forge run --from {session}:{nxt.number} {given}"
    return ""


def summary_table(outcomes: Iterable[PhaseOutcome]):
    """One row per phase: status, gate, seconds, and a compact ``headline`` of that phase's own headline
    metrics (the phase module's ``HEADLINE`` keys, else its first few metrics); a pandas DataFrame."""
    import pandas as pd

    from .viz.tables import headline_text

    rows = []
    for o in outcomes:
        row = {"phase": o.spec.dirname, "status": o.status, "gate": "", "seconds": round(o.seconds, 1),
               "kept": "", "headline": ""}
        if o.result is not None:
            row["gate"] = "pass" if o.result.gate_passed else "FAIL (warn)" if o.result.gate_failed else "FAIL"
            row["seconds"] = round(o.result.duration_s, 1)
            row["kept"] = _guard_text(o.result.metrics)
            row["headline"] = headline_text(o.result.metrics, getattr(o.spec.load(), "HEADLINE", None))
        rows.append(row)
    return pd.DataFrame(rows, columns=["phase", "status", "gate", "seconds", "kept", "headline"]).set_index("phase")


def _guard_text(metrics: dict) -> str:
    """The guard in a few words: the input suite pooled before→after difference and the worst family."""
    if "guard_worst_family" not in metrics:
        return ""
    return (f"all {metrics['guard_pooled_diff']:+.3f}, worst {metrics['guard_worst_family']} "
            f"{metrics['guard_worst_diff']:+.3f} (margin {metrics['guard_margin']:g})")


class PipelineOrchestrator:
    """The source design's orchestrator API over :class:`Pipeline`, as a context manager.

    ``config`` is a dict: ``params_file`` (default the smoke set), optional ``overrides``, ``session``,
    ``phases``.
    """

    def __init__(self, config: dict | None = None):
        config = dict(config or {})
        self.params_file = config.pop("params_file", "parameters/smoke.yaml")
        self.overrides = config.pop("overrides", None)
        session = config.pop("session", None)
        self.session = check_session_name(session) if session else new_session_id()
        self.phases = config.pop("phases", "all")
        if config:
            raise ValueError(f"unknown orchestrator config key(s) {sorted(config)}; "
                             "allowed: params_file, overrides, session, phases")

    def __enter__(self) -> "PipelineOrchestrator":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def run_full_pipeline(self) -> dict[str, dict]:
        outcomes = run_pipeline(self.params_file, self.phases, self.session, self.overrides)
        return {o.spec.name: {"status": o.status, "duration": o.seconds,
                              "metrics": o.result.metrics if o.result else {}} for o in outcomes}

    def run_single_phase(self, phase_num: int, input_models: list | None = None) -> PhaseResult:
        """Run one phase in-process (no notebook); ``input_models[0]`` may name the upstream result/folder."""
        from .phases import PhaseController

        controller = PhaseController(phase_num, self.params_file, self.overrides, self.session)
        controller.validate_input(input_models)
        result = controller.execute(input_models)
        if not controller.validate_output(result):
            raise PipelineError(f"phase {phase_num} returned no valid output: status {result.status}, "
                                f"models {sorted(result.models)}")
        return result
