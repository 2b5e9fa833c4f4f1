"""Phase 7 (experts) beyond the SVF vectors: discovery by k-means and the silhouette, question features, the
REINFORCE / cross-entropy loss of an expert and its training, routing with the confidence gate, the Pareto front and
the CMA-ES routing search, and the phase's metrics, gate, answer checker and parameter errors.

Every value is checked against an independent reference: brute-force loops, hand-worked examples or formulas."""
import copy
import math

import pytest
import torch

from forgelib.experts import SVFConfig, apply_svf
from forgelib.experts.discover import choose_k, kmeans, question_features, route, silhouette
from forgelib.experts.route import RoutingSettings, assignments, pareto_front, search_settings
from forgelib.experts.train import (ExpertTrainConfig, base_weights, expert_loss, token_logprobs, trace_batch,
                                    train_expert)


# --- fixtures -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    """A real byte-level BPE with the project's special tokens (trained on worked task samples)."""
    from forgelib.data.tasks import build_mix, format_sample, suite_families
    from forgelib.data.tokenizer import train_tokenizer

    mix = {f: 1 for f in suite_families()}
    texts = [format_sample(s, with_steps=True) for s in build_mix(mix, (1, 3), 200, "train", 0)]
    return train_tokenizer(texts, vocab_size=300)


def _llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)).eval()


def _blobs(centers, n_per, std, seed):
    """Gaussian blobs around ``centers``, shuffled; returns (x, true labels)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor(centers, dtype=torch.float32)
    x = torch.cat([c + std * torch.randn(n_per, centers.shape[1], generator=g) for c in centers])
    y = torch.arange(len(centers)).repeat_interleave(n_per)
    perm = torch.randperm(len(x), generator=g)
    return x[perm], y[perm]


def _same_partition(a, b) -> bool:
    """``a`` and ``b`` are the same partition up to a renaming of the labels (a bijection)."""
    forward, backward = {}, {}
    for p, q in zip(a.tolist(), b.tolist()):
        if forward.setdefault(p, q) != q or backward.setdefault(q, p) != p:
            return False
    return True


def _silhouette_reference(x, labels) -> float:
    """The textbook silhouette, point by point in float64 Python: a(i) = mean distance to the other members of its
    cluster, b(i) = smallest mean distance to another cluster, s(i) = (b − a) / max(a, b); a singleton gets 0."""
    pts, labs = x.double().tolist(), labels.tolist()
    clusters = sorted(set(labs))
    scores = []
    for i, p in enumerate(pts):
        own = [j for j in range(len(pts)) if labs[j] == labs[i] and j != i]
        if not own:
            scores.append(0.0)
            continue
        a = sum(math.dist(p, pts[j]) for j in own) / len(own)
        b = min(sum(math.dist(p, pts[j]) for j in range(len(pts)) if labs[j] == c) /
                sum(1 for lab in labs if lab == c) for c in clusters if c != labs[i])
        scores.append((b - a) / max(a, b))
    return sum(scores) / len(scores)


# --- discovery ----------------------------------------------------------------------------------------------

def test_kmeans_recovers_separated_blobs_with_exact_inertia_and_means():
    x, truth = _blobs([[0.0, 0.0, 0.0], [12.0, 0.0, 0.0], [0.0, 12.0, 0.0]], 20, 0.5, seed=3)
    labels, centroids, inertia = kmeans(x, 3, seed=0)
    assert labels.shape == (60,) and centroids.shape == (3, 3)
    assert _same_partition(labels, truth) and len(set(labels.tolist())) == 3
    xs, cs = x.double().tolist(), centroids.double().tolist()
    by_hand = sum(sum((xi - ci) ** 2 for xi, ci in zip(xs[i], cs[lab])) for i, lab in enumerate(labels.tolist()))
    assert inertia == pytest.approx(by_hand, rel=1e-5)
    for j in range(3):
        members = [xs[i] for i, lab in enumerate(labels.tolist()) if lab == j]
        mean = [sum(col) / len(members) for col in zip(*members)]
        assert cs[j] == pytest.approx(mean, abs=1e-5)
    with pytest.raises(ValueError, match="k must be in"):
        kmeans(x, 61)


def test_kmeans_with_fewer_distinct_points_than_k():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])  # k = 3 <= N = 3 is allowed, but only 2 distinct points
    labels, centroids, inertia = kmeans(x, 3, seed=0)
    assert inertia == 0.0 and labels[0] == labels[1] != labels[2]


def test_silhouette_matches_the_textbook_definition():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 4, generator=g) + torch.tensor([3.0, 0, 0, 0]) * torch.randint(0, 3, (40, 1), generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)
    assert silhouette(x, labels) == pytest.approx(_silhouette_reference(x, labels), abs=1e-5)
    # a singleton cluster counts 0 (point 0 alone in cluster 7)
    labels[0] = 7
    assert silhouette(x, labels) == pytest.approx(_silhouette_reference(x, labels), abs=1e-5)
    # separated blobs: high; the same points labelled at random: near 0; one cluster: 0
    blobs, truth = _blobs([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], 15, 0.5, seed=1)
    assert silhouette(blobs, truth) == pytest.approx(_silhouette_reference(blobs, truth), abs=1e-5)
    assert silhouette(blobs, truth) > 0.7
    shuffled = truth[torch.randperm(len(truth), generator=g)]
    assert abs(silhouette(blobs, shuffled)) < 0.15
    assert silhouette(blobs, torch.zeros(45, dtype=torch.long)) == 0.0


def test_choose_k_picks_the_number_of_blobs():
    x, truth = _blobs([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], 12, 0.6, seed=2)
    found = choose_k(x, range(2, 7), seed=0)
    assert found["k"] == 4 and set(found["silhouettes"]) == {2, 3, 4, 5, 6}
    assert found["silhouettes"][4] == max(found["silhouettes"].values())
    assert _same_partition(found["labels"], truth) and found["centroids"].shape == (4, 2)
    assert found["silhouettes"][4] == pytest.approx(_silhouette_reference(x, found["labels"]), abs=1e-5)


def test_route_is_the_nearest_centroid():
    g = torch.Generator().manual_seed(7)
    feats, cents = torch.randn(30, 6, generator=g), torch.randn(4, 6, generator=g)
    want = [min(range(4), key=lambda j: math.dist(f, cents[j].double().tolist())) for f in feats.double().tolist()]
    assert route(feats, cents).tolist() == want


def test_question_features_are_unit_means_of_each_prompt_alone(tok):
    model = _llama(tok)
    prompts = ["What is 3 + 4? ", "Compute 12 * 7 - 5 and then add 19 to it: ", "x", "17 - 9 = "]
    feats = question_features(model, tok, prompts, batch_size=3)  # two batches, the first with padding
    assert feats.shape == (4, 32) and feats.dtype == torch.float32
    assert torch.allclose(feats.norm(dim=-1), torch.ones(4), atol=1e-6)
    for i, p in enumerate(prompts):
        ids = torch.tensor([[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        mean = hidden.mean(0)
        assert torch.allclose(feats[i], mean / mean.norm(), atol=1e-5), p
    assert torch.allclose(question_features(model, tok, prompts), feats, atol=1e-5)  # one padded batch


# --- expert training ------------------------------------------------------------------------------------------

def test_trace_batch_marks_exactly_the_models_own_next_tokens(tok):
    from forgelib.data.base import TOOL_CLOSE, TOOL_OPEN, TOOL_RESULT
    from forgelib.tools import ToolTrace

    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    # the model writes "<|tool|>3*4<|/tool|>", the calculator appends "<|result|>12", the model writes "#12" + eos
    own, result = enc(TOOL_OPEN + "3*4" + TOOL_CLOSE), enc(TOOL_RESULT + "12")
    tail = enc("#12") + [tok.eos_token_id]
    ids = own + result + tail
    generated = [1] * len(own) + [0] * len(result) + [1] * len(tail)
    short = enc("7") + [tok.eos_token_id]
    traces = [ToolTrace("What is 3*4? ", "", [], len(own) + len(tail), len(result), "eos", ids, generated),
              ToolTrace("1+6=", "7", [], 2, 0, "eos", short, [1, 1])]
    prompts = ["What is 3*4? ", "1+6="]
    batch = trace_batch(tok, prompts, traces)
    rows = [[tok.bos_token_id] + enc(p) + t.ids for p, t in zip(prompts, traces)]
    width = max(len(r) for r in rows)
    assert batch["input_ids"].shape == batch["own"].shape == (2, width)
    for b, (p, t, row) in enumerate(zip(prompts, traces, rows)):
        n_prompt = 1 + len(enc(p))
        assert batch["input_ids"][b].tolist() == row + [tok.pad_token_id] * (width - len(row))
        assert batch["attention_mask"][b].tolist() == [1] * len(row) + [0] * (width - len(row))
        # position s predicts token s + 1; that token is the model's own when it is completion token
        # j = s + 1 − n_prompt with generated[j] = 1
        want = [int(0 <= s + 1 - n_prompt < len(t.ids) and t.generated[s + 1 - n_prompt] == 1) for s in range(width)]
        assert batch["own"][b].tolist() == [bool(w) for w in want]
        assert sum(want) == sum(t.generated)
    # the positions that predict the appended "<|result|>12" tokens are not the model's: in row 0,
    # positions n_prompt − 1 + len(own) .. n_prompt − 1 + len(own) + len(result) − 1
    start = 1 + len(enc(prompts[0])) - 1 + len(own)
    assert not batch["own"][0, start:start + len(result)].any()
    assert batch["own"][0, start - 1] and batch["own"][0, start + len(result)]


def _lm_batch():
    """Four right-padded rows of random ids with hand-set ``own`` masks."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(8, 64, (4, 10), generator=g)
    lengths = [10, 8, 9, 6]
    mask = torch.tensor([[1] * n + [0] * (10 - n) for n in lengths])
    own = torch.zeros(4, 10, dtype=torch.bool)
    for b, (lo, n) in enumerate(zip([3, 2, 4, 1], lengths)):
        own[b, lo:n - 1] = True  # positions lo .. n−2 predict the completion tokens lo+1 .. n−1
    own[0, 6] = False  # an appended tool result inside the completion
    return {"input_ids": ids, "attention_mask": mask, "own": own}


def _per_seq_by_hand(model, batch):
    """Mean log-prob of the own tokens, per row, from the model's logits position by position."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = []
    for b in range(len(logits)):
        lps = [float(torch.log_softmax(logits[b, t].double(), -1)[batch["input_ids"][b, t + 1]])
               for t in range(logits.shape[1] - 1) if batch["own"][b, t]]
        out.append(sum(lps) / len(lps))
    return out


def test_expert_loss_reinforce_and_ce_match_hand_computations(tiny_llama):
    svf = apply_svf(tiny_llama)
    with torch.no_grad():
        for z in svf.z.values():
            z.copy_(torch.linspace(-1, 1, z.numel()))
    batch = _lm_batch()
    # token_logprobs: the log-softmax of each next token
    logp, logits = token_logprobs(svf, batch)
    assert logp.shape == (4, 9) and logits.shape == (4, 9, 64)
    with torch.no_grad():
        lsm = torch.log_softmax(svf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    want = torch.stack([lsm[b, t, batch["input_ids"][b, t + 1]] for b in range(4) for t in range(9)]).view(4, 9)
    assert torch.allclose(logp.detach(), want, atol=1e-5)
    assert torch.allclose(torch.log_softmax(logits.detach(), -1), lsm[:, :-1], atol=1e-5)

    per_seq = _per_seq_by_hand(svf, batch)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    advantage = [r - 0.75 for r in rewards.tolist()]  # r − mean(r)
    want = -sum(a * s for a, s in zip(advantage, per_seq)) / 4
    loss, extras = expert_loss(svf, batch, rewards, "reinforce", kl_weight=0.0)
    assert float(loss.detach()) == pytest.approx(want, abs=1e-5)
    assert extras["reward"] == 0.75 and "kl" not in extras
    loss.backward()
    assert all(z.grad is not None for z in svf.z.values())
    # all rewards equal: no advantage, the loss is exactly 0
    for same in (torch.ones(4), torch.zeros(4)):
        assert float(expert_loss(svf, batch, same, "reinforce", 0.0)[0].detach()) == 0.0
    # cross-entropy: the mean over the correct answers only
    loss, _ = expert_loss(svf, batch, rewards, "ce", 0.0)
    assert float(loss.detach()) == pytest.approx(-(per_seq[0] + per_seq[2] + per_seq[3]) / 3, abs=1e-5)
    loss, _ = expert_loss(svf, batch, torch.tensor([0.0, 1.0, 0.0, 0.0]), "ce", 0.0)
    assert float(loss.detach()) == pytest.approx(-per_seq[1], abs=1e-5)
    assert float(expert_loss(svf, batch, torch.zeros(4), "ce", 0.0)[0].detach()) == 0.0


def test_expert_loss_kl_to_the_base_model(tiny_llama):
    base = copy.deepcopy(tiny_llama)
    svf = apply_svf(tiny_llama)
    batch, rewards = _lm_batch(), torch.tensor([1.0, 0.0, 0.0, 1.0])
    # z = 0: the expert is the base, the KL term is exactly 0
    loss, extras = expert_loss(svf, batch, rewards, "reinforce", kl_weight=0.5)
    assert extras["kl"] == 0.0 and float(loss.detach()) == pytest.approx(extras["main"], abs=1e-7)
    # z ≠ 0: KL(expert ‖ base) over the own positions, the base being the untouched original model
    expert_z = {n: torch.linspace(-2, 2, z.numel()) for n, z in svf.z.items()}
    svf.load_z(expert_z)
    loss, extras = expert_loss(svf, batch, rewards, "reinforce", kl_weight=0.5)
    with torch.no_grad():
        p = torch.log_softmax(svf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                              .double(), -1)
        q = torch.log_softmax(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                              .double(), -1)
    kls = [float((p[b, t].exp() * (p[b, t] - q[b, t])).sum()) for b in range(4) for t in range(9)
           if batch["own"][b, t]]
    assert extras["kl"] > 0 and extras["kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-3, abs=1e-6)
    assert float(loss.detach()) == pytest.approx(extras["main"] + 0.5 * extras["kl"], abs=1e-6)
    loss.backward()  # the base pass (z set to 0 and back in between) leaves the graph usable
    assert all(float(z.grad.abs().sum()) > 0 for z in svf.z.values())
    assert all(torch.equal(svf.get_z()[n], v) for n, v in expert_z.items())  # the expert's z came back
    with base_weights(svf):
        assert all(float(z.detach().abs().sum()) == 0 for z in svf.z.values())
    assert all(torch.equal(svf.get_z()[n], v) for n, v in expert_z.items())


def test_train_expert_moves_z_and_never_the_base_weights(tok):
    from forgelib.data.tasks import generate

    svf = apply_svf(_llama(tok), SVFConfig())
    frozen = {n: p.detach().clone() for n, p in svf.model.named_parameters() if not n.endswith(".z")}
    frozen.update({n: b.detach().clone() for n, b in svf.model.named_buffers()})
    samples = generate("arith", 1, 8, "train", 0)

    def check(sample, text):  # reward 1 when the completion has a lowercase ASCII letter (about 2 in 3 here)
        return any("a" <= ch <= "z" for ch in text)

    history = train_expert(svf, tok, samples, check, ExpertTrainConfig(steps=3, batch_size=4, max_new_tokens=4,
                                                                       lr=5e-2), seed=0)
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all({"loss", "reward", "main", "kl"} <= set(h) and 0.0 <= h["reward"] <= 1.0 for h in history)
    assert any(0.0 < h["reward"] < 1.0 for h in history), history  # some step had a non-zero advantage
    assert any(float(z.detach().abs().max()) > 0 for z in svf.z.values())
    for name, p in list(svf.model.named_parameters()) + list(svf.model.named_buffers()):
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert not svf.training


# --- routing ------------------------------------------------------------------------------------------------

def test_assignments_nearest_or_two_nearest_under_the_gate():
    cents = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    feats = torch.tensor([[1.0, 0.0],    # distances 1, 9, 10.05: clearly cluster 0
                          [5.2, 0.0],    # 5.2 vs 4.8: cluster 1, margin 0.4
                          [4.9, 0.0],    # 4.9 vs 5.1: cluster 0, margin 0.2
                          [0.0, 6.0]])   # 6 vs 4: cluster 2, margin 2
    assert assignments(feats, cents, RoutingSettings(gate=0.0)) == [(0,), (1,), (0,), (2,)]
    assert assignments(feats, cents, RoutingSettings(gate=0.5)) == [(0,), (0, 1), (0, 1), (2,)]
    assert assignments(feats, cents, RoutingSettings(gate=100.0)) == [(0, 1), (0, 1), (0, 1), (0, 2)]
    assert assignments(feats, cents[:1], RoutingSettings(gate=100.0)) == [(0,)] * 4


def test_pareto_front_keeps_exactly_the_non_dominated_points():
    pts = {"a": (0.9, 2.0), "b": (0.8, 1.0), "c": (0.8, 1.5), "d": (0.9, 2.5), "e": (0.5, 0.5), "f": (0.4, 0.6),
           "g": (0.95, 3.0), "h": (0.5, 0.5)}
    points = [{"name": k, "accuracy": a, "seconds": s} for k, (a, s) in pts.items()]
    # c is dominated by b, d by a, f by e; e and h are equal (neither dominates the other)
    assert [p["name"] for p in pareto_front(points)] == ["e", "h", "b", "a", "g"]
    brute = [p for p in points if not any(q["accuracy"] >= p["accuracy"] and q["seconds"] <= p["seconds"] and
                                          (q["accuracy"], q["seconds"]) != (p["accuracy"], p["seconds"])
                                          for q in points)]
    assert sorted(p["name"] for p in brute) == sorted(p["name"] for p in pareto_front(points))


def test_search_settings_finds_the_analytic_optimum_within_budget_and_bounds():
    calls = []

    def evaluate(s):
        calls.append(s)
        return {"accuracy": 1 - (s.strength - 1.3) ** 2 - s.gate, "seconds": 0.01 * s.strength}

    out = search_settings(evaluate, weights=(0.0, 1.0), budget=24, seed=0)
    points = out["points"]
    assert len(calls) == len(points) and {p["weight"] for p in points} == {0.0, 1.0}
    assert all(0.0 <= p["strength"] <= 2.0 and 0.0 <= p["gate"] <= 0.5 for p in points)
    best = out["best"]["0.0"]
    assert best["strength"] == pytest.approx(1.3, abs=0.2) and best["gate"] < 0.1
    assert best["accuracy"] == max(p["accuracy"] for p in points if p["weight"] == 0.0)
    best1 = out["best"]["1.0"]
    assert best1["accuracy"] - best1["seconds"] == max(p["accuracy"] - p["seconds"] for p in points
                                                       if p["weight"] == 1.0)
    assert out["pareto"] == pareto_front(points)


@pytest.mark.parametrize("budget", [4, 6, 24])
def test_search_settings_evaluates_at_most_budget_settings_per_weight(budget):
    seen = []
    search_settings(lambda s: seen.append(s) or {"accuracy": 1 - (s.strength - 1.3) ** 2 - s.gate, "seconds": 0.1},
                    weights=(0.0,), budget=budget)  # a flat fitness would stop cma early: keep a slope
    assert 0 < len(seen) <= budget


# --- the phase ------------------------------------------------------------------------------------------------

def _report():
    #          q: 0  1  2  3  4  5  6
    route_ = [0, 0, 0, 1, 1, 1, 1]
    base = [1, 0, 0, 1, 1, 1, 1]
    e0 = [1, 1, 0, 0, 0, 1, 0]
    e1 = [0, 0, 1, 1, 0, 0, 0]
    routed = [1, 1, 0, 1, 0, 0, 0]  # e0 on q0..2, e1 on q3..6
    return {"k": 2, "expert_params": 123,
            "test": {"route": route_, "correct": {"base": base, "expert_0": e0, "expert_1": e1, "routed": routed}}}


def test_summarize_metrics_and_gate_from_a_report():
    from forgelib.phases.experts import Params, summarize
    from forgelib.stats import noninferior, proportion_bounds
    from forgelib.suite import GuardParams

    guard = GuardParams()
    metrics, checks = summarize(_report(), Params(), guard)
    assert metrics["n_experts"] == 2 and metrics["expert_params"] == 123
    assert metrics["acc_base"] == round(5 / 7, 4) and metrics["acc_routed"] == round(3 / 7, 4)
    # oracle: some expert answers q0, q1, q2, q3, q5 (not q4, q6)
    assert metrics["acc_oracle"] == round(5 / 7, 4)
    # among those five, the routed answer is right on q0, q1, q3 (q2 went to expert 0, q5 to expert 1: both wrong)
    assert metrics["routing_acc"] == 0.6
    assert metrics["acc_cluster0_base"] == round(1 / 3, 4) and metrics["acc_cluster0_expert"] == round(2 / 3, 4)
    assert metrics["acc_cluster1_base"] == 1.0 and metrics["acc_cluster1_expert"] == 0.25
    gate = {c.name: c for c in checks}
    assert set(gate) == {"expert0_minus_base_lower_bound", "expert1_minus_base_lower_bound", "routing_acc_lower_bound"}
    # each expert: paired non-inferiority to the base at ``margin`` on the questions routed to it
    v0 = noninferior("e0", [1, 0, 0], [1, 1, 0], 0.10, guard.confidence, guard.power)
    v1 = noninferior("e1", [1, 1, 1, 1], [0, 1, 0, 0], 0.10, guard.confidence, guard.power)
    first, second = gate["expert0_minus_base_lower_bound"], gate["expert1_minus_base_lower_bound"]
    assert first.value == v0.lower and first.bound == -0.10
    assert second.value == v1.lower and not second.passed
    # the routing accuracy's lower confidence bound (Wilson) against min_routing_acc: 3 of 5
    lower = proportion_bounds(3, 5, guard.confidence)[0]
    assert gate["routing_acc_lower_bound"].value == round(lower, 4) and not gate["routing_acc_lower_bound"].passed
    _, checks = summarize(_report(), Params(min_routing_acc=0.2), guard)
    assert {c.name: c for c in checks}["routing_acc_lower_bound"].passed


def test_make_check_strips_the_answer_prefix():
    from forgelib.data.base import Sample
    from forgelib.baking.library import make_check

    sample = Sample(prompt="3*4=", answer="12", family="arith", level=1)
    grader = make_check(["Answer:"])
    assert grader(sample, "3*4=12#Answer: 12")
    assert grader(sample, "3*4=12#12") and grader(sample, "12")
    assert not grader(sample, "3*4=12#Answer: 13")
    assert not make_check([])(sample, "3*4=12#Answer: 12")  # the prefix alone makes the difference


def test_params_errors_name_the_problem():
    from forgelib.phases.experts import Params

    with pytest.raises(ValueError, match=r"families: unknown \['nope'\]"):
        Params(families=["arith", "nope"])
    with pytest.raises(ValueError, match=r"unseen_family 'arith' is one of the experts' families"):
        Params(families=["arith", "algebra"], unseen_family="arith")
    with pytest.raises(ValueError, match=r"k_range .*got \(1, 3\)"):
        Params(k_range=(1, 3))
    Params(unseen_family=None, k_range=(2, 2))  # valid
