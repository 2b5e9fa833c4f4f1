"""The shared training loop: it learns, stops on NaN with a clear error, checkpoints atomically and
refuses a checkpoint of another architecture."""

import pytest
import torch

from forgelib.models import CognateConfig, CognateForCausalLM
from forgelib.train import CheckpointMismatchError, TrainConfig, load_checkpoint, save_checkpoint, train
from forgelib.utils import TrainingIssueError


def _batches(vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    pattern = torch.arange(16) % 8 + 3  # a repeating sequence: learnable in a few steps
    while True:
        offset = int(torch.randint(0, 8, (1,), generator=g))
        ids = torch.stack([pattern.roll(offset)] * 8)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _model(**overrides):
    torch.manual_seed(0)
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    return CognateForCausalLM(CognateConfig(**{**shape, **overrides}))


def test_loss_falls_and_metrics_are_logged():
    model = _model()
    history = train(model, _batches(), torch.optim.AdamW(model.parameters(), 3e-3), TrainConfig(steps=40, log_every=10),
                    quiet=True)
    assert len(history.losses) == 40 and history.last_loss < 0.5 * history.first_loss
    assert [r["step"] for r in history.rows] == [10, 20, 30, 40] and history.tokens == 40 * 8 * 16


def test_a_quiet_run_with_a_heartbeat_prints_its_progress(capsys):
    """Jobs trained side by side have no bar: ``heartbeat_s`` prints ``desc: step N/M, loss L, T s`` lines instead
    (here every step); without it a quiet run prints nothing."""
    model = _model()
    train(model, _batches(), torch.optim.AdamW(model.parameters(), 3e-3), TrainConfig(steps=3), quiet=True,
          desc="memory")
    assert capsys.readouterr().out == ""
    history = train(model, _batches(), torch.optim.AdamW(model.parameters(), 3e-3), TrainConfig(steps=3), quiet=True,
                    desc="memory", heartbeat_s=1e-9)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"  memory: step {n}/3" for n in (1, 2, 3)]
    assert lines[-1].split(",")[1] == f" loss {history.losses[-1]:.3f}"


def test_nan_loss_stops_with_the_step():
    model = _model()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(TrainingIssueError, match="non-finite loss .* at step 1"):
        train(model, _batches(), torch.optim.AdamW(model.parameters()), TrainConfig(steps=5), quiet=True)


def test_checkpoint_round_trip_and_architecture_mismatch(tmp_path, tiny_llama):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    train(model, _batches(), opt, TrainConfig(steps=3), quiet=True)
    path = save_checkpoint(model, opt, 3, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"], "no temporary folder left behind"
    fresh = _model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), 1e-3)
    assert load_checkpoint(fresh, fresh_opt, path) == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert fresh_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    with pytest.raises(CheckpointMismatchError, match="is a 'cognate' model, but the model being trained is 'llama'"):
        load_checkpoint(tiny_llama, None, path)
    with pytest.raises(CheckpointMismatchError, match="does not fit the model"):
        load_checkpoint(_model(hidden_size=64), None, path)
