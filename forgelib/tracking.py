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
    where the run is and how to upload it. ``notebook`` (the phase notebook's path) is given to W&B so that
    it does not query the Jupyter server for the notebook's name (and print an error when it cannot).
    """

    def __init__(self, project: str, name: str, config: dict | None = None, group: str | None = None,
                 directory: str | Path | None = None, mode: str = "offline", notebook: str | Path | None = None):
        import os

        if notebook is not None and Path(notebook).is_file():
            os.environ.setdefault("WANDB_NOTEBOOK_NAME", str(Path(notebook).resolve()))
        os.environ.setdefault("WANDB_SILENT", "true")  # read when W&B sets itself up (its notebook check too)
        import wandb

        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=name, group=group, config=config or {},
                              dir=str(directory) if directory else None, mode=mode, reinit="create_new",
                              settings=wandb.Settings(silent=True))
        print(self.where(mode))

    def where(self, mode: str) -> str:
        """The one line a user needs: the offline run's folder and its ``wandb sync`` command, or the run URL."""
        from . import paths

        run_dir = paths.relative(self.run_dir) if self.run_dir else "?"
        if mode == "offline":
            return f"W&B offline run: {run_dir} (upload it with: wandb sync {run_dir})"
        return f"W&B run: {getattr(self.run, 'url', None) or run_dir}"

    @property
    def run_dir(self) -> Path | None:
        d = getattr(self.run, "dir", None)
        return Path(d).parent if d else None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log({k: _clean(v) for k, v in metrics.items()}, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            self.run.summary[key] = _clean(value)

    def finish(self) -> None:
        self.run.finish()


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
