"""Several processes on one phase (``accelerate launch``): which process this is, and what the others may write.

    accelerate launch --num_processes 2 -m forgelib.cli phase cognate --params parameters/gpu.yaml --session s1

Every process runs the same phase code. Training (``forgelib.train.train``) is data-parallel: each process draws its
own fresh batches, gradients are averaged, so the models stay identical in every process and so does every decision
taken from them (evaluations, gates, the evolutionary search). The main process (rank 0) alone writes the session:
result, models, registry rows, metrics. The others (followers) write what the phase code writes into a scratch
folder inside the phase folder (``.rank-<i>``, removed when the phase completes), read the registry but never
change it, track nothing, and skip the session lock that the main process holds.
"""
from __future__ import annotations

import os
from typing import Any


def process_index() -> int:
    """This process's global rank (``RANK``, set by ``accelerate launch`` / ``torchrun``), 0 when alone."""
    return int(os.environ.get("RANK", "0") or 0)


def process_count() -> int:
    """Processes in the run (``WORLD_SIZE``), 1 when alone."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def local_index() -> int:
    """This process's rank on its machine (``LOCAL_RANK``): the GPU it takes."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_follower() -> bool:
    """True in every process of a multi-process run but the main one."""
    return process_count() > 1 and process_index() != 0


class ReadOnlyRegistry:
    """A follower's view of the model registry: reads go to the real one; writes change nothing."""

    WRITES = {"create_session": None, "update_session": None, "start_phase_run": -1, "finish_phase_run": None,
              "interrupt_stale_runs": [], "register_model": None,
              "set_model_status": None, "move_model_paths": []}

    def __init__(self, registry: Any):
        self._registry = registry

    def __getattr__(self, name: str) -> Any:
        if name in self.WRITES:
            value = self.WRITES[name]
            return lambda *args, **kwargs: value
        return getattr(self._registry, name)
