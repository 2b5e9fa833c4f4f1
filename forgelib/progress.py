"""One progress line at a time from a running phase to the terminal that started it.

A phase notebook runs in its own kernel; what it logs lands in ``<phase folder>/metrics.jsonl`` (one JSON object
per logged step, see ``forgelib.tracking``). :class:`ProgressRelay` follows that file from the pipeline's
process and, every ``interval`` seconds in which something new arrived, emits one line with the newest step and
its loss-like numbers, e.g. ``[forge] 01_cognate: 42s  step 1200  trunk/loss=0.412``.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Callable

SHOWN_KEYS = ("loss", "fitness", "accuracy", "acc")


def progress_line(label: str, record: dict, seconds: float, max_items: int = 3) -> str:
    """The line for the newest ``record``: elapsed seconds, step, and up to ``max_items`` loss-like numbers."""
    items = [(k, v) for k, v in record.items() if k not in ("step", "time") and isinstance(v, (int, float))
             and k.rsplit("/", 1)[-1] in SHOWN_KEYS]
    parts = [f"{label}: {seconds:.0f}s"]
    if "step" in record:
        parts.append(f"step {record['step']}")
    parts += [f"{k}={v:.4g}" for k, v in items[:max_items]]
    return "[forge] " + "  ".join(parts)


class ProgressRelay:
    """Follows ``path`` (a metrics.jsonl being written) in a background thread; ``log`` gets at most one line
    per ``interval`` seconds, only when new records arrived. Use as a context manager around the run."""

    def __init__(self, path: Path, label: str, log: Callable[[str], None], interval: float = 10.0):
        self.path, self.label, self.log, self.interval = Path(path), label, log, interval
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"progress-{label}")
        self._start = time.monotonic()
        self.lines: list[str] = []

    def __enter__(self) -> "ProgressRelay":
        self._start = time.monotonic()
        self._offset = self.path.stat().st_size if self.path.exists() else 0  # only what this run writes
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> str | None:
        """Read what arrived since the last poll; emit and return the line for the newest record, if any."""
        newest = self._read_new()
        if newest is None:
            return None
        line = progress_line(self.label, newest, time.monotonic() - self._start)
        self.lines.append(line)
        self.log(line)
        return line

    def _read_new(self) -> dict | None:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except OSError:
            return None
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self._offset += len(complete)
        newest = None
        for raw in complete.splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                newest = record
        return newest
