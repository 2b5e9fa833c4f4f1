"""Trackers: JSONL always written; a real W&B offline run lands under the phase folder; null discards."""
import json

from forgelib.results import GateCheck, PhaseResult
from forgelib.tracking import JsonlTracker, NullTracker, make_tracker, read_jsonl


def test_jsonl_rows_and_non_finite_values(tmp_path):
    with JsonlTracker(tmp_path / "m.jsonl") as t:
        t.log({"loss": 1.5}, step=1)
        t.log({"loss": float("nan")}, step=2)
    rows = read_jsonl(tmp_path / "m.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == 1.5 and rows[1]["loss"] == "nan"


def test_none_mode_writes_nothing(tmp_path):
    t = make_tracker("none", tmp_path)
    t.log({"a": 1}, 0)
    t.finish()
    assert not list(tmp_path.iterdir())
    NullTracker().log({"a": 1})


def test_wandb_offline_run_is_written_inside_phase_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = make_tracker("wandb", tmp_path, name="unit", config={"x": 1}, wandb_mode="offline")
    t.log({"loss": 2.0}, step=0)
    t.summary({"acc": 0.5})
    t.finish()
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs, "an offline run folder exists"
    assert list(runs[0].glob("*.wandb")), "the run's data file was written"
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"] == 2.0


def test_phase_result_round_trip_and_gate(tmp_path):
    r = PhaseResult("p", 1, "s", metrics={"acc": 0.5}, gate=[GateCheck("acc", 0.5, 0.4), GateCheck("nan",
                                                                                                   float("nan"), 0)])
    assert not r.gate_passed and r.gate_failures() == ["nan = nan (needs >= 0)"]
    r.save(tmp_path)
    back = PhaseResult.load(tmp_path)
    assert back.gate[0].passed and not back.gate[1].passed and back.metrics == {"acc": 0.5}
    assert json.loads((tmp_path / "result.json").read_text())["gate_passed"] is False


def test_wandb_prints_one_plain_line_and_no_banner(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    monkeypatch.delenv("WANDB_NOTEBOOK_NAME", raising=False)
    notebook = tmp_path / "01_x.ipynb"
    notebook.write_text("{}")
    t = make_tracker("wandb", tmp_path, name="unit", wandb_mode="offline", notebook=notebook)
    t.log({"loss": 1.0}, step=0)
    t.finish()
    out, err = capfd.readouterr()
    assert "wandb:" not in err and "wandb:" not in out, "W&B's banners are silenced"
    lines = [line for line in out.splitlines() if "W&B" in line]
    run = next(tmp_path.rglob("offline-run-*"))
    assert len(lines) == 1 and f"wandb sync {run}" in lines[0]
    import os

    assert os.environ["WANDB_NOTEBOOK_NAME"] == str(notebook.resolve()), "W&B need not ask Jupyter for the name"
