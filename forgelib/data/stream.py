"""Streamed training data: fresh task samples drawn without end, batched by length.

The generators give an unlimited supply of problems, so a training budget is a number of steps (and
tokens), not the size of a fixed pool that the model would memorise after a few epochs:

    stream = TaskStream({"arith": 1, "logic": 1}, levels=(1, 3), split="train", seed=0)
    batches = LengthBucketedBatches(tokenizer, stream, batch_size=128, max_len=64, with_steps=True)
    batch = next(batches)              # input_ids / attention_mask / labels, trimmed to the longest row
    batches.stats.padding_fraction     # share of computed positions that are padding

Only prompts whose hash falls in ``split`` are kept (the same rule as ``tasks.split_of``), so no test or
fitness prompt is ever trained on. Families are drawn in proportion to ``mix``, levels in proportion to
``level_weights`` (uniform by default). Rows of similar length are batched together: a pool of
``bucket`` batches is drawn, sorted by length, cut into batches, and the batches are served in a shuffled
order, so little compute goes to padding while every batch still mixes families.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Iterable, Iterator

import torch

from .base import Sample, get_family
from .tasks import TaskOptionError, _check_options, _check_split, _levels, check_mix, split_of
from .tokenizer import encode_samples

__all__ = ["TaskStream", "LengthBucketedBatches", "StreamStats"]


class TaskStream:
    """An endless iterator of fresh samples of ``mix`` at ``levels`` whose prompts fall in ``split``.

    Deterministic in its arguments. Samples may repeat where a family's space at a level is small (a
    level-1 sum has a few hundred prompts), exactly as often as the generator draws them.
    """

    def __init__(self, mix: dict[str, float], levels: int | tuple[int, int] | Iterable[int],
                 split: str = "train", seed: int = 0, level_weights: dict[int, float] | None = None,
                 family_options: dict[str, dict[str, Any]] | None = None,
                 family_levels: dict[str, Any] | None = None):
        check_mix(mix)
        self.levels = _levels(levels)
        # a family's own levels (e.g. replay of what a model knew at the levels it learnt), drawn uniformly
        self.family_levels = {name: _levels(lv) for name, lv in (family_levels or {}).items()}
        level_weights = dict(level_weights or {})
        stray = sorted(set(level_weights) - set(self.levels))
        if stray:
            raise TaskOptionError(f"level_weights names levels {stray} outside the levels {self.levels}")
        self.level_weights = [float(level_weights.get(level, 1.0)) for level in self.levels]
        if any(not w >= 0 for w in self.level_weights) or sum(self.level_weights) <= 0:
            raise TaskOptionError(f"level_weights must be >= 0 and not all zero: {level_weights}")
        self.families = [name for name, w in mix.items() if w > 0]
        self.family_weights = [float(mix[name]) for name in self.families]
        self.family_options = dict(family_options or {})
        for name, options in self.family_options.items():
            _check_options(get_family(name), options)
        self.split = _check_split(split)
        self._key = f"stream|{seed}|{split}|{sorted(mix.items())}|{self.levels}" + (
            f"|{sorted(self.family_levels.items())}" if self.family_levels else "")
        self.rng = random.Random(self._key)
        self.drawn = 0   # samples generated (all splits)
        self.served = 0  # samples in `split` handed out

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        while True:
            name = self.rng.choices(self.families, self.family_weights)[0]
            own = self.family_levels.get(name)
            level = self.rng.choice(own) if own else self.rng.choices(self.levels, self.level_weights)[0]
            sample = get_family(name).draw(self.rng, level, **self.family_options.get(name, {}))
            self.drawn += 1
            if split_of(sample.prompt) == self.split:
                self.served += 1
                return sample

    def take(self, n: int) -> list[Sample]:
        """The next ``n`` samples."""
        return [next(self) for _ in range(n)]

    def reseed(self, tag: str) -> None:
        """Continue from a generator seeded by the stream's arguments and ``tag`` (one process's own stream)."""
        self.rng = random.Random(f"{self._key}|{tag}")


@dataclasses.dataclass
class StreamStats:
    """What a batch stream has served so far."""

    samples: int = 0
    dropped_long: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0  # batch rows × trimmed width: what the model actually runs on

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.computed_tokens if self.computed_tokens else 0.0


class LengthBucketedBatches:
    """Endless training batches from a :class:`TaskStream`, grouped by length (see the module docstring).

    Each batch holds ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding and, with
    ``answer_only_loss``, on the prompt), right-padded and trimmed to its longest row. Samples longer than
    ``max_len`` tokens are left out and counted in ``stats.dropped_long``. ``bucket=1`` turns bucketing off.
    """

    def __init__(self, tokenizer, stream: TaskStream, batch_size: int, max_len: int, *,
                 with_steps: bool = True, answer_only_loss: bool = True, bucket: int = 16, seed: int = 0):
        if batch_size < 1 or bucket < 1 or max_len < 2:
            raise ValueError(f"batch_size, bucket must be >= 1 and max_len >= 2, got {batch_size}, {bucket}, "
                             f"{max_len}")
        self.tokenizer, self.stream = tokenizer, stream
        self.batch_size, self.max_len, self.bucket = batch_size, max_len, bucket
        self.with_steps, self.answer_only_loss = with_steps, answer_only_loss
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.stats = StreamStats()
        self._queue: list[dict[str, torch.Tensor]] = []
        self._shard = (0, 1)

    def shard(self, index: int, count: int) -> "LengthBucketedBatches":
        """Make this the stream of process ``index`` of ``count`` (data-parallel training): from here on it draws
        fresh samples from a stream seeded by its arguments and the process, so no two processes train on the same
        draw. Asking again for the same shard changes nothing (a source handed to several training runs)."""
        if not 0 <= index < count:
            raise ValueError(f"shard index must be in [0, {count}), got {index}")
        if (index, count) != self._shard:
            self._shard = (index, count)
            self._restart(f"process {index} of {count}", self.seed * 1_000_003 + index)
        return self

    def _restart(self, tag: str, generator_seed: int) -> None:
        """Go on from a stream reseeded with ``tag`` and a fresh batch-order generator (a process's or worker's own)."""
        self.stream.reseed(tag)
        self.generator = torch.Generator().manual_seed(generator_seed)
        self._queue.clear()

    def prefetched(self, workers: int, pin_memory: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """The batches drawn by ``workers`` background processes (a ``torch.utils.data.DataLoader``): on a GPU the
        CPU that draws and tokenizes fresh samples otherwise holds every step. Worker w continues this source's
        stream reseeded for w (so the batches differ from the unprefetched ones, deterministically); they arrive
        in turn, w = 0, 1, ... This object's ``stats`` count what arrives (``dropped_long`` stays with the
        workers)."""
        from torch.utils.data import DataLoader, IterableDataset

        source = self

        class Shards(IterableDataset):
            def __iter__(self):
                from torch.utils.data import get_worker_info

                info = get_worker_info()
                torch.set_num_threads(1)
                index, count = source._shard
                source._restart(f"process {index} of {count}|worker {info.id} of {info.num_workers}",
                                (source.seed * 1_000_003 + index) * 997 + info.id)
                return source

        loader = DataLoader(Shards(), batch_size=None, num_workers=workers, pin_memory=pin_memory, prefetch_factor=4)

        def counted():
            for batch in loader:
                self.stats.samples += len(batch["input_ids"])
                self.stats.real_tokens += int(batch["attention_mask"].sum())
                self.stats.computed_tokens += batch["input_ids"].numel()
                yield batch

        return counted()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while not self._queue:
            self._refill()
        batch = self._queue.pop()
        self.stats.real_tokens += int(batch["attention_mask"].sum())
        self.stats.computed_tokens += batch["input_ids"].numel()
        return batch

    def _refill(self) -> None:
        samples = self.stream.take(self.batch_size * self.bucket)
        encoded = encode_samples(self.tokenizer, samples, self.max_len, answer_only_loss=self.answer_only_loss,
                                 with_steps=self.with_steps, drop_long=True)
        self.stats.dropped_long += encoded.n_dropped
        n = len(encoded["input_ids"])
        self.stats.samples += n
        if n < self.batch_size:
            if n == 0:
                raise ValueError(f"every sample of a pool of {len(samples)} was longer than max_len={self.max_len}")
            return  # a pool (almost) all too long: draw another
        lengths = encoded["attention_mask"].sum(1).float()  # (N,)
        jitter = torch.rand(n, generator=self.generator)    # random order among equal lengths
        order = torch.argsort(lengths + 0.5 * jitter)
        order = order[: n - n % self.batch_size]  # full batches only; the rest of the pool is dropped
        groups = list(order.split(self.batch_size))
        for i in torch.randperm(len(groups), generator=self.generator).tolist():
            idx = groups[i]
            width = int(lengths[idx].max())
            self._queue.append({key: value[idx, :width] for key, value in encoded.items()})
