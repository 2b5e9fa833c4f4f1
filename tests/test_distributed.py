"""Data-parallel training through Accelerate: two real CPU processes (``accelerate launch``, gloo) against one.

The reference: with gradients averaged over processes that each hold a batch of the same number of tokens, one SGD
step equals the step of one process on the two batches joined (the mean of the two means is the mean over all).
"""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from forgelib import paths

WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], env_extra: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """``accelerate launch`` with 2 processes on this machine's CPU (the multi-GPU launcher; without GPUs each
    process's Accelerator takes the CPU and gloo)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=paths.repo_root())
    assert done.returncode == 0, \
        f"accelerate launch failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["forward", "parts"])
def test_two_processes_train_as_one_on_the_joined_batches(tmp_path, loss):
    sys.path.insert(0, str(WORKER.parent))
    try:
        from distributed_worker import LOSSES, fixed_batches, tiny_model
    finally:
        sys.path.pop(0)
    from forgelib.train import TrainConfig, train

    _launch([str(WORKER), str(tmp_path), loss])
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    logs = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [log["processes"] for log in logs] == [2, 2]
    for name in ranks[0]:  # the processes end with the same model
        assert torch.equal(ranks[0][name], ranks[1][name]), name

    batches = fixed_batches()  # process i took batches i, i + 2: step 1 = batches 0 and 1, step 2 = 2 and 3
    joined = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in (batches[:2], batches[2:])]
    model = tiny_model()
    history = train(model, iter(joined), torch.optim.SGD(model.parameters(), lr=0.5),
                    TrainConfig(steps=2, log_every=1), loss_fn=LOSSES[loss], quiet=True)
    reference = model.state_dict()
    changed = 0
    for name, value in ranks[0].items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(value, tiny_model().state_dict()[name])
    assert changed > 5  # the step really moved the weights
    assert logs[0]["losses"] == pytest.approx(history.losses, rel=1e-5)  # the logged loss: mean over processes
    assert logs[0]["tokens"] == history.tokens == 2 * 2 * 4 * 8  # every process's tokens counted


def test_each_process_draws_its_own_batches():
    from forgelib.data.stream import LengthBucketedBatches, TaskStream
    from forgelib.data.tokenizer import train_tokenizer
    from forgelib.data.tasks import build_mix, format_sample

    corpus = [format_sample(s, with_answer=True) for s in build_mix({"arith": 1}, (1, 2), 200, "train", 0)]
    tokenizer = train_tokenizer(corpus, vocab_size=300)

    def source():
        return LengthBucketedBatches(tokenizer, TaskStream({"arith": 1}, (1, 2), "train", 0), 8, 32, bucket=2)

    first = [next(source().shard(i, 2))["input_ids"] for i in range(2)]
    assert not torch.equal(first[0], first[1])
    again = source().shard(1, 2)
    assert torch.equal(next(again)["input_ids"], first[1])  # deterministic per process
    assert again.shard(1, 2) is again and again._shard == (1, 2)  # asked again: the stream goes on, not restarts
    assert torch.equal(next(source())["input_ids"], next(source().shard(0, 1))["input_ids"])  # alone: unchanged
    with pytest.raises(ValueError, match="shard index"):
        source().shard(2, 2)


def result_mix(folder: Path) -> dict:
    import yaml

    return yaml.safe_load((folder / "params.yaml").read_text())["cognate"]["trunk"]["mix"]


@pytest.mark.slow
def test_accelerate_launch_runs_a_phase_on_two_processes(tmp_path):
    """`forge phase cognate` under accelerate launch: one completed phase, written once, by the main process."""
    from forgelib.registry import ModelRegistry
    from forgelib.results import PhaseResult

    # a gate that any tiny run passes (each specialist vs the trunk on the few questions a 0.5 gain needs; the
    # trunk's families need not clear chance): this test is about the processes, not the models
    tiny = ["--set", "cognate.trunk.steps=30", "--set", "cognate.eval_per_family=4",
            "--set", "cognate.tokenizer_samples=300", "--set", "cognate.min_disagreement=0",
            "--set", "cognate.min_accuracy_gain=-0.5", "--set", "cognate.expected_gain=0.5",
            "--set", "cognate.min_above_chance=-1", "--set", "run.tracking=jsonl"]
    for stage in ("reasoning", "memory", "speed"):
        tiny += ["--set", f"cognate.{stage}.steps=6", "--set", f"cognate.{stage}.warmup_steps=2"]
    done = _launch(["-m", "forgelib.cli", "phase", "cognate", "--params", "parameters/smoke.yaml",
                    "--session", "dp2", *tiny], {"FORGE_OUTPUTS": str(tmp_path), "WANDB_MODE": "disabled"}, 400)
    folder = tmp_path / "dp2" / "01_cognate"
    result = PhaseResult.load(folder)
    assert result.ok and set(result.models) >= {"trunk", "reasoning", "memory", "speed"}
    assert result.suite and set(result.suite) == {f for f, w in result_mix(folder).items() if w > 0}
    report = json.loads((folder / "report.json").read_text())
    # the sizing rule (forgelib.phases.cognate.specialist_comparisons): at least the pilot (a quarter of what a 0.5
    # gain needs at the assumed discordance, spread over the specialist's families), at most the cap
    from forgelib.stats import questions_needed

    sized = {name: v["n"] for name, v in report["specialists_vs_trunk"].items()}
    assert set(sized) == {"reasoning", "memory", "speed"}
    power = yaml.safe_load((folder / "params.yaml").read_text())["cognate"]["power"]
    for name, fams in (("reasoning", 2), ("memory", 1), ("speed", 2)):
        pilot = math.ceil(math.ceil(questions_needed(0.5, 0.95, power, 0.08) / 4) / fams) * fams
        assert pilot <= sized[name] <= 2000 * fams, (name, sized)
    assert json.loads(done.stdout[done.stdout.index("{"):])["status"] == "ok"  # printed once, by the main process
    assert done.stdout.count('"session"') == 1
    assert not list(folder.glob(".rank-*"))  # the follower's scratch copy is gone
    registry = ModelRegistry(tmp_path / "registry.db")
    runs = registry.list_phase_runs("dp2")
    assert [r["status"] for r in runs] == ["completed"]  # one phase run: the follower wrote no rows
    assert len(registry.list_models(session_id="dp2")) == len(result.models)
    trunk_steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
                   if "trunk/loss" in line]
    assert len({row["step"] for row in trunk_steps}) == len(trunk_steps)  # logged once per step, not per process


def test_prefetched_batches_come_from_background_workers_in_turn():
    from forgelib.data.stream import LengthBucketedBatches, TaskStream
    from forgelib.data.tasks import build_mix, format_sample
    from forgelib.data.tokenizer import train_tokenizer

    corpus = [format_sample(s, with_answer=True) for s in build_mix({"arith": 1}, (1, 2), 200, "train", 0)]
    tokenizer = train_tokenizer(corpus, vocab_size=300)

    def source():
        return LengthBucketedBatches(tokenizer, TaskStream({"arith": 1}, (1, 2), "train", 0), 8, 32, bucket=2)

    first = source()
    run = first.prefetched(2)
    got = [next(run) for _ in range(6)]
    again = source().prefetched(2)
    assert all(torch.equal(a["input_ids"], next(again)["input_ids"]) for a in got)  # deterministic
    seen = {tuple(b["input_ids"].flatten().tolist()) for b in got}
    assert len(seen) == 6  # no two workers drew the same batches
    assert first.stats.samples == 6 * 8 and first.stats.real_tokens == sum(int(b["attention_mask"].sum()) for b in got)
    for batch in got:
        assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape[0] == 8


def test_training_with_data_workers(tiny_llama):
    """A streamed source with TrainConfig.data_workers: the loss goes down as without workers."""
    from forgelib.data.stream import LengthBucketedBatches, TaskStream
    from forgelib.data.tasks import build_mix, format_sample
    from forgelib.data.tokenizer import train_tokenizer
    from forgelib.train import TrainConfig, train
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = [format_sample(s, with_answer=True) for s in build_mix({"arith": 1}, (1, 1), 200, "train", 0)]
    tokenizer = train_tokenizer(corpus, vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64))
    source = LengthBucketedBatches(tokenizer, TaskStream({"arith": 1}, (1, 1), "train", 0), 16, 32, bucket=2)
    history = train(model, source, torch.optim.AdamW(model.parameters(), lr=3e-3),
                    TrainConfig(steps=60, log_every=10, data_workers=2), quiet=True)
    assert history.last_loss < 0.7 * history.first_loss
    assert source.stats.samples == 60 * 16  # counted as they arrived
