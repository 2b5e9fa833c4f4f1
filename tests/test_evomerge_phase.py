"""Phase 2 against the right baselines: the trunk is a contender, the final selection re-scores the finalists on
fresh questions, the gate holds the champion to the trunk family by family (the guard) and to the best parent and
the uniform merge pooled (``forgelib.stats``' paired non-inferiority), runtime settings are searched and stored in
the recipe, and the benchmark's single-weight task arithmetic at w=0 is the trunk. The real run uses hand-made tiny
Cognate models (no Phase 1: the upstream result names its suite)."""
import copy
import json
import math

import pytest
import torch

from forgelib import paths
from forgelib.bench import evomerge as bench
from forgelib.merge import MergeRecipe, load_recipe, merge_models
from forgelib.merge.models import uniform_recipe
from forgelib.phases import GateFailedError, open_phase, run_phase
from forgelib.phases import evomerge as evo
from forgelib.registry import ModelRegistry
from forgelib.results import PhaseResult
from forgelib.stats import noninferior, noninferior_over
from forgelib.suite import GuardParams, GuardReport

QUIET = {"run": {"quiet": True, "tracking": "none"}}
ROLES = {"reasoning": {"n_cycles": 2, "n_latent": 1}, "memory": {"n_cycles": 2, "use_memory": True},
         "speed": {"n_cycles": 1, "halt_threshold": 0.3}}
PARENTS = ["reasoning", "memory", "speed"]
SUITE = {"arith": [1, 1], "logic": [1, 1]}


# --- the contender checks on hand-made answers --------------------------------------------------------


def _answers(right: int, n: int = 60, first: int = 0) -> list[int]:
    """``n`` answers, ``right`` of them right, starting at question ``first`` (wrapping)."""
    out = [0] * n
    for i in range(right):
        out[(first + i) % n] = 1
    return out


def _contenders(champion, parents=((40, 0.5), (40, 0.4), (20, 0.1)), uniform=(30, 0.5), trunk=(30, 0.5)):
    """Rows as ``test_table`` writes them: per contender the answers per family (arith and logic, 60 questions each:
    the same right-answer count in both), the pooled accuracy and the answer NLL."""
    def row(right, nll):
        answers = {"arith": _answers(right), "logic": _answers(right, first=10)}
        return {"accuracy": right / 60, "answer_nll": nll, "answers": answers}

    rows = {"trunk": row(*trunk), "champion": row(*champion), "uniform_merge": row(*uniform)}
    rows.update({name: row(*p) for name, p in zip(PARENTS, parents)})
    return rows


def _report(rows, margin=0.1):
    questions = {f: [f"{f}-{i}" for i in range(60)] for f in ("arith", "logic")}
    answers = {f: {"before": rows["trunk"]["answers"][f], "after": rows["champion"]["answers"][f]} for f in questions}
    families = {f: noninferior(f, a["before"], a["after"], margin) for f, a in answers.items()}
    pooled = noninferior_over("all", {f: (a["before"], a["after"]) for f, a in answers.items()}, margin)
    return GuardReport(margin, families, pooled, answers, {f: (1, 1) for f in questions}, 0.0, questions=questions)


def _checks(rows, **params):
    guard = GuardParams()
    checks, verdicts = evo.contender_checks(_report(rows), rows, PARENTS, evo.Params(**params), guard)
    return {c.name: c for c in checks}, verdicts


def _strata(rows, reference, candidate):
    """The per-family (before, after) answers the suite-mean verdict (forgelib.stats.noninferior_over) reads."""
    return {f: (rows[reference]["answers"][f], rows[candidate]["answers"][f]) for f in ("arith", "logic")}


def test_champion_is_held_to_the_best_parent_and_the_uniform_merge_pooled():
    rows = _contenders(champion=(40, 0.5))  # ties the best parent: the same answers
    checks, verdicts = _checks(rows)
    assert set(checks) == {"champion_minus_best_parent_acc_lower_bound", "champion_minus_uniform_acc_lower_bound"}
    guard = GuardParams()
    for label, name in (("best_parent", "memory"), ("uniform", "uniform_merge")):
        # the verdict over the guard's families (each weighing the same) is forgelib.stats' paired rule at `margin`
        want = noninferior_over(f"champion_vs_{label}", _strata(rows, name, "champion"), 0.05, guard.confidence,
                                guard.power)
        assert verdicts[label] == want.as_row()
        assert checks[f"champion_minus_{label}_acc_lower_bound"].value == want.lower
        assert checks[f"champion_minus_{label}_acc_lower_bound"].bound == -0.05
        assert checks[f"champion_minus_{label}_acc_lower_bound"].passed
    assert verdicts["best_parent"]["n"] == 120 and verdicts["best_parent"]["diff"] == 0.0


def test_best_parent_is_chosen_by_accuracy_then_nll():
    rows = _contenders(champion=(40, 0.5), parents=((40, 0.5), (40, 0.4), (20, 0.1)))
    assert evo.best_row(rows, PARENTS) == "memory"  # ties reasoning on accuracy, lower NLL
    rows["memory"]["answers"] = {"arith": _answers(40, first=20), "logic": _answers(40, first=30)}  # other questions
    _, verdicts = _checks(rows)
    assert verdicts["best_parent"]["name"] == "champion_vs_best_parent"
    want = noninferior_over("x", _strata(rows, "memory", "champion"), 0.05, 0.95, 0.999)
    assert verdicts["best_parent"]["lower"] == want.lower and verdicts["best_parent"]["discordance"] > 0


def test_champion_trailing_the_best_parent_beyond_the_margin_fails():
    rows = _contenders(champion=(25, 0.3), parents=((40, 0.5), (45, 0.6), (20, 0.1)), uniform=(20, 0.5))
    checks, verdicts = _checks(rows)
    best = checks["champion_minus_best_parent_acc_lower_bound"]
    assert not best.passed and verdicts["best_parent"]["diff"] == pytest.approx(-20 / 60, abs=1e-4)
    assert checks["champion_minus_uniform_acc_lower_bound"].passed  # it beats the uniform merge
    wide = _checks(rows, margin=0.6)[0]  # the margin is the parameter's
    assert wide["champion_minus_best_parent_acc_lower_bound"].passed


def test_champion_trailing_the_uniform_merge_fails_even_above_every_parent():
    rows = _contenders(champion=(40, 0.5), parents=((35, 0.5), (30, 0.4), (20, 0.1)), uniform=(56, 0.5))
    checks, _ = _checks(rows)
    assert checks["champion_minus_best_parent_acc_lower_bound"].passed
    assert not checks["champion_minus_uniform_acc_lower_bound"].passed


def test_a_tie_on_too_few_questions_fails_and_says_how_many_are_needed():
    rows = _contenders(champion=(40, 0.5))
    for row in rows.values():  # only 6 questions per family: a tie cannot be told from a loss of 0.05
        row["answers"] = {f: a[:6] for f, a in row["answers"].items()}
    report = _report(rows)
    report.questions = {f: q[:6] for f, q in report.questions.items()}
    checks, _ = evo.contender_checks(report, rows, PARENTS, evo.Params(), GuardParams())
    best = {c.name: c for c in checks}["champion_minus_best_parent_acc_lower_bound"]
    assert not best.passed and "too few questions to decide: 12 asked" in best.note


# --- tiny Cognate upstream ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """A trained tiny Cognate trunk (n_cycles 2, memory modules built) and three badly perturbed specialists
    with their own runtime settings, plus the tokenizer."""
    from forgelib.data.tasks import build_mix, format_sample, suite_families
    from forgelib.data.tokenizer import encode_samples, lm_batches, train_tokenizer
    from forgelib.models import CognateConfig, CognateForCausalLM

    mix = {f: 1 for f in suite_families()}
    texts = [format_sample(s, with_steps=True) for s in build_mix(mix, (1, 2), 600, "train", 0)]
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
    values = dict(families=["arith", "logic"], fitness_per_family=3, select_per_family=3, budget=18,
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
    # the champion (the first of the ties: the unmerged speed parent) runs 1 cycle; an unmerged parent also keeps
    # the stage settings in which the parents differ from the trunk (evo.own_keys)
    assert found.champion.config["n_cycles"] == 1 and found.champion_fitness == 2.0


def test_runtime_settings_dedupe_for_other_architectures_and_refuse_typos_for_cognate(tiny, tiny_llama):
    trunk, _, _ = tiny
    params = _small_params(runtime={"n_latent": 0})
    assert evo.runtime_settings(params, trunk)[0] == {"n_latent": 0, "n_cycles": 1, "use_memory": False}
    assert evo.runtime_settings(params, tiny_llama) == [{}], "Llama has none of the switches: one setting"
    with pytest.raises(ValueError, match=r"runtime_choices\[0\]: unknown key\(s\) \['n_cycle'\]; allowed keys"):
        _small_params(runtime_choices=[{"n_cycle": 1}])  # refused when the parameters load, before any run


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
    assert (defaults.margin, defaults.finalists, defaults.select_per_family) == (0.05, 4, 120)


@pytest.mark.parametrize("key", ["test_per_family", "gate_z"])
def test_removed_keys_are_refused(tmp_path, monkeypatch, key):
    from forgelib.params import ParameterError

    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path))
    with pytest.raises(ParameterError, match=key):
        open_phase("evomerge", "parameters/smoke.yaml", {"evomerge": {key: 1}})


@pytest.mark.parametrize("bad, match", [({"margin": 0.0}, "margin must lie in"), ({"margin": 1.0}, "margin"),
                                        ({"finalists": 0}, "finalists"), ({"select_per_family": 0}, "select_per")])
def test_bad_selection_and_margin_parameters_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        evo.Params(**bad)


# --- the final selection ------------------------------------------------------------------------------


class _TargetScorer:
    """Scores a model by its distance to ``target``'s weights (fast, no generation): the selection set's opinion."""

    def __init__(self, target):
        self.target, self.samples, self.calls = target, [], 0

    def details(self, model):
        self.calls += 1
        with torch.no_grad():
            dist = sum(float((p - q).pow(2).sum()) for p, q in zip(model.parameters(), self.target.parameters()))
        acc = 1.0 / (1.0 + dist)
        return {"accuracy": acc, "answer_nll": dist, "score": acc - 0.05 * dist}

    def __call__(self, model):
        return self.details(model)["score"]


def test_final_selection_picks_the_best_finalist_on_the_selection_set(tiny):
    """The search prefers merges near the trunk; the selection set prefers the memory parent itself: the finalists
    (trunk, every parent, the uniform merge, the best merges, the search's champion) are re-scored and the memory
    parent, which the search ranked low, is the champion."""
    trunk, specialists, _ = tiny
    params = _small_params(finalists=2)
    found = evo.search(params, specialists, trunk, _TargetScorer(trunk), seed=0)
    assert found.source == "trunk", "the search's own champion: the trunk (distance 0)"
    select = _TargetScorer(specialists["memory"])
    finals = evo.final_selection(found, params, specialists, trunk, select)
    assert finals[0]["source"] == "memory" and finals[0]["method"] == "linear"
    assert [r["fitness"] for r in finals] == sorted((r["fitness"] for r in finals), reverse=True)
    sources = [r["source"] for r in finals]
    assert sorted(s for s in sources if s != "merge") == sorted(["trunk", *PARENTS])
    stages = [r["stage"] for r in finals]
    assert stages.count("runtime_screen") == 1  # the uniform merge under the screened runtime
    assert sum(s in ("recipe_search", "runtime_repick") for s in stages) <= params.finalists
    assert select.calls == len(finals), "each distinct finalist scored once on the selection set"
    assert len({json.dumps(r["recipe"], sort_keys=True) for r in finals}) == len(finals)
    # each row's fitness is the selection score of the model its recipe builds; search_fitness is the search's
    for row in finals[:3]:
        model = merge_models(MergeRecipe.from_dict(row["recipe"]), specialists, trunk)
        assert row["fitness"] == pytest.approx(select(model))
    memory = finals[0]
    assert memory["search_fitness"] < found.champion_fitness and memory["stage"] == "unmerged"


# --- one real run on the tiny upstream ------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(tiny, tmp_path_factory):
    trunk, specialists, tok = tiny
    root = tmp_path_factory.mktemp("evomerge-upstream")
    mp = pytest.MonkeyPatch()
    mp.setenv("FORGE_OUTPUTS", str(root / "out"))
    up = PhaseResult("handmade", 1, "tiny", status="ok", suite=SUITE)  # no Phase 1 to take the suite from
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


GUARD = {"guard": {"margin": 0.2, "max_questions": 24}}


def test_real_run_fails_its_gate_when_the_trunk_beats_the_merges(upstream):
    """Without the unmerged candidates the champion is a merge of wrecked copies: the guard sees the trunk's logic
    answers lost and the phase fails; the report, the test table and the recipe are still written."""
    overrides = {**QUIET, **GUARD, "evomerge": {"budget": 14, "per_layer": False, "families": ["arith", "logic"],
                                                "fitness_per_family": 3, "select_per_family": 3, "finalists": 2,
                                                "unmerged_candidates": False}}
    ctx = open_phase("evomerge", "parameters/smoke.yaml", overrides, session="tiny", upstream=upstream)
    with pytest.raises(GateFailedError, match="keeps_logic"):
        run_phase(ctx)
    result = PhaseResult.load(ctx.dir)
    assert result.status == "failed"
    report = json.loads((ctx.dir / "report.json").read_text())
    test = report["test"]
    assert list(test) == ["trunk", "reasoning", "memory", "speed", "uniform_merge", "champion"]
    assert not evo.ranks_at_least(test["champion"], test["trunk"]), "the specialists are wrecked copies"
    # the guard asked the trunk and the champion the same questions of the input's suite
    guard = json.loads((ctx.dir / "guard.json").read_text())
    assert guard["suite"] == SUITE and guard["labels"] == ["trunk", "champion"] and not guard["passed"]
    logic = guard["families"]["logic"]  # the trunk's logic answers are lost, not merely undecided
    assert logic["diff"] < -0.2 and not logic["passed"] and not logic["note"]
    assert {g.name for g in result.gate if not g.passed} >= {"keeps_logic"}
    for family in SUITE:
        answers = guard["answers"][family]
        assert test["trunk"]["per_family"][family] == pytest.approx(sum(answers["before"]) / len(answers["before"]))
        assert test["champion"]["per_family"][family] == pytest.approx(sum(answers["after"]) / len(answers["after"]))
    assert report["n_test"] == sum(len(a["before"]) for a in guard["answers"].values())
    # every row's score is its accuracy less the weighted NLL (the notebook's score table reads it)
    from forgelib.viz.evomerge import score_frame

    for row in test.values():
        assert row["score"] == pytest.approx(row["accuracy"] - 0.05 * row["answer_nll"])
    assert list(score_frame(report).index) == [*test, "chance"]
    # each parent and the trunk were scored with their own saved settings
    assert report["settings"]["trunk"]["n_cycles"] == 2 and not report["settings"]["trunk"]["use_memory"]
    assert report["settings"]["speed"]["n_cycles"] == 1 and report["settings"]["memory"]["use_memory"]
    assert report["with_steps"] is True and len(report["evolution"]["evaluations"]) == 14
    assert report["champion_source"] == "merge" and report["final_selection"][0]["source"] == "merge"
    assert report["n_select"] == 3 * 2
    # the chosen runtime is in the recipe, and the recipe rebuilds the saved champion bit-identically
    recipe = load_recipe(paths.resolve(ctx.dir / "recipe.yaml"))
    assert recipe.config == report["runtime"]["champion_runtime"] == report["champion_recipe"]["config"]
    assert recipe.config in report["runtime"]["choices"]
    from forgelib.merge import rebuild_from_recipe
    from forgelib.merge.models import verify_sources
    from forgelib.modelio import load_causal_lm

    assert verify_sources(recipe, paths.resolve) == [], "the recipe carries the registered checksum of every source"

    rebuilt = rebuild_from_recipe(ctx.dir / "recipe.yaml", lambda p: load_causal_lm(paths.resolve(p)))
    saved = load_causal_lm(paths.resolve(result.models["champion"]["path"]))
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in rebuilt.state_dict().items())
    assert {k: getattr(rebuilt.config, k) for k in recipe.config} == recipe.config
    assert {k: getattr(saved.config, k) for k in recipe.config} == recipe.config
    metrics = result.metrics
    assert metrics["champion_test_acc"] == round(test["champion"]["accuracy"], 4)
    assert metrics["best_parent_test_acc"] == round(test[metrics["best_parent"]]["accuracy"], 4)
    for key in ("champion_test_nll", "trunk_test_nll", "best_parent_test_nll", "uniform_test_nll"):
        assert math.isfinite(metrics[key])


def test_real_run_hands_on_the_trunk_when_no_merge_beats_it(upstream):
    """With the unmerged candidates (the default) the wrecked merges lose to the trunk on the selection set: the
    trunk itself is the champion, bit for bit, the guard finds every family's answers unchanged, and the metrics say
    so."""
    overrides = {**QUIET, **GUARD, "evomerge": {"budget": 18, "per_layer": False, "families": ["arith", "logic"],
                                                "fitness_per_family": 3, "select_per_family": 4, "finalists": 2,
                                                "margin": 0.3}}
    ctx = open_phase("evomerge", "parameters/smoke.yaml", overrides, session="tiny2", upstream=upstream)
    result = run_phase(ctx)
    report = json.loads((ctx.dir / "report.json").read_text())
    stages = [e["stage"] for e in report["evolution"]["evaluations"]]
    assert stages[:4] == ["unmerged"] * 4 and len(stages) == 18
    assert [e["source"] for e in report["evolution"]["evaluations"][:4]] == ["trunk", "reasoning", "memory", "speed"]
    assert report["champion_source"] == result.metrics["champion_source"] == "trunk"
    assert report["final_selection"][0]["source"] == "trunk"
    assert report["champion_recipe"]["method"] == "task_arithmetic"
    assert result.gate_passed and result.metrics["champion_above_all"] is False
    assert {c.name for c in result.gate} == {"keeps_arith", "keeps_logic", "champion_minus_best_parent_acc_lower_bound",
                                             "champion_minus_uniform_acc_lower_bound"}
    guard = json.loads((ctx.dir / "guard.json").read_text())
    for family, answers in guard["answers"].items():
        assert answers["before"] == answers["after"], family  # the trunk answers as the trunk
        assert guard["families"][family]["diff"] == 0.0
    assert result.metrics["guard_pooled_diff"] == 0.0
    gate = {c.name: c for c in result.gate}
    assert gate["champion_minus_best_parent_acc_lower_bound"].bound == -0.3
    assert result.metrics["champion_minus_best_parent_acc_lower_bound"] == \
        gate["champion_minus_best_parent_acc_lower_bound"].value
    from forgelib.modelio import load_causal_lm

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
