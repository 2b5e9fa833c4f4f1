"""The one training loop every phase reuses.

Loss hooks, gradient clipping, a progress bar, metrics to the tracker, periodic evaluation, atomic
checkpoints, NaN/divergence detection, and device placement / mixed precision through Hugging Face
Accelerate (so the same code runs on a CPU, one GPU or several).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from .params import require_non_negative, require_positive
from .utils import TrainingIssue, TrainingIssueError, detect_training_issues

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]
"""A loss hook: ``(model, batch) -> (loss, extra scalar metrics)``."""


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to another architecture or shape than the model being trained."""


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run (phases embed the fields they expose in their own Params)."""

    steps: int = 100
    """Optimizer steps."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""
    log_every: int = 10
    """Log training metrics every N steps."""
    eval_every: int = 0
    """Run the evaluation hook every N steps (0: only at the end)."""
    checkpoint_every: int = 0
    """Write a checkpoint every N steps (0: none)."""
    mixed_precision: str = "no"
    """Accelerate mixed precision: 'no', 'bf16' or 'fp16' (GPU)."""
    divergence_factor: float = 4.0
    """Stop when the recent mean loss exceeds this multiple of the best (see utils.detect_training_issues)..."""
    divergence_min_increase: float = 0.5
    """... and exceeds it by more than this many nats (a cpu-set trunk at 0.009 nats was stopped at 0.036)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up from 0 over this many steps."""
    schedule: str = "constant"
    """Learning rate after warm-up: 'constant', or 'cosine' decay to ``min_lr_ratio`` × lr at the last step."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine decay, as a fraction of each group's base learning rate."""
    data_workers: int = 0
    """Background processes drawing the training batches (streamed sources; 0: drawn between steps). For GPU
    runs, where drawing fresh samples on one CPU core otherwise bounds the step rate."""

    def __post_init__(self):
        require_positive(self, "steps", "log_every")
        require_non_negative(self, "eval_every", "checkpoint_every", "data_workers")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be None or > 0, got {self.grad_clip!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"warmup_steps must be >= 0 and min_lr_ratio in [0, 1], got {self.warmup_steps}, "
                             f"{self.min_lr_ratio}")


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (1-based): linear warm-up over
    ``warmup_steps``, then constant or a cosine decay reaching ``min_lr_ratio`` at ``config.steps``."""
    if config.warmup_steps and step <= config.warmup_steps:
        return step / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclasses.dataclass
class TrainHistory:
    """What a run measured: per-step losses, logged rows, evaluations, timing."""

    losses: list[float] = dataclasses.field(default_factory=list)
    rows: list[dict] = dataclasses.field(default_factory=list)
    evals: list[dict] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    data: dict = dataclasses.field(default_factory=dict)  # what the data source reports (samples, padding)

    @property
    def first_loss(self) -> float:
        return float(sum(self.losses[:5]) / max(1, len(self.losses[:5])))

    @property
    def last_loss(self) -> float:
        return float(sum(self.losses[-5:]) / max(1, len(self.losses[-5:])))

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def default_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """The model's own loss given ``labels``; scalar extras the output carries are logged too."""
    out = model(**batch)
    extras = {}
    for key in ("lm_loss", "act_loss", "act_cycles_mean", "gate_entropy"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            extras[key] = float(value.detach())
        elif isinstance(value, (int, float)):
            extras[key] = float(value)
    return out.loss, extras


def _accelerator(device: str, mixed_precision: str):
    from accelerate import Accelerator

    return Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision)


def average_gradients(parameters: Iterable[torch.nn.Parameter], accelerator) -> None:
    """Make every process's gradients the mean over processes (one collective over a flat buffer).

    Used instead of a data-parallel wrapper, whose gradient hooks only work when the loss goes through the
    wrapper's ``forward``; the phases' losses call other methods (Quiet-STaR's ``think``, a curriculum trainee's
    base model). A parameter without a gradient in a process counts as zero there; one without a gradient in every
    process keeps none (the optimizer skips it, as it would in one process).
    """
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                     + [has])
    flat = accelerator.reduce(flat, "sum")
    count, offset = accelerator.num_processes, 0
    for i, p in enumerate(params):
        part = flat[offset:offset + p.numel()]
        offset += p.numel()
        p.grad = None if flat[-len(params) + i] == 0 else (part / count).view_as(p).to(p.dtype)


def process_batches(batches: Iterator[dict], accelerator) -> Iterator[dict]:
    """This process's share of the data when ``accelerate launch`` runs several: a batch source with a
    ``shard(index, count)`` method (``LengthBucketedBatches``) draws its own fresh samples from a stream seeded per
    process; any other iterator is dealt out in turn (process i takes batches i, i + n, ...)."""
    count = accelerator.num_processes
    if count == 1:
        return batches
    shard = getattr(batches, "shard", None)
    if shard is not None:
        return shard(accelerator.process_index, count)
    return itertools.islice(batches, accelerator.process_index, None, count)


def _step(model, optimizer, batch, loss_fn, accelerator, grad_clip, step: int) -> tuple[float, dict, float]:
    parallel = accelerator.num_processes > 1
    if parallel:  # the model is not wrapped (see average_gradients): mixed precision around the whole loss
        with accelerator.autocast():
            loss, extras = loss_fn(model, batch)
    else:
        loss, extras = loss_fn(model, batch)
    seen = loss.detach()
    if parallel:  # every process decides on the same (mean) loss: none stops alone and hangs the others
        seen = accelerator.reduce(seen.float().clone(), "mean")
    if not torch.isfinite(seen):
        raise _issue(f"non-finite loss ({float(seen)}) at step {step}; stopped before the update", step)
    accelerator.backward(loss)
    if parallel:
        average_gradients(model.parameters(), accelerator)
    grad_norm = float("nan")
    if grad_clip:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(seen), extras, grad_norm


def train(model: torch.nn.Module, batches: Iterator[dict], optimizer: torch.optim.Optimizer,
          config: TrainConfig, *, loss_fn: LossFn = default_loss, tracker: Any = None,
          evaluate: Callable[[torch.nn.Module], dict] | None = None, checkpoint_dir: str | Path | None = None,
          device: str = "cpu", desc: str = "train", quiet: bool = False, step_offset: int = 0,
          heartbeat_s: float | None = None) -> TrainHistory:
    """Train ``model`` for ``config.steps`` optimizer steps over ``batches`` (an endless iterator of dicts).

    Metrics go to ``tracker`` under ``desc/...`` with global steps ``step_offset + step``. A NaN loss or a
    diverging loss stops training with a TrainingIssueError naming the step; checkpoints already written stay.

    Under ``accelerate launch`` with several processes training is data-parallel: each process trains on its own
    share of the data (:func:`process_batches`), gradients are averaged across processes after each backward
    (:func:`average_gradients`), so the loss hook may call any method of the model; the logged loss is the mean
    over processes, ``history.tokens`` counts every process's tokens, and only the main process logs, shows a bar
    and writes checkpoints.

    ``heartbeat_s``: a progress line at most this often even when ``quiet`` (jobs side by side have no bar).
    """
    from .progress import progress_bar

    accelerator = _accelerator(device, config.mixed_precision)
    own_model = model
    model, optimizer, batches = _prepare(model, optimizer, batches, accelerator, config)
    main = accelerator.is_main_process
    tracker = tracker if main else None
    model.train()
    history = TrainHistory()
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    started = beat = time.perf_counter()
    # leave=True: a finished bar stays as its final line (a cleared one leaves a blank gap in exported HTML)
    bar = progress_bar(range(1, config.steps + 1), desc=desc, disable=quiet or not main, leave=True, mininterval=1.0)
    for step in bar:
        factor = lr_factor(step, config)
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * factor
        batch = _to_device(next(batches), accelerator.device)
        loss, extras, grad_norm = _step(model, optimizer, batch, loss_fn, accelerator, config.grad_clip, step)
        history.losses.append(loss)
        mask = batch.get("attention_mask")
        history.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        _check_health(history.losses, step, config)
        if step % config.log_every == 0 or step == config.steps:
            row = {f"{desc}/loss": loss, f"{desc}/grad_norm": grad_norm, f"{desc}/lr_factor": factor,
                   **{f"{desc}/{k}": v for k, v in extras.items()}}
            history.rows.append({"step": step, **row})
            if tracker is not None:
                tracker.log(row, step=step_offset + step)
            bar.set_postfix(loss=f"{loss:.3f}")
        if heartbeat_s and main:
            beat = _heartbeat(beat, heartbeat_s, started, f"{desc}: step {step}/{config.steps}, loss {loss:.3f}")
        _maybe_evaluate(own_model, evaluate, step, config, history, tracker, desc, step_offset)
        if main and checkpoint_dir and config.checkpoint_every and step % config.checkpoint_every == 0:
            save_checkpoint(own_model, optimizer, step, checkpoint_dir)
    history.seconds = time.perf_counter() - started
    if accelerator.num_processes > 1:
        history.tokens = int(accelerator.reduce(torch.tensor(history.tokens, device=accelerator.device), "sum"))
    for group, base_lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base_lr  # the optimizer is left as it was given
    own_model.eval()
    return history


def _heartbeat(last: float, every: float, started: float, text: str) -> float:
    """Print ``text`` and the seconds since ``started`` when ``every`` seconds have passed since ``last``; returns
    the time of the last line."""
    now = time.perf_counter()
    if now - last < every:
        return last
    print(f"  {text}, {now - started:.0f} s", flush=True)
    return now


def _prepare(model, optimizer, batches, accelerator, config: TrainConfig):
    """The model and optimizer placed for Accelerate (several processes: no wrapper, see average_gradients), and
    this process's batches (drawn by background workers with ``config.data_workers``)."""
    if accelerator.num_processes > 1:
        model = model.to(accelerator.device)
        optimizer = accelerator.prepare_optimizer(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    batches = process_batches(batches, accelerator)
    if config.data_workers and hasattr(batches, "prefetched"):
        batches = batches.prefetched(config.data_workers, pin_memory=accelerator.device.type == "cuda")
    return model, optimizer, batches


def _to_device(batch: dict, device) -> dict:
    """The batch's tensors on ``device`` (nested dicts too: a loss may take a second batch under one key)."""
    return {k: _to_device(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()}


def _check_health(losses: list[float], step: int, config: TrainConfig) -> None:
    if not math.isfinite(losses[-1]):
        raise _issue(f"NaN/inf loss at step {step}", step)
    if step >= 40 and step % 10 == 0:  # means of 20 steps: single batches of streamed data vary a lot
        detect_training_issues(losses, window=20, divergence_factor=config.divergence_factor,
                               divergence_min_increase=config.divergence_min_increase, raise_on=("nan", "divergence"))


def _issue(message: str, step: int = -1) -> TrainingIssueError:
    return TrainingIssueError(TrainingIssue("nan", step, message))


def _maybe_evaluate(model, evaluate, step, config, history, tracker, desc, step_offset) -> None:
    if evaluate is None:
        return
    if step == config.steps or (config.eval_every and step % config.eval_every == 0):
        model.eval()
        with torch.no_grad():
            metrics = evaluate(model)
        model.train()
        history.evals.append({"step": step, **metrics})
        if tracker is not None:
            tracker.log({f"{desc}/eval/{k}": v for k, v in metrics.items()}, step=step_offset + step)


def save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    folder: str | Path) -> Path:
    """Write ``folder/checkpoint-<step>`` atomically: the model (save_pretrained) and the optimizer state. A failed
    write (e.g. a full disk) removes the temporary folder before the error propagates."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=folder))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, path: str | Path) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``); returns its step.

    A checkpoint of another architecture or with other shapes fails with CheckpointMismatchError.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointMismatchError(f"{path} is not a checkpoint or model folder (no config.json)")
    config = json.loads((path / "config.json").read_text())
    want = getattr(model.config, "model_type", None)
    if config.get("model_type") != want:
        raise CheckpointMismatchError(f"checkpoint {path} is a {config.get('model_type')!r} model, "
                                      f"but the model being trained is {want!r}")
    state = load_file(path / "model.safetensors")
    own = model.state_dict()
    bad = sorted(k for k in set(state) | set(own) if k not in state or k not in own or state[k].shape != own[k].shape)
    bad = [k for k in bad if not (k not in state and k.endswith("lm_head.weight"))]  # tied head is not saved
    if bad:
        raise CheckpointMismatchError(f"checkpoint {path} does not fit the model: {len(bad)} tensor(s) differ, "
                                      f"e.g. {bad[:3]}")
    model.load_state_dict(state, strict=False)
    if optimizer is not None and (path / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state_file = path / "trainer_state.json"
    return int(json.loads(state_file.read_text())["step"]) if state_file.is_file() else 0
