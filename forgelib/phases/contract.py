"""The phase contract: a PhaseContext is everything a phase module's ``run`` gets.

A phase module (``forgelib.phases.<name>``) holds:
- ``Params``: a dataclass of its parameters (each field documented), loaded from the phase's YAML section;
- ``run(params, ctx) -> PhaseResult``: the work; it saves models through ``ctx.save_model`` and fills
  ``metrics`` (a few headline numbers) and ``gate`` (the checks that must hold before the next phase);
- optionally ``validate_input(params, ctx)`` and ``validate_output(result, ctx)`` raising on a problem.

Phases hand over through files and the registry (model folders + result.json), never through objects in memory;
a model folder is written atomically (``write_model_folder``).
"""
from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .. import paths
from ..params import RunParams
from ..results import PhaseResult, write_json_atomic
from ..session import SessionLock
from .errors import OutputNotWritableError, UpstreamError, os_error_code
from .specs import PhaseSpec
from .upstream import legacy_suite, upstream_model_path


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
        """Save a model (safetensors, through ``forgelib.modelio.save_model``: the folder ``load_model`` reads back)
        atomically under ``models/<role>`` and register it.

        A failed write (full disk, read-only folder; safetensors' and tokenizers' own errors included) removes the
        temporary folder and raises OutputNotWritableError naming the model and ``models/<role>``; an earlier model
        of that role and everything else already written are kept.
        """
        from ..modelio import save_model

        def write(tmp: Path) -> None:
            save_model(model, tmp, tokenizer, safe_serialization=True)

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
              reuse_upstream: bool = True, min_per_family: int = 0, record: bool = True):
        """Ask ``before`` and ``after`` (``forgelib.suite.Asker``) the guard's questions over ``suite`` (default:
        the input's), write guard.json, add one gate check per family and the headline numbers; the report.
        ``record=False``: only the report (a phase choosing between candidates records the one it hands on).

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
        report = guard(before, after, suite, params, self.run.seed, margin, known=known,
                       min_per_family=min_per_family, workers=self.workers)
        return self.record_guard(report) if record else report

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


def _save_failure(what: str, final: Path, code: int, session: str | None) -> str:
    full = code in (errno.ENOSPC, errno.EDQUOT)
    cause = paths.describe_write_error(OSError(code, os.strerror(code)), final)
    cause += " (the disk is full)" if full else ""
    fix = "free some disk space" if full else f"make {final.parent} writable"
    then = f"forge run --resume {session}" if session else "run it again"
    return (f"{cause} while saving {what}; the partial copy was removed and nothing already written was touched: "
            f"{fix}, then {then}")
