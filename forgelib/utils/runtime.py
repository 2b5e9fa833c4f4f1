"""Seeds and devices: ``set_seed`` and ``resolve_device`` (CUDA, MPS or CPU, with a clear error for one that is
not there)."""
from __future__ import annotations


import torch

from ..distributed import local_index, process_count


class DeviceUnavailableError(ValueError):
    """An explicitly requested device is not available on this machine."""


_DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:<index>", "mps")


def set_seed(seed: int, deterministic: bool = False) -> int:
    """Seed Python's ``random``, NumPy and torch (all CUDA devices too); returns the seed.

    The same calls as ``transformers.set_seed`` (a test compares the streams), without importing
    ``transformers.trainer_utils``, which pulls in peft (about 3 s per process start); ``deterministic`` also
    switches torch to deterministic algorithms.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")  # NumPy's range
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
    return seed


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(pref: str = "auto") -> str:
    """A device string: 'auto' picks 'cuda' if available, else 'mps' if available, else 'cpu'.

    'cpu', 'cuda', 'cuda:<index>' and 'mps' are returned as asked when available; an unavailable
    one raises ``DeviceUnavailableError``, an unknown one ``ValueError`` with the valid choices.
    """
    choice = str(pref).strip().lower()
    if choice in ("auto", "cuda") and torch.cuda.is_available() and process_count() > 1:
        return f"cuda:{local_index() % torch.cuda.device_count()}"  # accelerate launch: one GPU per process
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if choice == "cpu":
        return "cpu"
    if choice == "mps":
        if not _mps_available():
            raise DeviceUnavailableError("device 'mps' requested but MPS is not available")
        return "mps"
    base, _, index = choice.partition(":")
    if base != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"unknown device {pref!r}; valid: {', '.join(_DEVICE_CHOICES)}")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {pref!r} requested but CUDA is not available")
    if index and int(index) >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"device {pref!r} requested but only "
                                     f"{torch.cuda.device_count()} CUDA device(s) exist")
    return choice
