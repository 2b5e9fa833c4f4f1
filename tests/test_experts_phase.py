"""Phase 7 on tiny real models: a run end to end on a ternary Quiet-STaR upstream (experts saved as small files
next to the model that reload to the same z, the handed-on model unchanged, every metric the issue names); the
router's base centroids sending the suite's other families to the base; the gate on hand-made tables."""
import itertools
import json
import math
import zlib

import pytest
import torch

from forgelib import paths
from helpers import SUITE, TINY_GUARD, quietstar_upstream, task_tokenizer


@pytest.fixture(scope="module")
def tok():
    return task_tokenizer()


def _upstream(tok, tmp_path, ternary=True):
    folder = tmp_path / "baking"
    return quietstar_upstream(tok, folder, "baking", 6, "ex", ternary=ternary), folder


TINY = {"families": ["arith", "multistep"], "levels": [1, 1], "discover_per_family": 12, "k_range": [2, 3],
        "train": {"steps": 2, "batch_size": 4, "max_new_tokens": 8}, "test_per_level": 4, "few_shot": 3,
        "cem": {"iterations": 2, "population": 3, "elite": 1}, "search_budget": 2, "search_per_family": 2,
        "max_new_tokens": 8}


def coin_grader(prefixes):
    """Marks about half the answers right, each by a hash of question, answer and the grading's running number: a
    random tiny model answers nothing right (every accuracy 0) and its experts, two steps from z = 0, answer as the
    base does (every correctness list the same), either of which would make the recomputations below trivially
    equal. With these coins the base, each expert and the routed answers have different lists."""
    calls = itertools.count()
    return lambda sample, text: zlib.crc32(f"{sample.prompt}|{text}|{next(calls)}".encode()) % 2 == 0


@pytest.mark.parametrize("ternary", [True, False], ids=["ternary", "llama"])
def test_phase_runs_end_to_end_and_saves_experts(tok, tmp_path, monkeypatch, ternary):
    from forgelib.data.tasks import generate_levels
    from forgelib.experts import apply_svf, load_expert
    from forgelib.experts.discover import question_features
    from forgelib.phases import open_phase
    from forgelib.modelio import load_quietstar

    up, folder = _upstream(tok, tmp_path, ternary)
    ctx = open_phase("experts", "parameters/smoke.yaml", {"run": {"quiet": True, "tracking": "jsonl"}, **TINY_GUARD,
                                                          "experts": TINY}, session=f"ex-{ternary}", upstream=up)
    monkeypatch.setattr(ctx.spec.load(), "make_check", coin_grader)
    result = ctx.spec.load().run(ctx.params, ctx)
    metrics = result.metrics
    report = json.loads((ctx.dir / "report.json").read_text())
    k = report["k"]
    assert metrics["n_experts"] == k and 2 <= k <= 3
    # k is the silhouette's choice among the k tried
    assert set(report["silhouettes"]) == {"2", "3"} and all(-1 <= v <= 1 for v in report["silhouettes"].values())
    assert k == int(max(report["silhouettes"], key=report["silhouettes"].get))
    # discovery: the per-family cluster counts are those of the clustered questions' labels, every cluster used
    labels, families = report["features_2d"]["label"], report["features_2d"]["family"]
    assert len(labels) == 12 * 2 and set(labels) == set(range(k))
    assert report["discovery"] == {f: [sum(1 for lab, g in zip(labels, families) if g == f and lab == c)
                                       for c in range(k)] for f in TINY["families"]}
    assert all(sum(row) == 12 for row in report["discovery"].values())
    # the test questions: regenerated here, routed here to the nearest saved centroid by the handed-on model
    test = generate_levels(TINY["families"], tuple(TINY["levels"]), TINY["test_per_level"], "test", ctx.seed + 1)
    assert report["test"]["families"] == [q.family for q in test]
    assert report["test"]["levels"] == [q.level for q in test]
    router = torch.load(paths.resolve(result.artifacts["experts"]) / "router.pt")
    # the router: the k discovered centroids, then a base centroid per suite family no expert trains on (logic)
    assert report["base_families"] == router["base_families"] == ["logic"] and router["k"] == k
    assert router["centroids"].shape[0] == k + 1
    handed = load_quietstar(paths.resolve(result.models["model"]["path"]))
    feats = question_features(handed.base, tok, [q.prompt for q in test])
    route = torch.cdist(feats, router["centroids"]).argmin(1).tolist()
    assert report["test"]["route"] == route
    # accuracies from the per-question correctness lists, the routed answer being the routed-to expert's
    table, n = report["test"]["correct"], len(test)
    assert set(table) == {"base", "routed", *(f"expert_{c}" for c in range(k))}
    assert all(len(v) == n and set(v) <= {0, 1} for v in table.values())
    # (a centroid past the k experts' is a base centroid: its questions are answered by the base)
    assert table["routed"] == [table[f"expert_{r}"][i] if r < k else table["base"][i] for i, r in enumerate(route)]
    mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
    oracle = [max(table[f"expert_{c}"][i] for c in range(k)) for i in range(n)]
    assert metrics["acc_base"] == mean(table["base"]) and metrics["acc_routed"] == mean(table["routed"])
    assert metrics["acc_oracle"] == mean(oracle)
    solvable = [i for i in range(n) if oracle[i]]
    if solvable:  # the share of the questions some expert answers that went to an expert that does
        assert metrics["routing_acc"] == mean([table["routed"][i] for i in solvable])
    else:
        assert math.isnan(metrics["routing_acc"])
    for c in range(k):
        mine = [i for i in range(n) if route[i] == c]
        if mine:
            assert metrics[f"acc_cluster{c}_base"] == mean([table["base"][i] for i in mine])
            assert metrics[f"acc_cluster{c}_expert"] == mean([table[f"expert_{c}"][i] for i in mine])
    assert metrics["unused_experts"] == sum(1 for c in range(k) if c not in route)
    experts = paths.resolve(result.artifacts["experts"])
    files = sorted(p.name for p in experts.glob("expert_*.safetensors"))
    assert files == [f"expert_{c}.safetensors" for c in range(k)]
    # an expert file is small: one float per singular value of every adapted matrix
    assert (experts / files[0]).stat().st_size < 4 * result.metrics["expert_params"] + 4096
    original = load_quietstar(folder)
    ids = torch.randint(5, 200, (1, 7))
    assert torch.equal(handed.base(input_ids=ids).logits, original.base(input_ids=ids).logits)  # z lives in files
    svf = apply_svf(handed.base)
    svf.load_z(load_expert(experts / files[0]))
    assert svf.expert_params == result.metrics["expert_params"]
    assert set(report["scalings"]) == {f"expert_{c}" for c in range(k)}
    # the gate: one non-inferiority check per expert with test questions, the routing bound, then the guard of the
    # routed system over the input's whole suite (arith and logic: logic is no expert's family)
    from forgelib.phases.experts import summarize
    from forgelib.suite import GuardParams

    gate = {c.name: c for c in result.gate}
    used = [c for c in range(k) if c in route]
    assert set(gate) == {f"expert{c}_minus_base_lower_bound" for c in used} | {
        "routing_acc_lower_bound", *(f"keeps_{f}" for f in SUITE)}
    again = summarize(report, ctx.params, GuardParams(**TINY_GUARD["guard"]))[1]
    assert [(c.name, c.value, c.bound) for c in again] == [(c.name, c.value, c.bound) for c in result.gate[:len(again)]]
    guard = json.loads((ctx.dir / "guard.json").read_text())
    assert guard["suite"] == SUITE and guard["labels"] == ["phase-6 model", "routed experts"]
    assert all(8 <= row["n"] <= 16 for row in guard["families"].values())


def test_bench_experts_runs_every_arm(tok, tmp_path, monkeypatch):
    import statistics

    import yaml

    from forgelib.bench import experts as bench
    from forgelib.phases import open_phase

    up, _ = _upstream(tok, tmp_path)
    ctx = open_phase("experts", "parameters/smoke.yaml", {"run": {"quiet": True, "tracking": "jsonl"}, **TINY_GUARD,
                                                          "experts": TINY}, session="ex-bench", upstream=up)
    monkeypatch.setattr(ctx.spec.load(), "make_check", coin_grader)  # the bench takes its grader from the phase
    result = ctx.spec.load().run(ctx.params, ctx)
    result.save(ctx.dir)  # what run_phase writes (a tiny random model does not pass the smoke gate)
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({"experts": TINY}))
    out = tmp_path / "bench.json"
    assert bench.main(["--phase7", str(ctx.dir), "--params", str(params), "--seeds", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert {"base", "svf", "lora_matched", "lora_r16"} <= set(summary) and len(report["per_seed"]) == 2
    svf, matched = summary["svf"]["params_per_expert"], summary["lora_matched"]["params_per_expert"]
    from forgelib.bench import phase_model
    from forgelib.bench.experts import lora_cost

    assert matched == lora_cost(phase_model(ctx.dir)[0], summary["lora_matched"]["targets"], 1)
    assert summary["lora_r16"]["params_per_expert"] > 10 * svf and abs(matched - svf) <= svf
    # every summary value recomputed from the per-seed correctness lists (8 test questions, 2 seeds)
    n = 2 * TINY["test_per_level"]
    mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
    base = summary["base"]
    assert 0 <= base["accuracy"] <= 1 and base["accuracy"] == pytest.approx(mean(list(base["per_family"].values())))
    for arm in ("svf", "lora_matched", "lora_r16"):
        rows = [seed[arm] for seed in report["per_seed"]]
        assert all(len(r["routed"]) == n and set(r["routed"]) <= {0, 1} for r in rows)
        rates = [sum(r["routed"]) / n for r in rows]
        assert summary[arm]["accuracy"]["mean"] == mean(rates)
        assert summary[arm]["accuracy"]["ci95"] == round(12.706 * statistics.stdev(rates) / math.sqrt(2), 4)
    rows = [seed["svf"] for seed in report["per_seed"]]
    assert summary["svf"]["oracle"]["mean"] == mean([sum(r["oracle"]) / n for r in rows])
    # routing accuracy: among the questions some expert answers, the share the routed expert answers
    solvable = [r for r in rows if any(r["oracle"])]
    routing = [sum(r["routed"][i] for i in range(n) if r["oracle"][i]) / sum(r["oracle"]) for r in solvable]
    assert [r["routing_acc"] for r in solvable] == pytest.approx(routing)
    assert summary["svf"]["routing_acc"]["mean"] == mean(routing)
    unseen = summary["svf"]["unseen"]
    assert unseen["base"] == rows[0]["unseen_base"]
    assert unseen["mixture"]["mean"] == mean([r["unseen_mixture"] for r in rows])
    assert all(0 <= x <= 1 for x in [*rates, *routing, unseen["base"], unseen["mixture"]["mean"]])


def test_base_centroids_route_the_suites_other_families_to_the_base(tok):
    """A base centroid per suite family no expert trains on (the mean feature of its train questions at its suite
    levels); questions routed to one are answered by the base model (z = 0), not by the nearest expert."""
    from forgelib.data.tasks import generate_levels
    from forgelib.experts import SVFConfig, apply_svf, remove_svf
    from forgelib.experts.discover import question_features
    from forgelib.experts.route import RoutingSettings, assignments
    from forgelib.phases.experts import Params, base_centroids
    from forgelib.suite import Asker
    from helpers import tiny_task_llama

    model = tiny_task_llama(tok).eval()
    params = Params(families=["arith", "multistep"], base_per_family=16)
    svf = apply_svf(model, SVFConfig())
    others, extra = base_centroids(svf, tok, {"arith": (1, 1), "logic": (1, 2), "recall": (1, 1)}, params, seed=0)
    assert others == ["logic", "recall"] and extra.shape == (2, model.config.hidden_size)
    for row, (family, levels, per) in enumerate((("logic", (1, 2), 8), ("recall", (1, 1), 16))):
        pool = generate_levels([family], levels, per, "train", 11)  # base_per_family spread over the levels
        assert torch.allclose(extra[row], question_features(svf, tok, [s.prompt for s in pool]).mean(0))
    assert base_centroids(svf, tok, {"arith": (1, 1)}, params, 0) == ([], None)  # no other family: no base row
    # two experts far from z = 0, with the mean features of their families as their centroids
    experts_centroids = torch.stack([question_features(svf, tok, [s.prompt for s in generate_levels(
        [f], (1, 1), 16, "train", 5)]).mean(0) for f in params.families])
    gen = torch.Generator().manual_seed(0)
    experts = [{n: 3 * torch.randn(z.shape, generator=gen) for n, z in svf.get_z().items()} for _ in range(2)]
    remove_svf(svf)
    router = torch.cat([experts_centroids, extra])
    questions = generate_levels(["logic", "recall", "arith", "multistep"], (1, 1), 12, "test", 3)
    groups = assignments(question_features(model, tok, [q.prompt for q in questions]), router, RoutingSettings())
    to_base = [i for i, g in enumerate(groups) if min(g) >= 2]
    to_expert = [i for i, g in enumerate(groups) if max(g) < 2]
    assert len(to_base) + len(to_expert) == len(questions)
    assert sum(questions[i].family in ("logic", "recall") for i in to_base) >= 12  # most of the base families'
    base = Asker(model, tok, max_new_tokens=8).answers(questions)
    routed = Asker(model, tok, experts=experts, centroids=router, max_new_tokens=8).answers(questions)
    assert all(routed[i] == base[i] for i in to_base)
    assert sum(routed[i] != base[i] for i in to_expert) > len(to_expert) // 2  # the experts do change answers
    # without the base centroids those questions go to an expert and their answers change
    alone = Asker(model, tok, experts=experts, centroids=experts_centroids, max_new_tokens=8).answers(questions)
    assert sum(alone[i] != base[i] for i in to_base) > len(to_base) // 2


def _report(route, base, experts, k):
    table = {"base": base, **{f"expert_{c}": e for c, e in enumerate(experts)}}
    table["routed"] = [table[f"expert_{r}"][i] if r < k else base[i] for i, r in enumerate(route)]
    return {"k": k, "expert_params": 100, "test": {"route": route, "correct": table}}


def test_gate_holds_each_expert_to_the_base_on_its_own_questions():
    from forgelib.phases.experts import Params, summarize
    from forgelib.stats import noninferior, proportion_bounds
    from forgelib.suite import GuardParams

    guard = GuardParams()
    # 120 questions: 60 routed to expert 0 (same answers as the base), 40 to expert 1 (loses 16 of the base's 30
    # right answers), 20 to the base centroid (index 3); expert 2 gets none
    route = [0] * 60 + [1] * 40 + [3] * 20
    base = [1, 0] * 30 + [1] * 30 + [0] * 10 + [1] * 20
    e0 = base[:60] + [0] * 60
    e1 = [0] * 60 + [0] * 16 + [1] * 14 + [0] * 10 + [0] * 20
    e2 = [1] * 120  # would answer everything, but no question is routed to it
    metrics, checks = summarize(_report(route, base, [e0, e1, e2], 3), Params(), guard)
    checks = {c.name: c for c in checks}
    assert set(checks) == {"expert0_minus_base_lower_bound", "expert1_minus_base_lower_bound",
                           "routing_acc_lower_bound"}
    assert metrics["unused_experts"] == 1
    for c, e in ((0, e0), (1, e1)):
        mine = [i for i, r in enumerate(route) if r == c]
        v = noninferior(f"expert{c}", [base[i] for i in mine], [e[i] for i in mine], 0.10, guard.confidence,
                        guard.power)
        assert checks[f"expert{c}_minus_base_lower_bound"].value == v.lower
        assert checks[f"expert{c}_minus_base_lower_bound"].bound == -0.10
        assert metrics[f"acc_cluster{c}_base"] == round(sum(base[i] for i in mine) / len(mine), 4)
    assert checks["expert0_minus_base_lower_bound"].passed  # no change on 60 questions
    assert not checks["expert1_minus_base_lower_bound"].passed  # 16 of 40 lost
    # routing: among the questions some expert answers (all 120: expert 2 answers each), the routed answer's share
    routed = _report(route, base, [e0, e1, e2], 3)["test"]["correct"]["routed"]
    lower = proportion_bounds(sum(routed), 120, guard.confidence)[0]
    assert metrics["routing_acc"] == round(sum(routed) / 120, 4)
    assert checks["routing_acc_lower_bound"].value == round(lower, 4) and checks["routing_acc_lower_bound"].bound == 0.5
    assert checks["routing_acc_lower_bound"].passed is (lower >= 0.5)
    wider = {c.name: c for c in summarize(_report(route, base, [e0, e1, e2], 3), Params(margin=0.6), guard)[1]}
    assert wider["expert1_minus_base_lower_bound"].passed  # the margin is the parameter's


def test_test_questions_are_sized_for_every_experts_check():
    import math

    from forgelib.phases.experts import Params, test_per_level
    from forgelib.suite import GuardParams

    guard = GuardParams()
    params = Params(families=["arith", "multistep"], levels=(1, 3))
    assert test_per_level(params, 3, guard) == math.ceil(1.5 * 3 * guard.needed(0.10) / 6)
    assert test_per_level(Params(families=["arith", "multistep"], levels=(1, 3), margin=0.2), 2, guard) == \
        math.ceil(1.5 * 2 * guard.needed(0.2) / 6)
    assert test_per_level(Params(test_per_level=5), 3, guard) == 5


def test_removed_gate_keys_are_refused(tmp_path):
    from forgelib.params import ParameterError, load_section
    from forgelib.phases.experts import Params

    for key in ("min_expert_gain: 0.0", "gate_z: 1.645"):
        path = tmp_path / "p.yaml"
        path.write_text(f"experts:\n  {key}\n")
        with pytest.raises(ParameterError, match=key.split(":")[0]):
            load_section(path, "experts", Params, None, {"experts", "run"})
    with pytest.raises(ValueError, match="margin must lie in"):
        Params(margin=0.0)
    with pytest.raises(ValueError, match="base_per_family"):
        Params(base_per_family=-1)
