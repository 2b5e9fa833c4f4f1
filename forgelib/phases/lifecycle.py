"""The run lifecycle: ``open_phase`` (parameters, upstream, session lock, folder, registry, tracker), ``run_phase``
(the module's ``run``, its gate, result.json and the registry rows, on failure as on success) and ``open_finished``
(a finished run opened to look at)."""
from __future__ import annotations

import datetime as dt
import os
import secrets
import shlex
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Iterable

import yaml

from .. import paths
from ..distributed import ReadOnlyRegistry, is_follower, process_index
from ..jobs import side_by_side
from ..params import (ParameterError, RunParams, cut, load_section, load_yaml_file, set_arguments, short,
                      stored_size, to_dict)
from ..results import RESULT_FILE, PhaseResult
from ..session import SessionLock, check_session_name, lock_session
from .contract import PhaseContext
from .errors import (GateFailedError, NothingToExploreError, OutputNotWritableError, PhaseError, UpstreamError,
                     as_phase_error)
from .specs import PHASES, PhaseSpec, get_spec
from .upstream import (checked_completed_result, completed_result, find_upstream, load_upstream, phase_dir,
                       upstream_record)


def new_session_id() -> str:
    """A fresh, sortable session id: UTC time plus a short random suffix."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def load_phase_params(spec: PhaseSpec, params_file: str | os.PathLike, overrides: dict | None,
                      all_specs: Iterable[PhaseSpec]) -> tuple[RunParams, Any]:
    """Load the ``run`` section and the phase's section strictly (typos in any section name fail)."""
    sections = {s.name for s in all_specs} | {spec.name, *SHARED_SECTIONS}
    path = paths.resolve(params_file)
    run = load_section(path, "run", RunParams, overrides, sections)
    return run, load_section(path, spec.name, spec.params_cls, overrides, sections)


SHARED_SECTIONS = ("run", "guard")
"""Sections every phase reads besides its own."""


def load_guard_params(params_file: str | os.PathLike, overrides: dict | None, all_specs: Iterable[PhaseSpec]):
    """The ``guard`` section (``forgelib.suite.GuardParams``), strictly."""
    from ..suite import GuardParams

    sections = {s.name for s in all_specs} | set(SHARED_SECTIONS)
    return load_section(paths.resolve(params_file), "guard", GuardParams, overrides, sections)


def session_exists(registry: Any, session: str) -> bool:
    from ..registry import UnknownRecordError

    try:
        registry.get_session(session)
    except UnknownRecordError:
        return False
    return True


def _prepare_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OutputNotWritableError(paths.describe_write_error(exc, folder)) from exc


def _lock(session: str) -> SessionLock | None:
    """The session's lock (None when the pipeline that started this kernel holds it); nothing else is
    written before it is held."""
    try:
        return lock_session(session)
    except OSError as exc:
        raise OutputNotWritableError(f"cannot write the session lock under {paths.outputs_root()}: {exc}") from exc


def quiet_library_bars() -> None:
    """Hide transformers' loading/saving bars: for tiny checkpoints they are noise in notebooks and logs
    (the phases' own training bars stay)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()


def check_device(run: RunParams, params_file: str | os.PathLike) -> str:
    """The device ``run.device`` resolves to on this machine; ParameterError naming ``run.device`` and what to give
    instead when this machine has no such device (checked before a run creates anything)."""
    from ..utils import resolve_device

    try:
        return resolve_device(run.device)
    except ValueError as exc:  # DeviceUnavailableError too
        raise ParameterError(f"{paths.relative(paths.resolve(params_file))}: run.device: {exc}; give one this "
                             "machine has, e.g. --set run.device=auto (cuda when there is one, else cpu)") from None


def _setup_runtime(run: RunParams) -> str:
    import torch

    from ..utils import resolve_device, set_seed

    torch.set_num_threads(max(1, run.threads))
    quiet_library_bars()
    set_seed(run.seed)
    return resolve_device(run.device)


def _write_params(folder: Path, spec: PhaseSpec, params_file: str | os.PathLike, overrides: dict | None,
                  run: RunParams, guard_params: Any, params: Any) -> None:
    """The run's parameters as ``params.yaml`` in ``folder`` (file, overrides, run, guard and the phase's section)."""
    (folder / "params.yaml").write_text(yaml.safe_dump(
        {"params_file": paths.relative(paths.resolve(params_file)), "overrides": overrides or {},
         "run": to_dict(run), "guard": to_dict(guard_params), spec.name: to_dict(params)}, sort_keys=False))


def open_phase(spec: PhaseSpec | str | int, params_file: str | os.PathLike = "parameters/smoke.yaml",
               overrides: dict | None = None, session: str | None = None,
               upstream: str | os.PathLike | PhaseResult | None = None,
               all_specs: Iterable[PhaseSpec] | None = None, explore: str | None = None) -> PhaseContext:
    """Prepare a phase run: load parameters, resolve the upstream, open registry and tracker.

    Nothing already written is touched: a completed phase of the same session is never overwritten.
    ``explore``: a session whose run of this phase finished; the context is that run's (:func:`open_finished`,
    the other arguments are not used) and ``run_phase`` returns its result without running anything.
    """
    from ..registry import ModelRegistry
    from ..tracking import make_tracker

    spec = spec if isinstance(spec, PhaseSpec) else get_spec(spec)
    if explore:
        return open_finished(spec, explore)
    session = check_session_name(session) if session else new_session_id()
    all_specs = list(all_specs) if all_specs is not None else list(PHASES)
    run, params = load_phase_params(spec, params_file, overrides, all_specs)
    guard_params = load_guard_params(params_file, overrides, all_specs)
    check_device(run, params_file)
    upstream_result, how = find_upstream(spec, upstream, all_specs, session)
    follower = is_follower()
    if not follower:
        _refuse_completed(session, spec)
    session_lock = None if follower else _lock(session)
    folder = phase_dir(session, spec) / f".rank-{process_index()}" if follower else phase_dir(session, spec)
    try:  # a failure here frees the session again
        _prepare_dir(folder)
        paths.contain_tool_caches()
        device = _setup_runtime(run)
        _write_params(folder, spec, params_file, overrides, run, guard_params, params)
        registry = ModelRegistry(paths.registry_path())
        if follower:
            registry = ReadOnlyRegistry(registry)
    except BaseException as exc:
        if session_lock is not None:
            session_lock.release()
        error = as_phase_error(exc, folder)
        if error is exc:
            raise
        raise error from exc
    if not session_exists(registry, session):
        registry.create_session(session, {"params_file": str(params_file), "overrides": overrides or {}})
    if session_lock is not None and session_lock.users == 1:  # this context alone holds the session
        registry.interrupt_stale_runs(session)
    tracker = make_tracker("none" if follower else run.tracking, folder, project=run.wandb_project,
                           name=f"{session}-{spec.dirname}", group=session,
                           config={"run": to_dict(run), spec.name: to_dict(params)},
                           wandb_mode=run.wandb_mode, wandb_dir=folder, notebook=paths.resolve(spec.notebook))
    result = PhaseResult(phase=spec.name, number=spec.number, session=session, started_at=now_iso(),
                         upstream=upstream_record(upstream_result) if upstream_result is not None else None)
    ctx = PhaseContext(spec=spec, params=params, run=run, session=session, dir=folder,
                       params_file=paths.resolve(params_file), upstream=upstream_result, registry=registry,
                       tracker=tracker, result=result, device=device, session_lock=session_lock,
                       upstream_how=how, guard_params=guard_params, all_specs=all_specs)
    result.suite = {f: list(v) for f, v in ctx.input_suite.items()}  # a phase that teaches more widens it
    return ctx


def open_finished(spec: PhaseSpec | str | int, session: str) -> PhaseContext:
    """The context of phase ``spec`` as it finished in ``session``, to look at: its result.json, the parameters it
    ran with (its params.yaml), its upstream (None when that folder is gone) and the registry, read-only. Nothing is
    run, locked, tracked or written. NothingToExploreError names the file and what to do when the phase did not
    finish there or its record cannot be read."""
    from ..registry import ModelRegistry
    from ..tracking import make_tracker

    spec = spec if isinstance(spec, PhaseSpec) else get_spec(spec)
    folder = phase_dir(session, spec)
    result, run, params, guard_params = check_finished(spec, session)
    upstream = _finished_upstream(result)
    registry = ReadOnlyRegistry(ModelRegistry(paths.registry_path()))
    try:
        device = _setup_runtime(run)
    except ValueError:  # a run on a device this machine lacks: look at it here on the CPU
        device = "cpu"
    return PhaseContext(spec=spec, params=params, run=run, session=session, dir=folder,
                        params_file=folder / "params.yaml", upstream=upstream, registry=registry,
                        tracker=make_tracker("none", folder), result=result, device=device,
                        upstream_how="the finished run's", guard_params=guard_params, explored=True)


def check_finished(spec: PhaseSpec, session: str, with_params: bool = True) -> tuple[PhaseResult, Any, Any, Any]:
    """(the result, run, phase params, guard section) of ``spec``'s finished run in ``session``, read from its folder;
    NothingToExploreError saying what is missing (see :func:`open_finished`). ``with_params=False``: the parameters
    are neither read nor returned (None), so no phase module (and no model library) is imported."""
    folder = phase_dir(session, spec)
    result = _finished_result(folder, spec, session)
    run, params, guard_params = _finished_params(folder, spec) if with_params else (None, None, None)
    if not paths.registry_path().is_file():
        raise NothingToExploreError(f"the registry {paths.relative(paths.registry_path())} is missing: the models of "
                                    f"{spec.dirname} of session {session} cannot be checked against it")
    return result, run, params, guard_params


def finished_sessions(spec: PhaseSpec, limit: int = 5) -> list[str]:
    """The newest sessions (at most ``limit``) in which ``spec`` completed, newest first."""
    found = sorted(paths.outputs_root().glob(f"*/{spec.dirname}/{RESULT_FILE}"), key=lambda p: p.stat().st_mtime,
                   reverse=True)
    names = [p.parent.parent.name for p in found]
    return [n for n in names if completed_result(n, spec) is not None][:limit]


def _finished_result(folder: Path, spec: PhaseSpec, session: str) -> PhaseResult:
    """The completed result in ``folder``, else NothingToExploreError saying why and naming finished sessions."""
    where = paths.relative(folder / RESULT_FILE)
    try:
        result = PhaseResult.load(folder)
        problem = None if result.accepted else (
            f"its {where} says status {short(result.status)}" + ("" if result.gate_passed else ", gate failed"))
    except FileNotFoundError:
        problem = f"there is no {where}"
    except ValueError as exc:
        problem = cut(str(exc), 200)
    if problem is None:
        return result
    others = finished_sessions(spec)
    hint = f"sessions where it finished: {', '.join(others)}" if others else "no session has finished it yet"
    raise NothingToExploreError(f"phase {spec.dirname} did not finish in session {session}, so there is nothing to "
                                f"explore: {problem}; {hint}")


def _finished_params(folder: Path, spec: PhaseSpec) -> tuple[RunParams, Any, Any]:
    """(run, the phase's params, the guard section) from the finished run's params.yaml."""
    from ..params import build_dataclass
    from ..suite import GuardParams

    where = paths.relative(folder / "params.yaml")
    try:
        stored = load_yaml_file(folder / "params.yaml", where)
        if not isinstance(stored, dict):
            raise ParameterError(f"{where}: not a mapping of sections")
        return (build_dataclass(RunParams, stored.get("run") or {}, f"{where}: run"),
                build_dataclass(spec.params_cls, stored.get(spec.name) or {}, f"{where}: {spec.name}"),
                build_dataclass(GuardParams, stored.get("guard") or {}, f"{where}: guard"))
    except (ParameterError, TypeError) as exc:
        raise NothingToExploreError(f"the parameters the finished run used cannot be read: {cut(str(exc), 300)}") \
            from None


def _finished_upstream(result: PhaseResult) -> PhaseResult | None:
    """The upstream a finished run recorded, or None when it has none or its folder is gone."""
    folder = (result.upstream or {}).get("folder")
    if not isinstance(folder, str):
        return None
    try:
        return load_upstream(folder)
    except UpstreamError:
        return None


def _refuse_completed(session: str, spec: PhaseSpec) -> None:
    """PhaseError when the phase already completed in the session (it is never overwritten), DamagedResultError
    when the registry says it completed but its result.json cannot be read; raised before anything is written."""
    if completed_result(session, spec) is not None:
        raise PhaseError(f"phase {spec.dirname} of session {session} already completed; "
                         "it is never overwritten (start a new session)")
    if paths.registry_path().is_file():
        from ..registry import ModelRegistry

        with ModelRegistry(paths.registry_path()) as registry:
            checked_completed_result(session, spec, registry)


def gate_failure_message(spec: PhaseSpec, session: str, result: PhaseResult,
                         all_specs: Iterable[PhaseSpec] | None = None, given: list[str] | None = None) -> str:
    """One paragraph: the failed checks with their numbers, where they are recorded, and the ways on (rerun from
    the phase with other parameters; continue with gates reported but not enforced). ``given``: the session's
    ``--params``/``--set`` arguments, repeated in the ways on of a first phase (a new run; ``--from`` carries them)."""
    failures = result.gate_failures()
    checks = "; ".join(cut(f, 300) for f in failures[:5]) + (f"; and {len(failures) - 5} more" if len(failures) > 5
                                                              else "")
    earlier = [s for s in (all_specs or PHASES) if s.number < spec.number]
    folder = paths.relative(phase_dir(session, spec))
    if earlier:
        rerun = f"forge run --from {session}:{spec.number} --set {spec.name}.KEY=VALUE"
        warn = f"forge run --from {session}:{spec.number} --gates warn"
        after = f" (a new session after {session}'s completed {earlier[-1].dirname}, which is kept)"
    else:
        again = shlex.join(["forge", "run", *(given or [])])
        rerun, warn, after = f"{again} --set {spec.name}.KEY=VALUE", f"{again} --gates warn", ""
    return (f"phase {spec.dirname} of session {session} did not pass its gate: {checks} (every check with its value "
            f"and bound is in {folder}/result.json). Ways on: rerun from this phase with changed parameters, "
            f"`{rerun}`{after}; or, to explore, continue with gates reported but not enforced, `{warn}` (the "
            "phase's models are then registered as gate-failed and the chain goes on)")


def session_arguments(ctx: PhaseContext, limit: int = 1000) -> list[str]:
    """``["--params", FILE, "--set", "k=v", ...]``: what the session was started with (its registry row), for a new
    run that repeats it; without the ``--set`` values when they would take over ``limit`` characters, [] without a
    row."""
    try:
        config = ctx.registry.get_session(ctx.session).get("config") or {}
    except Exception:  # no row (a context made by hand): the defaults
        return []
    args = ["--params", str(config["params_file"])] if isinstance(config.get("params_file"), str) else []
    overrides = config.get("overrides")
    if isinstance(overrides, dict) and stored_size(overrides, limit) <= limit:
        args += set_arguments(overrides)
    return args


def _gate_warned(ctx: PhaseContext, result: PhaseResult) -> None:
    """``run.gates: warn``: record the failed gate in the result and the registry (models 'gate-failed'), say so
    loudly, and let the phase complete."""
    result.gate_failed = True
    result.failed_checks = [cut(f, 300) for f in result.gate_failures()]
    ids = [m["registry_id"] for m in result.models.values() if m.get("registry_id") is not None]
    ctx.registry.set_model_status(ids, "gate-failed", metadata={"gate_failed": True,
                                                                "failed_checks": result.failed_checks[:20]})
    print(gate_warning(ctx.spec, result), flush=True)


def explore_line(spec: PhaseSpec, session: str, folder: Path, result: PhaseResult) -> str:
    """What a phase opened to explore prints: whose results these are, that nothing runs, and a gate that failed
    under ``run.gates: warn`` with its checks (its models are gate-failed)."""
    line = (f"[forge] {spec.dirname} of session {session}: the finished run's results ({paths.relative(folder)}); "
            "nothing is run (explore)")
    if result.gate_failed:
        line += (f". Its GATE FAILED, not enforced (run.gates: warn): {_failed_checks_text(result)}; its models are "
                 "registered as gate-failed")
    return line


def _failed_checks_text(result: PhaseResult) -> str:
    """The first five failed checks a gate-failed (warn) result recorded, and how many more."""
    return "; ".join(result.failed_checks[:5]) + (f"; and {len(result.failed_checks) - 5} more"
                                                   if len(result.failed_checks) > 5 else "")


def gate_warning(spec: PhaseSpec, result: PhaseResult) -> str:
    """The loud line of a gate that failed under ``run.gates: warn``."""
    return (f"[forge] WARNING {spec.dirname}: GATE FAILED, not enforced (run.gates: warn): "
            f"{_failed_checks_text(result)}; its models are registered as gate-failed and the chain goes on")


def _retire_attempt(ctx: PhaseContext, exc: BaseException) -> None:
    """Retire the models this failed attempt registered, with the reason (they are never handed on)."""
    ids = [m["registry_id"] for m in ctx.result.models.values() if m.get("registry_id") is not None]
    if not ids:
        return
    what = "its gate failed" if isinstance(exc, GateFailedError) else f"it failed ({type(exc).__name__})"
    ctx.registry.set_model_status(ids, "retired", reason=f"registered by phase run {ctx.phase_run_id} of "
                                  f"{ctx.spec.dirname}, and {what}")


def _fail(ctx: PhaseContext, exc: BaseException, started: float) -> None:
    """Record the failure: registry rows first (they must never stay 'running'; the attempt's models retired), then
    error.txt and result.json as far as the disk allows, then the tracker."""
    ctx.result.status = "failed"
    ctx.result.error = f"{type(exc).__name__}: {exc}"
    ctx.result.finished_at = now_iso()
    ctx.result.duration_s = round(time.perf_counter() - started, 3)
    ctx.registry.finish_phase_run(ctx.phase_run_id, "failed", metrics=ctx.result.metrics, error=ctx.result.error)
    _retire_attempt(ctx, exc)
    ctx.registry.update_session(ctx.session, status="failed", current_phase=ctx.spec.name)
    for record in (lambda: (ctx.dir / "error.txt").write_text("".join(traceback.format_exception(exc))),
                   lambda: ctx.result.save(ctx.dir), ctx.tracker.finish):
        try:
            record()
        except OSError:
            pass  # e.g. a full disk: the registry row holds the error


def run_phase(ctx: PhaseContext) -> PhaseResult:
    """Run the phase module's ``run`` with the context; write result.json; raise when it fails its gate.

    On any failure the result.json says ``failed`` with the error, and the exception propagates so that a
    pipeline (or a notebook) stops there. A context opened to explore a finished phase runs nothing: its stored
    result is returned.
    """
    if ctx.explored:
        print(explore_line(ctx.spec, ctx.session, ctx.dir, ctx.result), flush=True)
        return ctx.result
    module = ctx.spec.load()
    started = time.perf_counter()
    ctx.phase_run_id = ctx.registry.start_phase_run(ctx.session, ctx.spec.name)
    ctx.registry.update_session(ctx.session, status="running", current_phase=ctx.spec.name)
    try:
        if hasattr(module, "validate_input"):
            module.validate_input(ctx.params, ctx)
        with side_by_side(ctx.workers):  # a generation's batches on the cores run.workers allows (forgelib.jobs)
            result = module.run(ctx.params, ctx)
        if hasattr(module, "validate_output"):
            module.validate_output(result, ctx)
        if not result.gate_passed:
            if ctx.run.gates != "warn":
                raise GateFailedError(gate_failure_message(ctx.spec, ctx.session, result, ctx.all_specs,
                                                           session_arguments(ctx)))
            _gate_warned(ctx, result)
        result.status = "ok"
        result.finished_at = now_iso()
        result.duration_s = round(time.perf_counter() - started, 3)
        result.save(ctx.dir)
    except BaseException as exc:
        error = as_phase_error(exc, ctx.dir)
        _fail(ctx, error, started)
        _release(ctx)
        if error is exc:
            raise
        raise error from exc
    ctx.tracker.summary(result.metrics)
    ctx.tracker.finish()
    ctx.registry.finish_phase_run(ctx.phase_run_id, "completed", metrics=result.metrics)
    ctx.registry.update_session(ctx.session, status="running", current_phase=ctx.spec.name)
    _release(ctx)
    if is_follower():  # a follower's scratch copy of what the main process wrote
        shutil.rmtree(ctx.dir, ignore_errors=True)
    return result


def _release(ctx: PhaseContext) -> None:
    """Free the session lock that ``open_phase`` took (a pipeline's own lock is not the context's)."""
    if ctx.session_lock is not None:
        ctx.session_lock.release()
        ctx.session_lock = None
