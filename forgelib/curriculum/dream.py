"""Dreaming: the model's own verified solutions, sampled hot and replayed later.

Between training rounds the model answers questions at a high sampling temperature (``dream``); every answer
that ``forgelib.data.tasks.check`` verifies is a correct (prompt, completion) pair *in the model's own words*
(its own worked steps), a cheap source of extra training data whose answers are known to be right (the idea of
STaR-style self-training). Only the final answer is checked: a completion with a wrong step but a right answer
is kept, as in STaR.

``DreamBuffer`` holds such pairs for replay. It is bounded by ``capacity`` and by default keeps a **reservoir
sample** (Vitter's algorithm R): every verified pair ever offered has the same chance of being in the buffer,
so replay covers the easy early levels as well as the current one, which is what protects against forgetting.
``policy="fifo"`` keeps the most recent pairs instead (replay of the current level only). A pair already in the
buffer (same prompt and completion) is not added twice. Random choices come from the buffer's own generator,
which is part of its state (``to_dict``/``from_dict``), so a resumed run replays the same pairs.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

from forgelib.data.base import Sample
from forgelib.data.tasks import check

from .state import rng_from_json, rng_to_json

__all__ = ["DreamItem", "DreamBuffer", "dream"]

Checker = Callable[[Sample, str], bool]
GenerateFn = Callable[[list[str], float], list[str]]


@dataclass(frozen=True)
class DreamItem:
    """A verified pair: `prompt + completion` is a correct worked answer of a question of `family` at `level`."""

    prompt: str
    completion: str
    family: str
    level: int
    answer: str

    @property
    def text(self) -> str:
        """The training text."""
        return self.prompt + self.completion


class DreamBuffer:
    """A bounded store of verified (prompt, completion) pairs for replay (module docstring for the policy)."""

    POLICIES = ("reservoir", "fifo")

    def __init__(self, capacity: int = 1024, policy: str = "reservoir", seed: int = 0):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if policy not in self.POLICIES:
            raise ValueError(f"unknown policy {policy!r}; valid policies: {list(self.POLICIES)}")
        self.capacity, self.policy = capacity, policy
        self.rng = random.Random(f"dream|{seed}")
        self.items: list[DreamItem] = []
        self.offered = 0    # (sample, output) pairs given to `add`
        self.verified = 0   # of those, correct and new: the stream the reservoir samples from

    def __len__(self) -> int:
        return len(self.items)

    def add(self, samples_with_outputs: Iterable[tuple[Sample, str]], checker: Checker = check) -> int:
        """Keep the pairs whose completion `checker` verifies (default `tasks.check`); returns how many were
        kept now. A completion is the text after the sample's prompt (with a hint: the hint text plus the
        model's output)."""
        present = {(item.prompt, item.completion) for item in self.items}
        kept = 0
        for sample, completion in samples_with_outputs:
            self.offered += 1
            if (sample.prompt, completion) in present or not checker(sample, completion):
                continue
            item = DreamItem(sample.prompt, completion, sample.family, sample.level, sample.answer)
            self.verified += 1
            evicted = self._insert(item)
            if evicted is not item:
                present.add((item.prompt, item.completion))
                kept += 1
            if evicted is not None and evicted is not item:
                present.discard((evicted.prompt, evicted.completion))
        return kept

    def _insert(self, item: DreamItem) -> DreamItem | None:
        """Place `item` by the policy; returns the item dropped (`item` itself when the reservoir skips it)."""
        if len(self.items) < self.capacity:
            self.items.append(item)
            return None
        if self.policy == "fifo":
            return self._replace_oldest(item)
        j = self.rng.randrange(self.verified)  # algorithm R: keep with probability capacity / verified
        if j >= self.capacity:
            return item
        evicted, self.items[j] = self.items[j], item
        return evicted

    def _replace_oldest(self, item: DreamItem) -> DreamItem:
        evicted = self.items.pop(0)
        self.items.append(item)
        return evicted

    def sample(self, n: int, rng: random.Random | None = None) -> list[DreamItem]:
        """`min(n, len(self))` distinct pairs chosen uniformly (from the buffer's generator unless `rng`)."""
        rng = self.rng if rng is None else rng
        return rng.sample(self.items, min(max(n, 0), len(self.items)))

    def counts(self) -> dict[str, int]:
        """How many pairs of each family are held (for logs)."""
        out: dict[str, int] = {}
        for item in self.items:
            out[item.family] = out.get(item.family, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "policy": self.policy, "rng": rng_to_json(self.rng),
                "offered": self.offered, "verified": self.verified, "items": [asdict(i) for i in self.items]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DreamBuffer":
        buffer = cls(data["capacity"], data["policy"])
        buffer.rng = rng_from_json(data["rng"])
        buffer.offered, buffer.verified = data["offered"], data["verified"]
        buffer.items = [DreamItem(**item) for item in data["items"]]
        return buffer


def dream(generate_fn: GenerateFn, samples: Sequence[Sample], temperature: float = 1.0,
          checker: Checker = check) -> list[tuple[Sample, str]]:
    """Ask the model (`generate_fn(prompts, temperature) -> one completion per prompt`) to answer `samples`
    at `temperature` and return the (sample, completion) pairs that `checker` verifies, in order.

    Repeat a sample in `samples` to draw several completions of it.
    """
    samples = list(samples)
    if not samples:
        return []
    outputs = generate_fn([s.prompt for s in samples], temperature)
    if len(outputs) != len(samples):
        raise ValueError(f"generate_fn returned {len(outputs)} completions for {len(samples)} prompts")
    return [(s, out) for s, out in zip(samples, outputs) if isinstance(out, str) and checker(s, out)]
