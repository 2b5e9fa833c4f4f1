"""Tests of the data layer: task suite, tokenizer, loaders."""
from __future__ import annotations

import ast
import json
import operator
import pkgutil
import re
import statistics

import pytest
import torch

from forgelib.data import families as families_pkg
from forgelib.data.tasks import (ANSWER_MARK, FAMILIES, SPLITS, Sample, TaskOptionError,
                                 TaskSpaceExhaustedError, UnknownFamilyError, build_mix, check,
                                 completion_text, format_sample, generate, get_family, split_of)

SPEC_FAMILIES = {"arith", "multistep", "modular", "sequence", "logic", "algebra", "recall", "tool"}


# ---------------------------------------------------------------------------------------------------------
# An independent reference: a tiny evaluator over Python's own parser (ast), never `eval`.

_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Mod: operator.mod}
_CMP = {ast.Lt: operator.lt, ast.Gt: operator.gt}


def _ast_eval(node):
    if isinstance(node, ast.Expression):
        return _ast_eval(node.body)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.BinOp):
        return _BIN[type(node.op)](_ast_eval(node.left), _ast_eval(node.right))
    if isinstance(node, ast.UnaryOp):
        value = _ast_eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else not value
    if isinstance(node, ast.BoolOp):
        values = [_ast_eval(v) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare):
        return _CMP[type(node.ops[0])](_ast_eval(node.left), _ast_eval(node.comparators[0]))
    raise AssertionError(f"unexpected syntax {ast.dump(node)}")


def py_value(text: str):
    return _ast_eval(ast.parse(text, mode="eval"))


def _check_steps_arithmetic(steps):
    """Every `lhs=rhs` step of a worked solution is true arithmetic."""
    for step in steps:
        lhs, rhs = step.rsplit("=", 1)
        if " mod " in lhs:
            value, modulus = lhs.split(" mod ")
            assert int(value) % int(modulus) == int(rhs), step
        elif lhs.endswith("x"):  # collecting terms: 13x-8x=5x
            assert py_value(lhs.replace("x", "")) == int(rhs.removesuffix("x")), step
        elif "/" in lhs:  # an exact division
            num, den = lhs.split("/")
            assert py_value(num) == int(rhs) * py_value(den), step
        else:
            assert py_value(lhs) == int(rhs), step


# ---------------------------------------------------------------------------------------------------------
# Registry

def test_registry_matches_family_modules():
    modules = {m.name for m in pkgutil.iter_modules(families_pkg.__path__) if not m.name.startswith("_")}
    assert modules == set(FAMILIES)
    assert SPEC_FAMILIES <= set(FAMILIES)


def test_unknown_family_lists_valid_names():
    with pytest.raises(UnknownFamilyError) as info:
        get_family("arithmetic")
    assert isinstance(info.value, KeyError)
    assert "arith" in str(info.value) and "recall" in str(info.value)
    with pytest.raises(KeyError, match="valid families"):
        generate("nope", 1, 3)


@pytest.mark.parametrize("bad", [0, 11, 2.5, True])
def test_bad_level_rejected(bad):
    with pytest.raises(TaskOptionError, match="level"):
        generate("arith", bad, 3)


def test_bad_split_and_option_rejected():
    with pytest.raises(ValueError, match="valid splits"):
        generate("arith", 1, 3, split="val")
    with pytest.raises(ValueError, match="valid options"):
        generate("arith", 1, 3, distance=10)
    with pytest.raises(ValueError, match="either distance or n_pairs"):
        generate("recall", 1, 3, distance=10, n_pairs=3)


# ---------------------------------------------------------------------------------------------------------
# Every family: generation, self-check, a wrong answer fails, splits

@pytest.mark.parametrize("level", [1, 5, 10])
@pytest.mark.parametrize("family", sorted(SPEC_FAMILIES))
def test_family_generates_and_checks(family, level):
    samples = generate(family, level, 25, split="test", seed=3)
    assert len(samples) == 25 and len({s.prompt for s in samples}) == 25
    for s in samples:
        assert (s.family, s.level) == (family, level) and s.prompt and s.answer
        assert split_of(s.prompt) == "test"
        assert ANSWER_MARK not in s.prompt + s.answer
        assert check(s, s.answer) and check(s, f"  {s.answer}\n")
        assert check(s, completion_text(s, with_steps=True))
        assert not check(s, s.answer + "0") and not check(s, "")
        assert not check(s, "X" + s.answer)


def test_arith_tool_modular_answers_match_python_parser():
    for level in (1, 4, 7, 10):
        for s in generate("arith", level, 30, seed=1):
            assert py_value(s.prompt.rstrip("=")) == int(s.answer), s.prompt
            _check_steps_arithmetic(s.steps)
        for s in generate("tool", level, 30, seed=1):
            expr = s.prompt.rstrip("=")
            assert py_value(expr) == int(s.answer)
            assert s.steps == [f"<|tool|>{expr}<|/tool|><|result|>{s.answer}"]
        for s in generate("modular", level, 30, seed=1):
            inner, p = re.fullmatch(r"\((.*)\) mod (\d+)=", s.prompt).groups()
            assert py_value(f"({inner}) % {p}") == int(s.answer)
            _check_steps_arithmetic(s.steps)


def _equation_holds(equation: str, x: int) -> bool:
    py = re.sub(r"(\d)(x|\()", r"\1*\2", equation).replace("x", f"({x})")
    left, right = py.split("=")
    return py_value(left) == py_value(right)


def test_algebra_answer_solves_the_equation_uniquely():
    for level in range(1, 11):
        for s in generate("algebra", level, 20, seed=2):
            equation = s.prompt.removesuffix(", x=")
            x = int(s.answer)
            assert _equation_holds(equation, x), s.prompt
            # linear with a non-zero coefficient: neighbours fail, so the solution is unique
            assert not _equation_holds(equation, x + 1) and not _equation_holds(equation, x - 1)
            _check_steps_arithmetic(s.steps)


def test_multistep_steps_chain_to_the_answer():
    for level in range(1, 11):
        for s in generate("multistep", level, 20, seed=4):
            assert 1 <= len(s.steps) <= 6 and len(s.steps) == s.meta["n_steps"]
            _check_steps_arithmetic(s.steps)
            assert s.steps[-1].rsplit("=", 1)[1] == s.answer
            for before, after in zip(s.steps, s.steps[1:]):  # each step starts from the previous result
                assert re.match(r"\d+", after).group() == before.rsplit("=", 1)[1]
            assert s.prompt.endswith("?")


def test_sequence_and_logic_answers_by_independent_evaluation():
    for s in generate("sequence", 6, 60, seed=5):
        op, rest = s.prompt.rstrip("=").split(" ", 1)
        if op == "count":
            target, listed = rest.split(" in ")
            assert int(s.answer) == [int(v) for v in listed.split(",")].count(int(target))
            continue
        values = [int(v) for v in rest.split(",")]
        expected = {"max": [max(values)], "min": [min(values)], "sort": sorted(values), "rev": values[::-1]}
        assert s.answer == ",".join(map(str, expected[op]))
    for s in generate("logic", 7, 60, seed=5):
        py = s.prompt.rstrip("=").replace("&", " and ").replace("|", " or ").replace("~", " not ")
        py = py.replace("T", "True").replace("F", "False").strip()
        assert ("T" if py_value(py) else "F") == s.answer, s.prompt


def test_logic_worked_steps_apply_one_operator_at_a_time():
    seen_compare = 0
    for level in (1, 3, 5, 8):
        for s in generate("logic", level, 40, seed=9):
            if s.meta["kind"] == "compare" and level <= 4:
                assert s.steps is None
                continue
            assert s.steps and s.steps[-1].rsplit("=", 1)[1] == s.answer
            for step in s.steps:
                expr, value = step.rsplit("=", 1)
                if s.meta["kind"] == "compare" and "+" in expr:
                    assert int(value) == py_value(expr)  # the sum first
                    continue
                py = expr.replace("&", " and ").replace("|", " or ").replace("~", " not ")
                py = py.replace("T", "True").replace("F", "False").strip()
                assert ("T" if py_value(py) else "F") == value, (s.prompt, step)
            seen_compare += s.meta["kind"] == "compare"
    assert seen_compare > 0


def test_recall_answer_is_the_queried_value():
    for s in generate("recall", 4, 30, seed=6):
        listed, query = s.prompt.split(" ?")
        pairs = dict(pair.split(":") for pair in listed.split(","))
        assert len(pairs) == s.meta["n_pairs"] == 8
        assert pairs[query.rstrip("=")] == s.answer


@pytest.mark.parametrize("distance", [50, 400, 3000])
def test_recall_distance_honoured(distance):
    for s in generate("recall", 3, 5, split="test", seed=7, distance=distance):
        listed, query = s.prompt.split(" ?")
        key = query.rstrip("=")
        end_of_pair = s.prompt.index(f"{key}:{s.answer}") + len(f"{key}:{s.answer}")
        gap = s.prompt.index("?") - end_of_pair
        assert gap >= distance and gap == s.meta["distance"]
        assert gap < distance + 12  # filled just far enough, not arbitrarily far
        assert dict(p.split(":") for p in listed.split(","))[key] == s.answer


def test_levels_make_problems_harder():
    def mean(values):
        return statistics.mean(values)

    low = {f: generate(f, 1, 40, seed=8) for f in SPEC_FAMILIES}
    high = {f: generate(f, 10, 40, seed=8) for f in SPEC_FAMILIES}
    for f in SPEC_FAMILIES:  # longer prompts at level 10 for every family
        assert mean(len(s.prompt) for s in high[f]) > mean(len(s.prompt) for s in low[f]), f

    def numbers(s):
        return [int(v) for v in re.findall(r"\d+", s.prompt)]
    for f in ("arith", "tool", "sequence", "algebra"):  # larger numbers
        assert mean(max(numbers(s)) for s in high[f]) > 5 * mean(max(numbers(s)) for s in low[f]), f
    assert mean(len(numbers(s)) for s in high["arith"]) > mean(len(numbers(s)) for s in low["arith"])
    assert mean(len(s.steps) for s in high["multistep"]) > mean(len(s.steps) for s in low["multistep"])
    assert mean(s.meta["n_pairs"] for s in high["recall"]) == 20 > mean(s.meta["n_pairs"] for s in low["recall"])
    assert mean(s.meta["modulus"] for s in high["modular"]) > mean(s.meta["modulus"] for s in low["modular"])

    def leaves(samples):
        return [len(re.findall("[TF]", s.prompt)) for s in samples if s.meta["kind"] == "boolean"]
    assert max(leaves(low["logic"])) == 2 and mean(leaves(high["logic"])) == 6


# ---------------------------------------------------------------------------------------------------------
# Determinism, splits, mixes

def test_generation_is_deterministic():
    a = generate("multistep", 4, 20, "fitness", seed=11)
    assert a == generate("multistep", 4, 20, "fitness", seed=11)
    assert [s.prompt for s in a] != [s.prompt for s in generate("multistep", 4, 20, "fitness", seed=12)]
    assert build_mix({"arith": 1, "logic": 2}, (1, 3), 30, "test", 5) == \
        build_mix({"arith": 1, "logic": 2}, (1, 3), 30, "test", 5)


def test_splits_are_disjoint():
    assert abs(sum(SPLITS.values()) - 1.0) < 1e-9
    for family in sorted(SPEC_FAMILIES):
        prompts = {split: {s.prompt for s in generate(family, 2, 60, split, seed=0)} for split in SPLITS}
        assert not prompts["train"] & prompts["fitness"]
        assert not prompts["train"] & prompts["test"]
        assert not prompts["fitness"] & prompts["test"]
        assert all(split_of(p) == split for split, ps in prompts.items() for p in ps)


def test_exhausted_space_raises_clear_error():
    # arith level 1 has 100*100 prompts, about a tenth of them in the test split
    with pytest.raises(TaskSpaceExhaustedError, match="only .* distinct 'test' prompts"):
        generate("arith", 1, 1500, split="test", seed=0)


def test_build_mix_is_proportional_over_levels():
    mix = build_mix({"arith": 3, "logic": 1}, (2, 3), 40, "train", seed=1)
    counts = {(f, lv): sum(s.family == f and s.level == lv for s in mix) for f in ("arith", "logic")
              for lv in (2, 3)}
    assert counts == {("arith", 2): 15, ("arith", 3): 15, ("logic", 2): 5, ("logic", 3): 5}
    listed = build_mix({"recall": 1, "tool": 1, "algebra": 1}, [4, 9], 10, "test", seed=1)
    assert len(listed) == 10 and {s.level for s in listed} == {4, 9}
    assert sorted(s.family for s in listed).count("recall") in (3, 4)
    far = build_mix({"recall": 1, "arith": 1}, 2, 6, family_options={"recall": {"distance": 200}})
    assert all(s.meta["distance"] >= 200 for s in far if s.family == "recall")
    assert generate("recall", 2, 4, seed=9, distance=None) == generate("recall", 2, 4, seed=9)
    with pytest.raises(ValueError, match="not in the mix"):
        build_mix({"arith": 1}, 1, 5, family_options={"recall": {"distance": 5}})
    with pytest.raises(KeyError, match="valid families"):
        build_mix({"arithm": 1}, 1, 5)
    with pytest.raises(ValueError, match=">= 0"):
        build_mix({"arith": -1}, 1, 5)


def test_format_sample():
    s = Sample(prompt="3+4*2=", answer="11", family="arith", level=4, steps=["4*2=8", "3+8=11"])
    assert format_sample(s) == "3+4*2=11"
    assert format_sample(s, with_steps=True) == "3+4*2=4*2=8;3+8=11#11"
    assert format_sample(s, with_answer=False) == "3+4*2="
    assert format_sample(s, with_answer=False, with_steps=True) == "3+4*2=4*2=8;3+8=11#"
    assert check(s, "4*2=8;3+8=11#11") and not check(s, "4*2=8;3+8=11#12")


# ---------------------------------------------------------------------------------------------------------
# Tokenizer

@pytest.fixture(scope="module")
def task_texts():
    return [format_sample(s, with_steps=True) for s in build_mix({f: 1 for f in SPEC_FAMILIES}, (1, 4), 200)]


@pytest.fixture(scope="module")
def trained_tokenizer(task_texts, tmp_path_factory):
    from forgelib.data.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    return train_tokenizer(task_texts, vocab_size=320, save_dir=folder), folder


def test_tokenizer_round_trip_through_autotokenizer(trained_tokenizer, task_texts):
    from transformers import AutoTokenizer

    from forgelib.data.tokenizer import SPECIAL_TOKENS, load_tokenizer

    _, folder = trained_tokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    for t in SPECIAL_TOKENS:
        assert tok.encode(t, add_special_tokens=False) == [SPECIAL_TOKENS.index(t)]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    for text in task_texts[:50] + ["héllo wörld ✓ <|startofthought|>x<|endofthought|> 12345"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    digits = tok.encode("9081726354", add_special_tokens=False)
    assert [tok.decode([i]) for i in digits] == list("9081726354")
    assert load_tokenizer(folder).get_vocab() == tok.get_vocab()


def test_missing_special_tokens_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from forgelib.data.tokenizer import (MissingSpecialTokensError, ensure_special_tokens, load_tokenizer,
                                         missing_special_tokens, train_tokenizer)

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.train_from_iterator(["a b c"], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>", "<|eos|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|bos|>", eos_token="<|eos|>").save_pretrained(tmp_path)
    with pytest.raises(MissingSpecialTokensError) as info:
        load_tokenizer(tmp_path)
    assert isinstance(info.value, ValueError)
    missing = str(info.value).split("lacks special tokens ")[1].split("]")[0]
    assert "'<|tool|>'" in missing and "'<|pad|>'" in missing and "'<|bos|>'" not in missing
    foreign = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|bos|>", eos_token="<|eos|>")
    assert ensure_special_tokens(foreign) == 6 and missing_special_tokens(foreign) == []
    with pytest.raises(ValueError, match="vocab_size must be >= 264"):
        train_tokenizer(["x"], vocab_size=100)


def test_encode_samples_masks_prompt_and_padding(trained_tokenizer):
    from forgelib.data.tokenizer import SequenceTooLongError, encode_samples

    tok, _ = trained_tokenizer
    samples = generate("arith", 2, 3, seed=0) + generate("tool", 1, 2, seed=0)
    enc = encode_samples(tok, samples, max_len=64, with_steps=True)
    ids, mask, labels = enc["input_ids"], enc["attention_mask"], enc["labels"]
    assert ids.shape == mask.shape == labels.shape and enc.n_dropped == 0
    for i, s in enumerate(samples):
        n_prompt = len(tok.encode(s.prompt, add_special_tokens=False)) + 1  # + bos
        length = int(mask[i].sum())
        assert ids[i, 0] == tok.bos_token_id and ids[i, length - 1] == tok.eos_token_id
        assert mask[i, :length].all() and not mask[i, length:].any()  # right padding
        assert (ids[i, length:] == tok.pad_token_id).all()
        assert (labels[i, :n_prompt] == -100).all() and (labels[i, length:] == -100).all()
        assert tok.decode(ids[i, n_prompt:length]) == completion_text(s, True) + "<|eos|>"
        assert tok.decode(ids[i, 1:n_prompt]) == s.prompt
        # the calculator's text (what generation appends itself) has no label, everything else its own id
        text = completion_text(s, True)
        results = re.findall(r"<\|result\|>[^;#]*", text)
        assert bool(results) == (s.family == "tool")
        own = labels[i, n_prompt:length] != -100
        assert (labels[i, n_prompt:length][own] == ids[i, n_prompt:length][own]).all()
        assert tok.decode(ids[i, n_prompt:length][~own]) == "".join(results)
        assert tok.decode(ids[i, n_prompt:length][own]) == re.sub(r"<\|result\|>[^;#]*", "", text) + "<|eos|>"
    full = encode_samples(tok, samples, max_len=64, answer_only_loss=False, with_steps=True)
    tools = torch.tensor([s.family == "tool" for s in samples])
    assert ((full["labels"] == -100) == (full["attention_mask"] == 0))[~tools].all()
    assert ((full["labels"] == -100).sum(1) > (full["attention_mask"] == 0).sum(1))[tools].all()
    with pytest.raises(SequenceTooLongError, match="max_len=8"):
        encode_samples(tok, samples, max_len=8)
    short = encode_samples(tok, samples, max_len=12, drop_long=True)
    assert short.n_dropped + len(short["input_ids"]) == len(samples) and short.n_dropped > 0


def test_recall_token_distance(trained_tokenizer):
    from forgelib.data.tokenizer import token_distance, train_tokenizer

    bpe, _ = trained_tokenizer
    chars = train_tokenizer(["ab:3,cd:7 ?ab="], vocab_size=264)  # no merges: one token per character
    for s in generate("recall", 2, 5, seed=1, distance=120):
        assert token_distance(chars, s) == s.meta["distance"]
        assert 0 < token_distance(bpe, s) <= token_distance(chars, s)
    with pytest.raises(ValueError, match="recall"):
        token_distance(bpe, generate("arith", 1, 1)[0])


def test_encode_texts_chunks_cover_the_stream(trained_tokenizer):
    from forgelib.data.tokenizer import encode_texts

    tok, _ = trained_tokenizer
    text = "Ana has 3 boxes of 4 pens. She gives away 5. How many pens?7"
    enc = encode_texts(tok, [text, "12+7=19"], max_len=8)
    stream = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    rows = [r[m.bool()].tolist() for r, m in zip(enc["input_ids"], enc["attention_mask"])]
    n_chunks = -(-len(stream) // 8)
    assert sum(rows[:n_chunks], []) == stream and all(len(r) <= 8 for r in rows)
    assert ((enc["labels"] == -100) == (enc["attention_mask"] == 0)).all()


def test_lm_batches_shuffle_deterministically(trained_tokenizer):
    from forgelib.data.tokenizer import encode_samples, lm_batches

    tok, _ = trained_tokenizer
    enc = encode_samples(tok, generate("recall", 1, 9, seed=0) + generate("recall", 6, 1, seed=0), 96)
    first = [b["input_ids"] for b in lm_batches(enc, 4, seed=3, trim=False)]
    again = [b["input_ids"] for b in lm_batches(enc, 4, seed=3, trim=False)]
    assert all((a == b).all() for a, b in zip(first, again)) and [len(b) for b in first] == [4, 4, 2]
    rows = sorted(tuple(r.tolist()) for b in first for r in b)
    assert rows == sorted(tuple(r.tolist()) for r in enc["input_ids"])  # each row once per epoch
    orders = [tuple(tuple(r.tolist()) for b in lm_batches(enc, 10, seed=seed, trim=False)
                    for r in b["input_ids"]) for seed in range(4)]
    assert len(set(orders)) > 1
    two = list(lm_batches(enc, 10, seed=3, epochs=2, trim=False))
    assert len(two) == 2 and not (two[0]["input_ids"] == two[1]["input_ids"]).all()
    trimmed = next(lm_batches(enc, 3, seed=0))
    assert trimmed["input_ids"].shape[1] == int(trimmed["attention_mask"].sum(1).max())
    assert len(list(lm_batches(enc, 4, seed=0, drop_last=True))) == 2


# ---------------------------------------------------------------------------------------------------------
# Loaders

def test_load_text_and_jsonl(tmp_path):
    from forgelib.data.loaders import load_jsonl, load_text

    path = tmp_path / "corpus.txt"
    path.write_text("one line\n\nsecond para\nstill second\n", encoding="utf-8")
    assert load_text(path) == ["one line", "second para", "still second"]
    assert load_text(path, by="paragraph") == ["one line", "second para\nstill second"]
    with pytest.raises(ValueError, match="paragraph"):
        load_text(path, by="word")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "a story", "id": 1}\n\n{"text": "another"}\n', encoding="utf-8")
    assert load_jsonl(jsonl) == ["a story", "another"]
    with pytest.raises(KeyError, match="no field 'body'.*'id', 'text'"):
        load_jsonl(jsonl, text_field="body")


def test_load_hf_dataset_from_local_jsonl(tmp_path):
    from forgelib.data.loaders import DatasetUnavailableError, load_hf_dataset, load_jsonl

    path = tmp_path / "gsm.jsonl"
    records = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    assert load_hf_dataset(str(path), text_field="question") == [f"q{i}" for i in range(5)]
    assert load_hf_dataset(str(path), text_field="answer") == load_jsonl(path, text_field="answer")
    with pytest.raises(KeyError, match="columns"):
        load_hf_dataset(str(path), text_field="text")
    with pytest.raises(DatasetUnavailableError, match="not available here"):
        load_hf_dataset("agent-forge-test/no-such-dataset-xyz")


# --- prompts of a chat model ---------------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")


def test_a_chat_tokenizers_prompts_are_its_users_message_and_the_answer_its_assistants_turn():
    """With a chat template every prompt is framed as the template frames a user's message, with the assistant's turn
    opened: the ids equal the whole rendering encoded at once; the answer follows as the assistant's, labels on it
    only; without a template the prompt stays <|bos|>prompt."""
    from forgelib.data.tokenizer import IGNORE_INDEX, encode_prompts, encode_samples, prompt_frame, train_tokenizer

    texts = [format_sample(s, with_answer=True, with_steps=True) for s in build_mix({"arith": 1.0}, (1, 2), 200,
                                                                                    "train", 0)]
    tok = train_tokenizer(texts + ["user assistant"] * 20, vocab_size=300)
    sample = build_mix({"arith": 1.0}, (1, 1), 1, "test", 3)[0]
    plain = encode_prompts(tok, [sample.prompt])[0]
    assert plain == [tok.bos_token_id] + tok(sample.prompt, add_special_tokens=False)["input_ids"]
    tok.chat_template = CHAT_TEMPLATE
    rendered = tok.apply_chat_template([{"role": "user", "content": sample.prompt}], tokenize=False,
                                       add_generation_prompt=True)
    framed = encode_prompts(tok, [sample.prompt])[0]
    assert framed == tok(rendered, add_special_tokens=False)["input_ids"]
    before, after = prompt_frame(tok)
    assert tok.decode(before) == "<|bos|>user\n" and tok.decode(after) == "<|eos|>\n<|bos|>assistant\n"
    enc = encode_samples(tok, [sample], max_len=128, with_steps=True)
    ids, labels = enc["input_ids"][0].tolist(), enc["labels"][0].tolist()
    assert ids[:len(framed)] == framed and set(labels[:len(framed)]) == {IGNORE_INDEX}
    assert tok.decode(ids[len(framed):], skip_special_tokens=True) == completion_text(sample, True)
    tok.chat_template = "{{ messages[0]['content'] }}{{ messages[0]['content'] }}"  # writes the prompt twice
    with pytest.raises(ValueError, match="exactly once"):
        encode_prompts(tok, [sample.prompt])
