"""Phase 3's gate, parameters and the benchmark's compute accounting, on hand-made numbers and tiny models."""
import pytest
import torch

from forgelib.bench.quietstar import ARMS, TokenCounter, equal_compute_steps, interval, tokens_per_row
from forgelib.params import ParameterError
from forgelib.phases.quietstar import Params, gate_checks
from forgelib.thoughts import QuietStarConfig


def _row(acc, nll, correct):
    return {"accuracy": acc, "answer_nll": nll, "correct": correct}


def _gate(thoughts, no_thoughts, base, **kw):
    checks = gate_checks({"thoughts": thoughts, "no_thoughts": no_thoughts, "base": base}, Params(**kw))
    return {c.name: c for c in checks}


def test_gate_passes_when_thinking_helps_and_accuracy_holds():
    same = [1, 0, 1, 1]
    checks = _gate(_row(0.75, 0.9, same), _row(0.75, 1.0, same), _row(0.75, 1.3, same))
    assert all(c.passed for c in checks.values())
    assert checks["nll_no_thoughts_minus_nll_thoughts"].value == pytest.approx(0.1)


def test_gate_fails_when_thinking_raises_the_nll():
    same = [1, 0, 1, 1]
    checks = _gate(_row(0.75, 1.1, same), _row(0.75, 1.0, same), _row(0.75, 1.3, same))
    assert not checks["nll_no_thoughts_minus_nll_thoughts"].passed


def test_accuracy_bound_is_one_point_plus_gate_z_paired_ses():
    # 4 of 8 samples lost: diff -0.5, paired SE of [-1]*4 + [0]*4 = sqrt(var/n)
    base, thoughts = [1] * 8, [0] * 4 + [1] * 4
    diffs = [t - b for t, b in zip(thoughts, base)]
    mean = sum(diffs) / 8
    se = (sum((d - mean) ** 2 for d in diffs) / 7 / 8) ** 0.5
    checks = _gate(_row(0.5, 1.0, thoughts), _row(0.5, 1.0, thoughts), _row(1.0, 1.0, base), gate_z=1.645)
    assert checks["acc_thoughts_minus_acc_base"].bound == pytest.approx(-(0.01 + 1.645 * se), abs=1e-6)
    assert not checks["acc_thoughts_minus_acc_base"].passed
    strict = _gate(_row(0.99, 1.0, [1] * 99 + [0]), _row(0.99, 1.0, [1] * 99 + [0]), _row(1.0, 1.0, [1] * 100),
                   gate_z=0.0)
    assert strict["acc_thoughts_minus_acc_base"].passed  # exactly one point down is allowed, not more


def test_bad_phase3_parameters_name_the_key(tmp_path):
    from forgelib.params import load_section
    from forgelib.phases import get_spec

    spec = get_spec("quietstar")
    for text, word in (("quietstar:\n  thoughts: {thought_mode: dream}\n", "thought_mode"),
                       ("quietstar:\n  thoughts: {n_thougth: 3}\n", "n_thougth"),
                       ("quietstar:\n  mix: {arithmetic: 1}\n", "arithmetic")):
        path = tmp_path / "p.yaml"
        path.write_text(text)
        with pytest.raises((ParameterError, ValueError), match=word):
            load_section(path, "quietstar", spec.params_cls, None, {"quietstar", "run"})


def test_equal_compute_steps_follow_forward_tokens():
    params = Params(thoughts=QuietStarConfig(n_thought=4, n_true=2, n_passes=2))
    assert tokens_per_row("plain", params) == 1
    assert tokens_per_row("quietstar", params) == 2 * (1 + 4 + 1 + 2)
    assert tokens_per_row("pause", params) == tokens_per_row("random", params) == 8
    assert equal_compute_steps(params, 10) == {"plain": 160, "quietstar": 10, "pause": 20, "random": 20}
    assert set(ARMS) == {"plain", "quietstar", "pause", "random"}


def test_token_counter_measures_what_the_formula_says():
    """One Quiet-STaR loss evaluation runs exactly passes x (1 + n_thought + 1 + n_true) x B x T base tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgelib.data.tasks import build_mix, format_sample
    from forgelib.data.tokenizer import encode_samples, train_tokenizer
    from forgelib.thoughts import QuietStarModel, quietstar_loss

    samples = build_mix({"arith": 1}, (1, 1), 8, "train", 0)
    tok = train_tokenizer([format_sample(s, with_steps=True) for s in samples] * 5, vocab_size=280)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        pad_token_id=tok.pad_token_id))
    params = Params(thoughts=QuietStarConfig(n_thought=3, n_true=2, n_passes=2))
    qs = QuietStarModel(base, tok, params.thoughts).train()
    enc = encode_samples(tok, samples[:4], 64, answer_only_loss=True, with_steps=True)
    batch = {k: v[:, :int(enc["attention_mask"].sum(1).max())] for k, v in enc.items()}
    counter = TokenCounter(qs.base)
    quietstar_loss(qs, batch)
    counter.close()
    B, T = batch["input_ids"].shape
    assert counter.tokens == tokens_per_row("quietstar", params) * B * T


def test_interval_is_the_t_interval():
    out = interval([0.5, 0.6, 0.7])
    assert out["mean"] == pytest.approx(0.6)
    assert out["ci95"] == pytest.approx(4.303 * 0.1 / 3 ** 0.5, abs=1e-4)
    assert interval([0.4])["ci95"] == 0.0
