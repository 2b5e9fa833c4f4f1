"""CMA-ES search over merge recipes and layer paths, on problems whose optimum is known."""

import pytest
import torch

from forgelib.merge import (MergeError, MergeRecipe, evolve_layer_path, evolve_recipe, merge_models,
                            param_group, rebuild_from_recipe, save_recipe)


from helpers import perturbed_copy as _specialist


@pytest.fixture
def family(tiny_llama):
    """The trunk and two specialists sharing it."""
    return tiny_llama, {"a": _specialist(tiny_llama, 1), "b": _specialist(tiny_llama, 2)}


def _distance_fitness(target):
    """-(mean squared distance to ``target``), summed over parameters: each tensor counts alike."""
    def fitness(model):
        return -sum(((p - target[n]) ** 2).mean().item() for n, p in model.named_parameters())
    return fitness


def _task_combination(base, models, coeffs):
    """base + sum_i coeffs(group)[i] * (model_i - base), per parameter."""
    sb = dict(base.named_parameters())
    srcs = [dict(m.named_parameters()) for m in models.values()]
    return {n: (sb[n] + sum(c * (s[n] - sb[n]) for c, s in zip(coeffs(param_group(n)), srcs))).detach()
            for n in sb}


def test_cma_recovers_global_weights_of_a_known_combination(family):
    base, models = family
    target = _task_combination(base, models, lambda g: (0.3, 0.7))
    records = []
    result = evolve_recipe(models, base, _distance_fitness(target), methods=["task_arithmetic"], budget=80,
                           per_layer=False, progress=False, log=records.append)
    weights = result.champion.parameters["weights"]
    assert abs(weights[0] - 0.3) < 0.05 and abs(weights[1] - 0.7) < 0.05
    assert len(result.evaluations) == len(records) == 80
    assert records[0]["method"] == "uniform" and result.champion_fitness == max(r["fitness"] for r in records)
    best = result.best_per_generation
    assert len(best) == len(result.mean_per_generation) == len(result.generations)
    assert max(best[-3:]) > best[1]  # later generations beat the first CMA-ES generation


def test_cma_recovers_per_layer_weights(family):
    base, models = family
    one = {"a": models["a"]}
    wanted = {"embed": 0.2, "layers.0": 0.5, "layers.1": 1.2, "norm": 0.0, "head": 0.7}
    target = _task_combination(base, one, lambda g: (wanted[g],))
    result = evolve_recipe(one, base, _distance_fitness(target), methods=["task_arithmetic"], budget=300,
                           per_layer=True, include_uniform=False, progress=False)
    found = {g: p["weights"][0] for g, p in result.champion.groups.items()}
    assert set(found) == set(wanted)
    assert all(abs(found[g] - wanted[g]) < 0.05 for g in wanted), found


def test_budget_is_shared_between_methods_and_champion_is_the_best(family):
    base, models = family
    target = _task_combination(base, models, lambda g: (0.5, 0.5))
    result = evolve_recipe(models, base, _distance_fitness(target), methods=["ties", "model_stock", "slerp"],
                           budget=31, per_layer=False, progress=False)
    by_method = {}
    for r in result.evaluations:
        by_method[r["method"]] = by_method.get(r["method"], 0) + 1
    # 1 uniform + 1 model_stock (nothing to tune) + the remaining 29 split 15 / 14
    assert by_method == {"uniform": 1, "model_stock": 1, "ties": 15, "slerp": 14}
    best = max(result.evaluations, key=lambda r: r["fitness"])
    assert result.champion.to_dict() == best["recipe"] and result.champion_fitness == best["fitness"]
    # the target is the plain average, which the uniform candidate hits exactly
    assert result.champion_fitness >= result.evaluations[0]["fitness"] > -1e-10


def test_evolved_dare_ties_champion_rebuilds_bit_exactly_from_yaml(family, tmp_path):
    base, models = family
    target = _task_combination(base, models, lambda g: (0.4, 0.8))
    fitness = _distance_fitness(target)
    test_calls = []

    def test_fn(model):
        test_calls.append(1)
        return fitness(model)

    result = evolve_recipe(models, base, fitness, methods=["dare_ties"], budget=16, seed=3, base_name="trunk",
                           include_uniform=False, progress=False, test_fn=test_fn)
    assert len(test_calls) == 1 and result.champion_test == result.champion_fitness
    path = save_recipe(result.champion, tmp_path / "champion.yaml")
    pool = {"trunk": base, **models}
    rebuilt = rebuild_from_recipe(path, pool.__getitem__)
    again = merge_models(result.champion, models, base)
    for (name, p), q in zip(rebuilt.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    assert fitness(rebuilt) == result.champion_fitness


def test_layer_path_search_finds_the_target_path(family):
    base, models = family
    path = [["b", 0], ["a", 1], ["base", 0], ["b", 1]]  # depth 4 > 2 layers: blocks reused, 3^4 paths
    target_recipe = MergeRecipe("passthrough", ["a", "b"], layer_path=path)
    target = {n: p.detach().clone() for n, p in merge_models(target_recipe, models, base).named_parameters()}
    result = evolve_layer_path(models, base, _distance_fitness(target), depth=4, budget=100, progress=False)
    assert result.champion.layer_path == path
    assert result.champion_fitness == 0.0
    assert any(r["cached"] for r in result.evaluations)  # repeated paths are not rebuilt


def test_layer_path_search_can_stack_deeper_and_use_the_merged_model(family):
    base, models = family
    recipe = MergeRecipe("linear", ["a", "b"])

    def prefers_merged_then_b(model):  # a path score: +1 per layer matching [merged, b, merged]
        merged = merge_models(recipe, models, base)
        want = [merged.model.layers[0], models["b"].model.layers[1], merged.model.layers[0]]
        return float(sum(torch.equal(layer.mlp.up_proj.weight, w.mlp.up_proj.weight)
                         for layer, w in zip(model.model.layers, want)))

    result = evolve_layer_path(models, base, prefers_merged_then_b, depth=3, recipe=recipe, budget=60,
                               progress=False)
    assert result.champion.method == "linear"
    assert result.champion.layer_path == [["merged", 0], ["b", 1], ["merged", 0]]
    assert merge_models(result.champion, models, base).config.num_hidden_layers == 3


def test_bad_search_settings_fail_clearly(family):
    base, models = family
    fit = _distance_fitness({n: p.detach() for n, p in base.named_parameters()})
    with pytest.raises(MergeError, match="evolve_layer_path"):
        evolve_recipe(models, base, fit, methods=["passthrough"], budget=5, progress=False)
    with pytest.raises(MergeError, match="too small"):
        evolve_recipe(models, base, fit, methods=["ties", "dare_ties"], budget=2, progress=False)
    with pytest.raises(MergeError, match="unknown parameter.*'gama'.*valid"):
        evolve_recipe(models, base, fit, methods=["breadcrumbs"], budget=5, progress=False,
                      fixed_params={"breadcrumbs": {"gama": 0.1}})


def test_non_finite_fitness_is_logged_but_never_champion(family):
    base, models = family

    def fitness(model):  # NaN whenever the embedding moved more than halfway to specialist a
        moved = (model.model.embed_tokens.weight - base.model.embed_tokens.weight).norm()
        full = (models["a"].model.embed_tokens.weight - base.model.embed_tokens.weight).norm()
        return float("nan") if moved > 0.5 * full else -float(moved)

    result = evolve_recipe({"a": models["a"]}, base, fitness, methods=["task_arithmetic"], budget=30,
                           per_layer=False, progress=False)
    fits = [r["fitness"] for r in result.evaluations]
    assert any(f != f for f in fits)  # some NaN were seen and recorded
    assert result.champion_fitness == max(f for f in fits if f == f)
    assert result.champion.parameters["weights"][0] < 0.5
