"""Help when a gate fails (the message names the checks and the ways on; ``--gates warn`` continues for exploration)
and a truthful registry (failed attempts retired, rows follow a folder moved aside, a status column added in place,
lineage across ``--from`` sessions, ``forge registry list`` shows the status).

Through the CLI's ``main`` with the pipeline's own test phases (tests/pipeline_phases: 01_alpha, 02_beta), run in
this process (``--no-notebooks``).
"""
import json
import re
import shlex
import sqlite3

import pytest

from forgelib.cli import main
from forgelib.registry import ModelRegistry
from forgelib.results import PhaseResult
from helpers import pipeline_outputs  # noqa: F401  (fixture)
from pipeline_phases import ALL

PARAMS = "tests/params/pipeline.yaml"


@pytest.fixture
def outputs(pipeline_outputs, monkeypatch):
    """Fresh outputs; the CLI's pipeline (and the scorecard's chain) use the test phases instead of the product's."""
    monkeypatch.setattr("forgelib.pipeline.PHASES", ALL)
    monkeypatch.setattr("forgelib.phases.PHASES", ALL)
    return pipeline_outputs


def _forge(capsys, *args):
    """``forge ARGS`` through the CLI's main: (exit status, stdout, stderr)."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _run(capsys, *args):
    return _forge(capsys, "run", "--params", PARAMS, *args, "--no-notebooks")


def _models(outputs, session, phase=None):
    with ModelRegistry(outputs / "registry.db") as reg:
        return reg.list_models(session_id=session, phase_name=phase)


def test_failed_gate_names_the_check_its_numbers_and_the_ways_on(outputs, capsys):
    code, _, err = _run(capsys, "--session", "g1", "--set", "beta.fail_gate=true")
    assert code == 1
    message = err.strip()
    assert "\n" not in message, "one paragraph"
    assert message.startswith("forge: phase 02_beta of session g1 did not "
                              "pass its gate: gate_ok = 0 (needs >= 1) (every check with its value and bound is in "
                              f"{outputs}/g1/02_beta/result.json)"), message
    assert message.endswith("(the phase's models are then registered as gate-failed and the chain goes on)")
    assert ("Ways on: rerun from this phase with changed parameters, `forge run --from g1:2 --set beta.KEY=VALUE` "
            "(a new session after g1's completed 01_alpha, which is kept); or, to explore, continue with gates "
            "reported but not enforced, `forge run --from g1:2 --gates warn`") in message
    stored = PhaseResult.load(outputs / "g1" / "02_beta")
    assert stored.status == "failed" and "forge run --from g1:2 --gates warn" in stored.error
    # the failed attempt's model is retired with the reason, the good upstream stays active
    (beta,) = _models(outputs, "g1", "beta")
    assert beta["status"] == "retired" and beta["retired_at"]
    assert beta["retired_reason"].endswith("of 02_beta, and its gate failed")
    assert [m["status"] for m in _models(outputs, "g1", "alpha")] == ["active"]
    # way (a): rerun from the gate-failed phase with changed parameters
    code, out, err = _run(capsys, "--from", "g1:2", "--set", "beta.fail_gate=false", "--session", "g2")
    assert code == 0, err
    assert PhaseResult.load(outputs / "g2" / "02_beta").gate_passed


def test_failed_phase_one_points_at_a_new_run_with_the_sessions_parameters(outputs, capsys):
    code, _, err = _run(capsys, "--session", "p1", "--set", "alpha.min_params=1000000000", "--set", "beta.scale=1.5")
    assert code == 1
    assert "did not pass its gate: params = 3632 (needs >= 1e+09)" in err, err
    given = f"--params {PARAMS} --set alpha.min_params=1000000000 --set beta.scale=1.5"
    assert f"`forge run {given} --set alpha.KEY=VALUE`" in err and f"`forge run {given} --gates warn`" in err
    # the way on works as printed: the same parameter file and values, gates reported
    (warn,) = [c for c in re.findall(r"`([^`]*)`", err) if c.endswith("--gates warn")]
    code, out, err = _forge(capsys, *shlex.split(warn)[1:], "--session", "p2", "--no-notebooks")
    assert code == 0, err
    assert "[forge] WARNING 01_alpha: GATE FAILED, not enforced (run.gates: warn): params = 3632" in out
    assert PhaseResult.load(outputs / "p2" / "02_beta").metrics["scale"] == 1.5


def test_the_ways_on_quote_values_so_that_the_shell_and_set_read_them_back():
    from forgelib.cli import _parse_set
    from forgelib.params import set_arguments

    overrides = {"a": {"b": [1, 2]}, "c.d": "x y", "e": "true", "f": 0.5}
    command = shlex.join(["forge", "run", *set_arguments(overrides)])
    assert command.startswith("forge run --set 'a.b=[1, 2]' --set 'c.d=x y' --set ")
    assert _parse_set(shlex.split(command)[3::2]) == {"a.b": [1, 2], "c.d": "x y", "e": "true", "f": 0.5}


def test_gates_warn_reports_loudly_marks_gate_failed_and_goes_on(outputs, capsys):
    code, out, err = _run(capsys, "--session", "w1", "--gates", "warn", "--set", "alpha.min_params=1000000000")
    assert code == 0, err
    assert "[forge] WARNING 01_alpha: GATE FAILED, not enforced (run.gates: warn): params = " in out
    assert "its models are registered as gate-failed and the chain goes on" in out
    assert "GATE FAILED, not enforced (run.gates: warn), in 01_alpha" in out
    table = out[out.index("phase "):]
    assert "01_alpha" in table and "FAIL (warn)" in table and "02_beta" in table
    alpha = json.loads((outputs / "w1" / "01_alpha" / "result.json").read_text())
    assert alpha["gate_failed"] is True and alpha["status"] == "ok"
    assert alpha["failed_checks"] and alpha["failed_checks"][0].startswith("params = ")
    beta = PhaseResult.load(outputs / "w1" / "02_beta")
    assert beta.ok and beta.upstream["phase"] == "alpha", "the chain went on from the gate-failed model"
    (row,) = _models(outputs, "w1", "alpha")
    assert row["status"] == "gate-failed" and row["metadata"]["gate_failed"] is True and not row["retired_at"]
    assert _models(outputs, "w1", "beta")[0]["status"] == "active"
    with ModelRegistry(outputs / "registry.db") as reg:
        assert reg.get_session("w1")["status"] == "completed"
        assert reg.get_session("w1")["config"]["overrides"]["run.gates"] == "warn"
    # the scorecard's chain marks the gate-failed model
    from forgelib.scorecard import chain_models, gate_failed_note

    entries = chain_models(outputs / "w1" / "02_beta")
    assert [(e["phase"], e["gate_failed"]) for e in entries] == [("alpha", True), ("beta", False)]
    assert gate_failed_note(entries).startswith("GATE FAILED, not enforced (run.gates: warn), in phase(s) 1 alpha")
    # a gate-failed run of another session is never picked as an upstream by default
    from forgelib.phases.base import latest_completed

    assert latest_completed(ALL, 1) is None and latest_completed(ALL, 1, "w1") is not None


def test_run_gates_is_validated_like_the_other_run_parameters(outputs, capsys):
    code, _, err = _run(capsys, "--set", "run.gates=maybe")
    assert code == 2
    assert "run.gates" in err and "'maybe' is not one of ['enforce', 'warn']" in err, err
    assert not (outputs / "registry.db").exists(), "refused before anything was written"


def test_a_moved_aside_attempt_keeps_its_rows_pointing_at_the_moved_folder(outputs, capsys, monkeypatch):
    import pipeline_phases.beta as beta

    real = beta.run

    def crash_after_saving(params, ctx):
        real(params, ctx)
        raise RuntimeError("killed after saving")

    monkeypatch.setattr(beta, "run", crash_after_saving)
    code, _, err = _run(capsys, "--session", "m1")
    assert code == 1 and "killed after saving" in err
    monkeypatch.setattr(beta, "run", real)
    code, out, err = _forge(capsys, "run", "--resume", "m1", "--no-notebooks")
    assert code == 0, err
    (moved,) = [p for p in (outputs / "m1").iterdir() if p.name.startswith("02_beta.incomplete-")]
    first, second = _models(outputs, "m1", "beta")
    assert first["model_path"] == str(moved / "models" / "model"), "the row follows its folder"
    assert first["status"] == "retired" and first["retired_reason"].endswith("of 02_beta, and it failed (RuntimeError)")
    assert second["model_path"] == str(outputs / "m1" / "02_beta" / "models" / "model")
    assert second["status"] == "active" and not second["retired_at"]
    with ModelRegistry(outputs / "registry.db") as reg:
        assert reg.verify_model(second["id"])


def test_an_interrupted_attempt_moved_aside_is_retired_there(outputs, capsys, monkeypatch):
    import pipeline_phases.beta as beta

    real = beta.run

    def killed_after_saving(params, ctx):
        real(params, ctx)
        raise KeyboardInterrupt  # with _fail recording nothing: as a process killed here leaves it

    monkeypatch.setattr(beta, "run", killed_after_saving)
    import forgelib.phases.lifecycle as lifecycle

    fail = lifecycle._fail
    monkeypatch.setattr(lifecycle, "_fail", lambda *a: None)
    with pytest.raises(KeyboardInterrupt):
        _run(capsys, "--session", "i1")
    monkeypatch.setattr(beta, "run", real)
    monkeypatch.setattr(lifecycle, "_fail", fail)
    code, out, err = _forge(capsys, "run", "--resume", "i1", "--no-notebooks")
    assert code == 0, err
    (moved,) = [p for p in (outputs / "i1").iterdir() if p.name.startswith("02_beta.incomplete-")]
    first, second = _models(outputs, "i1", "beta")
    assert first["model_path"] == str(moved / "models" / "model") and first["status"] == "retired"
    assert first["retired_reason"].endswith("which was interrupted")
    assert second["model_path"] == str(outputs / "i1" / "02_beta" / "models" / "model") and not second["retired_at"]


OLD_SCHEMA = """
CREATE TABLE sessions (
    id TEXT PRIMARY KEY, config TEXT NOT NULL, status TEXT NOT NULL, current_phase TEXT,
    progress REAL NOT NULL DEFAULT 0.0, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE phase_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    phase_name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'interrupted')),
    started_at TEXT NOT NULL, finished_at TEXT, duration_s REAL, metrics TEXT, error TEXT);
CREATE TABLE models (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    phase_name TEXT NOT NULL, model_name TEXT NOT NULL, model_path TEXT NOT NULL,
    sha256 TEXT NOT NULL, size_mb REAL NOT NULL, parameter_count INTEGER, metadata TEXT NOT NULL,
    created_at TEXT NOT NULL, retired_at TEXT, retired_reason TEXT);
CREATE TABLE handoffs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    source_phase TEXT NOT NULL, source_model_id INTEGER, target_phase TEXT NOT NULL,
    ok INTEGER NOT NULL, validation TEXT NOT NULL, created_at TEXT NOT NULL);
"""
"""The registry schema before the models' status column (forgelib/registry.py until this change)."""


def _old_registry(path):
    conn = sqlite3.connect(path)
    conn.executescript(OLD_SCHEMA)
    now = "2026-12-01T00:00:00.000000+00:00"
    conn.execute("INSERT INTO sessions VALUES ('old', '{}', 'failed', 'beta', 0.5, ?, ?)", (now, now))
    for name, retired, reason in (("model", None, None), ("model", now, "registered by phase run 2, which was "
                                                                         "interrupted")):
        conn.execute("INSERT INTO models (session_id, phase_name, model_name, model_path, sha256, size_mb, "
                     "metadata, created_at, retired_at, retired_reason) VALUES ('old', 'beta', ?, '/x', 'ab', 0.1, "
                     "'{}', ?, ?, ?)", (name, now, retired, reason))
    conn.commit()
    conn.close()


def test_an_old_registry_gains_the_status_column_in_place(outputs, capsys):
    from forgelib.registry import model_status_text

    outputs.mkdir(parents=True)
    db = outputs / "registry.db"
    _old_registry(db)
    for _ in range(2):  # the upgrade happens once, and opening again changes nothing
        with ModelRegistry(db) as reg:
            rows = reg.list_models(session_id="old")
            assert [r["status"] for r in rows] == ["active", "retired"]
            assert [model_status_text(r) for r in rows] == [
                "active", "retired: registered by phase run 2, which was interrupted"]
            reg.set_model_status([rows[0]["id"]], "gate-failed", metadata={"gate_failed": True})
            assert reg.get_model(rows[0]["id"])["status"] == "gate-failed"
            reg.set_model_status([rows[0]["id"]], "active")
    code, out, err = _forge(capsys, "registry", "list")
    assert code == 0, err
    header, *lines = out.splitlines()
    assert header.split("\t")[4] == "status"
    assert [line.split("\t")[4] for line in lines] == [
        "active", "retired: registered by phase run 2, which was interrupted"]


def test_registry_list_shows_each_models_status(outputs, capsys):
    _run(capsys, "--session", "s1", "--set", "beta.fail_gate=true")
    _run(capsys, "--session", "s2", "--gates", "warn", "--set", "beta.fail_gate=true")
    code, out, err = _forge(capsys, "registry", "list")
    assert code == 0, err
    header, *lines = out.splitlines()
    keys = header.split("\t")
    rows = {(r["session_id"], r["phase_name"]): r["status"] for r in (dict(zip(keys, line.split("\t")))
                                                                      for line in lines)}
    assert rows[("s1", "alpha")] == "active" and rows[("s2", "alpha")] == "active"
    assert rows[("s1", "beta")].startswith("retired: registered by phase run ")
    assert rows[("s1", "beta")].endswith("of 02_beta, and its gate failed")
    assert rows[("s2", "beta")] == "gate-failed"


def test_lineage_follows_handoffs_across_sessions_to_the_trunk(outputs, capsys):
    from forgelib.viz.inspect import model_lineage

    assert _run(capsys, "--session", "l1")[0] == 0
    code, _, err = _run(capsys, "--from", "l1:2", "--set", "beta.scale=2", "--session", "l2")
    assert code == 0, err
    (beta,) = _models(outputs, "l2", "beta")
    (alpha,) = _models(outputs, "l1", "alpha")
    with ModelRegistry(outputs / "registry.db") as reg:
        chain = model_lineage(beta["id"], reg)
    assert [(c["id"], c["phase"]) for c in chain] == [(beta["id"], "beta"), (alpha["id"], "alpha")]


def test_scorecard_takes_the_completed_part_of_a_chain(outputs, capsys):
    from forgelib.scorecard import latest_session, partial_note, session_models

    with pytest.raises(FileNotFoundError, match="has a completed phase .every one failed or none ran.: fix the "
                                                "first phase's gate"):
        latest_session()
    _run(capsys, "--session", "c1", "--set", "beta.fail_gate=true")
    capsys.readouterr()
    assert latest_session() == "c1"
    assert "no session has a completed 02_beta; taking the newest session with a completed phase, c1 (a partial " \
           "scorecard)" in capsys.readouterr().out
    entries = session_models("c1")
    assert [e["phase"] for e in entries] == ["alpha"]
    assert partial_note(entries) == ("partial: the chain ends at phase 1 (alpha), the last one completed; phases 2-2 "
                                     "are not in this scorecard")
    _run(capsys, "--session", "c2")
    assert latest_session() == "c2" and partial_note(session_models("c2")) == ""


@pytest.mark.parametrize("field, value, named", [("gate_failed", "yes", "'gate_failed' must be true or false"),
                                                  ("failed_checks", "x" * 500, "'failed_checks' must be a list")])
def test_a_result_json_with_a_malformed_gate_failed_record_is_named(tmp_path, field, value, named):
    result = PhaseResult(phase="beta", number=2, session="x", status="ok").to_dict()
    result[field] = value
    (tmp_path / "result.json").write_text(json.dumps(result))
    with pytest.raises(ValueError, match=named) as caught:
        PhaseResult.load(tmp_path)
    assert str(tmp_path / "result.json") in str(caught.value) and len(str(caught.value)) < 400
