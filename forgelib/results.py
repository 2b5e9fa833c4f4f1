"""PhaseResult: what a phase hands on, written as result.json next to its outputs."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .params import cut, short

RESULT_FILE = "result.json"


@dataclasses.dataclass
class GateCheck:
    """One condition of a phase's gate: ``value`` compared with ``bound`` (``op`` is '>=', '>', '<=' or '<')."""

    name: str
    value: float
    bound: float
    op: str = ">="
    passed: bool = dataclasses.field(default=False)
    note: str = ""
    """Why the check failed when the numbers alone do not say it (e.g. too few questions to decide)."""

    def __post_init__(self) -> None:
        ops = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b,
               "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}
        if self.op not in ops:
            raise ValueError(f"gate check {self.name!r}: unknown op {self.op!r}; valid: {sorted(ops)}")
        if self.value is None:  # a NaN is stored as null in result.json
            self.value = float("nan")
        value = float(self.value)
        self.passed = bool(not math.isnan(value) and ops[self.op](value, float(self.bound)))


@dataclasses.dataclass
class PhaseResult:
    """The outcome of one phase run.

    ``metrics`` holds the few headline numbers; ``models`` maps a model's role (e.g. 'trunk', 'reasoning') to
    ``{"path": ..., "registry_id": ...}``; ``artifacts`` maps names to files (paths relative to the repo root);
    ``upstream`` names the earlier phase run it was given (its session may be another one).
    """

    phase: str
    number: int
    session: str
    status: str = "running"  # running | ok | failed
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    gate: list[GateCheck] = dataclasses.field(default_factory=list)
    models: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    artifacts: dict[str, str] = dataclasses.field(default_factory=dict)
    started_at: str = ""
    finished_at: str = ""
    duration_s: float = 0.0
    error: str | None = None
    upstream: dict[str, str] | None = None
    """The completed phase this run took its input from: ``{"session", "phase", "folder"}`` (None: none)."""
    suite: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    """What the handed-on model knows: task family -> [lowest, highest] level (``forgelib.suite``); every later
    phase guards it."""
    gate_failed: bool = False
    """The gate failed but the chain went on (``run.gates: warn``, exploration): the phase's models are registered
    as gate-failed and ``failed_checks`` names the checks that failed."""
    failed_checks: list[str] = dataclasses.field(default_factory=list)

    @property
    def gate_passed(self) -> bool:
        return all(check.passed for check in self.gate)

    @property
    def accepted(self) -> bool:
        """Completed and handed on: status ok, and the gate held or failed under ``run.gates: warn``."""
        return self.ok and (self.gate_passed or self.gate_failed)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def gate_failures(self) -> list[str]:
        return [f"{c.name} = {c.value:.4g} (needs {c.op} {c.bound:.4g})" + (f": {c.note}" if c.note else "")
                for c in self.gate if not c.passed]

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["gate_passed"] = self.gate_passed
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PhaseResult":
        """The result ``data`` describes; a malformed one (not an object, a gate check or a ``models`` entry of
        the wrong shape) is a ValueError naming the field."""
        if not isinstance(data, dict):
            raise ValueError(f"a phase result is a JSON object, got {type(data).__name__}")
        data = dict(data)
        data.pop("gate_passed", None)
        gate = data.get("gate", [])
        if not isinstance(gate, list) or not all(isinstance(g, dict) for g in gate):
            raise ValueError(f"'gate' must be a list of checks (objects), got {short(gate)}")
        data["gate"] = [_gate_check(g) for g in gate]
        _check_models(data.get("models", {}))
        if not isinstance(data.get("gate_failed", False), bool):
            raise ValueError(f"'gate_failed' must be true or false, got {short(data['gate_failed'])}")
        failed = data.get("failed_checks", [])
        if not isinstance(failed, list) or not all(isinstance(f, str) for f in failed):
            raise ValueError(f"'failed_checks' must be a list of texts, got {short(failed)}")
        return cls(**data)

    def save(self, folder: str | Path) -> Path:
        """Write result.json atomically (a crash never leaves a half-written file)."""
        return write_json_atomic(Path(folder) / RESULT_FILE, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "PhaseResult":
        """Load a result.json (or the result.json inside a phase folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / RESULT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no phase result at {path}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError, RecursionError) as exc:  # bad UTF-8 and bad JSON are ValueErrors
            raise ValueError(f"{path}: not a valid phase result ({cut(str(exc), 200)})") from exc

    def table(self):
        """Headline metrics and gate checks as a pandas DataFrame (for notebooks): one row per metric, a gate
        check on a metric in that metric's row, values as they read (sizes in KiB/MiB, integers as integers)."""
        import pandas as pd

        from .viz.format import show

        rows = {k: {"metric": k, "value": show(k, v), "gate": ""} for k, v in self.metrics.items()}
        for c in self.gate:
            sized = c.name if show(c.name, c.value) != show("", c.value) else ""  # the bound in bytes too
            verdict = f"{c.op} {show(sized, c.bound)} → {'pass' if c.passed else 'FAIL'}"
            same = c.name in rows and rows[c.name]["value"] == show(c.name, c.value) and not rows[c.name]["gate"]
            key = c.name if same else f"gate: {c.name}"
            rows[key] = {"metric": c.name, "value": show(c.name, c.value), "gate": verdict}
        return pd.DataFrame(list(rows.values()), columns=["metric", "value", "gate"])


def _gate_check(data: dict) -> GateCheck:
    try:
        return GateCheck(**{k: v for k, v in data.items() if k != "passed"})
    except (TypeError, ValueError) as exc:  # e.g. a value that is not a number
        raise ValueError(f"gate check {short(data.get('name'))}: {cut(str(exc), 120)}") from None


def _check_models(models: Any) -> None:
    """``models`` must map each role to ``{"path": text, "registry_id": integer or null}`` (ValueError otherwise)."""
    if not isinstance(models, dict):
        raise ValueError(f"'models' must be an object of role -> {{path, registry_id}}, got {short(models)}")
    for role, entry in models.items():
        registry_id = entry.get("registry_id") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not (
                registry_id is None or (isinstance(registry_id, int) and not isinstance(registry_id, bool))):
            raise ValueError(f"models[{short(role)}] must be an object with a 'path' (text) and a 'registry_id' "
                             f"(an integer or null), got {short(entry)}")


def load_report(result: PhaseResult) -> dict:
    """The phase's ``report.json`` (the artifact ``report`` of its result): what its notebook tables and plots."""
    from . import paths

    return json.loads(paths.resolve(result.artifacts["report"]).read_text())


def upstream_chain(folder: str | Path):
    """``(phase folder, PhaseResult)`` from ``folder`` back along each result's ``upstream`` folder (one session or
    a chain across sessions), newest first; stops where a folder has no result.json or the chain repeats."""
    from . import paths

    seen, folder = set(), paths.resolve(folder) if folder else None
    while folder is not None and (folder / RESULT_FILE).is_file() and folder not in seen:
        seen.add(folder)
        result = PhaseResult.load(folder)
        yield folder, result
        up = (result.upstream or {}).get("folder")
        folder = paths.resolve(up) if up else None


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def json_safe(data: Any) -> Any:
    """``data`` with every NaN/inf float (including numpy/torch scalars) replaced by None, so that it
    serializes as strict JSON (``null``); dataclasses, paths and tuples become plain JSON values."""
    if isinstance(data, float) or (hasattr(data, "item") and getattr(data, "ndim", 0) == 0):
        value = data.item() if hasattr(data, "item") else data
        return None if isinstance(value, float) and not math.isfinite(value) else value
    if isinstance(data, dict):
        return {key: json_safe(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(value) for value in data]
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return json_safe(dataclasses.asdict(data))
    return data


def dumps_json(data: Any, indent: int | None = 2, default: Any = None) -> str:
    """Strict JSON text of ``data``: NaN/inf written as null (never the invalid bare ``NaN``); ``default``
    converts other objects (numpy/torch scalars, paths and dataclasses when None)."""
    return json.dumps(json_safe(data), indent=indent, default=default or _json_default, allow_nan=False)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write strict JSON (NaN/inf as null, see :func:`dumps_json`) through a temporary file and an atomic
    rename. On failure the temporary file is removed and ``path`` keeps its earlier content; an OSError names
    ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps_json(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not exc.filename:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    return path
