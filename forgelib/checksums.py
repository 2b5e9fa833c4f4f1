"""Checksums and sizes of model files and folders (the registry stores them; merge recipes and the pipeline's handoff
checks compare them)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20  # read files in 1 MiB chunks so hashing a multi-GB model stays flat in memory


def _model_files(folder: Path) -> list[tuple[str, Path]]:
    """Every regular file under ``folder`` as (relative posix path, path), sorted by relative path."""
    files = [(p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file()]
    return sorted(files, key=lambda item: item[0])


def _feed_file(digest: "hashlib._Hash", path: Path) -> None:
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)


def compute_checksum(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a model file or folder.

    A file hashes to the plain SHA-256 of its bytes (the same as ``sha256sum``). A folder hashes, for
    every file in sorted relative-path order: the relative posix path as UTF-8, a NUL byte, the file
    size as 8 big-endian bytes, then the file's bytes. Names are included so that a renamed file
    changes the checksum; the size prefix keeps the framing unambiguous.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    digest = hashlib.sha256()
    if path.is_file():
        _feed_file(digest, path)
        return digest.hexdigest()
    for rel, file in _model_files(path):
        digest.update(rel.encode("utf-8") + b"\0")
        digest.update(file.stat().st_size.to_bytes(8, "big"))
        _feed_file(digest, file)
    return digest.hexdigest()


def path_size_mb(path: str | os.PathLike) -> float:
    """Total size of a file or of all files in a folder, in MiB (2**20 bytes)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(file.stat().st_size for _, file in _model_files(path)) / 2**20


__all__ = ["compute_checksum", "path_size_mb"]
