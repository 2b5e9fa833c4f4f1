"""Tokenizer for Agent Forge: a byte-level BPE with every special token reserved up front, and the
encoding of samples / texts into causal-LM training tensors.

    tok = train_tokenizer(texts, vocab_size=512, save_dir="out/tokenizer")
    enc = encode_samples(tok, samples, max_len=64)            # input_ids, attention_mask, labels
    for batch in lm_batches(enc, batch_size=32, seed=0): ...

The tokenizer is trained with the `tokenizers` library and wrapped as a `transformers` fast tokenizer,
so `AutoTokenizer.from_pretrained(dir)` reloads it. Special tokens get ids 0..7 in SPECIAL_TOKENS order,
so embedding shapes never change between phases. Encoding helpers work with any HF tokenizer that has
the bos/eos/pad tokens (pad falls back to eos).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from forgelib.data.base import ANSWER_MARK, STEP_SEP, TOOL_CLOSE, TOOL_OPEN, TOOL_RESULT, Sample
from forgelib.data.tasks import completion_text

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
START_THOUGHT, END_THOUGHT = "<|startofthought|>", "<|endofthought|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, START_THOUGHT, END_THOUGHT, TOOL_OPEN, TOOL_CLOSE, TOOL_RESULT]
IGNORE_INDEX = -100  # the label value HF losses skip
_N_BYTES = 256


class MissingSpecialTokensError(ValueError):
    """A tokenizer lacks some of SPECIAL_TOKENS (or they are not single tokens)."""


class SequenceTooLongError(ValueError):
    """A sample does not fit the requested max_len."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, save_dir: str | Path | None = None,
                    min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (seconds) and wrap it as a fast `transformers` tokenizer.

    Digits are split one per token before BPE so that numbers are spelled digit by digit. All 256 bytes
    are in the alphabet, so any text encodes. `vocab_size` counts bytes, special tokens and merges.
    """
    minimum = _N_BYTES + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be >= {minimum} (256 bytes + {len(SPECIAL_TOKENS)} special "
                         f"tokens), got {vocab_size}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=SPECIAL_TOKENS[3:], clean_up_tokenization_spaces=False, padding_side="right")
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def missing_special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The SPECIAL_TOKENS that `tokenizer` does not encode as one special id of their own."""
    missing = []
    for token in SPECIAL_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or token not in tokenizer.all_special_tokens:
            missing.append(token)
    return missing


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder with AutoTokenizer; fail clearly when SPECIAL_TOKENS or bos/eos are missing."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    missing = missing_special_tokens(tokenizer)
    if missing:
        raise MissingSpecialTokensError(
            f"tokenizer at {path} lacks special tokens {missing}; Agent Forge needs all of "
            f"{SPECIAL_TOKENS} (add them with ensure_special_tokens and resize the model's embeddings)")
    unset = [role for role in ("bos_token", "eos_token") if getattr(tokenizer, role) is None]
    if unset:
        raise MissingSpecialTokensError(f"tokenizer at {path} has no {unset}")
    return tokenizer


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add the SPECIAL_TOKENS a foreign tokenizer lacks (ours fill unset bos/eos/pad roles); returns how
    many were added, so the caller can `model.resize_token_embeddings(len(tokenizer))`."""
    missing = missing_special_tokens(tokenizer)
    if not missing:
        return 0
    roles = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    named = {role: tok for role, tok in roles.items() if getattr(tokenizer, role) is None}
    extra = [tok for tok in missing if tok not in named.values()]
    return tokenizer.add_special_tokens({**named, "extra_special_tokens": extra},
                                        replace_extra_special_tokens=False)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The padding id: pad, else eos (as for tokenizers shipped without a pad token)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise MissingSpecialTokensError("tokenizer has neither a pad nor an eos token to pad with")
    return pid


def plain_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Plain token ids, without the tokenizer's own bos/eos template (we add those explicitly)."""
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []


_INSERTED = re.compile(re.escape(TOOL_RESULT) + r"[^" + re.escape(STEP_SEP + ANSWER_MARK) + r"]*")


def completion_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[tuple[list[int], set[int]]]:
    """Each completion's token ids and the positions the calculator writes at inference (``<|result|>VALUE``, up
    to the next step separator or answer mark): those pieces are tokenized on their own, as
    ``forgelib.tools.generate_with_tools`` appends them, and the model's own text between them likewise, so a
    trained completion has exactly the ids generation produces (a completion without a result is one piece). All
    pieces go through the tokenizer in one call."""
    pieces: list[tuple[int, str, bool]] = []  # (text index, piece, written by the calculator)
    for i, text in enumerate(texts):
        at = 0
        for m in _INSERTED.finditer(text):
            pieces += [(i, text[at:m.start()], False)] if m.start() > at else []
            pieces.append((i, m.group(), True))
            at = m.end()
        pieces += [(i, text[at:], False)] if at < len(text) else []
    out: list[tuple[list[int], set[int]]] = [([], set()) for _ in texts]
    for (i, _, by_tool), got in zip(pieces, plain_ids(tokenizer, [piece for _, piece, _ in pieces])):
        ids, inserted = out[i]
        inserted.update(range(len(ids), len(ids) + len(got)) if by_tool else ())
        ids += got
    return out


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


_FRAME_MARK = "\x00"  # stands for the prompt while the chat template is rendered (no template writes it itself)


class ChatTemplateError(ValueError):
    """A tokenizer's chat template cannot frame a prompt (it does not write the user's message exactly once)."""


def prompt_frame(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]] | None:
    """(ids before, ids after) every prompt when ``tokenizer`` has a chat template, else None.

    A pretrained chat model (e.g. SmolLM2-Instruct) is asked its questions the way it was tuned: the prompt is the
    user's message and the answer the assistant's turn. The template is rendered once around a marker, with its
    generation prompt (the assistant's turn opened) and the template's own default system turn, if any; the two
    sides are encoded as plain ids (the template writes its own special tokens) and kept on the tokenizer. Agent
    Forge's own tokenizers carry no template: their prompts stay ``<|bos|>prompt``."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    cached = getattr(tokenizer, "_forge_prompt_frame", None)
    if cached is not None and cached[0] == template:
        return cached[1]
    text = tokenizer.apply_chat_template([{"role": "user", "content": _FRAME_MARK}], tokenize=False,
                                         add_generation_prompt=True)
    if not isinstance(text, str) or text.count(_FRAME_MARK) != 1:
        raise ChatTemplateError("the tokenizer's chat template does not write a user message exactly once, so "
                                "prompts cannot be framed by it; remove its chat_template to ask plain prompts")
    before, after = text.split(_FRAME_MARK)
    frame = (plain_ids(tokenizer, [before])[0] if before else [], plain_ids(tokenizer, [after])[0] if after else [])
    try:
        tokenizer._forge_prompt_frame = (template, frame)
    except AttributeError:  # a tokenizer class that refuses new attributes: rendered again next time
        pass
    return frame


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """The ids every prompt is trained and asked with (encode_samples' prefix, generation's input): `<|bos|>prompt`,
    or, with a chat template, the prompt as the user's message with the assistant's turn opened
    (:func:`prompt_frame`)."""
    frame = prompt_frame(tokenizer)
    if frame is not None:
        before, after = frame
        return [before + ids + after for ids in plain_ids(tokenizer, prompts)]
    return [_bos(tokenizer) + ids for ids in plain_ids(tokenizer, prompts)]


def token_distance(tokenizer: PreTrainedTokenizerBase, sample: Sample) -> int:
    """Tokens lying wholly between a `recall` sample's queried pair and its query, under `tokenizer`."""
    if "pair_end" not in sample.meta or "query_start" not in sample.meta:
        raise ValueError(f"token_distance needs a 'recall' sample (meta with pair_end/query_start), "
                         f"got family {sample.family!r}")
    start, end = sample.meta["pair_end"], sample.meta["query_start"]
    offsets = tokenizer(sample.prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return sum(1 for a, b in offsets if a >= start and b <= end)


class EncodedSamples(dict):
    """`input_ids`, `attention_mask`, `labels` tensors (N, T); `n_dropped` counts samples left out."""

    n_dropped: int = 0


def _to_tensors(rows: list[tuple[list[int], list[int]]], pad: int) -> EncodedSamples:
    """Right-pad (ids, labels) rows to the longest row. # (N, T) each"""
    width = max((len(ids) for ids, _ in rows), default=0)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(ids)] = torch.tensor(labs)
        mask[i, :len(ids)] = 1
    return EncodedSamples(input_ids=input_ids, attention_mask=mask, labels=labels)


def encode_samples(tokenizer: PreTrainedTokenizerBase, samples: Sequence[Sample], max_len: int,
                   answer_only_loss: bool = True, with_steps: bool = False,
                   drop_long: bool = False) -> EncodedSamples:
    """Encode `<|bos|>prompt completion<|eos|>` (no space added; completion = answer, or worked steps and
    answer with `with_steps`) as right-padded tensors. Labels are -100 on padding and, with
    `answer_only_loss`, on the prompt. A sample longer than `max_len` raises SequenceTooLongError, or is
    left out with `drop_long` (counted in `.n_dropped`). Prompt and completion are tokenized separately,
    so the prompt's ids are exactly what generation is later given. The calculator's text in a worked step
    (`<|result|>VALUE`, which generation appends itself) has no label: the model is not trained to predict what
    the tool computes, only to call it and to use the result (`completion_ids`).
    """
    prompts = encode_prompts(tokenizer, [s.prompt for s in samples])
    completions = completion_ids(tokenizer, [completion_text(s, with_steps) for s in samples])
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    rows, dropped = [], 0
    for i, (p, (c, inserted)) in enumerate(zip(prompts, completions)):
        ids = p + c + eos
        if len(ids) > max_len:
            if not drop_long:
                raise SequenceTooLongError(
                    f"sample {i} ({samples[i].family}, level {samples[i].level}) has {len(ids)} tokens > "
                    f"max_len={max_len}; raise max_len or pass drop_long=True")
            dropped += 1
            continue
        own = [IGNORE_INDEX if k in inserted else t for k, t in enumerate(c)]  # the calculator's text: no label
        labels = ([IGNORE_INDEX] * len(p) + own + eos) if answer_only_loss else p + own + eos
        rows.append((ids, labels))
    encoded = _to_tensors(rows, pad_id(tokenizer))
    encoded.n_dropped = dropped
    return encoded


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int) -> EncodedSamples:
    """Encode plain documents `<|bos|>text<|eos|>` for language modelling, cut into consecutive chunks of
    at most `max_len` tokens (a long document becomes several rows); every real token is a label."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    rows = []
    for ids in plain_ids(tokenizer, texts):
        stream = _bos(tokenizer) + ids + eos
        rows += [(stream[i:i + max_len], stream[i:i + max_len]) for i in range(0, len(stream), max_len)]
    return _to_tensors(rows, pad_id(tokenizer))


def lm_batches(encoded: dict[str, torch.Tensor], batch_size: int, seed: int = 0, epochs: int | None = 1,
               drop_last: bool = False, trim: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Mini-batches of `encoded` rows in a shuffled order, reshuffled every epoch, deterministic in `seed`.

    `epochs=None` repeats forever. With `trim`, columns that are padding in every row of the batch are
    cut off (right padding makes them trailing), which saves compute without changing the loss.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(encoded["input_ids"])
    if n == 0:
        raise ValueError("lm_batches got no rows to batch")
    generator = torch.Generator().manual_seed(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = torch.randperm(n, generator=generator)  # (N,) a fresh order every epoch
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            batch = {key: value[idx] for key, value in encoded.items()}
            if trim and "attention_mask" in batch:
                width = int(batch["attention_mask"].sum(dim=1).max())
                batch = {key: value[:, :width] for key, value in batch.items()}
            yield batch
        epoch += 1
