"""The guard (forgelib.suite): what a model knows, how it is asked, and the per-family verdicts on real tiny models."""
import math
import zlib

import pytest

from forgelib.data.stream import TaskStream
from forgelib.data.tasks import check, generate
from forgelib.stats import questions_needed
from forgelib.suite import Asker, GuardParams, guard, questions, replay_mix, suite_of, suite_union
from helpers import task_tokenizer, tiny_task_llama


class Oracle:
    """An 'asker' that answers from a fixed rule: right on every question of ``families`` it knows, wrong
    elsewhere, and wrong on a ``forget`` share of one family (a measurable, controlled loss)."""

    def __init__(self, families, forget=None, share=0.0):
        self.families, self.forget, self.share, self.label = set(families), forget, share, "oracle"

    def correct(self, samples):
        out = []
        for i, s in enumerate(samples):
            ok = s.family in self.families
            if s.family == self.forget and (zlib.crc32(s.prompt.encode()) % 1000) / 1000 < self.share:
                ok = False
            out.append(int(ok))
        return out


def test_questions_are_a_stable_prefix_of_one_pool_over_its_levels():
    few, many = questions("arith", (1, 3), 30, 7, pool=90), questions("arith", (1, 3), 90, 7)
    assert [q.prompt for q in many[:30]] == [q.prompt for q in few]
    assert {q.level for q in many} == {1, 2, 3} and sum(q.level == 2 for q in many) == 30
    assert all(q.family == "arith" for q in many)
    tiny = questions("algebra", (1, 1), 5000, 7)  # the test split of level 1 runs out: all of it, no error
    assert 100 < len(tiny) < 5000 and len({q.prompt for q in tiny}) == len(tiny)


def test_a_short_prefix_measures_the_same_population_as_the_whole_pool():
    """sequence's kinds differ in size (`count` has the most prompts): drawn in order, the first questions held
    ~25% `count` and the last ones ~54%, so a verdict on 80 questions and one on 2,000 measured different mixes.
    Shuffled, each prefix is a simple random sample of the pool: its `count` share is the pool's within sampling
    noise (3 standard errors)."""
    pool = questions("sequence", (1, 2), 2000, 4246)
    share = sum(q.prompt.startswith("count") for q in pool) / len(pool)
    assert share > 0.35  # the pool itself is count-heavy (the reason the order mattered)
    for n in (100, 400):
        head = sum(q.prompt.startswith("count") for q in pool[:n]) / n
        assert abs(head - share) < 3 * math.sqrt(share * (1 - share) / n), (n, head, share)
    assert {q.level for q in pool[:50]} == {1, 2}


def test_guard_passes_a_model_that_kept_everything_with_the_questions_the_margin_needs():
    params = GuardParams(margin=0.1, discordance=0.1, power=0.99)
    suite = {"arith": (1, 2), "logic": (1, 2)}
    report = guard(Oracle(["arith", "logic"]), Oracle(["arith", "logic"]), suite, params, seed=0)
    assert report.passed
    for v in report.families.values():
        assert v.n == questions_needed(0.1, 0.95, 0.99, 0.1) and v.diff == 0 and v.lower > -0.1
    assert [c.name for c in report.checks()] == ["keeps_arith", "keeps_logic"]


def test_guard_fails_the_family_that_was_lost_and_asks_more_when_answers_change():
    params = GuardParams(margin=0.1, discordance=0.02, power=0.99)
    suite = {"arith": (1, 2), "logic": (1, 2)}
    report = guard(Oracle(["arith", "logic"]), Oracle(["arith", "logic"], forget="logic", share=0.3), suite,
                   params, seed=0)
    logic, arith = report.families["logic"], report.families["arith"]
    assert not logic.passed and arith.passed and not report.passed
    first = questions_needed(0.1, 0.95, 0.99, 0.02)
    # nothing changed in arith: at most one more small round (one disagreement is assumed, never zero)
    assert first <= arith.n <= questions_needed(0.1, 0.95, 0.99, 1 / first)
    assert logic.n > 3 * arith.n  # ~30 % of logic's answers changed: the observed discordance asked for more
    assert logic.diff == pytest.approx(-logic.discordance) and -0.4 < logic.diff < -0.2
    assert report.lost() == {"logic": logic.diff}


def test_a_family_that_lost_part_of_the_margin_is_asked_until_its_verdict_is_clear_of_noise():
    """A true loss of ~0.05 against a margin of 0.10: the zero-difference count (~70 questions here) would leave the
    lower bound near -0.10; sized at the measured difference (``needed_at``) the guard asks several times as many
    and the bound lands well above -0.10, the true loss (0.05) inside its interval."""
    from forgelib.stats import compare

    from forgelib.suite import needed_at

    params = GuardParams(margin=0.10, discordance=0.08, power=0.99)
    report = guard(Oracle(["arith"]), Oracle(["arith"], forget="arith", share=0.05), {"arith": (1, 3)}, params, 0)
    v = report.families["arith"]
    zero_diff = questions_needed(0.10, 0.95, 0.99, v.discordance)
    assert v.passed and -0.07 < v.diff < -0.03
    assert v.n >= needed_at(0.10, compare(report.answers["arith"]["before"], report.answers["arith"]["after"]),
                            params)  # the last round's own rule is met by the count asked
    assert v.n > 3 * zero_diff
    assert v.lower > -0.10 + 0.02
    # the rule itself: (z_conf + z_power)^2 psi / (margin + diff)^2, the distance floored at margin / 3
    c = compare([1] * 90 + [0] * 10, [1] * 85 + [0] * 15)  # diff -0.05, discordance 0.05
    assert needed_at(0.10, c, params) == questions_needed(0.05, 0.95, 0.99, 0.05)
    lost = compare([1] * 100, [1] * 80 + [0] * 20)  # diff -0.20: beyond the margin, floored distance
    assert needed_at(0.10, lost, params) == questions_needed(0.10 / 3, 0.95, 0.99, 0.20)
    gained = compare([0] * 20 + [1] * 80, [1] * 100)  # a gain counts towards the margin
    assert needed_at(0.10, gained, params) == questions_needed(0.30, 0.95, 0.99, 0.20)


def test_a_family_with_too_few_questions_says_how_many_it_needed():
    params = GuardParams(margin=0.10, discordance=0.3, power=0.99, max_questions=40)
    report = guard(Oracle(["arith"]), Oracle(["arith"], forget="arith", share=0.04), {"arith": (1, 2)}, params, 0)
    v = report.families["arith"]
    assert v.n == 40 and not v.passed and -0.10 < v.diff < 0
    assert f"{v.needed} needed" in v.note and v.needed > 40
    clear = guard(Oracle(["arith"]), Oracle(["arith"], forget="arith", share=0.5), {"arith": (1, 2)}, params, 0)
    assert not clear.passed and clear.families["arith"].note == ""  # lost beyond the margin: no count would help


def test_asker_answers_with_the_calculator_and_strips_the_answer_style():
    """A real tiny model: the Asker's correctness equals the task checker applied to its own answers after the
    'Answer:' prefix is removed."""
    tok = task_tokenizer()
    model = tiny_task_llama(tok)
    samples = generate("arith", 1, 6, "test", 0)
    asker = Asker(model, tok, max_new_tokens=6)
    texts = asker.answers(samples)
    assert asker.correct(samples) == [int(check(s, t)) for s, t in zip(samples, texts)]
    # an answer written in the baked persona's style is graded on its number
    s = samples[0]
    styled = Asker(model, tok)
    assert check(s, "#" + s.answer) and not check(s, "#Answer: " + s.answer)
    from forgelib.baking.library import strip_answer_prefixes
    assert check(s, strip_answer_prefixes("#Answer: " + s.answer, styled.prefixes))


def test_replay_mix_keeps_every_family_of_the_suite_at_its_levels():
    suite = {"logic": (1, 2), "recall": (1, 2), "arith": (1, 2)}
    mix, family_levels = replay_mix({"arith": 1, "algebra": 1}, (1, 3), suite, 0.3)
    assert sum(mix.values()) == pytest.approx(1.0)
    assert mix["logic"] == pytest.approx(0.1) and mix["algebra"] == pytest.approx(0.35)
    assert mix["arith"] == pytest.approx(0.35 + 0.1)
    assert family_levels == {"arith": (1, 3), "algebra": (1, 3), "logic": (1, 2), "recall": (1, 2)}
    stream = TaskStream(mix, (1, 3), "train", 0, family_levels=family_levels)
    drawn = stream.take(2000)
    share = {f: sum(s.family == f for s in drawn) / len(drawn) for f in mix}
    assert all(abs(share[f] - mix[f]) < 0.04 for f in mix)
    assert max(s.level for s in drawn if s.family == "logic") == 2
    assert max(s.level for s in drawn if s.family == "algebra") == 3


def test_suite_of_a_result_is_checked_and_unions_widen_levels():
    from types import SimpleNamespace

    ok = SimpleNamespace(phase="x", suite={"arith": [1, 2], "tool": [1, 3]})
    assert suite_of(ok) == {"arith": (1, 2), "tool": (1, 3)}
    with pytest.raises(ValueError, match="not a known family"):
        suite_of(SimpleNamespace(phase="x", suite={"poetry": [1, 2]}))
    with pytest.raises(ValueError, match="1 <= lo <= hi <= 10"):
        suite_of(SimpleNamespace(phase="x", suite={"arith": [3, 2]}))
    assert suite_union({"arith": (1, 2)}, {"arith": (1, 3), "tool": (1, 1)}) == {"arith": (1, 3), "tool": (1, 1)}


def test_guard_params_refuse_nonsense():
    for bad in ({"margin": 0}, {"margin": 1.5}, {"power": 1.0}, {"confidence": 0.2}, {"discordance": 0},
                {"chain_margin": 0}):
        with pytest.raises(ValueError):
            GuardParams(**bad)
    assert GuardParams().needed() == math.ceil((1.6449 + 3.0902) ** 2 * 0.08 / 0.01 - 1e-3)


class Counting(Oracle):
    """An Oracle that counts the questions it is asked."""

    asked = 0

    def correct(self, samples):
        self.asked += len(samples)
        return super().correct(samples)


def test_known_answers_of_the_input_are_reused_only_after_a_check_sample_agrees():
    params = GuardParams(margin=0.1, discordance=0.1, power=0.99)
    suite = {"arith": (1, 2), "logic": (1, 2)}
    first = guard(Oracle(["arith"]), Oracle(["arith", "logic"]), suite, params, seed=0)
    known = {f: {"prompts": [q.prompt for q in first.questions[f]], "answers": first.answers[f]["after"]}
             for f in suite}
    same = Counting(["arith", "logic"])
    report = guard(same, Oracle(["arith", "logic"]), suite, params, seed=0, known=known)
    assert report.reused == {f: len(first.questions[f]) for f in suite}
    assert same.asked < 40  # only the check sample: every other answer came from the upstream's guard
    assert {f: a["before"] for f, a in report.answers.items()} == {f: a["after"] for f, a in first.answers.items()}
    other = Counting(["arith"])  # not the model that answered before: the check sample differs, all asked again
    again = guard(other, Oracle(["arith", "logic"]), suite, params, seed=0, known=known)
    assert again.reused == {"arith": 0, "logic": 0}
    assert other.asked >= sum(len(q) for q in again.questions.values())
    assert again.families["logic"].before == 0.0


def test_phase1_specialist_comparisons_stop_at_the_pilot_for_a_clear_gain_and_ask_more_for_a_small_one(monkeypatch):
    """forgelib.phases.cognate.specialist_comparisons' sizing with rule-based answers (each 'model' is right on a
    fixed share of the questions, by a hash of the prompt): a specialist +0.20 over the trunk is decided on the pilot
    (a quarter of what expected_gain needs); one +0.04 over it is asked the count its measured gain and discordance
    need at the stated power, several times the pilot, and its bound is above 0."""
    import math

    from forgelib.phases import PHASES, cognate
    from forgelib.phases.base import load_phase_params
    from forgelib.stats import questions_needed

    share = {"trunk": 0.6, "reasoning": 0.8, "speed": 0.8}

    def right(model, prompt):
        h = (zlib.crc32(prompt.encode()) % 1000) / 1000
        if model != "memory":
            return int(h < share[model])
        flip = (zlib.crc32((prompt + "m").encode()) % 1000) / 1000  # loses ~0.03, gains ~0.07 of the trunk's
        return int(flip >= 0.05) if h < 0.6 else int(flip < 0.175)

    def answers(model, tokenizer, samples, **kwargs):
        return [right(model, s.prompt) for s in samples]

    monkeypatch.setattr(cognate, "answer_correctness", answers)
    spec = next(p for p in PHASES if p.name == "cognate")
    _, params = load_phase_params(spec, "parameters/smoke.yaml", {"cognate": {"expected_gain": 0.03}}, PHASES)
    guard = GuardParams()
    out = cognate.specialist_comparisons({k: k for k in (*share, "memory")}, None, params, 0, guard)
    pilot = math.ceil(questions_needed(0.03, guard.confidence, params.power, guard.discordance) / 4)
    fams = {name: params.specialists[name].families or list(params.specialists[name].mix)
            for name in ("reasoning", "memory", "speed")}
    assert out["reasoning"]["n"] == math.ceil(pilot / len(fams["reasoning"])) * len(fams["reasoning"])
    assert out["reasoning"]["passed"] and out["reasoning"]["diff"] > 0.15
    small = out["memory"]
    assert small["n"] > 3 * pilot and small["passed"] and 0.02 < small["diff"] < 0.06
    assert small["n"] >= questions_needed(max(0.03, small["diff"]) + 0.01, guard.confidence, params.power,
                                          small["discordance"])  # near the count its own numbers need
