"""Evaluation for any `transformers` causal LM + tokenizer: perplexity, greedy answers and exact-match
accuracy on task samples, full-vocabulary KL, and argmax disagreement between two models.

    acc = exact_match_accuracy(model, tok, generate("arith", 2, 100, "test", 0))
    ppl = perplexity(model, tok, texts, max_len=256)             # disjoint chunks
    ppl = strided_perplexity(model, tok, realtext.load_texts("test"), max_len=1024, stride=512)  # sliding window
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from forgelib.data.base import Sample
from forgelib.data.tasks import check, completion_text
from forgelib.data.tokenizer import (IGNORE_INDEX, EncodedSamples, encode_prompts, encode_samples,
                                     encode_texts, lm_batches, pad_id, plain_ids)
from forgelib.params import short

__all__ = ["accuracy_by_family", "answer_correctness", "answer_question", "argmax_disagreement", "chance_accuracy",
           "completion_budget", "encode_for_eval", "evaluating", "exact_match_accuracy", "family_accuracy",
           "generate_answers", "kl_divergence", "left_pad", "mean_nll", "model_device", "perplexity", "question_ids",
           "sample_nll", "strided_nll", "strided_perplexity", "strided_windows", "argmax_predictions"]


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters live (its first parameter's device)."""
    return next(model.parameters()).device


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def encode_for_eval(tokenizer: PreTrainedTokenizerBase, data: Sequence[Sample] | Sequence[str],
                    max_len: int, answer_only: bool = False, with_steps: bool = False) -> EncodedSamples:
    """Samples through encode_samples (labels on the answer only if asked), texts through encode_texts."""
    if not data:
        raise ValueError("no samples or texts to evaluate")
    if all(isinstance(item, Sample) for item in data):
        return encode_samples(tokenizer, data, max_len, answer_only_loss=answer_only, with_steps=with_steps)
    if all(isinstance(item, str) for item in data):
        if answer_only:
            raise ValueError("answer_only needs Sample objects (texts have no answer part)")
        return encode_texts(tokenizer, data, max_len)
    raise TypeError("data must be all Sample objects or all strings")


def _batches(encoded: dict[str, torch.Tensor], batch_size: int, device: torch.device):
    """Every row once (order irrelevant for sums), trailing padding trimmed, moved to `device`."""
    for batch in lm_batches(encoded, batch_size, seed=0, epochs=1):
        yield {key: value.to(device) for key, value in batch.items()}


def _labelled_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(summed next-token NLL over the labelled positions of one batch, their number); only those positions'
    logits are taken to float32 (a real vocabulary's full (B, T, V) logits need not be copied)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # position t predicts token t+1: (B, T-1, V) against (B, T-1)
    target = batch["labels"][:, 1:]
    scored = target != IGNORE_INDEX  # (B, T-1)
    pred = logits[:, :-1][scored].float()  # (N, V)
    return F.cross_entropy(pred, target[scored], reduction="sum").item(), int(scored.sum())


def _nll_sum(model: torch.nn.Module, encoded: dict[str, torch.Tensor], batch_size: int) -> tuple[float, int]:
    """(summed next-token NLL over labelled positions, number of those positions)."""
    total, count = 0.0, 0
    with evaluating(model):
        for batch in _batches(encoded, batch_size, model_device(model)):
            nll, n = _labelled_nll(model, batch)
            total, count = total + nll, count + n
    return total, count


def mean_nll(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
             data: Sequence[Sample] | Sequence[str], batch_size: int = 16, max_len: int = 256,
             answer_only: bool = False, with_steps: bool = False) -> float:
    """Token-weighted mean negative log-likelihood (nats) of `data` (samples or texts).

    Samples are scored on `<|bos|>prompt completion<|eos|>` (only the completion with `answer_only`);
    texts are cut into chunks of `max_len` tokens. Every token counts once however the batches fall.
    """
    total, count = _nll_sum(model, encode_for_eval(tokenizer, data, max_len, answer_only, with_steps),
                            batch_size)
    if count == 0:
        raise ValueError("no labelled tokens to score")
    return total / count


def sample_nll(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, samples: Sequence[Sample],
               batch_size: int = 64, max_len: int = 256, with_steps: bool = False) -> list[float]:
    """Per sample, in order: the mean NLL (nats) of its completion tokens (teacher-forced), for paired
    comparisons of two models on the same samples."""
    encoded = encode_for_eval(tokenizer, samples, max_len, answer_only=True, with_steps=with_steps)
    out: list[float] = []
    device = model_device(model)
    with evaluating(model):
        for start in range(0, len(samples), batch_size):
            ids = encoded["input_ids"][start:start + batch_size]
            mask = encoded["attention_mask"][start:start + batch_size]
            labels = encoded["labels"][start:start + batch_size]
            width = int(mask.any(0).nonzero().max()) + 1
            ids, mask, labels = ids[:, :width].to(device), mask[:, :width].to(device), labels[:, :width].to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
            target = labels[:, 1:]  # (B, T-1)
            nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
            counts = (target != IGNORE_INDEX).sum(1).clamp(min=1)
            out += (nll.sum(1) / counts).tolist()
    return out


def perplexity(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
               data: Sequence[Sample] | Sequence[str], batch_size: int = 16, max_len: int = 256,
               answer_only: bool = False, with_steps: bool = False) -> float:
    """exp(token-weighted mean NLL); see mean_nll."""
    return math.exp(mean_nll(model, tokenizer, data, batch_size, max_len, answer_only, with_steps))


def strided_windows(n_tokens: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of the strided evaluation of a text of ``n_tokens`` tokens, as ``(start, first, end)``: the
    model reads tokens ``start:end`` (at most ``max_len``) and scores tokens ``first:end``. The first window reads
    from the start and scores tokens 1..; each next one ends ``stride`` tokens later (the last at the text's end)
    and scores the tokens after the previous one's end. So every token but the first is scored exactly once, and
    outside the first window each sees at least ``max_len - stride`` tokens of context."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {short(max_len)}")
    if not 1 <= stride < max_len:
        raise ValueError(f"stride must be in 1..max_len-1 = 1..{max_len - 1} (max_len-1: windows that overlap by "
                         f"one token, every token scored once), got {short(stride)}")
    windows, first, end = [], 1, min(max_len, n_tokens)
    while first < n_tokens:
        windows.append((max(0, end - max_len), first, end))
        first, end = end, min(end + stride, n_tokens)
    return windows


def _window_batches(rows: list[list[int]], windows: list[tuple[int, int, int, int]], batch_size: int,
                    device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``(row, start, first, end)`` windows, right-padded (the causal mask keeps padding out of the real
    positions), labels on the scored tokens only."""
    for at in range(0, len(windows), batch_size):
        chunk = windows[at:at + batch_size]
        width = max(end - start for _, start, _, end in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, W)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, (row, start, first, end) in enumerate(chunk):
            ids[i, :end - start] = torch.tensor(rows[row][start:end], dtype=torch.long)
            mask[i, :end - start] = 1
            labels[i, first - start:end - start] = ids[i, first - start:end - start]
        yield {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def strided_nll(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                max_len: int = 1024, stride: int = 512, batch_size: int = 8) -> tuple[float, int]:
    """(summed NLL in nats, tokens scored) of ``texts`` by the strided evaluation (``strided_windows``): each text
    on its own, as plain tokens (no special tokens added), its first token context only."""
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
        raise TypeError("texts must be a sequence of strings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {short(batch_size)}")
    rows = plain_ids(tokenizer, texts)
    windows = [(row, *window) for row, ids in enumerate(rows) for window in strided_windows(len(ids), max_len, stride)]
    windows.sort(key=lambda w: w[3] - w[1], reverse=True)  # longest first: a batch too large fails at once
    total, count = 0.0, 0
    with evaluating(model):
        for batch in _window_batches(rows, windows, batch_size, model_device(model)):
            nll, n = _labelled_nll(model, batch)
            total, count = total + nll, count + n
    return total, count


def strided_perplexity(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                       max_len: int = 1024, stride: int = 512, batch_size: int = 8) -> float:
    """exp(mean NLL per scored token) of plain ``texts`` (documents, e.g. ``data.realtext.load_texts("test")``) by
    the strided sliding-window evaluation: every token but each text's first scored once, with at least
    ``max_len - stride`` tokens of context outside the first window; batched, on the model's device."""
    total, count = strided_nll(model, tokenizer, texts, max_len, stride, batch_size)
    if count == 0:
        raise ValueError("no tokens to score: every text is shorter than two tokens")
    return math.exp(total / count)


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists so that every prompt ends at the last column. # (B, T) ids and mask"""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


def generate_answers(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                     samples: Sequence[Sample] | Sequence[str], max_new_tokens: int = 32,
                     batch_size: int = 16) -> list[str]:
    """Greedy completions of the samples' prompts (or of raw prompt strings), batched with left padding.

    Generation stops at eos; the returned texts hold only the new tokens, decoded without any special
    token (eos, pad, thought or tool markers).
    """
    from .jobs import map_batches

    prompts = [s.prompt if isinstance(s, Sample) else s for s in samples]
    rows, pad = encode_prompts(tokenizer, prompts), pad_id(tokenizer)

    def new_tokens(lm, batch: list[list[int]]) -> torch.Tensor:
        ids, mask = left_pad(batch, pad)
        out = lm.generate(input_ids=ids.to(model_device(lm)), attention_mask=mask.to(model_device(lm)),
                          max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        return out[:, ids.shape[1]:]

    with evaluating(model):  # the batches side by side where the phase allows (forgelib.jobs.map_batches)
        outs = map_batches(new_tokens, model, [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)])
    return [text for out in outs for text in tokenizer.batch_decode(out, skip_special_tokens=True)]


def question_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """The prompt ids of one question, as the phases ask theirs (``encode_prompts``): through the tokenizer's chat
    template when it has one (a user turn, then the assistant's turn opened; the template writes its own special
    tokens), else bos, then the text."""
    return encode_prompts(tokenizer, [question])[0]


def answer_question(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, question: str,
                    max_new_tokens: int = 64) -> str:
    """The greedy answer of a causal LM to one question (``question_ids``), up to ``max_new_tokens`` or eos: the new
    tokens only, decoded without special tokens."""
    row, pad = question_ids(tokenizer, question), pad_id(tokenizer)
    with evaluating(model):
        ids = torch.tensor([row], dtype=torch.long, device=model_device(model))
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    return tokenizer.decode(out[0, len(row):], skip_special_tokens=True)


def completion_budget(tokenizer: PreTrainedTokenizerBase, samples: Sequence[Sample], with_steps: bool) -> int:
    """Longest reference completion in tokens, plus eos and a margin so that a right answer followed
    by extra text is never cut down to a right answer."""
    lengths = [len(ids) for ids in tokenizer([completion_text(s, with_steps) for s in samples],
                                             add_special_tokens=False)["input_ids"]]
    return max(lengths) + 1 + 4


def answer_correctness(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, samples: Sequence[Sample],
                       max_new_tokens: int | None = None, batch_size: int = 16,
                       with_steps: bool = False) -> list[bool]:
    """Per sample: does the greedy completion exactly match the answer (task `check`)?

    `max_new_tokens=None` sizes the budget from the longest reference completion (`with_steps` counts
    the worked solution, for models trained to write it).
    """
    if not samples:
        raise ValueError("no samples to evaluate")
    budget = max_new_tokens or completion_budget(tokenizer, samples, with_steps)
    outputs = generate_answers(model, tokenizer, samples, budget, batch_size)
    return [check(sample, text) for sample, text in zip(samples, outputs)]


def family_accuracy(samples: Sequence[Sample], correct: Sequence[bool]) -> dict[str, float]:
    """Accuracy per family from per-sample correctness."""
    totals: dict[str, list[int]] = {}
    for sample, ok in zip(samples, correct, strict=True):
        hits = totals.setdefault(sample.family, [0, 0])
        hits[0] += int(ok)
        hits[1] += 1
    return {family: hit / n for family, (hit, n) in sorted(totals.items())}


def exact_match_accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                         samples: Sequence[Sample], max_new_tokens: int | None = None, batch_size: int = 16,
                         with_steps: bool = False) -> float:
    """Fraction of samples whose greedy answer is exactly right (see answer_correctness)."""
    correct = answer_correctness(model, tokenizer, samples, max_new_tokens, batch_size, with_steps)
    return sum(correct) / len(correct)


def accuracy_by_family(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                       samples: Sequence[Sample], max_new_tokens: int | None = None, batch_size: int = 16,
                       with_steps: bool = False) -> dict[str, float]:
    """Exact-match accuracy per family (see answer_correctness)."""
    correct = answer_correctness(model, tokenizer, samples, max_new_tokens, batch_size, with_steps)
    return family_accuracy(samples, correct)


def chance_accuracy(samples: Sequence[Sample], reference: Sequence[Sample]) -> dict[str, float]:
    """Chance level per family: the accuracy on ``samples`` of always giving the most frequent answer of that
    family in ``reference`` (e.g. train-split samples of the same levels) -- the best constant guess. For a
    true/false family it is about 0.5, for a sum of two numbers near 0."""
    counts: dict[str, dict[str, int]] = {}
    for sample in reference:
        family = counts.setdefault(sample.family, {})
        family[sample.answer.strip()] = family.get(sample.answer.strip(), 0) + 1
    modes = {family: max(answers, key=answers.get) for family, answers in counts.items()}
    correct = [sample.answer.strip() == modes.get(sample.family) for sample in samples]
    return family_accuracy(samples, correct)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(P || Q) over the full vocabulary, averaged over the positions where `mask` is true.

    `p_logits`, `q_logits`: (..., V); `mask`: (...). Differentiable, so it also serves as a loss.
    """
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"p_logits {tuple(p_logits.shape)} and q_logits {tuple(q_logits.shape)} differ")
    dtype = torch.promote_types(p_logits.dtype, torch.float32)  # half-precision logits are upcast
    log_p = F.log_softmax(p_logits.to(dtype), dim=-1)
    log_q = F.log_softmax(q_logits.to(dtype), dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # (...) per position
    if mask is None:
        return kl.mean()
    if mask.shape != kl.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must be the logits' shape without the vocabulary "
                         f"axis, {tuple(kl.shape)}")
    weights = mask.to(kl.dtype)
    if weights.sum() == 0:
        raise ValueError("mask selects no position")
    return (kl * weights).sum() / weights.sum()


def argmax_predictions(model: torch.nn.Module, encoded: dict[str, torch.Tensor], batch_size: int = 16) -> torch.Tensor:
    """The model's next-token argmax at every position of ``encoded`` (N, T), -1 where the attention mask is 0."""
    encoded_mask = encoded["attention_mask"].bool()
    out = torch.full(encoded_mask.shape, -1, dtype=torch.long)
    with evaluating(model):
        device = model_device(model)
        for start in range(0, len(out), batch_size):  # in order, each batch cut to its longest real row
            mask = encoded["attention_mask"][start:start + batch_size]
            width = int(mask.any(0).nonzero().max()) + 1
            logits = model(input_ids=encoded["input_ids"][start:start + batch_size, :width].to(device),
                           attention_mask=mask[:, :width].to(device)).logits  # (B, T', V)
            out[start:start + batch_size, :width] = logits.argmax(-1).cpu()
    return out.masked_fill(~encoded_mask, -1)


def argmax_disagreement(model_a: torch.nn.Module, model_b: torch.nn.Module,
                        encoded: dict[str, torch.Tensor], batch_size: int = 16) -> float:
    """Fraction of real (attention-mask) positions where the two models' next-token argmax differ."""
    from forgelib.utils.diversity import argmax_disagreement as disagreement

    a, b = (argmax_predictions(model, encoded, batch_size) for model in (model_a, model_b))
    return disagreement(a, b, encoded["attention_mask"].bool())
