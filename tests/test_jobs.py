"""Independent jobs side by side (forgelib.jobs): the results are those of running them one after the other."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from forgelib.jobs import own_copy, resolve_workers, run_jobs

ROOT = Path(__file__).resolve().parents[1]


def test_results_come_in_job_order_and_jobs_overlap():
    started, seen = threading.Barrier(2, timeout=10), []

    def job(i):
        def run():
            started.wait()  # both jobs must be running at once, or this times out
            seen.append(i)
            return i * i
        return run

    assert run_jobs([job(3), job(4)], workers=2) == [9, 16]
    assert sorted(seen) == [3, 4]


def test_one_worker_runs_the_jobs_in_order_in_this_thread():
    threads = []
    out = run_jobs([lambda i=i: threads.append(threading.get_ident()) or i for i in range(3)], workers=1)
    assert out == [0, 1, 2] and set(threads) == {threading.get_ident()}


def test_a_failing_job_raises_after_the_others_finish():
    done = []

    def slow():
        time.sleep(0.2)
        done.append("slow")
        return 1

    def bad():
        raise ValueError("job 2 failed")

    with pytest.raises(ValueError, match="job 2 failed"):
        run_jobs([slow, bad], workers=2)
    assert done == ["slow"]


def test_workers_resolve_per_device(monkeypatch):
    assert resolve_workers(3, "cpu") == 3 and resolve_workers(1, "cuda") == 1
    assert resolve_workers(0, "cuda:0") == 1 and resolve_workers(0, "mps") == 1
    cores = len(os.sched_getaffinity(0))
    assert resolve_workers(0, "cpu") == min(2, cores)
    assert resolve_workers(0, "cpu", threads=cores) == 1  # jobs of several intra-op threads: no more than fit
    monkeypatch.setenv("WORLD_SIZE", "2")  # accelerate launch: collectives in one order in every process
    assert resolve_workers(0, "cpu") == 1 and resolve_workers(4, "cpu") == 1


def test_own_copy_gives_a_job_its_own_tokenizer_that_encodes_the_same():
    from tests.helpers import task_tokenizer

    tok = task_tokenizer()
    copied = own_copy(tok, 2)
    assert copied is not tok and copied._tokenizer is not tok._tokenizer
    assert copied(["12+34=", "sort 3,1,2="])["input_ids"] == tok(["12+34=", "sort 3,1,2="])["input_ids"]
    assert own_copy(tok, 1) is tok


def test_the_guard_asks_two_models_side_by_side_with_the_same_answers():
    from forgelib.suite import Asker, GuardParams, guard
    from tests.helpers import perturbed_copy, task_tokenizer, tiny_task_llama

    tok = task_tokenizer()
    before = tiny_task_llama(tok)
    after = perturbed_copy(before, 1, 0.5)
    params = GuardParams(margin=0.5, max_questions=24)
    suite = {"arith": (1, 1), "logic": (1, 1)}
    reports = [guard(Asker(before, tok, max_new_tokens=6), Asker(after, tok, max_new_tokens=6), suite, params, 0,
                     workers=w) for w in (1, 2)]
    assert reports[0].answers == reports[1].answers
    assert sum(len(a["after"]) for a in reports[0].answers.values()) > 0


def _phase1(outputs: Path, session: str, workers: int) -> Path:
    """A tiny real Phase 1 (trunk and three specialists) in a fresh process, with ``run.workers``."""
    tiny = ["--set", "cognate.trunk.steps=12", "--set", "cognate.eval_per_family=2",
            "--set", "cognate.tokenizer_samples=200", "--set", "cognate.min_disagreement=0",
            "--set", "cognate.min_accuracy_gain=-0.5", "--set", "cognate.expected_gain=0.5",
            "--set", "cognate.min_above_chance=-1", "--set", "run.tracking=jsonl", "--set", f"run.workers={workers}"]
    for stage in ("reasoning", "memory", "speed"):
        tiny += ["--set", f"cognate.{stage}.steps=10", "--set", f"cognate.{stage}.warmup_steps=2"]
    env = {**os.environ, "FORGE_OUTPUTS": str(outputs), "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "forgelib.cli", "phase", "cognate", "--params",
                           "parameters/smoke.yaml", "--session", session, *tiny], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return outputs / session / "01_cognate"


def _weights(folder: Path) -> dict[str, str]:
    return {p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((folder / "models").glob("*/model.safetensors"))}


def test_phase1_trains_its_specialists_side_by_side_to_the_same_weights_and_metrics(tmp_path):
    one, two = _phase1(tmp_path, "w1", 1), _phase1(tmp_path, "w2", 2)
    assert len(_weights(one)) == 4 and _weights(one) == _weights(two)
    reports = [json.loads((f / "report.json").read_text()) for f in (one, two)]
    assert reports[0]["models"] == reports[1]["models"]
    assert reports[0]["specialists_vs_trunk"] == reports[1]["specialists_vs_trunk"]

    def rows(folder):  # every metric the tracker got, by step (side by side they are sent after training)
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return sorted(json.dumps({k: v for k, v in r.items() if not k.endswith("seconds") and k not in (
            "time", "_timestamp", "_runtime") and "tokens_per_s" not in k}, sort_keys=True) for r in lines)

    assert rows(one) == rows(two)
    assert "reasoning/loss" in "".join(rows(two)) and "speed/padding_fraction" in "".join(rows(two))


def test_a_generations_batches_side_by_side_give_the_answers_of_one_after_the_other():
    """``side_by_side``: the batches of one generation started on the main thread go to two threads (the second
    with a copy of the model) and every answer is that of generating them in turn, with and without the calculator;
    inside a job, and for a model that draws random numbers when it answers, they stay in turn."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgelib import jobs
    from forgelib.data.tasks import build_mix, format_sample, generate
    from forgelib.data.tokenizer import train_tokenizer
    from forgelib.evaluate import generate_answers
    from forgelib.tools import generate_with_tools

    samples = [s for f in ("arith", "tool", "logic") for s in generate(f, 2, 12, seed=3)]
    tok = train_tokenizer([format_sample(s, with_steps=True) for s in build_mix({"arith": 1, "tool": 1, "logic": 1},
                                                                                (1, 2), 60)], vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)).eval()
    with torch.no_grad():  # tool tokens likely enough that some rows call the calculator and go another round
        model.lm_head.weight[tok.convert_tokens_to_ids("<|/tool|>")] += 0.5
    seen = set()  # (thread, model) of every forward
    model.register_forward_pre_hook(lambda module, args: seen.add((threading.get_ident(), id(module))))

    def both():
        texts = generate_answers(model, tok, samples, max_new_tokens=12, batch_size=5)
        traces = generate_with_tools(model, tok, samples, max_new_tokens=16, batch_size=5)
        return texts, [(t.text, t.calls, t.stop) for t in traces]

    alone = both()
    assert seen == {(threading.get_ident(), id(model))}
    with jobs.side_by_side(2):
        assert jobs.generation_workers() == 2
        assert both() == alone
        others = {(t, m) for t, m in seen if t != threading.get_ident()}
        assert others and all(m != id(model) for _, m in others)  # another thread, with its own copy
        # the calculator rounds of one generate_with_tools call share that copy: one per call, two calls here
        assert len({m for _, m in others}) == 2
        assert run_jobs([jobs.generation_workers, jobs.generation_workers], 2) == [1, 1]
    assert jobs.generation_workers() == 1
    assert any(t[1] for t in alone[1]) and len({t[0] for t in alone[1]}) > 1  # calls made, answers differ

    calls = []
    out = jobs.map_batches(lambda m, b: calls.append(threading.get_ident()) or b * 2, model, [1, 2, 3, 4, 5])
    assert out == [2, 4, 6, 8, 10] and set(calls) == {threading.get_ident()}  # outside side_by_side: in turn
    with jobs.side_by_side(2):
        calls.clear()
        assert jobs.map_batches(lambda m, b: calls.append(threading.get_ident()) or b * 2, model,
                                [1, 2, 3, 4, 5]) == [2, 4, 6, 8, 10]
        assert len(set(calls)) == 2
        twins: list = []
        first = jobs.map_batches(lambda m, b: id(m), model, [1, 2, 3], twins=twins)
        again = jobs.map_batches(lambda m, b: id(m), model, [1, 2, 3], twins=twins)
        assert first == again == [id(model), id(twins[0]), id(model)] and len(twins) == 1  # copied once
        assert jobs.map_batches(lambda m, b: threading.get_ident(), model, [1, 2, 3], in_turn=True) == [
            threading.get_ident()] * 3
        sampled = type("Thinker", (), {"qconfig": type("Q", (), {"inference_temperature": 0.7})(), "thinking": True})()
        calls.clear()
        jobs.map_batches(lambda m, b: calls.append(threading.get_ident()), sampled, [1, 2, 3])
        assert set(calls) == {threading.get_ident()} and jobs.draws_at_inference(sampled)
