"""The errors of a phase run (``PhaseError`` and its kinds) and how a file-system failure becomes one
(``as_phase_error``: a full disk or a read-only folder named, never a bare OSError)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from .. import paths


class PhaseError(RuntimeError):
    """A phase could not run or did not pass its gate; the message says why."""


class GateFailedError(PhaseError):
    """The phase ran but its gate did not hold; the previous phase's model stays the latest good one."""


class UpstreamError(PhaseError):
    """The upstream model or result a phase needs is missing, unreadable or does not match its checksum."""


class OutputNotWritableError(PhaseError):
    """The output folder cannot be created or written."""


class NothingToExploreError(PhaseError):
    """``explore`` names a session whose phase did not finish (or whose record cannot be read): nothing to show."""


class DamagedResultError(PhaseError):
    """The registry records the phase as completed in the session, but its result.json is missing, unreadable or no
    longer says so: what completed is never recomputed nor moved aside."""


_OS_CODE_RE = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


def os_error_code(exc: BaseException) -> int | None:
    """The OS error number behind ``exc``: an OSError's ``errno``, or the code in the text of a Rust library's
    error (safetensors: "I/O error: No space left on device (os error 28)"; tokenizers alike); else None."""
    if isinstance(exc, OSError):
        return exc.errno
    match = _OS_CODE_RE.search(str(exc)[:2000]) if isinstance(exc, Exception) else None
    return int(match.group(1) or match.group(2)) if match else None


def as_phase_error(exc: BaseException, folder: Path) -> BaseException:
    """``exc`` unchanged, or, for a file-system error writing outputs (full disk, read-only, a file in the
    way), an OutputNotWritableError naming the path (``folder`` when the error names none). A library's error that
    carries such an OS error code (safetensors': "... (os error 28)") counts as one."""
    if isinstance(exc, PhaseError) or os_error_code(exc) not in paths.WRITE_ERRNOS:
        return exc
    if not isinstance(exc, OSError):
        code = os_error_code(exc)
        return OutputNotWritableError(paths.describe_write_error(OSError(code, os.strerror(code)), folder))
    if exc.filename and not Path(exc.filename).resolve().is_relative_to(paths.outputs_root()):
        return exc  # not one of the run's outputs
    return OutputNotWritableError(paths.describe_write_error(exc, folder))
