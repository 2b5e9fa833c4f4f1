"""Phase 5 on tiny real models: the self-model head's loss against a hand computation, the head never handed
on, a run interrupted after two rounds that resumes to the same state as an uninterrupted one, the gate."""
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


def test_gate_reads_the_report():
    report = {"level_reached": {"arith": 2, "tool": 1},
              "acc_by_level": {"before": {"arith": {1: 0.8, 2: 0.2}, "tool": {1: 0.0}},
                               "after": {"arith": {1: 0.75, 2: 0.5}, "tool": {1: 0.6}}},
              "correct_by_level": {"before": {"arith": {1: [1, 1, 1, 0]}}, "after": {"arith": {1: [1, 1, 0, 1]}}},
              "tool": {"with": {"accuracy": 0.6, "tool_success_rate": 1.0}, "without": {"accuracy": 0.0}}}
    metrics, checks = summarize(report, Params(band=(0.4, 0.9)))
    gate = {c.name: c for c in checks}
    assert metrics["level_reached_arith"] == 2 and metrics["acc_reached_arith"] == 0.5
    assert gate["acc_at_level_reached_arith"].passed and gate["acc_at_level_reached_tool"].passed
    assert gate["acc_earlier_minus_before"].value == pytest.approx(-0.05)
    assert gate["acc_earlier_minus_before"].passed  # within 0.05 + 1.645 paired SEs
    assert gate["tool_acc_with_minus_without"].passed
    report["tool"]["with"]["accuracy"] = 0.0
    _, checks = summarize(report, Params(band=(0.4, 0.9)))
    assert not {c.name: c for c in checks}["tool_acc_with_minus_without"].passed


def _upstream(tok, tmp_path):
    """A Phase-4-like upstream: a Quiet-STaR Llama with ternary layers, packed."""
    return quietstar_upstream(tok, tmp_path / "ternary", "bitnet", 4, "cur", packing="base3")


TINY = {"families": ["arith", "tool"], "max_level": 2, "assess_per_level": 2, "rounds": 3, "ask_per_family": 3,
        "pool_size": 4, "steps_per_round": 2, "fresh_per_round": 4, "batch_size": 4, "dream_per_round": 2,
        "max_new_tokens": 12, "test_per_level": 2, "tool_test": 2, "band": [0.0, 1.0]}


def _run(session, up, extra=None):
    from forgelib.phases import open_phase

    overrides = {"run": {"quiet": True, "tracking": "jsonl"}, "curriculum": {**TINY, **(extra or {})}}
    ctx = open_phase("curriculum", "parameters/smoke.yaml", overrides, session=session, upstream=up)
    return ctx, ctx.spec.load().run(ctx.params, ctx)


def test_interrupted_run_resumes_to_the_uninterrupted_state(tok, tmp_path, monkeypatch):
    from forgelib.phases import curriculum as phase
    from forgelib.thoughts import load_quietstar

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
    monkeypatch.setattr(phase, "run_round", real_round)
    cut_dir = tmp_path / "out" / "cut" / "05_curriculum"
    assert json.loads((cut_dir / "state" / "state.json").read_text())["round"] == 2
    resumed_ctx, resumed = _run("resumed", up, {"resume_from": str(cut_dir)})
    a = json.loads((full_ctx.dir / "report.json").read_text())
    b = json.loads((resumed_ctx.dir / "report.json").read_text())
    assert a["history"] == b["history"] and a["question_pool"] == b["question_pool"]
    ma = load_quietstar(paths.resolve(full.models["model"]["path"]))
    mb = load_quietstar(paths.resolve(resumed.models["model"]["path"]))
    for (name, p), (_, q) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(p, q), name
    # the self-model head is not part of the handed-on model
    assert set(ma.state_dict()) == set(load_quietstar(up.models["model"]["path"], trainable=True).state_dict())
    assert full.metrics["level_reached_arith"] in (1, 2) and "tool_acc_with" in full.metrics


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
