"""Phase 3's gate, parameters and the benchmark's compute accounting, on hand-made numbers and tiny models."""
import dataclasses
import math
import random

import pytest
import torch

from forgelib.bench.quietstar import ARMS, TokenCounter, equal_compute_steps, interval, step_tokens
from forgelib.params import ParameterError
from forgelib.phases import quietstar as phase3
from forgelib.phases.quietstar import Params, gate_checks, thinking_decision, training_batches
from forgelib.quietstar import QuietStarConfig
from forgelib.stats import mean_bounds, noninferior, superior
from forgelib.suite import GuardParams


GUARD = GuardParams()


def _row(correct, nll):
    """A score row as ``forgelib.phases.quietstar.score`` writes it: per question the correctness and the NLL."""
    return {"accuracy": sum(correct) / len(correct), "answer_nll": sum(nll) / len(nll), "correct": list(correct),
            "sample_nll": list(nll)}


def _gate(thoughts, no_thoughts, base, guard=GUARD, **kw):
    checks, verdicts = gate_checks({"thoughts": thoughts, "no_thoughts": no_thoughts, "base": base}, Params(**kw),
                                   guard)
    return {c.name: c for c in checks}, verdicts


def _nll(n, centre, spread, seed=0):
    gen = random.Random(seed)
    return [centre + gen.uniform(-spread, spread) for _ in range(n)]


NLL_CHECK, ACC_CHECK = "nll_thoughts_minus_no_thoughts_upper_bound", "acc_thoughts_minus_base_lower_bound"


def test_gate_passes_when_thinking_lowers_the_nll_and_accuracy_holds():
    correct = [1, 0, 1, 1] * 20  # 80 questions, the same answers in every row
    off = _nll(80, 1.0, 0.3)
    thoughts = [x - 0.1 for x in off]  # thinking lowers every question's NLL by 0.1
    checks, verdicts = _gate(_row(correct, thoughts), _row(correct, off), _row(correct, _nll(80, 1.3, 0.3, 1)))
    assert set(checks) == {NLL_CHECK, ACC_CHECK} and all(c.passed for c in checks.values())
    assert checks[NLL_CHECK].value == pytest.approx(-0.1, abs=1e-6) and checks[NLL_CHECK].bound == 0.02
    assert verdicts["nll_thoughts_minus_no_thoughts"]["mean"] == pytest.approx(-0.1)
    # the accuracy check is forgelib.stats' paired non-inferiority at `margin`, the base model before
    expected = noninferior("thoughts_vs_base", correct, correct, 0.10, GUARD.confidence, GUARD.power)
    assert checks[ACC_CHECK].value == expected.lower and checks[ACC_CHECK].bound == -0.10
    assert verdicts["accuracy"] == expected.as_row()


@pytest.mark.parametrize("raise_by, spread, passes", [
    (0.05, 0.01, False),   # thinking raises each question's NLL by 0.05: beyond nll_margin 0.02
    (0.01, 0.01, True),    # by 0.01, measured tightly: within the margin
    (-0.01, 0.5, False),   # lower on average, but too noisy to show the rise stays below the margin
])
def test_nll_upper_bound_fails_when_thinking_raises_the_per_question_nll(raise_by, spread, passes):
    correct = [1, 0] * 30
    off = _nll(60, 1.0, 0.2)
    noise = _nll(60, 0.0, spread, seed=2)
    thoughts = [x + raise_by + e for x, e in zip(off, noise)]
    checks, verdicts = _gate(_row(correct, thoughts), _row(correct, off), _row(correct, off))
    diffs = [t - o for t, o in zip(thoughts, off)]
    mean, _, upper = mean_bounds(diffs, GUARD.confidence)
    assert checks[NLL_CHECK].value == pytest.approx(upper, abs=1e-6)
    assert verdicts["nll_thoughts_minus_no_thoughts"]["mean"] == pytest.approx(mean)
    assert checks[NLL_CHECK].passed is passes
    assert checks[ACC_CHECK].passed  # the answers did not change


def test_accuracy_check_is_the_paired_noninferiority_at_margin():
    base = [1] * 100
    lost = [0] * 20 + [1] * 80  # thinking loses 20 of 100: diff -0.2, beyond the margin 0.10
    nll = [1.0] * 100
    checks, verdicts = _gate(_row(lost, nll), _row(lost, nll), _row(base, nll))
    expected = noninferior("thoughts_vs_base", base, lost, 0.10, GUARD.confidence, GUARD.power)
    assert not checks[ACC_CHECK].passed and checks[ACC_CHECK].value == expected.lower < -0.10
    assert verdicts["accuracy"]["diff"] == -0.2
    one = [0] + [1] * 199  # one of 200 lost: well within the margin
    checks, _ = _gate(_row(one, [1.0] * 200), _row(one, [1.0] * 200), _row([1] * 200, [1.0] * 200))
    assert checks[ACC_CHECK].passed
    wider = _gate(_row(lost, nll), _row(lost, nll), _row(base, nll), margin=0.35)[0]
    assert wider[ACC_CHECK].passed and wider[ACC_CHECK].bound == -0.35  # the margin is the parameter's


def test_accuracy_check_on_too_few_questions_fails_and_says_how_many_it_needs():
    same = [1, 0, 1, 1]
    checks, verdicts = _gate(_row(same, [1.0] * 4), _row(same, [1.1] * 4), _row(same, [1.0] * 4))
    assert not checks[ACC_CHECK].passed  # identical answers, but 4 questions cannot show a loss below 0.10
    assert "too few questions to decide: 4 asked" in checks[ACC_CHECK].note
    assert verdicts["accuracy"]["needed"] > 4


def test_test_samples_are_sized_by_the_margin_under_the_guard_rule():
    params = Params(mix={"arith": 1.0, "logic": 2.0, "algebra": 0.0}, levels=(1, 2))
    guard = GuardParams(discordance=0.1)
    per = math.ceil(guard.needed(0.10) / 2)  # spread over the two families with weight
    samples = phase3.test_samples(params, 0, guard=guard)
    assert len(samples) == 2 * per and {s.family for s in samples} == {"arith", "logic"}
    assert sum(s.family == "arith" for s in samples) == per
    assert len(phase3.test_samples(params, 0, margin=0.2, guard=guard)) == 2 * math.ceil(guard.needed(0.2) / 2)
    assert len(phase3.test_samples(params, 0)) == 2 * math.ceil(GuardParams().needed(0.10) / 2)  # the default section
    assert len(phase3.test_samples(params, 0, per_family=5)) == 10
    assert len(phase3.test_samples(dataclasses.replace(params, test_per_family=3), 0, guard=guard)) == 6


def test_training_batches_replay_every_family_the_input_knew():
    from helpers import task_tokenizer

    params = Params(mix={"arith": 1.0}, levels=(1, 3))
    suite = {"arith": (1, 1), "logic": (2, 2)}
    stream = training_batches(task_tokenizer(), params, 0, suite, replay=0.3).stream
    weights = dict(zip(stream.families, stream.family_weights))
    assert weights == pytest.approx({"arith": 0.7 + 0.15, "logic": 0.15})
    samples = [next(stream) for _ in range(300)]
    logic = [s for s in samples if s.family == "logic"]
    assert 20 < len(logic) < 80 and {s.level for s in logic} == {2}  # the suite's family at its own level
    assert {s.level for s in samples if s.family == "arith"} == {1, 2, 3}  # the phase's own levels, widened
    plain = training_batches(task_tokenizer(), params, 0, suite, replay=0.0).stream
    assert plain.families == ["arith"]


def test_removed_gate_keys_are_refused_and_margins_checked(tmp_path):
    from forgelib.params import load_section
    from forgelib.phases import get_spec

    spec = get_spec("quietstar")
    for key in ("acc_margin: 0.01", "gate_z: 1.645"):
        path = tmp_path / "p.yaml"
        path.write_text(f"quietstar:\n  {key}\n")
        with pytest.raises(ParameterError, match=key.split(":")[0]):
            load_section(path, "quietstar", spec.params_cls, None, {"quietstar", "run"})
    for bad, match in (({"margin": 0.0}, "margin must lie in"), ({"margin": 1.0}, "margin must lie in"),
                       ({"replay": 1.0}, "replay must lie in"), ({"nll_margin": -0.1}, "nll_margin"),
                       ({"test_per_family": 0}, "test_per_family")):
        with pytest.raises(ValueError, match=match):
            Params(**bad)
    defaults = Params()
    assert (defaults.margin, defaults.nll_margin, defaults.test_per_family) == (0.10, 0.02, None)


def test_bad_phase3_parameters_name_the_key(tmp_path):
    from forgelib.params import load_section
    from forgelib.phases import get_spec

    spec = get_spec("quietstar")
    for text, word in (("quietstar:\n  thoughts: {thought_mode: dream}\n", "thought_mode"),
                       ("quietstar:\n  thoughts: {n_thougth: 3}\n", "n_thougth"),
                       ("quietstar:\n  mix: {arithmetic: 1}\n", "arithmetic")):
        path = tmp_path / "p.yaml"
        path.write_text(text)
        with pytest.raises((ParameterError, ValueError), match=word):
            load_section(path, "quietstar", spec.params_cls, None, {"quietstar", "run"})


def test_equal_compute_steps_follow_forward_tokens():
    """Worked example: rows of 6 tokens, the loss counting targets at positions 2-3 of each (Q = 2)."""
    params = Params(thoughts=QuietStarConfig(n_thought=4, n_true=2, n_passes=2))
    labels = torch.full((3, 6), -100)
    labels[:, 3:5] = 7  # targets at 3, 4: positions 2 and 3 predict them (and 1 predicts t+2 = 3 with n_true 2)
    batch = {"input_ids": torch.ones(3, 6, dtype=torch.long), "attention_mask": torch.ones(3, 6, dtype=torch.long),
             "labels": labels}
    Q = 3  # positions 1, 2, 3 have a target among their next n_true tokens
    assert step_tokens("plain", params, batch) == 3 * 6
    assert step_tokens("quietstar", params, batch) == 2 * 3 * (6 + Q * (4 + 1 + 2)) == 162
    assert step_tokens("pause", params, batch) == step_tokens("random", params, batch) == 81
    # every batch alike: pause and random twice Quiet-STaR's steps; plain 162 / 18 = 9 times
    assert equal_compute_steps(params, 10, iter([batch] * 200)) == {"plain": 90, "quietstar": 10, "pause": 20,
                                                                     "random": 20}
    # batches of different lengths: each arm's steps spend the closest number of tokens to Quiet-STaR's budget
    short = {k: v[:, :4] if k != "labels" else labels[:, :4].clone().fill_(-100) for k, v in batch.items()}
    short["labels"][:, 3] = 7
    stream = [batch, short] * 100
    steps = equal_compute_steps(params, 4, iter(stream))
    budget = sum(step_tokens("quietstar", params, b) for b in stream[:4])
    for arm, n in steps.items():
        spent = [sum(step_tokens(arm, params, b) for b in stream[:k]) for k in (n - 1, n, n + 1)]
        assert abs(spent[1] - budget) <= min(abs(spent[0] - budget), abs(spent[2] - budget)), arm
    assert set(ARMS) == {"plain", "quietstar", "pause", "random"}


def test_token_counter_measures_what_the_formula_says():
    """One Quiet-STaR loss evaluation runs exactly the base tokens ``step_tokens`` says: passes x B x (T + Q x
    (n_thought + 1 + n_true)), Q the most thinking positions of a row."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgelib.data.tasks import build_mix, format_sample
    from forgelib.data.tokenizer import encode_samples, train_tokenizer
    from forgelib.quietstar import QuietStarModel, quietstar_loss

    samples = build_mix({"arith": 1}, (1, 1), 8, "train", 0)
    tok = train_tokenizer([format_sample(s, with_steps=True) for s in samples] * 5, vocab_size=280)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        pad_token_id=tok.pad_token_id))
    params = Params(thoughts=QuietStarConfig(n_thought=3, n_true=2, n_passes=2))
    qs = QuietStarModel(base, tok, params.thoughts).train()
    enc = encode_samples(tok, samples[:4], 64, answer_only_loss=True, with_steps=True)
    batch = {k: v[:, :int(enc["attention_mask"].sum(1).max())] for k, v in enc.items()}
    counter = TokenCounter(qs.base)
    quietstar_loss(qs, batch)
    counter.close()
    B, T = batch["input_ids"].shape
    assert counter.tokens == step_tokens("quietstar", params, batch)
    assert counter.tokens < params.thoughts.n_passes * B * T * (1 + 3 + 1 + 2), "the prompt positions do not think"


def test_interval_is_the_t_interval():
    out = interval([0.5, 0.6, 0.7])
    assert out["mean"] == pytest.approx(0.6)
    assert out["ci95"] == pytest.approx(4.303 * 0.1 / 3 ** 0.5, abs=1e-4)
    assert interval([0.4])["ci95"] == 0.0


@pytest.mark.parametrize("gained, lost, thinks", [
    (30, 5, True),    # thinking right on 30 questions the same weights miss, wrong on 5: gain +0.125, clearly above 0
    (12, 10, False),  # +0.01: not shown above 0 on 200 questions, so the model is handed on plain
    (0, 10, False),   # thinking loses
])
def test_auto_hands_on_thinking_only_when_it_beats_the_same_weights_without_thoughts(gained, lost, thinks):
    """The worked example: 200 questions, the paired table (both right 100, gained, lost, the rest wrong); the
    decision is forgelib.stats.superior at gain 0 -- whose bound is the Agresti-Min lower bound, computed here by
    hand -- and the forced settings override it while still reporting the verdict."""
    off = [1] * 100 + [0] * gained + [1] * lost + [0] * (100 - gained - lost)
    on = [1] * 100 + [1] * gained + [0] * lost + [0] * (100 - gained - lost)
    table = {"thoughts": _row(on, [1.0] * 200), "no_thoughts": _row(off, [1.0] * 200)}
    n = 202.0
    pg, pl = (gained + 0.5) / n, (lost + 0.5) / n
    lower = (pg - pl) - 1.6448536 * math.sqrt((pg + pl - (pg - pl) ** 2) / n)
    decision = thinking_decision(table, Params(), GUARD)
    assert decision["verdict"]["lower"] == pytest.approx(lower, abs=1e-4)
    assert decision["verdict"] == superior("thinking_vs_not", off, on, 0.0, GUARD.confidence, GUARD.power).as_row()
    assert decision["thinking"] is thinks is (lower > 0)
    assert f"on the same 200 test questions: gain {(gained - lost) / 200:+.3f}" in decision["reason"]
    for forced, expected in (("thinking", True), ("plain", False)):
        again = thinking_decision(table, Params(hand_on=forced), GUARD)
        assert again["thinking"] is expected and again["verdict"] == decision["verdict"] and forced in again["rule"]


def test_the_gate_judges_the_model_as_handed_on():
    """Handed on plain: the accuracy check is the same weights without thoughts against the Phase-2 model, and the
    NLL rise of thinking is reported, not a gate check (the model does not think)."""
    base, off, on = [1] * 100, [1] * 100, [0] * 30 + [1] * 70  # thinking loses 30 of 100
    nll_on, nll_off = [2.0] * 100, [1.0] * 100  # and raises the NLL
    checks, verdicts = _gate(_row(on, nll_on), _row(off, nll_off), _row(base, nll_off))
    assert not checks[ACC_CHECK].passed and not checks[NLL_CHECK].passed
    checks, verdicts = gate_checks({"thoughts": _row(on, nll_on), "no_thoughts": _row(off, nll_off),
                                    "base": _row(base, nll_off)}, Params(), GUARD, thinking=False)
    checks = {c.name: c for c in checks}
    assert set(checks) == {"acc_no_thoughts_minus_base_lower_bound"} and all(c.passed for c in checks.values())
    assert verdicts["accuracy"] == noninferior("no_thoughts_vs_base", base, off, 0.10, GUARD.confidence,
                                               GUARD.power).as_row()
    assert verdicts["nll_thoughts_minus_no_thoughts"]["mean"] == pytest.approx(1.0)


def test_hand_on_must_be_one_of_its_choices():
    with pytest.raises(ValueError, match="hand_on must be one of"):
        Params(hand_on="maybe")


def test_the_scorecard_says_whether_the_final_model_thinks_and_why(tmp_path):
    """``forgelib.scorecard.thinking_note`` states Phase 3's decision as its report holds it: handed on plain by the
    measurement, forced plain (the rule says so, not "because thinking did not beat"), thinking, a Phase 3 from
    before the decision, and no Phase 3 in the chain."""
    import json

    from forgelib.results import PhaseResult
    from forgelib.scorecard import thinking_note

    folder = tmp_path / "03_quietstar"
    folder.mkdir()
    entries = [{"number": 2, "path": tmp_path / "02" / "models" / "champion"},
               {"number": 3, "path": folder / "models" / "model"}]
    result = PhaseResult("quietstar", 3, "s", status="ok")
    result.artifacts["report"] = str(folder / "report.json")
    result.save(folder)
    table = {"thoughts": _row([1, 0] * 50, [1.0] * 100), "no_thoughts": _row([1, 1] * 50, [1.0] * 100)}

    def note(**params):
        (folder / "report.json").write_text(json.dumps({"decision": thinking_decision(table, Params(**params),
                                                                                     GUARD)}))
        return thinking_note(entries)

    measured = "with thoughts 0.500, without 1.000 on the same 100 test questions: gain -0.500"
    plain = note()
    assert plain.startswith("thinking: the final model does not think -- Phase 3 handed its model on without "
                            f"thoughts ({measured}") and "hand_on: auto" in plain
    forced = note(hand_on="plain")
    assert "hand_on: plain (set, not measured)" in forced and "auto" not in forced
    assert note(hand_on="thinking").startswith(f"thinking: Phase 3 handed its model on thinking ({measured}")
    (folder / "report.json").write_text(json.dumps({}))
    assert "predates its thinking decision" in thinking_note(entries)
    assert thinking_note(entries[:1]) == ""


def test_notebook_views_of_the_decision_and_the_benchmark(tmp_path, monkeypatch):
    """Notebook 03's views: the decision in words; the benchmark table from a JSON as ``forge bench quietstar``
    writes it (summarize's intervals), and the command to run when there is none."""
    import json

    from forgelib.bench.quietstar import summarize
    from forgelib.viz.quietstar import bench_frame, decision_text

    table = {"thoughts": _row([1, 0] * 50, [1.0] * 100), "no_thoughts": _row([1, 1] * 50, [1.0] * 100)}
    report = {"decision": thinking_decision(table, Params(), GUARD)}
    text = decision_text(report)
    assert text.startswith("handed on WITHOUT THOUGHTS: with thoughts 0.500, without 1.000 on the same 100")
    assert "rule: hand_on: auto" in text and "predates" in decision_text({})
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path))
    assert bench_frame().empty and "forge bench quietstar --seeds 3" in bench_frame().attrs["note"]
    per_seed = [{arm: {"accuracy": acc + 0.01 * s, "answer_nll": 1.0, "forward_tokens": 100} for arm, acc in
                 (("plain", 0.6), ("quietstar", 0.5), ("pause", 0.45))} for s in range(3)]
    data = {"phase2": "outputs/x/02_evomerge", "equal_compute": {"steps": {"plain": 96, "quietstar": 6, "pause": 12}},
            **summarize(per_seed)}
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "quietstar-1.json").write_text(json.dumps(data))
    frame = bench_frame()
    rows = {r["arm"]: r for r in frame.to_dict("records")}
    assert rows["Quiet-STaR"]["accuracy"] == "0.510 ± 0.025"
    assert rows["pause tokens"]["Quiet-STaR gain"] == "+0.050 ± 0.000"
    assert rows["continued training"]["steps"] == 96 and rows["Quiet-STaR"]["Quiet-STaR gain"] == ""


def _fake_guard_report(per_family):
    """A guard report (``forgelib.suite.GuardReport``) holding only the per-family paired answers."""
    from forgelib.stats import noninferior_over
    from forgelib.suite import GuardReport

    answers = {f: {"before": b, "after": a} for f, (b, a) in per_family.items()}
    pooled = noninferior_over("all", per_family, 0.15)
    return GuardReport(0.15, {f: pooled for f in per_family}, pooled, answers, {f: (1, 1) for f in per_family}, 0.0)


class _Ctx:
    """The two things ``plain_weights_decision`` asks of a phase context: the guard's settings and its guard."""

    def __init__(self, report):
        self.guard_params, self.report, self.asked = GUARD, report, 0

    def guard(self, before, after, record=True):
        assert record is False  # the decision's guard is recorded only when its model is handed on
        self.asked += 1
        return self.report


@pytest.mark.parametrize("gained, lost, keeps", [
    (40, 4, True),    # the trained weights answer 36 more of 400 questions per family: shown better
    (10, 8, False),   # +0.005: not shown better, so the Phase-2 weights are handed on
    (2, 20, False),   # the trained weights lost
])
def test_a_plain_model_keeps_its_trained_weights_only_when_they_beat_the_phase2_model(gained, lost, keeps):
    """Worked example: two families of 400 guard questions each with the same paired table (both right 200, gained,
    lost, the rest wrong); the family-mean bound is the stratified Agresti-Min bound, computed here by hand. Kept
    weights stay as trained and their guard report is handed back to record; otherwise the Phase-2 weights are copied
    into the model's base exactly (its thought weights stay). Forced settings ask nothing; a thinking model keeps its
    weights; a typo is refused."""
    from helpers import perturbed_copy, task_tokenizer, tiny_task_llama

    from forgelib.quietstar import QuietStarModel

    before = [1] * 200 + [0] * gained + [1] * lost + [0] * (200 - gained - lost)
    after = [1] * 200 + [1] * gained + [0] * lost + [0] * (200 - gained - lost)
    report = _fake_guard_report({"arith": (before, after), "logic": (before, after)})
    n = 402.0
    pg, pl = (gained + 0.5) / n, (lost + 0.5) / n
    se = math.sqrt((pg + pl - (pg - pl) ** 2) / n)
    lower = (pg - pl) - 1.6448536 * math.sqrt(2 * se ** 2) / 2  # two equal families: mean d, se sqrt(2 se^2) / 2
    gain = phase3.family_mean_gain(report, 0.0, GUARD)
    assert gain.lower == pytest.approx(lower, abs=1e-4) and gain.passed is keeps and gain.kind == "superior"
    tok = task_tokenizer()
    base = tiny_task_llama(tok).eval()
    for setting in ("auto", "trained", "input"):
        model = QuietStarModel(perturbed_copy(base, seed=3), tok, QuietStarConfig(n_thought=2)).eval()
        model.thinking = False
        thought = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("base.")}
        ctx = _Ctx(report)
        decision, guarded = phase3.plain_weights_decision(base, model, tok, Params(plain_weights=setting), ctx)
        kept = keeps if setting == "auto" else setting == "trained"
        assert decision["weights"] == ("trained" if kept else "input") and ctx.asked == (setting == "auto")
        assert (guarded is report) is (kept and setting == "auto")
        same = [torch.equal(a, b) for a, b in zip(model.base.state_dict().values(), base.state_dict().values())]
        assert all(same) is not kept and (kept or len(same) == len(base.state_dict()))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in thought.items())
        if setting == "auto":
            assert decision["verdict"] == gain.as_row()
            assert f"gain {(gained - lost) / 400:+.3f}, lower bound {gain.lower:+.3f}" in decision["reason"]
        else:
            assert decision["rule"] == f"plain_weights: {setting} (set, not measured)"
    model = QuietStarModel(perturbed_copy(base, seed=3), tok, QuietStarConfig(n_thought=2)).eval()
    model.thinking, ctx = True, _Ctx(report)
    decision, guarded = phase3.plain_weights_decision(base, model, tok, Params(), ctx)
    assert decision["weights"] == "trained" and guarded is None and ctx.asked == 0
    with pytest.raises(ValueError, match="plain_weights must be one of"):
        Params(plain_weights="phase2")


def test_the_gate_does_not_compare_the_phase2_weights_with_themselves():
    """Handed on with the Phase-2 model's weights, the accuracy verdict of the trained weights is reported but is not
    a gate check (the guard, asked of the handed-on model, is)."""
    base, off = [1] * 100, [1] * 90 + [0] * 10
    table = {"thoughts": _row(off, [1.0] * 100), "no_thoughts": _row(off, [1.0] * 100), "base": _row(base, [1.0] * 100)}
    checks, verdicts = gate_checks(table, Params(), GUARD, thinking=False, input_weights=True)
    assert checks == [] and verdicts["accuracy"] == noninferior("no_thoughts_vs_base", base, off, 0.10,
                                                                GUARD.confidence, GUARD.power).as_row()


def test_the_scorecard_and_notebook_say_whose_weights_a_plain_model_kept(tmp_path):
    """A model handed on plain: the scorecard's thinking note and notebook 03's decision text name whose weights it
    answers with and the measured reason (the Phase-2 model's, or its trained ones)."""
    import json

    from forgelib.results import PhaseResult
    from forgelib.scorecard import thinking_note
    from forgelib.viz.quietstar import decision_text

    folder = tmp_path / "03_quietstar"
    folder.mkdir()
    entries = [{"number": 3, "path": folder / "models" / "model"}]
    result = PhaseResult("quietstar", 3, "s", status="ok")
    result.artifacts["report"] = str(folder / "report.json")
    result.save(folder)
    table = {"thoughts": _row([1, 0] * 50, [1.0] * 100), "no_thoughts": _row([1, 1] * 50, [1.0] * 100)}
    reason = "trained weights 0.693, Phase-2 model 0.703 in family mean over 697 guard questions of 7 families"
    for whose, said, shown in (("input", "with the Phase-2 model's weights", "the PHASE-2 MODEL'S weights"),
                               ("trained", "it kept its trained weights", "its TRAINED weights")):
        report = {"decision": thinking_decision(table, Params(), GUARD),
                  "weights": {"weights": whose, "rule": "plain_weights: auto -- ...", "verdict": None,
                              "reason": reason}}
        (folder / "report.json").write_text(json.dumps(report))
        assert f"; {said} ({reason}); `forge bench quietstar`" in thinking_note(entries)
        assert f"\nweights: {shown}: {reason}\nrule: plain_weights: auto" in decision_text(report)
