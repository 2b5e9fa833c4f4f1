"""The progress relay: one line at a time from a phase's metrics.jsonl to the terminal running the pipeline."""
import json
import time

from forgelib.progress import ProgressRelay, progress_line, timed


def _append(path, *records, tail=""):
    with path.open("a") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
        fh.write(tail)


def test_progress_line_shows_step_and_loss_like_numbers_only():
    line = progress_line("01_cognate", {"step": 1200, "time": 1.0, "trunk/loss": 0.41234, "trunk/grad_norm": 3.0,
                                        "trunk/lr_factor": 0.5}, 42.4)
    assert line == "[forge] 01_cognate: 42s  step 1200  trunk/loss=0.4123"
    # a summary record, logged without a step (seen as 'step None' after Phases 6 and 7)
    assert progress_line("06_baking", {"step": None, "acc_after": 0.57}, 60.2) == "[forge] 06_baking: 60s"


def test_relay_emits_the_newest_record_and_waits_for_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _append(path, {"step": 0, "params": 5})  # written before this run: not relayed
    lines = []
    relay = ProgressRelay(path, "01_cognate", lines.append, interval=3600)
    with relay:
        assert relay.poll() is None, "nothing new yet"
        _append(path, {"step": 10, "trunk/loss": 2.0}, {"step": 20, "trunk/loss": 1.5}, tail='{"step": 30, "tr')
        assert "step 20  trunk/loss=1.5" in relay.poll()
        assert relay.poll() is None, "the half-written line is not read yet"
        _append(path, tail='unk/loss": 1.25}\n')
        assert "step 30  trunk/loss=1.25" in relay.poll()
    assert len(lines) == 2 and all(line.startswith("[forge] 01_cognate: ") for line in lines)


def test_relay_thread_reports_while_the_phase_writes(tmp_path):
    path = tmp_path / "metrics.jsonl"  # does not exist yet when the relay starts
    lines = []
    with ProgressRelay(path, "02_evomerge", lines.append, interval=0.05):
        for step in range(3):
            _append(path, {"step": step, "evomerge/fitness": 0.5 + step})
            time.sleep(0.2)
    assert lines and "02_evomerge" in lines[-1] and "evomerge/fitness=2.5" in lines[-1]
    assert len(lines) <= 3, "at most one line per new batch of records"


def test_timed_records_the_blocks_seconds_under_its_key_and_nothing_when_it_raises(monkeypatch):
    import types

    import pytest

    from forgelib import progress

    clock = {"wall": iter([10.0, 12.3456, 0.0, 1.0]), "cpu": iter([1.0, 1.5, 2.0])}
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: next(clock["wall"]),
                                                                process_time=lambda: next(clock["cpu"])))
    timing = {"earlier_s": 1.0}
    with timed(timing, "train", cpu=True):
        pass
    assert timing == {"earlier_s": 1.0, "train_s": 2.35, "train_cpu_s": 0.5}
    assert list(timing) == ["earlier_s", "train_s", "train_cpu_s"]
    with pytest.raises(ValueError), timed(timing, "broken"):
        raise ValueError("stop")
    assert "broken_s" not in timing
