"""mergekit YAML interop: documented mergekit configurations give the tensors of the equivalent hand-written
recipe, gradients follow mergekit's interpolation rule, recipes round-trip, refusals name what is wrong, and
`forge merge` merges a mergekit configuration."""
import copy

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from forgelib.merge import (MergeError, MergeRecipe, from_mergekit, is_mergekit_config, merge_models,
                            save_mergekit, save_recipe, to_mergekit)
from forgelib.merge.mergekit_yaml import evaluate_setting, layer_positions, merge_from_mergekit
from forgelib.merge.methods import slerp_pair
from forgelib.modelio import load_causal_lm
from helpers import perturbed_copy

# mergekit's README TIES example as merge cards publish it (the base listed without parameters), names replaced
TIES_DOC = """
models:
  - model: {trunk}
    # no parameters necessary for base model
  - model: {a}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {b}
    parameters:
      density: 0.5
      weight: 0.3
merge_method: ties
base_model: {trunk}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

# examples/linear.yml of mergekit, names replaced
LINEAR_DOC = """
models:
  - model: {trunk}
    parameters:
      weight: 1.0
  - model: {a}
    parameters:
      weight: 0.3
  - model: {b}
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""

# examples/gradient-slerp.yml of mergekit in its 'models:' form, with the self_attn gradient for every tensor
# (the example's per-tensor-name filters are refused, see test_filtered_parameters_are_refused)
SLERP_DOC = """
models:
  - model: {trunk}
  - model: {a}
merge_method: slerp
base_model: {trunk}
parameters:
  t: [0, 0.5, 0.3, 0.7, 1]
dtype: float16
"""


def _llama(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _family(trunk: torch.nn.Module, folder=None) -> dict:
    """The trunk and two perturbed children by name (saved under ``folder`` when given, named by path)."""
    models = {"trunk": trunk, "a": perturbed_copy(trunk, 1), "b": perturbed_copy(trunk, 2)}
    if folder is None:
        return models
    named = {}
    for key, model in models.items():
        model.save_pretrained(folder / key)
        named[str(folder / key)] = model
    return named


def _names(models: dict) -> dict:
    return dict(zip(("trunk", "a", "b"), models))


def _assert_same_tensors(one: torch.nn.Module, two: torch.nn.Module) -> None:
    s1, s2 = one.state_dict(), two.state_dict()
    assert s1.keys() == s2.keys()
    for key in s1:
        assert torch.equal(s1[key], s2[key]), key


def _mergekit_gta_ties(tensors, base, weights, density, normalize=True):
    """mergekit's TIES on one tensor as its source states it (generalized_task_arithmetic.py, sparsify.py):
    keep the int(density * n) largest |delta|, weighted deltas, sign of their sum elects, disjoint mean."""
    deltas = []
    for x, d in zip(tensors, density):
        delta = (x - base).reshape(-1)
        mask = torch.zeros_like(delta)
        mask[torch.argsort(delta.abs(), descending=True)[:int(d * delta.numel())]] = 1
        deltas.append(delta * mask)
    w = torch.tensor(weights).unsqueeze(-1)
    weighted = torch.stack(deltas) * w
    majority = (weighted.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
    agree = weighted.sign() == majority
    mixed, divisor = (weighted * agree).sum(dim=0), (w * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    return base + (mixed / divisor if normalize else mixed).reshape(base.shape)


# ---------------------------------------------------------------- documented configurations


def test_ties_doc_example_gives_the_tensors_of_the_hand_written_recipe(tiny_llama):
    models = _family(tiny_llama)
    recipe = from_mergekit(TIES_DOC.format(trunk="trunk", a="a", b="b"))
    assert (recipe.method, recipe.models, recipe.base, recipe.groups) == ("ties", ["a", "b"], "trunk", {})
    assert recipe.parameters == {"weights": [0.5, 0.3], "density": [0.5, 0.5], "normalize": True}
    assert recipe.config == {"dtype": "float16"}  # int8_mask only sets the sign mask's dtype: dropped
    hand = MergeRecipe("ties", ["a", "b"], "trunk", parameters={"weights": [0.5, 0.3], "density": 0.5,
                                                                 "normalize": True})
    merged = merge_models(recipe, {n: models[n] for n in ("a", "b")}, models["trunk"])
    _assert_same_tensors(merged, merge_models(hand, {n: models[n] for n in ("a", "b")}, models["trunk"]))
    name = "model.layers.1.self_attn.q_proj.weight"
    params = {n: dict(m.named_parameters())[name].detach() for n, m in models.items()}
    reference = _mergekit_gta_ties([params["a"], params["b"]], params["trunk"], [0.5, 0.3], [0.5, 0.5])
    assert torch.allclose(dict(merged.named_parameters())[name], reference, atol=1e-6)


def test_linear_doc_example_is_the_weighted_mean_of_all_three_models(tiny_llama):
    models = _family(tiny_llama)
    recipe = from_mergekit(LINEAR_DOC.format(trunk="trunk", a="a", b="b"))
    assert (recipe.models, recipe.base) == (["trunk", "a", "b"], "trunk")  # no base_model: all are averaged
    assert recipe.parameters == {"weights": [1.0, 0.3, 0.5]}
    merged = merge_models(recipe, models, models["trunk"]).state_dict()
    states = [m.state_dict() for m in models.values()]
    for key, value in merged.items():
        expected = (1.0 * states[0][key] + 0.3 * states[1][key] + 0.5 * states[2][key]) / 1.8
        assert torch.allclose(value, expected, atol=1e-6), key


def test_slerp_gradient_example_spreads_t_over_the_layers():
    models = _family(_llama(5))
    recipe = from_mergekit(SLERP_DOC.format(trunk="trunk", a="a"), num_layers=5)
    assert (recipe.method, recipe.models, recipe.base) == ("slerp", ["a"], "trunk")
    assert recipe.parameters == {"t": 0.0}  # non-layer tensors: the value at t = 0
    assert recipe.groups == {"layers.1": {"t": 0.5}, "layers.2": {"t": 0.3}, "layers.3": {"t": 0.7},
                             "layers.4": {"t": 1.0}}
    hand = MergeRecipe("slerp", ["a"], "trunk", parameters={"t": 0.0},
                       groups={f"layers.{i}": {"t": t} for i, t in enumerate([0, 0.5, 0.3, 0.7, 1])})
    merged = merge_models(recipe, {"a": models["a"]}, models["trunk"])
    _assert_same_tensors(merged, merge_models(hand, {"a": models["a"]}, models["trunk"]))
    got = dict(merged.named_parameters())
    for name, t in [("model.layers.2.mlp.up_proj.weight", 0.3), ("model.embed_tokens.weight", 0.0),
                    ("lm_head.weight", 0.0)]:
        ends = [dict(models[k].named_parameters())[name].detach() for k in ("trunk", "a")]
        assert torch.equal(got[name], slerp_pair(ends[0], ends[1], t)), name


# ---------------------------------------------------------------- mergekit's gradient rule


def test_layer_positions_follow_mergekit():
    assert layer_positions(3) == [0.0, 0.5, 1.0]
    assert layer_positions(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert layer_positions(1) == [1.0]  # one layer sits at t = 1 (plan_slice)


def test_two_point_gradient_over_three_layers():
    config = {"merge_method": "task_arithmetic", "base_model": "base",
              "models": [{"model": "a", "parameters": {"weight": [0, 1]}}]}
    recipe = from_mergekit(config, num_layers=3)
    assert recipe.parameters == {"weights": [0.0]}  # embeddings, norm, head: t = 0
    assert recipe.groups == {"layers.1": {"weights": [0.5]}, "layers.2": {"weights": [1.0]}}


def test_three_point_gradient_over_five_layers():
    # s = t * 2 at t = 0, .25, .5, .75, 1: 0.2, (0.2 + 1.0) / 2, 1.0, (1.0 + 0.4) / 2, 0.4
    values = [evaluate_setting([0.2, 1.0, 0.4], t) for t in layer_positions(5)]
    assert values == pytest.approx([0.2, 0.6, 1.0, 0.7, 0.4])
    config = {"merge_method": "slerp", "base_model": "base", "models": [{"model": "a"}],
              "parameters": {"t": [0.2, 1.0, 0.4]}}
    recipe = from_mergekit(config, num_layers=5)
    per_layer = [recipe.params_for(f"layers.{i}")["t"] for i in range(5)]
    assert per_layer == pytest.approx([0.2, 0.6, 1.0, 0.7, 0.4])
    assert recipe.params_for("embed")["t"] == recipe.params_for("head")["t"] == 0.2


def test_non_numeric_lists_step_and_one_layer_takes_the_last_value():
    assert [evaluate_setting(["x", "y", "z"], t) for t in (0.49, 0.5, 0.99, 1.0)] == ["x", "y", "y", "z"]
    config = {"merge_method": "slerp", "base_model": "base", "models": [{"model": "a"}],
              "parameters": {"t": [0.1, 0.9]}}
    assert from_mergekit(config, num_layers=1).groups == {"layers.0": {"t": 0.9}}


def test_per_model_gradient_and_top_level_fallback():
    config = {"merge_method": "ties", "base_model": "base", "parameters": {"density": 0.4},
              "models": [{"model": "a", "parameters": {"weight": 1.0, "density": [1, 0.5]}},
                         {"model": "b", "parameters": {"weight": 0.5}}]}
    recipe = from_mergekit(config, num_layers=3)
    assert recipe.parameters == {"weights": [1.0, 0.5], "density": [1.0, 0.4]}
    assert recipe.groups == {"layers.1": {"density": [0.75, 0.4]}, "layers.2": {"density": [0.5, 0.4]}}


# ---------------------------------------------------------------- writing recipes as mergekit configurations


def test_expressible_recipe_round_trips(tmp_path):
    recipe = MergeRecipe("ties", ["a", "b"], "base",
                         parameters={"weights": [0.5, 0.3], "density": [0.5, 0.7], "normalize": True,
                                     "lambda_": 0.9},
                         groups={"layers.1": {"density": [0.6, 0.7]}, "layers.2": {"density": [0.9, 0.7]}})
    config, notes = to_mergekit(recipe, num_layers=3)
    assert notes == []
    assert config["models"][1] == {"model": "b", "parameters": {"weight": 0.3, "density": 0.7}}
    assert config["models"][0]["parameters"]["density"] == [0.5, 0.6, 0.9]
    assert config["parameters"] == {"normalize": True, "lambda": 0.9}
    assert save_mergekit(recipe, tmp_path / "mk.yaml", num_layers=3) == []
    for source in (config, tmp_path / "mk.yaml"):
        back = from_mergekit(source, num_layers=3)
        assert (back.method, back.models, back.base) == (recipe.method, recipe.models, recipe.base)
        assert (back.parameters, back.groups) == (recipe.parameters, recipe.groups)


def test_group_size_two_becomes_a_gradient_with_the_same_tensors():
    models = _family(_llama(4))
    recipe = MergeRecipe("slerp", ["a"], "trunk", parameters={"t": 0.2}, group_size=2,
                         groups={"layers.1": {"t": 0.8}})
    config, notes = to_mergekit(recipe, num_layers=4)
    assert notes == [] and config["parameters"] == {"t": [0.2, 0.2, 0.8, 0.8]}
    assert config["base_model"] == "trunk" and [m["model"] for m in config["models"]] == ["trunk", "a"]
    back = from_mergekit(config, num_layers=4)
    _assert_same_tensors(merge_models(back, {"a": models["a"]}, models["trunk"]),
                         merge_models(recipe, {"a": models["a"]}, models["trunk"]))
    _, notes = to_mergekit(recipe)
    assert len(notes) == 1 and "pass num_layers" in notes[0]


def test_inexpressible_parts_are_noted_and_written_as_comments(tmp_path):
    recipe = MergeRecipe("dare_ties", ["a", "b"], "base", parameters={"weights": 0.5, "density": 0.6}, seed=7,
                         layer_path=[["merged", 0], ["base", 1]], config={"n_cycles": 2, "dtype": "bfloat16"},
                         groups={"head": {"density": 0.9}})
    config, notes = to_mergekit(recipe, num_layers=2)
    assert config["dtype"] == "bfloat16"
    assert config["models"][0] == {"model": "a", "parameters": {"weight": 0.5, "density": 0.6}}
    text = " | ".join(notes)
    for part in ("seed 7", "layer_path (2 layers)", "n_cycles=2", "'head': 0.9"):
        assert part in text, part
    path = tmp_path / "mk.yaml"
    save_mergekit(recipe, path, num_layers=2)
    lines = path.read_text().splitlines()
    assert lines[:len(notes)] == [f"# not expressible: {note}" for note in notes]
    assert yaml.safe_load(path.read_text()) == config


def test_passthrough_and_a_missing_base_cannot_be_written():
    with pytest.raises(MergeError, match="'passthrough' cannot be written"):
        to_mergekit(MergeRecipe("passthrough", ["a"], "base", layer_path=[["a", 0]]))
    with pytest.raises(MergeError, match="names no base, but mergekit's 'ties' needs base_model"):
        to_mergekit(MergeRecipe("ties", ["a", "b"]))


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("config, message", [
    ({"merge_method": "nuslerp", "models": [{"model": "a"}, {"model": "b"}]},
     r"mergekit merge method 'nuslerp' is not supported; supported methods: \['linear', 'task_arithmetic'"),
    ({"merge_method": "breadcrumbs_ties", "base_model": "x", "models": [{"model": "a"}]},
     "'breadcrumbs_ties' is not supported \\(our 'breadcrumbs' has no TIES sign consensus\\)"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]},
     "'slices'/'modules' configurations .* are not supported"),
    ({"merge_method": "ties", "base_model": "x", "models": [{"model": "a", "parameters": {"weight": 1}}],
      "tokenizer_source": "union"}, "tokenizer_source 'union'"),
    ({"merge_method": "ties", "base_model": "x", "models": [{"model": "a", "parameters": {"wieght": 1}}]},
     "model 'a' sets 'wieght', which mergekit's 'ties' does not take"),
    ({"merge_method": "ties", "base_model": "x", "models": [{"model": "a", "parameters": {"normalize": 1}}]},
     "model 'a' sets 'normalize', a global parameter"),
    ({"merge_method": "ties", "base_model": "x", "models": [{"model": "a"}]}, "model 'a' has no 'weight'"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1}}]}, "needs a 'base_model'"),
    ({"merge_method": "ties", "base_model": "x", "parameters": {"rescale": True},
      "models": [{"model": "a", "parameters": {"weight": 1}}]}, "rescale: true is not supported for 'ties'"),
    ({"merge_method": "breadcrumbs", "base_model": "x",
      "models": [{"model": "a", "parameters": {"weight": 1, "gamma": 0.01}},
                 {"model": "b", "parameters": {"weight": 1, "gamma": 0.02}}]}, "'gamma' differs between models"),
    ({"merge_method": "slerp", "base_model": "x", "models": [{"model": "a"}, {"model": "b"}],
      "parameters": {"t": 0.5}}, "exactly one other model"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": [1, 0]}}]}, "pass num_layers"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}], "out_dtype": "float16"},
     r"unsupported mergekit key\(s\) \['out_dtype'\]"),
])
def test_unsupported_configurations_fail_clearly(config, message):
    with pytest.raises(MergeError, match=message):
        from_mergekit(config)


def test_filtered_parameters_are_refused():
    # mergekit's examples/ties.yml: its third model's weight is filtered by tensor name
    text = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters: {density: [1, 0.7, 0.1], weight: 1.0}
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
"""
    with pytest.raises(MergeError, match="parameter 'weight' of model 'WizardLM/WizardMath-13B-V1.0' is filtered "
                                         "by tensor name \\('mlp'\\)"):
        from_mergekit(text, num_layers=40)
    unfiltered = text.replace("- filter: mlp\n          value: 0.5\n        ", "")
    assert from_mergekit(unfiltered, num_layers=40).parameters["weights"] == [1.0, 0]


# ---------------------------------------------------------------- forge merge


def _forge(*args) -> int:
    from forgelib.cli import main

    return main(["merge", *map(str, args)])


def test_forge_merge_runs_a_mergekit_config(tmp_path, tiny_llama, capsys):
    models = _family(tiny_llama, tmp_path)
    names = _names(models)
    config = tmp_path / "ties.yaml"
    config.write_text(TIES_DOC.format(**names))
    assert is_mergekit_config(yaml.safe_load(config.read_text()))
    assert _forge(config, "--out", tmp_path / "out") == 0
    assert f"merged model written to {tmp_path / 'out'}" in capsys.readouterr().out
    loaded = load_causal_lm(tmp_path / "out")
    assert next(loaded.parameters()).dtype == torch.float16  # the config's dtype
    halves = {n: copy.deepcopy(m).half() for n, m in models.items()}
    hand = MergeRecipe("ties", [names["a"], names["b"]], names["trunk"],
                       parameters={"weights": [0.5, 0.3], "density": 0.5, "normalize": True})
    _assert_same_tensors(loaded, merge_models(hand, halves, halves[names["trunk"]]))


def test_merge_from_mergekit_counts_layers_from_the_base():
    models = _family(_llama(5))
    model, recipe = merge_from_mergekit(SLERP_DOC.format(trunk="trunk", a="a"), lambda name: models[name])
    assert sorted(recipe.groups) == [f"layers.{i}" for i in range(1, 5)]
    assert next(model.parameters()).dtype == torch.float16


def test_forge_merge_reports_a_refused_config(tmp_path, capsys):
    config = tmp_path / "mk.yaml"
    config.write_text("merge_method: sce\nbase_model: x\nmodels: [{model: a}, {model: b}]\n")
    assert _forge(config, "--out", tmp_path / "out") == 2
    assert "forge: mergekit merge method 'sce' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_forge_merge_writes_a_recipe_as_mergekit(tmp_path, tiny_llama, capsys):
    names = _names(_family(tiny_llama, tmp_path))
    recipe = MergeRecipe("task_arithmetic", [names["a"], names["b"]], names["trunk"],
                         parameters={"weights": [0.7, 0.2]}, groups={"layers.1": {"weights": [0.1, 0.2]}},
                         layer_path=[["merged", 0], ["merged", 1]])
    path = save_recipe(recipe, tmp_path / "recipe.yaml")
    assert _forge(path, "--to-mergekit", tmp_path / "mk.yaml") == 0
    out, err = capsys.readouterr()
    assert f"mergekit configuration written to {tmp_path / 'mk.yaml'}" in out
    assert "not expressible in mergekit: layer_path (2 layers)" in err
    back = from_mergekit(tmp_path / "mk.yaml", num_layers=2)  # the layer count came from the base's config
    assert (back.parameters, back.groups) == (recipe.parameters, recipe.groups)
    assert not (tmp_path / "rebuilt").exists(), "--to-mergekit converts; it does not merge"
