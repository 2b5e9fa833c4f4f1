"""Tests of forgelib.evaluate on tiny real Llama models and a tokenizer trained on the task suite."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from forgelib.data.tasks import build_mix, completion_text, format_sample, generate
from forgelib.data.tokenizer import encode_samples, train_tokenizer
from forgelib.evaluate import (accuracy_by_family, answer_correctness, argmax_disagreement,
                               exact_match_accuracy, family_accuracy, generate_answers, kl_divergence,
                               mean_nll, perplexity)


@pytest.fixture(scope="module")
def tok():
    texts = [format_sample(s, with_steps=True) for s in build_mix({"arith": 1, "tool": 1, "logic": 1,
                                                                    "recall": 1}, (1, 3), 80)]
    return train_tokenizer(texts, vocab_size=300)


def tiny_llama(vocab_size: int, seed: int = 0):
    """A real 2-layer LlamaForCausalLM sized to the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def samples():
    return generate("arith", 3, 4, seed=1) + generate("recall", 2, 3, seed=1) + generate("tool", 1, 2, seed=1)


def _manual_nll(model, tok, samples, answer_only):
    """One unpadded sequence at a time: -sum log p(next token) from log_softmax, token-weighted mean."""
    total, count = 0.0, 0
    for s in samples:
        prompt = [tok.bos_token_id] + tok.encode(s.prompt, add_special_tokens=False)
        ids = prompt + tok.encode(completion_text(s), add_special_tokens=False) + [tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)  # (T, V)
        first = len(prompt) if answer_only else 1  # first scored target position
        for t in range(first, len(ids)):
            total -= logp[t - 1, ids[t]].item()
            count += 1
    return total / count


@pytest.mark.parametrize("answer_only", [False, True])
def test_perplexity_matches_manual_cross_entropy(tok, samples, answer_only):
    model = tiny_llama(len(tok))
    expected = _manual_nll(model, tok, samples, answer_only)
    for batch_size in (1, 4):  # padding and batch boundaries must not change the token-weighted mean
        nll = mean_nll(model, tok, samples, batch_size=batch_size, max_len=128, answer_only=answer_only)
        assert nll == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, tok, samples, batch_size=3, answer_only=answer_only) == \
        pytest.approx(math.exp(expected), rel=1e-5)
    assert model.training is False


def test_perplexity_of_texts_counts_every_chunk(tok):
    model = tiny_llama(len(tok))
    texts = ["Ana has 3 boxes of 4 pens. She gives away 5.", "12+7*3=33"]
    whole = mean_nll(model, tok, texts, max_len=128)
    rows = [[tok.bos_token_id] + tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
    total, count = 0.0, 0
    for ids in rows:
        logits = model(torch.tensor([ids])).logits[0]
        total += F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    assert whole == pytest.approx(total / count, rel=1e-5)
    chunked = mean_nll(model, tok, texts, max_len=8)  # chunks lose context, so a different but finite value
    assert math.isfinite(chunked) and chunked != pytest.approx(whole, rel=1e-6)
    with pytest.raises(ValueError, match="answer_only needs Sample"):
        mean_nll(model, tok, texts, answer_only=True)


def test_batched_generation_equals_one_by_one(tok, samples):
    model = tiny_llama(len(tok), seed=1)
    batched = generate_answers(model, tok, samples, max_new_tokens=8, batch_size=4)
    single = [generate_answers(model, tok, [s], max_new_tokens=8, batch_size=1)[0] for s in samples]
    assert batched == single
    assert len({len(s.prompt) for s in samples}) > 1  # the batches really were left-padded


@pytest.fixture(scope="module")
def memorizer(tok):
    """A tiny Llama overfitted on six samples, two of them with a worked tool call, so that its greedy
    outputs are known: the exact completions, ending with eos."""
    train = generate("arith", 1, 2, seed=0) + generate("logic", 1, 2, seed=0)
    tools = generate("tool", 1, 2, seed=0)
    plain, stepped = encode_samples(tok, train, 64), encode_samples(tok, tools, 64, with_steps=True)
    # every token labelled, the calculator's text too (which training data never labels), so that it writes the
    # whole trace itself when asked without a calculator
    stepped["labels"] = torch.where(stepped["attention_mask"].bool(), stepped["input_ids"], -100)
    model = tiny_llama(len(tok), seed=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        for batch in (plain, stepped):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    return model.eval(), train, tools


def test_generation_stops_at_eos_and_drops_special_tokens(tok, memorizer):
    model, train, tools = memorizer
    outputs = generate_answers(model, tok, train + tools, max_new_tokens=30, batch_size=6)
    assert outputs[:4] == [s.answer for s in train]  # stopped at eos: nothing after the answer
    for text, s in zip(outputs[4:], tools):
        # the trained completion is <|tool|>expr<|/tool|><|result|>value#value; specials are removed
        expr = s.prompt.rstrip("=")
        assert text == f"{expr}{s.answer}#{s.answer}" and "<|" not in text


def test_exact_match_accuracy_on_known_outputs(tok, memorizer):
    model, train, tools = memorizer
    right = train + tools
    wrong = [type(s)(s.prompt, s.answer + "1", s.family, s.level) for s in train[:3]]
    assert exact_match_accuracy(model, tok, right, with_steps=True) == 1.0
    assert exact_match_accuracy(model, tok, right + wrong, with_steps=True, batch_size=4) == \
        pytest.approx(6 / 9)
    assert accuracy_by_family(model, tok, right + wrong, with_steps=True) == \
        {"arith": 0.5, "logic": pytest.approx(2 / 3), "tool": 1.0}
    assert answer_correctness(model, tok, wrong, max_new_tokens=10) == [False, False, False]
    # a budget shorter than the tool completion cuts it before the answer: honestly wrong
    assert exact_match_accuracy(model, tok, tools, max_new_tokens=3) == 0.0


def test_family_accuracy_counts():
    samples = generate("arith", 1, 3) + generate("logic", 1, 1)
    assert family_accuracy(samples, [True, False, True, False]) == {"arith": pytest.approx(2 / 3), "logic": 0.0}


def test_kl_divergence_against_hand_formula_and_library():
    torch.manual_seed(0)
    p, q = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    pp, qq = torch.softmax(p.double(), -1), torch.softmax(q.double(), -1)
    per_position = (pp * (pp.log() - qq.log())).sum(-1)  # (2, 5): the definition of KL(P||Q)
    expected = per_position[mask.bool()].mean()
    assert kl_divergence(p, q, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl_divergence(p, q).item() == pytest.approx(per_position.mean().item(), rel=1e-5)
    library = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=p),
                                                torch.distributions.Categorical(logits=q))
    assert kl_divergence(p, q).item() == pytest.approx(library.mean().item(), rel=1e-5)
    assert kl_divergence(p, p, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_divergence(p, q).item() != pytest.approx(kl_divergence(q, p).item(), rel=1e-3)  # asymmetric
    q.requires_grad_(True)
    kl_divergence(p, q, mask).backward()
    assert q.grad is not None and q.grad[0, 2].abs().sum() == 0  # masked positions get no gradient
    with pytest.raises(ValueError, match="mask shape"):
        kl_divergence(p, q, mask[:, :3])
    with pytest.raises(ValueError, match="differ"):
        kl_divergence(p, q[:, :, :5])


def test_argmax_disagreement_matches_brute_force(tok, samples):
    a, b = tiny_llama(len(tok), seed=3), tiny_llama(len(tok), seed=4)
    encoded = encode_samples(tok, samples, 128)
    assert argmax_disagreement(a, a, encoded, batch_size=4) == 0.0
    differ, total = 0, 0
    for s in samples:  # unpadded, one sequence at a time
        ids = torch.tensor([[tok.bos_token_id] + tok.encode(s.prompt, add_special_tokens=False)
                            + tok.encode(s.answer, add_special_tokens=False) + [tok.eos_token_id]])
        with torch.no_grad():
            pa, pb = a(ids).logits.argmax(-1), b(ids).logits.argmax(-1)
        differ += int((pa != pb).sum())
        total += ids.numel()
    measured = argmax_disagreement(a, b, encoded, batch_size=4)
    assert measured == pytest.approx(differ / total) and 0 < measured <= 1
