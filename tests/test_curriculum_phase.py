"""Phase 5 on tiny real models: the self-model head's loss against a hand computation, the head never handed
on, a run interrupted after two rounds that resumes to the same state as an uninterrupted one, replay of the input
suite, levels decided on held-out questions only, the suite handed on, the gate."""
import json

import pytest
import torch

from forgelib import paths
from helpers import quietstar_upstream, task_tokenizer, tiny_task_llama
from forgelib.phases.curriculum import Params, SelfModelHead, Trainee, curriculum_loss, summarize


@pytest.fixture(scope="module")
def tok():
    return task_tokenizer()


tiny_llama = tiny_task_llama


def test_self_model_loss_is_the_masked_mse_to_a_detached_earlier_layer(tok):
    model = tiny_llama(tok)
    head = SelfModelHead(32, layer=1)
    ids = torch.randint(10, 200, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    loss = head.loss(hs, mask)
    pred, target = head.proj(hs[-1]), hs[1]
    per = ((pred - target) ** 2).mean(-1)
    want = (per * mask).sum() / mask.sum()
    assert torch.allclose(loss, want)
    loss.backward()
    assert head.proj.weight.grad is not None
    # the target is detached: the first layer gets gradient only through the final state's path
    with pytest.raises(ValueError, match="self_model_layer"):
        SelfModelHead(32, layer=len(hs) - 1).loss(hs, mask)


def test_curriculum_loss_adds_the_weighted_self_model_term(tok):
    from forgelib.data.tasks import generate
    from forgelib.data.tokenizer import encode_samples

    model = tiny_llama(tok)
    batch = dict(encode_samples(tok, generate("arith", 1, 4, "train", 0), 64, answer_only_loss=True, with_steps=True))
    plain, extras0 = curriculum_loss(Trainee(model, None), batch, 0.5)
    torch.manual_seed(1)
    with_head, extras = curriculum_loss(Trainee(model, SelfModelHead(32, 1)), batch, 0.5)
    assert "self_model_mse" not in extras0
    assert float(with_head.detach()) == pytest.approx(float(plain.detach()) + 0.5 * extras["self_model_mse"], rel=1e-5)


def test_gate_reads_the_verdicts_in_the_report():
    from forgelib.stats import superior

    taught = superior("teaches_tool", [0] * 60, [1] * 30 + [0] * 30, 0.1, 0.95, 0.9)      # +0.5 on 60 questions
    unsure = superior("teaches_arith", [0] * 10, [1] * 3 + [0] * 7, 0.1, 0.95, 0.9)       # +0.3, but on 10
    calculator = superior("tool_with_minus_without", [0] * 60, [1] * 30 + [0] * 30, 0.0, 0.95, 0.9)
    report = {"level_reached": {"arith": 2, "tool": 1},
              "acc_by_level": {"before": {"arith": {"1": 0.5, "2": 0.2}, "tool": {"1": 0.0}},
                               "after": {"arith": {"1": 0.6, "2": 0.3}, "tool": {"1": 0.5}}},
              "levels": {"advanced_in_rounds": {"arith": [3], "tool": []}},
              "teaching": {"tool": {"verdict": taught.as_row()}, "arith": {"verdict": unsure.as_row()}},
              "tool": {"with": {"accuracy": 0.5, "tool_success_rate": 1.0}, "without": {"accuracy": 0.0},
                       "verdict": calculator.as_row()}}
    metrics, checks = summarize(report, Params())
    gate = {c.name: c for c in checks}
    assert set(gate) == {"teaches_tool", "teaches_arith", "tool_with_minus_without_lower_bound"}
    assert gate["teaches_tool"].passed
    assert (gate["teaches_tool"].value, gate["teaches_tool"].bound) == (taught.lower, 0.1)
    assert taught.lower > 0.3  # the lower confidence bound, not the raw difference, is gated
    assert not gate["teaches_arith"].passed and "too few questions to decide: 10 asked" in gate["teaches_arith"].note
    assert gate["tool_with_minus_without_lower_bound"].passed and gate["tool_with_minus_without_lower_bound"].bound == 0
    assert metrics["acc_reached_arith"] == 0.3 and metrics["acc_reached_mean"] == 0.4
    assert (metrics["acc_earlier_mean"], metrics["acc_earlier_before"]) == (0.6, 0.5)  # arith L1, below the reached
    assert metrics["levels_advanced"] == 1 and metrics["tool_acc_with"] == 0.5
    assert metrics["teaches_tool_lower_bound"] == taught.lower
    # the calculator no better than answering without it: the paired lower bound is below 0
    same = superior("tool_with_minus_without", [1] * 30 + [0] * 30, [1] * 30 + [0] * 30, 0.0, 0.95, 0.9)
    report["tool"]["verdict"] = same.as_row()
    _, checks = summarize(report, Params())
    check = {c.name: c for c in checks}["tool_with_minus_without_lower_bound"]
    assert not check.passed and check.value == same.lower < 0


def _upstream(tok, tmp_path):
    """A Phase-4-like upstream: a Quiet-STaR Llama with ternary layers, packed, that knows ``SUITE``."""
    up = quietstar_upstream(tok, tmp_path / "ternary", "bitnet", 4, "cur", packing="base3")
    up.suite = {f: list(v) for f, v in SUITE.items()}
    return up


SUITE = {"logic": (1, 1), "recall": (2, 2)}
"""What the tiny upstream knows: families outside the curriculum's, one at a level above 1."""


TINY = {"families": ["arith", "tool"], "max_level": 2, "assess_per_level": 2, "rounds": 3, "ask_per_family": 3,
        "pool_size": 4, "steps_per_round": 2, "fresh_per_round": 4, "batch_size": 4, "dream_per_round": 2,
        "max_new_tokens": 12, "decide_questions": 4, "band": [0.0, 1.0]}


def _run(session, up, extra=None):
    from forgelib.phases import open_phase

    overrides = {"run": {"quiet": True, "tracking": "jsonl"}, "curriculum": {**TINY, **(extra or {})},
                 "guard": {"max_questions": 8}}
    ctx = open_phase("curriculum", "parameters/smoke.yaml", overrides, session=session, upstream=up)
    return ctx, ctx.spec.load().run(ctx.params, ctx)


def test_interrupted_run_resumes_to_the_uninterrupted_state(tok, tmp_path, monkeypatch):
    from forgelib.phases import curriculum as phase
    from forgelib.modelio import load_quietstar

    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "out"))
    up = _upstream(tok, tmp_path)
    full_ctx, full = _run("full", up)
    real_round = phase.run_round
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption in round 3")
        return real_round(*args, **kwargs)

    monkeypatch.setattr(phase, "run_round", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run("cut", up)
    cut_dir = tmp_path / "out" / "cut" / "05_curriculum"
    cut_state = json.loads((cut_dir / "state" / "state.json").read_text())
    assert cut_state["round"] == 2
    resumed_rounds = []

    def counted(*args, **kwargs):
        resumed_rounds.append(kwargs["last"])
        return real_round(*args, **kwargs)

    monkeypatch.setattr(phase, "run_round", counted)
    resumed_ctx, resumed = _run("resumed", up, {"resume_from": str(cut_dir)})
    monkeypatch.setattr(phase, "run_round", real_round)
    # the resumed run trained only the missing third round (a run that ignored the saved state and started over
    # would reach the same deterministic result with three rounds)
    assert resumed_rounds == [True]
    a = json.loads((full_ctx.dir / "report.json").read_text())
    b = json.loads((resumed_ctx.dir / "report.json").read_text())
    assert len(a["history"]) == 3 and cut_state["history"] == a["history"][:2]
    assert a["history"] == b["history"] and a["question_pool"] == b["question_pool"]
    ma = load_quietstar(paths.resolve(full.models["model"]["path"]))
    mb = load_quietstar(paths.resolve(resumed.models["model"]["path"]))
    for (name, p), (_, q) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(p, q), name
    # the self-model head is not part of the handed-on model
    assert set(ma.state_dict()) == set(load_quietstar(up.models["model"]["path"], trainable=True).state_dict())
    # the same state gives the same measurements, and the metrics are the report's numbers
    assert resumed.metrics == full.metrics
    for family in TINY["families"]:
        level = a["level_reached"][family]
        assert full.metrics[f"level_reached_{family}"] == level and 1 <= level <= TINY["max_level"]
        measured = a["acc_by_level"]["after"].get(family, {}).get(str(level))
        # the level a family ends at is its frontier: measured only when the guard or the teaching asked it
        assert full.metrics.get(f"acc_reached_{family}") == (None if measured is None else round(measured, 4))
    assert full.metrics["tool_acc_with"] == round(a["tool"]["with"]["accuracy"], 4)
    assert full.metrics["tool_acc_without"] == round(a["tool"]["without"]["accuracy"], 4)


def test_frontier_questions_join_the_pool_only_when_configured(tok, tmp_path, monkeypatch):
    """With an endpoint and a key the phase asks a local OpenAI-compatible server each round; the questions its
    solver confirms join the pools (origin 'frontier'); without the key nothing is sent."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from forgelib.data.tasks import split_of

    prompts = [p for a in range(10, 60) for b in range(10, 60) if split_of(p := f"{a}+{b}=") == "train"][:40]
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            requests.append(self.headers.get("Authorization"))
            self.rfile.read(int(self.headers["Content-Length"]))
            lines = [json.dumps({"prompt": p, "answer": str(eval_sum(p))}) for p in prompts[len(requests) * 2:][:2]]
            lines.append(json.dumps({"prompt": "2+2=", "answer": "5"}))  # wrong: rejected
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "\n".join(lines)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def eval_sum(prompt):
        a, b = prompt[:-1].split("+")
        return int(a) + int(b)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "out"))
    up = _upstream(tok, tmp_path)
    frontier = {"frontier": {"endpoint": endpoint, "model": "m", "api_key_env": "FORGE_TEST_FRONTIER_KEY",
                             "per_round": 2}, "families": ["arith"], "rounds": 2}
    monkeypatch.delenv("FORGE_TEST_FRONTIER_KEY", raising=False)
    _run("nokey", up, frontier)
    assert requests == []
    monkeypatch.setenv("FORGE_TEST_FRONTIER_KEY", "sk-local")
    ctx, _ = _run("withkey", up, frontier)
    httpd.shutdown()
    assert requests and all(r == "Bearer sk-local" for r in requests)
    report = json.loads((ctx.dir / "report.json").read_text())
    assert any(row.get("frontier", {}).get("arith", {}).get("accepted", 0) > 0 for row in report["history"])
    origins = {row["origin"] for row in report["question_pool"]["arith"]}
    assert "frontier" in origins


def _held_out_script(phase, decided, right_family):
    """A stand-in for the model in the level decisions: ``right_family`` answers every held-out question right, every
    other family none; the questions asked are recorded in ``decided``."""
    real = phase.decide_levels

    def decide(ask, questions, threshold, confidence, **kwargs):
        decided.append({f: list(qs) for f, qs in questions.items()})
        return real(lambda samples: [int(s.family == right_family) for s in samples], questions, threshold,
                    confidence, **kwargs)

    return decide


def test_replay_draws_the_suite_and_levels_move_on_held_out_questions_only(tok, tmp_path, monkeypatch):
    """Every training batch holds the stated share of the input suite's families at their levels; the level
    decisions ask fitness-split questions of each family's current level, never trained on, and move a family
    exactly when they say so; the handed-on suite is the input's plus the curriculum's families (``tool`` new);
    the gate is the guard over the input suite, the teaching checks and the calculator check."""
    from forgelib.data.tasks import split_of
    from forgelib.phases import curriculum as phase
    from forgelib.stats import superior
    from forgelib.suite import read_guard

    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "out"))
    batches, decided = [], []
    real_batch = phase.batch_samples

    def spy(*args, **kwargs):
        batches.append(real_batch(*args, **kwargs))
        return batches[-1]

    monkeypatch.setattr(phase, "batch_samples", spy)
    monkeypatch.setattr(phase, "decide_levels", _held_out_script(phase, decided, "arith"))
    # band [1, 1]: every family starts at level 1 (the tiny model solves nothing); held-out 40/40 passes the
    # threshold 1 - level_margin = 0.9 (lower bound 0.92), 0/10 stops early
    ctx, result = _run("replay", _upstream(tok, tmp_path), {"band": [1.0, 1.0], "replay": 0.5, "decide_questions": 40,
                                                            "review": 0.0})  # (review: its own test below)
    report = json.loads((ctx.dir / "report.json").read_text())
    history = report["history"]
    # replay: 2 of each batch of 4 (share 0.5) are fresh train-split problems of the suite, at the suite's levels,
    # and, once arith moved past level 1 (after round 0), of arith's level 1 too (what this phase taught so far)
    assert len(batches) >= TINY["rounds"] * TINY["steps_per_round"]
    for i, batch in enumerate(batches):
        later = i >= TINY["steps_per_round"]
        replayed = [s for s in batch if s.family in SUITE or (later and s.family == "arith" and s.level == 1)]
        assert len(replayed) == 2
        assert all(SUITE[s.family][0] <= s.level <= SUITE[s.family][1] for s in replayed if s.family in SUITE)
        assert all(split_of(s.prompt) == "train" for s in batch)
    assert any(s.family == "arith" and s.level == 1 for b in batches[TINY["steps_per_round"]:] for s in b)
    assert {s.family for b in batches for s in b} == {"arith", "tool", "logic", "recall"}
    assert report["replay"] == {"share": 0.5, "per_batch": 2, "families": ["logic", "recall"]}
    # levels: decided after every round but the last, on fitness-split questions of the current level
    assert len(decided) == TINY["rounds"] - 1
    assert {f: {q.level for q in qs} for f, qs in decided[0].items()} == {"arith": {1}, "tool": {1}}
    assert {f: {q.level for q in qs} for f, qs in decided[1].items()} == {"tool": {1}}  # arith at max_level
    held_out = {q.prompt for d in decided for qs in d.values() for q in qs}
    assert all(split_of(p) == "fitness" for p in held_out)
    assert not held_out & {s.prompt for b in batches for s in b}
    assert not held_out & {row["prompt"] for rows in report["question_pool"].values() for row in rows}
    first = history[0]["heldout"]
    assert first["arith"]["n"] == 40 and first["arith"]["mastered"] and first["arith"]["lower"] > 0.9
    assert first["tool"]["n"] == 10 and first["tool"]["stopped_early"] and not first["tool"]["mastered"]
    assert history[0]["advanced"] == ["arith"] and all("advanced" not in row for row in history[1:])
    assert [row["levels"]["arith"] for row in history] == [1, 2, 2]
    assert report["level_reached"] == {"arith": 2, "tool": 1} and result.metrics["levels_advanced"] == 1
    # the suite handed on: the input's, widened by the levels mastered (below the frontier each family ends at):
    # arith moved past level 1 (new to the suite), tool never mastered level 1 and is not handed on as known
    assert result.suite == {"arith": [1, 1], "logic": [1, 1], "recall": [2, 2]}
    assert report["suite"]["taught"] == {"arith": [1]}
    # the gate: the guard over the input suite, a teaching check per widened family, the calculator
    guard = read_guard(ctx.dir)
    assert set(guard["families"]) == set(SUITE) and guard["suite"] == {f: list(v) for f, v in SUITE.items()}
    gate = {c.name: c for c in result.gate}
    assert set(gate) == {"keeps_logic", "keeps_recall", "teaches_arith", "tool_with_minus_without_lower_bound"}
    for family, levels in (("arith", [1]),):
        row = report["teaching"][family]
        assert row["levels"] == levels and len(row["prompts"]) == len(row["before"]) == row["verdict"]["n"] <= 8
        assert all(split_of(p) == "test" for p in row["prompts"])
        again = superior(f"teaches_{family}", row["before"], row["after"], 0.1, 0.95, 0.9)
        assert gate[f"teaches_{family}"].value == again.lower == row["verdict"]["lower"]
        assert gate[f"teaches_{family}"].bound == 0.1
    tool = report["tool"]
    assert tool["with"]["samples"] == tool["without"]["samples"] == tool["verdict"]["n"]
    assert gate["tool_with_minus_without_lower_bound"].value == tool["verdict"]["lower"]
    assert tool["without"]["calls_ok"] == 0  # no calculator answers in the arm without it


def test_right_answers_to_the_pool_never_move_a_level(tok, tmp_path, monkeypatch):
    """The pool's questions are trained on: answering all of them right (the old rule advanced at band[1]) leaves
    the level where it is while the held-out questions fail."""
    from forgelib.curriculum import QuestionPool
    from forgelib.phases import curriculum as phase

    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "out"))
    monkeypatch.setattr(QuestionPool, "grade", staticmethod(lambda item, output: True))
    decided = []
    monkeypatch.setattr(phase, "decide_levels", _held_out_script(phase, decided, None))
    ctx, _ = _run("pool", _upstream(tok, tmp_path), {"band": [1.0, 1.0], "rounds": 2})
    history = json.loads((ctx.dir / "report.json").read_text())["history"]
    assert all(row["correct"] == row["asked"] and sum(row["asked"].values()) > 0 for row in history)
    assert len(decided) == 1 and all("advanced" not in row for row in history)
    assert [row["levels"] for row in history] == [{"arith": 1, "tool": 1}] * 2


def test_a_family_that_moved_up_reviews_the_levels_it_mastered_here():
    """``review``: that share of a family's fresh problems comes from the levels its pool archived (mastered in
    this phase), uniform over them; none before it moves up, none with review 0; the rest stay at its level."""
    import random
    from collections import Counter

    from forgelib.curriculum import QuestionPool
    from forgelib.phases.curriculum import _frontier_samples

    def fresh_levels(pool, review):
        params = Params(fresh_per_round=40, review=review)
        active = [pool.questions[q].sample for q in pool.active_ids()]  # the frontier's first part
        samples = _frontier_samples({"arith": pool}, params, random.Random(0))
        assert samples[:len(active)] == active
        return Counter(s.level for s in samples[len(active):]), len(samples) - len(active)

    pool = QuestionPool({"arith": 1.0}, level=2, pool_size=4, seed=0)
    assert fresh_levels(pool, 0.5) == (Counter({2: 40}), 40)  # nothing mastered here yet (levels below 2 not)
    assert pool.advance() and pool.level == 3
    assert fresh_levels(pool, 0.5) == (Counter({3: 20, 2: 20}), 40)
    assert fresh_levels(pool, 0.0) == (Counter({3: 40}), 40)
    assert pool.advance() and pool.level == 4
    levels, n = fresh_levels(pool, 0.25)
    assert n == 40 and levels[4] == 30 and levels[2] + levels[3] == 10 and levels[2] > 0 and levels[3] > 0
    with pytest.raises(ValueError, match="review must lie in"):
        Params(review=1.0)


def test_levels_the_input_already_answered_are_guarded_not_counted_as_taught():
    """Worked example of the split between the guard and the teaching checks: a family the assessment started at
    level 5 (the input answered levels 1-4 at or above the band's lower edge) that ends at level 6 was taught level 5
    only; its level 4, above the input suite's 1-3, is kept by the guard. A family the assessment started at level 2
    and that never moved up taught nothing; its level 1 joins the guard. The calculator family, new, started at 1."""
    from forgelib.phases.curriculum import guarded_suite, mastered_levels, taught_levels

    suite = {"arith": (1, 2), "multistep": (1, 3)}
    start = {"multistep": 5, "arith": 1, "algebra": 2, "tool": 1}
    reached = {"multistep": 6, "arith": 3, "algebra": 2, "tool": 2}
    mastered = mastered_levels(reached)
    assert mastered == {"multistep": 5, "arith": 2, "algebra": 1, "tool": 1}
    assert guarded_suite(suite, start) == {"algebra": (1, 1), "arith": (1, 2), "multistep": (1, 4)}
    assert taught_levels(suite, mastered, start) == {"multistep": [5], "tool": [1]}
    # without the assessment's start every level above the input suite counts as taught (the old rule)
    assert taught_levels(suite, mastered) == {"multistep": [4, 5], "algebra": [1], "tool": [1]}
    # every mastered level is either in the guarded suite or taught, never both
    guarded, taught = guarded_suite(suite, start), taught_levels(suite, mastered, start)
    for family, top in mastered.items():
        lo, hi = guarded.get(family, (0, -1))
        for level in range(1, top + 1):
            assert (lo <= level <= hi) != (level in taught.get(family, [])), (family, level)
