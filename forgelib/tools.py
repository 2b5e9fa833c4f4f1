"""Tools for the curriculum phase: a safe calculator, and greedy generation that runs the model's tool calls.

    calculator("821*92")                                   # "75532"
    traces = generate_with_tools(model, tok, ["821*92="])  # the model writes <|tool|>821*92<|/tool|>, the loop
                                                           # appends <|result|>75532, the model goes on: #75532
    correct, stats = tool_correctness(model, tok, samples, use_tool=True)

**Why a hand-written calculator.** The expression comes from a model's output, i.e. from arbitrary text. Python's
``eval`` (even on a "cleaned" string or through ``ast``) executes or builds far more than arithmetic, and even
plain arithmetic such as ``9**9**9`` runs for minutes and fills memory. The calculator here has its own tokenizer
(ASCII digits, ``+ - * / // % **``, parentheses, whitespace: every other character is refused) and a Pratt
parser with an explicit depth counter; numbers are exact ``Fraction`` values, so ``0.1+0.2`` is ``0.3``. It runs
twice over the tokens: the first pass only checks the syntax and the nesting (it computes nothing), the second
computes. Each bound is a module constant:

* ``MAX_LENGTH`` = 200 characters, checked before anything else (so a megabyte of ``(`` costs nothing);
* ``MAX_DEPTH`` = 32 nested levels (parentheses, unary signs, chains of ``**``) -- parse recursion depth;
* ``MAX_EXPONENT`` = 64: ``|exponent|`` of ``**``; with right associativity ``9**9**9`` is ``9**387420489``
  and is refused at once;
* ``MAX_DIGITS`` = 1000 digits for the numerator and the denominator of every intermediate result. A power's
  size is *estimated before* it is computed (digits ~ |exponent| x log10(base), from bit lengths), so
  ``(10**60)**60`` is refused without being computed; a product is checked from its factors' sizes first;
* ``TIME_LIMIT_S`` = 50 ms of wall time, checked at every parse step and every operation (a safety net:
  the other bounds already keep every input far below it).

Results: an integer when the value is one (``"75532"``, also ``6/3`` -> ``"2"``), else a plain decimal rounded
to ``SIGNIFICANT_DIGITS`` = 10 significant digits without trailing zeros (``1/3`` -> ``"0.3333333333"``). A
non-integer exponent goes through a float power, as in Python (``2**0.5`` -> ``"1.414213562"``). Semantics
follow Python: ``**`` is right-associative and binds tighter than a unary sign on its left (``-2**2`` is -4,
``2**-1`` is 0.5), ``//`` and ``%`` floor (``-7//2`` is -4, ``7%-3`` is -2). Every problem -- a name, a call,
an attribute, a string, a comma, a bracket, a non-ASCII digit, ``1e308``, division by zero, a bound -- gives a
string ``"error: <what>"``; the calculator never raises for a string input.

**Tool-aware generation.** ``generate_with_tools`` decodes greedily (left-padded ``<|bos|>prompt`` rows, as
``forgelib.evaluate.generate_answers``) with ``eos_token_id=[eos, <|/tool|>]``: a row that stops at
``<|/tool|>`` gets ``<|result|>`` + ``tool(expr)`` appended as tokens and is generated further, until eos, its
token budget, or one call more than ``max_calls``. It only uses ``model.generate(input_ids, attention_mask,
max_new_tokens, eos_token_id, pad_token_id, ...)``, so it runs HF causal LMs (Cognate, Llama) and
``forgelib.quietstar.QuietStarModel`` alike. The trace's text keeps the tool markup, so
``forgelib.data.tasks.check`` reads the answer after the last ``#`` of ``<|tool|>821*92<|/tool|><|result|>75532#75532``.
"""
from __future__ import annotations

import decimal
import math
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from forgelib.data.base import TOOL_CLOSE, TOOL_OPEN, TOOL_RESULT, Sample
from forgelib.data.tasks import check
from forgelib.data.tokenizer import MissingSpecialTokensError, encode_prompts, missing_special_tokens, pad_id
from forgelib.evaluate import _answer_budget, _device, _evaluating, _left_pad

__all__ = ["MAX_DEPTH", "MAX_DIGITS", "MAX_EXPONENT", "MAX_LENGTH", "SIGNIFICANT_DIGITS", "TIME_LIMIT_S",
           "ToolTrace", "calculator", "extract_tool_call", "find_tool_calls", "generate_with_tools",
           "tool_correctness", "tool_stats"]

# --- calculator bounds (see the module docstring) ---------------------------------------------------------
MAX_LENGTH = 200          # characters of the whole expression
MAX_DEPTH = 32            # nested parse levels: parentheses, unary signs, right operands of **
MAX_EXPONENT = 64         # |exponent| of **
MAX_DIGITS = 1000         # digits of the numerator and of the denominator of any intermediate result
TIME_LIMIT_S = 0.05       # wall time of one evaluation, checked inside the parse/evaluation loop
SIGNIFICANT_DIGITS = 10   # of a non-integer result

ERROR_PREFIX = "error: "
_LOG10_2 = math.log10(2)
_DIGITS = frozenset("0123456789")  # ASCII only: str.isdigit() would also accept e.g. Arabic-Indic digits
_SPACES = frozenset(" \t\r\n")
_SYMBOLS = ("**", "//", "+", "-", "*", "/", "%", "(", ")")  # two-character operators first
# infix operator -> (left binding power, right binding power): higher binds tighter; right < left makes ** right-
# associative. A unary sign parses its operand at _PREFIX_BP: ** (7) still binds inside it (-2**2 = -(2**2)),
# * (3) does not (-2*3 = (-2)*3).
_INFIX = {"+": (1, 2), "-": (1, 2), "*": (3, 4), "/": (3, 4), "//": (3, 4), "%": (3, 4), "**": (8, 7)}
_PREFIX_BP = 5


class _CalcError(Exception):
    """A refused expression; its message follows "error: " in the calculator's answer."""


# A token: (kind, value, position); kind is "num" (value a Fraction) or one of _SYMBOLS (value None).
_Token = tuple[str, "Fraction | None", int]


def _tokenize(expr: str) -> list[_Token]:
    """Split `expr` into numbers and operator symbols; anything else is refused, naming what and where."""
    tokens: list[_Token] = []
    i, n = 0, len(expr)
    while i < n:
        ch = expr[i]
        if ch in _SPACES:
            i += 1
            continue
        if ch == "." and i + 1 < n and (expr[i + 1].isalpha() or expr[i + 1] == "_"):
            j = i + 1
            while j < n and (expr[j].isalnum() or expr[j] == "_"):
                j += 1
            raise _CalcError(f"attributes are not allowed ({expr[i:j]!r} at position {i})")
        if ch in _DIGITS or ch == ".":
            j = i
            while j < n and expr[j] in _DIGITS:
                j += 1
            whole, frac = expr[i:j], ""
            if j < n and expr[j] == ".":
                k = j + 1
                while k < n and expr[k] in _DIGITS:
                    k += 1
                frac, j = expr[j + 1:k], k
            # a literal must not run on into letters, digits of other scripts, '_' or a second '.'
            # (1e308, 0x10, 1_000, 1.2.3, 1٣)
            if (not whole and not frac) or (j < n and (expr[j].isalnum() or expr[j] in "._")):
                end = j
                while end < n and (expr[end].isalnum() or expr[end] in "._"):
                    end += 1
                raise _CalcError(f"malformed number {expr[i:max(end, i + 1)]!r} at position {i} (only plain "
                                 f"decimals such as 12 or 3.25)")
            tokens.append(("num", Fraction(int(whole + frac or "0"), 10 ** len(frac)), i))
            i = j
            continue
        if ch.isalpha() or ch == "_":
            j = i
            while j < n and (expr[j].isalnum() or expr[j] == "_"):
                j += 1
            raise _CalcError(f"names are not allowed ({expr[i:j]!r} at position {i})")
        symbol = next((s for s in _SYMBOLS if expr.startswith(s, i)), None)
        if symbol is None:
            raise _CalcError(f"unsupported character {ch!r} at position {i} (allowed: digits, '.', "
                             f"+ - * / // % **, parentheses, spaces)")
        tokens.append((symbol, None, i))
        i += len(symbol)
    return tokens


def _size(value: Fraction) -> int:
    """An upper estimate of the digits of the larger of numerator and denominator."""
    bits = max(abs(value.numerator).bit_length(), value.denominator.bit_length())
    return int(bits * _LOG10_2) + 1


class _Parser:
    """Pratt parser over the tokens. With `compute=False` it only checks syntax and nesting (values are None);
    with `compute=True` it also evaluates, checking every bound as it goes."""

    def __init__(self, tokens: list[_Token], compute: bool, deadline: float):
        self.tokens, self.compute, self.deadline = tokens, compute, deadline
        self.pos = 0
        self.depth = 0

    def parse(self) -> Fraction | None:
        value = self.expression(0)
        if self.pos < len(self.tokens):
            raise _CalcError(f"unexpected {self._describe(self.tokens[self.pos])}")
        return value

    @staticmethod
    def _describe(token: _Token) -> str:
        kind, _, at = token
        return f"number at position {at}" if kind == "num" else f"{kind!r} at position {at}"

    def _check_time(self) -> None:
        if time.perf_counter() > self.deadline:
            raise _CalcError(f"time limit of {TIME_LIMIT_S * 1000:g} ms exceeded")

    def expression(self, min_bp: int) -> Fraction | None:
        """An expression whose infix operators all bind at least `min_bp` (the core of a Pratt parser)."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _CalcError(f"nesting deeper than {MAX_DEPTH} levels")
        self._check_time()
        if self.pos >= len(self.tokens):
            raise _CalcError("unexpected end of expression")
        kind, value, at = self.tokens[self.pos]
        self.pos += 1
        if kind == "num":
            left = value
        elif kind == "(":
            left = self.expression(0)
            if self.pos >= len(self.tokens) or self.tokens[self.pos][0] != ")":
                raise _CalcError(f"'(' at position {at} is never closed")
            self.pos += 1
        elif kind in ("+", "-"):
            operand = self.expression(_PREFIX_BP)
            left = -operand if (self.compute and kind == "-") else operand
        else:
            raise _CalcError(f"unexpected {kind!r} at position {at}")
        while self.pos < len(self.tokens):
            token = self.tokens[self.pos]
            if token[0] == ")":
                break
            if token[0] not in _INFIX:  # a number or '(' right after a value: 2 3, 2(3)
                raise _CalcError(f"unexpected {self._describe(token)} (an operator was expected)")
            left_bp, right_bp = _INFIX[token[0]]
            if left_bp < min_bp:
                break
            self.pos += 1
            right = self.expression(right_bp)
            left = self._apply(token[0], left, right) if self.compute else None
        self.depth -= 1
        return left

    def _apply(self, op: str, a: Fraction, b: Fraction) -> Fraction:
        """One operation, refusing zero divisors and oversized results (powers and products before computing)."""
        self._check_time()
        if op == "+":
            result = a + b
        elif op == "-":
            result = a - b
        elif op == "*":
            if _size(a) + _size(b) > MAX_DIGITS + 2:
                raise _CalcError(f"result too large (more than {MAX_DIGITS} digits)")
            result = a * b
        elif op in ("/", "//", "%"):
            if b == 0:
                raise _CalcError("division by zero" if op == "/" else f"{op!r} by zero")
            result = a / b if op == "/" else Fraction(a // b) if op == "//" else a % b
        else:
            result = self._power(a, b)
        if _size(result) > MAX_DIGITS:
            raise _CalcError(f"result too large (more than {MAX_DIGITS} digits)")
        return result

    def _power(self, base: Fraction, exponent: Fraction) -> Fraction:
        """base ** exponent: exact for an integer exponent, a float power otherwise (as Python)."""
        if abs(exponent) > MAX_EXPONENT:
            raise _CalcError(f"exponent out of range (|exponent| <= {MAX_EXPONENT})")
        if base == 0 and exponent < 0:
            raise _CalcError("division by zero (zero to a negative power)")
        if exponent.denominator == 1:
            # estimated digits of the result, before computing it
            if abs(exponent) * _size(base) > MAX_DIGITS + MAX_EXPONENT:
                raise _CalcError(f"result too large (more than {MAX_DIGITS} digits)")
            return base ** exponent.numerator
        if base < 0:
            raise _CalcError("fractional power of a negative number")
        try:
            value = math.pow(float(base), float(exponent))
        except OverflowError:
            raise _CalcError("result too large for a fractional power") from None
        if not math.isfinite(value):
            raise _CalcError("result too large for a fractional power")
        return Fraction(value)


def _format(value: Fraction) -> str:
    """An integer as such; anything else as a plain decimal of SIGNIFICANT_DIGITS digits, trailing zeros cut."""
    if value.denominator == 1:
        return str(value.numerator)
    with decimal.localcontext() as ctx:
        ctx.prec, ctx.rounding = SIGNIFICANT_DIGITS, decimal.ROUND_HALF_EVEN
        text = format(decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def calculator(expr: str) -> str:
    """Evaluate an arithmetic expression safely: the value as text, or ``"error: <what went wrong>"``.

    Integers and decimals, ``+ - * / // % **``, unary signs, parentheses and whitespace; Python's precedence,
    associativity and floor semantics; exact arithmetic. Never evaluates code and never raises for a string
    (a non-string raises TypeError). See the module docstring for the bounds.
    """
    if not isinstance(expr, str):
        raise TypeError(f"calculator takes a str, got {type(expr).__name__}")
    if len(expr) > MAX_LENGTH:
        return f"{ERROR_PREFIX}expression too long ({len(expr)} characters > {MAX_LENGTH})"
    deadline = time.perf_counter() + TIME_LIMIT_S
    try:
        tokens = _tokenize(expr)
        if not tokens:
            raise _CalcError("empty expression")
        _Parser(tokens, compute=False, deadline=deadline).parse()  # syntax and nesting only
        return _format(_Parser(tokens, compute=True, deadline=deadline).parse())
    except _CalcError as err:
        return f"{ERROR_PREFIX}{err}"
    except Exception as err:  # a safety net: no input string may make the calculator raise
        return f"{ERROR_PREFIX}cannot evaluate ({type(err).__name__})"


# --- tool calls in text --------------------------------------------------------------------------------------

def extract_tool_call(text: str) -> str | None:
    """The expression of the last complete ``<|tool|>expr<|/tool|>`` call in `text` if it still waits for its
    result (no ``<|result|>`` follows its ``<|/tool|>``, whitespace aside), else None.

    None too when `text` has no ``<|/tool|>``, no ``<|tool|>`` opens the last one, or the span between them holds
    other tool markup (``<|tool|>a<|/tool|>b<|/tool|>`` is not a complete call)."""
    end = text.rfind(TOOL_CLOSE)
    if end < 0 or text[end + len(TOOL_CLOSE):].lstrip().startswith(TOOL_RESULT):
        return None
    start = text.rfind(TOOL_OPEN, 0, end)
    if start < 0:
        return None
    expr = text[start + len(TOOL_OPEN):end]
    return None if (TOOL_CLOSE in expr or TOOL_RESULT in expr) else expr


def find_tool_calls(text: str) -> list[str]:
    """The expressions of every complete ``<|tool|>expr<|/tool|>`` call in `text`, in order (results or not)."""
    calls = []
    for piece in text.split(TOOL_OPEN)[1:]:
        expr, closed, _ = piece.partition(TOOL_CLOSE)
        if closed and TOOL_RESULT not in expr:
            calls.append(expr)
    return calls


# --- tool-aware generation ------------------------------------------------------------------------------------

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
    with _evaluating(model):
        while active := [row for row in rows if row.stop is None]:
            for start in range(0, len(active), batch_size):
                chunk = active[start:start + batch_size]
                budget = max(taker.max_new_tokens - row.generated for row in chunk)
                ids, mask = _left_pad([row.ids for row in chunk], pad)  # (B, T) each
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=budget, num_beams=1, **sampling,
                                     eos_token_id=taker.stops, pad_token_id=pad)  # (B, T + new)
                for row, new in zip(chunk, out[:, ids.shape[1]:].tolist()):
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
    pad, device = pad_id(tokenizer), _device(model)
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
    budget = max_new_tokens if max_new_tokens is not None else _answer_budget(tokenizer, samples, with_steps=True)
    traces = generate_with_tools(model, tokenizer, samples, budget, tool if use_tool else None, max_calls,
                                 batch_size)
    correct = [check(sample, trace.text) for sample, trace in zip(samples, traces)]
    stats = {"use_tool": bool(use_tool), "samples": len(samples), "accuracy": sum(correct) / len(correct),
             **tool_stats(traces)}
    return correct, stats
