"""The phase contract: a PhaseSpec names a phase; a PhaseContext is what its ``run`` gets; run_phase runs it.

A phase module (``forgelib.phases.<name>``) holds:
- ``Params``: a dataclass of its parameters (each field documented), loaded from the phase's YAML section;
- ``run(params, ctx) -> PhaseResult``: the work; it saves models through ``ctx.save_model`` and fills
  ``metrics`` (a few headline numbers) and ``gate`` (the checks that must hold before the next phase);
- optionally ``validate_input(params, ctx)`` and ``validate_output(result, ctx)`` raising on a problem.

Phases hand over through files and the registry (model folders + result.json), never through objects in memory.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import os
import re
import secrets
import shlex
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from .. import paths
from ..distributed import ReadOnlyRegistry, is_follower, process_index
from ..params import (ParameterError, RunParams, cut, load_section, load_yaml_file, set_arguments, short,
                      stored_size, to_dict)
from ..results import RESULT_FILE, PhaseResult, write_json_atomic
from ..session import SessionLock, check_session_name, lock_session
from .specs import PHASES, PhaseSpec, get_spec


class PhaseError(RuntimeError):
    """A phase could not run or did not pass its gate; the message says why."""


class GateFailedError(PhaseError):
    """The phase ran but its gate did not hold; the previous phase's model stays the latest good one."""


class UpstreamError(PhaseError):
    """The upstream model or result a phase needs is missing, unreadable or does not match its checksum."""


class OutputNotWritableError(PhaseError):
    """The output folder cannot be created or written."""


class NothingToExploreError(PhaseError):
    """``explore`` names a session whose phase did not finish (or whose record cannot be read): nothing to show."""


class DamagedResultError(PhaseError):
    """The registry records the phase as completed in the session, but its result.json is missing, unreadable or no
    longer says so: what completed is never recomputed nor moved aside."""


def new_session_id() -> str:
    """A fresh, sortable session id: UTC time plus a short random suffix."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


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


@dataclasses.dataclass
class PhaseContext:
    """Everything a phase's ``run`` may use: params, session, its output folder, upstream, registry, tracker."""

    spec: PhaseSpec
    params: Any
    run: RunParams
    session: str
    dir: Path
    params_file: Path
    upstream: PhaseResult | None
    registry: Any
    tracker: Any
    result: PhaseResult
    device: str = "cpu"
    phase_run_id: int | None = None
    session_lock: SessionLock | None = None
    upstream_how: str = "given"
    """How the upstream was chosen: 'given' (``upstream=``) or the newest completed run (not given)."""
    guard_params: Any = None
    """The ``guard`` section (``forgelib.suite.GuardParams``): how the phase checks it kept what its input knew."""
    all_specs: list[PhaseSpec] | None = None
    """The chain's phases (None: the product's): the phase before this one, for the ways on after a failed gate."""
    explored: bool = False
    """A finished phase opened to look at (``open_phase(..., explore=SESSION)``): ``run_phase`` runs nothing and
    returns its stored result; nothing is locked, tracked or written."""

    @property
    def seed(self) -> int:
        """This phase's seed, derived from the run seed so phases do not share random streams."""
        return self.run.seed + 1000 * self.spec.number

    @property
    def quiet(self) -> bool:
        return self.run.quiet

    @property
    def workers(self) -> int:
        """How many independent jobs run side by side (``run.workers`` resolved for this device)."""
        from ..jobs import resolve_workers

        return resolve_workers(self.run.workers, self.device, self.run.threads)

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.tracker.log(metrics, step)

    def path(self, *parts: str) -> Path:
        """A path inside this phase's output folder (parents created)."""
        p = self.dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_report(self, report: dict, name: str = "report.json") -> Path:
        """Write ``report`` as strict JSON into the phase folder and record it as the ``report`` artifact,
        repo-relative like every path of result.json."""
        path = write_json_atomic(self.path(name), report)
        self.result.artifacts["report"] = paths.relative(path)
        return path

    def save_model(self, role: str, model: Any, tokenizer: Any = None, metadata: dict | None = None) -> Path:
        """Save a transformers model (safetensors) atomically under ``models/<role>`` and register it.

        A failed write (full disk, read-only folder; safetensors' and tokenizers' own errors included) removes the
        temporary folder and raises OutputNotWritableError naming the model and ``models/<role>``; an earlier model
        of that role and everything else already written are kept.
        """
        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

        final = write_model_folder(self.dir / "models" / role, write, f"model {role!r}", self.session)
        return self.register(role, final, model=model, metadata=metadata)

    def register(self, role: str, path: Path, model: Any = None, metadata: dict | None = None) -> Path:
        """Register an already written model folder/file under ``role`` in the registry and the result."""
        n_params = sum(p.numel() for p in model.parameters()) if model is not None else None
        model_id = self.registry.register_model(
            session_id=self.session, phase_name=self.spec.name, model_name=role, model_path=str(path),
            metadata=dict(metadata or {}, role=role), parameter_count=n_params)
        self.result.models[role] = {"path": paths.relative(path), "registry_id": model_id}
        return path

    @property
    def input_suite(self) -> dict:
        """What the upstream model knows (``forgelib.suite``): its result's suite, or for a result written before
        suites were recorded, the Phase-1 trunk's mix and levels of its chain."""
        from ..suite import suite_of

        if self.upstream is None:
            return {}
        return suite_of(self.upstream) or legacy_suite(self.upstream)

    @property
    def upstream_dir(self) -> Path | None:
        """The upstream phase's output folder (None without an upstream)."""
        if self.upstream is None:
            return None
        return paths.outputs_root() / self.upstream.session / f"{self.upstream.number:02d}_{self.upstream.phase}"

    def guard(self, before, after, suite: dict | None = None, margin: float | None = None,
              reuse_upstream: bool = True, min_per_family: int = 0):
        """Ask ``before`` and ``after`` (``forgelib.suite.Asker``) the guard's questions over ``suite`` (default:
        the input's), write guard.json, add one gate check per family and the headline numbers; the report.

        ``margin`` overrides the ``guard`` section's (a phase that trades accuracy for size states its own).
        ``reuse_upstream``: ``before`` is the upstream's output asked as its own guard asked it, so the answers that
        guard recorded are reused (checked again on a sample; ``forgelib.suite.guard``). ``min_per_family``: at
        least this many questions per family (``forgelib.suite.guard``)."""
        from ..suite import GuardParams, guard, known_answers

        params = self.guard_params or GuardParams()
        suite = self.input_suite if suite is None else suite
        if not suite:
            raise UpstreamError(f"phase {self.spec.name}: the upstream names no suite of task families to guard "
                                "(and its chain has no Phase 1 to take it from)")
        known = known_answers(self.upstream_dir) if self.upstream_dir is not None and reuse_upstream else None
        return self.record_guard(guard(before, after, suite, params, self.run.seed, margin, known=known,
                                       min_per_family=min_per_family, workers=self.workers))

    def record_guard(self, report):
        """Write a guard report (``forgelib.suite.GuardReport``) as guard.json and add its gate checks and headline
        numbers to the result (``guard`` does it for the report it makes); returns the report."""
        from ..suite import summary_line, write_guard

        self.result.artifacts["guard"] = paths.relative(write_guard(report, self.dir))
        self.result.gate.extend(report.checks())
        worst = min(report.families.items(), key=lambda kv: kv[1].lower)
        self.result.metrics.update({"guard_margin": report.margin, "guard_questions": sum(
            v.n for v in report.families.values()), "guard_worst_family": worst[0],
            "guard_worst_diff": worst[1].diff, "guard_pooled_diff": report.pooled.diff})
        if not self.quiet:
            print(summary_line(report), flush=True)
        return report

    def load_upstream_lm(self, role: str | None = None, trainable: bool = False):
        """(the upstream model ``role`` loaded with ``forgelib.modelio.load_model``, its tokenizer), after the
        checksum check of ``upstream_model_path``."""
        from transformers import AutoTokenizer

        from ..modelio import load_lm

        folder = self.upstream_model_path(role)
        return load_lm(folder, trainable=trainable), AutoTokenizer.from_pretrained(folder)

    def upstream_model_path(self, role: str | None = None) -> Path:
        """Path of an upstream model, verified against its registry checksum.

        ``role`` None takes the upstream's only model, or the one named 'champion'/'model' when several exist.
        """
        if self.upstream is None:
            raise UpstreamError(f"phase {self.spec.name!r} needs an upstream model; pass `upstream=`")
        return upstream_model_path(self.upstream, role, self.registry)


def write_model_folder(final: Path, write: Callable[[Path], None], what: str, session: str | None = None) -> Path:
    """Fill the folder ``final`` atomically: ``write(tmp)`` fills a new hidden sibling (``.<name>.*``) that then takes
    ``final``'s place (an earlier ``final`` is removed only once the new one is in place). When ``write`` fails the
    temporary folder is removed and ``final`` is left as it was; a file-system failure (an OSError, or safetensors'
    or tokenizers' error carrying an OS error code, e.g. a full disk) is an OutputNotWritableError naming ``what``
    and ``final``; any other error propagates."""
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        write(tmp)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        code = os_error_code(exc)
        if code is None:
            raise
        raise OutputNotWritableError(_save_failure(what, final, code, session)) from exc
    if not final.exists():
        os.replace(tmp, final)
        return final
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent)) / final.name
    os.replace(final, old)  # renames within one folder: the earlier model is removed only once the new one is in place
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old.parent, ignore_errors=True)
    return final


_OS_CODE_RE = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


def os_error_code(exc: BaseException) -> int | None:
    """The OS error number behind ``exc``: an OSError's ``errno``, or the code in the text of a Rust library's
    error (safetensors: "I/O error: No space left on device (os error 28)"; tokenizers alike); else None."""
    if isinstance(exc, OSError):
        return exc.errno
    match = _OS_CODE_RE.search(str(exc)[:2000]) if isinstance(exc, Exception) else None
    return int(match.group(1) or match.group(2)) if match else None


def _save_failure(what: str, final: Path, code: int, session: str | None) -> str:
    full = code in (errno.ENOSPC, errno.EDQUOT)
    cause = paths.describe_write_error(OSError(code, os.strerror(code)), final)
    cause += " (the disk is full)" if full else ""
    fix = "free some disk space" if full else f"make {final.parent} writable"
    then = f"forge run --resume {session}" if session else "run it again"
    return (f"{cause} while saving {what}; the partial copy was removed and nothing already written was touched: "
            f"{fix}, then {then}")


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


def as_phase_error(exc: BaseException, folder: Path) -> BaseException:
    """``exc`` unchanged, or, for a file-system error writing outputs (full disk, read-only, a file in the
    way), an OutputNotWritableError naming the path (``folder`` when the error names none). A library's error that
    carries such an OS error code (safetensors': "... (os error 28)") counts as one."""
    if isinstance(exc, PhaseError) or os_error_code(exc) not in paths.WRITE_ERRNOS:
        return exc
    if not isinstance(exc, OSError):
        code = os_error_code(exc)
        return OutputNotWritableError(paths.describe_write_error(OSError(code, os.strerror(code)), folder))
    if exc.filename and not Path(exc.filename).resolve().is_relative_to(paths.outputs_root()):
        return exc  # not one of the run's outputs
    return OutputNotWritableError(paths.describe_write_error(exc, folder))


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


def _find_upstream(spec: PhaseSpec, upstream: str | os.PathLike | PhaseResult | None, all_specs: list[PhaseSpec],
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
    upstream_result, how = _find_upstream(spec, upstream, all_specs, session)
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


class PhaseController:
    """The source design's controller contract over a phase module (no state beyond its arguments).

    ``validate_input`` → ``execute`` → ``validate_output``; ``execute`` returns the PhaseResult.
    """

    def __init__(self, spec: PhaseSpec | str | int, params_file: str = "parameters/smoke.yaml",
                 overrides: dict | None = None, session: str | None = None, upstream: Any = None,
                 all_specs: Iterable[PhaseSpec] | None = None):

        self.all_specs = list(all_specs) if all_specs is not None else list(PHASES)
        self.spec = spec if isinstance(spec, PhaseSpec) else get_spec(spec, self.all_specs)
        self.params_file, self.overrides, self.session, self.upstream = params_file, overrides, session, upstream

    def validate_input(self, input_models: list | None = None) -> bool:
        """True when the upstream (if any) loads and its models verify; raises UpstreamError otherwise."""
        upstream = load_upstream(self._upstream(input_models))
        if upstream is not None:
            from ..registry import ModelRegistry

            registry = ModelRegistry(paths.registry_path())
            for role in upstream.models:
                upstream_model_path(upstream, role, registry)
            registry.close()
        return True

    def execute(self, input_models: list | None = None) -> PhaseResult:
        ctx = open_phase(self.spec, self.params_file, self.overrides, self.session, self._upstream(input_models),
                         self.all_specs)
        self.session = ctx.session
        return run_phase(ctx)

    def validate_output(self, result: PhaseResult) -> bool:
        return result.ok and result.gate_passed and bool(result.models)

    def _upstream(self, input_models: list | None) -> Any:
        return input_models[0] if input_models else self.upstream
