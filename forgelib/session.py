"""Session ids and the per-session lock.

A session id names a folder directly under ``outputs/``, so it is restricted to a safe character set
(:func:`check_session_name`). One process at a time may run a session: :class:`SessionLock` is an exclusive,
non-blocking ``fcntl.flock`` on ``outputs/.locks/<session>.lock`` holding the owner's pid. The lock is
per open file description, so it is released when its holder exits, even after ``kill -9``.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import weakref
from pathlib import Path
from typing import Any

from . import paths

SESSION_RULE = "1-100 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, no '..'"
_SESSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
HELD_ENV = "FORGE_SESSION_LOCK"
"""``<session>:<pid>`` set by a pipeline for the phase kernels it starts: the lock is held by that parent."""


class InvalidSessionNameError(ValueError):
    """A session id that is not a safe folder name under outputs/."""


class SessionInUseError(RuntimeError):
    """Another process holds the session's lock."""


def check_session_name(session: str) -> str:
    """``session`` unchanged when it is a safe folder name, else ``InvalidSessionNameError`` naming the rule."""
    if not isinstance(session, str) or not _SESSION_RE.fullmatch(session) or ".." in session:
        raise InvalidSessionNameError(f"invalid session name {session!r}: a session name must be {SESSION_RULE}")
    return session


def lock_path(session: str) -> Path:
    """The session's lock file: ``outputs/.locks/<session>.lock`` (outside the session folder, which
    ``forge clean`` deletes)."""
    return paths.outputs_root() / ".locks" / f"{check_session_name(session)}.lock"


class SessionLock:
    """An exclusive lock on one session, taken at construction; ``release()`` (or ``with``) frees it.

    Raises ``SessionInUseError`` at once, naming the holder's pid, when another open of the lock file holds it.
    """

    _fd: int | None = None
    users = 1  # lock_session shares one lock among the contexts of this process that use the session

    def __init__(self, session: str):
        self.session = check_session_name(session)
        self.path = lock_path(session)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise SessionInUseError(f"session {session!r} is in use by process {holder_pid(session)} "
                                        f"(lock {self.path}); wait for it to finish or choose another "
                                        "session") from None
            if _same_file(fd, self.path):  # else a cleaner unlinked it meanwhile: lock the new file
                self._fd = fd
            else:
                os.close(fd)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, unlink: bool = False) -> None:
        """Free the lock; ``unlink`` also removes the lock file (when the session itself is deleted)."""
        if self._fd is None:
            return
        if self.users > 1:
            self.users -= 1
            return
        if unlink:
            self.path.unlink(missing_ok=True)
        else:
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the only descriptor of this open file releases the flock
        self._fd = None

    def __enter__(self) -> "SessionLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def holder_pid(session: str) -> str:
    """The pid written in the session's lock file ('unknown' when unreadable)."""
    try:
        return lock_path(session).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def held_by_parent(session: str) -> bool:
    """True when a pipeline that started this process holds ``session``'s lock (see ``HELD_ENV``)."""
    claim = os.environ.get(HELD_ENV, "")
    return claim == f"{session}:{holder_pid(session)}"


_HELD: "weakref.WeakValueDictionary[str, SessionLock]" = weakref.WeakValueDictionary()


def lock_session(session: str) -> SessionLock | None:
    """Take ``session``'s lock for a phase context. Reentrant within a process (a notebook that opens the
    phase again shares the lock it holds); None when the pipeline that started this process holds it."""
    held = _HELD.get(session)
    if held is not None and held.held:
        held.users += 1
        return held
    try:
        lock = SessionLock(session)
    except SessionInUseError:
        if held_by_parent(session):
            return None
        raise
    _HELD[session] = lock
    return lock


def clean_sessions(registry: Any, keep_sessions: int | None = None, max_age_days: float | None = None,
                   dry_run: bool = False) -> dict:
    """``forge clean``: delete old sessions, their registry rows, model files and session folder together.

    Each selected session is locked first; one whose lock another process holds is skipped (reported under
    ``skipped_sessions`` with the holder's pid) and nothing of it is touched. Returns the registry's cleanup
    report plus ``session_dirs`` (folders deleted, or that would be with ``dry_run``) and ``skipped_sessions``.
    """
    locks: dict[str, SessionLock | None] = {}
    skipped = []
    for session in registry.select_sessions(keep_sessions, max_age_days):
        try:
            locks[session] = SessionLock(session)
        except SessionInUseError:
            skipped.append({"session": session, "reason": f"in use by process {holder_pid(session)}"})
        except InvalidSessionNameError:
            locks[session] = None  # not a folder name this workbench writes: its rows only
    try:
        kept = [Path(path) for path in registry.model_paths(exclude_sessions=list(locks))]  # what stays registered
        report = registry.delete_sessions(list(locks), dry_run=dry_run, outputs_root=paths.outputs_root())
        report["session_dirs"] = _remove_session_dirs([s for s, lock in locks.items() if lock], dry_run, kept,
                                                      report["skipped_paths"])
    finally:
        for lock in locks.values():
            if lock is not None:
                lock.release(unlink=not dry_run)
    report["skipped_sessions"] = skipped
    return report


def _remove_session_dirs(sessions: list[str], dry_run: bool, kept: list[Path], skipped: list[dict]) -> list[str]:
    """Delete ``outputs/<session>`` of each (never following a link) unless it holds one of the ``kept`` model paths
    (another session's, noted in ``skipped``); returns the folders removed."""
    holders = {folder for path in (kept if sessions else []) for resolved in [path.resolve()]
               for folder in (resolved, *resolved.parents)}
    removed = []
    for session in sessions:
        folder = paths.outputs_root() / check_session_name(session)
        if folder.resolve() in holders:
            skipped.append({"path": str(folder), "reason": "holds a model registered by a kept session"})
        elif folder.is_dir() and not folder.is_symlink():
            if not dry_run:
                shutil.rmtree(folder)
            removed.append(str(folder))
    return removed
