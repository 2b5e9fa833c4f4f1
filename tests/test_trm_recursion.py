"""Cognate's opt-in TRM recursion (recursion="trm", forgelib.models.trm) against a hand-written reference: the block
stack written out in plain torch from the model's own weights, TRM's loops written out (latent updates with input
injection, no-gradient cycles, supervision steps with a detached carry, per-token halting), its losses, the halting
target on a worked example, cached generation, the training wrapper (forgelib.supervision), and the default mode
left as it was."""
import copy

import pytest
import torch
import torch.nn.functional as F

import forgelib.models as fm
from forgelib.models.trm import TRMCarry, halt_correct
from forgelib.supervision import SupervisionSteps
from forgelib.train import TrainConfig, train

VOCAB, HIDDEN, HEADS, KV_HEADS, LAYERS = 64, 32, 4, 2, 2
TRM = dict(recursion="trm", n_latent=2, n_cycles=2, supervision_steps=3, halt_exploration_prob=0.0)


def make_model(decisive: bool = True, seed: int = 0, **overrides) -> fm.CognateForCausalLM:
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                  pad_token_id=0, eos_token_id=None, bos_token_id=None, **TRM)
    model = fm.CognateForCausalLM(fm.CognateConfig(**{**fields, **overrides})).eval()
    if decisive:  # halting logits a few units either side of 0: tokens halt after different steps
        with torch.no_grad():
            model.model.halt_head.weight.mul_(40.0)
            model.model.halt_head.bias.zero_()
    return model


def token_ids(batch=2, length=12, seed=1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ the reference: plain torch, loops written out

def rms(h, weight, eps):
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotary(T, d, theta):
    """cos, sin (T, d) of Llama's default RoPE, in float32 as transformers computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = torch.arange(T).float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate(t, cos, sin):
    half = t.shape[-1] // 2
    return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin


def block(layer, h, cfg, cos, sin):
    """One pre-norm Llama block from the layer's weights: grouped-query causal attention with RoPE, then SwiGLU."""
    B, T, _ = h.shape
    d, attn = cfg.head_dim, layer.self_attn
    a = rms(h, layer.input_layernorm.weight, cfg.rms_norm_eps)
    q = (a @ attn.q_proj.weight.T).view(B, T, cfg.num_attention_heads, d).transpose(1, 2)
    k = (a @ attn.k_proj.weight.T).view(B, T, cfg.num_key_value_heads, d).transpose(1, 2)
    v = (a @ attn.v_proj.weight.T).view(B, T, cfg.num_key_value_heads, d).transpose(1, 2)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) / d ** 0.5
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    out = scores.masked_fill(future, float("-inf")).softmax(-1) @ v  # (B, H, T, d)
    h = h + out.transpose(1, 2).reshape(B, T, -1) @ attn.o_proj.weight.T
    m = rms(h, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
    mlp = layer.mlp
    return h + (F.silu(m @ mlp.gate_proj.weight.T) * (m @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


def reference_trm(model, ids, *, grad_last=True, detach=True, last_cycle_layers=None):
    """TRM's supervision steps written out: per step the normalised answer states, logits, halting logits and the
    tokens it updated, and the steps each token ran. ``last_cycle_layers``: layers for the last cycle of each step
    (the others use the model's)."""
    cfg, inner = model.config, model.model
    cos, sin = rotary(ids.shape[1], cfg.head_dim, cfg.rope_parameters["rope_theta"])
    cos, sin = cos.to(inner.embed_tokens.weight.dtype), sin.to(inner.embed_tokens.weight.dtype)

    def net(h, layers):
        for layer in layers:
            h = block(layer, h, cfg, cos, sin)
        return h

    x = inner.embed_tokens.weight[ids]
    y, z = x, torch.zeros_like(x)
    halted = torch.zeros(ids.shape, dtype=torch.bool)
    used = torch.zeros(ids.shape, dtype=torch.long)
    states, logits, halts, active = [], [], [], []
    for step in range(cfg.supervision_steps):
        keep = halted[..., None]
        for cycle in range(cfg.n_cycles):
            last = cycle == cfg.n_cycles - 1
            layers = last_cycle_layers if (last and last_cycle_layers is not None) else inner.layers
            with torch.set_grad_enabled(torch.is_grad_enabled() and (last or not grad_last)):
                for _ in range(cfg.n_latent):
                    z = torch.where(keep, z, net(z + y + x, layers))
                y = torch.where(keep, y, net(y + z, layers))
        state = rms(y, inner.norm.weight, cfg.rms_norm_eps)
        halt = state @ inner.halt_head.weight[0] + inner.halt_head.bias[0]
        states.append(state)
        logits.append(state @ model.lm_head.weight.T)
        halts.append(halt)
        active.append(~halted)
        used = torch.where(halted, used, torch.full_like(used, step + 1))
        halted = halted | (torch.sigmoid(halt.detach()) >= cfg.halt_threshold)
        if detach:
            y, z = y.detach(), z.detach()
    return states, logits, halts, active, used


def reference_loss(model, ids, labels, logits, halts, active):
    """Mean over steps of the step's CE on the supervised tokens it updated plus act_loss_weight times the halting BCE
    on the real tokens it updated (target: argmax == next token; prompt tokens are judged on the next input token)."""
    judged = torch.where(labels != -100, labels, ids)[:, 1:]
    targets = labels[:, 1:]
    total = 0.0
    for lg, hl, act in zip(logits, halts, active):
        ce_tokens, bce_tokens = [], []
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1] - 1):
                if not act[b, t]:
                    continue
                if targets[b, t] != -100:
                    ce_tokens.append(-lg[b, t].log_softmax(-1)[targets[b, t]])
                right = float(lg[b, t].argmax() == judged[b, t])
                p = torch.sigmoid(hl[b, t])
                bce_tokens.append(-(right * torch.log(p) + (1 - right) * torch.log(1 - p)))
        ce = torch.stack(ce_tokens).mean() if ce_tokens else torch.zeros(())
        bce = torch.stack(bce_tokens).mean() if bce_tokens else torch.zeros(())
        total = total + ce + model.config.act_loss_weight * bce
    return total / len(logits)


def labelled(ids):
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt of 5 tokens
    return labels


# ------------------------------------------------------------------------------------------------------- the step

def test_supervision_steps_equal_written_out_reference():
    model = make_model().double()
    ids = token_ids()
    labels = labelled(ids)
    with torch.no_grad():
        out = model(ids, labels=labels)
        inner = model.model(ids, collect_cycles=True)
        states, logits, halts, active, used = reference_trm(model, ids)
    assert len(out.cycle_losses) == 3
    assert (out.logits - logits[-1]).abs().max() <= 1e-6
    assert max((a - b).abs().max() for a, b in zip(inner.cycle_states, states)) <= 1e-6
    assert (inner.halt_logits - torch.stack(halts, -1)).abs().max() <= 1e-6
    assert all(torch.equal(a, b) for a, b in zip(inner.step_active, active))
    assert torch.equal(out.act_cycles, used)
    assert 1.0 < out.act_cycles.float().mean() < 3.0  # some tokens halted early, some ran every step
    assert abs(out.loss.item() - reference_loss(model, ids, labels, logits, halts, active).item()) <= 1e-6
    with torch.no_grad():  # one step of one cycle, checked on its own too
        one = model(ids, supervision_steps=1, n_cycles=1)
        model.config.supervision_steps, model.config.n_cycles = 1, 1
        ref = reference_trm(model, ids)
    assert (one.logits - ref[1][0]).abs().max() <= 1e-6


def test_only_the_last_cycle_of_each_step_carries_gradient():
    model = make_model().double().train()
    ids = token_ids()
    labels = labelled(ids)
    model(ids, labels=labels).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # the reference: the last cycle of each step runs on the model's layers, the earlier (no-gradient) ones on a copy
    copied = copy.deepcopy(model.model.layers)
    model.model.layers, originals = copied, model.model.layers
    _, logits, halts, active, _ = reference_trm(model, ids, last_cycle_layers=originals)
    reference_loss(model, ids, labels, logits, halts, active).backward()
    model.model.layers = originals
    assert all(p.grad is None for p in copied.parameters())  # used only in no-gradient cycles: no gradient at all
    for name, p in model.named_parameters():
        assert (p.grad - grads[name]).abs().max() <= 1e-6 * max(1.0, grads[name].abs().max().item()), name
    model.zero_grad()  # with gradient through every cycle the gradients differ: the test can tell
    _, logits, halts, active, _ = reference_trm(model, ids, grad_last=False)
    reference_loss(model, ids, labels, logits, halts, active).backward()
    assert (model.model.layers[0].mlp.up_proj.weight.grad - grads["model.layers.0.mlp.up_proj.weight"]).abs().max() \
        > 1e-4


def test_carry_is_detached_between_supervision_steps():
    # gradient through every cycle: else the first cycle of a step (no gradient) would cut the carry's graph anyway
    model = make_model(grad_last_cycle_only=False).double().train()
    ids = token_ids()
    labels = labelled(ids)
    out = model(ids, labels=labels)
    assert not out.trm_carry.y.requires_grad and not out.trm_carry.z.requires_grad
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    for detach, same in ((True, True), (False, False)):
        model.zero_grad()
        _, logits, halts, active, _ = reference_trm(model, ids, grad_last=False, detach=detach)
        reference_loss(model, ids, labels, logits, halts, active).backward()
        diff = max((p.grad - grads[name]).abs().max().item() for name, p in model.named_parameters())
        assert (diff <= 1e-6) == same, (detach, diff)
    # one step per call from the returned carry gives the same steps as one forward over all of them
    model.zero_grad()
    carry, losses = TRMCarry(3), []
    for _ in range(3):
        step = model(ids, labels=labels, trm_carry=carry, supervision_steps=1)
        carry = step.trm_carry
        losses.append(step.loss)
    (sum(losses) / 3).backward()
    assert carry.steps == 3 and torch.equal(carry.used, out.act_cycles)
    for name, p in model.named_parameters():
        assert (p.grad - grads[name]).abs().max() <= 1e-9, name


def test_halting_target_worked_example():
    """Per token: does this step's greedy token equal the next token (labels where given, else the next input token)?
    Sequence 5 9 2 7 | 4 6 with the answer 4 6 (labels -100 on the prompt); argmax 9 3 7 4 6 1 at positions 0..5."""
    ids = torch.tensor([[5, 9, 2, 7, 4, 6]])
    labels = torch.tensor([[-100, -100, -100, -100, 4, 6]])
    logits = F.one_hot(torch.tensor([[9, 3, 7, 4, 6, 1]]), VOCAB).float()
    judged = torch.where(labels != -100, labels, ids)[:, 1:]  # 9 2 7 4 6
    assert halt_correct(logits, judged).tolist() == [[True, False, True, True, True]]
    assert halt_correct(logits, labels[:, 1:]).tolist()[0][3:] == [True, True]  # the answer tokens are both right
    model = make_model(decisive=False).double()
    with torch.no_grad():
        out = model(ids, labels=labels)
    _, lg, halts, active, _ = reference_trm(model, ids)
    assert abs(out.loss.item() - reference_loss(model, ids, labels, lg, halts, active).item()) <= 1e-6


# ------------------------------------------------------------------------------------------------ inference & cache

def test_cached_generation_equals_uncached():
    model = make_model()
    prompt = token_ids(length=6)
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        full = model(cached)
        cache = fm.CognateCache(model.config)
        parts = [model(cached[:, :6], cache=cache, use_cache=True)]
        parts += [model(cached[:, t:t + 1], cache=cache, use_cache=True) for t in range(6, cached.shape[1])]
    assert 1 <= full.act_cycles.min() < full.act_cycles.max() <= 3  # per-token halting really happened
    assert torch.equal(torch.cat([p.act_cycles for p in parts], 1), full.act_cycles)
    assert (torch.cat([p.logits for p in parts], 1) - full.logits).abs().max() <= 1e-5
    assert len(cache.layers) == 3 * 2 * 3 * LAYERS  # steps x cycles x (latent + answer) calls per layer
    with pytest.raises(ValueError, match="cache"):
        model(prompt[:, :1], cache=cache, use_cache=True, supervision_steps=2)
    with torch.no_grad():  # act_freeze=False: every step for every token (what TRM's evaluation runs)
        assert model(cached, act_freeze=False).act_cycles.eq(3).all()


# ------------------------------------------------------------------------------------ configuration & default mode

@pytest.mark.parametrize("field, value", [("recursion", "loop"), ("supervision_steps", 0),
                                          ("halt_exploration_prob", 1.5), ("n_latent", 0)])
def test_impossible_trm_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        make_model(**{field: value})


def test_default_mode_is_unchanged_by_the_trm_settings():
    assert fm.CognateConfig().recursion == "cycles"
    base = dict(recursion="cycles", n_latent=1, n_cycles=2)
    plain = make_model(decisive=False, **base)
    other = make_model(decisive=False, **base, supervision_steps=5, grad_last_cycle_only=False,
                       halt_exploration_prob=0.7)
    ids = token_ids()
    a, b = plain.train()(ids, labels=ids), other.train()(ids, labels=ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss) and a.trm_carry is None
    with pytest.raises(ValueError, match="supervision_steps"):
        plain(ids, supervision_steps=2)


# ------------------------------------------------------------------------------------- one optimizer step per step

def test_supervision_steps_wrapper_steps_the_optimizer_per_supervision_step():
    model = make_model(decisive=False).train()
    batches = [{"input_ids": token_ids(seed=s), "labels": labelled(token_ids(seed=s))} for s in range(4)]
    sup = SupervisionSteps(2)
    seen, params = [], []
    hook = sup.loss

    def loss(model, batch):
        seen.append((next(i for i, b in enumerate(batches) if torch.equal(b["input_ids"], batch["input_ids"])),
                     sup.carry.steps if sup.carry is not None else 0))
        params.append(model.lm_head.weight.detach().clone())
        return hook(model, batch)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = train(model, sup.batches(iter(batches)), optimizer, TrainConfig(steps=5, log_every=1), loss_fn=loss,
                    quiet=True)
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]  # each batch twice, the carry continued
    assert sup.episodes == 3 and len(history.losses) == 5
    assert not torch.equal(params[0], params[1])  # the optimizer stepped between a batch's two supervision steps
    assert history.rows[1]["train/supervision_step"] == 2.0
    # every supervised token halted after the first step: the batch is done early, the next one comes
    with torch.no_grad():
        model.model.halt_head.bias.fill_(30.0)
    early = SupervisionSteps(4)
    source = early.batches(iter(batches))
    first = next(source)
    early.loss(model, first)
    assert next(source) is batches[1] and early.episodes == 1


def test_trm_model_saves_and_loads(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    loaded = fm.CognateForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.recursion == "trm" and loaded.config.supervision_steps == 3
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
