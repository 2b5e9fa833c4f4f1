"""Phase 6 (Prompt Baking) on tiny real models: the KL against a brute-force sum, the teacher/student pairing of
the encoded trajectories, the teacher that never moves while the student learns, a bake that closes most of the
prompted-vs-unprompted gap on held-out questions (and half-baking in between), merges that are exact (also for the
ternary-aware adapter on BitLinear layers), the supervised alternative's loss, and the prompt library's worked
examples."""
import copy
import random

import pytest
import torch
import torch.nn.functional as F

from forgelib.baking import (BakePrompt, PromptBakingConfig, add_lora, adheres, bake_prompt, correct, encode_pairs,
                             gap_closed, merge_baked, normalize, pair_kl, prompt_kl, sample_trajectories,
                             scale_adapter, styled, teacher_logprobs, uses_tool)
from forgelib.baking.bake import _batches, kl_loss, sft_loss
from forgelib.baking.library import answer_part, prefix, tool_step
from forgelib.baking.teach import prompt_subsets, teach_prompts, teaching_samples
from forgelib.data.base import Sample
from forgelib.data.tasks import completion_text, generate

TOOL = BakePrompt("calculator", "tool", "Use the calculator. ")
PERSONA = BakePrompt("formal", "persona", "Be formal. ", answer_prefix="Answer: ")


@pytest.fixture(scope="module")
def tok():
    from forgelib.data.tasks import build_mix, format_sample, suite_families
    from forgelib.data.tokenizer import train_tokenizer

    mix = {f: 1 for f in suite_families()}
    texts = [format_sample(s, with_steps=True) for s in build_mix(mix, (1, 3), 300, "train", 0)]
    texts += [format_sample(styled(s, [TOOL, PERSONA]), with_steps=True) for s in generate("arith", 1, 50, "train", 1)]
    return train_tokenizer(texts, vocab_size=300)


def tiny_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# Hand-made trajectories (x, y, ended) of the tool prompt: one ended at eos, one cut by the budget.
TRAJECTORIES = [("34+50=", "<|tool|>34+50<|/tool|><|result|>84#84", True),
                ("7+5=", "7+5=12#1", False),
                ("6+1=", "<|tool|>6+1<|/tool|><|result|>7#7", True)]


def randomize_lora(model, std=0.5, seed=1):
    """Nonzero LoRA matrices (B starts at 0: the adapter would be the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# --- the KL, the pairing, the gap ---------------------------------------------------------------------


def test_pair_kl_is_the_masked_mean_of_the_full_vocabulary_kl():
    """pair_kl = mean over real positions of Σ_v p_t(v)(log p_t(v) − log p_s(v)) (torch.distributions reference);
    padded positions (filled with garbage) do not count."""
    torch.manual_seed(0)
    student = torch.randn(3, 5, 11) * 2
    teacher = F.log_softmax(torch.randn(3, 5, 11) * 2, -1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    student[~mask] = 1e4 * torch.randn(int((~mask).sum()), 11)  # garbage on padding
    dist = torch.distributions
    per = [dist.kl_divergence(dist.Categorical(logits=teacher[b, j]), dist.Categorical(logits=student[b, j]))
           for b in range(3) for j in range(5) if mask[b, j]]
    want = torch.stack(per).mean()
    # and by the formula, in float64
    p_t = teacher.double().exp()
    by_hand = (p_t * (teacher.double() - F.log_softmax(student.double(), -1))).sum(-1)[mask].mean()
    got = pair_kl(student, teacher, mask)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert got.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert got.item() > 0.1
    # KL of a distribution with itself is 0, with any logit shift
    assert pair_kl(teacher + 3.0, teacher, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_encode_pairs_aligns_teacher_and_student_on_the_trajectory_tokens(tok):
    """Teacher row = bos + ids(prompt + x) + ids(y) (+ eos when ended), student row = bos + ids(x) + the same
    response; the token after each compared position is the trajectory's token on both sides."""
    eos, bos = tok.eos_token_id, tok.bos_token_id
    pairs = encode_pairs(tok, TOOL.text, TRAJECTORIES)
    assert len(pairs) == 3
    for i, (x, y, ended) in enumerate(TRAJECTORIES):
        resp = ids_of(tok, y) + ([eos] if ended else [])
        t_row = [bos] + ids_of(tok, TOOL.text + x) + resp
        s_row = [bos] + ids_of(tok, x) + resp
        n_t, n_s = int(pairs.t_mask[i].sum()), int(pairs.s_mask[i].sum())
        assert pairs.t_ids[i, :n_t].tolist() == t_row and pairs.s_ids[i, :n_s].tolist() == s_row
        assert (pairs.t_ids[i, n_t:] == tok.pad_token_id).all() and (pairs.s_ids[i, n_s:] == tok.pad_token_id).all()
        real = pairs.pos_mask[i]
        assert int(real.sum()) == len(resp)
        t_next = pairs.t_ids[i, pairs.t_pos[i, real] + 1].tolist()
        s_next = pairs.s_ids[i, pairs.s_pos[i, real] + 1].tolist()
        assert t_next == s_next == pairs.targets[i, real].tolist() == resp
        # the first compared position is the last question token (it predicts the first response token)
        assert int(pairs.t_pos[i, 0]) == n_t - len(resp) - 1 and int(pairs.s_pos[i, 0]) == n_s - len(resp) - 1
        assert (t_next[-1] == eos) == ended
        assert (pairs.targets[i, ~real] == -100).all()
    # an empty response is left out unless it ended (then it is the eos alone)
    pairs = encode_pairs(tok, TOOL.text, [("1+1=", "", False), ("2+2=", "", True)])
    assert len(pairs) == 1 and pairs.targets[0, pairs.pos_mask[0]].tolist() == [eos]
    # max_len: the teacher row's length decides
    lengths = [1 + len(ids_of(tok, TOOL.text + x)) + len(ids_of(tok, y)) + e for x, y, e in TRAJECTORIES]
    assert len(set(lengths)) == 3
    cut = sorted(lengths)[1]
    kept = encode_pairs(tok, TOOL.text, TRAJECTORIES, max_len=cut)
    assert len(kept) == 2
    want = [ids_of(tok, y) + [eos] * e for (x, y, e), n in zip(TRAJECTORIES, lengths) if n <= cut]
    assert [kept.targets[i, kept.pos_mask[i]].tolist() for i in range(2)] == want
    assert int(kept.t_mask.sum(1).max()) <= cut
    with pytest.raises(ValueError, match="no trajectory fits max_len"):
        encode_pairs(tok, TOOL.text, TRAJECTORIES, max_len=min(lengths) - 1)


def test_gap_closed_worked_numbers():
    assert gap_closed(0.25, 1.0) == pytest.approx(0.75)
    assert gap_closed(1.0, 1.0) == pytest.approx(0.0)
    assert gap_closed(0.0, 0.4) == pytest.approx(1.0)
    assert gap_closed(0.6, 0.4) == pytest.approx(-0.5)  # a bake that made things worse
    assert gap_closed(0.3, 0.0) != gap_closed(0.3, 0.0)  # nan: the prompt changes nothing


def test_kl_and_sft_losses_match_hand_computations(tok):
    """kl_loss / sft_loss on a batch of ``_batches`` (shuffled, trimmed) equal a brute-force KL and
    F.cross_entropy computed position by position from the untrimmed pairs (targets read off the student row)."""
    model = tiny_llama(tok)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # sharper distributions: a KL well above float32 rounding
    pairs = encode_pairs(tok, TOOL.text, TRAJECTORIES)
    teacher = teacher_logprobs(model, pairs)
    batch = next(_batches(pairs, teacher, batch_size=len(pairs), seed=0))
    with torch.no_grad():
        s_logits = model(input_ids=pairs.s_ids, attention_mask=pairs.s_mask).logits
        t_logits = model(input_ids=pairs.t_ids, attention_mask=pairs.t_mask).logits
        rows, targets, kls = [], [], []
        dist = torch.distributions
        for i in range(len(pairs)):
            for j in range(pairs.pos_mask.shape[1]):
                if pairs.pos_mask[i, j]:
                    s, t = int(pairs.s_pos[i, j]), int(pairs.t_pos[i, j])
                    rows.append(s_logits[i, s])
                    targets.append(int(pairs.s_ids[i, s + 1]))
                    kls.append(dist.kl_divergence(dist.Categorical(logits=t_logits[i, t].double()),
                                                  dist.Categorical(logits=s_logits[i, s].double())))
        want_ce = F.cross_entropy(torch.stack(rows), torch.tensor(targets))
        want_kl = torch.stack(kls).mean()
        got_ce, _ = sft_loss(model, batch)
        got_kl, _ = kl_loss(model, batch)
    assert batch["input_ids"].shape[1] == int(pairs.s_mask.sum(1).max())  # trimmed to the longest real row
    assert got_ce.item() == pytest.approx(want_ce.item(), rel=1e-5)
    assert got_kl.item() == pytest.approx(want_kl.item(), rel=1e-4)
    assert want_kl.item() > 0.01  # the prompt changes even a random model's predictions


# --- baking: the teacher stays, the student moves -----------------------------------------------------


@pytest.mark.parametrize("ternary", [False, True])
def test_bake_moves_the_student_and_never_the_teacher(tok, ternary):
    """After bake_prompt the teacher (adapter off, prompt prepended) gives bitwise the log-probs it gave before
    and the base weights are bitwise unchanged, while the student (adapter on, no prompt) has moved and still
    differs from the teacher. Also on BitLinear layers (the adapter learns through the straight-through
    quantizer)."""
    from forgelib.quant.bitnet import convert_to_bitnet

    model = tiny_llama(tok)
    if ternary:
        convert_to_bitnet(model)
    lora_model = add_lora(model, PromptBakingConfig(lora_r=4))
    pairs = encode_pairs(tok, TOOL.text, TRAJECTORIES)
    before = teacher_logprobs(lora_model, pairs)
    base_before = {k.replace(".base_layer", ""): v.clone() for k, v in lora_model.get_base_model().state_dict().items()
                   if "lora_" not in k}
    with torch.no_grad():
        student_before = lora_model(input_ids=pairs.s_ids, attention_mask=pairs.s_mask).logits
    kl_before = pair_kl(student_before.gather(1, pairs.s_pos.unsqueeze(-1).expand(-1, -1, student_before.shape[-1])),
                        before, pairs.pos_mask).item()
    assert kl_before > 0

    config = PromptBakingConfig(steps=6, lr=5e-3, lora_r=4, batch_size=8, trajectories=8, max_new_tokens=8,
                                eval_every=0)
    baked = bake_prompt(lora_model, TOOL.text, tok, ["34+50=", "7+5="], config)
    after = teacher_logprobs(baked, pairs)
    assert torch.equal(after, before)
    base_after = {k.replace(".base_layer", ""): v for k, v in baked.get_base_model().state_dict().items()
                  if "lora_" not in k}
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_after[k], base_before[k]) for k in base_before)
    assert any(p.abs().sum() > 0 for n, p in baked.named_parameters() if "lora_B" in n)  # the adapter learned
    with torch.no_grad():
        student_after = baked(input_ids=pairs.s_ids, attention_mask=pairs.s_mask).logits
    assert not torch.allclose(student_after, student_before, atol=1e-4)
    kl_after = prompt_kl(baked, pairs, after)
    # the student moved towards the prompted teacher on these (unseen) trajectories, measured: KL 5.2e-4 -> 1.3e-4
    # (ratio 0.24) on Llama, 6.6e-5 -> 3.2e-5 (0.49) ternary; not learning (lr 1e-9) keeps the ratio at 1.00, an
    # adapter of the same size in a random direction raises it (1.12, 1.27)
    assert kl_after < 0.7 * kl_before
    assert prompt_kl(baked, pairs, after, adapter=False) == pytest.approx(kl_before, rel=1e-5)
    losses = baked.baking_report["train_loss"]
    assert len(losses) == 6 and losses[0] > 0  # the first step's KL: teacher and student differ from the start


# --- baking a prompt the model responds to ------------------------------------------------------------

CALIBRATION = generate("arith", 1, 32, "train", 5)
HELD_OUT = generate("arith", 1, 32, "test", 6)
BAKE = dict(steps=60, lr=2e-3, lora_r=4, batch_size=16, trajectories=64, max_new_tokens=16, eval_every=10, seed=0)


def greedy_tool_rate(model, tok, prompt, samples):
    traces = sample_trajectories(model, tok, prompt, samples, len(samples), temperature=0.0, max_new_tokens=16)
    return sum(uses_tool(y) for _, y, _ in traces) / len(samples)


@pytest.fixture(scope="module")
def taught(tok):
    """A tiny Llama taught (teach_prompts, 200 steps, ~2 s) to answer with the calculator when the tool prompt
    comes first and in plain worked steps otherwise, with the held-out pairs the bakes below use (sampled as
    bake_prompt samples its eval_data: temperature 1, seed + 1)."""
    model = tiny_llama(tok)
    teach_prompts(model, tok, [TOOL], ["arith"], [1], steps=200, batch_size=16, max_len=64, seed=0,
                  optimizer={"lr": 3e-3})
    model.eval()
    held = encode_pairs(tok, TOOL.text, sample_trajectories(model, tok, TOOL.text, HELD_OUT, len(HELD_OUT), 1.0,
                                                            BAKE["max_new_tokens"], BAKE["seed"] + 1))
    teacher = teacher_logprobs(model, held)
    kl = prompt_kl(model, held, teacher)
    # measured: KL(prompted ‖ unprompted) 1.48 nats per position (1.56 / 1.36 with teach and bake seeds 1 / 2);
    # greedy tool use 32/32 prompted, 0/32 without (all three seeds)
    assert kl > 0.5
    assert greedy_tool_rate(model, tok, TOOL.text, HELD_OUT) >= 0.9
    assert greedy_tool_rate(model, tok, "", HELD_OUT) <= 0.1
    return {"model": model, "held": held, "teacher": teacher, "kl": kl}


@pytest.fixture(scope="module")
def baked_full(tok, taught):
    return bake_prompt(copy.deepcopy(taught["model"]), TOOL.text, tok, CALIBRATION, PromptBakingConfig(**BAKE),
                       eval_data=HELD_OUT)


def test_calibration_and_held_out_questions_are_disjoint():
    assert not {s.prompt for s in CALIBRATION} & {s.prompt for s in HELD_OUT}


def test_baking_closes_the_gap_on_held_out_questions(tok, taught, baked_full):
    """KL(prompted ‖ baked) far below KL(prompted ‖ unbaked) on test-split questions, and the baked model uses
    the calculator without being told to."""
    report = baked_full.baking_report
    assert report["kl_unbaked"] == pytest.approx(taught["kl"], rel=1e-5)  # the same held-out pairs, reproduced
    assert report["curve"][0] == {"step": 0, "kl": pytest.approx(report["kl_unbaked"], rel=1e-5)}  # B = 0 at start
    assert [c["step"] for c in report["curve"]] == [0, 10, 20, 30, 40, 50, 60]
    assert report["curve"][-1]["kl"] == pytest.approx(report["kl_baked"], rel=1e-5)
    assert report["kl_baked"] == pytest.approx(prompt_kl(baked_full, taught["held"], taught["teacher"]), rel=1e-5)
    # measured: 1.48 -> 0.040 nats, gap closed 0.973 (seeds 1 / 2: 0.989 / 0.974; the held-out curve 1.48, 0.64,
    # 0.31, 0.13, 0.067, 0.053, 0.040 every 10 steps); 0.8 leaves a wide margin and still asks for most of the gap
    assert report["gap_closed"] >= 0.8
    assert report["gap_closed"] == pytest.approx(1 - report["kl_baked"] / report["kl_unbaked"])
    assert sum(report["train_loss"][-10:]) / 10 < 0.25 * report["train_loss"][0]  # measured 1.69 -> 0.032
    # behaviour: unprompted greedy answers of held-out questions now call the calculator (measured 32/32)
    assert greedy_tool_rate(baked_full, tok, "", HELD_OUT) >= 0.75
    # the merged model is the baked one
    merged = merge_baked(copy.deepcopy(baked_full))
    assert prompt_kl(merged, taught["held"], taught["teacher"]) == pytest.approx(report["kl_baked"], rel=1e-4)


def test_half_baking_lands_in_between(tok, taught, baked_full):
    """half_baking_factor 0.5 after the same training: kl_unbaked > kl_half > kl_full, and the half-baked KL is the
    full adapter's KL with its scaling halved by hand (scale_adapter on a copy)."""
    half = bake_prompt(copy.deepcopy(taught["model"]), TOOL.text, tok, CALIBRATION,
                       PromptBakingConfig(**BAKE, half_baking=True, half_baking_factor=0.5), eval_data=HELD_OUT)
    full_r, half_r = baked_full.baking_report, half.baking_report
    assert half_r["train_loss"] == full_r["train_loss"]  # the same training; only the strength differs
    assert half_r["kl_unbaked"] == pytest.approx(full_r["kl_unbaked"], rel=1e-6)
    # measured: 1.48 > 0.19 > 0.040 (seeds 1 / 2: 1.56 > 0.12 > 0.017, 1.36 > 0.13 > 0.035)
    assert half_r["kl_unbaked"] > half_r["kl_baked"] > full_r["kl_baked"]
    assert 0 < half_r["gap_closed"] < full_r["gap_closed"]
    halved = copy.deepcopy(baked_full)
    scale_adapter(halved, 0.5)
    assert prompt_kl(halved, taught["held"], taught["teacher"]) == pytest.approx(half_r["kl_baked"], rel=1e-4)


# --- adapters: scaling and exact merges ---------------------------------------------------------------


@pytest.mark.parametrize("ternary", [False, True])
def test_scale_adapter_zero_is_the_unbaked_model_and_scaling_is_linear(tok, ternary):
    """scale_adapter(m, 0): logits bitwise the adapter-disabled ones; factor 0.5 = LoRA B halved by hand."""
    from forgelib.quant.bitnet import convert_to_bitnet

    model = tiny_llama(tok)
    if ternary:
        convert_to_bitnet(model)
    lora = add_lora(model, PromptBakingConfig(lora_r=4))
    randomize_lora(lora, std=0.3)
    ids = torch.tensor([ids_of(tok, "<|bos|>34+50=84#84")])
    with torch.no_grad():
        with lora.disable_adapter():
            off = lora(input_ids=ids).logits
        on = lora(input_ids=ids).logits
        assert not torch.allclose(on, off, atol=1e-3)

        halved_b = copy.deepcopy(lora)
        for n, p in halved_b.named_parameters():
            if "lora_B" in n:
                p.mul_(0.5)
        half = copy.deepcopy(lora)
        scale_adapter(half, 0.5)
        assert torch.allclose(half(input_ids=ids).logits, halved_b(input_ids=ids).logits, atol=1e-5)

        scale_adapter(lora, 0.0)
        assert torch.equal(lora(input_ids=ids).logits, off)


def test_merge_of_a_standard_lora_keeps_the_logits(tok):
    """Merged and unmerged logits agree to float32 rounding: in float64 the merge is exact (measured 0.0 apart), in
    float32 they differ by no more than a few times the rounding error of the unmerged forward itself, measured
    against float64 on this machine (measured: 1.2e-5 apart, the forward's own error 1.7e-5; the random adapter
    drives hidden states to ~500 while the logits stay below 0.5, so a bound on max|logit| alone would not hold).
    A merge that forgot the LoRA scaling alpha / r (= 4), done by hand here, is 0.65 away; one 0.1% off, 3.5e-3."""
    from peft.tuners.lora import LoraLayer

    model = tiny_llama(tok)
    ids = torch.tensor([ids_of(tok, "<|bos|>Use the calculator. 34+50=84#84")])
    with torch.no_grad():
        base = model(input_ids=ids).logits
    lora = add_lora(model, PromptBakingConfig(lora_r=4))
    randomize_lora(lora, std=0.3)
    lora64 = copy.deepcopy(lora).double()
    adapted = {n.removeprefix("base_model.model."): (m.get_base_layer().weight.detach().clone(),
                                                    m.lora_A["default"].weight.detach().clone(),
                                                    m.lora_B["default"].weight.detach().clone(), m.scaling["default"])
               for n, m in lora.named_modules() if isinstance(m, LoraLayer)}
    assert len(adapted) == 14 and {s for *_, s in adapted.values()} == {16.0 / 4}
    with torch.no_grad():
        unmerged = lora(input_ids=ids).logits
        merged_model = merge_baked(lora)
        merged = merged_model(input_ids=ids).logits
        unmerged64 = lora64(input_ids=ids).logits
        merged64 = merge_baked(lora64)(input_ids=ids).logits
        forgot_scaling = copy.deepcopy(merged_model)
        for name, (w, a, b, _) in adapted.items():
            forgot_scaling.get_submodule(name).weight.copy_(w + b @ a)
        wrong = forgot_scaling(input_ids=ids).logits
    assert not torch.allclose(unmerged, base, atol=1e-3)  # the adapter does something
    assert not any("lora_" in n for n, _ in merged_model.named_parameters())
    assert torch.allclose(merged64, unmerged64, rtol=0, atol=1e-9)
    tolerance = 4 * float((unmerged.double() - unmerged64).abs().max())
    assert tolerance < 1e-3  # float32 rounding, far below what a wrong merge costs
    assert float((merged - unmerged).abs().max()) <= tolerance
    assert float((wrong - unmerged).abs().max()) > 100 * tolerance


def test_ternary_lora_quantizes_the_adapted_weight_and_merges_exactly(tok):
    """On BitLinear layers the adapter computes with ternary(W + s·BA): checked against forward_with_weight and a
    from-scratch absmean / absmax reference; merge_and_unload then gives the same logits and an all-ternary model.
    A plain LoRA on top of ternary(W) would not survive the merge (it is re-quantized)."""
    from forgelib.quant.bitnet import BitLinear, convert_to_bitnet, ternary_quantize

    model = convert_to_bitnet(tiny_llama(tok))
    lora = add_lora(model, PromptBakingConfig(lora_r=4))
    layer = lora.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "TernaryLoraLinear" and isinstance(layer.get_base_layer(), BitLinear)
    randomize_lora(lora, std=0.05)
    base = layer.get_base_layer()
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    W = base.weight
    torch.manual_seed(3)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        adapted = W + (B @ A) * s
        out = layer(x)
        assert torch.equal(out, base.forward_with_weight(x, adapted))
        # from scratch: absmean ternary weight, per-token absmax 8-bit activations, no bias
        w_scale = adapted.abs().mean().clamp(min=1e-5)
        w_q = (adapted / w_scale).round().clamp(-1, 1) * w_scale
        x_scale = 127 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
        x_q = (x * x_scale).round().clamp(-128, 127) / x_scale
        assert torch.allclose(out, x_q @ w_q.T, atol=1e-6)
        # the adapter is not negligible: it flips ternary codes
        codes_w, _ = ternary_quantize(W)
        codes_adapted, _ = ternary_quantize(adapted)
        assert (codes_w != codes_adapted).float().mean() > 0.05
        # a plain (not ternary-aware) LoRA computes ternary(W) + s·BA; merged, that latent would be re-quantized
        plain = base(x) + x @ ((B @ A) * s).T
        plain_merged = base.forward_with_weight(x, W + (B @ A) * s)
        assert (plain - plain_merged).abs().max() > 1e-2
        # ... and ternary(W) + s·BA is not a ternary matrix at all, ternary(W + s·BA) is
        w_plain = base.quantized_weight() + (B @ A) * s
        assert w_plain.unique().numel() > 3 and w_q.unique().numel() <= 3

        ids = torch.tensor([ids_of(tok, "<|bos|>Use the calculator. 34+50=84#84")])
        with lora.disable_adapter():
            off = lora(input_ids=ids).logits
        unmerged = lora(input_ids=ids).logits
        merged_model = merge_baked(lora)
        merged = merged_model(input_ids=ids).logits
    assert not torch.allclose(unmerged, off, atol=1e-3)
    layers = [m for m in merged_model.modules() if isinstance(m, BitLinear)]
    assert len(layers) == 14 and not any("lora_" in n for n, _ in merged_model.named_parameters())
    assert torch.allclose(merged, unmerged, atol=1e-6)
    assert torch.equal(merged_model.model.layers[0].self_attn.q_proj.weight, adapted)


# --- the prompt library and teaching ------------------------------------------------------------------


def test_tool_step_worked_examples():
    assert tool_step("71+35=106") == "<|tool|>71+35<|/tool|><|result|>106"
    assert tool_step("71+35=107") == "71+35=107"  # the calculator says 106: left as it is
    assert tool_step("x+9=13") == "x+9=13"  # not an expression the calculator evaluates
    assert tool_step("106") == "106"


def test_styled_sample_under_both_prompts_and_its_grading():
    sample = Sample("71+35=", "106", "arith", 1, ["71+35=106"])
    s = styled(sample, [TOOL, PERSONA])
    assert s.prompt == "Use the calculator. Be formal. 71+35="
    assert prefix([TOOL, PERSONA]) == "Use the calculator. Be formal. "
    text = completion_text(s, with_steps=True)
    assert text == "<|tool|>71+35<|/tool|><|result|>106#Answer: 106"
    assert s.meta["styled"] == ["calculator", "formal"] and sample.meta == {}
    assert styled(sample, []).prompt == "71+35=" and completion_text(styled(sample, []), True) == "71+35=106#106"
    assert answer_part(text) == "Answer: 106"
    assert normalize(text, [TOOL, PERSONA]) == "<|tool|>71+35<|/tool|><|result|>106#106"
    assert normalize("no answer mark", [PERSONA]) == "no answer mark"
    assert correct(sample, text, [TOOL, PERSONA]) and correct(sample, "71+35=106#106", [TOOL, PERSONA])
    assert not correct(sample, "#Answer: 105", [PERSONA])
    assert not correct(sample, text, [])  # without the persona, "Answer: 106" is not the answer
    assert adheres(text, TOOL) and adheres(text, PERSONA)
    assert not adheres("71+35=106#106", TOOL) and not adheres("71+35=106#106", PERSONA)
    assert not adheres("Answer: 106", PERSONA)  # no answer mark
    assert adheres("71+35=106#Answer: 106", PERSONA) and not adheres("71+35=106#Answer: 106", TOOL)


def test_bake_prompt_specs_are_checked():
    assert BakePrompt.from_dict({"name": "c", "kind": "tool", "text": "Calc. "}) == BakePrompt("c", "tool", "Calc. ")
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]; valid: name, kind, text, answer_prefix"):
        BakePrompt.from_dict({"name": "c", "kind": "tool", "text": "Calc. ", "colour": "red"})
    with pytest.raises(ValueError, match=r"kind must be one of \('tool', 'persona'\), got 'style'"):
        BakePrompt.from_dict({"name": "c", "kind": "style", "text": "Calc. "})
    with pytest.raises(ValueError, match=r"missing keys \['text'\]"):
        BakePrompt.from_dict({"name": "c", "kind": "tool"})
    with pytest.raises(ValueError, match="text is empty"):
        BakePrompt("c", "tool", "")
    with pytest.raises(ValueError, match="answer_prefix"):
        BakePrompt("p", "persona", "Be formal. ", answer_prefix="#A ")


def test_prompt_subsets_and_teaching_samples():
    assert prompt_subsets([TOOL, PERSONA]) == [(), (TOOL,), (PERSONA,), (TOOL, PERSONA)]
    assert prompt_subsets([TOOL]) == [(), (TOOL,)]
    samples = teaching_samples([TOOL, PERSONA], ["arith"], [1], 40, random.Random(0))
    seen = set()
    for s in samples:
        names = tuple(s.meta["styled"])
        seen.add(names)
        used = [p for p in (TOOL, PERSONA) if p.name in names]
        text = completion_text(s, with_steps=True)
        assert s.prompt.startswith(prefix(used)) and s.family == "arith"
        assert uses_tool(text) == ("calculator" in names)
        assert answer_part(text).startswith("Answer: ") == ("formal" in names)
    assert seen == {(), ("calculator",), ("formal",), ("calculator", "formal")}


def test_two_personas_compose_and_grade():
    brief = BakePrompt("brief", "persona", "Be brief. ", answer_prefix="Result: ")
    sample = Sample("71+35=", "106", "arith", 1, ["71+35=106"])
    text = completion_text(styled(sample, [PERSONA, brief]), with_steps=True)
    assert text == "71+35=106#Result: Answer: 106"
    assert normalize(text, [PERSONA, brief]) == "71+35=106#106"
    assert correct(sample, text, [PERSONA, brief])


# --- Phase 6 under the chain's rules: replay of the suite, per-input KL, another teacher ---------------------


def test_teaching_replays_the_suite_plainly_at_its_levels_and_share():
    """With ``replay`` = a suite and ``replay_share`` 0.3, about 30 % of the teaching questions (measured 0.307 of
    3000; binomial sd 0.008) are the suite's families, drawn uniformly, at their own levels, with no prompt and
    their normal worked solution; the rest are the prompted families, styled."""
    suite = {"logic": (1, 1), "recall": (1, 2), "arith": (2, 2)}
    samples = teaching_samples([TOOL, PERSONA], ["arith"], [1], 3000, random.Random(0), replay=suite,
                               replay_share=0.3)
    replayed = [s for s in samples if "styled" not in s.meta]
    prompted = [s for s in samples if "styled" in s.meta]
    assert abs(len(replayed) / 3000 - 0.3) < 0.03
    per_family = {f: sum(s.family == f for s in replayed) / len(replayed) for f in suite}
    assert all(abs(share - 1 / 3) < 0.05 for share in per_family.values()), per_family
    assert {(s.family, s.level) for s in replayed} == {("logic", 1), ("recall", 1), ("recall", 2), ("arith", 2)}
    for s in replayed:  # plain: the question alone, the worked solution without tool calls or answer prefix
        text = completion_text(s, with_steps=True)
        assert not s.prompt.startswith((TOOL.text, PERSONA.text)) and not uses_tool(text)
        assert not answer_part(text).startswith("Answer:")
    assert {(s.family, s.level) for s in prompted} == {("arith", 1)}
    assert {tuple(s.meta["styled"]) for s in prompted} == {(), ("calculator",), ("formal",), ("calculator", "formal")}
    # no replay: the prompted families alone (the earlier behaviour)
    assert all("styled" in s.meta for s in teaching_samples([TOOL], ["arith"], [1], 50, random.Random(1)))
    with pytest.raises(ValueError, match="replay_share"):
        teaching_samples([TOOL], ["arith"], [1], 5, random.Random(0), replay=suite, replay_share=1.0)


def test_prompt_kl_rows_are_the_per_pair_sums_of_prompt_kl(tok, taught):
    """Per pair: the KL summed over its compared positions (pair_kl of that pair alone × its positions); their
    total over the total positions is prompt_kl."""
    from forgelib.baking.bake import prompt_kl_rows

    model, held, teacher = taught["model"], taught["held"], taught["teacher"]
    sums, positions = prompt_kl_rows(model, held, teacher)
    assert len(sums) == len(positions) == len(held) == 32
    assert positions == held.pos_mask.sum(1).tolist()
    with torch.no_grad():
        for i in (0, 7, 31):
            one = held.select([i])
            logits = model(input_ids=one.s_ids, attention_mask=one.s_mask).logits
            logits = logits.gather(1, one.s_pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
            assert sums[i] == pytest.approx(float(pair_kl(logits, teacher[[i]], one.pos_mask)) * positions[i], rel=1e-4)
    assert sum(sums) / sum(positions) == pytest.approx(prompt_kl(model, held, teacher), rel=1e-6)
    assert sum(sums) / sum(positions) == pytest.approx(taught["kl"], rel=1e-6)


def test_more_held_out_inputs_are_drawn_as_the_bake_drew_its_own(tok, baked_full):
    """heldout_kl on the bake's own held-out questions and seed reproduces the bake's per-input rows: the same
    trajectories from the teacher (adapter off; the bake sampled them with the fresh adapter, B = 0) and the same
    KL values unbaked and baked."""
    from forgelib.baking.bake import heldout_kl

    config = PromptBakingConfig(**BAKE)
    rows = heldout_kl(baked_full, tok, TOOL.text, HELD_OUT, config, config.seed + 1)
    want = baked_full.baking_report["heldout"]
    assert rows["positions"] == want["positions"]
    assert rows["kl_unbaked"] == pytest.approx(want["kl_unbaked"], rel=1e-5)
    assert rows["kl_baked"] == pytest.approx(want["kl_baked"], rel=1e-5)
    assert sum(rows["kl_baked"]) < 0.2 * sum(rows["kl_unbaked"])  # the bake closed most of the gap


def test_bake_with_another_teacher_targets_that_model(tok, taught):
    """``teacher=``: the trajectories and target log-probs come from the teacher with the prompt (here the taught
    model), the unbaked reference is the student without adapter (here an untaught model): kl_unbaked equals
    KL(taught + prompt ‖ untaught) on the same sampled pairs, and the teacher's weights do not move."""
    from forgelib.baking.bake import teacher_pairs

    teacher_model = taught["model"]
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    student = tiny_llama(tok)
    config = PromptBakingConfig(**{**BAKE, "steps": 2, "eval_every": 0})
    baked = bake_prompt(copy.deepcopy(student), TOOL.text, tok, CALIBRATION, config, eval_data=HELD_OUT[:8],
                        teacher=teacher_model)
    pairs, logp = teacher_pairs(teacher_model, tok, TOOL.text, HELD_OUT[:8], 8, config, config.seed + 1)
    assert baked.baking_report["kl_unbaked"] == pytest.approx(prompt_kl(student, pairs, logp), rel=1e-5)
    assert baked.baking_report["kl_unbaked"] != pytest.approx(taught["kl"], rel=0.05)  # not the taught model's gap
    assert all(torch.equal(v, before[k]) for k, v in teacher_model.state_dict().items())


def test_teaching_marks_plain_rows_and_distills_them_to_the_reference(tok):
    """``mark_plain``: the plain rows (replayed or unprompted) come first and are marked; ``plain_distill_loss`` is the
    cross-entropy plus weight x KL(reference || model), the mean over exactly those rows' answer-predicting positions
    (a brute-force sum, one prefix at a time, here), and 0 KL when the model is the reference."""
    from forgelib.baking.teach import plain_distill_loss, teaching_batches, teaching_rows

    rows, plain = teaching_rows([TOOL, PERSONA], ["arith"], [1], 64, random.Random(3), replay={"logic": (1, 1)},
                                replay_share=0.5)
    assert plain == [s.family == "logic" or s.prompt == generate_prompt_plain(s) for s in rows]
    batch = next(teaching_batches(tok, [TOOL, PERSONA], ["arith"], [1], 16, 128, 5, {"logic": (1, 1)}, 0.5,
                                  mark_plain=True))
    marks = batch["plain_rows"].tolist()
    assert marks == sorted(marks, reverse=True) and 0 < sum(marks) < len(marks)
    model, reference = tiny_llama(tok), tiny_llama(tok)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, extras = plain_distill_loss(reference, 0.5)(model, dict(batch))
    ce = model(**{k: v for k, v in batch.items() if k != "plain_rows"}).loss
    total, count = 0.0, 0
    for i in range(len(marks)):
        if not marks[i]:
            continue
        for t in range(batch["input_ids"].shape[1] - 1):
            if batch["labels"][i, t + 1] == -100:
                continue
            ids = batch["input_ids"][i:i + 1, :t + 1]
            p = F.log_softmax(reference(input_ids=ids).logits[0, -1], -1)
            q = F.log_softmax(model(input_ids=ids).logits[0, -1], -1)
            total += float((p.exp() * (p - q)).sum().detach())
            count += 1  # the mean over the plain rows' answer-predicting positions
    assert extras["kl_plain"] == pytest.approx(total / count, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(float(ce.detach()) + 0.5 * total / count, rel=1e-4)
    same, extras = plain_distill_loss(model, 0.5)(model, dict(batch))
    assert extras["kl_plain"] == pytest.approx(0.0, abs=1e-6)
    assert float(same.detach()) == pytest.approx(float(ce.detach()), rel=1e-6)


def generate_prompt_plain(sample):
    """A taught sample's prompt without any library prompt in front (the plain form)."""
    return sample.prompt if not sample.prompt.startswith((TOOL.text, PERSONA.text)) else None


def test_retain_term_answers_every_retain_input_greedily_when_asked(tok, monkeypatch):
    """The retain trajectories: one per retain input when there are more inputs than ``trajectories`` (none left
    out), at ``retain_temperature`` (0: the unprompted model's greedy answers, as ``generate_with_tools`` gives them);
    the bake's own trajectories keep ``temperature``."""
    from forgelib.baking import bake as bake_module
    from forgelib.tools import generate_with_tools

    calls, real = [], bake_module.teacher_pairs

    def recording(model, tokenizer, prompt, inputs, n, config, seed):
        calls.append((prompt, n, config.temperature))
        return real(model, tokenizer, prompt, inputs, n, config, seed)

    monkeypatch.setattr(bake_module, "teacher_pairs", recording)
    retain = generate("logic", 1, 12, "train", 7)
    student = tiny_llama(tok)
    config = PromptBakingConfig(**{**BAKE, "steps": 1, "eval_every": 0, "trajectories": 4,
                                   "retain_temperature": 0.0})
    bake_prompt(copy.deepcopy(student), TOOL.text, tok, CALIBRATION, config, retain_data=retain)
    assert calls == [(TOOL.text, 4, 1.0), ("", 12, 0.0)]
    greedy = [t.text for t in generate_with_tools(student, tok, [s.prompt for s in retain], 16, batch_size=64)]
    sampled = bake_module.sample_trajectories(student, tok, "", retain, 12, 0.0, 16, seed=3)
    assert [y for _, y, _ in sampled] == greedy
    with pytest.raises(ValueError, match="retain_temperature"):
        PromptBakingConfig(retain_temperature=-1.0)
