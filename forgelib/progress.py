"""One progress line at a time from a running phase to the terminal that started it.

A phase notebook runs in its own kernel; what it logs lands in ``<phase folder>/metrics.jsonl`` (one JSON object
per logged step, see ``forgelib.tracking``). :class:`ProgressRelay` follows that file from the pipeline's
process and, every ``interval`` seconds in which something new arrived, emits one line with the newest step and
its loss-like numbers, e.g. ``[forge] 01_cognate: 42s  step 1200  trunk/loss=0.412``.

Inside a phase, :func:`progress_bar` is the training bar: tqdm's widget in JupyterLab, static lines in batch
(papermill) runs, whose saved notebooks would otherwise keep a widget bar frozen at 0%; :func:`timed` records the
seconds of a phase's sub-steps (``report["timing"]``).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

SHOWN_KEYS = ("loss", "fitness", "accuracy", "acc")


def progress_line(label: str, record: dict, seconds: float, max_items: int = 3) -> str:
    """The line for the newest ``record``: elapsed seconds, step, and up to ``max_items`` loss-like numbers."""
    items = [(k, v) for k, v in record.items() if k not in ("step", "time") and isinstance(v, (int, float))
             and k.rsplit("/", 1)[-1] in SHOWN_KEYS]
    parts = [f"{label}: {seconds:.0f}s"]
    if record.get("step") is not None:  # a summary record (logged without a step) has none
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


# --- training bars: widgets where a person watches, plain lines in batch runs --------------------------------------

BATCH_ENV = "FORGE_BATCH"
"""Set to ``1`` in the environment of the kernels that papermill runs (``forgelib.notebooks``): a batch run, where no
frontend ever renders a widget, so a tqdm widget bar would be saved frozen at ``0%``."""


@contextlib.contextmanager
def timed(timing: dict, name: str, cpu: bool = False) -> Iterator[None]:
    """Record the block's wall seconds as ``timing[name + "_s"]`` (rounded to 0.01 s) and, with ``cpu``, this
    process's CPU seconds as ``timing[name + "_cpu_s"]`` (comparable across machine loads). A block that raises
    records nothing. ``with timed(timing, "train"): ...`` is ``t0 = perf_counter(); ...; timing["train_s"] =
    round(perf_counter() - t0, 2)``."""
    started, cpu_started = time.perf_counter(), time.process_time()
    yield
    timing[f"{name}_s"] = round(time.perf_counter() - started, 2)
    if cpu:
        timing[f"{name}_cpu_s"] = round(time.process_time() - cpu_started, 2)


def batch_run() -> bool:
    """Whether this process is a batch (papermill) kernel: :data:`BATCH_ENV` is ``1``."""
    return os.environ.get(BATCH_ENV) == "1"


def progress_bar(iterable: Iterable | None = None, *, desc: str = "", total: int | None = None,
                 disable: bool = False, unit: str = "steps", **tqdm_options: Any):
    """tqdm's bar (``tqdm.auto``: a widget in JupyterLab, text in a terminal), or in a batch run
    (:func:`batch_run`) :class:`StepLines`, which prints static lines: e.g. the final ``qat: 600/600 steps, 45 s``
(``unit`` names what is counted there)."""
    if batch_run():
        return StepLines(iterable, desc=desc, total=total, disable=disable, unit=unit)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=disable, **tqdm_options)


class StepLines:
    """What a batch run shows instead of a bar: the part of tqdm's interface the phases use (iterate, ``update``,
    ``set_postfix``, ``close``, a context manager), printing one line every ``interval`` seconds of progress and a
    last one when done, e.g. ``qat: 600/600 steps, 45 s, loss=0.412``."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str = "", total: int | None = None,
                 disable: bool = False, unit: str = "steps", interval: float = 30.0,
                 file: TextIO | None = None):
        self.iterable, self.desc, self.disable, self.unit, self.interval = iterable, desc, disable, unit, interval
        self.total = total if total is not None or not hasattr(iterable, "__len__") else len(iterable)
        self.n, self.postfix, self.file, self.closed = 0, "", file, False
        self._start = self._shown = time.monotonic()

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "StepLines":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._shown >= self.interval and (self.total is None or self.n < self.total):
            self._print()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._print()

    def line(self) -> str:
        done = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        seconds = time.monotonic() - self._start
        text = f"{self.desc}: {done} {self.unit}, {seconds:.0f} s"
        return text + (f", {self.postfix}" if self.postfix else "")

    def _print(self) -> None:
        self._shown = time.monotonic()
        if not self.disable:
            print(self.line(), file=self.file or sys.stdout, flush=True)
