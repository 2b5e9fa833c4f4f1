"""Merge methods (hand-computed examples, invariants, peft as reference) and model-level merging."""
import copy
import math

import pytest
import torch
from peft.utils import merge_utils as peft_merge
from transformers import LlamaConfig, LlamaForCausalLM

from forgelib.merge import (MERGE_METHODS, IncompatibleModelsError, MergeError, MergeRecipe,
                            UnknownMergeMethodError, load_recipe, merge_models, merge_tensors, model_groups,
                            param_group, rebuild_from_recipe, save_recipe, uniform_recipe)
from forgelib.merge.methods import rank_sampling_prune

T = torch.tensor
ALL_METHODS = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "della",
               "slerp", "model_stock", "karcher", "passthrough"}


from helpers import perturbed_copy as _specialist


def _llama(**overrides):
    torch.manual_seed(1)
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


# ---------------------------------------------------------------- registry and errors


def test_registry_holds_every_method_and_unknown_names_fail_with_the_list():
    assert set(MERGE_METHODS) == ALL_METHODS
    with pytest.raises(UnknownMergeMethodError, match="valid methods: .*ties"):
        merge_tensors("tie", [T([1.0])], T([0.0]))
    with pytest.raises(MergeError, match="unknown parameter.*'densty'.*valid parameters"):
        merge_tensors("ties", [T([1.0])], T([0.0]), densty=0.5)


def test_missing_base_shape_mismatch_and_per_model_lengths_fail_clearly():
    with pytest.raises(MergeError, match="base"):
        merge_tensors("ties", [T([1.0, 2.0])], None, density=0.5)
    with pytest.raises(MergeError, match="share one shape"):
        merge_tensors("linear", [torch.zeros(3), torch.zeros(4)])
    with pytest.raises(MergeError, match="'weights' needs one value per model"):
        merge_tensors("task_arithmetic", [T([1.0]), T([2.0])], T([0.0]), weights=[1.0])


# ---------------------------------------------------------------- hand-computed examples


def test_linear_hand_example():
    a, b = T([1.0, 2.0]), T([3.0, 6.0])
    # (1*[1, 2] + 3*[3, 6]) / 4 = [2.5, 5]
    assert torch.allclose(merge_tensors("linear", [a, b], weights=[1, 3]), T([2.5, 5.0]))
    assert torch.allclose(merge_tensors("linear", [a, b], weights=[1, 3], normalize=False), T([10.0, 20.0]))


def test_task_arithmetic_hand_example():
    base, a, b = T([1.0, 1.0]), T([2.0, 0.0]), T([0.0, 3.0])
    # task vectors [1, -1] and [-1, 2]; 1*[1, -1] + 0.5*[-1, 2] = [0.5, 0]
    assert torch.allclose(merge_tensors("task_arithmetic", [a, b], base, weights=[1, 0.5]), T([1.5, 1.0]))
    assert torch.allclose(merge_tensors("task_arithmetic", [a, b], base, weights=[1, 0.5], lambda_=2.0),
                          T([2.0, 1.0]))


def test_ties_hand_example():
    base = torch.ones(4)
    taus = [T([3.0, -1.0, 2.0, -4.0]), T([-1.0, -2.5, 5.0, 2.0]), T([2.0, 1.0, -1.0, 3.0])]
    # trim to top-2 magnitudes: [3,0,0,-4], [0,-2.5,5,0], [2,0,0,3]; weights [1,1,2] -> weighted
    # [3,0,0,-4], [0,-2.5,5,0], [4,0,0,6]; sign of the weighted sum [7,-2.5,5,2] -> [+,-,+,+];
    # disjoint mean over agreeing entries, divided by their summed weights:
    # e0 (3+4)/(1+2)=7/3, e1 -2.5/1, e2 5/1, e3 6/2=3 (the -4 disagrees)
    out = merge_tensors("ties", [base + t for t in taus], base, weights=[1, 1, 2], density=0.5)
    assert torch.allclose(out, base + T([7 / 3, -2.5, 5.0, 3.0]))


def test_ties_with_unit_weights_equals_peft_ties():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 10, generator=gen)
    taus = [torch.randn(6, 10, generator=gen) for _ in range(3)]
    for density in (0.2, 0.5, 0.9):
        ours = merge_tensors("ties", [base + t for t in taus], base, weights=1.0, density=density)
        ref = base + peft_merge.ties(taus, torch.ones(3), density)
        assert torch.allclose(ours, ref, atol=1e-6), density


def test_ties_density_one_single_model_returns_its_task_vector():
    base, tau = torch.randn(5, 7), torch.randn(5, 7)
    for w in (1.0, 0.3):
        out = merge_tensors("ties", [base + tau], base, weights=[w], density=1.0)
        assert torch.allclose(out - base, tau, atol=1e-6)


def test_ties_trimming_keeps_at_least_one_entry():
    # n=3, density 0.2: int(0.6) = 0, but a positive density keeps the largest entry (the toolkit's max(1, k))
    base = torch.zeros(3)
    assert torch.equal(merge_tensors("ties", [T([0.1, -3.0, 2.0])], base, density=0.2), T([0.0, -3.0, 0.0]))
    assert torch.equal(merge_tensors("ties", [T([0.1, -3.0, 2.0])], base, density=0.0), base)
    # two models, weights [1, 2]: trimmed [0, -3, 0] and [1, 0, 0]; weighted sum [2, -3, 0]; disjoint mean
    # e0 2/2, e1 -3/1, e2 nothing agrees -> 0
    out = merge_tensors("ties", [T([0.1, -3.0, 2.0]), T([1.0, 0.5, -0.2])], base, weights=[1, 2], density=0.2)
    assert torch.allclose(out, T([1.0, -3.0, 0.0]))


def test_breadcrumbs_hand_example():
    tau = T([1.0, -2, 3, -4, 5, -6, 7, -8, 9, -10])
    # n=10, keep int(0.5*10)=5, drop the int(0.2*10)=2 largest (|9|, |10|) and the 3 smallest (1, 2, 3)
    out = merge_tensors("breadcrumbs", [tau], torch.zeros(10), weights=[2.0], density=0.5, gamma=0.2)
    assert torch.equal(out, 2 * T([0.0, 0, 0, -4, 5, -6, 7, -8, 0, 0]))
    # density + gamma > 1: fewer outliers are dropped so that 9 of 10 survive (only |10| goes)
    out = merge_tensors("breadcrumbs", [tau], torch.zeros(10), density=0.9, gamma=0.2)
    assert torch.equal(out, T([1.0, -2, 3, -4, 5, -6, 7, -8, 9, 0]))


def test_breadcrumbs_with_no_whole_outlier_drops_only_small_entries():
    # n=5, gamma 0.1: int(0.5) = 0 outliers, so the int(0.4*5) = 2 largest survive (as in the toolkit)
    out = merge_tensors("breadcrumbs", [T([1.0, -2, 3, -4, 5])], torch.zeros(5), density=0.4, gamma=0.1)
    assert torch.equal(out, T([0.0, 0, 0, -4, 5]))


def test_slerp_hand_examples_and_ends():
    # 90 degrees apart, norms 2 and 1: t=0.5 gives sin(pi/4)/sin(pi/2) = sqrt(2)/2 of each original
    v0, v1 = T([2.0, 0.0]), T([0.0, 1.0])
    r = math.sqrt(0.5)
    assert torch.allclose(merge_tensors("slerp", [v1], v0, t=0.5), T([2 * r, r]))
    assert torch.allclose(merge_tensors("slerp", [v0, v1], t=0.5), T([2 * r, r]))  # two models, no base
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    assert torch.equal(merge_tensors("slerp", [b], a, t=0.0), a)
    assert torch.equal(merge_tensors("slerp", [b], a, t=1.0), b)


def test_slerp_falls_back_to_lerp_when_colinear():
    v0 = T([1.0, 2.0, 3.0])
    v1 = 2 * v0  # cos = 1: the sine formula would divide by ~0
    out = merge_tensors("slerp", [v1], v0, t=0.25)
    assert torch.allclose(out, 0.75 * v0 + 0.25 * v1)
    assert torch.isfinite(out).all()


def test_slerp_with_a_list_t_fails_clearly():
    v0, v1 = T([1.0, 0.0]), T([0.0, 1.0])
    for bad in ([0.1, 0.5], [0.5], "0.5"):
        with pytest.raises(MergeError, match="'t' must be one number.*per layer group"):
            merge_tensors("slerp", [v1], v0, t=bad)
    assert torch.allclose(merge_tensors("slerp", [v1], v0, t=torch.tensor(0.0)), v0)  # a 0-d tensor is a number


def test_model_stock_hand_example():
    base = torch.zeros(2)
    a, b = T([1.0, 0.0]), T([1.0, 1.0])
    # cos between task vectors = 1/sqrt(2); k = 2: t = 2c / (1 + c); result = t * mean([1,0],[1,1])
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    assert torch.allclose(merge_tensors("model_stock", [a, b], base), t * T([1.0, 0.5]))
    with pytest.raises(MergeError, match="at least two models"):
        merge_tensors("model_stock", [a], base)


def test_model_stock_filter_wise_uses_one_ratio_per_row():
    base = torch.zeros(2, 2)
    a, b = T([[1.0, 0.0], [1.0, 0.0]]), T([[0.0, 1.0], [1.0, 0.0]])
    # row 0: orthogonal task vectors -> t = 0 (stay at base); row 1: identical -> t = 1 (the average)
    out = merge_tensors("model_stock", [a, b], base, filter_wise=True)
    assert torch.allclose(out, T([[0.0, 0.0], [1.0, 0.0]]), atol=1e-6)


def test_model_stock_falls_back_to_the_base_for_opposed_task_vectors():
    # cos = -1 with k = 2: 1 + (k - 1) cos = 0, so t = 0 (the base), as in the toolkit
    base = T([0.5, 0.5])
    out = merge_tensors("model_stock", [base + T([1.0, 0.0]), base - T([1.0, 0.0])], base)
    assert torch.equal(out, base)


def _model_stock_reference(w0, ws):
    """Model Stock on 1-D vectors, written out from the paper's formula (float64)."""
    offsets = [(w - w0).double() for w in ws]
    k = len(ws)
    cos = sum(float(a @ b / (a.norm() * b.norm())) for i, a in enumerate(offsets) for b in offsets[i + 1:])
    cos /= k * (k - 1) / 2
    t = k * cos / (1 + (k - 1) * cos)
    return t * sum(w.double() for w in ws) / k + (1 - t) * w0.double()


def test_model_stock_on_a_3d_tensor_matches_a_brute_force_reference():
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(2, 3, 4, generator=gen)
    models = [base + torch.randn(2, 3, 4, generator=gen) + 0.5 for _ in range(3)]
    ref = _model_stock_reference(base.reshape(-1), [m.reshape(-1) for m in models]).reshape(2, 3, 4)
    assert torch.allclose(merge_tensors("model_stock", models, base).double(), ref, atol=1e-5)
    # filter-wise: one ratio per vector along the last dimension (per row of a matrix), as in the toolkit
    ref = torch.zeros(2, 3, 4, dtype=torch.float64)
    for i in range(2):
        for j in range(3):
            ref[i, j] = _model_stock_reference(base[i, j], [m[i, j] for m in models])
    out = merge_tensors("model_stock", models, base, filter_wise=True)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_karcher_hand_example():
    # directions 0 and 90 degrees, equal weights -> 45 degrees; scale = mean norm (2 + 4) / 2 = 3
    out = merge_tensors("karcher", [T([2.0, 0.0]), T([0.0, 4.0])])
    assert torch.allclose(out, T([3 / math.sqrt(2), 3 / math.sqrt(2)]), atol=1e-5)


def test_karcher_matches_brute_force_frechet_mean_on_the_circle():
    angles, weights = [0.1, 1.3, 2.2], [1.0, 2.0, 1.0]
    vecs = [T([math.cos(a), math.sin(a)]) * n for a, n in zip(angles, [1.0, 2.0, 3.0])]
    out = merge_tensors("karcher", vecs, weights=weights, max_iter=100, tol=1e-9)
    # independent reference: minimize sum w * angle^2 over a fine grid of directions
    grid = torch.linspace(0, math.pi, 200001, dtype=torch.float64)
    cost = sum(w * (grid - a) ** 2 for w, a in zip(weights, angles))
    best = float(grid[cost.argmin()])
    scale = (1 * 1 + 2 * 2 + 1 * 3) / 4  # weighted mean of the norms
    assert math.isclose(math.atan2(out[1], out[0]), best, abs_tol=1e-4)
    assert math.isclose(float(out.norm()), scale, rel_tol=1e-5)


def test_karcher_with_a_base_merges_it_in_as_one_more_point():
    base, a, b = T([1.0, 1.0]), T([2.0, 0.0]), T([0.0, 4.0])  # directions 45, 0 and 90 degrees
    # uniform (the toolkit): mean direction 45 degrees, scale = mean norm (sqrt(2) + 2 + 4) / 3
    r = (math.sqrt(2) + 6) / 3 / math.sqrt(2)
    for weights in (1.0, [2.0, 2.0]):
        assert torch.allclose(merge_tensors("karcher", [a, b], base, weights=weights), T([r, r]), atol=1e-5)
    # weights [1, 3]: the base takes their mean, 2; alphas [1, 3, 2] / 6 -> direction (0 + 270 + 90) / 6 = 60
    # degrees, scale (2 + 12 + 2 sqrt(2)) / 6
    out = merge_tensors("karcher", [a, b], base, weights=[1.0, 3.0])
    scale = (14 + 2 * math.sqrt(2)) / 6
    assert torch.allclose(out, scale * T([math.cos(math.pi / 3), math.sin(math.pi / 3)]), atol=1e-5)
    # one model and a base: two points, 22.5 degrees, scale (sqrt(2) + 2) / 2
    out = merge_tensors("karcher", [a], base)
    angle, scale = math.pi / 8, (math.sqrt(2) + 2) / 2
    assert torch.allclose(out, scale * T([math.cos(angle), math.sin(angle)]), atol=1e-5)


def test_passthrough_returns_its_one_tensor():
    x = torch.randn(3, 3)
    assert torch.equal(merge_tensors("passthrough", [x]), x)
    assert torch.allclose(merge_tensors("passthrough", [x], scale=0.5), 0.5 * x)
    with pytest.raises(MergeError, match="exactly one"):
        merge_tensors("passthrough", [x, x])


# ---------------------------------------------------------------- randomised methods


def test_dare_keeps_or_rescales_each_entry_and_is_seeded():
    base, tau = torch.zeros(2000), torch.randn(2000)
    out = merge_tensors("dare_linear", [tau], base, density=0.25, seed=7)
    kept = out != 0
    assert torch.allclose(out[kept], tau[kept] / 0.25)  # survivors rescaled by 1/density
    assert abs(kept.float().mean().item() - 0.25) < 0.04  # binomial(2000, .25): sd ~ 0.01
    assert torch.equal(out, merge_tensors("dare_linear", [tau], base, density=0.25, seed=7))
    assert not torch.equal(out, merge_tensors("dare_linear", [tau], base, density=0.25, seed=8))


def test_dare_expectation_equals_input():
    tau, density, draws = T([1.0, -2.0, 0.5, 3.0]), 0.3, 4000
    gen = torch.Generator().manual_seed(0)
    samples = torch.stack([merge_tensors("dare_linear", [tau], torch.zeros(4), density=density, generator=gen)
                           for _ in range(draws)])
    # each entry is tau/p with prob p else 0: sd of the sample mean = |tau| sqrt((1-p)/(p N))
    sd = tau.abs() * math.sqrt((1 - density) / (density * draws))
    assert ((samples.mean(0) - tau).abs() < 4 * sd).all()


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_with_unit_weights_equals_peft(method):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(8, 9, generator=gen)
    taus = [torch.randn(8, 9, generator=gen) for _ in range(3)]
    # peft draws from the global RNG; a generator seeded alike gives the same masks. peft's dare_ties
    # divides by the count of agreeing models, i.e. normalize=True with unit weights.
    params = {"normalize": True} if method == "dare_ties" else {}
    ours = merge_tensors(method, [base + t for t in taus], base, density=0.4, seed=11, **params)
    with torch.random.fork_rng():
        torch.manual_seed(11)
        ref = base + getattr(peft_merge, method)(taus, torch.ones(3), 0.4)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_della_keep_probabilities_follow_magnitude_rank():
    tau = T([[5.0, -1.0, 3.0, -2.0, 4.0]])  # ranks by magnitude: 4, 0, 2, 1, 3
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([rank_sampling_prune(tau, 0.5, 0.2, gen, rescale=False) != 0 for _ in range(4000)])
    # p = (density - eps) + 2 eps * rank / (n - 1) = 0.3 + 0.1 * rank
    expected = T([[0.7, 0.3, 0.5, 0.4, 0.6]])
    assert (draws.float().mean(0) - expected).abs().max() < 0.03  # binomial sd <= 0.008
    with pytest.raises(MergeError, match="epsilon"):
        merge_tensors("della", [tau], torch.zeros_like(tau), density=0.9, epsilon=0.2)


def test_della_expectation_equals_input_for_one_model():
    tau, draws = T([[1.0, -2.0, 3.0, -4.0]]), 4000
    gen = torch.Generator().manual_seed(1)
    samples = torch.stack([merge_tensors("della", [tau], torch.zeros_like(tau), density=0.5, epsilon=0.2,
                                         generator=gen) for _ in range(draws)])
    p = T([[0.3, 0.4333, 0.5667, 0.7]])  # keep probability per rank
    sd = tau.abs() * torch.sqrt((1 - p) / (p * draws))
    assert ((samples.mean(0) - tau).abs() < 4 * sd).all()


def test_della_on_a_3d_tensor_ranks_along_dim_1():
    # as in the toolkit, keep probabilities follow the magnitude rank along dimension 1 at each (i, k)
    gen = torch.Generator().manual_seed(2)
    base, tau = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    density, eps = 0.5, 0.2
    probs = torch.zeros(2, 3, 4)
    for i in range(2):
        for k in range(4):
            col = tau[i, :, k].abs()
            for j in range(3):
                rank = int((col < col[j]).sum())  # 0 = smallest of the 3
                probs[i, j, k] = (density - eps) + 2 * eps * rank / 2
    mask = torch.bernoulli(probs, generator=torch.Generator().manual_seed(9))
    # one model: the disjoint mean is the pruned, 1/p-rescaled task vector itself
    out = merge_tensors("della", [base + tau], base, density=density, epsilon=eps, seed=9)
    assert torch.allclose(out, base + tau * mask / probs, atol=1e-5)


def test_della_with_density_zero_drops_the_task_vector():
    gen = torch.Generator().manual_seed(3)
    base, a, b = (torch.randn(4, 6, generator=gen) for _ in range(3))
    # density 0 keeps nothing (epsilon is not checked; the toolkit does the same): the base comes back
    assert torch.equal(merge_tensors("della", [a], base, density=0.0), base)
    # per-model: a model at density 0 takes no part and draws no random numbers
    out = merge_tensors("della", [a, b], base, density=[0.0, 0.5], seed=1)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, merge_tensors("della", [b], base, density=0.5, seed=1), atol=1e-6)


# ---------------------------------------------------------------- model level


def _recipe(method, names, **params):
    if method == "passthrough":
        return MergeRecipe(method, names, layer_path=[[names[0], 0], [names[1], 1]])
    if method in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "della"):
        params.setdefault("density", 0.5)
    return MergeRecipe(method, names, parameters=params)


@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_merging_identical_models_returns_the_model(tiny_llama, method):
    models = {"a": copy.deepcopy(tiny_llama), "b": copy.deepcopy(tiny_llama)}
    merged = merge_models(_recipe(method, ["a", "b"]), models, tiny_llama)
    assert merged is not tiny_llama
    for (name, p), q in zip(merged.state_dict().items(), tiny_llama.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_param_groups_of_a_llama(tiny_llama):
    assert model_groups(tiny_llama) == ["embed", "layers.0", "layers.1", "norm", "head"]
    assert param_group("model.layers.3.mlp.up_proj.weight", group_size=2) == "layers.1"
    assert param_group("model.norm.weight") == "norm"
    assert param_group("lm_head.weight") == "head"


def test_group_parameters_override_global_ones(tiny_llama):
    a, b = _specialist(tiny_llama, 1), _specialist(tiny_llama, 2)
    recipe = MergeRecipe("linear", ["a", "b"], parameters={"weights": [1.0, 1.0]},
                         groups={"layers.0": {"weights": [1.0, 0.0]}, "layers.1": {"weights": [0.0, 1.0]}})
    merged = merge_models(recipe, {"a": a, "b": b}, tiny_llama).state_dict()
    sa, sb = a.state_dict(), b.state_dict()
    key0, key1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(merged[key0], sa[key0]) and torch.equal(merged[key1], sb[key1])
    emb = "model.embed_tokens.weight"
    assert torch.allclose(merged[emb], (sa[emb] + sb[emb]) / 2)


def test_uniform_linear_merge_is_the_parameter_average(tiny_llama):
    models = [_specialist(tiny_llama, s) for s in (1, 2, 3)]
    merged = merge_models(uniform_recipe(["a", "b", "c"]), models, tiny_llama)
    for name, p in merged.named_parameters():
        ref = sum(dict(m.named_parameters())[name] for m in models) / 3
        assert torch.allclose(p, ref, atol=1e-6), name
    logits = merged(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()


def test_models_with_different_vocabularies_or_shapes_fail_clearly(tiny_llama):
    recipe = _recipe("ties", ["a"])
    with pytest.raises(IncompatibleModelsError, match="vocab_size 80 but the base has 64"):
        merge_models(recipe, {"a": _llama(vocab_size=80)}, tiny_llama)
    with pytest.raises(IncompatibleModelsError, match="mlp.*shape"):
        merge_models(recipe, {"a": _llama(intermediate_size=48)}, tiny_llama)
    with pytest.raises(IncompatibleModelsError, match="missing.*layers.1"):
        merge_models(recipe, {"a": _llama(num_hidden_layers=1)}, tiny_llama)
    with pytest.raises(MergeError, match=r"not given.*\['b'\]"):
        merge_models(recipe, {"b": tiny_llama}, tiny_llama)


def test_recipe_yaml_round_trip_and_bad_recipes(tmp_path):
    recipe = MergeRecipe("dare_ties", ["a", "b"], base="trunk", parameters={"density": 0.1 + 0.2},
                         groups={"layers.0": {"weights": [0.7, 1 / 3]}}, seed=4, layer_path=[["merged", 0]])
    assert load_recipe(save_recipe(recipe, tmp_path / "r.yaml")) == recipe  # floats survive exactly
    with pytest.raises(MergeError, match="unknown recipe field.*'wieghts'.*valid fields"):
        MergeRecipe.from_dict({"method": "ties", "models": ["a"], "wieghts": 1})
    with pytest.raises(UnknownMergeMethodError, match="valid methods"):
        MergeRecipe("soup", ["a"])
    with pytest.raises(MergeError, match="distinct names"):
        MergeRecipe("linear", ["base", "a"])
    with pytest.raises(MergeError, match="layer_path"):
        MergeRecipe("passthrough", ["a"])


def test_dare_ties_recipe_rebuilds_bit_exactly(tiny_llama, tmp_path):
    pool = {"trunk": tiny_llama, "a": _specialist(tiny_llama, 1), "b": _specialist(tiny_llama, 2)}
    recipe = MergeRecipe("dare_ties", ["a", "b"], base="trunk", parameters={"weights": [0.6, 0.9],
                                                                              "density": 0.3}, seed=123)
    first = merge_models(recipe, pool, tiny_llama)
    rebuilt = rebuild_from_recipe(save_recipe(recipe, tmp_path / "r.yaml"), pool.__getitem__)
    for (name, p), q in zip(first.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(p, q), name
    other_seed = merge_models(MergeRecipe(**{**recipe.__dict__, "seed": 124}), pool, tiny_llama)
    assert not torch.equal(other_seed.model.layers[0].mlp.up_proj.weight, first.model.layers[0].mlp.up_proj.weight)


def test_tied_embeddings_stay_tied_after_a_random_merge():
    base = _llama(tie_word_embeddings=True)
    merged = merge_models(_recipe("dare_ties", ["a", "b"]), [_specialist(base, 1), _specialist(base, 2)], base)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(merged.lm_head.weight, base.lm_head.weight)


def test_merge_keeps_the_base_dtype(tiny_llama):
    base = tiny_llama.to(torch.bfloat16)
    merged = merge_models(_recipe("ties", ["a"]), [_specialist(base, 1)], base)
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())


# ---------------------------------------------------------------- layer paths (passthrough stacking)


def test_passthrough_stacks_layers_like_a_hand_built_model(tiny_llama):
    a, b = _specialist(tiny_llama, 1), _specialist(tiny_llama, 2)
    path = [["a", 0], ["b", 1], ["a", 1]]
    merged = merge_models(MergeRecipe("passthrough", ["a", "b"], layer_path=path), {"a": a, "b": b}, tiny_llama)
    assert merged.config.num_hidden_layers == 3 and len(merged.model.layers) == 3
    # independent reference: a 3-layer model assembled module by module
    config = copy.deepcopy(tiny_llama.config)
    config.num_hidden_layers = 3
    ref = LlamaForCausalLM(config).eval()
    ref.model.embed_tokens.load_state_dict(tiny_llama.model.embed_tokens.state_dict())
    ref.model.norm.load_state_dict(tiny_llama.model.norm.state_dict())
    ref.lm_head.load_state_dict(tiny_llama.lm_head.state_dict())
    for depth, (src, layer) in enumerate(path):
        ref.model.layers[depth].load_state_dict({"a": a, "b": b}[src].model.layers[layer].state_dict())
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, ref(ids).logits)


def test_identity_layer_path_returns_the_base(tiny_llama):
    a = _specialist(tiny_llama, 1)
    recipe = MergeRecipe("passthrough", ["a"], layer_path=[["base", 0], ["base", 1]])
    merged = merge_models(recipe, [a], tiny_llama)
    for p, q in zip(merged.state_dict().values(), tiny_llama.state_dict().values()):
        assert torch.equal(p, q)


def test_layer_path_can_mix_the_merged_model_with_sources(tiny_llama):
    a, b = _specialist(tiny_llama, 1), _specialist(tiny_llama, 2)
    recipe = MergeRecipe("linear", ["a", "b"], layer_path=[["merged", 0], ["a", 1]])
    out = merge_models(recipe, {"a": a, "b": b}, tiny_llama).state_dict()
    plain = merge_models(MergeRecipe("linear", ["a", "b"]), {"a": a, "b": b}, tiny_llama).state_dict()
    k0, k1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(out[k0], plain[k0]) and torch.equal(out[k1], a.state_dict()[k1])
    assert torch.equal(out["lm_head.weight"], plain["lm_head.weight"])
    bad = MergeRecipe("passthrough", ["a"], layer_path=[["merged", 0]])
    with pytest.raises(MergeError, match="source 'merged'; valid sources"):
        merge_models(bad, [a], tiny_llama)
    with pytest.raises(MergeError, match=r"layer must be an integer in \[0, 2\)"):
        merge_models(MergeRecipe("passthrough", ["a"], layer_path=[["a", 2]]), [a], tiny_llama)
