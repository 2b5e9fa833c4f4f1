"""SQLite model registry of Agent Forge: sessions, phase runs, models and handoffs.

The registry is one SQLite file in WAL mode, so several processes (the pipeline notebook, a phase
notebook, the ``forge`` CLI) can read while one writes. Every write is a short ``BEGIN IMMEDIATE``
transaction, retried with jittered back-off when another process holds the write lock.

Tables
------
sessions    id, config (JSON), status, current_phase, progress (fraction 0..1), created_at, updated_at
phase_runs  id, session_id, phase_name, status (running/completed/failed/interrupted), started_at,
            finished_at, duration_s, metrics (JSON), error
models      id, session_id, phase_name, model_name, model_path, sha256, size_mb, parameter_count,
            metadata (JSON), created_at, retired_at, retired_reason (set when the run that registered the
            model was interrupted or failed, or its folder was moved aside: a retired model is never verified
            again), status ('active', 'gate-failed': its phase's gate failed under ``run.gates: warn`` and the
            chain went on, or 'retired'; added in place to a registry of the earlier schema)
handoffs    id, session_id, source_phase, source_model_id, target_phase, ok, validation (JSON), created_at

JSON columns hold dicts; timestamps are ISO-8601 strings in UTC. Model checksums are SHA-256 over the
file, or for a folder over every file in sorted relative-path order, names included (see
:func:`forgelib.checksums.compute_checksum`). A session named by
``register_model``/``start_phase_run``/``record_handoff``
that does not exist yet is created on the fly with an empty config and status ``'created'``.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from .checksums import compute_checksum, path_size_mb
from .params import MAX_STORED_BYTES, cut, short, stored_size

__all__ = [
    "ModelRegistry", "RegistryError", "ModelNotFoundError", "ChecksumMismatchError",
    "UnknownRecordError", "SessionExistsError", "RetiredModelError", "CorruptRegistryError", "ConfigTooLargeError",
    "compute_checksum",
    "path_size_mb",
    "SESSION_STATUSES", "PHASE_RUN_STATUSES", "MODEL_STATUSES", "model_status_text",
]

SESSION_STATUSES = ("created", "running", "paused", "completed", "failed", "interrupted")
PHASE_RUN_STATUSES = ("running", "completed", "failed", "interrupted")
_FINISHED_RUN_STATUSES = ("completed", "failed")
MODEL_STATUSES = ("active", "gate-failed", "retired")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, config TEXT NOT NULL, status TEXT NOT NULL, current_phase TEXT,
    progress REAL NOT NULL DEFAULT 0.0, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS phase_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    phase_name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'interrupted')),
    started_at TEXT NOT NULL, finished_at TEXT, duration_s REAL, metrics TEXT, error TEXT);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    phase_name TEXT NOT NULL, model_name TEXT NOT NULL, model_path TEXT NOT NULL,
    sha256 TEXT NOT NULL, size_mb REAL NOT NULL, parameter_count INTEGER, metadata TEXT NOT NULL,
    created_at TEXT NOT NULL, retired_at TEXT, retired_reason TEXT, status TEXT NOT NULL DEFAULT 'active');
CREATE TABLE IF NOT EXISTS handoffs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    source_phase TEXT NOT NULL, source_model_id INTEGER, target_phase TEXT NOT NULL,
    ok INTEGER NOT NULL, validation TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS models_session ON models(session_id, phase_name);
CREATE INDEX IF NOT EXISTS runs_session ON phase_runs(session_id);
CREATE INDEX IF NOT EXISTS handoffs_session ON handoffs(session_id);
"""

_JSON_COLUMNS = ("config", "metrics", "metadata", "validation")


class RegistryError(Exception):
    """Base class of the registry's errors."""


class ModelNotFoundError(RegistryError, FileNotFoundError):
    """A model path to register or verify does not exist on disk."""


class ChecksumMismatchError(RegistryError, ValueError):
    """A model's files no longer match the SHA-256 recorded when it was registered."""

    def __init__(self, path: str, expected: str, actual: str):
        super().__init__(f"checksum mismatch for model at {path}: registered sha256 {expected}, "
                         f"files now hash to {actual}")
        self.path, self.expected, self.actual = path, expected, actual


class UnknownRecordError(RegistryError, KeyError):
    """A model, session or phase run id that the registry does not hold."""

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return str(self.args[0]) if self.args else ""


class RetiredModelError(RegistryError, ValueError):
    """The model was retired (registered by a phase run that was interrupted) and is not handed on."""


class SessionExistsError(RegistryError, ValueError):
    """``create_session`` was asked for an id that already exists (pass ``exist_ok=True``)."""


class ConfigTooLargeError(RegistryError, ValueError):
    """A session config larger than ``forgelib.params.MAX_STORED_BYTES`` as JSON (refused before it is written)."""


class CorruptRegistryError(RegistryError):
    """The registry file exists but is not a readable SQLite database (it is left untouched)."""


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    """ISO-8601 in UTC with a fixed width, so text order equals time order in SQL."""
    if moment.tzinfo is None:
        raise ValueError(f"timestamps must be timezone-aware, got naive datetime {moment!r}")
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _migrate(conn: sqlite3.Connection, statements: list[str]) -> None:
    """Bring a registry written by an earlier version to this schema (idempotent, inside the schema's
    transaction): phase_runs gains the 'interrupted' status, models the retired_at/retired_reason and status columns
    (a model retired before the status column existed gets status 'retired')."""
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'phase_runs'").fetchone()[0]
    if "'interrupted'" not in sql:  # SQLite cannot alter a CHECK constraint: rebuild the table
        create = next(s for s in statements if "TABLE IF NOT EXISTS phase_runs" in s)
        conn.execute("ALTER TABLE phase_runs RENAME TO phase_runs_v1")
        conn.execute(create)
        conn.execute("INSERT INTO phase_runs SELECT * FROM phase_runs_v1")
        conn.execute("DROP TABLE phase_runs_v1")
        conn.execute("CREATE INDEX IF NOT EXISTS runs_session ON phase_runs(session_id)")
    columns = {row[1] for row in conn.execute("PRAGMA table_info(models)")}
    for column in ("retired_at", "retired_reason"):
        if column not in columns:
            conn.execute(f"ALTER TABLE models ADD COLUMN {column} TEXT")
    if "status" not in columns:
        conn.execute("ALTER TABLE models ADD COLUMN status TEXT NOT NULL DEFAULT 'active'")
        conn.execute("UPDATE models SET status = 'retired' WHERE retired_at IS NOT NULL")


def model_status_text(row: dict, limit: int = 120) -> str:
    """A model row's status in words: ``active``, ``gate-failed`` or ``retired: <reason>`` (cut to ``limit``)."""
    if row.get("retired_at"):
        return cut(f"retired: {row.get('retired_reason') or 'no reason recorded'}", limit)
    return str(row.get("status") or "active")


def _check_policy(keep_sessions: int | None, max_age_days: float | None) -> None:
    if keep_sessions is None and max_age_days is None:
        raise ValueError("cleanup needs a policy: keep_sessions and/or max_age_days")
    if keep_sessions is not None and (not isinstance(keep_sessions, int) or keep_sessions < 0):
        raise ValueError(f"keep_sessions must be an int >= 0, got {keep_sessions!r}")
    if max_age_days is not None and (isinstance(max_age_days, bool) or not isinstance(max_age_days, (int, float))
                                     or not math.isfinite(max_age_days) or max_age_days < 0):
        raise ValueError(f"max_age_days must be a finite, non-negative number of days, got {short(max_age_days)}")


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


_TABLE_OF = {"config": "sessions", "metrics": "phase_runs", "metadata": "models", "validation": "handoffs"}
"""The table that holds each JSON column (for the message naming a row whose JSON does not decode)."""


def _decode(row: sqlite3.Row | None, db_path: Path | str = "") -> dict | None:
    """A row as a dict with its JSON columns decoded and ``ok`` as a bool. A JSON column that does not hold a
    JSON object (a row changed outside forge) is a CorruptRegistryError naming the registry, table, row and column."""
    if row is None:
        return None
    out = dict(row)
    for column in _JSON_COLUMNS:
        if column in out and out[column] is not None:
            try:
                value = json.loads(out[column])
                problem = None if isinstance(value, dict) else f"holds {type(value).__name__}, not a JSON object"
            except (ValueError, TypeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
                problem = f"is not valid JSON ({cut(str(exc), 120)})"
            if problem is not None:
                raise CorruptRegistryError(_bad_row_message(db_path, _TABLE_OF[column], out, column, problem))
            out[column] = value
    if "ok" in out:
        out["ok"] = bool(out["ok"])
    return out


def _bad_row_message(db_path: Path | str, table: str, row: dict, column: str, problem: str) -> str:
    owner = f" of session {short(row['session_id'])}" if table != "sessions" and "session_id" in row else ""
    return (f"registry {db_path}: {table} row {short(row.get('id'))}{owner}: its {column} column {problem}; the row "
            "was changed outside forge: repair or delete that row (sqlite3), or move the registry aside (the next "
            "run starts a new, empty one)")


def _decode_json(text: str | None) -> dict | None:
    try:
        value = json.loads(text) if text else None
    except (ValueError, TypeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _encode(value: dict | None, field: str) -> str:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a dict (stored as JSON), got {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"{field} must be JSON-serialisable: {exc}") from exc


def _check_choice(value: str, field: str, valid: Iterable[str]) -> None:
    valid = tuple(valid)
    if value not in valid:
        raise ValueError(f"unknown {field} {value!r}; valid values: {', '.join(valid)}")


def _open_error(db_path: Path, exc: sqlite3.DatabaseError) -> Exception:
    """The error to raise when ``db_path`` cannot be opened as the registry (the file is never touched)."""
    if isinstance(exc, sqlite3.OperationalError):
        if _is_locked(exc):
            return exc
        return RegistryError(f"cannot open the registry {db_path}: {exc}")
    if _is_corrupt(exc) and "not a database" not in str(exc):
        return _corrupt_error(db_path, str(exc))
    return CorruptRegistryError(
        f"registry {db_path} is not a SQLite database ({exc}); move it aside (the next run starts a new, "
        "empty registry) or point FORGE_OUTPUTS at another folder")


def _is_corrupt(exc: BaseException) -> bool:
    """Whether SQLite reports the database file itself as damaged (not a lock, a constraint or a usage error)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return isinstance(exc, sqlite3.DatabaseError) and (
        name.startswith("SQLITE_CORRUPT") or name == "SQLITE_NOTADB" or "malformed" in str(exc))


def _corrupt_error(db_path: Path, problem: str) -> "CorruptRegistryError":
    return CorruptRegistryError(
        f"registry {db_path} is damaged ({cut(problem, 200)}); nothing was written to it: restore it from a backup, "
        "or move it aside together with its -wal/-shm files (the next run starts a new, empty registry)")


class ModelRegistry:
    """The SQLite (WAL) registry of sessions, phase runs, models and handoffs.

    Args:
        db_path: database file; a relative path is taken from the repository root.
        outputs_root: the only folder whose contents ``cleanup`` may delete; defaults to the folder
            holding the database (the registry lives in ``outputs/``).
        timeout_s: how long one statement waits for another process's write lock (busy timeout).
        max_retries: extra attempts of a whole transaction that still met "database is locked".
        clock: returns the current time as an aware datetime; injectable so that tests can age rows.
    """

    def __init__(self, db_path: str | os.PathLike, *, outputs_root: str | os.PathLike | None = None,
                 timeout_s: float = 30.0, max_retries: int = 20,
                 clock: Callable[[], datetime] | None = None):
        from forgelib.paths import resolve

        self.db_path = resolve(db_path).resolve()
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        root = outputs_root if outputs_root is not None else self.db_path.parent
        self.outputs_root = resolve(root).resolve()
        self._clock = clock or _utc_now
        self._max_retries = max_retries
        self._lock = threading.RLock()  # one connection, shared safely by notebook widget threads
        self._conn: sqlite3.Connection | None = None
        try:
            self._conn = sqlite3.connect(str(self.db_path), timeout=timeout_s, isolation_level=None,
                                         check_same_thread=False)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
            self._retry(self._check_intact)  # before anything is written: a damaged file is never written to
            self._retry(self._init_db)
        except sqlite3.DatabaseError as exc:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            raise _open_error(self.db_path, exc) from None

    # ------------------------------------------------------------------ plumbing
    def _check_intact(self) -> None:
        """``PRAGMA quick_check`` (every page and record readable; ~0.1 s for 100k model rows): a damaged file is a
        CorruptRegistryError naming it, raised before anything is written."""
        rows = [str(row[0]) for row in self._connection().execute("PRAGMA quick_check(3)").fetchall()]
        if rows != ["ok"]:
            lines = [line for row in rows for line in row.splitlines() if line and not line.startswith("***")]
            raise _corrupt_error(self.db_path, "; ".join(lines[:2]) or "quick_check failed")

    def _init_db(self) -> None:
        conn = self._connection()
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RegistryError(f"could not switch {self.db_path} to WAL mode (got {mode!r}); "
                                "is it on a network file system?")
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL is crash-safe and much faster
        conn.execute("PRAGMA foreign_keys = ON")
        # statement by statement: executescript would commit the surrounding transaction
        statements = [s.strip() for s in _SCHEMA.split(";") if s.strip()]

        def work(conn: sqlite3.Connection) -> None:
            for statement in statements:
                conn.execute(statement)
            _migrate(conn, statements)
        self._write(work, retry=False)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RegistryError(f"registry {self.db_path} is closed")
        return self._conn

    def _retry(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; when SQLite still reports a lock after its busy timeout, back off and retry."""
        delay = 0.01
        for attempt in range(self._max_retries + 1):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc) or attempt == self._max_retries:
                    raise
                time.sleep(delay * (1.0 + random.random()))  # jitter so writers do not re-collide
                delay = min(delay * 2.0, 1.0)
        raise AssertionError("unreachable")

    def _write(self, fn: Callable[[sqlite3.Connection], Any], retry: bool = True) -> Any:
        """Run ``fn(conn)`` in one short ``BEGIN IMMEDIATE`` transaction (taking the write lock up
        front, so two writers never deadlock upgrading read locks)."""
        def attempt() -> Any:
            with self._lock:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                return result
        return self._guarded(lambda: self._retry(attempt) if retry else attempt())

    def _query(self, sql: str, params: tuple = ()) -> list[dict]:
        def attempt() -> list[dict]:
            with self._lock:
                return [_decode(r, self.db_path) for r in self._connection().execute(sql, params).fetchall()]
        return self._guarded(lambda: self._retry(attempt))

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        """``fn()``; SQLite's "database disk image is malformed" (a page damaged since the file was opened) becomes
        a CorruptRegistryError naming the file."""
        try:
            return fn()
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                raise
            raise _corrupt_error(self.db_path, str(exc)) from None

    def _now(self) -> str:
        return _iso(self._clock())

    # ------------------------------------------------------------------ sessions
    def _ensure_session(self, conn: sqlite3.Connection, session_id: str) -> None:
        if not isinstance(session_id, str) or not session_id:
            raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")
        now = self._now()
        conn.execute("INSERT OR IGNORE INTO sessions (id, config, status, current_phase, progress, "
                     "created_at, updated_at) VALUES (?, '{}', 'created', NULL, 0.0, ?, ?)",
                     (session_id, now, now))

    def create_session(self, session_id: str, config: dict | None = None, *,
                       exist_ok: bool = False) -> dict:
        """Create a session with its config (a dict). An existing id raises ``SessionExistsError``
        unless ``exist_ok``, in which case its config is replaced (e.g. when a session resumes). A config over
        ``MAX_STORED_BYTES`` as JSON raises ``ConfigTooLargeError`` before anything is written (it is read back by
        every listing of the sessions)."""
        if stored_size(config or {}, MAX_STORED_BYTES) > MAX_STORED_BYTES:
            raise ConfigTooLargeError(f"session {session_id!r}: its config would take more than "
                                      f"{MAX_STORED_BYTES // 1024} KB in the registry; refused, nothing was written")
        encoded = _encode(config, "config")

        def work(conn: sqlite3.Connection) -> None:
            exists = conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if exists and not exist_ok:
                raise SessionExistsError(f"session {session_id!r} already exists; pass exist_ok=True "
                                         "to reuse it")
            self._ensure_session(conn, session_id)
            conn.execute("UPDATE sessions SET config = ?, updated_at = ? WHERE id = ?",
                         (encoded, self._now(), session_id))
        self._write(work)
        return self.get_session(session_id)

    def get_session(self, session_id: str) -> dict:
        """The session row as a dict (config decoded); unknown ids raise ``UnknownRecordError``."""
        rows = self._query("SELECT * FROM sessions WHERE id = ?", (session_id,))
        if not rows:
            known = [r["id"] for r in self._query(
                "SELECT id FROM sessions ORDER BY created_at DESC, rowid DESC LIMIT 20")]
            raise UnknownRecordError(f"unknown session {session_id!r}; known sessions (newest 20): "
                                     f"{known}")
        return rows[0]

    def list_sessions(self, status: str | None = None) -> list[dict]:
        """All sessions, oldest first, optionally only those with ``status``."""
        if status is None:
            return self._query("SELECT * FROM sessions ORDER BY created_at, rowid")
        _check_choice(status, "session status", SESSION_STATUSES)
        return self._query("SELECT * FROM sessions WHERE status = ? ORDER BY created_at, rowid",
                           (status,))

    def update_session(self, session_id: str, *, status: str | None = None,
                       current_phase: str | None = None, progress: float | None = None) -> dict:
        """Set any of status (one of ``SESSION_STATUSES``), current phase and progress (0..1)."""
        updates: dict[str, Any] = {}
        if status is not None:
            _check_choice(status, "session status", SESSION_STATUSES)
            updates["status"] = status
        if current_phase is not None:
            updates["current_phase"] = current_phase
        if progress is not None:
            if not 0.0 <= float(progress) <= 1.0:
                raise ValueError(f"progress must be a fraction in [0, 1], got {progress!r}")
            updates["progress"] = float(progress)
        self.get_session(session_id)  # clear error for an unknown id
        updates["updated_at"] = self._now()
        assignments = ", ".join(f"{column} = ?" for column in updates)  # column names are ours
        self._write(lambda c: c.execute(f"UPDATE sessions SET {assignments} WHERE id = ?",
                                        (*updates.values(), session_id)))
        return self.get_session(session_id)

    # ------------------------------------------------------------------ phase runs
    def start_phase_run(self, session_id: str, phase_name: str) -> int:
        """Record that ``phase_name`` started in ``session_id``; returns the run id."""
        if not isinstance(phase_name, str) or not phase_name:
            raise ValueError(f"phase_name must be a non-empty string, got {phase_name!r}")

        def work(conn: sqlite3.Connection) -> int:
            self._ensure_session(conn, session_id)
            cursor = conn.execute("INSERT INTO phase_runs (session_id, phase_name, status, started_at, "
                                  "metrics) VALUES (?, ?, 'running', ?, '{}')",
                                  (session_id, phase_name, self._now()))
            return int(cursor.lastrowid)
        return self._write(work)

    def get_phase_run(self, run_id: int) -> dict:
        """One phase run as a dict; unknown ids raise ``UnknownRecordError``."""
        rows = self._query("SELECT * FROM phase_runs WHERE id = ?", (int(run_id),))
        if not rows:
            raise UnknownRecordError(f"unknown phase run id {run_id!r}")
        return rows[0]

    def finish_phase_run(self, run_id: int, status: str, metrics: dict | None = None,
                         error: str | None = None) -> dict:
        """Close a running phase run as 'completed' or 'failed', with its duration and metrics."""
        _check_choice(status, "phase run status", _FINISHED_RUN_STATUSES)
        encoded = _encode(metrics, "metrics")
        run = self.get_phase_run(run_id)
        if run["status"] != "running":
            raise ValueError(f"phase run {run_id} is already {run['status']!r}; only a 'running' run "
                             "can be finished")
        finished = self._clock()
        duration = (finished - datetime.fromisoformat(run["started_at"])).total_seconds()
        changed = self._write(lambda c: c.execute(
            "UPDATE phase_runs SET status = ?, finished_at = ?, duration_s = ?, metrics = ?, error = ? "
            "WHERE id = ? AND status = 'running'",  # guarded: another process may finish it first
            (status, _iso(finished), duration, encoded, error, int(run_id))).rowcount)
        if changed != 1:
            raise ValueError(f"phase run {run_id} was finished by another writer meanwhile")
        return self.get_phase_run(run_id)

    def list_phase_runs(self, session_id: str, phase_name: str | None = None) -> list[dict]:
        """A session's phase runs in start order, optionally of one phase only."""
        if phase_name is None:
            return self._query("SELECT * FROM phase_runs WHERE session_id = ? ORDER BY id",
                               (session_id,))
        return self._query("SELECT * FROM phase_runs WHERE session_id = ? AND phase_name = ? "
                           "ORDER BY id", (session_id, phase_name))

    def interrupt_stale_runs(self, session_id: str) -> list[dict]:
        """Mark the session's runs still 'running' as 'interrupted' and retire the models each registered.

        Call it only while holding the session's lock (forgelib.session): then nothing of the session really
        runs, and a 'running' row is what a killed process left behind. A run's models are those of its
        session and phase registered from its start until the next run of that phase. Returns the runs marked.
        """
        error = "interrupted: its process ended while the phase was running (found when the session resumed)"

        def work(conn: sqlite3.Connection) -> list[int]:
            stale = conn.execute("SELECT id, phase_name, started_at FROM phase_runs WHERE session_id = ? AND "
                                 "status = 'running' ORDER BY id", (session_id,)).fetchall()
            now = self._now()
            for run in stale:
                until = conn.execute("SELECT MIN(started_at) FROM phase_runs WHERE session_id = ? AND "
                                     "phase_name = ? AND id > ?", (session_id, run["phase_name"], run["id"])
                                     ).fetchone()[0]
                conn.execute("UPDATE models SET retired_at = ?, retired_reason = ?, status = 'retired' WHERE "
                             "session_id = ? AND "
                             "phase_name = ? AND created_at >= ? AND (? IS NULL OR created_at < ?) AND "
                             "retired_at IS NULL", (now, f"registered by phase run {run['id']}, which was "
                                                    "interrupted", session_id, run["phase_name"],
                                                    run["started_at"], until, until))
                conn.execute("UPDATE phase_runs SET status = 'interrupted', finished_at = ?, error = ? "
                             "WHERE id = ?", (now, error, run["id"]))
            return [run["id"] for run in stale]
        return [self.get_phase_run(run_id) for run_id in self._write(work)]

    # ------------------------------------------------------------------ models
    def register_model(self, *, session_id: str, phase_name: str, model_name: str,
                       model_path: str | os.PathLike, metadata: dict | None = None,
                       parameter_count: int | None = None) -> int:
        """Register a model file or folder; computes its SHA-256 and size. Returns the model id.

        Raises ``ModelNotFoundError`` when ``model_path`` does not exist.
        """
        from forgelib.paths import resolve

        # absolute and normalised, but links kept: cleanup resolves them itself before deleting
        path = Path(os.path.abspath(resolve(model_path)))
        encoded = _encode(metadata, "metadata")
        if parameter_count is not None and int(parameter_count) < 0:
            raise ValueError(f"parameter_count must be >= 0, got {parameter_count!r}")
        # hash before taking the write lock: reading a large model must not block other writers
        if not path.exists():
            raise ModelNotFoundError(f"model path does not exist: {path}")
        sha256, size_mb = compute_checksum(path), path_size_mb(path)

        def work(conn: sqlite3.Connection) -> int:
            self._ensure_session(conn, session_id)
            cursor = conn.execute(
                "INSERT INTO models (session_id, phase_name, model_name, model_path, sha256, size_mb, "
                "parameter_count, metadata, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (session_id, phase_name, model_name, str(path), sha256, size_mb,
                 None if parameter_count is None else int(parameter_count), encoded, self._now()))
            return int(cursor.lastrowid)
        return self._write(work)

    def get_model(self, model_id: int) -> dict:
        """The model row as a dict (metadata decoded); unknown ids raise ``UnknownRecordError``."""
        rows = self._query("SELECT * FROM models WHERE id = ?", (int(model_id),))
        if not rows:
            raise UnknownRecordError(f"unknown model id {model_id!r}; list_models() shows the "
                                     "registered ones")
        return rows[0]

    def list_models(self, session_id: str | None = None, phase_name: str | None = None) -> list[dict]:
        """Registered models in registration order, filtered by session and/or phase."""
        clauses, params = [], []
        for column, value in (("session_id", session_id), ("phase_name", phase_name)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        return self._query(f"SELECT * FROM models{where} ORDER BY id", tuple(params))

    def model_paths(self, exclude_sessions: Iterable[str] = ()) -> list[str]:
        """The model paths registered by every session but ``exclude_sessions`` (their metadata is not decoded)."""
        excluded = list(exclude_sessions)
        sql = f"SELECT DISTINCT model_path FROM models WHERE session_id NOT IN ({','.join('?' * len(excluded))})"
        return [row["model_path"] for row in self._query(sql, tuple(excluded))]

    def latest_model(self, session_id: str, phase_name: str) -> dict | None:
        """The most recently registered model of a session's phase that is not retired, or None."""
        models = [m for m in self.list_models(session_id=session_id, phase_name=phase_name)
                  if m.get("retired_at") is None]
        return models[-1] if models else None

    def set_model_status(self, model_ids: Iterable[int], status: str, reason: str | None = None,
                         metadata: dict | None = None) -> None:
        """Mark models ``status`` (one of ``MODEL_STATUSES``): 'retired' with ``reason`` (a model already retired
        keeps its first reason), 'gate-failed' with ``metadata`` merged into each row's metadata."""
        _check_choice(status, "model status", MODEL_STATUSES)
        ids = [int(i) for i in model_ids]
        if status == "retired" and not reason:
            raise ValueError("retiring a model needs a reason")

        def work(conn: sqlite3.Connection) -> None:
            now = self._now()
            for model_id in ids:
                if status == "retired":
                    conn.execute("UPDATE models SET status = 'retired', retired_at = ?, retired_reason = ? "
                                 "WHERE id = ? AND retired_at IS NULL", (now, reason, model_id))
                    continue
                row = conn.execute("SELECT metadata FROM models WHERE id = ?", (model_id,)).fetchone()
                if row is None:
                    raise UnknownRecordError(f"unknown model id {model_id!r}")
                merged = {**(_decode_json(row["metadata"]) or {}), **(metadata or {})}
                conn.execute("UPDATE models SET status = ?, metadata = ? WHERE id = ? AND retired_at IS NULL",
                             (status, _encode(merged, "metadata"), model_id))
        self._write(work)

    def move_model_paths(self, session_id: str, old: str | os.PathLike, new: str | os.PathLike,
                         reason: str) -> list[int]:
        """A folder of ``session_id`` was moved from ``old`` to ``new`` (an incomplete attempt set aside): its
        models' rows point into ``new`` and are retired with ``reason`` (never left pointing at the folder the
        next attempt writes). Returns the ids of the rows changed."""
        old_path, new_path = Path(os.path.abspath(old)), Path(os.path.abspath(new))

        def work(conn: sqlite3.Connection) -> list[int]:
            changed, now = [], self._now()
            rows = conn.execute("SELECT id, model_path FROM models WHERE session_id = ?", (session_id,)).fetchall()
            for row in rows:
                path = Path(row["model_path"])
                if path == old_path or path.is_relative_to(old_path):
                    moved = new_path / path.relative_to(old_path)
                    conn.execute("UPDATE models SET model_path = ?, status = 'retired', "
                                 "retired_at = COALESCE(retired_at, ?), retired_reason = COALESCE(retired_reason, ?) "
                                 "WHERE id = ?", (str(moved), now, reason, row["id"]))
                    changed.append(row["id"])
            return changed
        return self._write(work)

    def verify_model(self, model_id: int) -> str:
        """Recompute the model's checksum; returns its path when the files are unchanged.

        Raises ``RetiredModelError`` for a retired model, ``ModelNotFoundError`` when the files are gone
        and ``ChecksumMismatchError`` (naming the path and both hashes) when they changed.
        """
        model = self.get_model(model_id)
        if model.get("retired_at"):
            raise RetiredModelError(f"model {model_id} ({model['model_name']!r}) was retired at "
                                    f"{model['retired_at']} ({model['retired_reason']}); it is not handed on")
        path = model["model_path"]
        if not Path(path).exists():
            raise ModelNotFoundError(f"files of model {model_id} ({model['model_name']!r}) are gone: "
                                     f"{path}")
        actual = compute_checksum(path)
        if actual != model["sha256"]:
            raise ChecksumMismatchError(path, model["sha256"], actual)
        return path

    # ------------------------------------------------------------------ handoffs
    def record_handoff(self, session_id: str, source_phase: str, source_model_id: int | None,
                       target_phase: str, ok: bool, validation: dict | None = None) -> int:
        """Record a phase-to-phase handoff and its validation result; returns the handoff id."""
        encoded = _encode(validation, "validation")
        if source_model_id is not None:
            self.get_model(source_model_id)  # clear error for an unknown model

        def work(conn: sqlite3.Connection) -> int:
            self._ensure_session(conn, session_id)
            cursor = conn.execute(
                "INSERT INTO handoffs (session_id, source_phase, source_model_id, target_phase, ok, "
                "validation, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (session_id, source_phase, source_model_id, target_phase, int(bool(ok)), encoded,
                 self._now()))
            return int(cursor.lastrowid)
        return self._write(work)

    def list_handoffs(self, session_id: str) -> list[dict]:
        """A session's handoffs in the order they were recorded (``ok`` as bool)."""
        return self._query("SELECT * FROM handoffs WHERE session_id = ? ORDER BY id", (session_id,))

    # ------------------------------------------------------------------ cleanup
    def _select_sessions(self, conn: sqlite3.Connection, keep_sessions: int | None,
                         max_age_days: float | None, now: datetime) -> list[str]:
        """Ids of sessions that break a policy: outside the ``keep_sessions`` newest, or created
        more than ``max_age_days`` before ``now``. Either policy alone selects a session."""
        rows = conn.execute("SELECT id, created_at FROM sessions "
                            "ORDER BY created_at DESC, rowid DESC").fetchall()
        selected = set()
        if keep_sessions is not None:
            selected.update(row["id"] for row in rows[keep_sessions:])
        if max_age_days is not None:
            try:
                cutoff = _iso(now - timedelta(days=max_age_days))
            except OverflowError:  # further back than any date: no session is that old
                cutoff = ""
            selected.update(row["id"] for row in rows if row["created_at"] < cutoff)
        return [row["id"] for row in rows if row["id"] in selected]

    def _delete_rows(self, conn: sqlite3.Connection, sessions: list[str], dry_run: bool) -> dict:
        """Delete (or, dry, only count) the sessions' rows; returns what went and the model paths."""
        marks = ",".join("?" * len(sessions))
        models = conn.execute(f"SELECT id, session_id, model_path FROM models WHERE session_id IN ({marks})",
                              sessions).fetchall()
        kept_paths = {row[0] for row in conn.execute(
            f"SELECT model_path FROM models WHERE session_id NOT IN ({marks})", sessions)}
        counts = {}
        for table in ("handoffs", "phase_runs", "models"):
            sql = f"FROM {table} WHERE session_id IN ({marks})"
            counts[table] = conn.execute(f"SELECT COUNT(*) {sql}", sessions).fetchone()[0]
            if not dry_run:
                conn.execute(f"DELETE {sql}", sessions)
        if not dry_run:
            conn.execute(f"DELETE FROM sessions WHERE id IN ({marks})", sessions)
        owners: dict[str, set[str]] = {}
        for row in models:
            owners.setdefault(row["model_path"], set()).add(row["session_id"])
        return {"models": [row["id"] for row in models], "phase_runs": counts["phase_runs"],
                "handoffs": counts["handoffs"], "paths": dict(sorted(owners.items())), "kept_paths": kept_paths}

    def _path_verdict(self, path: str, owners: set[str], root: Path, kept_paths: set[str],
                      kept_holders: set[Path]) -> str | None:
        """Why ``path`` (registered by the sessions ``owners``, all being deleted) must not be deleted, or None when
        it may be: only what lies inside the folder of a session being deleted goes."""
        if path in kept_paths:
            return "still registered by a kept session"
        resolved = Path(path).resolve()  # follows links: a link pointing outside the root is outside
        if resolved == root or not resolved.is_relative_to(root):
            return f"outside outputs_root {root}"
        folders = [(root / session).resolve() for session in sorted(owners)]
        if not any(folder.parent == root and resolved.is_relative_to(folder) for folder in folders):
            return cut(f"outside the folder of session {short(min(owners))} ({root / min(owners)})", 200)
        if self.db_path.is_relative_to(resolved):
            return "holds the registry database"
        if resolved in kept_holders:
            return "holds a model registered by a kept session"
        if not resolved.exists():
            return "already gone"
        return None

    def _remove_files(self, paths: dict[str, set[str]], root: Path, kept_paths: set[str],
                      dry_run: bool) -> tuple[list[str], list[dict]]:
        deleted, skipped = [], []
        # every folder that holds (or is) a kept model, resolved: a set, so each verdict is one look-up
        kept_holders = {folder for kept in kept_paths if paths for resolved in [Path(kept).resolve()]
                        for folder in (resolved, *resolved.parents)}
        for path, owners in paths.items():
            reason = self._path_verdict(path, owners, root, kept_paths, kept_holders)
            if reason is None and not dry_run:
                try:
                    target = Path(path)
                    shutil.rmtree(target) if target.is_dir() and not target.is_symlink() \
                        else target.unlink()
                except OSError as exc:
                    reason = f"could not delete: {exc}"
            if reason is None:
                deleted.append(path)
            else:
                skipped.append({"path": path, "reason": reason})
        return deleted, skipped

    def cleanup(self, keep_sessions: int | None = None, max_age_days: float | None = None,
                dry_run: bool = False, outputs_root: str | os.PathLike | None = None,
                now: datetime | None = None) -> dict:
        """Delete old sessions: their rows (runs, models, handoffs) and their model files/folders.

        A session is removed when it is not among the ``keep_sessions`` newest (by creation time) or
        was created more than ``max_age_days`` ago (``now`` defaults to the registry's clock). Files
        are deleted only when they lie inside the folder of the session being deleted that registered
        them (``outputs_root/<session>``, resolved: never another session's folder, never outside
        ``outputs_root``, default: the registry's), hold no model of a kept session and do not hold
        the database; anything else is
        reported under ``skipped_paths``. With ``dry_run`` nothing changes and the report says what
        would go. Returns ``{'dry_run', 'sessions', 'models', 'phase_runs', 'handoffs',
        'deleted_paths', 'skipped_paths'}``. (``forge clean`` uses :meth:`select_sessions` and
        :meth:`delete_sessions` instead, to skip sessions in use.)
        """
        _check_policy(keep_sessions, max_age_days)
        moment = now or self._clock()
        return self._delete(lambda conn: self._select_sessions(conn, keep_sessions, max_age_days, moment),
                            dry_run, outputs_root)

    def select_sessions(self, keep_sessions: int | None = None, max_age_days: float | None = None,
                        now: datetime | None = None) -> list[str]:
        """Ids of the sessions that :meth:`cleanup` would remove under this policy, newest first."""
        _check_policy(keep_sessions, max_age_days)
        moment = now or self._clock()
        return self._guarded(lambda: self._retry(
            lambda: self._select_sessions(self._connection(), keep_sessions, max_age_days, moment)))

    def delete_sessions(self, sessions: Iterable[str], dry_run: bool = False,
                        outputs_root: str | os.PathLike | None = None) -> dict:
        """Delete the named sessions' rows and model files as :meth:`cleanup` does (same report)."""
        chosen = list(sessions)
        return self._delete(lambda conn: [row["id"] for row in conn.execute(
            f"SELECT id FROM sessions WHERE id IN ({','.join('?' * len(chosen))}) "
            "ORDER BY created_at DESC, rowid DESC", chosen)] if chosen else [], dry_run, outputs_root)

    def _delete(self, choose: Callable[[sqlite3.Connection], list[str]], dry_run: bool,
                outputs_root: str | os.PathLike | None) -> dict:
        root = Path(outputs_root).resolve() if outputs_root is not None else self.outputs_root

        def work(conn: sqlite3.Connection) -> tuple[list[str], dict]:
            sessions = choose(conn)
            if not sessions:
                return sessions, {"models": [], "phase_runs": 0, "handoffs": 0, "paths": {},
                                  "kept_paths": set()}
            return sessions, self._delete_rows(conn, sessions, dry_run)
        sessions, rows = self._write(work)
        # rows go first, in one transaction; files after, so a failed delete leaves no dangling row
        deleted, skipped = self._remove_files(rows["paths"], root, rows["kept_paths"], dry_run)
        return {"dry_run": dry_run, "sessions": sessions, "models": rows["models"],
                "phase_runs": rows["phase_runs"], "handoffs": rows["handoffs"],
                "deleted_paths": deleted, "skipped_paths": skipped}

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Checkpoint the WAL into the main file (``wal_checkpoint(TRUNCATE)``) and close."""
        with self._lock:
            if self._conn is None:
                return
            try:
                # best effort: a checkpoint blocked by another process's reader is not an error
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc):
                    raise
            finally:
                self._conn.close()
                self._conn = None

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
        return self._conn is None

    def journal_mode(self) -> str:
        """The database's journal mode as SQLite reports it (``'wal'``)."""
        return self._query("PRAGMA journal_mode")[0]["journal_mode"]

    def __enter__(self) -> "ModelRegistry":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelRegistry({str(self.db_path)!r}{', closed' if self.closed else ''})"
