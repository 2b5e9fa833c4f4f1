"""The curriculum core without a model: assessment, the question pool's rules and resumable state, dreaming,
family re-solving and the frontier client against a local OpenAI-compatible server."""
import json
import math
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from forgelib.curriculum import (DreamBuffer, FrontierClient, FrontierError, QuestionPool, Solution, assess_by_level,
                                 assess_levels, decide_levels, decision_questions, dream, enabled, estimate_questions,
                                 hint_cap, hint_text, paired_answers, parse_proposals, prompt_with_hint, solve,
                                 spread_questions)
from forgelib.data.base import Sample
from forgelib.data.tasks import FAMILIES, check, completion_text, format_sample, generate, split_of
from forgelib.results import dumps_json


# ---------------------------------------------------------------------------------------------- helpers
def right_output(item) -> str:
    """The model's continuation of `item.prompt` that is the exact worked solution."""
    full = completion_text(item.sample, with_steps=True)
    assert full.startswith(item.hint_text)
    return full[len(item.hint_text):]


def wrong_output(item) -> str:
    return "#" + item.sample.answer + "1"


def qid_with_steps(pool, at_least):
    return next(qid for qid in pool.active_ids() if len(pool.questions[qid].sample.steps or []) >= at_least)


def make_pool(**kw):
    kw = {"pool_size": 12, "seed": 0, **kw}
    return QuestionPool({"multistep": 1, "arith": 1}, level=kw.pop("level", 6), **kw)


# ---------------------------------------------------------------------------------------------- hints
def test_hints_are_exact_prefixes_of_the_worked_solution():
    for family in ("arith", "multistep", "modular", "algebra"):
        for s in generate(family, 8, 5, "train", 0):
            full = format_sample(s, with_steps=True)
            texts = [prompt_with_hint(s, k) for k in range(len(s.steps) + 1)]
            assert texts[0] == s.prompt
            for k, text in enumerate(texts):
                assert full.startswith(text)
                if k:
                    assert text.endswith(";" if k < len(s.steps) else "#")
                    assert len(text) > len(texts[k - 1])
            # the hinted prompt plus the rest of the solution is graded correct by the family's checker
            k = len(s.steps) - 1
            assert check(s, hint_text(s, k) + full[len(prompt_with_hint(s, k)):])
    s = generate("multistep", 9, 1, "train", 0)[0]
    assert hint_cap(s, 2) == 2 and hint_cap(s, 9) == len(s.steps) - 1 and hint_cap(s, 9, True) == len(s.steps)
    assert hint_cap(generate("sequence", 3, 1, "train", 0)[0], 2) == 0  # no worked steps: no hint


def test_hint_grows_one_step_per_failure_up_to_max_hints_and_fades_on_hinted_success():
    pool = make_pool(max_hints=2, variants_per_failure=0)
    qid = qid_with_steps(pool, 3)
    seen = []
    for _ in range(4):
        item = pool.item(qid)
        seen.append(item.hints)
        assert item.prompt == prompt_with_hint(item.sample, item.hints)
        assert pool.answer(item, wrong_output(item)) is False
    assert seen == [0, 1, 2, 2] and pool.questions[qid].hints == 2
    item = pool.item(qid)
    assert pool.answer(item, right_output(item)) is True          # correct with 2 hints -> 1 hint
    assert pool.questions[qid].hints == 1 and pool.questions[qid].streak == 0
    item = pool.item(qid)
    pool.answer(item, right_output(item))                          # correct with 1 hint -> no hint
    assert pool.questions[qid].hints == 0 and not pool.questions[qid].pending


# ---------------------------------------------------------------------------------------------- retirement
def test_retired_after_exactly_three_consecutive_unhelped_correct_answers():
    pool = make_pool(variants_per_failure=0)
    qid = pool.active_ids()[0]
    for _ in range(2):
        pool.record(qid, True, 0)
    assert pool.questions[qid].streak == 2 and not pool.questions[qid].retired
    pool.record(qid, False, 0)                                     # a failure resets the streak
    assert pool.questions[qid].streak == 0
    pool.record(qid, True, 1)                                      # hinted: does not count
    assert pool.questions[qid].streak == 0 and not pool.questions[qid].retired
    pool.record(qid, True, 0)
    pool.record(qid, True, 0)
    assert not pool.questions[qid].retired
    pool.record(qid, True, 0)
    assert pool.questions[qid].retired and qid not in pool.active_ids()
    pool.record(qid, False, 0)                                     # a late answer only adds to the history
    assert pool.questions[qid].retired and len(pool.questions[qid].history) == 8
    assert [h["hints"] for h in pool.questions[qid].history][:4] == [0, 0, 0, 1]


def test_failure_spawns_variants_with_lineage_up_to_the_cap():
    pool = make_pool(variants_per_failure=2, max_active=15)
    parent = pool.active_ids()[0]
    pool.record(parent, False, 0)
    kids = [q for q in pool.questions.values() if q.variant_of == parent]
    assert len(kids) == 2
    ps = pool.questions[parent].sample
    for kid in kids:
        assert (kid.sample.family, kid.sample.level, kid.origin) == (ps.family, ps.level, "variant")
        assert kid.sample.prompt != ps.prompt and split_of(kid.sample.prompt) == "train"
        assert check(kid.sample, kid.sample.answer)
    pool.record(kids[0].qid, False, 0)
    grandkid = next(q for q in pool.questions.values() if q.variant_of == kids[0].qid)
    assert pool.lineage(grandkid.qid) == [grandkid.qid, kids[0].qid, parent]
    assert len(pool.active_ids()) == 15 and pool.variants_skipped == 1  # 12 + 2 + 1: the cap stopped the 2nd
    for _ in range(5):
        pool.record(parent, False, 0)
    assert len(pool.active_ids()) == 15 and pool.variants_skipped == 11 and pool.variants_spawned == 3
    assert len({q.sample.prompt for q in pool.questions.values()}) == len(pool.questions)


def test_added_questions_respect_the_split_the_cap_and_repeats():
    pool = make_pool(max_active=14)
    train, test = find_prompt("train"), find_prompt("test")
    outside = [Sample(p, str(sum(map(int, p[:-1].split("+")))), "arith", 6) for p in (train, test, train)]
    (qid,) = pool.add_questions(outside)
    assert pool.questions[qid].origin == "frontier" and pool.questions[qid].sample.prompt == train
    assert pool.add_questions(generate("arith", 6, 5, "train", 99)) == [pool.next_qid - 1]  # cap 14


def test_batches_are_distinct_and_put_pending_questions_first():
    pool = make_pool(variants_per_failure=0)
    failed = pool.active_ids()[:3]
    for qid in failed:
        pool.record(qid, False, 0)
    batch = pool.next_batch(4)
    assert len(batch) == 4 and len({i.qid for i in batch}) == 4
    assert {i.qid for i in batch[:2]} <= set(failed) and not {i.qid for i in batch[2:]} & set(failed)
    assert len(pool.next_batch(100)) == 12                         # all active, no repeats
    assert pool.next_batch(0) == []


# ---------------------------------------------------------------------------------------------- levels
def test_level_done_and_advance():
    pool = QuestionPool({"arith": 1, "logic": 1}, level={"arith": 9, "logic": 10}, pool_size=10, seed=1,
                        done_threshold=3)
    assert pool.level is None and not pool.level_done()
    for qid in pool.active_ids()[:7]:
        for _ in range(3):
            pool.record(qid, True, 0)
    assert pool.level_done() and len(pool.active_ids()) == 3
    assert pool.advance() is True
    assert pool.levels == {"arith": 10} and pool.stage == 1 and len(pool.active_ids()) == 10  # logic topped out
    assert pool.archive[0]["levels"] == {"arith": 9, "logic": 10} and pool.archive[0]["summary"]["retired"] == 7
    assert all(q.sample.level == 10 and q.sample.family == "arith" for q in pool.questions.values())
    assert pool.advance() is False and pool.finished and pool.active_ids() == []


def test_refill_tops_the_pool_up_with_new_questions_of_its_level_and_resumes(tmp_path):
    pool = QuestionPool({"arith": 1, "algebra": 1}, level={"arith": 3, "algebra": 2}, pool_size=6, seed=2,
                        done_threshold=1, variants_per_failure=0)
    before = {q.sample.prompt for q in pool.questions.values()}
    for qid in pool.active_ids()[:5]:
        for _ in range(3):
            pool.record(qid, True, 0)
    assert pool.level_done() and len(pool.active_ids()) == 1
    saved = pool.to_dict()
    added = pool.refill()
    assert len(added) == 5 and len(pool.active_ids()) == 6 and pool.refill() == []
    new = [pool.questions[q] for q in added]
    assert all(q.origin == "refill" and split_of(q.sample.prompt) == "train" for q in new)
    assert {(q.sample.family, q.sample.level) for q in new} <= {("arith", 3), ("algebra", 2)}
    assert not {q.sample.prompt for q in new} & before and pool.levels == {"arith": 3, "algebra": 2}
    again = QuestionPool.from_dict(json.loads(dumps_json(saved)))
    assert [again.questions[q].sample.prompt for q in again.refill()] == [q.sample.prompt for q in new]


def scripted_correct(item, asked: int) -> bool:
    """A deterministic stand-in for a model: a third of the questions are failed the first two times they are
    asked unhelped; a question with a hint, and every other question, is answered correctly."""
    hard = zlib.crc32(item.sample.prompt.encode()) % 3 == 0
    return item.hints > 0 or not (hard and asked < 2)


def run_steps(pool, batches, batch_size=6):
    """Ask, answer with the script, advance when the level is done; returns the batches' (qid, prompt) lists."""
    log = []
    for _ in range(batches):
        if pool.finished:
            break
        batch = pool.next_batch(batch_size)
        log.append([(i.qid, i.prompt) for i in batch])
        for item in batch:
            ok = scripted_correct(item, pool.questions[item.qid].asked)
            pool.answer(item, right_output(item) if ok else wrong_output(item), step=pool.batches)
        if pool.level_done():
            pool.advance()
    return log


def test_scripted_run_climbs_two_levels():
    pool = QuestionPool({"arith": 1, "multistep": 1}, level=4, pool_size=10, seed=3, done_threshold=1)
    run_steps(pool, 200)
    assert pool.stage >= 2, pool.summary()
    first, second = pool.archive[0], pool.archive[1]
    assert first["levels"] == {"arith": 4, "multistep": 4} and second["levels"] == {"arith": 5, "multistep": 5}
    for level in (first, second):
        assert level["summary"]["active"] <= 1 and level["summary"]["variants_spawned"] > 0
        retired = [q for q in level["questions"] if q["retired"]]
        for q in retired:  # each retired question ended on three unhelped correct answers
            assert [(h["correct"], h["hints"]) for h in q["history"][-3:]] == [(True, 0)] * 3
        assert any(q["variant_of"] is not None for q in level["questions"])
        assert any(h["hints"] > 0 for q in level["questions"] for h in q["history"])
    assert pool.answers == sum(len(q["history"]) for lv in pool.archive for q in lv["questions"]) + sum(
        len(q.history) for q in pool.questions.values())


def test_save_and_load_resume_to_the_identical_next_batches(tmp_path):
    kw = dict(mix={"arith": 1, "multistep": 1, "sequence": 1}, level=4, pool_size=9, seed=5, done_threshold=1)
    straight = QuestionPool(**kw)
    log_straight = run_steps(straight, 60)

    first = QuestionPool(**kw)
    log_resumed = run_steps(first, 23)
    first.save(tmp_path / "curriculum" / "state.json")
    del first
    resumed = QuestionPool.load(tmp_path / "curriculum" / "state.json")
    log_resumed += run_steps(resumed, 60 - 23)
    assert log_resumed == log_straight and straight.stage >= 1  # crossed a level boundary on the way
    assert json.loads(dumps_json(resumed.to_dict())) == json.loads(dumps_json(straight.to_dict()))


def test_pool_rejects_bad_settings():
    with pytest.raises(ValueError):
        QuestionPool({"arith": 1}, level=0)
    with pytest.raises(ValueError, match="missing"):
        QuestionPool({"arith": 1, "logic": 1}, level={"arith": 2})
    with pytest.raises(ValueError, match="retire_after"):
        QuestionPool({"arith": 1}, level=2, retire_after=0)
    with pytest.raises(ValueError, match="family_options"):
        QuestionPool({"arith": 1}, level=2, family_options={"recall": {"distance": 30}})
    with pytest.raises(KeyError):
        make_pool().record(999, True, 0)
    pool = QuestionPool({"arith": 1, "recall": 0}, level={"arith": 2, "recall": 3}, pool_size=4)
    assert pool.levels == {"arith": 2} and len(pool.active_ids()) == 4
    far = QuestionPool({"recall": 1}, level=2, pool_size=3, family_options={"recall": {"distance": 40}})
    far.record(far.active_ids()[0], False, 0)                      # the variant keeps the option
    assert len(far.questions) == 4 and all(q.sample.meta["distance"] >= 40 for q in far.questions.values())


# ---------------------------------------------------------------------------------------------- assessment
def test_assessment_on_scripted_accuracies():
    table = {"arith": [0.99, 0.95, 0.7, 0.55, 0.3, 0.9], "logic": [0.99, 0.97, 0.9, 0.4],
             "algebra": [0.3, 0.9], "recall": [0.95, 0.9, 0.88]}
    calls = []

    def accuracy_at(family, level):
        calls.append((family, level))
        return table[family][level - 1]

    out = assess_levels(accuracy_at, ["arith", "logic", "algebra"], levels=range(1, 6),
                        band=(0.5, 0.85))
    assert out["arith"]["level"] == 4 and out["arith"]["status"] == "in_band"
    assert out["arith"]["accuracy_by_level"] == {1: 0.99, 2: 0.95, 3: 0.7, 4: 0.55, 5: 0.3}  # stopped at 5
    assert out["logic"] == {"level": 3, "accuracy_by_level": {1: 0.99, 2: 0.97, 3: 0.9, 4: 0.4},
                            "status": "mastered"}
    assert out["algebra"]["level"] == 1 and out["algebra"]["status"] == "too_hard"
    assert ("algebra", 2) not in calls and ("arith", 6) not in calls
    three = assess_levels(accuracy_at, ["recall"], levels=[3, 1, 2], band=(0.5, 0.85))["recall"]
    assert three["level"] == 3 and three["status"] == "mastered"  # the top level asked for
    with pytest.raises(ValueError):
        assess_levels(accuracy_at, ["arith"], band=(0.9, 0.5))


def test_assessment_by_level_batches_every_family_and_agrees_with_assess_levels():
    table = {"arith": [0.99, 0.95, 0.7, 0.55, 0.3, 0.9], "logic": [0.99, 0.97, 0.9, 0.4],
             "algebra": [0.3, 0.9], "recall": [0.95, 0.9, 0.88]}
    calls = []

    def accuracies_at(level, families):
        calls.append((level, families))
        return {f: table[f][level - 1] for f in families}

    families = ["arith", "logic", "algebra"]
    out = assess_by_level(accuracies_at, families, levels=range(1, 6), band=(0.5, 0.85))
    assert out == assess_levels(lambda f, lv: table[f][lv - 1], families, range(1, 6), (0.5, 0.85))
    # one call per level, each with the families still measured (algebra stops at 1, logic at 4, arith at 5)
    assert calls == [(1, families), (2, ["arith", "logic"]), (3, ["arith", "logic"]), (4, ["arith", "logic"]),
                     (5, ["arith"])]


# ---------------------------------------------------------------------------------------------- measuring
def test_question_counts_follow_their_rules():
    from statistics import NormalDist

    z = NormalDist().inv_cdf
    # the level decision: the one-sample binomial test's number for threshold p0 = p - margin, rounded up
    want = math.ceil(((z(0.95) * math.sqrt(0.7 * 0.3) + z(0.9) * math.sqrt(0.8 * 0.2)) / 0.1) ** 2)
    assert decision_questions(0.1, 0.95, 0.9, 0.8) == want == 161
    assert decision_questions(0.05, 0.95, 0.9, 0.8) > 3.5 * want       # half the margin: about 4x the questions
    # the estimate: within +-margin with probability power (two-sided quantile), worst case p = 1/2
    assert estimate_questions(0.1, 0.9) == math.ceil(z(0.95) ** 2 * 0.25 / 0.01) == 68
    with pytest.raises(ValueError):
        decision_questions(0.0, 0.95, 0.9, 0.8)


def test_level_decision_has_its_stated_error_rates():
    """Simulated: with the rule's number of questions a model whose true accuracy is band[1] = 0.8 advances with
    probability >= power (0.9); one at the threshold 0.7 advances with probability <= 1 - confidence (0.05)."""
    import random

    n = decision_questions(0.1, 0.95, 0.9, 0.8)
    rng = random.Random(0)

    def advance_rate(p, trials=400):
        advanced = 0
        for t in range(trials):
            questions = {"arith": [Sample(f"q{t}-{i}", "1", "arith", 2) for i in range(n)]}
            truth = {s.prompt: rng.random() < p for s in questions["arith"]}
            advanced += decide_levels(lambda ss: [truth[s.prompt] for s in ss], questions, 0.7, 0.95)["arith"].mastered
        return advanced / trials

    assert advance_rate(0.8) >= 0.85
    assert advance_rate(0.7) <= 0.08


def test_level_decision_stops_hopeless_families_early_and_batches_the_rest():
    questions = {f: [Sample(f"{f}{i}", "1", f, lv) for i in range(40)] for f, lv in
                 (("arith", 2), ("tool", 1), ("algebra", 3))}
    right = {"arith": 1.0, "tool": 0.0, "algebra": 0.75}
    calls = []

    def ask(samples):
        calls.append(sorted({s.family for s in samples}))
        return [int(int(s.prompt[len(s.family):]) < right[s.family] * 40) for s in samples]

    out = decide_levels(ask, questions, threshold=0.7, confidence=0.95)
    assert calls == [["algebra", "arith", "tool"], ["algebra", "arith"]]  # tool: 0/10 first, upper bound < 0.7
    assert (out["tool"].n, out["tool"].stopped_early, out["tool"].mastered) == (10, True, False)
    assert (out["arith"].n, out["arith"].correct, out["arith"].level, out["arith"].mastered) == (40, 40, 2, True)
    # algebra 30/40 = 0.75: above the threshold, but its lower bound is not
    assert out["algebra"].correct == 30 and out["algebra"].lower < 0.7 and not out["algebra"].mastered
    assert out["algebra"].upper > 0.75 > out["algebra"].lower


def test_spread_questions_interleave_levels_and_extend_the_same_list():
    from forgelib.data.tasks import split_of

    qs = spread_questions("tool", [1, 3], 9, "test", 5)
    assert [q.level for q in qs] == [1, 3, 1, 3, 1, 3, 1, 3, 1]
    assert all(split_of(q.prompt) == "test" and q.family == "tool" for q in qs)
    longer = spread_questions("tool", [3, 1], 20, "test", 5)
    assert [q.prompt for q in longer[:8]] == [q.prompt for q in qs[:8]] and len({q.prompt for q in longer}) == 20
    scarce = spread_questions("algebra", [3], 400, "test", 0)  # level 3 has fewer than 400 test prompts
    assert 0 < len(scarce) < 400 and len({q.prompt for q in scarce}) == len(scarce)


def test_paired_answers_asks_more_when_the_models_disagree_more_than_assumed():
    from forgelib.stats import questions_needed

    pool = [Sample(f"p{i}", "1", "tool", 1) for i in range(3000)]
    asked = {"before": [], "after": []}

    def model(side, right):
        def ask(samples):
            asked.setdefault(side, []).extend(s.prompt for s in samples)
            return [right(int(s.prompt[1:])) for s in samples]
        return ask

    # after is right on every other question, before on none: discordance 0.5, far above the assumed 0.15
    before, after = paired_answers(pool, model("before", lambda i: 0), model("after", lambda i: int(i % 2 == 0)),
                                   0.1, 0.95, 0.9, 0.15)
    first = questions_needed(0.1, 0.95, 0.9, 0.15)
    observed = sum(after[:first]) / first  # the first round's discordance (about 0.5)
    assert len(before) == len(after) == questions_needed(0.1, 0.95, 0.9, observed) > 3 * first
    assert asked["before"] == asked["after"] == [s.prompt for s in pool[:len(before)]]  # a prefix, each asked once
    assert sum(after) == (len(after) + 1) // 2 and sum(before) == 0
    # no disagreement: the assumed number is enough; never more than the pool holds
    same, _ = paired_answers(pool, model("x", lambda i: 1), model("y", lambda i: 1), 0.1, 0.95, 0.9, 0.15)
    assert len(same) == first
    few, _ = paired_answers(pool[:50], model("a", lambda i: 0), model("b", lambda i: 1), 0.1, 0.95, 0.9, 0.15)
    assert len(few) == 50


# ---------------------------------------------------------------------------------------------- dreaming
def test_dream_buffer_keeps_only_verified_pairs():
    samples = generate("arith", 3, 6, "train", 0)
    pairs = []
    for i, s in enumerate(samples):
        pairs.append((s, completion_text(s, with_steps=True) if i % 2 == 0 else "#" + s.answer + "0"))
    buffer = DreamBuffer(capacity=10, seed=0)
    assert buffer.add(pairs) == 3 and len(buffer) == 3
    assert all(check(Sample(i.prompt, i.answer, i.family, i.level), i.completion) for i in buffer.items)
    assert {i.family for i in buffer.items} == {"arith"} and {i.level for i in buffer.items} == {3}
    assert buffer.add(pairs) == 0 and len(buffer) == 3                     # no duplicates
    assert len(buffer.sample(2)) == 2 and len(buffer.sample(50)) == 3
    restored = DreamBuffer.from_dict(json.loads(json.dumps(buffer.to_dict())))
    assert [i.prompt for i in restored.sample(3)] == [i.prompt for i in buffer.sample(3)]


def test_dream_buffer_is_bounded_reservoir_or_fifo():
    samples = generate("arith", 5, 60, "train", 1)
    right = [(s, completion_text(s, with_steps=True)) for s in samples]
    reservoir, fifo = DreamBuffer(capacity=8, seed=0), DreamBuffer(capacity=8, policy="fifo")
    reservoir.add(right)
    fifo.add(right)
    assert len(reservoir) == len(fifo) == 8 and reservoir.verified == 60
    assert [i.prompt for i in fifo.items] == [s.prompt for s in samples[-8:]]
    assert {i.prompt for i in reservoir.items} != {s.prompt for s in samples[-8:]}  # not just the latest
    assert len({i.prompt for i in reservoir.items}) == 8


def test_dream_calls_the_sampler_hot_and_returns_only_verified_pairs():
    samples = generate("modular", 2, 4, "train", 0)
    seen = {}

    def generate_fn(prompts, temperature):
        seen["prompts"], seen["temperature"] = prompts, temperature
        return [completion_text(s, with_steps=True) if i != 1 else "#wrong" for i, s in enumerate(samples)]

    pairs = dream(generate_fn, samples, temperature=1.3)
    assert seen == {"prompts": [s.prompt for s in samples], "temperature": 1.3}
    assert [s.prompt for s, _ in pairs] == [samples[i].prompt for i in (0, 2, 3)]
    with pytest.raises(ValueError, match="3 completions for 4"):
        dream(lambda p, t: ["x"] * 3, samples)


# ---------------------------------------------------------------------------------------------- re-solving
def test_solve_recovers_every_generated_answer_and_worked_solution():
    for family in FAMILIES:
        for level in range(1, 11):
            for s in generate(family, level, 6, "train", 2):
                assert solve(family, s.prompt) == Solution(s.answer, s.steps), (family, level, s.prompt)
    for family, prompt in [("logic", "T&F|T="), ("arith", "12+="), ("algebra", "1x=5, x="),
                           ("algebra", "3x=7, x="), ("multistep", "Ana has 3 pens.  How many pens?"),
                           ("recall", "ab:1,ab:2 ?ab="), ("arith", "what is 2+2?"), ("sequence", "sort =")]:
        assert solve(family, prompt) is None, prompt


# ---------------------------------------------------------------------------------------------- frontier
def find_prompt(split):
    return next(p for a in range(10, 99) for b in range(10, 99) if split_of(p := f"{a}+{b}=") == split)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.headers.get("Authorization") != "Bearer sk-test-123":
            return self._send(401, b'{"error": "bad key"}')
        if server.mode == "500":
            return self._send(500, b'{"error": "overloaded"}')
        if server.mode == "badjson":
            return self._send(200, b"<html>not json</html>")
        if server.mode == "slow":
            threading.Event().wait(1.0)
        reply = {"choices": [{"message": {"role": "assistant", "content": server.content}}]}
        self._send(200, json.dumps(reply).encode())

    def _send(self, status, payload):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.requests, httpd.mode, httpd.content = [], "ok", ""
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    httpd.endpoint = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_frontier_client_keeps_only_checked_train_split_questions(server, monkeypatch):
    monkeypatch.setenv("FRONTIER_TEST_KEY", "sk-test-123")
    examples = generate("arith", 1, 3, "train", 0)
    train, test = find_prompt("train"), find_prompt("test")
    a, b = map(int, train[:-1].split("+"))
    server.content = "\n".join([
        json.dumps({"prompt": train, "answer": str(a + b)}),          # kept (with worked steps)
        json.dumps({"prompt": "7+8=", "answer": "16"}),               # wrong answer
        json.dumps({"prompt": test, "answer": str(sum(map(int, test[:-1].split("+"))))}),  # test split
        json.dumps({"prompt": "What is 3 plus 4?", "answer": "7"}),   # not the family's format
        "this line is not json",
        json.dumps({"prompt": examples[0].prompt, "answer": examples[0].answer}),  # copies an example
        json.dumps({"prompt": train, "answer": str(a + b)}),          # repeat
    ])
    client = FrontierClient(server.endpoint, "gpt-test", api_key_env="FRONTIER_TEST_KEY", timeout=5)
    out = client.propose_questions("arith", 1, examples, n=5)
    assert [(s.prompt, s.answer, s.family, s.level) for s in out] == [(train, str(a + b), "arith", 1)]
    assert out[0].steps == [f"{a}+{b}={a + b}"] and out[0].meta == {"source": "frontier", "model": "gpt-test"}
    reasons = [r["reason"] for r in client.last_rejected]
    assert len(reasons) == 6 and any("wrong answer" in r for r in reasons)
    assert any("'test' split" in r for r in reasons) and any("format" in r for r in reasons)
    assert "not JSON" in reasons and sum("repeats" in r for r in reasons) == 2
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test-123"
    assert request["body"]["model"] == "gpt-test" and examples[0].prompt in request["body"]["messages"][1]["content"]
    assert enabled({"endpoint": server.endpoint, "api_key_env": "FRONTIER_TEST_KEY"})


def test_frontier_errors_name_the_endpoint_and_status_never_the_key(server, monkeypatch):
    monkeypatch.setenv("FRONTIER_TEST_KEY", "sk-test-123")
    client = FrontierClient(server.endpoint + "/", "m", api_key_env="FRONTIER_TEST_KEY", timeout=10)
    impatient = FrontierClient(server.endpoint, "m", api_key_env="FRONTIER_TEST_KEY", timeout=0.3)
    for mode, pattern, who in [("500", r"HTTP 500.*overloaded", client), ("badjson", "not JSON", client),
                               ("slow", "timed out after 0.3 s", impatient)]:
        server.mode = mode
        with pytest.raises(FrontierError, match=pattern) as info:
            who.chat([{"role": "user", "content": "hi"}])
        assert f"{server.endpoint}/chat/completions" in str(info.value) and "sk-test-123" not in str(info.value)
    monkeypatch.setenv("FRONTIER_TEST_KEY", "sk-wrong")
    server.mode = "ok"
    with pytest.raises(FrontierError, match="HTTP 401") as info:
        client.chat([])
    assert "sk-wrong" not in str(info.value) and "sk-wrong" not in repr(client)
    with pytest.raises(FrontierError, match="connection failed"):
        FrontierClient("http://127.0.0.1:9/v1", "m", api_key_env="FRONTIER_TEST_KEY", timeout=2).chat([])


def test_frontier_disabled_without_key_sends_nothing(server, monkeypatch):
    monkeypatch.delenv("FRONTIER_TEST_KEY", raising=False)
    config = {"endpoint": server.endpoint, "model": "m", "api_key_env": "FRONTIER_TEST_KEY"}
    assert not enabled(config) and not enabled({"endpoint": "", "api_key_env": "PATH"})
    assert not enabled({"api_key_env": "PATH"}) and enabled({"endpoint": "http://x", "api_key_env": "PATH"})
    client = FrontierClient.from_config(config)
    with pytest.raises(FrontierError, match="FRONTIER_TEST_KEY is not set"):
        client.propose_questions("arith", 1, generate("arith", 1, 2, "train", 0), 3)
    assert server.requests == [] and client.requests == 0


def test_parse_proposals_accepts_arrays_fences_and_numbers():
    train = find_prompt("train")
    value = sum(map(int, train[:-1].split("+")))
    text = json.dumps([{"prompt": train, "answer": value}])
    accepted, rejected = parse_proposals(text, "arith", 2)
    assert [s.answer for s in accepted] == [str(value)] and rejected == []
    fenced = "```json\n" + json.dumps({"prompt": train, "answer": str(value)}) + "\n```"
    assert len(parse_proposals(fenced, "arith", 2)[0]) == 1
    assert parse_proposals(fenced, "arith", 2, exclude=[train])[0] == []
    assert math.isclose(len(parse_proposals(fenced, "arith", 2, limit=0)[1]), 1)
