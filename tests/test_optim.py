"""MuGrokfast (forgelib.optim) against independent references: torch.optim.Muon / AdamW, the scalar
Newton–Schulz polynomial, closed-form EMAs, brute-force attention logits and explicit KL sums."""
import copy
import json
import io
import math

import pytest
import torch
from torch import nn

from forgelib.optim import (
    PRESETS, MuGrokfastConfig, MuonGrokfast, OptimConfigError, ReferenceKL, attach_qk_logit_monitor,
    create_optimizer_from_phase, grokfast_ema, grokfast_ma, kl_divergence, muon_lr_scale, newton_schulz,
    preset_config, resolve_ns_dtype, split_parameters,
)
from forgelib.optim.newton_schulz import NS_COEFFICIENTS

NO_FILTER = dict(grokfast_lambda=0.0, qk_clip_tau=None)


def _scalar_ns(s: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic polynomial applied to singular values one by one (float64 reference)."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return s


# --- Newton–Schulz ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(192, 192), (384, 96), (96, 384), (24, 24), (17, 50), (64, 8)])
def test_newton_schulz_acts_as_scalar_polynomial_and_lands_in_band(shape):
    torch.manual_seed(1)
    g = torch.randn(*shape, dtype=torch.float64)
    out = newton_schulz(g.float(), dtype=torch.float32).double()
    assert out.shape == g.shape and out.dtype == torch.float64
    s_in = torch.linalg.svdvals(g) / g.norm()  # singular values after the Frobenius normalization
    expected = _scalar_ns(s_in)
    s_out = torch.linalg.svdvals(out)
    # Same multiset of singular values as the scalar iteration (sorting both: p^5 is not monotone).
    assert torch.allclose(s_out.sort().values, expected.sort().values, atol=2e-3)
    # The iteration's band: every singular value above 0.002 of the norm maps into about [0.68, 1.21].
    in_band = expected[s_in >= 2e-3]
    assert in_band.numel() >= 0.9 * s_in.numel()
    assert in_band.min() > 0.67 and in_band.max() < 1.21
    big = s_out.sort().values[-in_band.numel():]
    assert big.min() > 0.66 and big.max() < 1.22
    # The singular vectors are the input's: out = U p(S) V^T, so out^T g is symmetric positive semidefinite.
    sym = out.T @ g if shape[0] >= shape[1] else g @ out.T
    assert torch.allclose(sym, sym.T, atol=1e-3 * sym.abs().max())


def test_newton_schulz_bf16_band_and_errors():
    torch.manual_seed(2)
    out = newton_schulz(torch.randn(200, 60), dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    s = torch.linalg.svdvals(out.float())
    assert s.min() > 0.6 and s.max() < 1.3
    with pytest.raises(ValueError, match="2-D"):
        newton_schulz(torch.randn(2, 3, 4, 5))
    assert resolve_ns_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_ns_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="ns_dtype"):
        resolve_ns_dtype("int8", torch.device("cpu"))


@pytest.mark.parametrize("shape", [(3, 48, 16), (2, 16, 48)])
def test_newton_schulz_on_a_stack_equals_each_matrix_alone(shape):
    torch.manual_seed(5)
    stack = torch.randn(*shape) * torch.tensor([0.1, 1.0, 30.0][:shape[0]]).view(-1, 1, 1)  # own norms
    out = newton_schulz(stack)
    for matrix, result in zip(stack, out):
        torch.testing.assert_close(result, newton_schulz(matrix), rtol=1e-5, atol=1e-6)


def test_muon_group_with_same_shaped_matrices_equals_one_matrix_at_a_time():
    """Same-shaped matrices go through Newton-Schulz as one stack; each must end where it would alone."""
    shapes = [(32, 16), (32, 16), (16, 32), (32, 16)]
    torch.manual_seed(6)
    init = [torch.randn(*s) for s in shapes]
    grad_seq = _grads(shapes, 3)
    cfg = MuGrokfastConfig(lr=0.02, weight_decay=0.1, momentum=0.9, ns_dtype="float32", grokfast_filter="ema",
                           grokfast_lambda=2.0)
    together = [nn.Parameter(t.clone()) for t in init]
    opt = MuonGrokfast([{"params": together, "use_muon": True}], cfg)
    opt.stack_shapes = True  # the GPU's way (the default on CUDA), here on the CPU
    _run(opt, together, grad_seq)
    for i, start in enumerate(init):
        alone = [nn.Parameter(start.clone())]
        _run(MuonGrokfast([{"params": alone, "use_muon": True}], cfg), alone, [[g[i]] for g in grad_seq])
        torch.testing.assert_close(together[i], alone[0], rtol=1e-5, atol=1e-6)
        assert (together[i] - start).abs().max() > 0.01


# --- Muon against torch.optim.Muon ------------------------------------------------------------------

def _grads(shapes, steps, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(*s, generator=gen) for s in shapes] for _ in range(steps)]


def _run(opt, params, grad_seq):
    for grads in grad_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("rule", ["original", "match_rms_adamw"])
def test_muon_group_equals_torch_muon(rule):
    shapes = [(48, 16), (16, 48), (32, 32)]
    torch.manual_seed(4)
    init = [torch.randn(*s) for s in shapes]
    grad_seq = _grads(shapes, 4)
    ref = [nn.Parameter(t.clone()) for t in init]
    _run(torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn=rule), ref, grad_seq)
    for dtype, atol in (("bfloat16", 0.0), ("float32", 0.02 * 0.05)):
        ours = [nn.Parameter(t.clone()) for t in init]
        cfg = MuGrokfastConfig(lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn=rule,
                               ns_dtype=dtype, grokfast_filter="ema", **NO_FILTER)
        _run(MuonGrokfast([{"params": ours, "use_muon": True}], cfg), ours, grad_seq)
        for a, b, start in zip(ours, ref, init):
            # bf16: the same operations in the same order as torch's; fp32: within bf16's rounding.
            assert torch.allclose(a, b, atol=atol or 1e-6, rtol=0), dtype
            assert (a - start).abs().max() > 0.01  # the update is real, not a no-op


def test_muon_lr_scale_rules_match_torch():
    from torch.optim._muon import _adjust_lr  # the library's own rule, as an oracle
    for shape in [(64, 16), (16, 64), (40, 40)]:
        for rule in ("original", "match_rms_adamw"):
            assert math.isclose(muon_lr_scale(shape, rule), _adjust_lr(1.0, rule, torch.Size(shape)))


# --- AdamW ---------------------------------------------------------------------------------------------

def test_first_adamw_step_is_lr_per_element_not_sgd():
    lr = 1e-2
    p = nn.Parameter(torch.zeros(6))
    grad = torch.tensor([1e-3, -1e-2, 0.5, -3.0, 40.0, -1e3])
    p.grad = grad.clone()
    MuonGrokfast([{"params": [p], "use_muon": False}], MuGrokfastConfig(lr=lr, **NO_FILTER)).step()
    # Adam normalizes: the first step is -lr*sign(g) whatever |g| is; SGD would step by -lr*g.
    assert torch.allclose(p.detach(), -lr * grad.sign(), rtol=1e-4)
    assert not torch.allclose(p.detach(), -lr * grad, rtol=0.1)


def test_adamw_group_equals_torch_adamw_over_steps():
    shapes = [(7,), (5, 3), (2, 3, 4)]
    torch.manual_seed(5)
    init = [torch.randn(*s) for s in shapes]
    grad_seq = _grads(shapes, 5)
    ref = [nn.Parameter(t.clone()) for t in init]
    _run(torch.optim.AdamW(ref, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2), ref, grad_seq)
    ours = [nn.Parameter(t.clone()) for t in init]
    cfg = MuGrokfastConfig(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2, **NO_FILTER)
    _run(MuonGrokfast([{"params": ours, "use_muon": False}], cfg), ours, grad_seq)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-7)


def test_muon_off_puts_every_parameter_in_one_adamw_group_that_equals_torch_adamw(tiny_llama):
    """``muon: false`` (large models on a CPU): no Muon group; the model's steps are torch's AdamW's."""
    ref_model = copy.deepcopy(tiny_llama)
    cfg = MuGrokfastConfig(lr=2e-3, muon=False, weight_decay=0.1, **NO_FILTER)
    opt = MuonGrokfast.from_model(tiny_llama, cfg)
    assert [g["use_muon"] for g in opt.param_groups] == [False]
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in tiny_llama.parameters()}
    ref = torch.optim.AdamW(ref_model.parameters(), lr=2e-3, betas=cfg.betas, eps=cfg.eps, weight_decay=0.1)
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 6))
    for model, optimizer in ((tiny_llama, opt), (ref_model, ref)):
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(tiny_llama.parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(OptimConfigError, match="unknown"):
        MuGrokfastConfig().replace(use_muon=False)


# --- Grokfast ----------------------------------------------------------------------------------------

def _closed_form_ema(grads, alpha):
    """mu_t = alpha^(t-1) g_1 + sum_{s=2..t} (1-alpha) alpha^(t-s) g_s (mu_1 = g_1)."""
    out = []
    for t in range(1, len(grads) + 1):
        mu = alpha ** (t - 1) * grads[0]
        for s in range(2, t + 1):
            mu = mu + (1 - alpha) * alpha ** (t - s) * grads[s - 1]
        out.append(mu)
    return out


def test_grokfast_ema_equals_closed_form():
    grads = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5]), torch.tensor([-1.0, 4.0]),
             torch.tensor([0.0, 1.0])]
    alpha, lamb = 0.9, 2.0
    state = {}
    filtered = [grokfast_ema(g, state, alpha, lamb) for g in grads]
    for f, g, mu in zip(filtered, grads, _closed_form_ema(grads, alpha)):
        assert torch.allclose(f, g + lamb * mu, atol=1e-6)
    # Hand-computed second step: mu = 0.9*[1,-2] + 0.1*[3,0.5] = [1.2,-1.75]; g + 2 mu = [5.4,-3.0].
    assert torch.allclose(filtered[1], torch.tensor([5.4, -3.0]), atol=1e-6)


def test_grokfast_inside_optimizer_equals_adamw_on_closed_form_filtered_grads():
    torch.manual_seed(6)
    init = torch.randn(5)
    grad_seq = [[g] for g in (torch.randn(5) for _ in range(6))]
    alpha, lamb = 0.8, 1.5
    mus = _closed_form_ema([g[0] for g in grad_seq], alpha)
    ref = nn.Parameter(init.clone())
    _run(torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.98), weight_decay=0.0), [ref],
         [[g[0] + lamb * mu] for g, mu in zip(grad_seq, mus)])
    ours = nn.Parameter(init.clone())
    cfg = MuGrokfastConfig(lr=1e-2, grokfast_alpha=alpha, grokfast_lambda=lamb, qk_clip_tau=None)
    opt = MuonGrokfast([{"params": [ours], "use_muon": False}], cfg)
    _run(opt, [ours], grad_seq)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(opt.state[ours]["grokfast_ema"], mus[-1], atol=1e-6)


def test_grokfast_ma_is_windowed_mean_after_warmup():
    grads = [torch.tensor([float(i), -float(i * i)]) for i in range(1, 8)]
    state, window, lamb = {}, 3, 0.5
    for t, g in enumerate(grads):
        out = grokfast_ma(g, state, window, lamb)
        if t + 1 < window:
            assert torch.equal(out, g)
        else:
            mean = torch.stack(grads[t + 1 - window:t + 1]).mean(0)
            assert torch.allclose(out, g + lamb * mean)


def test_lambda_zero_equals_no_filter_for_both_groups():
    shapes = [(12, 8), (8,)]
    torch.manual_seed(7)
    init = [torch.randn(*s) for s in shapes]
    grad_seq = _grads(shapes, 4)
    results = []
    for filt in ("none", "ema", "ma"):
        ps = [nn.Parameter(t.clone()) for t in init]
        cfg = MuGrokfastConfig(grokfast_filter=filt, grokfast_lambda=0.0, grokfast_window=2,
                               qk_clip_tau=None)
        _run(MuonGrokfast([{"params": [ps[0]], "use_muon": True}, {"params": [ps[1]], "use_muon": False}],
                          cfg), ps, grad_seq)
        results.append(ps)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_grokfast_scope_restricts_the_filter():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = MuonGrokfast.from_model(model, MuGrokfastConfig(grokfast_lambda=1.0, grokfast_scope="adamw",
                                                          qk_clip_tau=None))
    lambdas = {g["use_muon"]: g["grokfast_lambda"] for g in opt.param_groups}
    assert lambdas == {True: 0.0, False: 1.0}


# --- parameter split, presets, config errors ------------------------------------------------------------

def test_split_parameters_on_llama(tiny_llama):
    muon, adamw = split_parameters(tiny_llama)
    muon_names = {n for n, _ in muon}
    adamw_names = {n for n, _ in adamw}
    assert all(p.ndim == 2 for _, p in muon)
    assert "model.embed_tokens.weight" in adamw_names and "lm_head.weight" in adamw_names
    assert any("norm" in n for n in adamw_names)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert {f"model.layers.0.self_attn.{proj}.weight", f"model.layers.0.mlp.{proj}.weight"} & muon_names
    assert len(muon) + len(adamw) == len(list(tiny_llama.parameters()))


def test_split_parameters_without_hf_helpers():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, 6)
            self.pos = nn.Embedding(4, 6)
            self.hidden = nn.Linear(6, 6)
            self.lm_head = nn.Linear(6, 10, bias=False)

    muon, adamw = split_parameters(Plain())
    assert [n for n, _ in muon] == ["hidden.weight"]
    assert {n for n, _ in adamw} == {"tok.weight", "pos.weight", "hidden.bias", "lm_head.weight"}


@pytest.mark.parametrize("phase,lr,lamb,tau,kl,ste", [
    (1, 1e-3, 0.3, 30.0, 0.0, False), (3, 5e-4, 0.1, 25.0, 0.1, False), (4, 3e-3, 0.0, 30.0, 0.0, True),
    (5, 1e-3, 2.0, 30.0, 0.0, True),
    (6, 1e-4, 0.2, 30.0, 0.0, False), (7, 5e-4, 0.15, 28.0, 0.05, False)])
def test_presets_carry_the_phase_numbers(phase, lr, lamb, tau, kl, ste):
    cfg = PRESETS[phase]
    assert (cfg.lr, cfg.grokfast_lambda, cfg.qk_clip_tau, cfg.kl_weight, cfg.ste_mode) == (lr, lamb, tau, kl, ste)


def test_create_optimizer_overrides_and_errors(tiny_llama):
    opt = create_optimizer_from_phase(tiny_llama, phase_num=3, lr=2e-3, grokfast_lambda=0.0)
    assert opt.config.lr == 2e-3 and opt.config.kl_weight == 0.1
    assert {g["lr"] for g in opt.param_groups} == {2e-3} and opt.model is tiny_llama
    with pytest.raises(OptimConfigError, match="grokfast_lambda") as err:
        create_optimizer_from_phase(tiny_llama, phase_num=1, grokfast_lamda=0.1)
    assert "valid" in str(err.value)
    with pytest.raises(OptimConfigError, match=r"\[1, 3, 4, 5, 6, 7\]"):
        preset_config(2)
    with pytest.raises(OptimConfigError, match="grokfast_scope"):
        preset_config(1, grokfast_scope="attention")
    with pytest.raises(OptimConfigError, match="momentum"):
        MuGrokfastConfig(momentum=1.5)
    assert isinstance(OptimConfigError("x"), ValueError)
    assert MuGrokfastConfig.from_dict({"lr": 0.5, "betas": [0.9, 0.9]}).betas == (0.9, 0.9)


def test_bad_param_groups_are_refused():
    with pytest.raises(ValueError, match="use_muon"):
        MuonGrokfast([nn.Parameter(torch.zeros(3, 3))])
    with pytest.raises(ValueError, match="2-D"):
        MuonGrokfast([{"params": [nn.Parameter(torch.zeros(3))], "use_muon": True}])


# --- QK-clip ----------------------------------------------------------------------------------------------

def _register_capture():
    """Register an attention function that records the q, k the model really uses (brute-force oracle)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = {}

    def capture(module, query, key, value, attention_mask, scaling, **kwargs):
        seen[module.layer_idx] = (query.detach(), key.detach(), scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register("forge_test_capture", capture)
    return seen


def _brute_force_max_logits(query, key, scaling):
    """Loop over every (batch, head, i, j <= i) pair; key heads shared as head // group."""
    b_n, h_n, t_n, _ = query.shape
    group = h_n // key.shape[1]
    best = torch.full((h_n,), -math.inf)
    for b in range(b_n):
        for h in range(h_n):
            for i in range(t_n):
                for j in range(i + 1):
                    best[h] = max(best[h], float(query[b, h, i] @ key[b, h // group, j]) * scaling)
    return best


def _tiny_qwen2():
    """A 2-layer Qwen2 (q/k projections with biases), the second Llama-style family."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, tie_word_embeddings=False))
    with torch.no_grad():  # biases start at zero; make them matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_(0, 0.5)
            layer.self_attn.k_proj.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_monitor_matches_brute_force_logits(tiny_llama, family):
    model = tiny_llama if family == "llama" else _tiny_qwen2()
    seen = _register_capture()
    model.set_attn_implementation("forge_test_capture")
    monitor = attach_qk_logit_monitor(model)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    assert all(getattr(m, "qk_max_logits", None) is None for m in monitor.modules)  # training_only
    with torch.no_grad():  # scale the logits up so the comparison is not between near-zeros
        for m in monitor.modules:
            m.q_proj.weight.mul_(20.0)
            m.k_proj.weight.mul_(20.0)
    model(ids)
    for layer, module in enumerate(monitor.modules):
        assert module.qk_max_logits.shape == (4,) and not module.qk_max_logits.requires_grad
        expected = _brute_force_max_logits(*seen[layer])
        assert expected.abs().max() > 1.0
        assert torch.allclose(module.qk_max_logits, expected, rtol=1e-4, atol=1e-4)
    # A projection wrapped after attaching (as a LoRA layer would be) is recomputed through the wrapper.
    for m in monitor.modules:
        m.q_proj = nn.Sequential(m.q_proj)
    model(ids)
    for layer, module in enumerate(monitor.modules):
        assert torch.allclose(module.qk_max_logits, _brute_force_max_logits(*seen[layer]), rtol=1e-4, atol=1e-4)
    monitor.remove()


def test_from_model_warns_when_qk_clip_has_no_target():
    with pytest.warns(UserWarning, match="QK-clip"):
        MuonGrokfast.from_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), MuGrokfastConfig())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("drive", [{0: 30.0}, {0: 30.0, 1: 12.0}])
def test_qk_clip_bounds_logits_and_touches_no_other_head(tiny_llama, drive, family):
    tiny_llama = tiny_llama if family == "llama" else _tiny_qwen2()  # Qwen2: q/k biases scale too
    monitor = attach_qk_logit_monitor(tiny_llama)
    attn = tiny_llama.model.layers[0].self_attn  # 4 query heads, 2 key heads (heads 0,1 share key 0)
    with torch.no_grad():
        for head, factor in drive.items():
            attn.q_proj.weight[head * 8:(head + 1) * 8] *= factor
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    tiny_llama(ids).logits.sum().backward()
    before = attn.qk_max_logits.clone()
    driven_min = min(before[h].item() for h in drive)
    others_max = max(before[h].item() for h in range(4) if h not in drive)
    others_max = max(others_max, tiny_llama.model.layers[1].self_attn.qk_max_logits.max().item())
    tau = 0.5 * driven_min
    assert tau > others_max  # precondition: only the driven heads exceed tau
    weights = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    opt = MuonGrokfast.from_model(tiny_llama, MuGrokfastConfig(lr=0.0, grokfast_lambda=0.0, qk_clip_tau=tau))
    opt.step()
    assert sorted(r["head"] for r in opt.last_qk_clip) == sorted(drive)
    tiny_llama(ids)  # measure again with the clipped weights
    after = attn.qk_max_logits
    assert after.max() <= tau * (1 + 1e-4)
    assert math.isclose(after[max(drive, key=lambda h: before[h])].item(), tau, rel_tol=1e-3)
    changed = {n for n, p in tiny_llama.named_parameters() if not torch.equal(p, weights[n])}
    expected = {f"model.layers.0.self_attn.{proj}.{kind}" for proj in ("q_proj", "k_proj")
                for kind in (("weight", "bias") if family == "qwen2" else ("weight",))}
    assert changed == expected
    q_old, k_old = (weights[f"model.layers.0.self_attn.{n}.weight"] for n in ("q_proj", "k_proj"))
    q_rows_changed = [h for h in range(4) if not torch.equal(attn.q_proj.weight[h * 8:(h + 1) * 8],
                                                              q_old[h * 8:(h + 1) * 8])]
    k_rows_changed = [g for g in range(2) if not torch.equal(attn.k_proj.weight[g * 8:(g + 1) * 8],
                                                              k_old[g * 8:(g + 1) * 8])]
    assert q_rows_changed == sorted(drive) and k_rows_changed == [0]
    assert torch.allclose(after[2:], before[2:], atol=1e-5)  # group 1 (heads 2, 3) untouched
    monitor.remove()


# --- state round trip ---------------------------------------------------------------------------------

def _train(model, opt, batches) -> int:
    """Train on ``batches``; returns how many heads QK-clip rescaled along the way."""
    clipped = 0
    for ids in batches:
        opt.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        clipped += len(opt.last_qk_clip)
    return clipped


def test_state_dict_round_trip_continues_identically(tiny_llama):
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 64, (2, 12), generator=gen) for _ in range(6)]
    # Logits of this model are ~0.02-0.06, so tau 0.03 makes QK-clip act; the filter acts on both groups.
    cfg = dict(lr=3e-3, grokfast_lambda=2.0, grokfast_scope="all", qk_clip_tau=0.03, weight_decay=0.1)
    opt = create_optimizer_from_phase(tiny_llama, 1, **cfg)
    assert opt.qk_monitor is not None  # attached automatically for a Hugging Face Llama
    _train(tiny_llama, opt, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": tiny_llama.state_dict(), "optim": opt.state_dict()}, buffer)
    assert _train(tiny_llama, opt, batches[3:]) > 0
    assert all("grokfast_ema" in s for s in opt.state.values())

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    clone = copy.deepcopy(tiny_llama)
    clone.load_state_dict(saved["model"])
    opt2 = create_optimizer_from_phase(clone, 1, **cfg)
    opt2.load_state_dict(saved["optim"])
    _train(clone, opt2, batches[3:])
    for (name, a), b in zip(tiny_llama.named_parameters(), clone.parameters()):
        assert torch.equal(a, b), name


# --- KL and STE ----------------------------------------------------------------------------------------------

def test_kl_divergence_matches_explicit_sums():
    torch.manual_seed(8)
    logits, ref = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    p, q = logits.softmax(-1), ref.softmax(-1)
    fwd = (q * (q.log() - p.log())).sum(-1)  # KL(ref || model) per position
    rev = (p * (p.log() - q.log())).sum(-1)
    assert torch.allclose(kl_divergence(logits, ref), fwd.mean(), atol=1e-6)
    assert torch.allclose(kl_divergence(logits, ref, mask), fwd[mask.bool()].mean(), atol=1e-6)
    assert torch.allclose(kl_divergence(logits, ref, direction="reverse"), rev.mean(), atol=1e-6)
    with pytest.raises(ValueError, match="direction"):
        kl_divergence(logits, ref, direction="sideways")


def test_reference_kl_is_zero_at_start_and_trains_only_the_model(tiny_llama):
    kl = ReferenceKL.from_model(tiny_llama, weight=0.1)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    assert kl(tiny_llama(ids).logits, ids).abs().item() < 1e-6
    with torch.no_grad():
        tiny_llama.lm_head.weight.add_(0.5)
        tiny_llama.model.norm.weight.mul_(3.0)
    loss = kl(tiny_llama(ids).logits, ids)
    assert loss.item() > 0
    loss.backward()
    assert tiny_llama.lm_head.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in kl.reference.parameters())


def _ternary_ste(w: torch.Tensor) -> torch.Tensor:
    """absmean ternary quantization with a straight-through estimator (test-local BitLinear weight)."""
    scale = w.abs().mean().clamp(min=1e-8)
    q = (w / scale).round().clamp(-1, 1) * scale
    return w + (q - w).detach()


def test_ste_mode_weight_decay_and_training():
    torch.manual_seed(9)
    latent = nn.Parameter(torch.randn(8, 8))
    codes = lambda w: (w / w.abs().mean()).round().clamp(-1, 1)  # noqa: E731
    # Uniform decay does not move the ternary codes (the documented reason STE mode does not decay).
    assert torch.equal(codes(latent.detach()), codes(latent.detach() * 0.9))
    for ste, expect_same in ((True, True), (False, False)):
        p = nn.Parameter(latent.detach().clone())
        opt = MuonGrokfast([{"params": [p], "use_muon": True}],
                           MuGrokfastConfig(lr=0.1, weight_decay=0.5, ste_mode=ste, **NO_FILTER))
        p.grad = torch.zeros_like(p)
        opt.step()
        assert torch.equal(p, latent) == expect_same
    # Training through the STE moves the latent weights toward a ternary target.
    target = codes(torch.randn(8, 8)) * 0.8  # a ternary matrix at the latent weights' scale
    x = torch.randn(64, 8)
    p = nn.Parameter(torch.randn(8, 8))
    wrong_before = (codes(p.detach()) != codes(target)).sum()
    opt = MuonGrokfast([{"params": [p], "use_muon": True}], preset_config(5, lr=0.2, qk_clip_tau=None))
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = ((x @ _ternary_ste(p).T - x @ target.T) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0]
    assert (codes(p.detach()) != codes(target)).sum() < 0.5 * wrong_before


# --- benchmarks' building blocks ----------------------------------------------------------------------------

def test_grokking_data_is_the_papers_task():
    from forgelib.bench.grokking import make_data

    data = make_data(seed=0)
    assert len(data["train_y"]) == len(data["val_y"]) == 4656  # 50% of 97 * 96 pairs
    x = torch.cat([data["train_x"], data["val_x"]])
    assert len({tuple(r) for r in x.tolist()}) == 9312
    assert set(x[:, 1].tolist()) == {97} and set(x[:, 3].tolist()) == {98} and x[:, 2].min() == 1
    assert torch.equal(data["train_y"], (data["train_x"][:, 0] * data["train_x"][:, 2]) % 97)


def test_grok_decoder_reports_logits_and_qk_clip_acts_on_mha():
    from forgelib.bench.grokking import GrokDecoder

    torch.manual_seed(0)
    model = GrokDecoder(dim=32, heads=4)
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.q_proj.weight[8:16] *= 40.0  # drive head 1
    ids = torch.tensor([[3, 97, 5, 98], [7, 97, 2, 98]])
    model(ids).sum().backward()
    assert attn.qk_max_logits.shape == (4,)
    muon, adamw = split_parameters(model)
    assert {n for n, _ in adamw} >= {"embed_tokens.weight", "embed_positions.weight", "lm_head.weight"}
    tau = 0.5 * attn.qk_max_logits[1].item()
    assert attn.qk_max_logits[[0, 2, 3]].max() < tau
    opt = MuonGrokfast.from_model(model, MuGrokfastConfig(lr=0.0, grokfast_lambda=0.0, qk_clip_tau=tau))
    opt.step()
    model(ids)
    assert [r["head"] for r in opt.last_qk_clip] == [1]
    assert math.isclose(attn.qk_max_logits[1].item(), tau, rel_tol=1e-4)  # MHA: exactly tau


def test_censored_median_and_speedups_by_hand():
    from forgelib.bench.grokking import _ratio, censored_median

    assert censored_median([300, 500, 400], [300, 500, 400]) == 400
    assert censored_median([300, None, None], [300, 2000, 2500]) == "> 2000"
    assert censored_median([300, None], [300, 2000]) == "> 2000"
    assert censored_median([300, 500], [300, 500]) == 400
    assert _ratio(800, 400) == 2.0 and _ratio("> 2000", 400) == "> 5.0" and _ratio(400, "> 10") is None


def test_grokking_run_smoke():
    from forgelib.bench.grokking import RunSettings, parse_optimizer_spec, split_specs, train_run

    assert split_specs("adamw,mugrokfast[grokfast_scope=all,grokfast_lambda=1]") == [
        "adamw", "mugrokfast[grokfast_scope=all,grokfast_lambda=1]"]
    assert parse_optimizer_spec("muon[lr=0.002]")[2] == {"grokfast_lambda": 0.0, "lr": 0.002}
    with pytest.raises(KeyError, match="valid"):
        parse_optimizer_spec("sgd")
    record = train_run("paper-grokfast", 0, RunSettings(max_steps=2, eval_every=2, batch_size=16))
    assert record.steps_run == 2 and len(record.history) == 1 and record.train_seconds > 0


def test_optim_lm_smoke(tmp_path):
    from forgelib.bench.optim_lm import main

    out = tmp_path / "olm.json"
    assert main(["--tokens", "600", "--train-samples", "120", "--val-samples", "16", "--hidden", "32",
                 "--layers", "1", "--vocab", "300", "--max-len", "48", "--batch-size", "4",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert runs["adamw"]["tokens"] == runs["mugrokfast"]["tokens"] >= 600
    assert all(math.isfinite(r["val_loss"]) and r["optimizer_step_ms"] > 0 for r in runs.values())
