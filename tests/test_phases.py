"""The pipeline notebook runs every phase for real on the smoke set (one shared session); each phase hands on
what it promises and its gate's numbers are the numbers its report and guard.json hold (recomputed from the answers
with ``forgelib.stats`` where they are kept); the chain gate holds the final artifact to the trunk; bad input is
refused clearly."""
import json
import math
import subprocess
import sys

import pytest
import torch

from forgelib import paths
from forgelib.params import ParameterError
from forgelib.phases import UpstreamError, open_phase, run_phase
from forgelib.registry import ModelRegistry
from forgelib.results import PhaseResult
from forgelib.stats import noninferior_over

QUIET = {"run": {"quiet": True, "tracking": "jsonl"}}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("phase-outputs")
    mp = pytest.MonkeyPatch()
    mp.setenv("FORGE_OUTPUTS", str(out))
    yield out
    mp.undo()


@pytest.fixture(scope="module")
def pipeline(outputs):
    """The pipeline notebook itself, executed by papermill on the smoke set as session "p": every phase runs for
    real, in its own kernel, and the tests below check what each handed on. (nbval leaves this notebook to this
    fixture, see ../conftest.py: one smoke chain instead of two.)"""
    from forgelib.notebooks import execute

    out = execute(paths.repo_root() / "notebooks" / "00_pipeline.ipynb", outputs / "00_pipeline.ipynb",
                  {"params_file": "parameters/smoke.yaml", "session": "p", "overrides": QUIET})
    return out


def _stored_params(folder, spec):
    """(run, the phase's params, the guard section) as the phase in ``folder`` ran with them (its params.yaml)."""
    import yaml

    from forgelib.params import RunParams, build_dataclass
    from forgelib.suite import GuardParams

    stored = yaml.safe_load((folder / "params.yaml").read_text())
    where = str(folder / "params.yaml")
    return (build_dataclass(RunParams, stored["run"], f"{where}: run"),
            build_dataclass(spec.params_cls, stored[spec.name], f"{where}: {spec.name}"),
            build_dataclass(GuardParams, stored.get("guard") or {}, f"{where}: guard"))


def _completed(name):
    """(a context-like record: dir, seed, params, guard (the ``guard`` section), spec; the PhaseResult) of phase
    ``name`` in the pipeline's session, with the parameters it ran with (its params.yaml)."""
    from types import SimpleNamespace

    from forgelib.phases import get_spec

    spec = get_spec(name)
    folder = paths.outputs_root() / "p" / spec.dirname
    run, params, guard = _stored_params(folder, spec)
    return SimpleNamespace(dir=folder, seed=run.seed + 1000 * spec.number, run=run, params=params, guard=guard,
                           spec=spec), PhaseResult.load(folder)


@pytest.fixture(scope="module")
def cognate(pipeline):
    return _completed("cognate")


@pytest.fixture(scope="module")
def evomerge(pipeline):
    return _completed("evomerge")


@pytest.fixture(scope="module")
def quietstar(pipeline):
    return _completed("quietstar")


@pytest.fixture(scope="module")
def bitnet(pipeline):
    return _completed("bitnet")


@pytest.fixture(scope="module")
def curriculum(pipeline):
    return _completed("curriculum")


@pytest.fixture(scope="module")
def baking(pipeline):
    return _completed("baking")


@pytest.fixture(scope="module")
def experts(pipeline):
    return _completed("experts")


@pytest.fixture(scope="module")
def compression(pipeline):
    return _completed("compression")


# --- the gate's numbers, recomputed ---------------------------------------------------------------------


def _gate(result):
    return {g.name: g for g in result.gate}


def _check(gate, name, value, bound, op):
    """The gate check ``name`` holds ``value`` (the recomputed number) against ``bound`` with ``op``, and passed."""
    check = gate[name]
    assert check.value == pytest.approx(value, abs=1e-9), name
    assert check.bound == pytest.approx(bound, abs=1e-9) and check.op == op, name
    assert check.passed, f"{name}: {check}"


def _row_bound(row, confidence):
    """The lower bound of a ``forgelib.stats.Verdict`` row recomputed from its n, diff and discordance (they fix
    the discordant cells of the 2×2 table, which are all the Agresti–Min bound reads)."""
    from forgelib.stats import Comparison, lower_bound

    n = row["n"]
    moved, net = round(row["discordance"] * n), round(row["diff"] * n)
    assert (moved + net) % 2 == 0, row
    gained, lost = (moved + net) // 2, (moved - net) // 2
    both = round(row["before"] * n) - lost
    assert min(gained, lost, both, n - both - lost - gained) >= 0, row
    return round(lower_bound(Comparison(n, both, lost, gained, n - both - lost - gained), confidence), 4)


def _check_guard(ctx, result, upstream, margin, labels=None, suite=None):
    """guard.json of a phase (2 on): the input and the output model answered the same test questions of every
    family of the input's suite (``upstream.suite``, or ``suite``) at its levels; one ``keeps_<family>`` check per
    family whose value is the paired non-inferiority bound recomputed from the answers, at ``margin``; the headline
    metrics and the answers reused from the upstream's guard are that guard's. Returns guard.json."""
    from forgelib.stats import noninferior
    from forgelib.suite import GUARD_FILE, questions

    path = ctx.dir / GUARD_FILE
    assert path.is_file() and paths.resolve(result.artifacts["guard"]) == path
    data = json.loads(path.read_text())
    suite = upstream.suite if suite is None else suite
    assert suite and data["suite"] == suite
    assert set(data["families"]) == set(data["answers"]) == set(data["prompts"]) == set(suite)
    if labels is not None:
        assert data["labels"] == list(labels)
    assert data["margin"] == pytest.approx(margin)
    gate = _gate(result)
    assert {n for n in gate if n.startswith("keeps_")} == {f"keeps_{f}" for f in suite}
    up_guard = upstream.artifacts.get("guard")
    up_data = json.loads(paths.resolve(up_guard).read_text()) if up_guard else {"answers": {}}
    g = ctx.guard
    for family, (lo, hi) in suite.items():
        before, after = data["answers"][family]["before"], data["answers"][family]["after"]
        asked = data["prompts"][family]
        assert 0 < len(before) == len(after) == len(asked) == data["families"][family]["n"]
        # the guard's questions: the first of one pool (test split, the suite's levels, a seeded random order), the
        # same in every phase of the run
        pool = questions(family, (lo, hi), g.max_questions, ctx.run.seed + g.seed)
        assert asked == [q.prompt for q in pool[:len(asked)]]
        v = noninferior(family, before, after, margin, g.confidence, g.power)
        assert v.as_row() == {**data["families"][family], "name": family}
        _check(gate, f"keeps_{family}", v.lower, -margin, ">")
        # answers reused from the upstream's guard are that guard's answers of the same model ("after" there)
        reused = min(data["reused"][family], len(up_data["answers"].get(family, {}).get("after", [])))
        if reused:
            assert before[:reused] == up_data["answers"][family]["after"][:reused], family
    pooled = noninferior_over("all", {f: (data["answers"][f]["before"], data["answers"][f]["after"]) for f in suite},
                              margin, g.confidence, g.power)
    assert pooled.as_row() == data["pooled"] and data["passed"]
    m = result.metrics
    assert m["guard_margin"] == pytest.approx(margin) and m["guard_questions"] == pooled.n
    assert m["guard_pooled_diff"] == pooled.diff
    worst = data["families"][m["guard_worst_family"]]
    assert worst["lower"] == min(v["lower"] for v in data["families"].values())
    assert worst["diff"] == m["guard_worst_diff"]
    return data


# --- the pipeline and each phase ------------------------------------------------------------------------


def _ran_as_committed(executed_path, committed):
    """An executed notebook: every code cell ran and none raised, and its code is the committed notebook's (papermill
    adds only the injected-parameters cell). Returns the executed notebook."""
    import nbformat

    executed = nbformat.read(executed_path, as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") is not None for c in code), executed_path
    assert not any(o.get("output_type") == "error" for c in code for o in c["outputs"]), executed_path
    source = nbformat.read(paths.repo_root() / committed, as_version=4)
    assert [c.source for c in source.cells if c.cell_type == "code"] == \
        [c.source for c in code if "injected-parameters" not in c.metadata.get("tags", [])], executed_path
    return executed


@pytest.mark.slow
def test_pipeline_notebook_completes_every_phase(pipeline):
    import nbformat
    import yaml

    from forgelib.params import to_dict
    from forgelib.phases import PHASES
    from forgelib.phases.base import load_guard_params, load_phase_params

    nb = nbformat.read(pipeline, as_version=4)
    assert all(c.get("outputs") is not None for c in nb.cells if c.cell_type == "code")
    assert not any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code" for o in c["outputs"])
    guard = to_dict(load_guard_params("parameters/smoke.yaml", QUIET, PHASES))
    for spec in PHASES:
        folder = paths.outputs_root() / "p" / spec.dirname
        result = PhaseResult.load(folder)
        assert result.ok and result.gate_passed, spec.name
        # the phase's own notebook, as committed, executed by papermill: every code cell ran, none raised (nbval
        # leaves notebooks 01-09 to this chain, ../conftest.py)
        _ran_as_committed(folder / spec.notebook.split("/")[-1], spec.notebook)
        # it ran the current smoke parameters (the tests below read each phase's params.yaml)
        stored = yaml.safe_load((folder / "params.yaml").read_text())
        assert stored[spec.name] == to_dict(load_phase_params(spec, "parameters/smoke.yaml", QUIET, PHASES)[1])
        assert stored["guard"] == guard, spec.name
    # the last step: the scorecard over every phase's model, and the chain gate (the pipeline stops when it fails)
    card = _ran_as_committed(paths.outputs_root() / "p" / "09_scorecard" / "09_scorecard.ipynb",
                             "notebooks/09_scorecard.ipynb")
    outputs = [o for c in card.cells if c.cell_type == "code" for o in c["outputs"]]
    assert any("8 compression" in str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert any("chain gate: passed" in str(o.get("text", "")) for o in outputs)
    assert json.loads((paths.outputs_root() / "p" / "09_scorecard" / "chain.json").read_text())["passed"]


@pytest.mark.slow
def test_cognate_hands_on_trunk_specialists_and_tokenizer(cognate):
    from forgelib.models.loading import load_cognate
    from forgelib.phases.cognate import ROLES
    from forgelib.stats import proportion_bounds, questions_needed
    from transformers import AutoTokenizer

    ctx, result = cognate
    assert result.ok and result.gate_passed
    assert set(result.models) == {"tokenizer", "trunk", "reasoning", "memory", "speed"}
    shapes = {}
    for role in ("trunk", "reasoning", "memory", "speed"):
        model = load_cognate(paths.resolve(result.models[role]["path"]))
        shapes[role] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert model.config.model_type == "cognate"
    assert all(s == shapes["trunk"] for s in shapes.values()), "identical shapes so Phase 2 can merge them"
    assert load_cognate(paths.resolve(result.models["memory"]["path"])).config.use_memory
    tok = AutoTokenizer.from_pretrained(paths.resolve(result.models["tokenizer"]["path"]))
    assert tok.convert_tokens_to_ids("<|startofthought|>") != tok.unk_token_id
    report = json.loads((ctx.dir / "report.json").read_text())
    # trained at 2 cycles, saved at the count its cycles decision chose (checked with the cycles curve below)
    assert report["cycles_decision"]["reasoning"]["trained_cycles"] == 2
    assert load_cognate(paths.resolve(result.models["reasoning"]["path"])).config.n_cycles == \
        report["cycles_decision"]["reasoning"]["cycles"]
    for name in ("trunk", "reasoning", "memory", "speed"):
        assert set(report["models"][name]["accuracy"]) >= {"recall", "multistep", "arith"}
    # what the trunk knows, handed on: its mix at its levels (every later guard asks these families)
    params, g = ctx.params, ctx.guard
    mix = sorted(f for f, w in params.trunk.mix.items() if w > 0)
    assert result.suite == {f: list(params.levels) for f in mix}
    # the gate's numbers are the report's numbers
    gate = _gate(result)
    assert set(gate) == ({f"{name}_minus_trunk_own_families_lower_bound" for name in ROLES}
                         | {f"trunk_{f}_lower_bound_minus_chance" for f in mix} | {"min_disagreement"})
    for name in ROLES:
        # each specialist beats the trunk on its own families: paired superiority on the same test questions
        row = report["specialists_vs_trunk"][name]
        fams = params.specialists[name].families or list(params.specialists[name].mix)
        assert row["kind"] == "superior" and row["margin"] == params.min_accuracy_gain
        assert row["confidence"] == g.confidence and row["passed"]
        pilot = math.ceil(questions_needed(params.expected_gain, g.confidence, params.power, g.discordance) / 4)
        assert row["n"] >= min(g.max_questions * len(fams), pilot)  # at least the pilot round
        assert row["power"] == params.power
        assert row["lower"] == _row_bound(row, g.confidence) <= row["diff"]
        _check(gate, f"{name}_minus_trunk_own_families_lower_bound", row["lower"], params.min_accuracy_gain, ">")
    # the trunk learnt every family of its mix: its accuracy's lower bound above chance
    per = report["n_test"] // len(report["models"]["trunk"]["accuracy"])
    for family in mix:
        acc = report["models"]["trunk"]["accuracy"][family]
        lower = proportion_bounds(round(acc * per), per, g.confidence)[0]
        _check(gate, f"trunk_{family}_lower_bound_minus_chance", round(lower - report["chance"][family], 4),
               params.min_above_chance, ">")
    _check(gate, "min_disagreement", min(report["disagreement"].values()), params.min_disagreement, ">=")
    assert set(report["chance"]) == set(report["models"]["trunk"]["accuracy"])
    assert report["chance"]["logic"] > 0.3 and report["chance"]["arith"] < 0.05  # T/F vs a sum
    assert report["histories"]["trunk"]["padding_fraction"] < 0.2  # length bucketing
    assert result.metrics["trunk_loss_last"] < result.metrics["trunk_loss_first"]
    rows = [json.loads(l) for l in (ctx.dir / "metrics.jsonl").read_text().splitlines()]
    assert any("trunk/loss" in r for r in rows) and any("speed/loss" in r for r in rows)
    # the cycles curve: the model trained with 2 cycles on its own families at 1, 2 and 4 test-time cycles, the same
    # questions at every count; its gains recomputed from the per-question answers, and the count it was trained at
    # measured afresh through the evaluation every phase uses
    from forgelib.evaluate import answer_correctness
    from forgelib.stats import compare, lower_bound
    from forgelib.suite import questions

    assert set(report["cycles_curve"]) == {name for name in ("trunk", *ROLES)
                                           if (params.specialists.get(name) or params.trunk).n_cycles > 1}
    curve = report["cycles_curve"]["reasoning"]
    assert curve["trained_cycles"] == 2 and set(curve["accuracy"]) == {"1", "2", "4"}
    fams = params.specialists["reasoning"].families
    test = [q for f in fams for q in questions(f, tuple(params.levels), params.eval_per_family, ctx.seed + 7 + 103)]
    assert curve["n"] == len(test) == len(curve["correct"]["2"])
    for key, (a, b) in (("2_minus_1", ("1", "2")), ("4_minus_2", ("2", "4"))):
        c = compare(curve["correct"][a], curve["correct"][b])
        assert curve["gains"][key] == {"diff": round(c.diff, 4), "lower_bound": round(lower_bound(c, g.confidence), 4),
                                       "n": len(test)}
    for count, correct in curve["correct"].items():
        assert curve["accuracy"][count] == round(sum(correct) / len(correct), 4)
    # handed on at the cycles that earned their cost (hand_on_cycles: auto): 2 only when 2 beat 1 on these questions
    chosen = report["cycles_decision"]["reasoning"]
    assert chosen["verdict"]["lower"] == pytest.approx(curve["gains"]["2_minus_1"]["lower_bound"], abs=1e-4)
    assert chosen["cycles"] == (2 if chosen["verdict"]["lower"] > params.cycles_min_gain else 1)
    model = load_cognate(paths.resolve(result.models["reasoning"]["path"])).eval()
    assert model.config.n_cycles == chosen["cycles"] == report["runtime"]["reasoning"]["n_cycles"]
    assert answer_correctness(model, tok, test[:64], batch_size=128, with_steps=params.with_steps) == \
        [bool(x) for x in curve["correct"][str(chosen["cycles"])][:64]]
    assert result.metrics["reasoning_cycles_gain"] == curve["gains"]["2_minus_1"]["diff"]
    assert result.metrics["reasoning_handed_on_cycles"] == chosen["cycles"]


@pytest.mark.slow
def test_registry_holds_phase_rows(cognate):
    with ModelRegistry(paths.registry_path()) as reg:
        roles = {m["model_name"] for m in reg.list_models(session_id="p", phase_name="cognate")}
        assert roles == {"tokenizer", "trunk", "reasoning", "memory", "speed"}
        assert reg.list_phase_runs("p")[0]["status"] == "completed"


@pytest.mark.slow
def test_evomerge_champion_beats_parents_and_rebuilds_bit_exactly(evomerge, cognate, tmp_path):
    """Phase 2 on the smoke set: the guard holds the champion to the trunk family by family; on the same
    questions the champion is non-inferior to the best parent and the uniform merge; the recipe rebuilds it."""
    from forgelib.phases.evomerge import best_row

    ctx, result = evomerge
    assert result.ok and result.gate_passed
    report = json.loads((ctx.dir / "report.json").read_text())
    params, g = ctx.params, ctx.guard
    test = report["test"]
    assert list(test)[0] == "trunk"  # the trunk is a contender
    guard = _check_guard(ctx, result, cognate[1], g.margin, labels=(params.base, "champion"))
    assert result.suite == cognate[1].suite  # Phase 2 teaches nothing new: the trunk's suite handed on
    # the test table is the guard's questions: the trunk's and the champion's rows are the guard's answers
    n = sum(v["n"] for v in guard["families"].values())
    assert report["n_test"] == n
    for row, side in (("trunk", "before"), ("champion", "after")):
        per_family = {f: sum(a[side]) / len(a[side]) for f, a in guard["answers"].items()}
        assert test[row]["per_family"] == pytest.approx(per_family)
        assert test[row]["accuracy"] == pytest.approx(sum(per_family.values()) / len(per_family))  # suite mean
    best = best_row(test, list(params.sources))
    assert result.metrics["best_parent"] == best
    gate = _gate(result)
    assert set(gate) == {f"keeps_{f}" for f in guard["suite"]} | {"champion_minus_best_parent_acc_lower_bound",
                                                                   "champion_minus_uniform_acc_lower_bound"}
    assert report["margin"] == params.margin
    for label, other in (("best_parent", best), ("uniform", "uniform_merge")):
        name = f"champion_minus_{label}_acc_lower_bound"
        value = gate[name].value
        _check(gate, name, value, -params.margin, ">")
        assert result.metrics[name] == value
        # the suite-mean paired verdict, recomputed from the answers the report keeps
        answers = report["test_answers"]
        want = noninferior_over(f"champion_vs_{label}", {f: (answers[other][f], answers["champion"][f])
                                                         for f in guard["answers"]}, params.margin, g.confidence,
                                g.power)
        assert value == want.lower and report["contenders"][label] == want.as_row(), label
    assert report["champion_source"] in ("trunk", "reasoning", "memory", "speed", "merge")
    assert result.metrics["champion_above_all"] == all(
        test["champion"]["accuracy"] > test[n_]["accuracy"] for n_ in ("trunk", "reasoning", "memory", "speed"))
    assert len(report["evolution"]["evaluations"]) == params.budget == result.metrics["evaluations"]
    recipe = paths.resolve(result.artifacts["recipe"])
    out = tmp_path / "rebuilt"  # forge merge writes nowhere under the outputs root
    proc = subprocess.run([sys.executable, "-m", "forgelib.cli", "merge", str(recipe), "--out", str(out),
                           "--compare", str(paths.resolve(result.models["champion"]["path"]))],
                          capture_output=True, text=True, cwd=paths.repo_root())
    assert proc.returncode == 0, proc.stderr
    assert "bit-identical" in proc.stdout and "True" in proc.stdout


@pytest.mark.slow
def test_quietstar_hands_on_a_thinking_model_and_reports_the_ablation(quietstar, evomerge):
    """Phase 3 on the smoke set: the gate's numbers are the report's (recomputed from its per-question answers
    and NLLs), the model reloads with its thoughts and as a plain HF model, and the Phase-2 model row is the
    upstream champion measured afresh."""
    from transformers import AutoTokenizer

    from forgelib.evaluate import mean_nll
    from forgelib.modelio import load_causal_lm
    from forgelib.phases.quietstar import test_samples
    from forgelib.stats import mean_bounds, noninferior, superior
    from forgelib.quietstar import QuietStarModel
    from forgelib.modelio import load_quietstar

    ctx, result = quietstar
    assert result.ok and result.gate_passed
    report = json.loads((ctx.dir / "report.json").read_text())
    params, g = ctx.params, ctx.guard
    test = report["test"]
    assert set(test) == {"base", "thoughts", "no_thoughts"} | ({"pause"} if params.pause_arm else set())
    for key in test:
        assert result.metrics[f"acc_{key}"] == round(test[key]["accuracy"], 4)
        assert result.metrics[f"nll_{key}"] == round(test[key]["answer_nll"], 4)
    # the test questions: as many as the accuracy margin needs under the guard's rule
    samples = test_samples(params, ctx.seed + 1, guard=g)
    assert report["n_test"] == len(samples) == len(test["base"]["correct"])
    if params.test_per_family is None:
        assert len(samples) >= g.needed(params.margin)
    assert [r["prompt"] for r in report["heatmap"]] == [s.prompt for s in samples[:len(report["heatmap"])]]
    gate = _gate(result)
    # (0) thinking or not: the same weights with and without thoughts, paired superiority of thinking (hand_on auto)
    think = superior("thinking_vs_not", test["no_thoughts"]["correct"], test["thoughts"]["correct"],
                     params.think_min_gain, g.confidence, g.power)
    decision = report["decision"]
    assert decision["verdict"] == think.as_row() and decision["thinking"] is think.passed
    assert result.metrics["thinks"] == int(think.passed) and result.metrics["think_gain_acc"] == think.diff
    # (1) thinking does not hurt: upper bound of the per-question NLL difference, thoughts on minus off (reported
    # always, a gate check when the model is handed on thinking)
    diffs = [a - b for a, b in zip(test["thoughts"]["sample_nll"], test["no_thoughts"]["sample_nll"])]
    mean, _, upper = mean_bounds(diffs, g.confidence)
    verdicts = report["verdicts"]
    assert verdicts["nll_thoughts_minus_no_thoughts"] == pytest.approx({"mean": mean, "upper_bound": upper})
    if think.passed:
        _check(gate, "nll_thoughts_minus_no_thoughts_upper_bound", round(upper, 6), params.nll_margin, "<=")
    # (2) the handed-on model's accuracy (thinking or not) non-inferior to the Phase-2 model's, paired -- a check
    # unless it is handed on with the Phase-2 weights (2b)
    label = "thoughts" if think.passed else "no_thoughts"
    acc = noninferior(f"{label}_vs_base", test["base"]["correct"], test[label]["correct"], params.margin,
                      g.confidence, g.power)
    assert verdicts["accuracy"] == acc.as_row()
    weights = report["weights"]
    own = weights["weights"] == "trained"
    assert result.metrics["hands_on_trained_weights"] == int(own)
    if own:
        _check(gate, f"acc_{label}_minus_base_lower_bound", acc.lower, -params.margin, ">")
    # (2b) plain: the trained weights only when the guard's family mean shows them better than the Phase-2 model
    if not think.passed and params.plain_weights == "auto":
        assert own is (weights["verdict"]["lower"] > params.plain_min_gain)
    # (3) the guard: every family the Phase-2 model knew, asked of the model as handed on
    _check_guard(ctx, result, evomerge[1], g.margin)
    assert set(gate) == {f"keeps_{f}" for f in evomerge[1].suite} | (
        {f"acc_{label}_minus_base_lower_bound"} if own else set()) | (
        {"nll_thoughts_minus_no_thoughts_upper_bound"} if think.passed else set())
    # the decision travels with the model: loaded back, it thinks exactly when Phase 3 decided so
    assert load_quietstar(paths.resolve(result.models["model"]["path"])).thinking is think.passed
    assert result.suite == evomerge[1].suite
    # the curves start at the Phase-2 model, where thinking and not thinking are the same (w = 0)
    for arm in ("thoughts",):
        first = report["training"][arm]["evals"][0]
        assert first["step"] == 0 and first["nll_thoughts"] == pytest.approx(first["nll_no_thoughts"], abs=1e-6)
    assert len(report["heatmap"]) == params.heatmap_samples
    assert all(0 <= w <= 1 for r in report["heatmap"] for w in r["weights"])
    folder = paths.resolve(result.models["model"]["path"])
    model = load_quietstar(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    samples = samples[:12]
    plain = load_causal_lm(folder)  # the base weights are a normal HF folder
    with model.no_thoughts():
        assert mean_nll(model, tok, samples, max_len=96, answer_only=True, with_steps=True) == pytest.approx(
            mean_nll(plain, tok, samples, max_len=96, answer_only=True, with_steps=True))
    # the base row is the upstream champion itself; handed on with its weights, the model's base is the champion
    champion = load_causal_lm(paths.resolve(evomerge[1].models["champion"]["path"]))
    if not own:
        assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), champion.state_dict().values()))
    untrained = QuietStarModel(champion, tok)
    assert mean_nll(untrained, tok, samples, max_len=96, answer_only=True, with_steps=True) == pytest.approx(
        mean_nll(champion, tok, samples, max_len=96, answer_only=True, with_steps=True), abs=1e-6)


@pytest.mark.slow
def test_quietstar_refuses_the_titans_memory_clearly(outputs, evomerge):
    overrides = {**QUIET, "quietstar": {"runtime": {"use_memory": True}, "steps": 2}}
    ctx = open_phase("quietstar", "parameters/smoke.yaml", overrides, session="qm", upstream=evomerge[0].dir)
    with pytest.raises(Exception, match="use_memory=False"):
        run_phase(ctx)


@pytest.mark.slow
def test_bench_quietstar_counts_equal_compute(evomerge, tmp_path):
    from forgelib.bench import quietstar as bench

    out = tmp_path / "qs.json"
    assert bench.main(["--phase2", str(evomerge[0].dir), "--seeds", "2", "--steps", "2", "--test-per-family", "2",
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    # each seed's stream: pause and random (one pass) run about twice Quiet-STaR's 2 steps, plain many more (its
    # step has no thought positions)
    for steps in report["equal_compute"]["steps_per_seed"]:
        assert steps["quietstar"] == 2 and steps["pause"] == steps["random"] and 3 <= steps["pause"] <= 5
        assert steps["plain"] > 2 * steps["pause"]
    for row in report["per_seed"]:
        tokens = {arm: row[arm]["forward_tokens"] for arm in bench.ARMS}
        # measured forward tokens: every arm spends Quiet-STaR's within one batch of its own (plain's batches are
        # the smallest steps: its count comes closest)
        assert max(tokens.values()) / min(tokens.values()) < 1.35
    assert set(report["quietstar_gain"]) == {"over_plain", "over_pause", "over_random"}
    assert report["accuracy"]["quietstar"]["n"] == 2


@pytest.mark.slow
def test_bitnet_hands_on_a_packed_ternary_thinking_model(bitnet, quietstar):
    """Phase 4 on the smoke set: ternary layers packed on disk, the bytes counted, the gate's numbers the
    report's, the guard at the phase's allowed loss, and the model loads both for packed inference and as
    trainable BitLinear layers (Phase 5) that compute the same logits."""
    from forgelib.quant import bitlinear_modules, packed_bitlinear_modules
    from forgelib.quant.bitnet import int8_modules
    from forgelib.stats import mean_bounds
    from forgelib.modelio import load_quietstar

    ctx, result = bitnet
    assert result.ok and result.gate_passed
    params, g = ctx.params, ctx.guard
    report = json.loads((ctx.dir / "report.json").read_text())
    m = result.metrics
    table = report["test"]
    assert m["acc_fp"] == round(table["fp"]["accuracy"], 4)
    assert report["upstream_model"] == str(paths.resolve(quietstar[1].models["model"]["path"]))
    # reported beside the gate
    assert m["acc_retention"] == pytest.approx(table["ternary"]["accuracy"] / table["fp"]["accuracy"], abs=1e-4)
    assert m["ppl_ratio"] == pytest.approx(math.exp(table["ternary"]["answer_nll"] - table["fp"]["answer_nll"]),
                                           rel=1e-3)
    gate = _gate(result)
    # the perplexity ratio's upper bound: exp of the paired per-question answer-NLL difference's upper bound
    diffs = [t - f for t, f in zip(table["ternary"]["sample_nll"], table["fp"]["sample_nll"])]
    upper = round(math.exp(min(mean_bounds(diffs, g.confidence)[2], 50.0)), 4)
    assert m["ppl_ratio_upper_bound"] == upper
    _check(gate, "ppl_ratio_upper_bound", upper, params.max_ppl_ratio, "<=")
    folder = paths.resolve(result.models["model"]["path"])
    on_disk = sum((folder / f).stat().st_size for f in ("model.safetensors", "quietstar.safetensors"))
    assert m["total_bytes_packed"] == on_disk
    _check(gate, "compression_vs_fp32", round(m["total_bytes_fp32"] / on_disk, 3), params.min_compression, ">=")
    assert m["compression_vs_fp32"] == gate["compression_vs_fp32"].value
    _check(gate, "packed_over_fp32_bytes", on_disk / m["total_bytes_fp32"], 1.0, "<")
    _check(gate, "packed_logits_max_abs_diff", m["packed_logits_max_abs_diff"], 1e-6, "<=")
    _check(gate, "trainable_reload_logits_max_abs_diff", report["export"]["trainable_reload_logits_max_abs_diff"],
           1e-6, "<=")
    # the guard at the phase's own allowed loss
    _check_guard(ctx, result, quietstar[1], params.allowed_loss)
    assert set(gate) == {f"keeps_{f}" for f in quietstar[1].suite} | {
        "ppl_ratio_upper_bound", "compression_vs_fp32", "trainable_reload_logits_max_abs_diff",
        "packed_over_fp32_bytes", "packed_logits_max_abs_diff"}
    assert report["export"]["file_bytes"] == (folder / "model.safetensors").stat().st_size
    assert report["sizes"]["base3"]["total_bytes"] < report["sizes"]["2bit"]["total_bytes"] < \
        report["sizes"]["fp16"]["total_bytes"] < report["sizes"]["fp32"]["total_bytes"] == m["total_bytes_fp32"]
    packed = load_quietstar(folder)
    layers = packed.base.config.num_hidden_layers
    ternary = {f"model.layers.{i}.{s}" for i in range(layers) for s in params.include}
    assert set(packed_bitlinear_modules(packed.base)) == ternary and not bitlinear_modules(packed.base)
    assert {f"model.layers.{i}.{s}" for i in range(layers) for s in params.int8_include} <= set(
        int8_modules(packed.base))
    trainable = load_quietstar(folder, trainable=True)
    assert set(bitlinear_modules(trainable.base)) == ternary
    ids = torch.randint(5, 200, (2, 11))
    with torch.no_grad():  # the trainable reload Phase 5 starts from is the packed model (the gate's tolerance)
        assert (packed.base(input_ids=ids).logits - trainable.base(input_ids=ids).logits).abs().max() <= 1e-6
    shares = report["ternary_share"]["qat"]
    assert set(shares) == ternary
    assert all(abs(sum(v[k] for k in ("-1", "0", "+1")) - 1) < 1e-9 for v in shares.values())


@pytest.mark.slow
def test_bench_bitnet_runs_every_arm(quietstar, tmp_path):
    from forgelib.bench import bitnet as bench

    out = tmp_path / "bn.json"
    assert bench.main(["--phase3", str(quietstar[0].dir), "--seeds", "2", "--steps", "3", "--test-per-family", "2",
                       "--speed-repeats", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["acc_retention"]) == {"qat_distill", "qat_no_distill"}
    assert report["acc_retention"]["qat_distill"]["n"] == 2
    assert report["tokens_per_s"]["packed"] > 0 and report["tokens_per_s"]["fp32"] > 0
    assert set(report["sizes"]) == {"fp32", "fp16", "2bit", "base3"}


def test_bench_curriculum_runs_every_arm_from_the_phase4_model(bitnet, tmp_path):
    from forgelib.bench import curriculum as bench

    out = tmp_path / "cur.json"
    assert bench.main(["--phase4", str(bitnet[0].dir), "--seeds", "1", "--rounds", "1", "--steps-per-round", "2",
                       "--test-per-level", "2", "--probe", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    row = report["per_seed"][0]
    assert set(row) == {"curriculum", "uniform", "easy_to_hard"}
    for arm in row.values():  # final scores: every family and level on 2 test questions each
        assert all(0 <= a <= 1 for by in arm["final"].values() for a in by.values())
        assert arm["final_mean"] == pytest.approx(
            sum(a for by in arm["final"].values() for a in by.values()) / sum(len(by) for by in arm["final"].values()))


@pytest.mark.slow
def test_curriculum_trains_the_ternary_model_and_learns_the_calculator(curriculum, bitnet):
    """Phase 5 on the smoke set: the gate's numbers are the report's (the teaching verdicts recomputed from their
    answers), the suite handed on is the input's widened by the levels mastered, every answer in the pools was
    graded by the checker, the handed-on model is the Phase-4 architecture (no self-model head) and still
    ternary."""
    from forgelib.phases.curriculum import guarded_suite, mastered_levels, taught_levels
    from forgelib.quant import bitlinear_modules
    from forgelib.stats import superior
    from forgelib.suite import suite_union
    from forgelib.modelio import load_quietstar

    ctx, result = curriculum
    assert result.ok and result.gate_passed
    params, g = ctx.params, ctx.guard
    report = json.loads((ctx.dir / "report.json").read_text())
    m = result.metrics
    gate = _gate(result)
    # keeps: every family the Phase-4 model knew, with the levels below the assessment's start
    guarded = {f: list(v) for f, v in guarded_suite(bitnet[1].suite, report["start_levels"]).items()}
    assert report["suite"]["guarded"] == guarded
    _check_guard(ctx, result, bitnet[1], g.margin, suite=guarded)
    # the suite: the input's, widened by the levels mastered on held-out questions (the level a family ends at is
    # its frontier, not handed on)
    reached = report["level_reached"]
    assert reached == {f: m[f"level_reached_{f}"] for f in params.families}
    mastered = mastered_levels(reached)
    taught = taught_levels(bitnet[1].suite, mastered, report["start_levels"])
    out_suite = suite_union(bitnet[1].suite, {f: (1, lv) for f, lv in mastered.items() if lv >= 1})
    assert result.suite == report["suite"]["output"] == {f: list(v) for f, v in out_suite.items()}
    assert report["suite"]["input"] == bitnet[1].suite and report["suite"]["taught"] == taught
    for family, rounds in report["levels"]["advanced_in_rounds"].items():
        assert reached[family] == min(report["start_levels"][family] + len(rounds), params.max_level)
    # teaches: the handed-on model superior to the Phase-4 model on each taught family's levels
    assert set(report["teaching"]) == set(taught)
    for family, row in report["teaching"].items():
        assert row["levels"] == taught[family] and len(row["before"]) == len(row["after"]) == len(row["prompts"])
        v = superior(f"teaches_{family}", row["before"], row["after"], params.gain, g.confidence, params.power)
        assert {**row["verdict"], "note": ""} == {**v.as_row(), "note": ""}
        _check(gate, f"teaches_{family}", v.lower, params.gain, ">")
        assert m[f"teaches_{family}_lower_bound"] == v.lower
    # the calculator: better with it than without on the same tool questions
    tool = report["tool"]
    v = tool["verdict"]
    assert v["kind"] == "superior" and v["margin"] == 0.0 and v["confidence"] == g.confidence
    assert v["n"] == tool["with"]["samples"] == tool["without"]["samples"]
    assert (v["before"], v["after"]) == (round(tool["without"]["accuracy"], 4), round(tool["with"]["accuracy"], 4))
    assert tool["levels"] == [1, reached["tool"]]
    _check(gate, "tool_with_minus_without_lower_bound", _row_bound(v, g.confidence), 0.0, ">")
    assert m["tool_with_minus_without_lower_bound"] == v["lower"]
    assert m["tool_acc_with"] > m["tool_acc_without"] and m["tool_success_rate"] > 0
    assert m["tool_acc_with"] == round(tool["with"]["accuracy"], 4)
    assert set(gate) == ({f"keeps_{f}" for f in guarded} | {f"teaches_{f}" for f in taught}
                         | {"tool_with_minus_without_lower_bound"})
    # accuracy at the level reached: from the guard's and the teaching questions of that level
    for family, level in reached.items():
        correct = report["correct_by_level"]["after"].get(family, {}).get(str(level))
        if correct:
            assert m[f"acc_reached_{family}"] == round(sum(correct) / len(correct), 4)
        else:
            assert f"acc_reached_{family}" not in m
    answered = [h for rows in report["question_pool"].values() for row in rows for h in row["history"]]
    assert answered and all(isinstance(h["correct"], bool) for h in answered)
    assert len(report["history"]) == params.rounds and (ctx.dir / "state" / "state.json").is_file()
    model = load_quietstar(paths.resolve(result.models["model"]["path"]), trainable=True)
    start = load_quietstar(paths.resolve(bitnet[1].models["model"]["path"]), trainable=True)
    assert set(model.state_dict()) == set(start.state_dict())
    assert set(bitlinear_modules(model.base)) == set(bitlinear_modules(start.base)) != set()


@pytest.mark.slow
def test_baking_hands_on_a_ternary_model_that_uses_the_calculator_unprompted(baking, curriculum):
    """Phase 6 on the smoke set: the gate's numbers are the report's (each gap closed and its bound recomputed from
    the held-out KL pairs, each adherence kept from the per-question adherence); the handed-on model is still
    ternary (the adapters merged inside the quantizer) and, asked a question with no prompt, calls the
    calculator."""
    from forgelib.baking.gap import ratio_gap
    from forgelib.data.tasks import generate
    from forgelib.quant.bitnet import BitLinear
    from forgelib.stats import noninferior
    from forgelib.modelio import load_quietstar
    from forgelib.tools import generate_with_tools

    ctx, result = baking
    assert result.ok and result.gate_passed
    params, g = ctx.params, ctx.guard
    assert result.upstream["folder"].endswith("p/05_curriculum")
    report = json.loads((ctx.dir / "report.json").read_text())
    gate = _gate(result)
    _check_guard(ctx, result, curriculum[1], g.margin)
    assert result.suite == curriculum[1].suite
    for row in report["cycles"]:
        assert row["gap_closed"] == pytest.approx(1 - row["kl_baked"] / row["kl_unbaked"])
    # per baked prompt, its last kept bake: the held-out gap closed and its bound, and its adherence kept
    last = {row["prompt"]: row for row in report["cycles"] if row["kept"]}
    assert last and set(last) <= {n for n, e in report["effect"].items() if e >= params.min_effect}
    assert set(report["not_baked"]) == {n for n, e in report["effect"].items() if e < params.min_effect}
    _check(gate, "prompts_baked", len(last), 1, ">=")
    for name, row in last.items():
        held = row["heldout"]
        gap, lower, spread = ratio_gap(held["kl_unbaked"], held["kl_baked"], g.confidence)
        assert row["gap"]["n"] == len(held["kl_unbaked"]) == len(held["kl_baked"])
        assert (row["gap"]["gap"], row["gap"]["lower"], row["gap"]["spread"]) == pytest.approx(
            (gap, lower, spread), abs=1e-6)
        assert gap == pytest.approx(row["gap_closed"])
        _check(gate, f"gap_closed_{name}_lower_bound", round(lower, 4), params.min_gap_closed, ">")
        kept = noninferior(name, row["adheres_after"][name], report["after"]["adheres"][name],
                           params.adherence_margin, g.confidence, g.power)
        _check(gate, f"adherence_kept_{name}_lower_bound", kept.lower, -params.adherence_margin, ">")
    # the library: the last kept pass
    lib = [p for p in report["passes"] if p["kept"]][-1]
    gap, lower, _ = ratio_gap(lib["heldout"]["kl_unbaked"], lib["heldout"]["kl_baked"], g.confidence)
    assert lib["gap_closed_library"] == pytest.approx(gap)
    _check(gate, "gap_closed_library_lower_bound", round(lower, 4), params.min_gap_closed, ">")
    assert set(gate) == ({f"keeps_{f}" for f in curriculum[1].suite} | {"prompts_baked",
                                                                        "gap_closed_library_lower_bound"}
                         | {f"{k}_{n}_lower_bound" for n in last for k in ("gap_closed", "adherence_kept")})
    assert result.metrics["acc_before"] == pytest.approx(report["input"]["none"]["accuracy"], abs=1e-4)
    assert result.metrics["tool_use_rate_after"] > result.metrics["tool_use_rate_before"]
    model = load_quietstar(paths.resolve(result.models["model"]["path"]))
    assert any(isinstance(m, BitLinear) for m in model.base.modules())
    assert not any("lora" in name for name, _ in model.base.named_modules())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths.resolve(result.models["model"]["path"]))
    questions = [s.prompt for s in generate("arith", 1, 16, "test", 99)]
    with model.no_thoughts():
        texts = [t.text for t in generate_with_tools(model, tok, questions, 32)]
    assert sum("<|tool|>" in t for t in texts) >= 12, texts


@pytest.mark.slow
def test_experts_hand_on_the_model_and_expert_files_that_reproduce_the_routed_answers(experts, baking):
    """Phase 7 on the smoke set: the gate's numbers are the report's (recomputed from its per-question answers and
    routes), experts not shown better on held-out questions are retired (z = 0), the handed-on model is the Phase-6
    model (the experts live in small files beside it), and reloading an expert file gives the answers the report
    recorded."""
    from forgelib.data.tasks import generate_levels
    from forgelib.experts import apply_svf, load_expert
    from forgelib.phases.experts import correctness, make_check, test_per_level
    from forgelib.stats import noninferior, proportion_bounds
    from forgelib.modelio import load_quietstar

    ctx, result = experts
    assert result.ok and result.gate_passed
    params, g = ctx.params, ctx.guard
    report = json.loads((ctx.dir / "report.json").read_text())
    k = report["k"]
    assert result.metrics["n_experts"] == k and params.k_range[0] <= k <= params.k_range[1]
    t = report["test"]
    table, routes, n = t["correct"], t["route"], len(t["route"])
    assert set(table) == {"base", "routed", *(f"expert_{c}" for c in range(k))}
    # two-pass routing: an expert's questions get its answer, a base centroid's the base model's
    assert table["routed"] == [table[f"expert_{r}"][i] if r < k else table["base"][i] for i, r in enumerate(routes)]
    assert result.metrics["acc_routed"] == pytest.approx(sum(table["routed"]) / n, abs=1e-4)
    gate = _gate(result)
    used = sorted(set(r for r in routes if r < k))
    assert result.metrics["unused_experts"] == k - len(used)
    for c in used:  # each expert non-inferior to the base on the test questions routed to it
        idx = [i for i in range(n) if routes[i] == c]
        v = noninferior(f"expert{c}", [table["base"][i] for i in idx], [table[f"expert_{c}"][i] for i in idx],
                        params.margin, g.confidence, g.power)
        _check(gate, f"expert{c}_minus_base_lower_bound", v.lower, -params.margin, ">")
    # the routing accuracy's lower bound: among the questions some expert answers, the share routed to one that does
    solvable = [i for i in range(n) if any(table[f"expert_{c}"][i] for c in range(k))]
    right = sum(table["routed"][i] for i in solvable)
    lower = round(proportion_bounds(right, len(solvable), g.confidence)[0], 4) if solvable else 0.0
    _check(gate, "routing_acc_lower_bound", lower, params.min_routing_acc, ">=")
    assert result.metrics["routing_acc"] == round(right / len(solvable), 4)
    # the routed system keeps every family of the input suite
    _check_guard(ctx, result, baking[1], g.margin)
    assert set(gate) == ({f"keeps_{f}" for f in baking[1].suite} | {"routing_acc_lower_bound"}
                         | {f"expert{c}_minus_base_lower_bound" for c in used})
    assert result.suite == baking[1].suite
    # the router: the experts' centroids and a base centroid per suite family no expert trains on
    others = [f for f in baking[1].suite if f not in params.families]
    router = torch.load(ctx.dir / "experts" / "router.pt")
    assert report["base_families"] == router["base_families"] == others
    assert router["k"] == k and router["centroids"].shape[0] == k + len(others)
    # validation on held-out questions: a retired expert is z = 0 on disk and answers as the base does
    validation = report["validation"]
    assert set(validation) == {f"expert_{c}" for c in range(k)}
    assert result.metrics["retired_experts"] == sum(not v["kept"] for v in validation.values())
    folder = paths.resolve(result.artifacts["experts"])
    for c in range(k):
        z = load_expert(folder / f"expert_{c}.safetensors")
        if not validation[f"expert_{c}"]["kept"]:
            assert all(not v.abs().sum() for v in z.values()) and table[f"expert_{c}"] == table["base"]
        elif validation[f"expert_{c}"]["n"]:
            assert validation[f"expert_{c}"]["lower_bound"] > 0
    handed = load_quietstar(paths.resolve(result.models["model"]["path"]))
    before = load_quietstar(paths.resolve(baking[1].models["model"]["path"]))
    ids = torch.randint(5, 200, (1, 9))
    assert torch.equal(handed.base(input_ids=ids).logits, before.base(input_ids=ids).logits)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths.resolve(result.models["model"]["path"]))
    svf = apply_svf(handed.base)
    test = generate_levels(params.families, params.levels, test_per_level(params, k, g), "test", ctx.seed + 1)
    assert [s.family for s in test] == t["families"] and [s.level for s in test] == t["levels"]
    z = load_expert(folder / "expert_0.safetensors")
    assert correctness(svf, tok, test, z, make_check(params.answer_prefixes), params) == table["expert_0"]


@pytest.mark.slow
def test_compression_hands_on_one_artifact_whose_bits_are_its_bytes(compression, experts):
    """Phase 8 on the smoke set: the final model is one artifact file, the last stage that kept every family;
    bits per weight are its bytes; each stage was gated by its own guard and perplexity ratio; the input measured
    by Phase 8 is the model Phase 7 handed on, routed with its experts; the artifact answers."""
    from forgelib.quant.artifact import artifact_report
    from forgelib.modelio import load_lm
    from forgelib.tools import generate_with_tools
    from transformers import AutoTokenizer

    ctx, result = compression
    assert result.ok and result.gate_passed
    params = ctx.params
    m = result.metrics
    folder = paths.resolve(result.models["model"]["path"])
    on_disk = artifact_report(folder / "model.forge")
    assert m["artifact_bytes"] == on_disk["file_bytes"] and m["bits_per_weight"] == round(on_disk["bits_per_weight"], 4)
    assert m["compression_vs_specialists"] > 20  # measured 23.4 at 4.19 bits per weight (attention at 8 bits)
    assert m["acc_retention"] == pytest.approx(m["acc_final"] / m["acc_input"], abs=1e-4)
    assert paths.resolve(result.upstream["folder"]) == experts[0].dir  # the pipeline's Phase 7 was its input
    report = json.loads((ctx.dir / "report.json").read_text())
    assert report["experts"] == experts[1].metrics["n_experts"]  # the routed system, experts carried in the file
    suite = experts[1].suite
    # every stage: its artifact read back, its own guard over the input's suite and its perplexity ratio
    stages = [s for s in report["stages"] if s["name"] != "input"]
    assert [s["name"] for s in stages] == [s["name"] for s in params.stages]
    assert m["stages_kept"] + m["stages_rolled_back"] == len(stages)
    ref = report["reference"]
    for stage, spec in zip(stages, params.stages):
        checks = {c["name"]: c for c in stage["gate"]}
        allowed = spec.get("allowed_loss", params.allowed_loss)
        assert set(checks) == {"ppl_ratio"} | {f"keeps_{f}" for f in suite}
        assert checks["ppl_ratio"]["value"] == round(stage["ppl"] / ref["ppl"], 4)
        assert checks["ppl_ratio"]["bound"] == spec.get("max_ppl_ratio", params.max_ppl_ratio)
        rows = {r["family"]: r for r in stage["guard"]["table"]}
        for f in suite:
            assert checks[f"keeps_{f}"]["value"] == rows[f]["lower_bound"]
            assert checks[f"keeps_{f}"]["bound"] == pytest.approx(-allowed) == rows[f]["bound"]
        assert stage["kept"] == all(c["passed"] for c in stage["gate"])
    # the final artifact: the last kept stage's file, its guard the phase's guard
    final = next(s for s in reversed(report["stages"]) if s["kept"])
    assert (folder / "model.forge").read_bytes() == (ctx.dir / final["path"]).read_bytes()
    allowed = next((s.get("allowed_loss") for s in params.stages if s["name"] == final["name"]),
                   None) or params.allowed_loss
    guard = _check_guard(ctx, result, experts[1], allowed, labels=("phase-7 system", f"artifact ({final['name']})"))
    assert guard["table"] == final["guard"]["table"]
    gate = _gate(result)
    _check(gate, "final_ppl_ratio", round(final["ppl"] / ref["ppl"], 4), params.max_ppl_ratio, "<=")
    assert (m["ppl_final"], m["ppl_input"], m["acc_final"]) == (final["ppl"], ref["ppl"], final["acc"])
    _check(gate, "bits_per_weight", final["bits_per_weight"], params.max_bits_per_weight, "<=")
    assert m["bits_per_weight"] == final["bits_per_weight"]
    assert set(gate) == {f"keeps_{f}" for f in suite} | {"final_ppl_ratio", "bits_per_weight"}
    assert result.suite == suite
    model = load_lm(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert generate_with_tools(model.base, tok, ["3+4="], 16)[0].text  # it answers (with the calculator format)


@pytest.mark.slow
def test_chain_gate_holds_the_final_artifact_to_the_trunk(cognate, compression):
    """The chain's last gate (09_scorecard/chain.json, written by the scorecard notebook): the Phase-1 trunk and the
    final artifact on the guard's questions over every family the trunk knew, each family non-inferior at the
    chain's family margin and all pooled at its chain margin, recomputed from the answers; and it passed."""
    from forgelib.scorecard import chain_message
    from forgelib.stats import noninferior

    path = paths.outputs_root() / "p" / "09_scorecard" / "chain.json"
    assert path.is_file()
    verdict = json.loads(path.read_text())
    g = compression[0].guard  # the guard section of the chain's last phase: the one the chain gate reads
    trunk_suite = cognate[1].suite
    assert verdict["trunk"] == "1 cognate trunk" and verdict["final"] == "8 compression model"
    margin = g.chain_family_margin or g.margin
    assert verdict["margin"] == margin and verdict["chain_margin"] == g.chain_margin
    table = {r["family"]: r for r in verdict["table"]}
    assert set(table) == set(trunk_suite) | {"all (family mean)"} and set(verdict["answers"]) == set(trunk_suite)
    passed = {}
    for family, (lo, hi) in trunk_suite.items():
        a = verdict["answers"][family]
        v = noninferior(family, a["before"], a["after"], margin, g.confidence, g.power)
        row = table[family]
        assert row["levels"] == f"{lo}-{hi}" and row["n"] == v.n > 0
        assert (row["before"], row["after"], row["diff"], row["lower_bound"]) == (v.before, v.after, v.diff, v.lower)
        assert row["bound"] == pytest.approx(-margin) and row["verdict"] == ("pass" if v.passed else "FAIL")
        passed[family] = v.passed
        strict = noninferior(family, a["before"], a["after"], g.margin, g.confidence, g.power).passed
        assert verdict["within_one_phase_margin"][family] == strict
    pooled = noninferior_over("all", {f: (verdict["answers"][f]["before"], verdict["answers"][f]["after"])
                                      for f in trunk_suite}, g.chain_margin, g.confidence, g.power)
    assert verdict["pooled"] == pooled.as_row()
    row = table["all (family mean)"]
    assert (row["n"], row["lower_bound"], row["bound"]) == (pooled.n, pooled.lower, -g.chain_margin)
    assert verdict["at_or_above_trunk"] == (all(verdict["within_one_phase_margin"].values()) and pooled.passed)
    assert verdict["passed"] == (all(passed.values()) and pooled.passed)
    assert verdict["passed"], chain_message(verdict)


def test_quietstar_on_a_llama_style_model(tmp_path, monkeypatch):
    """Phase 3 takes any HF causal LM with the reserved thought tokens: a tiny Llama as the upstream champion."""
    from helpers import SUITE, TINY_GUARD

    from forgelib.data.tasks import build_mix, format_sample, suite_families
    from forgelib.data.tokenizer import train_tokenizer
    from forgelib.results import PhaseResult
    from forgelib.modelio import load_quietstar
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "out"))
    mix = {f: 1 for f in suite_families()}
    texts = [format_sample(s, with_steps=True) for s in build_mix(mix, (1, 3), 300, "train", 0)]
    tok = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    folder = tmp_path / "champion"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    up = PhaseResult("evomerge", 2, "llama3", status="ok", suite=SUITE)  # what the guard keeps
    with ModelRegistry(paths.registry_path()) as reg:
        up.models["champion"] = {"path": str(folder), "registry_id": reg.register_model(
            session_id="llama3", phase_name="evomerge", model_name="champion", model_path=str(folder))}
    overrides = {**QUIET, **TINY_GUARD,
                 "quietstar": {"steps": 3, "test_per_family": 2, "curve_every": 0, "curve_samples": 3,
                               "heatmap_samples": 1, "margin": 0.5, "nll_margin": 10.0, "pause_arm": True}}
    ctx = open_phase("quietstar", "parameters/smoke.yaml", overrides, session="llama3", upstream=up)
    result = ctx.spec.load().run(ctx.params, ctx)
    again = load_quietstar(paths.resolve(result.models["model"]["path"]))
    assert type(again.base).__name__ == "LlamaForCausalLM"
    test = json.loads((ctx.dir / "report.json").read_text())["test"]  # the pause-token ablation ran and is reported
    assert set(test) == {"base", "thoughts", "pause", "no_thoughts"}
    assert result.metrics["gain_over_pause_acc"] == round(test["thoughts"]["accuracy"] - test["pause"]["accuracy"], 4)
    assert result.metrics["gain_over_pause_acc_lower_bound"] <= result.metrics["gain_over_pause_acc"]
    thinks = bool(result.metrics["thinks"])
    assert again.thinking is thinks
    label = "thoughts" if thinks else "no_thoughts"
    own = bool(result.metrics["hands_on_trained_weights"])  # plain: the Phase-2 weights unless the trained ones won
    assert {g.name for g in result.gate} == ({f"acc_{label}_minus_base_lower_bound"} if own else set()) | {
        f"keeps_{f}" for f in SUITE} | ({"nll_thoughts_minus_no_thoughts_upper_bound"} if thinks else set())
    if not own:
        assert all(torch.equal(a, b) for a, b in zip(again.base.state_dict().values(), model.state_dict().values()))
    assert json.loads((ctx.dir / "guard.json").read_text())["suite"] == SUITE


def test_evomerge_on_llama_style_models(tmp_path, monkeypatch, tiny_llama):
    """Phase 2 takes any HF causal LM: a tiny Llama trunk and three perturbed copies as the upstream."""
    import copy

    from helpers import SUITE, TINY_GUARD

    from forgelib.data.tasks import build_mix, format_sample, suite_families
    from forgelib.data.tokenizer import train_tokenizer
    from forgelib.results import PhaseResult
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "out"))
    texts = [format_sample(s) for s in build_mix({f: 1 for f in suite_families()}, (1, 1), 300, "train", 0)]
    tok = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    trunk = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    up = PhaseResult("handmade", 1, "llama", status="ok", suite=SUITE)  # what the guard keeps
    with ModelRegistry(paths.registry_path()) as reg:
        for i, role in enumerate(("trunk", "a", "b", "c")):
            model = copy.deepcopy(trunk)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * i * torch.randn_like(p))
            folder = tmp_path / role
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            up.models[role] = {"path": str(folder), "registry_id": reg.register_model(
                session_id="llama", phase_name="handmade", model_name=role, model_path=str(folder))}
    overrides = {**QUIET, **TINY_GUARD,
                 "evomerge": {"sources": ["a", "b", "c"], "runtime": {}, "budget": 10, "fitness_per_family": 2,
                              "select_per_family": 2, "finalists": 1, "per_layer": False}}
    ctx = open_phase("evomerge", "parameters/smoke.yaml", overrides, session="llama", upstream=up)
    result = ctx.spec.load().run(ctx.params, ctx)
    assert result.models["champion"]["registry_id"]
    assert {g.name for g in result.gate} == ({"champion_minus_best_parent_acc_lower_bound",
                                              "champion_minus_uniform_acc_lower_bound"} | {f"keeps_{f}" for f in SUITE})
    guard = json.loads((ctx.dir / "guard.json").read_text())
    assert guard["suite"] == SUITE and guard["labels"] == ["trunk", "champion"]
    assert result.suite == SUITE


def test_evomerge_without_needed_upstream_models_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path))
    up = PhaseResult("cognate", 1, "x", status="ok", models={"trunk": {"path": str(tmp_path), "registry_id": None}})
    ctx = open_phase("evomerge", "parameters/smoke.yaml", QUIET, session="x", upstream=up)
    with pytest.raises(UpstreamError, match=r"needs upstream models \['reasoning', 'memory', 'speed'\]"):
        run_phase(ctx)
    assert PhaseResult.load(ctx.dir).status == "failed"


def test_impossible_model_shape_names_the_field(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path))
    with pytest.raises(ParameterError, match=r"cognate\.model: num_attention_heads \(4\) must divide hidden_size "
                                             r"\(30\)"):  # when the parameters load, before anything is created
        open_phase("cognate", "parameters/smoke.yaml",
                   {**QUIET, "cognate": {"model": {"hidden_size": 30}, "trunk": {"steps": 1}}}, session="bad")
    assert not (tmp_path / "bad").exists()


def test_unknown_family_in_mix_is_a_parameter_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path))
    with pytest.raises(ParameterError, match=r"trunk\.mix: unknown or no families \['arithmetic'\]"):
        open_phase("cognate", "parameters/smoke.yaml", {"cognate": {"trunk": {"mix": {"arithmetic": 1}}}})


def test_tokenizer_without_special_tokens_is_refused(tmp_path):
    from forgelib.data.tokenizer import MissingSpecialTokensError, load_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path)
    with pytest.raises(MissingSpecialTokensError, match=r"<\|startofthought\|>"):
        load_tokenizer(tmp_path)


def test_trunk_from_a_checkpoint_of_another_architecture_is_refused(tmp_path, monkeypatch, tiny_llama):
    """A GPT-2 folder is neither a checkpoint of the trunk nor a pretrained Llama: refused naming both
    architectures. A Llama folder is a pretrained trunk (tests/test_gguf.py), but one without a tokenizer cannot be."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from forgelib.modelio import ModelLoadError
    from forgelib.train import CheckpointMismatchError

    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "out"))
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)).save_pretrained(
        tmp_path / "gpt2")
    ctx = open_phase("cognate", "parameters/smoke.yaml",
                     {**QUIET, "cognate": {"init_from": str(tmp_path / "gpt2")}}, session="ckpt")
    with pytest.raises(CheckpointMismatchError, match="is a 'gpt2' model, but the model being trained is 'cognate'"):
        run_phase(ctx)
    tiny_llama.save_pretrained(tmp_path / "llama")
    ctx = open_phase("cognate", "parameters/smoke.yaml",
                     {**QUIET, "cognate": {"init_from": str(tmp_path / "llama")}}, session="llama")
    with pytest.raises((ModelLoadError, OSError, ValueError), match="tokenizer"):
        run_phase(ctx)


@pytest.mark.slow
def test_orchestrator_runs_a_single_phase_with_the_source_design_names(cognate):
    from forgelib.pipeline import PipelineOrchestrator

    # a smaller search than the smoke set's (the API is under test, not the search): 20 s instead of 47
    small = {**QUIET, "evomerge": {"budget": 10, "fitness_per_family": 4, "select_per_family": 8, "finalists": 1,
                                   "runtime_choices": [{"n_cycles": 1, "use_memory": False}], "runtime_top_k": 1}}
    with PipelineOrchestrator({"params_file": "parameters/smoke.yaml", "session": "orch",
                               "overrides": small}) as pipe:
        result = pipe.run_single_phase(phase_num=2, input_models=[cognate[0].dir])
    assert result.ok and result.models["champion"]["registry_id"]


def test_a_step_budget_that_phase1_would_ignore_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path))
    with pytest.raises(ParameterError, match=r"train\.steps \(500\) is not used by Phase 1.*trunk\.steps"):
        open_phase("cognate", "parameters/smoke.yaml", {"cognate": {"train": {"steps": 500}}})


def _lab_checks(session, shots, work):
    """The pipeline notebook (resuming ``session``: nothing recomputes) and the scorecard notebook, run in
    JupyterLab by headless Chromium; then the scorecard's generation playground is used like a person would:
    a new question + Enter, the max-tokens slider moved with the keyboard, another model picked, Run."""
    import secrets

    from browser import JupyterLab, LabBrowser, copy_notebook, find_browser
    from forgelib.phases import PHASES

    chromium, chromedriver = find_browser()
    nbs = paths.repo_root() / "notebooks"
    copy_notebook(nbs / "00_pipeline.ipynb", work / "lab" / "00_pipeline.ipynb", session=session, resume=True)
    copy_notebook(nbs / "09_scorecard.ipynb", work / "lab" / "09_scorecard.ipynb", session=session)
    copy_notebook(nbs / "01_cognate.ipynb", work / "lab" / "01_cognate.ipynb", explore=session)
    env = {"FORGE_OUTPUTS": str(paths.outputs_root()), "FORGE_ROOT": str(paths.repo_root())}
    with JupyterLab(work / "lab", work / "state", token=secrets.token_hex(16), env=env) as lab, \
            LabBrowser(lab, shots, chromium, chromedriver, work / "chromium") as browser:
        browser.open_notebook("00_pipeline.ipynb")
        browser.run_all("00_pipeline.ipynb", timeout=120)
        tables = browser.js("""return Array.from(window.jupyterapp.shell.currentWidget.node
            .querySelectorAll('.jp-OutputArea-output table'));""")
        summary = next((t for t in tables if all(spec.dirname in t.text for spec in PHASES)), None)
        assert summary is not None, \
            f"no summary table naming every phase in the pipeline notebook's outputs: {[t.text for t in tables]}"
        assert summary.text.count("skipped") == len(PHASES), f"a phase was not kept as completed:\n{summary.text}"
        browser.js("arguments[0].scrollIntoView({block: 'center'})", summary)
        browser.screenshot("00_pipeline")
        browser.save()
        lab.shutdown_kernels()

        browser.open_notebook("09_scorecard.ipynb")
        browser.run_all("09_scorecard.ipynb", timeout=120)
        answers = _use_playground(browser)
        browser.save()
        lab.shutdown_kernels()

        # Phase 1's notebook exploring the finished session: nothing trains, its playground answers
        browser.open_notebook("01_cognate.ipynb")
        browser.run_all("01_cognate.ipynb", timeout=120)
        return answers, _use_explored_playground(browser)


def _use_explored_playground(browser):
    """Phase 1's prompt box in its notebook opened to explore a finished session: a new prompt + Enter changes
    the answers of the four models; returns (the first answer, the second)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from browser import wait_for

    box = wait_for(lambda: browser.js("""
        const label = Array.from(window.jupyterapp.shell.currentWidget.node
            .querySelectorAll('.widget-text label')).find(l => l.textContent.trim() === 'prompt');
        return label ? label.closest('.widget-vbox') : null;"""), 30, "the playground (a 'prompt' box)")
    browser.js("arguments[0].scrollIntoView({block: 'center'})", box)
    answer = lambda: box.find_element(By.CSS_SELECTOR, ".widget-output").text.strip()  # noqa: E731
    first = wait_for(lambda: "trunk:" in answer() and answer(), 60, "the explored playground's first answer")
    prompt = box.find_element(By.CSS_SELECTOR, ".widget-text input")
    prompt.click()
    prompt.send_keys(Keys.CONTROL, "a")
    prompt.send_keys("40-13=", Keys.ENTER)
    second = wait_for(lambda: (a := answer()) != first and "40-13=" in a and "speed:" in a and a, 60,
                      f"the answers to a new prompt (it still reads {first!r})")
    browser.screenshot("01_explore_playground")
    browser.raise_errors("01_cognate.ipynb")
    return first, second


def _use_playground(browser):
    """The scorecard notebook's playground, used like a person would; returns its three answers."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    from browser import wait_for

    box = wait_for(lambda: browser.js("""
        const label = Array.from(window.jupyterapp.shell.currentWidget.node
            .querySelectorAll('.widget-text label')).find(l => l.textContent.trim() === 'question');
        return label ? label.closest('.widget-vbox') : null;"""), 30, "the playground (a 'question' box)")
    browser.js("arguments[0].scrollIntoView({block: 'center'})", box)
    answer = lambda: box.find_element(By.CSS_SELECTOR, ".widget-html-content").text.strip()  # noqa: E731
    first = wait_for(answer, 30, "the playground's first answer")
    browser.screenshot("09_playground_before")

    # a new question, sent with Enter (the text box updates on Enter or blur)
    question = box.find_element(By.CSS_SELECTOR, ".widget-text input")
    question.click()
    question.send_keys(Keys.CONTROL, "a")
    question.send_keys("40-13=", Keys.ENTER)
    second = wait_for(lambda: (a := answer()) != first and a, 30,
                      f"the answer to change after a new question (it still reads {first!r})")

    # the max-tokens slider, moved with the arrow keys on its handle
    slider = box.find_element(By.XPATH, ".//div[contains(@class, 'widget-slider')]"
                                        "[.//label[normalize-space()='max tokens']]")
    readout = slider.find_element(By.CSS_SELECTOR, ".widget-readout")
    start = int(readout.text)
    slider.find_element(By.CSS_SELECTOR, ".noUi-handle").click()
    for _ in range(8):
        slider.find_element(By.CSS_SELECTOR, ".noUi-handle").send_keys(Keys.ARROW_LEFT)
    wait_for(lambda: int(readout.text) < start, 10, f"the max-tokens slider to move below {start}")

    # another model of the chain (Phase 1's trunk), then Run
    pick = Select(box.find_element(By.CSS_SELECTOR, ".widget-dropdown select"))
    pick.select_by_index(0)
    marker = pick.first_selected_option.text.strip()
    box.find_element(By.XPATH, ".//button[normalize-space()='Run']").click()
    third = wait_for(lambda: (a := answer()).startswith(marker + ":") and a != second and a, 30,
                     f"the answer of {marker!r} after Run (it still reads {second!r})")
    browser.screenshot("09_playground_after")
    browser.raise_errors("09_scorecard.ipynb")
    return first, second, third


@pytest.mark.slow
def test_jupyterlab_in_a_real_browser(pipeline, outputs, tmp_path):
    """JupyterLab in headless Chromium: the pipeline notebook (resuming session "p") and the scorecard notebook
    run every cell without an error output, and the scorecard's playground answers a new question and another
    model. Screenshots: <outputs>/browser/."""
    from browser import BrowserUnavailable, find_browser

    try:
        find_browser()
    except BrowserUnavailable as exc:
        pytest.skip(f"Chromium/chromedriver not installed: {exc}; .ci/run installs them with apt-get")
    before = _snapshot(paths.outputs_root() / "p" / "01_cognate")
    (first, second, third), explored = _lab_checks("p", paths.outputs_root() / "browser", tmp_path)
    assert first != second != third
    assert explored[0] != explored[1]
    assert _snapshot(paths.outputs_root() / "p" / "01_cognate") == before, "exploring wrote into the phase folder"


def _snapshot(folder):
    """Every file under ``folder`` with its modification time and bytes."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_finished_phase_notebook_explored_with_papermill_runs_nothing(pipeline, outputs, tmp_path):
    """Phase 4's notebook with ``explore`` set to the finished session: every display cell runs (the layer widget
    included), the phase folder and the registry's phase runs stay as they were, and nothing trains."""
    from forgelib.notebooks import execute

    folder = paths.outputs_root() / "p" / "04_bitnet"
    before = _snapshot(folder)
    with ModelRegistry(paths.registry_path()) as reg:
        runs = reg.list_phase_runs("p")
    executed = execute(paths.repo_root() / "notebooks" / "04_bitnet.ipynb", tmp_path / "04_bitnet.ipynb",
                       {"explore": "p"})
    nb = _ran_as_committed(executed, "notebooks/04_bitnet.ipynb")
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c["outputs"])
    assert "04_bitnet of session p: the finished run's results" in text and "nothing is run (explore)" in text
    assert "qat:" not in text, "it trained"
    assert _snapshot(folder) == before
    with ModelRegistry(paths.registry_path()) as reg:
        assert reg.list_phase_runs("p") == runs


TRAIN_CELL = """import torch
from forgelib.train import TrainConfig, train

model = torch.nn.Linear(4, 4)
batches = iter(lambda: {"input_ids": torch.ones(2, 4)}, None)
history = train(model, batches, torch.optim.SGD(model.parameters(), 0.01), TrainConfig(steps=600, log_every=100),
                loss_fn=lambda m, b: (((m(b["input_ids"]) - 1) ** 2).mean(), {}), desc="qat")"""


@pytest.mark.slow
def test_training_in_a_papermill_kernel_prints_static_progress_lines(tmp_path):
    """A notebook run by forgelib.notebooks (as the pipeline runs each phase) that trains: its progress is plain
    text ending on ``qat: 600/600 steps, S s, loss=…``, and no cell holds a tqdm widget (saved frozen at 0%)."""
    import re

    import nbformat

    from forgelib.notebooks import execute

    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(TRAIN_CELL)]), tmp_path / "t.ipynb")
    outputs = nbformat.read(execute(tmp_path / "t.ipynb", tmp_path / "out.ipynb"), as_version=4).cells[0].outputs
    assert [o.get("output_type") for o in outputs] == ["stream"], "a widget bar was displayed"
    assert re.fullmatch(r"(qat: \d+/600 steps, \d+ s, loss=\S+\n)*qat: 600/600 steps, \d+ s, loss=\S+\n",
                        outputs[0]["text"]), outputs[0]["text"]
