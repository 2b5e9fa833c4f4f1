"""forgelib.tools: the calculator against exact Fraction arithmetic computed here (never with eval), its refusals
and their speed, tool-call extraction, and the tool-aware generation loop on a scripted model (control flow),
a tiny Llama trained to write the tool markup, and a Quiet-STaR model around a trained tiny Cognate."""
from __future__ import annotations

import random
import re
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from forgelib.tools import calc
from forgelib.data.base import TOOL_CLOSE, TOOL_OPEN, TOOL_RESULT, Sample
from forgelib.data.tasks import build_mix, check, format_sample, generate
from forgelib.data.tokenizer import EOS, encode_samples, train_tokenizer
from forgelib.tools import (MAX_DEPTH, MAX_LENGTH, ToolTrace, calculator, extract_tool_call, find_tool_calls,
                            generate_with_tools, tool_correctness, tool_stats)


# ------------------------------------------------------------------------------------------------ calculator
@pytest.mark.parametrize("expr, expected", [
    ("821*92", "75532"), ("1234*567+89*10", str(1234 * 567 + 89 * 10)),
    ("4321*765-1234*56", str(4321 * 765 - 1234 * 56)), ("2**3**2", "512"), ("(2**3)**2", "64"), ("-2**2", "-4"),
    ("(-2)**2", "4"), ("2**-1", "0.5"), ("2**-2**2", "0.0625"),
    ("2**-1*3", "1.5"), ("-2*3", "-6"), ("1-2-3", "-4"), ("2*3+4*5", "26"), ("2+3*4", "14"), ("(2+3)*4", "20"),
    ("100/10/5", "2"), ("2*3**2", "18"), ("7//2", "3"), ("-7//2", "-4"), ("7%-3", "-2"), ("-7%3", "2"), ("7.5//2", "3"),
    ("5.5%2", "1.5"), ("0.1+0.2", "0.3"), ("1/3", "0.3333333333"), ("2/3", "0.6666666667"), ("-1/3", "-0.3333333333"),
    ("6/3", "2"), ("1/8", "0.125"), ("2.50*2", "5"), (".5+5.", "5.5"), ("--1", "1"), ("+-+1", "-1"), ("-(-(-1))", "-1"),
    ("0**0", "1"), ("2**0.5", "1.414213562"), ("4**0.5", "2"), ("0.5**10", "0.0009765625"), ("1/7*7", "1"),
    (" 12 *\t3 ", "36"), ("((((((1+2))))))", "3"), ("2**64", str(2 ** 64)), ("10**64", str(10 ** 64)),
    ("12345678901234567890/7", "1763668414000000000"),  # not an integer: 10 significant digits
])
def test_calculator_hand_picked(expr, expected):
    assert calculator(expr) == expected


def _render(tree) -> str:
    """An expression string for a tree; a child binding strictly tighter than its parent sometimes loses its
    (then redundant) parentheses, so that precedence is exercised without any associativity guess."""
    prec = {"+": 1, "-": 1, "*": 2, "/": 2, "//": 2, "%": 2, "**": 3}
    kind = tree[0]
    if kind == "num":
        return tree[2]
    if kind == "neg":
        inner = _render(tree[1])
        return f"(-({inner}))" if tree[1][0] == "bin" else f"(-{inner})"
    op, left, right = tree[1], tree[2], tree[3]
    parts = []
    for child in (left, right):
        text = _render(child)
        loose = child[0] == "bin" and prec[child[1]] > prec[op] and op != "**" and tree[4]
        parts.append(text if child[0] != "bin" or loose else f"({text})")
    return f"{parts[0]}{tree[5]}{op}{tree[5]}{parts[1]}"


def _random_tree(rng: random.Random, depth: int):
    """A random expression tree: (kind, ...) tuples; leaves carry their value and their text."""
    if depth == 0 or rng.random() < 0.3:
        if rng.random() < 0.25:  # a decimal
            digits = rng.randint(1, 2)
            units = rng.randint(0, 999)
            return ("num", Fraction(units, 10 ** digits), f"{units // 10 ** digits}.{units % 10 ** digits:0{digits}d}")
        value = rng.randint(0, 999)
        return ("num", Fraction(value), str(value))
    if rng.random() < 0.1:
        return ("neg", _random_tree(rng, depth - 1))
    op = rng.choice(["+", "-", "*", "/", "//", "%", "**"])
    left = _random_tree(rng, depth - 1)
    if op == "**":  # small integer exponents keep values small (the bounds have their own tests)
        e = rng.randint(-2, 3)
        right = ("num", Fraction(e), str(e)) if e >= 0 else ("neg", ("num", Fraction(-e), str(-e)))
    else:
        right = _random_tree(rng, depth - 1)
    return ("bin", op, left, right, rng.random() < 0.5, rng.choice(["", " "]))


def _exact(tree) -> Fraction:
    """The tree's value with Fraction arithmetic (Python's floor semantics for // and %)."""
    kind = tree[0]
    if kind == "num":
        return tree[1]
    if kind == "neg":
        return -_exact(tree[1])
    op, a, b = tree[1], _exact(tree[2]), _exact(tree[3])
    if (op in ("/", "//", "%") and b == 0) or (op == "**" and a == 0 and b < 0):
        raise ZeroDivisionError
    return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b,
            "//": lambda: Fraction(a // b), "%": lambda: a % b, "**": lambda: a ** int(b)}[op]()


def _agrees(text: str, exact: Fraction) -> bool:
    """An integer exactly as such; otherwise a plain decimal of at most 10 significant digits, no trailing
    zeros, within half a unit of its 10th significant digit of the exact value."""
    if exact.denominator == 1:
        return text == str(exact.numerator)
    if not re.fullmatch(r"-?\d+(\.\d*[1-9])?", text):
        return False
    significant = text.lstrip("-").replace(".", "").lstrip("0").rstrip("0")
    if len(significant) > 10:
        return False
    return abs(Fraction(text) - exact) <= abs(exact) * Fraction(1, 2 * 10 ** 9)


def test_calculator_on_random_expressions_against_fractions():
    rng = random.Random(0)
    checked = errors = 0
    while checked < 400:
        tree = _random_tree(rng, 4)
        expr = _render(tree)
        if len(expr) > MAX_LENGTH:
            continue
        got = calculator(expr)
        try:
            exact = _exact(tree)
        except ZeroDivisionError:
            assert got.startswith("error: ") and "zero" in got, (expr, got)
            errors += 1
            continue
        if max(abs(exact.numerator), exact.denominator) > 10 ** 900:
            continue
        assert _agrees(got, exact), (expr, got, exact)
        checked += 1
    assert errors > 0  # zero divisors were drawn too


# --------------------------------------------------------------------------------- refusals and their speed
HOSTILE = {
    "names": "abs",
    "call": "abs(1)",
    "attribute": "().__class__",
    "attribute on a number": "(1).real",
    "import": "__import__('os')",
    "import system": "__import__('os').system('echo hi')",
    "lambda": "(lambda: 1)()",
    "string": "'1'+'2'",
    "comma": "1,2",
    "brackets": "[1][0]",
    "braces": "{1}",
    "unicode digit": "\u0663+1",
    "unicode digit after a digit": "1\u0663",
    "fullwidth digit": "\uff11+1",
    "tower": "9**9**9",
    "huge power": "10**10000",
    "estimated power": "(10**60)**60",
    "power of a power": "(9**9)**(9**9)",
    "products": "*".join(["10**64"] * 16),
    "deep parens": "(" * 100000,
    "nested within length": "(" * 40 + "1" + ")" * 40,
    "unary chain": "-" * 150 + "1",
    "long digits": "9" * 100000,
    "long expression": "1+" * 150 + "1",
    "float literal": "1e308*1e308",
    "hex": "0x10",
    "underscore": "1_000",
    "two dots": "1.2.3",
    "lone dot": ".",
    "empty": "",
    "blank": "   ",
    "bitwise": "1<<100000",
    "xor": "2^3",
    "comparison": "1<2",
    "semicolon": "1;2",
    "null byte": "1\x00",
    "division by zero": "1/0",
    "floor by zero": "1//(2-2)",
    "modulo by zero": "5%0",
    "zero to a negative power": "0**-1",
    "negative to a fraction": "(-8)**0.5",
    "dangling operator": "1+",
    "two numbers": "1 2",
    "implicit product": "2(3)",
    "unclosed": "(1+2",
    "unopened": "1+2)",
    "empty parens": "()",
    "double star star": "2***3",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_inputs_are_refused_quickly(name):
    expr = HOSTILE[name]
    start = time.perf_counter()
    got = calculator(expr)
    elapsed = time.perf_counter() - start
    assert got.startswith("error: ") and len(got) > len("error: ") + 5, got
    assert elapsed < 0.1, (name, elapsed)


def test_refusals_name_the_problem():
    assert "names" in calculator("abs(1)") and "'abs'" in calculator("abs(1)")
    assert "attribute" in calculator("().__class__")
    assert "exponent" in calculator("9**9**9")
    assert "too large" in calculator("(10**60)**60")
    assert "too long" in calculator("(" * 100000)
    assert f"deeper than {MAX_DEPTH}" in calculator("(" * 40 + "1" + ")" * 40)
    assert "malformed number" in calculator("1e308")
    assert calculator("(" * (MAX_DEPTH - 2) + "1" + ")" * (MAX_DEPTH - 2)) == "1"  # the depth bound's edge
    assert calculator("1/0") == "error: division by zero"
    assert calculator("") == "error: empty expression"
    assert "unsupported character" in calculator("\u0663")


def test_time_limit_is_checked_inside_the_loop(monkeypatch):
    monkeypatch.setattr(calc, "TIME_LIMIT_S", -1.0)  # every deadline has already passed
    assert calculator("1+2").startswith("error: time limit")


def test_never_raises_on_random_garbage_and_refuses_non_strings():
    rng = random.Random(1)
    alphabet = "0123456789.+-*/%() eE_x,[]'\"\\ab\u0663\x00<>|^~!"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert isinstance(calculator(text), str)
    with pytest.raises(TypeError):
        calculator(12)  # type: ignore[arg-type]


@pytest.mark.parametrize("module", ["__init__", "calc", "calls", "generate"])
def test_source_never_evaluates_code(module):
    source = (Path(calc.__file__).parent / f"{module}.py").read_text()
    assert not re.search(r"\b(eval|exec|compile)\s*\(", source)
    assert not re.search(r"^\s*(import ast|from ast )|__import__|getattr\(", source, re.M)


def test_the_calculator_is_pure_python():
    """forgelib.tools.calc imports the standard library only (no torch, no transformers, nothing of forgelib)."""
    import ast
    import sys

    tree = ast.parse(Path(calc.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))
    assert imported and imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


# ------------------------------------------------------------------------------------------- tool calls in text
def test_extract_tool_call():
    assert extract_tool_call("12*3=<|tool|>12*3<|/tool|>") == "12*3"
    assert extract_tool_call("<|tool|>12*3<|/tool|>  ") == "12*3"
    assert extract_tool_call("<|tool|>12*3<|/tool|><|result|>36") is None  # answered
    assert extract_tool_call("<|tool|>1+1<|/tool|><|result|>2;<|tool|>3*4<|/tool|>") == "3*4"  # the last one
    assert extract_tool_call("<|tool|>1+1<|/tool|><|result|>2;<|tool|>3*4") is None  # not closed yet
    assert extract_tool_call("12<|/tool|>") is None  # nothing opened it
    assert extract_tool_call("<|tool|>a<|/tool|><|result|>1 b<|/tool|>") is None  # not one complete call
    assert extract_tool_call("no call at all") is None
    assert extract_tool_call("<|tool|><|/tool|>") == ""
    assert find_tool_calls("<|tool|>1+1<|/tool|><|result|>2;<|tool|>3*4<|/tool|>#x<|tool|>5") == ["1+1", "3*4"]


def test_checker_reads_the_answer_after_the_tool_markup():
    sample = generate("tool", 1, 1, seed=0)[0]
    expr = sample.prompt.rstrip("=")
    good = f"{TOOL_OPEN}{expr}{TOOL_CLOSE}{TOOL_RESULT}{calculator(expr)}#{sample.answer}"
    assert calculator(expr) == sample.answer and check(sample, good)
    assert check(Sample("821*92=", "75532", "tool", 1), "<|tool|>821*92<|/tool|><|result|>75532#75532")
    assert not check(sample, f"{TOOL_OPEN}{expr}{TOOL_CLOSE}{TOOL_RESULT}{sample.answer}")  # no answer mark


def test_calculator_answers_every_tool_family_problem():
    for level in (1, 5, 10):
        for s in generate("tool", level, 20, seed=3):
            assert calculator(s.prompt.rstrip("=")) == s.answer


# ------------------------------------------------------------------------------ generation: a scripted model
@pytest.fixture(scope="module")
def tok():
    texts = [format_sample(s, with_steps=True) for s in build_mix({"tool": 2, "arith": 1}, (1, 3), 120)]
    return train_tokenizer(texts, vocab_size=300)


class ScriptedModel(torch.nn.Module):
    """A deterministic `generate`-capable stand-in: for each prompt, a table {completion so far: what comes
    next}; it writes the longest matching entry's continuation token by token (eos when nothing matches), with
    HF semantics: stops a row at any eos id, pads after it, stops when every row is done."""

    def __init__(self, tok, scripts: dict[str, dict[str, str]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # only so that the model has a device
        self.tok, self.scripts = tok, scripts
        self.generate_calls: list[dict] = []

    def _next(self, context: list[int]) -> int:
        text = self.tok.decode([t for t in context if t != self.tok.bos_token_id])
        prompt = next(p for p in self.scripts if text.startswith(p))
        done = text[len(prompt):]
        for key in sorted(self.scripts[prompt], key=len, reverse=True):
            then = self.scripts[prompt][key]
            written = done[len(key):]
            if done.startswith(key) and then.startswith(written):
                ids = self.tok(then, add_special_tokens=False)["input_ids"]
                k = len(self.tok(written, add_special_tokens=False)["input_ids"]) if written else 0
                if k < len(ids):
                    return ids[k]
        return self.tok.eos_token_id

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kwargs):
        stops = set(eos_token_id) if isinstance(eos_token_id, list) else {eos_token_id}
        self.generate_calls.append({"rows": input_ids.shape[0], "max_new_tokens": max_new_tokens,
                                    "eos_token_id": eos_token_id, "training": self.training})
        rows = [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(input_ids.tolist(), attention_mask.tolist())]
        new = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(max_new_tokens):
            for i, row in enumerate(rows):
                token = pad_token_id if done[i] else self._next(row + new[i])
                new[i].append(token)
                done[i] = done[i] or token in stops
            if all(done):
                break
        return torch.cat([input_ids, torch.tensor(new, dtype=torch.long)], 1)


SCRIPTS = {
    # calls the tool once, then copies the result; without a tool it writes a wrong result itself
    "12*3=": {"": "<|tool|>12*3<|/tool|>", "<|tool|>12*3<|/tool|>": "<|result|>35#35<|eos|>",
              "<|tool|>12*3<|/tool|><|result|>36": "#36<|eos|>"},
    # calls forever: 1+1, then the previous result plus one
    "count=": {"": "<|tool|>1+1<|/tool|>", **{"<|tool|>1+1<|/tool|>" + "".join(
        f"<|result|>{k}<|tool|>{k}+1<|/tool|>" for k in range(2, n)) + f"<|result|>{n}": f"<|tool|>{n}+1<|/tool|>"
        for n in range(2, 9)}},
    # a close without an open, then a call the calculator refuses, then an answer
    "bad=": {"": "7<|/tool|>", "7<|/tool|><|result|>error: no <|tool|> opens this <|/tool|>": "<|tool|>x<|/tool|>",
             "7<|/tool|><|result|>error: no <|tool|> opens this <|/tool|><|tool|>x<|/tool|>"
             "<|result|>error: names are not allowed ('x' at position 0)": "#7<|eos|>"},
}


def test_scripted_model_call_result_and_continuation(tok):
    model = ScriptedModel(tok, SCRIPTS).train()
    [trace] = generate_with_tools(model, tok, ["12*3="], max_new_tokens=30)
    assert trace.text == "<|tool|>12*3<|/tool|><|result|>36#36"
    assert trace.calls == [{"expr": "12*3", "result": "36", "ok": True}]
    n_tokens = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert trace.stop == "eos" and trace.n_result_tokens == n_tokens("<|result|>36")
    assert trace.n_generated == n_tokens("<|tool|>12*3<|/tool|>#36") + 1  # eos counts against the budget
    assert check(Sample("12*3=", "36", "tool", 1), trace.text)
    close = tok.convert_tokens_to_ids(TOOL_CLOSE)
    assert [c["eos_token_id"] for c in model.generate_calls] == [[tok.eos_token_id, close]] * 2
    assert not any(c["training"] for c in model.generate_calls) and model.training  # eval inside, restored after
    # second round: the budget left, not the whole one
    assert model.generate_calls[1]["max_new_tokens"] == 30 - n_tokens("<|tool|>12*3<|/tool|>")


def test_scripted_model_without_the_tool_writes_its_own_wrong_result(tok):
    model = ScriptedModel(tok, SCRIPTS)
    [trace] = generate_with_tools(model, tok, ["12*3="], max_new_tokens=30, tool=None)
    assert trace.text == "<|tool|>12*3<|/tool|><|result|>35#35" and trace.stop == "eos"
    assert trace.calls == [{"expr": "12*3", "result": None, "ok": False}] and trace.n_result_tokens == 0
    assert [c["eos_token_id"] for c in model.generate_calls] == [[tok.eos_token_id]]
    samples = [Sample("12*3=", "36", "tool", 1)]
    correct, stats = tool_correctness(model, tok, samples, use_tool=False, max_new_tokens=30)
    assert correct == [False]
    assert stats == {"use_tool": False, "samples": 1, "accuracy": 0.0, "calls": 1, "calls_ok": 0,
                     "tool_success_rate": 0.0, "samples_with_call": 1}
    correct, stats = tool_correctness(model, tok, samples, use_tool=True, max_new_tokens=30)
    assert correct == [True] and stats["calls_ok"] == 1 and stats["tool_success_rate"] == 1.0


def test_scripted_model_max_calls_budget_and_failed_calls(tok):
    model = ScriptedModel(tok, SCRIPTS)
    traces = generate_with_tools(model, tok, ["count=", "12*3=", "bad="], max_new_tokens=200, max_calls=3,
                                 batch_size=2)
    count, right, bad = traces
    assert [c["expr"] for c in count.calls] == ["1+1", "2+1", "3+1"] and count.stop == "max_calls"
    assert count.text.endswith("<|result|>4<|tool|>4+1<|/tool|>")  # the fourth call is left unanswered
    assert right.text == "<|tool|>12*3<|/tool|><|result|>36#36"
    assert [c["ok"] for c in bad.calls] == [False, False] and bad.calls[0]["expr"] is None
    assert bad.calls[1] == {"expr": "x", "result": "error: names are not allowed ('x' at position 0)", "ok": False}
    assert bad.text.endswith("#7") and bad.stop == "eos"
    assert tool_stats(traces) == {"calls": 6, "calls_ok": 4, "tool_success_rate": 4 / 6, "samples_with_call": 3}
    assert max(c["rows"] for c in model.generate_calls) == 2  # batch_size respected
    # the model's budget counts its own tokens only, results excluded
    for budget in (0, 1, 5, 12):
        [trace] = generate_with_tools(ScriptedModel(tok, SCRIPTS), tok, ["count="], max_new_tokens=budget)
        assert trace.n_generated <= budget and trace.stop in ("length", "max_calls")
        assert trace.n_result_tokens == sum(
            len(tok(TOOL_RESULT + c["result"], add_special_tokens=False)["input_ids"]) for c in trace.calls)
    assert generate_with_tools(ScriptedModel(tok, SCRIPTS), tok, ["count="], max_new_tokens=0)[0] == \
        ToolTrace("count=", "", [], 0, 0, "length")
    [none] = generate_with_tools(ScriptedModel(tok, SCRIPTS), tok, ["count="], max_calls=0)
    assert none.calls == [] and none.stop == "max_calls" and none.text == "<|tool|>1+1<|/tool|>"


def test_bad_arguments_fail_clearly(tok):
    model = ScriptedModel(tok, SCRIPTS)
    for kwargs in ({"max_new_tokens": -1}, {"max_calls": -1}, {"batch_size": 0}, {"max_calls": 1.5}):
        with pytest.raises(ValueError):
            generate_with_tools(model, tok, ["12*3="], **kwargs)
    with pytest.raises(ValueError, match="no samples"):
        tool_correctness(model, tok, [], use_tool=True)


# ------------------------------------------------------------------------------------ generation: real models
def _tiny(kind: str, tok, seed: int = 0):
    torch.manual_seed(seed)
    sizes = dict(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                 pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**sizes, tie_word_embeddings=False))
    from forgelib.models import CognateConfig, CognateForCausalLM

    return CognateForCausalLM(CognateConfig(**sizes, tie_word_embeddings=True))


def _train_on_tool_solutions(model, tok, samples, steps: int):
    """Overfit `model` on the samples' worked tool solutions (`<|tool|>expr<|/tool|><|result|>v#v<|eos|>`); the
    learning rate decays to zero, which made 160 steps learn them on every seed tried (0, 1, 2)."""
    batch = encode_samples(tok, samples, 64, with_steps=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
    return model.eval()


@pytest.fixture(scope="module")
def tool_samples():
    return generate("tool", 1, 4, seed=0)


def _assert_learned_traces(traces, samples):
    for trace, s in zip(traces, samples):
        expr = s.prompt.rstrip("=")
        assert trace.calls == [{"expr": expr, "result": s.answer, "ok": True}]
        assert trace.text == f"{TOOL_OPEN}{expr}{TOOL_CLOSE}{TOOL_RESULT}{s.answer}#{s.answer}" and trace.stop == "eos"
        assert check(s, trace.text)


def test_tiny_llama_trained_on_tool_solutions(tok, tool_samples):
    model = _train_on_tool_solutions(_tiny("llama", tok), tok, tool_samples, steps=160)
    traces = generate_with_tools(model, tok, tool_samples, max_new_tokens=40, batch_size=3)
    _assert_learned_traces(traces, tool_samples)
    assert traces == generate_with_tools(model, tok, tool_samples, max_new_tokens=40, batch_size=1)  # padding-free
    correct, stats = tool_correctness(model, tok, tool_samples, use_tool=True)
    assert correct == [True] * 4 and stats["tool_success_rate"] == 1.0 and stats["samples_with_call"] == 4
    plain, stats = tool_correctness(model, tok, tool_samples, use_tool=False)  # the result is never a label: no answer
    assert plain == [False] * 4 and stats["calls"] == 4 and stats["calls_ok"] == 0
    # budgets hold on a real model: cut inside the call, and exactly at its <|/tool|> (8 tokens: the call on the
    # last token is not run); then no calls allowed
    for budget in (1, 4, 8):
        for trace, s in zip(generate_with_tools(model, tok, tool_samples, max_new_tokens=budget), tool_samples):
            assert trace.n_generated == budget and trace.stop == "length" and trace.calls == []
            assert not check(s, trace.text) and trace.text.endswith(TOOL_CLOSE) == (budget == 8)
    for trace in generate_with_tools(model, tok, tool_samples, max_new_tokens=40, max_calls=0):
        assert trace.calls == [] and trace.stop == "max_calls" and trace.text.endswith(TOOL_CLOSE)


def test_quietstar_around_a_trained_cognate_runs_the_tool(tok, tool_samples):
    from forgelib.quietstar import QuietStarConfig, QuietStarModel

    base = _train_on_tool_solutions(_tiny("cognate", tok), tok, tool_samples[:2], steps=160)
    qs = QuietStarModel(base, tok, QuietStarConfig(n_thought=2)).eval()
    traces = generate_with_tools(qs, tok, tool_samples[:2], max_new_tokens=40, batch_size=2)
    _assert_learned_traces(traces, tool_samples[:2])
    # the untrained mixing head gives exactly the base model's logits: the same traces via HF generate
    assert traces == generate_with_tools(base, tok, tool_samples[:2], max_new_tokens=40, batch_size=2)
    # QuietStarModel.generate: a list of eos ids stops a row at any of them, one id behaves as before (given the
    # calculator's result, which the model was never trained to write, it goes on to the answer and eos)
    ids = torch.tensor([[tok.bos_token_id] + tok(tool_samples[0].prompt, add_special_tokens=False)["input_ids"]])
    close = tok.convert_tokens_to_ids(TOOL_CLOSE)
    both = qs.generate(ids, torch.ones_like(ids), max_new_tokens=40, eos_token_id=[tok.eos_token_id, close],
                       pad_token_id=tok.pad_token_id)
    assert both[0, -1].item() == close
    called = torch.cat([both, torch.tensor([tok(TOOL_RESULT + "75532", add_special_tokens=False)["input_ids"]])], 1)
    one = qs.generate(called, torch.ones_like(called), max_new_tokens=40, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    assert one[0, -1].item() == tok.eos_token_id and one[0, :called.shape[1]].tolist() == called[0].tolist()
    assert tok.decode(one[0, ids.shape[1]:], skip_special_tokens=False).endswith("#75532" + EOS)
