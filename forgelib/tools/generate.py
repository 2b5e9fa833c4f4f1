"""Tool-aware generation: ``generate_with_tools`` decodes greedily (left-padded ``<|bos|>prompt`` rows, as
``forgelib.evaluate.generate_answers``) with ``eos_token_id=[eos, <|/tool|>]``: a row that stops at
``<|/tool|>`` gets ``<|result|>`` + ``tool(expr)`` appended as tokens and is generated further, until eos, its
token budget, or one call more than ``max_calls``. It only uses ``model.generate(input_ids, attention_mask,
max_new_tokens, eos_token_id, pad_token_id, ...)``, so it runs HF causal LMs (Cognate, Llama) and
``forgelib.quietstar.QuietStarModel`` alike. The trace's text keeps the tool markup, so
``forgelib.data.tasks.check`` reads the answer after the last ``#`` of ``<|tool|>821*92<|/tool|><|result|>75532#75532``.

The scores of such completions: ``tool_stats`` (call counts) and ``tool_correctness`` (exact match with
the tool or without it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from ..data.base import TOOL_CLOSE, TOOL_OPEN, TOOL_RESULT, Sample
from ..data.tasks import check
from ..data.tokenizer import MissingSpecialTokensError, encode_prompts, missing_special_tokens, pad_id
from ..evaluate import completion_budget, evaluating, left_pad, model_device
from .calc import ERROR_PREFIX, calculator
from .calls import extract_tool_call, find_tool_calls

__all__ = ["ToolTrace", "generate_with_tools", "tool_correctness", "tool_stats"]


@dataclass
class ToolTrace:
    """One greedy completion with its tool calls.

    `text` is the completion as the model saw it: its own tokens and the appended ``<|result|>value`` pieces,
    special tokens kept as markup (eos, pad and bos left out). `calls`: one {"expr", "result", "ok"} per call
    (`expr` None when a ``<|/tool|>`` had no ``<|tool|>`` to match; `result` None when no tool ran, i.e.
    generation without a tool). `n_generated` counts the model's tokens (its budget, stop tokens included),
    `n_result_tokens` the appended ones (not counted against the budget). `stop`: "eos", "length" (budget
    spent) or "max_calls" (a call beyond max_calls, left unanswered).
    """

    prompt: str
    text: str
    calls: list[dict] = field(default_factory=list)
    n_generated: int = 0
    n_result_tokens: int = 0
    stop: str = ""
    ids: list[int] = field(default_factory=list)
    """The completion's token ids as the model saw them (its own tokens, stop tokens included, and the appended
    result tokens)."""
    generated: list[int] = field(default_factory=list)
    """Per id: 1 for a token the model wrote, 0 for an appended result token (a policy gradient counts only 1s)."""


@dataclass
class _Row:
    """Generation state of one prompt: its full context ids (prompt + completion so far)."""

    prompt: str
    ids: list[int]
    n_prompt: int
    calls: list[dict] = field(default_factory=list)
    generated: int = 0
    result_tokens: int = 0
    stop: str | None = None  # None while the row is still generating
    own: list[int] = field(default_factory=list)  # per completion id: 1 = written by the model, 0 = a tool result


def _check_args(max_new_tokens: int, max_calls: int, batch_size: int) -> None:
    for name, value, low in (("max_new_tokens", max_new_tokens, 0), ("max_calls", max_calls, 0),
                             ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass
class _Taker:
    """How ``generate_with_tools`` takes a row's freshly generated tokens: its stop tokens, budgets and tool."""

    tokenizer: PreTrainedTokenizerBase
    tool: Callable[[str], str] | None
    stops: list[int]
    eos_id: int | None
    hidden: set[int]  # token ids left out of the completion's text (eos, pad, bos)
    max_new_tokens: int
    max_calls: int

    def completion(self, row: _Row) -> str:
        """The row's completion as text (special tokens kept as markup, the ``hidden`` ones left out)."""
        return self.tokenizer.decode([t for t in row.ids[row.n_prompt:] if t not in self.hidden],
                                     skip_special_tokens=False)

    def advance(self, row: _Row, new: list[int]) -> None:
        """Take a row's freshly generated tokens: cut at its budget and first stop token, then run its call."""
        new = new[:self.max_new_tokens - row.generated]
        cut = next((k for k, t in enumerate(new) if t in self.stops), None)
        new = new if cut is None else new[:cut + 1]
        row.ids += new
        row.own += [1] * len(new)
        row.generated += len(new)
        if cut is None:
            row.stop = "length"
        elif new[-1] == self.eos_id:
            row.stop = "eos"
        elif len(row.calls) >= self.max_calls:
            row.stop = "max_calls"
        elif row.generated >= self.max_new_tokens:
            row.stop = "length"
        else:
            expr = extract_tool_call(self.completion(row))
            result = self.tool(expr) if expr is not None else f"{ERROR_PREFIX}no {TOOL_OPEN} opens this {TOOL_CLOSE}"
            result = str(result)
            row.calls.append({"expr": expr, "result": result, "ok": not result.startswith(ERROR_PREFIX)})
            appended = self.tokenizer(TOOL_RESULT + result, add_special_tokens=False)["input_ids"]
            row.ids += appended
            row.own += [0] * len(appended)
            row.result_tokens += len(appended)


def _generate_rounds(model: torch.nn.Module, rows: list[_Row], taker: _Taker, batch_size: int, sampling: dict,
                     pad: int, device: torch.device) -> None:
    """Generate every unfinished row, round after round (batches of ``batch_size``, left-padded, one ``generate``
    call each with the batch's largest remaining budget), until every row has stopped."""
    from ..jobs import map_batches

    def new_tokens(lm, chunk: list[_Row]) -> list[list[int]]:
        budget = max(taker.max_new_tokens - row.generated for row in chunk)
        ids, mask = left_pad([row.ids for row in chunk], pad)  # (B, T) each
        out = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=budget,
                          num_beams=1, **sampling, eos_token_id=taker.stops, pad_token_id=pad)  # (B, T + new)
        return out[:, ids.shape[1]:].tolist()

    twins: list = []  # the other threads' copies of the model, made once for every round
    with evaluating(model):
        while active := [row for row in rows if row.stop is None]:
            chunks = [active[start:start + batch_size] for start in range(0, len(active), batch_size)]
            # side by side where the phase allows; sampled generation draws from torch's generator: in turn
            news_per_chunk = map_batches(new_tokens, model, chunks, in_turn=bool(sampling.get("do_sample")),
                                         twins=twins)
            for chunk, news in zip(chunks, news_per_chunk):
                for row, new in zip(chunk, news):
                    taker.advance(row, new)


def _traces(rows: list[_Row], taker: _Taker) -> list[ToolTrace]:
    """The finished rows as traces (without a tool: the calls the text writes, each with ``result=None``)."""
    traces = []
    for row in rows:
        text = taker.completion(row)
        calls = row.calls if taker.tool is not None else [{"expr": e, "result": None, "ok": False}
                                                          for e in find_tool_calls(text)]
        traces.append(ToolTrace(row.prompt, text, calls, row.generated, row.result_tokens, row.stop,
                                row.ids[row.n_prompt:], list(row.own)))
    return traces


def generate_with_tools(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                        prompts: Sequence[str] | Sequence[Sample], max_new_tokens: int = 64,
                        tool: Callable[[str], str] | None = calculator, max_calls: int = 4,
                        batch_size: int = 16, temperature: float = 0.0) -> list[ToolTrace]:
    """Greedy completions of `prompts` (strings or samples) that run the model's tool calls (``temperature`` >
    0: sampled instead, for a model with transformers' ``generate``; the curriculum's dreams use it).

    Each round generates every unfinished row (batches of `batch_size`, left-padded) until eos or
    ``<|/tool|>``. A row stopped at ``<|/tool|>`` gets ``<|result|>`` + ``tool(expr)`` appended as tokens and
    goes into the next round; it ends at eos, when its `max_new_tokens` model tokens are spent (a call on the
    last token is not run), or at a call beyond `max_calls` (not run: ``stop="max_calls"``). Rows of a batch
    share one ``generate`` call with the largest remaining budget; each row keeps only its own budget's tokens
    (greedy decoding makes that the same as generating it alone). The tool's exceptions propagate.

    ``tool=None`` is plain greedy generation that stops at eos only: the model must write any result itself;
    its calls are recorded with ``result=None``.
    """
    _check_args(max_new_tokens, max_calls, batch_size)
    sampling = {"do_sample": True, "temperature": float(temperature), "top_k": 0} if temperature > 0 else \
        {"do_sample": False}
    missing = [t for t in missing_special_tokens(tokenizer) if t in (TOOL_OPEN, TOOL_CLOSE, TOOL_RESULT)]
    if missing and tool is not None:
        raise MissingSpecialTokensError(f"tokenizer lacks the tool tokens {missing} (see "
                                        f"forgelib.data.tokenizer.ensure_special_tokens)")
    texts = [p.prompt if isinstance(p, Sample) else p for p in prompts]
    close_id = tokenizer.convert_tokens_to_ids(TOOL_CLOSE)
    eos_id = tokenizer.eos_token_id
    stops = [i for i in (eos_id, close_id if tool is not None else None) if i is not None]
    hidden = {i for i in (eos_id, tokenizer.pad_token_id, tokenizer.bos_token_id) if i is not None}
    pad, device = pad_id(tokenizer), model_device(model)
    rows = [_Row(text, ids, len(ids)) for text, ids in zip(texts, encode_prompts(tokenizer, texts))]
    taker = _Taker(tokenizer, tool, stops, eos_id, hidden, max_new_tokens, max_calls)
    for row in rows:
        if max_new_tokens == 0:
            row.stop = "length"
    _generate_rounds(model, rows, taker, batch_size, sampling, pad, device)
    return _traces(rows, taker)


def tool_stats(traces: Sequence[ToolTrace]) -> dict[str, float | int]:
    """Call counts of some traces: `calls` made, `calls_ok` (the tool returned a value, not an error),
    `tool_success_rate` = calls_ok / calls (0.0 without calls), `samples_with_call`."""
    calls = sum(len(t.calls) for t in traces)
    calls_ok = sum(bool(c["ok"]) for t in traces for c in t.calls)
    return {"calls": calls, "calls_ok": calls_ok, "tool_success_rate": calls_ok / calls if calls else 0.0,
            "samples_with_call": sum(bool(t.calls) for t in traces)}


def tool_correctness(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, samples: Sequence[Sample],
                     use_tool: bool, max_new_tokens: int | None = None, batch_size: int = 16,
                     tool: Callable[[str], str] = calculator,
                     max_calls: int = 4) -> tuple[list[bool], dict[str, float | int | bool]]:
    """Per sample: is the greedy answer right (task `check`), with the tool or without it?

    `use_tool=True` runs `generate_with_tools` (calls get results); `use_tool=False` is plain greedy
    generation, in which a call gets no result and the model must write the value itself (its calls are still
    counted, none succeeds). `max_new_tokens=None` sizes the budget from the longest worked solution (result
    included), the same for both arms. Stats: `use_tool`, `samples`, `accuracy`, and those of `tool_stats`.
    """
    if not samples:
        raise ValueError("no samples to evaluate")
    budget = max_new_tokens if max_new_tokens is not None else completion_budget(tokenizer, samples, with_steps=True)
    traces = generate_with_tools(model, tokenizer, samples, budget, tool if use_tool else None, max_calls,
                                 batch_size)
    correct = [check(sample, trace.text) for sample, trace in zip(samples, traces)]
    stats = {"use_tool": bool(use_tool), "samples": len(samples), "accuracy": sum(correct) / len(correct),
             **tool_stats(traces)}
    return correct, stats
