"""SVF expert vectors on tiny real models: a constant sigmoid(z) reproduces W, the SVD cache round-trips, gradients
reach z only, an expert's size is the sum of the ranks, ternary layers keep their forward, experts save and mix,
and the CEM search finds a known optimum."""
import pytest
import torch

from forgelib.experts import (SVFConfig, apply_svf, cem_search, load_expert, load_svd_cache, mix, remove_svf,
                              save_expert, save_svd_cache, svd_cache)


def _ids():
    torch.manual_seed(1)
    return torch.randint(0, 64, (2, 9))


def test_a_constant_sigmoid_reproduces_the_base_weights(tiny_llama):
    ids = _ids()
    want = tiny_llama(input_ids=ids).logits
    weights = {n: m.weight.detach().clone() for n, m in tiny_llama.named_modules() if n.endswith("q_proj")}
    svf = apply_svf(tiny_llama)
    for value in (0.0, 2.5, -1.0):  # sigmoid(z) constant: the rescale gives back sum(sigma), i.e. W itself
        svf.load_z({n: torch.full_like(z, value) for n, z in svf.z.items()})
        assert torch.allclose(svf(input_ids=ids).logits, want, atol=1e-5)
        for name, w in weights.items():
            assert torch.allclose(svf.model.get_submodule(name).weight, w, atol=1e-5)
    # a non-constant z changes the matrix, and without the rescale z = 0 halves it
    svf.load_z({n: torch.linspace(-2, 2, z.numel()) for n, z in svf.z.items()})
    assert not torch.allclose(svf(input_ids=ids).logits, want, atol=1e-3)
    name = next(iter(weights))
    half = apply_svf(remove_svf(svf), SVFConfig(rescale=False))
    assert torch.allclose(half.model.get_submodule(name).weight, weights[name] / 2, atol=1e-5)


def test_singular_value_scaling_matches_the_formula(tiny_llama):
    svf = apply_svf(tiny_llama)
    name, z = next(iter(svf.z.items()))
    with torch.no_grad():
        z.copy_(torch.linspace(-3, 3, z.numel()))
    param = svf._param(name)
    u, s, vh = param.u, param.s, param.vh
    scaled = s * torch.sigmoid(z.detach())
    scaled = scaled * s.sum() / scaled.sum()
    want = u @ torch.diag(scaled) @ vh
    assert torch.allclose(svf.model.get_submodule(name).weight, want, atol=1e-6)
    assert torch.allclose(svf.scalings()[name], scaled / s, atol=1e-6)
    kept = float(torch.linalg.svdvals(svf.model.get_submodule(name).weight.detach()).sum())
    assert kept == pytest.approx(float(s.sum()), rel=1e-4)


def test_svd_cache_round_trips(tiny_llama, tmp_path):
    cache = svd_cache(tiny_llama)
    save_svd_cache(cache, tmp_path / "svd.safetensors")
    back = load_svd_cache(tmp_path / "svd.safetensors")
    assert set(back) == set(cache)
    for name, (u, s, vh) in cache.items():
        assert torch.equal(back[name][0], u) and torch.equal(back[name][1], s) and torch.equal(back[name][2], vh)
        w = tiny_llama.get_submodule(name).weight
        assert torch.allclose(u @ torch.diag(s) @ vh, w, atol=1e-5)
    ids = _ids()
    a = apply_svf(tiny_llama, cache=back)(input_ids=ids).logits
    assert torch.allclose(a, remove_svf(apply_svf(tiny_llama))(input_ids=ids).logits, atol=1e-5)


def test_gradients_reach_z_and_never_the_base_weights(tiny_llama):
    svf = apply_svf(tiny_llama)
    trainable = [n for n, p in svf.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".z") for n in trainable)
    ids = _ids()
    out = svf(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(z.grad is not None and float(z.grad.abs().sum()) > 0 for z in svf.z.values())
    base = [p for n, p in svf.model.named_parameters() if not n.endswith(".z")]
    assert base and all(p.grad is None and not p.requires_grad for p in base)


def test_an_expert_has_one_parameter_per_singular_value(tiny_llama):
    shapes = {n: tuple(m.weight.shape) for n, m in tiny_llama.named_modules()
              if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))}
    svf = apply_svf(tiny_llama)
    assert set(svf.z) == set(shapes)
    assert svf.expert_params == sum(min(s) for s in shapes.values())
    assert svf.expert_params == sum(p.numel() for p in svf.parameters() if p.requires_grad)


def test_ternary_layers_keep_their_forward_and_come_back(tiny_llama):
    from forgelib.quant import convert_to_bitnet
    from forgelib.quant.bitnet import BitLinear

    convert_to_bitnet(tiny_llama)
    ids = _ids()
    want = tiny_llama(input_ids=ids).logits
    svf = apply_svf(tiny_llama)
    layer = next(m for m in svf.model.modules() if isinstance(m, BitLinear))
    assert not layer.quantize_weight  # W' is built from the ternary matrix, not quantized again
    assert torch.allclose(svf(input_ids=ids).logits, want, atol=1e-4)
    svf.load_z({n: torch.linspace(-2, 2, z.numel()) for n, z in svf.z.items()})
    assert not torch.allclose(svf(input_ids=ids).logits, want, atol=1e-3)
    model = remove_svf(svf)
    assert layer.quantize_weight and torch.equal(model(input_ids=ids).logits, want)


def test_experts_save_load_and_mix(tiny_llama, tmp_path):
    svf = apply_svf(tiny_llama)
    a = {n: torch.randn_like(z) for n, z in svf.z.items()}
    b = {n: torch.randn_like(z) for n, z in svf.z.items()}
    svf.load_z(a)
    path = save_expert(svf, tmp_path / "experts" / "a.safetensors", {"cluster": 0})
    svf.reset()
    assert all(float(z.abs().sum()) == 0 for z in svf.z.values())
    svf.load_z(load_expert(path))
    assert all(torch.equal(svf.z[n], a[n]) for n in a)
    mixed = mix([a, b], [0.25, 0.75])
    assert all(torch.allclose(mixed[n], 0.25 * a[n] + 0.75 * b[n]) for n in a)
    with pytest.raises(ValueError, match="missing"):
        svf.load_z({n: v for n, v in list(a.items())[1:]})
    with pytest.raises(ValueError, match="one weight per expert"):
        mix([a, b], [1.0])


def test_cem_finds_a_known_optimum():
    target = [0.2, 1.3, -0.4]
    score = lambda a: -sum((x - t) ** 2 for x, t in zip(a, target))  # noqa: E731
    best, value, history = cem_search(score, 3, iterations=25, population=24, elite=6, seed=0)
    assert all(abs(x - t) < 0.05 for x, t in zip(best, target)), best
    assert value > -0.005 and [h[1] for h in history] == sorted(h[1] for h in history)


def test_generation_builds_each_matrix_once_and_answers_as_without_the_cache(tiny_llama):
    """``SVFModel.generate`` (and a forward without gradients) build each SVF matrix once per call; the tokens are
    those of building it at every use (the reference: the wrapped model's own generate, no cache)."""
    from forgelib.experts.svf import SVFParametrization

    svf = apply_svf(tiny_llama).eval()
    svf.load_z({n: torch.linspace(-2, 2, z.numel()) for n, z in svf.z.items()})
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in svf.modules()
             if isinstance(m, SVFParametrization)]
    ids = _ids()[:1]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                  min_new_tokens=6, pad_token_id=0)
    want = svf.model.generate(**kwargs)  # no cache: every matrix rebuilt at every token
    rebuilt, calls[:] = len(calls), []
    got = svf.generate(**kwargs)
    assert torch.equal(got, want)
    assert len(calls) == len(hooks) and rebuilt == 6 * len(hooks)
    calls[:] = []
    with torch.no_grad():
        svf(input_ids=ids)
    assert len(calls) == len(hooks)
    calls[:] = []
    svf(input_ids=ids).logits.sum().backward()  # with gradients: built in the graph, z learns
    assert len(calls) == len(hooks) and all(z.grad is not None for z in svf.z.values())
