"""Quiet-STaR (forgelib.quietstar) against independent references: a hand-built mask, a loop that writes each
thought after its own prefix with plain causal forwards, the base model itself, and the REINFORCE gradient."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from forgelib.data.tokenizer import END_THOUGHT, START_THOUGHT
from forgelib.modelio import load_quietstar
from forgelib.quietstar import (QuietStarConfig, QuietStarModel, future_targets, quietstar_loss, reinforce_term,
                                thought_mask)


@pytest.fixture(scope="module")
def tok():
    from forgelib.data.tasks import build_mix, format_sample, suite_families
    from forgelib.data.tokenizer import train_tokenizer

    mix = {f: 1 for f in suite_families()}
    texts = [format_sample(s, with_steps=True) for s in build_mix(mix, (1, 2), 300, "train", 0)]
    return train_tokenizer(texts, vocab_size=300)


def cognate(tok, **overrides):
    from forgelib.models import CognateConfig, CognateForCausalLM

    torch.manual_seed(0)
    fields = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    fields.update(overrides)
    return CognateForCausalLM(CognateConfig(**fields)).eval()


def llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(config).eval()


def decisive_act(model):
    """Make the untrained halting head decide early for some tokens (so ACT freezing really happens)."""
    with torch.no_grad():
        model.model.halt_head.weight.normal_(0, 2.0)
        model.model.halt_head.bias.fill_(0.0)
    return model


BASES = {"cognate": lambda tok: cognate(tok),
         "cognate_act_cycles": lambda tok: decisive_act(cognate(tok, n_cycles=3, n_latent=1, use_act=True)),
         "llama": llama}


def randomize_head(qs, seed=1):
    """A mixing head whose weights vary across [0, 1] (the trained state, not the zero start)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in qs.mixing_head.parameters():
            p.normal_(0, 0.3)
        qs.mixing_head[-1].bias.fill_(0.3)
        qs.thought_embeddings.normal_(0, 1.0)
    return qs


def ragged_batch(tok):
    texts = ["12+7=", "3*4+1=", "x+5=9;x="]
    rows = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def test_mask_entry_by_entry_against_a_hand_built_one():
    # 2 rows of 3 tokens, row 1 has its last token padded; thinking at every position; step 1 (two steps of keys)
    real = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    positions = torch.arange(3).expand(2, 3)
    visible = (torch.arange(3)[None, None, :] <= positions[:, :, None]) & real[:, None, :]
    got = thought_mask(visible, step=1)
    assert got.shape == (2, 1, 3, 3 + 2 * 3)
    row0 = [[1, 0, 0, 1, 0, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 0, 0, 1, 0],
            [1, 1, 1, 0, 0, 1, 0, 0, 1]]
    row1 = [[1, 0, 0, 1, 0, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 0, 0, 1, 0],
            [1, 1, 0, 0, 0, 1, 0, 0, 1]]  # the padded key 2 stays hidden
    assert got[:, 0].int().tolist() == [row0, row1]


def brute_force(qs, ids, mask, noise, n_true):
    """Each thought written after its own real prefix, one token at a time, full causal forwards, no cache."""
    base, embed = qs.base, qs.base.get_input_embeddings()
    n, out_tokens, out_thought, out_base = qs.qconfig.n_thought, {}, {}, {}
    for b in range(ids.shape[0]):
        length = int(mask[b].sum())
        full = base(input_ids=ids[b:b + 1, :length], output_hidden_states=True)
        for t in range(length):
            seq = [embed(ids[b, :t + 1])]
            seq.append(qs.thought_embeddings[0][None])
            toks = []
            for k in range(n):
                logits = base(inputs_embeds=torch.cat(seq)[None]).logits[0, -1]
                scaled = logits.masked_fill(~qs.thought_vocab, float("-inf")) / qs.qconfig.temperature
                token = int((scaled + noise[b, t, k]).argmax())
                toks.append(token)
                seq.append(embed(torch.tensor([token])))
            seq.append(qs.thought_embeddings[1][None])
            preds = []
            for i in range(n_true):
                out = base(inputs_embeds=torch.cat(seq)[None], output_hidden_states=True)
                preds.append((out.logits[0, -1], out.hidden_states[-1][0, -1]))
                if i < n_true - 1:
                    seq.append(embed(ids[b, min(t + 1 + i, ids.shape[1] - 1)][None]))
            out_tokens[b, t] = toks
            out_thought[b, t] = preds
            out_base[b, t] = [(full.logits[0, min(t + i, length - 1)], full.hidden_states[-1][0, min(t + i,
                                                                                                     length - 1)])
                              for i in range(n_true)]
    return out_tokens, out_thought, out_base


@pytest.mark.parametrize("kind", list(BASES))
def test_parallel_thoughts_equal_the_one_prefix_at_a_time_loop(tok, kind):
    qs = randomize_head(QuietStarModel(BASES[kind](tok), tok, QuietStarConfig(n_thought=3, n_true=2))).eval()
    ids, mask = ragged_batch(tok)
    torch.manual_seed(5)
    V = qs.thought_vocab.numel()
    noise = -torch.log(-torch.log(torch.rand(ids.shape[0], ids.shape[1], 3, V)))
    with torch.no_grad():
        th = qs.think(ids, mask, temperature=1.0, noise=noise, n_true=2)
        tokens, thought, base = brute_force(qs, ids, mask, noise, n_true=2)
    T, compared = ids.shape[1], 0
    for (b, t), toks in tokens.items():
        assert th.tokens[b, t].tolist() == toks, (b, t)
        for i in range(2):
            if t + 1 + i >= int(mask[b].sum()):
                continue  # no real future token to predict
            ref_logits, ref_hidden = thought[b, t][i]
            torch.testing.assert_close(th.thought_logits[b, t, i], ref_logits, atol=2e-5, rtol=1e-4)
            b_logits, b_hidden = base[b, t][i]
            w = qs.mixing_head(torch.cat([b_hidden, ref_hidden])).clamp(0, 1)
            torch.testing.assert_close(th.weights[b, t, i], w[0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(th.mixed_logits[b, t, i], b_logits + w * (ref_logits - b_logits),
                                       atol=5e-5, rtol=1e-4)
            compared += 1
    assert compared >= 20 and T == th.tokens.shape[1]
    assert th.weights.std() > 0  # the randomized head mixes by different amounts at different positions
    assert not (th.tokens == tok.convert_tokens_to_ids(START_THOUGHT)).any()  # special tokens are never thought


@pytest.mark.parametrize("kind", ["cognate", "cognate_act_cycles", "llama"])
def test_untrained_mixing_head_gives_exactly_the_base_model(tok, kind):
    base = BASES[kind](tok)
    qs = QuietStarModel(base, tok, QuietStarConfig(n_thought=2)).eval()
    qs.thought_embeddings.data.normal_(0, 1.0)  # whatever the thoughts are, w = 0 hides them
    ids, mask = ragged_batch(tok)
    with torch.no_grad():
        mixed = qs(ids, mask).logits
        ref = base(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (mixed - ref)[real].abs().max() <= 1e-6
    # and greedy generation from left-padded prompts equals the base model's own generate
    from forgelib.evaluate import left_pad

    rows = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in ["12+7=", "5*5="]]
    left, lmask = left_pad(rows, tok.pad_token_id)
    with torch.no_grad():
        ours = qs.generate(left, lmask, max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        theirs = base.generate(input_ids=left, attention_mask=lmask, max_new_tokens=6, do_sample=False,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert ours[:, :theirs.shape[1]].tolist() == theirs.tolist()


def test_generated_text_never_contains_thought_tokens(tok):
    from forgelib.quietstar import generate_with_thoughts

    qs = randomize_head(QuietStarModel(cognate(tok), tok, QuietStarConfig(n_thought=3))).eval()
    trace = generate_with_thoughts(qs, tok, "12+7=", max_new_tokens=8)
    special = {tok.convert_tokens_to_ids(START_THOUGHT), tok.convert_tokens_to_ids(END_THOUGHT)}
    assert not special & set(trace.token_ids)
    assert START_THOUGHT not in trace.text and END_THOUGHT not in trace.text
    assert len(trace.steps) == len(trace.token_ids) and all(len(s["thought_ids"]) == 3 for s in trace.steps)
    assert all(0.0 <= s["weight"] <= 1.0 for s in trace.steps)


def test_reinforce_raises_the_logprob_of_a_better_than_average_thought_only():
    # 1 row, 2 passes, 2 positions; pass 0 beats the mean at position 0, pass 1 at position 1
    reward = torch.tensor([[1.0, -2.0], [0.0, 1.0]])
    logprob = torch.zeros(2, 2, requires_grad=True)
    reinforce_term(reward, logprob, torch.ones(2, 2), n_passes=2).backward()
    # advantages: pos 0: +0.5 / -0.5 ; pos 1: -1.5 / +1.5 -> gradient -A+/N on the winners, 0 on the losers
    assert logprob.grad.tolist() == [[-0.5 / 4, 0.0], [0.0, -1.5 / 4]]


def test_reinforce_step_raises_the_thought_logprob_end_to_end(tok):
    """A gradient step on the REINFORCE term alone raises log pi of the thought with positive advantage and,
    when every advantage is negative or zero, leaves the model untouched (no gradient at all)."""
    qs = QuietStarModel(cognate(tok), tok, QuietStarConfig(n_thought=3, n_passes=2)).train()
    ids, mask = ragged_batch(tok)
    ids, mask = ids[:1], mask[:1]
    torch.manual_seed(3)
    th = qs.think(ids, mask, n_passes=2, temperature=1.0)
    thinks = torch.zeros(2, ids.shape[1])
    thinks[:, 2] = 1
    reward = torch.tensor([[0.0] * ids.shape[1], [0.0] * ids.shape[1]])
    reward[0, 2] = 1.0  # pass 0's thought at position 2 is the better one
    reinforce_term(reward, th.logprob, thinks, 2).backward()
    before = float(th.logprob[0, 2].detach())
    with torch.no_grad():
        for p in qs.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    after = float(qs.think(ids, mask, n_passes=2, temperature=1.0, tokens=th.tokens).logprob[0, 2].detach())
    assert after > before
    qs.zero_grad(set_to_none=True)
    th = qs.think(ids, mask, n_passes=2, temperature=1.0)
    reward = torch.zeros(2, ids.shape[1])  # equal rewards: no positive advantage anywhere
    reinforce_term(reward, th.logprob, thinks, 2).backward()
    assert all(p.grad is None or not p.grad.any() for p in qs.parameters())


def test_loss_trains_the_mixing_head_and_thought_embeddings(tok):
    from forgelib.data.tasks import build_mix
    from forgelib.data.tokenizer import encode_samples, lm_batches

    qs = QuietStarModel(cognate(tok), tok, QuietStarConfig(n_thought=2, n_passes=2)).train()
    batch = next(lm_batches(encode_samples(tok, build_mix({"arith": 1}, (1, 1), 16, "train", 0), 64,
                                           answer_only_loss=True, with_steps=True), 8, seed=0, epochs=None))
    loss, extras = quietstar_loss(qs, batch)
    loss.backward()
    assert torch.isfinite(loss) and extras["mix_weight"] == 0.0 and extras["gain"] == 0.0
    assert qs.mixing_head[-1].weight.grad.abs().sum() > 0  # the closed head still learns where to open
    assert qs.thought_embeddings.grad[:2].abs().sum() > 0
    # base NLL part: the plain cross-entropy of the base logits on the answer labels
    with torch.no_grad():
        ref = qs.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = F.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)
    assert abs(extras["base_nll"] - float(want)) < 1e-4


def test_future_targets():
    labels = torch.tensor([[-100, 5, 6, 7]])
    assert future_targets(labels, 2).tolist() == [[[5, 6], [6, 7], [7, -100], [-100, -100]]]


@pytest.mark.parametrize("mode", ["pause", "random"])
def test_ablation_modes_think_without_content(tok, mode):
    qs = randomize_head(QuietStarModel(cognate(tok), tok, QuietStarConfig(n_thought=3, thought_mode=mode))).eval()
    ids, mask = ragged_batch(tok)
    with torch.no_grad():
        th = qs.think(ids, mask)
    if mode == "pause":
        assert (th.tokens == qs.sot_id).all()
    else:
        assert qs.thought_vocab[th.tokens].all() and th.tokens.unique().numel() > 3
    assert (th.logprob == 0).all()


def test_save_and_load_round_trip(tok, tmp_path):
    qs = randomize_head(QuietStarModel(cognate(tok), tok, QuietStarConfig(n_thought=2))).eval()
    qs.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again = load_quietstar(tmp_path / "m")
    ids, mask = ragged_batch(tok)
    with torch.no_grad():
        assert torch.equal(qs(ids, mask).logits, again(ids, mask).logits)
    assert dataclasses.asdict(again.qconfig) == dataclasses.asdict(qs.qconfig)
    from forgelib.modelio import load_causal_lm

    plain = load_causal_lm(tmp_path / "m")  # the base folder is a normal HF model
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits,
                           qs.base(input_ids=ids, attention_mask=mask).logits)


def test_a_model_handed_on_plain_answers_as_its_base_wherever_it_is_loaded(tok, tmp_path):
    """``thinking`` (Phase 3's decision) is saved with the model, in a folder and in a Phase-8 artifact: a model
    saved plain gives its base's logits when loaded back; one saved thinking does not; a folder written before the
    flag existed thinks (as it did); a flag that is not a boolean is refused naming the file."""
    import json

    from forgelib.modelio import ModelLoadError, load_compressed
    from forgelib.quant.artifact import save_compressed

    qs = randomize_head(QuietStarModel(cognate(tok), tok, QuietStarConfig(n_thought=2))).eval()
    ids, mask = ragged_batch(tok)
    with torch.no_grad():
        base = qs.base(input_ids=ids, attention_mask=mask).logits
        thought = qs(ids, mask).logits
    assert not torch.allclose(base, thought, atol=1e-4)  # the randomized head mixes thoughts in
    for thinking in (False, True):
        qs.thinking = thinking
        qs.save_pretrained(tmp_path / f"m{thinking}")
        tok.save_pretrained(tmp_path / f"m{thinking}")
        save_compressed(qs, tmp_path / f"a{thinking}" / "m.forge", tokenizer=tok)
        folder = load_quietstar(tmp_path / f"m{thinking}")
        with torch.no_grad():
            assert torch.equal(folder(ids, mask).logits, thought if thinking else base)
        for again in (folder, load_compressed(tmp_path / f"a{thinking}" / "m.forge")):
            assert again.thinking is thinking
            with torch.no_grad():
                got = again(ids, mask).logits
            want, other = (thought, base) if thinking else (base, thought)
            # (the artifact's default codecs round the weights: closer to the expected logits by far, not equal)
            assert (got - want).abs().max() < 0.1 * (got - other).abs().max()
    settings = tmp_path / "mFalse" / "quietstar.json"
    meta = json.loads(settings.read_text())
    del meta["thinking"]
    settings.write_text(json.dumps(meta))
    assert load_quietstar(tmp_path / "mFalse").thinking is True
    settings.write_text(json.dumps({**meta, "thinking": "no"}))
    with pytest.raises(ModelLoadError, match="quietstar.json: 'thinking' must be true or false"):
        load_quietstar(tmp_path / "mFalse")


def test_bad_settings_and_models_fail_clearly(tok):
    with pytest.raises(ValueError, match="thought_mode"):
        QuietStarConfig(thought_mode="dream")
    with pytest.raises(ValueError, match="n_thought"):
        QuietStarConfig(n_thought=0)
    with pytest.raises(ValueError, match="memory"):
        QuietStarModel(cognate(tok, memory_modules=True, use_memory=True), tok)


def test_cognate_accepts_a_4d_mask_equal_to_its_own_causal_mask(tok):
    model = cognate(tok, n_cycles=2)
    ids, mask = ragged_batch(tok)
    T = ids.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    causal = causal | torch.eye(T, dtype=torch.bool)[None, None]  # a padded query sees itself
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=causal).logits
        ref = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()])
    with pytest.raises(ValueError, match="4-D attention_mask must have shape"):
        model(input_ids=ids, attention_mask=causal[:, :, :-1])


def test_the_loss_thinks_only_where_a_target_counts_and_equals_thinking_everywhere(tok):
    """``quietstar_loss`` thinks at the positions whose next n_true tokens hold a label (``thinking_positions``).
    Reference: the same model thinking at every position with the same Gumbel noise, the loss terms written out
    over the labelled targets. Ragged rows (right padding) and a row without any label included."""
    from forgelib.data.tasks import build_mix
    from forgelib.data.tokenizer import encode_samples, lm_batches
    from forgelib.quietstar.training import thinking_positions

    needed = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    real = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    positions, keep = thinking_positions(needed, real)
    assert positions.tolist() == [[1, 3, 4], [2, 2, 2], [0, 0, 0]]
    assert keep.tolist() == [[True, True, True], [False, False, False], [True, False, False]]

    cfg = QuietStarConfig(n_thought=2, n_true=2, n_passes=2)
    qs = randomize_head(QuietStarModel(cognate(tok), tok, cfg)).train()
    batch = next(lm_batches(encode_samples(tok, build_mix({"arith": 1, "algebra": 1}, (1, 2), 16, "train", 0), 64,
                                           answer_only_loss=True, with_steps=True), 4, seed=0, epochs=None))
    batch["labels"][1] = -100  # a row that has nothing to learn
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    B, T = ids.shape
    V = qs.base.config.vocab_size
    noise = -torch.log(-torch.log(torch.rand(B * 2, T, cfg.n_thought, V, generator=torch.Generator().manual_seed(3))))
    with torch.no_grad():
        loss, extras = quietstar_loss(qs, batch, noise=noise)
        th = qs.think(ids, mask, n_passes=2, temperature=cfg.temperature, noise=noise)  # every position
    targets = future_targets(labels, cfg.n_true).repeat_interleave(2, 0)
    valid = targets != -100
    assert valid.sum(-1).gt(0).sum() < valid.shape[0] * T / 2, "the case to test: most positions need no thought"

    def mean_nll(logits):
        nll = F.cross_entropy(logits.float().reshape(-1, V), targets.clamp(min=0).reshape(-1), reduction="none")
        return float((nll.view_as(targets) * valid).sum() / valid.sum())

    assert extras["mixed_nll"] == pytest.approx(mean_nll(th.mixed_logits), abs=1e-5)
    assert extras["thought_nll"] == pytest.approx(mean_nll(th.thought_logits), abs=1e-5)
    assert extras["gain"] == pytest.approx(mean_nll(th.base_future_logits) - mean_nll(th.mixed_logits), abs=1e-5)
    assert extras["mix_weight"] == pytest.approx(float((th.weights * valid).sum() / valid.sum()), abs=1e-6)
    token_ll = -(F.cross_entropy(th.thought_logits.float().reshape(-1, V), targets.clamp(min=0).reshape(-1),
                                 reduction="none").view_as(targets) * valid).sum(-1)
    rl = reinforce_term(token_ll, th.logprob, valid[..., 0], 2)
    assert extras["rl"] == pytest.approx(float(rl), abs=1e-5)
