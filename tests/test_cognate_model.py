"""Tests of the Cognate model (forgelib.models): Llama parity, recursion, deep supervision, ACT, Titans memory,
KV cache, causality, QK-max tracking, peft LoRA, save/load and input checks. All models are tiny."""
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM)

import forgelib.models as fm
from forgelib.modelio import load_causal_lm
from forgelib.models import modeling_cognate
from forgelib.models.memory import CognateMemory, memory_scan

VOCAB, HIDDEN, HEADS, KV_HEADS, LAYERS = 64, 32, 4, 2, 2

# name -> config overrides; "act" makes the untrained halting head decisive so that tokens really halt.
MODES = {
    "plain": dict(),
    "recursion": dict(n_latent=2, n_cycles=2),
    "act": dict(n_latent=1, n_cycles=3),
    "memory": dict(n_latent=1, n_cycles=2, use_memory=True, memory_chunk_size=4, sliding_window=4),
    "all": dict(n_latent=1, n_cycles=3, use_memory=True, memory_chunk_size=3, sliding_window=3),
}
DECISIVE_ACT = {"act", "all"}


def make_config(**overrides) -> fm.CognateConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                  pad_token_id=0, eos_token_id=None, bos_token_id=None)
    fields.update(overrides)
    return fm.CognateConfig(**fields)


def make_model(mode: str = "plain", seed: int = 0, **overrides) -> fm.CognateForCausalLM:
    torch.manual_seed(seed)
    model = fm.CognateForCausalLM(make_config(**{**MODES[mode], **overrides})).eval()
    if mode in DECISIVE_ACT:
        make_act_decisive(model)
    return model


@torch.no_grad()
def make_act_decisive(model) -> None:
    """Halting logits of a few units either side of 0, so that about half the tokens halt early."""
    model.model.halt_head.weight.mul_(40.0)
    model.model.halt_head.bias.zero_()


def token_ids(batch=2, length=12, seed=1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator)


def twin_stack(model):
    """The block stack of `model` as a transformers Llama (or Mistral, for a sliding window) model with the same
    weights and no final norm: net(h) = twin.model(inputs_embeds=h).last_hidden_state."""
    cfg = model.config
    shared = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
                  rms_norm_eps=cfg.rms_norm_eps, rope_parameters=dict(cfg.rope_parameters))
    twin = (MistralForCausalLM(MistralConfig(sliding_window=cfg.sliding_window, **shared))
            if cfg.sliding_window else LlamaForCausalLM(LlamaConfig(**shared)))
    twin.load_state_dict(model.state_dict(), strict=False)
    twin.model.norm = nn.Identity()
    return twin.eval()


@torch.no_grad()
def reference_recursion(model, ids, freeze: bool):
    """TRM recursion written out over the library Llama stack: per-cycle logits, halting logits, cycles used."""
    twin, cfg = twin_stack(model), model.config
    net = lambda h: twin.model(inputs_embeds=h).last_hidden_state  # noqa: E731
    x = model.model.embed_tokens(ids)
    y, z = x, torch.zeros_like(x)
    reached = torch.zeros(ids.shape, dtype=torch.bool)
    cycles_used = torch.full(ids.shape, cfg.n_cycles)
    logits, halts = [], []
    for cycle in range(cfg.n_cycles):
        keep = (reached if freeze else torch.zeros_like(reached)).unsqueeze(-1)
        for _ in range(cfg.n_latent):
            z = torch.where(keep, z, net(z + y + x))
        y = torch.where(keep, y, net(y + z))
        y_norm = model.model.norm(y)
        logits.append(model.lm_head(y_norm))
        if model.model.halt_head is not None:
            halts.append(model.model.halt_head(y_norm)[..., 0])
            newly = (torch.sigmoid(halts[-1]) >= cfg.halt_threshold) & ~reached
            cycles_used[newly] = cycle + 1
            reached |= newly
    return logits, halts, cycles_used


# ---------------------------------------------------------------------------------------------- config & registry

@pytest.mark.parametrize("field, value", [
    ("hidden_size", 30), ("num_key_value_heads", 3), ("n_cycles", 0), ("n_latent", -1), ("head_dim", 7),
    ("memory_chunk_size", 0), ("halt_threshold", 1.5), ("cycle_loss_weighting", "cubic"), ("sliding_window", 0),
])
def test_impossible_config_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        make_config(**{field: value})


def test_registered_with_auto_classes():
    assert isinstance(AutoConfig.for_model("cognate"), fm.CognateConfig)
    assert type(AutoModelForCausalLM.from_config(make_config())) is fm.CognateForCausalLM


def test_cycle_loss_weights_formula():
    assert torch.allclose(fm.cycle_loss_weights("linear", 4), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert torch.allclose(fm.cycle_loss_weights("uniform", 4), torch.full((4,), 0.25))
    assert torch.equal(fm.cycle_loss_weights("last", 3), torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="linear"):
        fm.cycle_loss_weights("cubic", 2)


# ------------------------------------------------------------------------------------------------ Llama parity

def test_degenerate_model_equals_llama_logits_loss_and_hidden_states(tiny_llama):
    cognate = fm.cognate_from_llama(tiny_llama)
    ids = token_ids()
    labels = ids.clone()
    labels[0, :4] = -100
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        ref = tiny_llama(ids, labels=labels, output_hidden_states=True)
        out = cognate(ids, labels=labels, output_hidden_states=True)
        ref_pad, out_pad = tiny_llama(ids, attention_mask=mask).logits, cognate(ids, attention_mask=mask).logits
    assert (out.logits - ref.logits).abs().max() <= 1e-5
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5
    assert len(out.hidden_states) == len(ref.hidden_states)
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert (mine - theirs).abs().max() <= 1e-5
    assert (out_pad - ref_pad)[mask.bool()].abs().max() <= 1e-5
    assert torch.equal(cognate.generate(ids, max_new_tokens=6, do_sample=False),
                       tiny_llama.generate(ids, max_new_tokens=6, do_sample=False))


def test_sliding_window_equals_mistral():
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, sliding_window=3)).eval()
    cognate = fm.CognateForCausalLM(make_config(sliding_window=3, use_act=False,
                                                rope_parameters=dict(mistral.config.rope_parameters))).eval()
    cognate.load_state_dict(mistral.state_dict(), strict=True)
    ids = token_ids(length=16)
    with torch.no_grad():
        assert (cognate(ids).logits - mistral(ids).logits).abs().max() <= 1e-5


# ------------------------------------------------------------------------------ recursion, deep supervision, ACT

def test_recursion_and_deep_supervision_match_written_out_reference():
    model = make_model("recursion").train()
    ids = token_ids()
    labels = ids.clone()
    labels[:, :2] = -100
    out = model(ids, labels=labels)
    logits, halts, _ = reference_recursion(model, ids, freeze=False)
    targets = labels[:, 1:]
    ces = torch.stack([F.cross_entropy(l[:, :-1].reshape(-1, VOCAB), targets.reshape(-1)) for l in logits])
    valid = targets != -100
    bce = torch.stack([F.binary_cross_entropy_with_logits(h[:, :-1][valid], (l[:, :-1].argmax(-1) == targets)[valid]
                                                          .float(), reduction="none")
                       for h, l in zip(halts, logits)], -1).mean()
    weights = torch.tensor([1 / 3, 2 / 3])  # linear weighting, T = 2
    assert (out.logits - logits[-1]).abs().max() <= 1e-5
    assert torch.allclose(out.cycle_losses, ces, atol=1e-5)
    assert abs(out.loss.item() - ((weights * ces).sum() + 0.1 * bce).item()) <= 1e-5
    out.loss.backward()
    assert model.model.halt_head.weight.grad is not None and model.model.halt_head.weight.grad.abs().sum() > 0


def test_halting_bias_starts_strongly_negative():
    model = make_model("recursion")
    assert model.model.halt_head.bias.item() == -5.0
    out = model(token_ids())
    assert out.act_cycles.eq(2).all() and out.act_cycles_mean.item() == 2.0  # nobody halts at the start


def test_act_freezing_matches_reference_and_reports_cycles():
    model = make_model("act")
    ids = token_ids(length=16)
    with torch.no_grad():
        out = model(ids)
    logits, _, cycles = reference_recursion(model, ids, freeze=True)
    assert (out.logits - logits[-1]).abs().max() <= 1e-5
    assert torch.equal(out.act_cycles, cycles)
    assert 1.0 < out.act_cycles_mean.item() < 3.0  # some tokens halted early, some did not
    assert abs(out.act_cycles_mean.item() - cycles.float().mean().item()) < 1e-6
    with torch.no_grad():  # freezing can be switched off: then all cycles run for every token
        unfrozen = model(ids, act_freeze=False).logits
    assert (unfrozen - reference_recursion(model, ids, freeze=False)[0][-1]).abs().max() <= 1e-5


def test_act_halting_is_the_same_in_training_and_inference():
    """Training used to run every cycle for every token while inference froze halted ones, so later cycles
    read states at inference they were never trained on; both modes now freeze the same tokens."""
    model = make_model("act")
    ids = token_ids(length=16)
    with torch.no_grad():
        evaluated = model.eval()(ids)
        trained = model.train()(ids, labels=ids)
    assert 1.0 < evaluated.act_cycles_mean.item() < 3.0  # some tokens halted early
    assert torch.equal(trained.act_cycles, evaluated.act_cycles)
    assert (trained.logits - evaluated.logits).abs().max() <= 1e-5


def test_n_cycles_override_equals_configured_model():
    model = make_model("recursion")
    other = fm.CognateForCausalLM(make_config(**{**MODES["recursion"], "n_cycles": 4})).eval()
    other.load_state_dict(model.state_dict())
    ids = token_ids()
    with torch.no_grad():
        assert torch.allclose(model(ids, n_cycles=4).logits, other(ids).logits, atol=1e-6)
        assert not torch.allclose(model(ids, n_cycles=4).logits, model(ids).logits, atol=1e-4)
    with pytest.raises(ValueError, match="n_cycles"):
        model(ids, n_cycles=0)


# ------------------------------------------------------------------------------------------------ Titans memory

def exact_memory_loop(q, k, v, eta, theta, alpha):
    """Token by token: m_t = M_{t-1} q_t; S_t = eta S - theta * 2 (M k - v) k^T; M_t = (1 - alpha) M + S."""
    B, H, T, d = q.shape
    M = torch.zeros(B, H, d, d, dtype=q.dtype)
    S = torch.zeros_like(M)
    reads = []
    for t in range(T):
        reads.append(torch.einsum("bhij,bhj->bhi", M, q[:, :, t]))
        error = torch.einsum("bhij,bhj->bhi", M, k[:, :, t]) - v[:, :, t]
        grad = 2 * torch.einsum("bhi,bhj->bhij", error, k[:, :, t])
        S = eta[:, :, t, None, None] * S - theta[:, :, t, None, None] * grad
        M = (1 - alpha[:, :, t, None, None]) * M + S
    return torch.stack(reads, dim=2)


def chunk_start_memory_loop(q, k, v, eta, theta, alpha, chunk):
    """The same loop with every gradient taken at the memory of the chunk start (the chunked approximation)."""
    B, H, T, d = q.shape
    M = torch.zeros(B, H, d, d, dtype=q.dtype)
    S, M0, reads = torch.zeros_like(M), M, []
    for t in range(T):
        if t % chunk == 0:
            M0 = M
        reads.append(torch.einsum("bhij,bhj->bhi", M, q[:, :, t]))
        error = torch.einsum("bhij,bhj->bhi", M0, k[:, :, t]) - v[:, :, t]
        grad = 2 * torch.einsum("bhi,bhj->bhij", error, k[:, :, t])
        S = eta[:, :, t, None, None] * S - theta[:, :, t, None, None] * grad
        M = (1 - alpha[:, :, t, None, None]) * M + S
    return torch.stack(reads, dim=2)


def random_memory_inputs(T=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, T, 4, generator=g, dtype=torch.float64) for _ in range(3))
    k = F.normalize(k, dim=-1)
    eta, theta, alpha = (torch.rand(2, 3, T, generator=g, dtype=torch.float64) for _ in range(3))
    return q, k, v, eta, theta, alpha


def test_memory_chunk_one_equals_exact_sequential_loop():
    q, k, v, eta, theta, alpha = random_memory_inputs()
    reads, _ = memory_scan(q, k, v, eta.log(), theta, (1 - alpha).log(), None, chunk_size=1)
    assert torch.allclose(reads, exact_memory_loop(q, k, v, eta, theta, alpha), atol=1e-10)


@pytest.mark.parametrize("chunk", [2, 5, 16])
def test_memory_chunked_form_equals_chunk_start_loop(chunk):
    q, k, v, eta, theta, alpha = random_memory_inputs()
    reads, _ = memory_scan(q, k, v, eta.log(), theta, (1 - alpha).log(), None, chunk_size=chunk)
    assert torch.allclose(reads, chunk_start_memory_loop(q, k, v, eta, theta, alpha, chunk), atol=1e-10)
    pieces, state = [], None  # the same sequence fed in pieces (as cached generation does) gives the same reads
    for start, stop in [(0, 3), (3, 4), (4, 11), (11, 13)]:
        part = [t[:, :, start:stop] for t in (q, k, v, eta.log(), theta, (1 - alpha).log())]
        out, state = memory_scan(*part, state, chunk_size=chunk)
        pieces.append(out)
    assert torch.allclose(torch.cat(pieces, dim=2), reads, atol=1e-10)


def test_memory_module_equals_sequential_reference():
    torch.manual_seed(0)
    memory = CognateMemory(hidden_size=8, num_heads=2, head_dim=4, chunk_size=1).double()
    x = torch.randn(1, 9, 8, dtype=torch.float64)
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    attn = torch.randn(1, 9, 2, 4, dtype=torch.float64)
    blended, _, gate = memory(x, attn, q, k, v, None, None)
    rate = lambda layer: torch.sigmoid(layer(x)).transpose(1, 2)  # noqa: E731  (B, H, T)
    reads = exact_memory_loop(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v,
                              rate(memory.eta_proj), rate(memory.theta_proj), rate(memory.alpha_proj))
    g = torch.sigmoid(memory.out_gate(x)).view(1, 9, 2, 4)
    assert torch.allclose(blended, g * attn + (1 - g) * reads.transpose(1, 2), atol=1e-10)
    assert torch.allclose(gate, g.view(1, 9, 8))


def test_a_chunked_memory_stays_bounded_on_a_long_run_of_similar_keys():
    """Prose repeats its directions: 512 tokens whose keys are all one unit vector and whose rates are at their
    largest. The stable step (``memory_step: stable``) is the rate times (1 - eta) / chunk size, so the chunk stays
    stable and the reads bounded by the values (module docstring); the plain step explodes on the same inputs, and
    so does the rate divided by the chunk size alone (the momentum sums up to 1 / (1 - eta) of it). A model whose
    config says ``stable`` runs its memories so."""
    torch.manual_seed(0)
    T, chunk = 512, 16
    memory = CognateMemory(hidden_size=8, num_heads=2, head_dim=4, chunk_size=chunk).double()
    with torch.no_grad():
        for layer, bias in ((memory.eta_proj, 2.0), (memory.theta_proj, 10.0), (memory.alpha_proj, -10.0)):
            layer.weight.zero_()
            layer.bias.fill_(bias)  # momentum 0.88, step and keep rate near 1
        memory.out_gate.weight.zero_()
        memory.out_gate.bias.fill_(-30.0)  # the output is the memory's read alone
    x = torch.randn(1, T, 8, dtype=torch.float64)
    k = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64).expand(1, 2, T, 4).contiguous()
    v = torch.randn(1, 2, T, 4, dtype=torch.float64)
    q = torch.randn(1, 2, T, 4, dtype=torch.float64)
    blended, _, _ = memory(x, torch.zeros(1, T, 2, 4, dtype=torch.float64), q, k, v, None, None, stable=True)
    assert torch.isfinite(blended).all() and blended.abs().max() < 20 * v.abs().max()
    _, theta, _ = memory.rates(x, None, stable=True)
    eta, raw, alpha = (torch.sigmoid(layer(x)).transpose(1, 2) for layer in (memory.eta_proj, memory.theta_proj,
                                                                              memory.alpha_proj))
    torch.testing.assert_close(theta, raw * (1 - eta) / chunk)
    q_n, k_n = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    torch.testing.assert_close(blended.transpose(1, 2), chunk_start_memory_loop(q_n, k_n, v, eta, theta, alpha, chunk))
    assert blended[:, T // 2:].abs().max() > 0.1 * v.abs().max()  # it does store and read back
    plain, _, _ = memory(x, torch.zeros(1, T, 2, 4, dtype=torch.float64), q, k, v, None, None)
    torch.testing.assert_close(plain.transpose(1, 2), chunk_start_memory_loop(q_n, k_n, v, eta, raw, alpha, chunk))
    for unscaled in (raw, raw / chunk):
        reads = chunk_start_memory_loop(q_n, k_n, v, eta, unscaled, alpha, chunk)
        assert not torch.isfinite(reads).all() or reads.abs().max() > 1e6
    model = make_model("memory", memory_step="stable")  # the config reaches every memory
    seen = []
    hooks = [layer.self_attn.memory.register_forward_hook(lambda m, a, kw, out: seen.append(kw.get("stable")),
                                                          with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(token_ids())
    for hook in hooks:
        hook.remove()
    assert seen and all(seen)
    with pytest.raises(fm.CognateConfigError, match="memory_step must be one of"):
        make_model("memory", memory_step="fast")


def test_memory_carries_information_beyond_the_attention_window():
    ids = token_ids(length=16)
    changed = ids.clone()
    changed[:, 0] = (ids[:, 0] % (VOCAB - 1)) + 1
    for use_memory in (False, True):
        model = make_model("plain", sliding_window=2, memory_modules=True, use_memory=use_memory)
        with torch.no_grad():
            diff = (model(ids).logits[:, -1] - model(changed).logits[:, -1]).abs().max().item()
        # 2 layers x window 2: without memory the last position sees only the last 3 tokens.
        assert (diff > 1e-4) if use_memory else (diff == 0.0)


def test_gate_entropy_equals_entropy_of_recorded_gates():
    model = make_model("memory")
    gates = []
    hooks = [layer.self_attn.memory.out_gate.register_forward_hook(lambda m, i, o: gates.append(torch.sigmoid(o)))
             for layer in model.model.layers]
    with torch.no_grad():
        out = model(token_ids())
    for hook in hooks:
        hook.remove()
    g = torch.cat([t.flatten() for t in gates])
    expected = -(g * g.log() + (1 - g) * (1 - g).log()).mean()
    assert len(gates) == LAYERS * 4  # 2 cycles x (1 latent + 1 answer) calls per layer
    assert abs(out.gate_entropy.item() - expected.item()) < 1e-5


# ------------------------------------------------------------------------------------------- causality and cache

@pytest.mark.parametrize("mode", list(MODES))
def test_strictly_causal(mode):
    model = make_model(mode)
    ids = token_ids(length=14)
    changed = ids.clone()
    changed[:, 7] = (ids[:, 7] % (VOCAB - 1)) + 1
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert (a.logits[:, :7] - b.logits[:, :7]).abs().max() <= 1e-6
    assert torch.equal(a.act_cycles[:, :7], b.act_cycles[:, :7])
    assert (a.logits[:, 7:] - b.logits[:, 7:]).abs().max() > 1e-4  # the change does reach later positions


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_generate_with_cache_equals_without(mode):
    model = make_model(mode)
    prompt = token_ids(length=7)
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, uncached)
    if mode in DECISIVE_ACT:  # the test really exercised per-token freezing
        with torch.no_grad():
            cycles = model(cached).act_cycles
        assert cycles.min() < model.config.n_cycles and cycles.max() > 1


def test_cached_forward_equals_full_forward_step_by_step():
    model = make_model("all")
    ids = token_ids(length=12)
    with torch.no_grad():
        full = model(ids, use_cache=False)
        cache = fm.CognateCache(model.config)
        steps = [model(ids[:, :5], cache=cache, use_cache=True)]
        steps += [model(ids[:, t:t + 1], cache=cache, use_cache=True) for t in range(5, 12)]
    logits = torch.cat([s.logits for s in steps], dim=1)
    assert (logits - full.logits).abs().max() <= 1e-5
    assert torch.equal(torch.cat([s.act_cycles for s in steps], dim=1), full.act_cycles)
    assert len(cache.layers) == 3 * 2 * LAYERS and len(cache.memory) == 3 * 2 * LAYERS  # virtual layers


def test_sampling_generate_is_reproducible_and_cache_independent():
    model = make_model("memory")
    prompt = token_ids(length=5)
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        outputs.append(model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=0, use_cache=use_cache))
    assert torch.equal(outputs[0], outputs[1])
    assert outputs[0].shape == (2, 13) and int(outputs[0].max()) < VOCAB


def test_left_padded_batch_generates_like_single_prompts():
    model = make_model("all")
    long_prompt, short_prompt = token_ids(1, 9, seed=3), token_ids(1, 5, seed=4)
    batch = torch.cat([long_prompt, F.pad(short_prompt, (4, 0), value=0)])
    mask = torch.cat([torch.ones(1, 9), F.pad(torch.ones(1, 5), (4, 0))]).long()
    together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    alone = [model.generate(p, max_new_tokens=6, do_sample=False) for p in (long_prompt, short_prompt)]
    assert torch.equal(together[0, 9:], alone[0][0, 9:])
    assert torch.equal(together[1, 9:], alone[1][0, 5:])


def test_cache_misuse_is_refused():
    model = make_model("memory")
    ids = token_ids(length=6)
    with pytest.raises(ValueError, match="CognateCache"):
        model(ids, cache=DynamicCache(), use_cache=True)
    cache = fm.CognateCache(model.config)
    model(ids, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="n_cycles"):
        model(ids[:, :1], cache=cache, use_cache=True, n_cycles=3)


# ----------------------------------------------------------------------------------------------- QK-max tracking

def rope(t, positions, theta=10000.0):
    """Rotary embedding by its formula: pair channel i with i + d/2, rotate by position * theta^(-2i/d)."""
    d = t.shape[-1]
    angle = positions[:, None].double() * theta ** (-torch.arange(0, d, 2).double() / d)  # (T, d/2)
    cos, sin = angle.cos().float(), angle.sin().float()
    first, second = t[..., : d // 2], t[..., d // 2:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


@pytest.mark.parametrize("padded", [False, True])
def test_qk_max_logits_equal_brute_force(padded, monkeypatch):
    monkeypatch.setattr(modeling_cognate, "QK_TRACK_BLOCK_ELEMENTS", 100)  # also exercise the sliced reduction
    model = make_model("recursion", sliding_window=3)
    records = {i: ([], []) for i in range(LAYERS)}
    hooks = []
    for i, attn in enumerate(model.attention_modules()):
        hooks.append(attn.q_proj.register_forward_hook(lambda m, a, o, i=i: records[i][0].append(o)))
        hooks.append(attn.k_proj.register_forward_hook(lambda m, a, o, i=i: records[i][1].append(o)))
    ids = token_ids(length=8)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0  # left padding: padded keys and padded queries are not looked at
    model.train()  # tracked in training forwards (eval under no_grad skips it)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    d, groups = HIDDEN // HEADS, HEADS // KV_HEADS
    positions = torch.arange(8)
    for i, attn in enumerate(model.attention_modules()):
        best = torch.full((HEADS,), -math.inf)
        for q, k in zip(*records[i]):  # one pair per recursion call
            q, k = rope(q.view(2, 8, HEADS, d), positions[:, None]), rope(k.view(2, 8, KV_HEADS, d), positions[:, None])
            for b, h, qi in itertools.product(range(2), range(HEADS), range(8)):
                for ki in range(max(0, qi - 2), qi + 1):  # causal, window 3
                    if mask[b, qi] and mask[b, ki]:
                        best[h] = max(best[h], (q[b, qi, h] * k[b, ki, h // groups]).sum() / math.sqrt(d))
        assert len(records[i][0]) == 6  # 2 cycles x (2 latent + 1 answer) calls
        assert torch.allclose(attn.qk_max_logits, best, atol=1e-5)


def test_qk_max_logits_reset_each_forward_and_switchable():
    model = make_model("plain").train()
    with torch.no_grad():
        model(token_ids(length=12) * 0 + 5)
        first = model.attention_modules()[0].qk_max_logits.clone()
        model(token_ids(length=12))
    assert not torch.equal(first, model.attention_modules()[0].qk_max_logits)
    off = make_model("plain", track_qk_logits=False)
    off(token_ids())
    assert all(attn.qk_max_logits is None for attn in off.attention_modules())
    model.eval()
    with torch.no_grad():  # inference (generation, scoring) skips the tracking
        model(token_ids())
    assert all(attn.qk_max_logits is None for attn in model.attention_modules())


# ------------------------------------------------------------------------------------------------ peft and saving

def test_peft_lora_trains_and_merges_to_same_logits():
    from peft import LoraConfig, get_peft_model

    model = make_model("recursion").train()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=["q_proj", "v_proj"]))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and ("q_proj" in name or "v_proj" in name) for name in trainable)
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=3e-2)
    ids = token_ids(4, 12)
    losses = []
    for _ in range(8):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
        assert type(merged) is fm.CognateForCausalLM
        assert (merged(input_ids=ids).logits - adapted).abs().max() <= 1e-5


@pytest.mark.parametrize("mode, tied", [("plain", False), ("all", True)])
def test_save_and_load_roundtrip(tmp_path, mode, tied):
    model = make_model(mode, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "cognate"
    ids = token_ids()
    with torch.no_grad():
        expected = model(ids).logits
        for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path), load_causal_lm(tmp_path),
                       fm.load_cognate(tmp_path)):
            assert type(loaded) is fm.CognateForCausalLM
            assert torch.equal(loaded(ids).logits, expected)


def test_loading_other_architectures(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path)
    assert type(load_causal_lm(tmp_path)) is LlamaForCausalLM
    with pytest.raises(fm.ModelLoadError, match="llama"):
        fm.load_cognate(tmp_path)
    with pytest.raises(ValueError, match="llama"):
        fm.CognateForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(fm.ModelLoadError, match="does not exist"):
        load_causal_lm(tmp_path / "missing")
    converted = fm.cognate_from_llama(tmp_path)
    with torch.no_grad():
        assert (converted(token_ids()).logits - tiny_llama(token_ids()).logits).abs().max() <= 1e-5


def test_bad_forward_arguments_are_refused():
    model = make_model("plain")
    ids = token_ids()
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(TypeError, match="n_cycle"):
        model(ids, n_cycle=2)
    with pytest.raises(ValueError, match="memory_modules"):
        model(ids, use_memory=True)


def test_halting_learns_on_prompt_tokens_too():
    """Halting freezes prompt states as well as written ones, so the halting BCE covers every non-padding
    position: labels where given, the input token itself under an answer-only loss, padding never."""
    import torch.nn.functional as F

    from forgelib.models import CognateConfig, CognateForCausalLM
    from forgelib.models.modeling_cognate import _halt_targets

    ids = torch.tensor([[5, 6, 7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, -100, -100]])  # answer-only: the prompt is not scored
    assert _halt_targets(labels, ids, mask).tolist() == [[5, 6, 7, 8, -100, -100]]
    assert _halt_targets(labels, None, None) is labels

    torch.manual_seed(0)
    model = CognateForCausalLM(CognateConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, n_cycles=2, n_latent=0,
                                             use_act=True, max_position_embeddings=32)).eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        # reference: the BCE over positions 0..2 (each predicts the next input token), every cycle
        inner = model.model(input_ids=ids, attention_mask=mask, collect_cycles=True)
        logits = [model.lm_head(s) for s in inner.cycle_states]
        nxt = ids[:, 1:4]
        correct = torch.stack([lg[:, :3].argmax(-1) == nxt for lg in logits], -1).float()
        halt = inner.halt_logits[:, :3]  # (B, T, cycles)
        want = F.binary_cross_entropy_with_logits(halt, correct)
    assert torch.allclose(out.act_loss, want, atol=1e-6)
    # with one cycle nothing is ever frozen: the BCE stays on the labelled tokens (positions 1, 2 predict 7, 8)
    model.config.n_cycles = 1
    with torch.no_grad():
        one = model(input_ids=ids, attention_mask=mask, labels=labels)
        inner = model.model(input_ids=ids, attention_mask=mask, collect_cycles=True, n_cycles=1)
        right = (model.lm_head(inner.cycle_states[0])[:, 1:3].argmax(-1) == torch.tensor([[7, 8]])).float()
        want = F.binary_cross_entropy_with_logits(inner.halt_logits[:, 1:3, 0], right)
    assert torch.allclose(one.act_loss, want, atol=1e-6)
