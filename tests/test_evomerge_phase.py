"""Phase 2 against the right baselines: the trunk is a contender, the gate ranks accuracy first with the NLL as
tie-breaker, runtime settings are searched and stored in the recipe, and the benchmark's single-weight task
arithmetic at w=0 is the trunk. The real run uses hand-made tiny Cognate models (no Phase 1)."""
import copy
import json
import math

import pytest
import torch

from forgelib import paths
from forgelib.bench import evomerge as bench
from forgelib.merge import load_recipe, merge_models
from forgelib.merge.models import uniform_recipe
from forgelib.phases import GateFailedError, open_phase, run_phase
from forgelib.phases import evomerge as evo
from forgelib.registry import ModelRegistry
from forgelib.results import PhaseResult

QUIET = {"run": {"quiet": True, "tracking": "none"}}
ROLES = {"reasoning": {"n_cycles": 2, "n_latent": 1}, "memory": {"n_cycles": 2, "use_memory": True},
         "speed": {"n_cycles": 1, "halt_threshold": 0.3}}


def _row(acc, nll):
    return {"accuracy": acc, "answer_nll": nll, "score": acc - 0.05 * nll}


def _table(trunk, champion, parents=((0.5, 1.0), (0.4, 1.0), (0.3, 1.0)), uniform=(0.4, 1.2)):
    table = {"trunk": _row(*trunk), "champion": _row(*champion), "uniform_merge": _row(*uniform)}
    table.update({name: _row(*p) for name, p in zip(("reasoning", "memory", "speed"), parents)})
    return table


def _gate(table):
    checks = evo.gate_checks(table, ["reasoning", "memory", "speed"])
    return {c.name: c for c in checks}, all(c.passed for c in checks)


# --- the gate on hand-made tables ---------------------------------------------------------------------


def test_gate_fails_when_the_trunk_beats_the_champion():
    checks, passed = _gate(_table(trunk=(0.7, 0.9), champion=(0.6, 0.5)))
    assert not passed
    assert not checks["champion_acc_minus_trunk_acc"].passed
    assert checks["champion_acc_minus_trunk_acc"].value == pytest.approx(-0.1)
    # a lower NLL does not buy back accuracy; the tie-breaker is vacuous when the accuracies differ
    assert checks["trunk_nll_minus_champion_nll_at_acc_tie"].value == 0.0
    assert checks["champion_acc_minus_best_parent_acc"].passed and checks["champion_acc_minus_uniform_acc"].passed


def test_gate_passes_when_the_champion_leads_in_accuracy_even_with_a_worse_nll():
    checks, passed = _gate(_table(trunk=(0.6, 0.5), champion=(0.65, 0.9)))
    assert passed
    contenders = ("trunk", "best_parent", "uniform")
    assert set(checks) == {f"champion_acc_minus_{x}_acc" for x in contenders} | {
        f"{x}_nll_minus_champion_nll_at_acc_tie" for x in contenders}


@pytest.mark.parametrize("champion_nll, passes", [(0.79, True), (0.8, True), (0.81, False)])
def test_gate_breaks_an_exact_accuracy_tie_on_the_answer_nll(champion_nll, passes):
    checks, passed = _gate(_table(trunk=(0.6, 0.8), champion=(0.6, champion_nll)))
    assert passed is passes
    assert checks["champion_acc_minus_trunk_acc"].passed
    assert checks["trunk_nll_minus_champion_nll_at_acc_tie"].value == pytest.approx(0.8 - champion_nll)


def test_gate_compares_with_the_best_parent_by_accuracy_then_nll():
    parents = ((0.5, 1.0), (0.5, 0.7), (0.3, 0.1))  # memory ties reasoning on accuracy and wins on NLL
    table = _table(trunk=(0.4, 1.0), champion=(0.5, 0.8), parents=parents)
    assert evo.best_row(table, ["reasoning", "memory", "speed"]) == "memory"
    checks, passed = _gate(table)
    assert not passed and not checks["best_parent_nll_minus_champion_nll_at_acc_tie"].passed
    assert checks["best_parent_nll_minus_champion_nll_at_acc_tie"].value == pytest.approx(-0.1)


def test_gate_holds_the_champion_to_the_uniform_merge_too():
    checks, passed = _gate(_table(trunk=(0.4, 1.0), champion=(0.5, 0.8), uniform=(0.55, 1.5)))
    assert not passed and not checks["champion_acc_minus_uniform_acc"].passed


# --- tiny Cognate upstream ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """A trained tiny Cognate trunk (n_cycles 2, memory modules built) and three badly perturbed specialists
    with their own runtime settings, plus the tokenizer."""
    from forgelib.data.tasks import FAMILIES, build_mix, format_sample
    from forgelib.data.tokenizer import encode_samples, lm_batches, train_tokenizer
    from forgelib.models import CognateConfig, CognateForCausalLM

    texts = [format_sample(s, with_steps=True) for s in build_mix({f: 1 for f in FAMILIES}, (1, 2), 600, "train", 0)]
    tok = train_tokenizer(texts, vocab_size=320)
    torch.manual_seed(0)
    config = CognateConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=True, n_cycles=2, memory_modules=True, memory_chunk_size=16,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)
    trunk = CognateForCausalLM(config)
    train = build_mix({"arith": 1, "logic": 1}, (1, 1), 256, "train", 1)
    batches = lm_batches(encode_samples(tok, train, 96, with_steps=True, drop_long=True), 32, seed=0, epochs=None)
    opt = torch.optim.AdamW(trunk.parameters(), lr=3e-3)
    trunk.train()
    for _ in range(40):
        batch = next(batches)
        loss = trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trunk.eval()
    specialists = {}
    for i, (role, settings) in enumerate(ROLES.items()):
        child = copy.deepcopy(trunk)
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in child.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        for key, value in settings.items():
            setattr(child.config, key, value)
        specialists[role] = child.eval()
    return trunk, specialists, tok


def _small_params(**changes) -> evo.Params:
    values = dict(families=["arith", "logic"], fitness_per_family=3, test_per_family=3, budget=18,
                  per_layer=False, methods=["task_arithmetic", "ties"])
    return evo.Params(**{**values, **changes})


def test_runtime_choice_changes_what_is_evaluated_and_lands_in_the_recipe(tiny):
    trunk, specialists, _ = tiny
    params = _small_params()
    seen = []

    def fitness(model):  # rewards one runtime setting, and (a little) a small distance to the trunk
        cfg = model.config
        seen.append((cfg.n_cycles, cfg.use_memory))
        dist = sum(float((p - q).pow(2).sum()) for p, q in zip(model.parameters(), trunk.parameters()))
        return (1.0 if (cfg.n_cycles, cfg.use_memory) == (1, True) else 0.0) - 1e-6 * dist

    found = evo.search(params, specialists, trunk, fitness, seed=0)
    choices = {(c["n_cycles"], c["use_memory"]) for c in params.runtime_choices}
    assert set(seen) == choices, "every runtime choice is really evaluated"
    assert found.search_runtime == {"n_cycles": 1, "use_memory": True}
    assert found.champion.config == {"n_cycles": 1, "use_memory": True}
    assert merge_models(found.champion, specialists, trunk).config.n_cycles == 1
    stages = [e["stage"] for e in found.evaluations]
    n = len(params.runtime_choices)
    assert stages.count("runtime_screen") == n
    assert stages.count("runtime_repick") == params.runtime_top_k * (n - 1)
    assert len(found.evaluations) == params.budget
    assert trunk.config.n_cycles == 2 and not trunk.config.use_memory, "the trunk's own settings are untouched"


def test_runtime_repick_can_overrule_the_screen(tiny):
    trunk, specialists, _ = tiny
    params = _small_params(runtime_choices=[{"n_cycles": 2}, {"n_cycles": 1}])
    uniform = merge_models(uniform_recipe(list(specialists), "trunk"), specialists, trunk)
    u_state = {k: v.clone() for k, v in uniform.state_dict().items()}

    def fitness(model):  # the uniform merge prefers 2 cycles, every other recipe prefers 1 cycle (and scores more)
        is_uniform = all(torch.equal(v, u_state[k]) for k, v in model.state_dict().items())
        if is_uniform:
            return 1.0 if model.config.n_cycles == 2 else 0.0
        return 2.0 if model.config.n_cycles == 1 else 0.5

    found = evo.search(params, specialists, trunk, fitness, seed=0)
    assert found.search_runtime == {"n_cycles": 2}
    assert found.champion.config == {"n_cycles": 1} and found.champion_fitness == 2.0


def test_runtime_settings_dedupe_for_other_architectures_and_refuse_typos_for_cognate(tiny, tiny_llama):
    trunk, _, _ = tiny
    params = _small_params(runtime={"n_latent": 0})
    assert evo.runtime_settings(params, trunk)[0] == {"n_latent": 0, "n_cycles": 1, "use_memory": False}
    assert evo.runtime_settings(params, tiny_llama) == [{}], "Llama has none of the switches: one setting"
    with pytest.raises(ValueError, match=r"\['n_cycle'\] are not fields of the Cognate config"):
        evo.runtime_settings(_small_params(runtime_choices=[{"n_cycle": 1}]), trunk)


def test_budget_too_small_for_screen_and_repick_is_a_clear_error():
    with pytest.raises(ValueError, match="budget 14 is too small: the unmerged candidates take 4, the runtime "
                                         "screen 4 and the re-pick 6 evaluations, leaving 0"):
        evo.search_budget(_small_params(budget=14), 4)
    assert evo.search_budget(_small_params(budget=14, unmerged_candidates=False), 4) == (4, 6)


def test_old_runtime_key_still_loads_and_new_defaults_hold(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path))
    ctx = open_phase("evomerge", "parameters/smoke.yaml", {"evomerge": {"runtime": {"n_latent": 0}}})
    assert ctx.params.runtime["n_latent"] == 0  # the old key: settings shared by every runtime choice
    defaults = evo.Params()
    assert defaults.with_steps is True and defaults.loss_weight == 0.05 and defaults.runtime_top_k == 2
    assert {"n_cycles": 2, "use_memory": False} in defaults.runtime_choices


# --- one real run on the tiny upstream ------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(tiny, tmp_path_factory):
    trunk, specialists, tok = tiny
    root = tmp_path_factory.mktemp("evomerge-upstream")
    mp = pytest.MonkeyPatch()
    mp.setenv("FORGE_OUTPUTS", str(root / "out"))
    up = PhaseResult("handmade", 1, "tiny", status="ok")
    with ModelRegistry(paths.registry_path()) as reg:
        for role, model in {"trunk": trunk, **specialists, "tokenizer": None}.items():
            folder = root / role
            if model is not None:
                model.save_pretrained(folder)
            tok.save_pretrained(folder)
            up.models[role] = {"path": str(folder), "registry_id": reg.register_model(
                session_id="tiny", phase_name="handmade", model_name=role, model_path=str(folder))}
    yield up
    mp.undo()


def test_real_run_fails_its_gate_when_the_trunk_beats_the_merges(upstream):
    overrides = {**QUIET, "evomerge": {"budget": 14, "per_layer": False, "families": ["arith", "logic"],
                                       "fitness_per_family": 3, "test_per_family": 4,
                                       "unmerged_candidates": False, "gate_z": 0.0}}
    ctx = open_phase("evomerge", "parameters/smoke.yaml", overrides, session="tiny", upstream=upstream)
    with pytest.raises(GateFailedError, match="champion_acc_minus_trunk_acc|trunk_nll_minus_champion_nll"):
        run_phase(ctx)
    result = PhaseResult.load(ctx.dir)
    assert result.status == "failed"
    report = json.loads((ctx.dir / "report.json").read_text())
    test = report["test"]
    assert list(test) == ["trunk", "reasoning", "memory", "speed", "uniform_merge", "champion"]
    assert not evo.ranks_at_least(test["champion"], test["trunk"]), "the specialists are wrecked copies"
    # each parent and the trunk were scored with their own saved settings
    assert report["settings"]["trunk"]["n_cycles"] == 2 and not report["settings"]["trunk"]["use_memory"]
    assert report["settings"]["speed"]["n_cycles"] == 1 and report["settings"]["memory"]["use_memory"]
    assert report["with_steps"] is True and len(report["evolution"]["evaluations"]) == 14
    assert report["champion_source"] == "merge" and result.metrics["champion_above_all"] is False
    # the chosen runtime is in the recipe, and the recipe rebuilds the saved champion bit-identically
    recipe = load_recipe(paths.resolve(ctx.dir / "recipe.yaml"))
    assert recipe.config == report["runtime"]["champion_runtime"] == report["champion_recipe"]["config"]
    assert recipe.config in report["runtime"]["choices"]
    from forgelib.merge import rebuild_from_recipe
    from forgelib.merge.models import verify_sources
    from forgelib.models.loading import load_causal_lm

    assert verify_sources(recipe, paths.resolve) == [], "the recipe carries the registered checksum of every source"

    rebuilt = rebuild_from_recipe(ctx.dir / "recipe.yaml", lambda p: load_causal_lm(paths.resolve(p)))
    saved = load_causal_lm(paths.resolve(result.models["champion"]["path"]))
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in rebuilt.state_dict().items())
    assert {k: getattr(rebuilt.config, k) for k in recipe.config} == recipe.config
    assert {k: getattr(saved.config, k) for k in recipe.config} == recipe.config
    metrics = result.metrics
    for key in ("champion_test_acc", "trunk_test_acc", "best_parent_test_acc", "uniform_test_acc",
                "champion_test_nll", "trunk_test_nll", "best_parent_test_nll", "uniform_test_nll"):
        assert key in metrics and math.isfinite(metrics[key])


def test_real_run_hands_on_the_trunk_when_no_merge_beats_it(upstream):
    """With the unmerged candidates (the default) the wrecked merges lose to the trunk on the fitness split: the
    trunk itself is the champion, bit for bit, the gate ties it exactly, and the metrics say so."""
    overrides = {**QUIET, "evomerge": {"budget": 18, "per_layer": False, "families": ["arith", "logic"],
                                       "fitness_per_family": 3, "test_per_family": 4}}
    ctx = open_phase("evomerge", "parameters/smoke.yaml", overrides, session="tiny2", upstream=upstream)
    result = run_phase(ctx)
    report = json.loads((ctx.dir / "report.json").read_text())
    stages = [e["stage"] for e in report["evolution"]["evaluations"]]
    assert stages[:4] == ["unmerged"] * 4 and len(stages) == 18
    assert [e["source"] for e in report["evolution"]["evaluations"][:4]] == ["trunk", "reasoning", "memory", "speed"]
    assert report["champion_source"] == result.metrics["champion_source"] == "trunk"
    assert report["champion_recipe"]["method"] == "task_arithmetic"
    assert result.gate_passed and result.metrics["champion_above_all"] is False
    test = report["test"]
    assert test["champion"]["correct"] == test["trunk"]["correct"]
    assert result.metrics["champion_minus_trunk_acc_se"] == 0.0
    from forgelib.models.loading import load_causal_lm

    saved = load_causal_lm(paths.resolve(result.models["champion"]["path"]))
    trunk_state = load_causal_lm(paths.resolve(upstream.models["trunk"]["path"])).state_dict()
    assert all(torch.equal(v, trunk_state[k]) for k, v in saved.state_dict().items())
    assert saved.config.n_cycles == 2 and not saved.config.use_memory, "the trunk's own settings"


def test_unmerged_recipes_rebuild_the_trunk_and_each_parent_exactly(tiny):
    trunk, specialists, _ = tiny
    keys = ["n_cycles", "use_memory"]
    for source, recipe in evo.unmerged_recipes(_small_params(), specialists, trunk, keys):
        model = merge_models(recipe, specialists, trunk)
        want = trunk if source == "trunk" else specialists[source]
        assert all(torch.equal(v, want.state_dict()[k]) for k, v in model.state_dict().items()), source
        assert {k: getattr(model.config, k) for k in keys} == {k: getattr(want.config, k) for k in keys}


# --- the paired standard error ------------------------------------------------------------------------


def test_paired_se_matches_the_formula_on_a_worked_example():
    a = {"correct": [1, 1, 0, 1, 0, 1]}
    b = {"correct": [1, 0, 0, 1, 1, 0]}
    # differences 0, 1, 0, 0, -1, 1: mean 1/6, sample variance (sum of squares 3 - 6 * (1/6)^2) / 5 = 17/30
    assert evo.paired_se(a, b) == pytest.approx(math.sqrt(17 / 30 / 6))
    assert evo.paired_se(a, a) == 0.0 and evo.paired_se(a, {"accuracy": 0.5}) == 0.0


def test_gate_margin_lets_a_champion_trail_within_noise_but_not_beyond():
    n = 100
    trunk = {"accuracy": 0.74, "answer_nll": 0.1, "correct": [1] * 74 + [0] * 26}
    close = [1] * 72 + [0] * 26 + [1, 1]  # 72 shared + 2 the trunk misses; loses 4 the trunk gets: -0.02
    close[70] = close[71] = close[72] = close[73] = 0
    champ = {"accuracy": sum(close) / n, "answer_nll": 0.1, "correct": close}
    assert champ["accuracy"] == pytest.approx(0.72)
    table = {"trunk": trunk, "champion": champ, "uniform_merge": trunk, "reasoning": trunk, "memory": trunk,
             "speed": trunk}
    se = evo.paired_se(champ, trunk)
    strict = {c.name: c for c in evo.gate_checks(table, ["reasoning", "memory", "speed"])}
    loose = {c.name: c for c in evo.gate_checks(table, ["reasoning", "memory", "speed"], z=1.645)}
    assert not strict["champion_acc_minus_trunk_acc"].passed
    assert loose["champion_acc_minus_trunk_acc"].passed and loose["champion_acc_minus_trunk_acc"].bound == \
        pytest.approx(-1.645 * se)
    far = [0] * 10 + [1] * 64 + [0] * 26  # misses 10 the trunk gets and gains none: -0.10, far beyond the margin
    table["champion"] = {"accuracy": 0.64, "answer_nll": 0.1, "correct": far}
    loose = {c.name: c for c in evo.gate_checks(table, ["reasoning", "memory", "speed"], z=1.645)}
    assert not loose["champion_acc_minus_trunk_acc"].passed


def test_gate_z_must_not_be_negative():
    with pytest.raises(ValueError, match="gate_z must be >= 0"):
        evo.Params(gate_z=-1.0)


# --- benchmark: single-weight task arithmetic ---------------------------------------------------------


def test_single_weight_at_zero_is_the_trunk_exactly(tiny):
    trunk, specialists, _ = tiny
    merged = merge_models(bench.single_weight_recipe(list(specialists), "trunk", 0.0), specialists, trunk)
    state = trunk.state_dict()
    assert merged.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in merged.state_dict().items())


def test_single_weight_search_picks_the_best_weight_on_fitness(tiny):
    trunk, specialists, _ = tiny
    name = "model.embed_tokens.weight" if "model.embed_tokens.weight" in trunk.state_dict() else \
        next(iter(trunk.state_dict()))
    delta = sum(m.state_dict()[name] - trunk.state_dict()[name] for m in specialists.values())
    target = trunk.state_dict()[name] + 0.3 * delta

    def fitness(model):
        return -float((model.state_dict()[name] - target).pow(2).sum()) + 0.1 * (model.config.n_cycles == 1)

    recipe, value = bench.single_weight_search(specialists, trunk, fitness, _small_params())
    assert recipe.parameters["weights"] == [0.3] * 3 and recipe.config["n_cycles"] == 1
    assert value == pytest.approx(0.1, abs=1e-6)


class _FakeScorer:
    """Scores from the weights alone (fast): accuracy falls with the distance to the trunk."""

    def __init__(self, trunk, samples=()):
        self.trunk, self.samples = trunk, list(samples)

    def details(self, model):
        with torch.no_grad():
            dist = sum(float((p - q).pow(2).sum()) for p, q in zip(model.parameters(), self.trunk.parameters()))
        acc = round(1.0 / (1.0 + dist), 3)
        return {"accuracy": acc, "answer_nll": dist, "score": acc - 0.05 * dist}

    def __call__(self, model):
        return self.details(model)["score"]


def test_benchmark_seed_has_the_trunk_and_single_weight_contenders(tiny):
    trunk, specialists, _ = tiny
    scorer = _FakeScorer(trunk)
    row = bench.run_seed(specialists, trunk, scorer, scorer, _small_params(), budget=14, seed=0,
                         grid=[0.0, 0.5, 1.0])
    assert set(row) == {"evolved", "trunk", "single_weight", "uniform", "ties", "dare_ties"}
    assert row["single_weight"]["weight"] == 0.0, "closest to the trunk wins under this fake score"
    assert row["single_weight"]["accuracy"] == row["trunk"]["accuracy"] == 1.0
    summary = bench.summarize([row])
    assert summary["seeds_evolved_at_least"]["trunk"] == 0
    assert "single_weight" in summary["median_test_accuracy"]
    assert "only the search" in bench.__doc__


def test_benchmark_refuses_a_phase1_folder_with_rerun_phase1(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--rerun-phase1", "--phase1", "somewhere"])
    assert exc.value.code == 2 and "leave out --phase1" in capsys.readouterr().err
