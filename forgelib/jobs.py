"""Independent jobs of a phase run side by side: ``run_jobs(jobs, workers)``.

The smoke and cpu sets train and ask models of about 130k parameters, whose every operation is a short kernel behind
Python and dispatcher overhead: one job keeps one core busy however many intra-op threads torch has, and more
intra-op threads only add spinning. torch releases the GIL inside its operations, so two such jobs in two Python
threads use two cores (measured on 2 cores, two Cognate trainings of 100 steps each: 3.71 s one after the other,
2.50 s side by side, the same weights to the last bit). Each job must own what it computes with: its own model,
optimizer, data and tokenizer (a fast tokenizer called from two threads with different padding or truncation settings
returns wrong ids, see ``own_copy``), and no draws from torch's global random generator. The results are then those
of running the jobs one after the other, in any order, which ``tests/test_jobs.py`` checks on real trainings.
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")


def resolve_workers(workers: int, device: str = "cpu", threads: int = 1) -> int:
    """``run.workers`` made a number: 0 (auto) is one job at a time on an accelerator (its one queue of kernels
    gains nothing from Python threads) and on a CPU as many as its cores hold jobs of ``threads`` intra-op threads
    each, at most 2 (a job keeps one core busy; more jobs than cores only wait, and intra-op threads of two jobs
    sharing a core spin against each other); a given number is kept. Under ``accelerate launch`` with several
    processes always 1: each training step's collective must come in the same order in every process."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return 1
    if workers > 0:
        return workers
    if not str(device).startswith("cpu"):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(2, cores // max(1, threads)))


def run_jobs(jobs: Sequence[Callable[[], T]], workers: int) -> list[T]:
    """Every job's result, in the jobs' order; ``workers`` > 1 runs that many at a time in threads. A job's
    exception propagates (the first in order) once the jobs already started have finished."""
    if workers <= 1 or len(jobs) <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(max_workers=min(workers, len(jobs)), thread_name_prefix="forge-job") as pool:
        futures = [pool.submit(job) for job in jobs]
        return [future.result() for future in futures]


def own_copy(obj: T, workers: int) -> T:
    """``obj`` for a job that may run beside others: a copy when ``workers`` > 1 (a tokenizer keeps its padding and
    truncation settings in one shared Rust object that every call may reset: two threads calling one tokenizer got
    each other's settings and wrong ids in a test here), else ``obj`` itself. A tokenizer of this workbench copies
    in under a millisecond."""
    return copy.deepcopy(obj) if workers > 1 else obj


_LOCAL = threading.local()


def thread_own(obj: T) -> T:
    """``obj`` on the main thread; on any other thread a copy made once per thread (for an object a job calls and
    may reset, like a tokenizer, when the caller cannot hand each job its own: ``own_copy``)."""
    if threading.current_thread() is threading.main_thread():
        return obj
    copies = _LOCAL.__dict__.setdefault("copies", {})
    entry = copies.get(id(obj))
    if entry is None or entry[0] is not obj:
        entry = copies[id(obj)] = (obj, copy.deepcopy(obj))
    return entry[1]


# --- batches of one generation side by side ---------------------------------------------------------------------
# A phase asks most of its questions from the main thread, one model at a time (a guard's two models already go side
# by side, and so do Phase 1's specialists): the batches of such a call are independent, so ``map_batches`` runs them
# on ``generation_workers`` threads, the main thread with the model itself and each other thread with a copy of it.
# The batches are the ones the call would generate one after the other, so every answer is the same.

_GENERATION = {"workers": 1}


def generation_workers() -> int:
    """Threads a generation may use for its batches: the ``side_by_side`` setting on the main thread, 1 inside a job
    (its caller already keeps the cores busy)."""
    return _GENERATION["workers"] if threading.current_thread() is threading.main_thread() else 1


@contextlib.contextmanager
def side_by_side(workers: int):
    """Within it, generations started on the main thread run their batches on ``workers`` threads (a phase's run
    sets ``run.workers`` resolved: ``PhaseContext.workers``)."""
    before = _GENERATION["workers"]
    _GENERATION["workers"] = max(1, int(workers))
    try:
        yield
    finally:
        _GENERATION["workers"] = before


def map_batches(fn: Callable[[Any, Any], T], model: Any, batches: Sequence[Any], *, in_turn: bool = False,
                twins: list | None = None) -> list[T]:
    """``[fn(model, batch) for batch in batches]``, the batches shared out round-robin over ``generation_workers()``
    threads: the main thread's with ``model``, every other thread's with a deep copy of it (made in that thread;
    ``fn`` must not change the model, e.g. a no-gradient generation). Results in the batches' order. ``twins``: a
    list the copies are kept in, so that a caller mapping round after round over one model copies it once.
    ``in_turn``, or a model that draws from torch's global generator when it answers (``draws_at_inference``): the
    batches one after the other (side by side, the draws would go to the batches in the order the threads ask)."""
    workers = min(generation_workers(), len(batches))
    if workers <= 1 or in_turn or draws_at_inference(model):
        return [fn(model, batch) for batch in batches]
    out: list[Any] = [None] * len(batches)
    twins = [] if twins is None else twins

    def share(k: int, own: Any) -> None:
        if own is None:  # thread k >= 1 owns twins[k - 1]
            if twins[k - 1] is None:
                twins[k - 1] = copy.deepcopy(model)
            own = twins[k - 1]
        for i in range(k, len(batches), workers):
            out[i] = fn(own, batches[i])

    while len(twins) < workers - 1:  # the slots exist before the threads start (no list growth from two threads)
        twins.append(None)
    with ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="forge-gen") as pool:
        futures = [pool.submit(share, k, None) for k in range(1, workers)]
        share(0, model)
        for future in futures:
            future.result()
    return out


def draws_at_inference(model: Any) -> bool:
    """Whether answering with ``model`` draws random numbers: a thinking Quiet-STaR model (``qconfig``) whose
    thoughts are sampled (``inference_temperature`` > 0) or random (``thought_mode: random``)."""
    cfg = getattr(model, "qconfig", None)
    if cfg is None or not getattr(model, "thinking", True):
        return False
    return float(getattr(cfg, "inference_temperature", 0.0) or 0.0) > 0 or getattr(cfg, "thought_mode", "") == "random"
