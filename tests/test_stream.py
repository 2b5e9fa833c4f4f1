"""Streamed training data, the learning-rate schedule and chance levels, against independent references."""
import math
from collections import Counter

import pytest
import torch

from forgelib.data.stream import LengthBucketedBatches, TaskStream
from forgelib.data.tasks import TaskOptionError, build_mix, format_sample, split_of
from forgelib.data.tokenizer import IGNORE_INDEX, train_tokenizer
from forgelib.evaluate import chance_accuracy
from forgelib.train import TrainConfig, lr_factor


@pytest.fixture(scope="module")
def tok():
    corpus = build_mix({"arith": 1, "logic": 1, "sequence": 1}, (1, 3), 300, "train", 0)
    return train_tokenizer([format_sample(s, with_steps=True) for s in corpus], vocab_size=300)


def test_stream_serves_only_its_split_in_the_mix_proportions():
    stream = TaskStream({"arith": 3, "logic": 1}, (1, 2), "train", seed=0)
    samples = stream.take(2000)
    assert all(split_of(s.prompt) == "train" for s in samples)
    counts = Counter(s.family for s in samples)
    assert counts["arith"] / len(samples) == pytest.approx(0.75, abs=0.04)
    assert Counter(s.level for s in samples)[1] / len(samples) == pytest.approx(0.5, abs=0.04)
    assert stream.drawn > stream.served == 2000  # prompts of other splits were drawn and skipped
    test = TaskStream({"arith": 1}, 2, "test", seed=0).take(50)
    assert all(split_of(s.prompt) == "test" for s in test)


def test_stream_is_fresh_deterministic_and_weights_levels():
    a = [s.prompt for s in TaskStream({"arith": 1}, (1, 3), seed=1).take(300)]
    b = [s.prompt for s in TaskStream({"arith": 1}, (1, 3), seed=1).take(300)]
    c = [s.prompt for s in TaskStream({"arith": 1}, (1, 3), seed=2).take(300)]
    assert a == b and a != c
    assert len(set(a)) > 250  # not a small pool repeated
    weighted = TaskStream({"arith": 1}, (1, 3), seed=0, level_weights={3: 8}).take(1000)
    assert Counter(s.level for s in weighted)[3] / 1000 == pytest.approx(0.8, abs=0.04)
    with pytest.raises(TaskOptionError, match="outside the levels"):
        TaskStream({"arith": 1}, (1, 2), level_weights={5: 1})
    with pytest.raises(KeyError, match="unknown task family"):
        TaskStream({"arithm": 1}, (1, 2))


def test_bucketed_batches_cut_padding_and_keep_every_label(tok):
    def make(bucket):
        stream = TaskStream({"arith": 1, "logic": 1, "sequence": 1}, (1, 3), seed=0)
        return LengthBucketedBatches(tok, stream, batch_size=16, max_len=64, bucket=bucket, seed=0)

    bucketed, plain = make(16), make(1)
    for _ in range(40):
        batch = next(bucketed)
        next(plain)
    assert bucketed.stats.padding_fraction < 0.5 * plain.stats.padding_fraction
    # labels: -100 on padding and on the prompt; the completion and eos are labelled
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 16
    assert mask[:, -1].any()  # trimmed to the longest row
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    row = 0
    n = int(mask[row].sum())
    text = tok.decode(ids[row, :n])
    labelled = tok.decode(labels[row, :n][labels[row, :n] != IGNORE_INDEX])
    assert labelled and text.endswith(labelled)  # the labelled part is the completion at the end


def test_answer_only_loss_off_labels_the_prompt_too(tok):
    stream = TaskStream({"arith": 1}, 1, seed=0)
    batch = next(LengthBucketedBatches(tok, stream, 8, 64, answer_only_loss=False, bucket=1))
    assert torch.equal(batch["labels"][batch["attention_mask"] == 1], batch["input_ids"][batch["attention_mask"] == 1])


def test_lr_schedule_warmup_then_cosine_matches_the_formula():
    cfg = TrainConfig(steps=110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(1, cfg) == pytest.approx(0.1)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    assert lr_factor(50, TrainConfig(steps=100)) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")


def test_train_applies_the_schedule_and_restores_the_base_lr():
    from forgelib.train import train

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    seen = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    opt = Spy(model.parameters(), lr=0.5)
    batches = iter(lambda: {"input_ids": torch.randn(8, 4)}, None)
    loss = lambda m, b: (m(b["input_ids"]).pow(2).mean(), {})  # noqa: E731
    cfg = TrainConfig(steps=6, warmup_steps=2, schedule="cosine", log_every=100)
    train(model, batches, opt, cfg, loss_fn=loss, quiet=True)
    assert seen == pytest.approx([0.5 * lr_factor(s, cfg) for s in range(1, 7)])
    assert opt.param_groups[0]["lr"] == 0.5


def test_chance_level_is_the_best_constant_answer():
    from forgelib.data.base import Sample

    ref = [Sample("a", "T", "logic", 1)] * 3 + [Sample("b", "F", "logic", 1)] + [Sample("c", "7", "arith", 1)]
    test = [Sample("x", "T", "logic", 1), Sample("y", "F", "logic", 1), Sample("z", "8", "arith", 1)]
    assert chance_accuracy(test, ref) == {"arith": 0.0, "logic": 0.5}
