"""Question pools kept on disk between processes (``outputs/.cache/questions``).

Every phase's guard asks the same held-out pools (``forgelib.suite.questions``: up to ``guard.max_questions`` test
questions per family, shuffled), and each phase runs in its own kernel: drawing 2,000 test-split questions of one
family takes 0.4-1.5 s (about 20,000 draws, nine in ten fall in other splits), so a smoke chain spent about a minute
drawing the same pools again. A pool is a pure function of its key (family, levels, size, seed) and of the code that
draws it, so it is stored once as JSON under a name that carries a digest of that code (``forgelib/data``'s
generator modules): any change to a family, the split rule or the drawing makes a new name, and an old file is never
read. Each file holds its key, that digest and a sha256 of its rows: a file that does not parse, names another key,
fails its checksum or holds rows that are not the family's samples is ignored and written anew (a damaged cache costs
a draw; it guards against accidents, not against someone who rewrites the checksum too). ``FORGE_QUESTION_CACHE=0``
turns it off.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

from .base import Sample

_KEY = re.compile(r"[a-z][a-z0-9_]{0,40}-\d{1,2}-\d{1,2}-\d{1,7}-\d{1,12}")
MAX_FILE_BYTES = 64 * 1024 * 1024
"""A cache file larger than this is not read (a pool of 2,000 questions is about 0.4 MB)."""


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over the modules that draw questions (``forgelib/data``: base, tasks, expressions, families/*)."""
    root = Path(__file__).resolve().parent
    files = [root / "base.py", root / "tasks.py", root / "expressions.py", *sorted((root / "families").glob("*.py"))]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def enabled() -> bool:
    return os.environ.get("FORGE_QUESTION_CACHE", "1") != "0"


def cache_file(key: str) -> Path | None:
    """The file of pool ``key`` (``family-lo-hi-size-seed``), or None for a key that is not of that form."""
    from .. import paths

    if not _KEY.fullmatch(key):
        return None
    return paths.outputs_root() / ".cache" / "questions" / f"{source_digest()}-{key}.json"


def stored_digest(rows: list) -> str:
    """sha256 of the rows as stored (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sample(row) -> Sample | None:
    if not isinstance(row, dict) or set(row) != {"prompt", "answer", "family", "level", "steps", "meta"}:
        return None
    ok = (isinstance(row["prompt"], str) and isinstance(row["answer"], str) and isinstance(row["family"], str)
          and isinstance(row["level"], int) and isinstance(row["meta"], dict)
          and (row["steps"] is None
               or isinstance(row["steps"], list) and all(isinstance(s, str) for s in row["steps"])))
    return Sample(**row) if ok else None


def load(key: str, family: str, size_at_most: int) -> list[Sample] | None:
    """The stored pool ``key``, or None when there is none or it is not a valid list of ``family``'s samples."""
    path = cache_file(key) if enabled() else None
    try:
        if path is None or not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or data.get("code") != source_digest():
        return None
    rows = data.get("rows")
    if not isinstance(rows, list) or len(rows) > size_at_most or stored_digest(rows) != data.get("sha256"):
        return None
    samples = [_sample(r) for r in rows]
    if any(s is None or s.family != family for s in samples):
        return None
    return samples


def store(key: str, samples: Sequence[Sample]) -> None:
    """Write pool ``key`` (atomically: a temporary file renamed); skipped when off, when a sample would not come back
    equal from JSON, or when the disk refuses (the pool is then drawn again next time)."""
    path = cache_file(key) if enabled() else None
    if path is None:
        return
    rows = [{"prompt": s.prompt, "answer": s.answer, "family": s.family, "level": s.level, "steps": s.steps,
             "meta": s.meta} for s in samples]
    try:
        if json.loads(json.dumps(rows)) != rows:  # e.g. a tuple in meta: it would come back as a list
            return
        text = json.dumps({"key": key, "code": source_digest(), "sha256": stored_digest(rows), "rows": rows})
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except (OSError, TypeError, ValueError):
        return
