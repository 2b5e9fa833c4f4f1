"""Where things live. Every path is resolved from the repository root, never from the current directory."""
from __future__ import annotations

import errno
import os
from pathlib import Path

WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EEXIST,
                          errno.ENOTDIR, errno.EISDIR, errno.EFBIG})
"""File-system errors that mean "this output cannot be written here" (full disk, read-only, a file in the way)."""


def repo_root() -> Path:
    """The repository root: ``$FORGE_ROOT`` if set, else the folder that holds the ``forgelib`` package."""
    env = os.environ.get("FORGE_ROOT")
    return Path(env).resolve() if env else Path(__file__).resolve().parent.parent


def outputs_root() -> Path:
    """Root of all run outputs: ``$FORGE_OUTPUTS`` if set, else ``<repo>/outputs``."""
    env = os.environ.get("FORGE_OUTPUTS")
    return Path(env).resolve() if env else repo_root() / "outputs"


def resolve(path: str | os.PathLike) -> Path:
    """An absolute path: relative paths are taken from the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (repo_root() / p)


def relative(path: str | os.PathLike) -> str:
    """``path`` relative to the repository root when it lies inside it (for portable result files)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(repo_root()))
    except ValueError:
        return str(p)


def bench_output(stem: str, out: str | os.PathLike | None = None, stamp: bool = True) -> Path:
    """Where a benchmark writes its JSON: ``out`` (relative to the repository root) when given, else
    ``<outputs root>/bench/<stem>-<unix time>.json`` (``stamp=False``: ``<stem>.json``), under ``$FORGE_OUTPUTS`` when
    it is set."""
    import time

    if out:
        return resolve(out)
    return outputs_root() / "bench" / (f"{stem}-{int(time.time())}.json" if stamp else f"{stem}.json")


def registry_path() -> Path:
    """The registry database shared by all sessions."""
    return outputs_root() / "registry.db"


def contain_tool_caches(base: Path | None = None) -> dict[str, str]:
    """Point W&B, HF, Jupyter, IPython and matplotlib caches/logs inside outputs/ (never the user's home).

    Existing settings win, so a user who configured them keeps theirs. Returns the variables it set.
    """
    base = Path(base) if base else outputs_root() / ".cache"
    wanted = {
        "WANDB_DIR": base / "wandb", "WANDB_CACHE_DIR": base / "wandb-cache",
        "WANDB_CONFIG_DIR": base / "wandb-config", "WANDB_DATA_DIR": base / "wandb-data",
        "MPLCONFIGDIR": base / "matplotlib", "IPYTHONDIR": base / "ipython",
        "JUPYTER_CONFIG_DIR": base / "jupyter-config", "JUPYTER_DATA_DIR": base / "jupyter-data",
        "JUPYTER_RUNTIME_DIR": base / "jupyter-runtime",
    }
    set_now = {}
    for var, path in wanted.items():
        if var not in os.environ:
            path.mkdir(parents=True, exist_ok=True)
            os.environ[var] = set_now[var] = str(path)
    return set_now


def describe_write_error(exc: OSError, path: str | os.PathLike | None = None) -> str:
    """``cannot write PATH: REASON`` for a file-system error on ``exc.filename`` (else ``path``); a file that
    stands where a folder must be is named as such."""
    target = Path(exc.filename) if exc.filename else Path(path) if path is not None else None
    reason = exc.strerror or str(exc)
    if target is not None and exc.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = next((p for p in [target, *target.parents] if p.is_file()), None)
        if blocker is not None:
            reason = f"{blocker} is a file, not a folder"
    return f"cannot write {target}: {reason}" if target is not None else f"cannot write: {reason}"
