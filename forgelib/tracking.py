"""One Tracker interface for metrics: W&B (offline by default), JSON lines (always), or nothing.

Every phase writes its metrics as JSON lines next to its outputs (``metrics.jsonl``); W&B is an extra view
of the same numbers. W&B is imported only when used (its import costs seconds).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterable


def _clean(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than dropping the row
    return value


class Tracker:
    """Interface: ``log(metrics, step)``, ``summary(metrics)``, ``finish()``; usable as a context manager."""

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def summary(self, metrics: dict[str, Any]) -> None:
        """Final numbers of the run (default: logged as one more row)."""
        self.log({f"summary/{k}": v for k, v in metrics.items()})

    def finish(self) -> None:
        """Flush and close."""

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()


class NullTracker(Tracker):
    """Discards everything."""

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        return None


class JsonlTracker(Tracker):
    """Appends one JSON object per ``log`` call: ``{"step": s, "time": t, **metrics}``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", buffering=1)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: _clean(v) for k, v in metrics.items()})
        self._fh.write(json.dumps(row) + "\n")

    def finish(self) -> None:
        if not self._fh.closed:
            self._fh.close()


class WandbTracker(Tracker):
    """A W&B run; offline by default so no network is used (``wandb sync <dir>`` uploads it later).

    W&B's own banners (stderr, shown as red blocks in notebooks) are silenced; one plain line on stdout says
    where the run is and how to upload it (printed when the run is finished). ``notebook`` (the phase notebook's
    path) is given to W&B so that it does not query the Jupyter server for the notebook's name (and print an error
    when it cannot).

    The run starts in a background thread: importing W&B and starting its service take 2-5 s per phase, which the
    phase's own work now covers (measured: `import wandb` 2.5 s and `wandb.init` 2.0 s on a loaded 2-core machine).
    What is logged meanwhile is kept and sent, in order, once the run is up; an error of the start is raised by the
    first ``log``/``summary``/``finish`` after it.
    """

    def __init__(self, project: str, name: str, config: dict | None = None, group: str | None = None,
                 directory: str | Path | None = None, mode: str = "offline", notebook: str | Path | None = None):
        import os
        import threading

        if notebook is not None and Path(notebook).is_file():
            os.environ.setdefault("WANDB_NOTEBOOK_NAME", str(Path(notebook).resolve()))
        os.environ.setdefault("WANDB_SILENT", "true")  # read when W&B sets itself up (its notebook check too)
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self.mode, self.run, self._error = mode, None, None
        self._pending: list[tuple[str, Any, Any]] = []
        self._lock = threading.Lock()
        settings = dict(project=project, name=name, group=group, config=config or {},
                        dir=str(directory) if directory else None, mode=mode)
        self._starter = threading.Thread(target=self._start, args=(settings,), name="forge-wandb-start", daemon=True)
        self._starter.start()

    def _start(self, settings: dict) -> None:
        try:
            import wandb

            self.run = wandb.init(**settings, reinit="create_new", settings=wandb.Settings(silent=True))
        except BaseException as exc:  # raised on the caller's thread (``_flush``)
            self._error = exc

    def _flush(self, wait: bool) -> bool:
        """Send what was kept once the run is up (``wait``: wait for it); whether it is up."""
        if self._starter.is_alive() and not wait:
            return False
        self._starter.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"W&B could not start its run: {error}") from error
        with self._lock:
            pending, self._pending = self._pending, []
        for kind, metrics, step in pending:
            if kind == "log":
                self.run.log(metrics, step=step)
            else:
                for key, value in metrics.items():
                    self.run.summary[key] = value
        return True

    def where(self, mode: str) -> str:
        """The one line a user needs: the offline run's folder and its ``wandb sync`` command, or the run URL."""
        from . import paths

        run_dir = paths.relative(self.run_dir) if self.run_dir else "?"
        if mode == "offline":
            return f"W&B offline run: {run_dir} (upload it with: wandb sync {run_dir})"
        return f"W&B run: {getattr(self.run, 'url', None) or run_dir}"

    @property
    def run_dir(self) -> Path | None:
        self._flush(wait=True)
        d = getattr(self.run, "dir", None)
        return Path(d).parent if d else None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        cleaned = {k: _clean(v) for k, v in metrics.items()}
        if self._flush(wait=False):
            self.run.log(cleaned, step=step)
        else:
            with self._lock:
                self._pending.append(("log", cleaned, step))

    def summary(self, metrics: dict[str, Any]) -> None:
        cleaned = {k: _clean(v) for k, v in metrics.items()}
        if self._flush(wait=False):
            for key, value in cleaned.items():
                self.run.summary[key] = value
        else:
            with self._lock:
                self._pending.append(("summary", cleaned, None))

    def finish(self) -> None:
        self._flush(wait=True)
        self.run.finish()
        print(self.where(self.mode))


class MultiTracker(Tracker):
    """Fans every call out to several trackers."""

    def __init__(self, trackers: Iterable[Tracker]):
        self.trackers = list(trackers)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def summary(self, metrics: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.summary(metrics)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


TRACKING_MODES = ("wandb", "jsonl", "none")


def make_tracker(mode: str, phase_dir: str | Path, *, project: str = "agent-forge", name: str = "",
                 group: str | None = None, config: dict | None = None, wandb_mode: str = "offline",
                 wandb_dir: str | Path | None = None, notebook: str | Path | None = None) -> MultiTracker:
    """The tracker a phase uses: JSONL at ``phase_dir/metrics.jsonl`` plus W&B when ``mode == 'wandb'``.

    ``WANDB_MODE=disabled`` in the environment (as in the tests) turns W&B off whatever the mode.
    """
    import os

    if mode not in TRACKING_MODES:
        raise ValueError(f"unknown tracking mode {mode!r}; valid: {list(TRACKING_MODES)}")
    if mode == "none":
        return MultiTracker([NullTracker()])
    trackers: list[Tracker] = [JsonlTracker(Path(phase_dir) / "metrics.jsonl")]
    if mode == "wandb" and os.environ.get("WANDB_MODE") != "disabled" and wandb_mode != "disabled":
        trackers.append(WandbTracker(project, name, config, group, wandb_dir or Path(phase_dir), wandb_mode,
                                     notebook))
    return MultiTracker(trackers)


def read_jsonl(path: str | Path) -> list[dict]:
    """All rows of a metrics.jsonl (empty list when absent)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- the source design's name -----------------------------------------------------------------------------------

WANDB_MODES = ("offline", "online", "disabled")


class WandBIntegration:
    """The source design's W&B entry point, over the one tracker of this module (:func:`make_tracker`).

    ``WandBIntegration(project_name, mode)``; ``init_phase_run(phase_name, config, session_id)`` opens a phase's
    run; ``log_phase1_metrics(step=..., model_id=..., loss=..., ...)`` to ``log_phase8_metrics(...)`` log under
    ``phaseN/<name>`` (``phaseN/model<id>/<name>`` with a ``model_id``); ``finish()`` closes the run. Every run
    writes ``metrics.jsonl`` (:class:`JsonlTracker`); ``mode`` ``offline`` (default) adds a W&B offline run in the
    same folder, ``online`` an online one, ``disabled`` none (as does ``WANDB_MODE=disabled``).

    The run folder is ``directory`` when given, else ``<outputs root>/tracking/<session_id>/<NN_phase>`` — never a
    session's own phase folder, which belongs to its phase run.
    """

    def __init__(self, project_name: str = "agent-forge", mode: str = "offline", directory: str | Path | None = None):
        from .params import short

        if mode not in WANDB_MODES:
            raise ValueError(f"WandBIntegration: mode must be one of {list(WANDB_MODES)}, got {short(mode)}")
        if not isinstance(project_name, str) or not project_name.strip():
            raise ValueError(f"WandBIntegration: project_name must be a non-empty string, got {short(project_name)}")
        self.project_name, self.mode = project_name, mode
        self.directory = Path(directory) if directory is not None else None
        self.tracker: MultiTracker | None = None
        self.phase: Any = None  # the PhaseSpec of the open run
        self.run_dir: Path | None = None

    def init_phase_run(self, phase_name: str | int, config: dict | None = None, session_id: str | None = None,
                       directory: str | Path | None = None) -> MultiTracker:
        """Open the run of phase ``phase_name`` (``"phase1"``, ``1``, ``"cognate"`` or ``"01_cognate"``) with its
        ``config``; a run still open is finished first. Returns the tracker (``log``, ``summary``, ``finish``)."""
        from . import paths
        from .params import short
        from .phases.specs import PHASES, UnknownPhaseError, get_spec

        key = phase_name
        if isinstance(key, str) and key.lower().startswith("phase") and key[5:].isdigit():
            key = int(key[5:])
        try:
            spec = get_spec(int(key) if isinstance(key, str) and key.isdigit() else key)
        except UnknownPhaseError:
            names = ", ".join(spec.name for spec in PHASES)
            raise ValueError(f"WandBIntegration.init_phase_run: unknown phase {short(phase_name)}; give phase1 to "
                             f"phase{len(PHASES)}, a number or a name ({names})") from None
        if config is not None and not isinstance(config, dict):
            raise ValueError(f"WandBIntegration.init_phase_run: config must be a dict, got {short(config)}")
        session = _session_folder(session_id)
        self.finish()
        if directory is not None:
            self.run_dir = Path(directory)
        else:
            self.run_dir = Path(self.directory or paths.outputs_root() / "tracking") / session / spec.dirname
        self.tracker = make_tracker("wandb", self.run_dir, project=self.project_name, name=f"{session}-{spec.name}",
                                    group=session_id, config={"phase": spec.name, **(config or {})},
                                    wandb_mode=self.mode)
        self.phase = spec
        return self.tracker

    def log_phase_metrics(self, phase: int, step: int | None = None, model_id: Any = None, **metrics: Any) -> None:
        """Log ``metrics`` (numbers) of Phase ``phase`` at ``step`` under ``phase<N>/[model<id>/]<name>``."""
        from .params import short

        if self.tracker is None:
            raise RuntimeError(f"WandBIntegration: call init_phase_run('phase{phase}', config) before "
                               f"log_phase{phase}_metrics")
        if self.phase.number != phase:
            raise ValueError(f"WandBIntegration: the open run is Phase {self.phase.number} ({self.phase.name}); "
                             f"log_phase{phase}_metrics needs init_phase_run('phase{phase}') first")
        for name, value in metrics.items():
            if not _is_number(value):
                raise ValueError(f"WandBIntegration.log_phase{phase}_metrics: {name} must be a number, got "
                                 f"{short(value)}")
        prefix = f"phase{phase}/" + (f"model{model_id}/" if model_id is not None else "")
        self.tracker.log({prefix + name: value for name, value in metrics.items()}, step)

    def log_phase1_metrics(self, step: int | None = None, model_id: Any = None, **metrics: Any) -> None:
        """Phase 1 (Cognate), e.g. ``loss``, ``perplexity``, ``act_steps``, ``gate_entropy``, ``muon_lr``."""
        self.log_phase_metrics(1, step, model_id, **metrics)

    def log_phase2_metrics(self, step: int | None = None, model_id: Any = None, **metrics: Any) -> None:
        """Phase 2 (EvoMerge), e.g. ``generation``, ``best_fitness``, ``mean_fitness``, ``diversity``."""
        self.log_phase_metrics(2, step, model_id, **metrics)

    def log_phase3_metrics(self, step: int | None = None, model_id: Any = None, **metrics: Any) -> None:
        """Phase 3 (Quiet-STaR), e.g. ``loss``, ``reward``, ``thought_length``, ``kl``."""
        self.log_phase_metrics(3, step, model_id, **metrics)

    def log_phase4_metrics(self, step: int | None = None, model_id: Any = None, **metrics: Any) -> None:
        """Phase 4 (BitNet), e.g. ``loss``, ``distill_kl``, ``accuracy_retention``, ``size_mb``."""
        self.log_phase_metrics(4, step, model_id, **metrics)

    def log_phase5_metrics(self, step: int | None = None, model_id: Any = None, **metrics: Any) -> None:
        """Phase 5 (Curriculum), e.g. ``level``, ``accuracy``, ``tool_success_rate``."""
        self.log_phase_metrics(5, step, model_id, **metrics)

    def log_phase6_metrics(self, step: int | None = None, model_id: Any = None, **metrics: Any) -> None:
        """Phase 6 (Baking), e.g. ``kl``, ``gap_closed``, ``adherence``."""
        self.log_phase_metrics(6, step, model_id, **metrics)

    def log_phase7_metrics(self, step: int | None = None, model_id: Any = None, **metrics: Any) -> None:
        """Phase 7 (Experts), e.g. ``reward``, ``routing_accuracy``."""
        self.log_phase_metrics(7, step, model_id, **metrics)

    def log_phase8_metrics(self, step: int | None = None, model_id: Any = None, **metrics: Any) -> None:
        """Phase 8 (Compression), e.g. ``bits_per_weight``, ``accuracy_retention``."""
        self.log_phase_metrics(8, step, model_id, **metrics)

    def finish(self) -> None:
        """Close the open run (nothing when none is open)."""
        if self.tracker is not None:
            self.tracker.finish()
        self.tracker, self.phase = None, None


def _session_folder(session_id: str | None) -> str:
    """``session_id`` when it is a safe folder name (``forgelib.session``'s rule), ``default`` when None."""
    from .params import short
    from .session import SESSION_RULE, InvalidSessionNameError, check_session_name

    if session_id is None:
        return "default"
    try:
        return check_session_name(session_id)
    except InvalidSessionNameError:
        raise ValueError(f"WandBIntegration.init_phase_run: session_id {short(session_id)} is not a safe folder "
                         f"name: it must be {SESSION_RULE}") from None


def _is_number(value: Any) -> bool:
    """A metric value: an int, float or bool, or a 0-d tensor/array of one."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    return isinstance(value, (int, float, bool))
