"""`forge run --resume S` with new parameters is refused (exit 2, naming the way); `forge run --from S:PHASE`
reruns PHASE onwards in a new session with new parameters after S's completed phase PHASE-1, S untouched.

Through the CLI's ``main`` with the pipeline's own test phases (tests/pipeline_phases: 01_alpha, 02_beta), run
in this process (``--no-notebooks``).
"""
import json
import re

import pytest
import yaml

from forgelib import paths
from forgelib.cli import main
from forgelib.pipeline import RefusedError, run_pipeline
from forgelib.registry import ModelRegistry
from forgelib.results import PhaseResult
from helpers import completed_r1, outputs_of_test_phases, pipeline_outputs  # noqa: F401  (fixtures: done, outputs)
from pipeline_phases import ALL

PARAMS = "tests/params/pipeline.yaml"




def _snapshot(outputs, session):
    """Every file of the session (mtime and bytes) and every registry row of it."""
    folder = outputs / session
    files = {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
             for p in sorted(folder.rglob("*")) if p.is_file()}
    with ModelRegistry(outputs / "registry.db") as reg:
        rows = (reg.get_session(session), reg.list_models(session_id=session), reg.list_phase_runs(session),
                reg.list_handoffs(session))
    return files, rows


def _sessions(outputs):
    with ModelRegistry(outputs / "registry.db") as reg:
        return sorted(r["id"] for r in reg.list_sessions())


def _forge(capsys, *args):
    """``forge run ARGS --no-notebooks`` through the CLI's main: (exit status, stdout, stderr)."""
    code = main(["run", *args, "--no-notebooks"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_resume_with_set_or_other_params_is_refused_naming_from(done, capsys, tmp_path):
    before = _snapshot(done, "r1")
    code, _, err = _forge(capsys, "--resume", "r1", "--set", "beta.scale=2")
    assert code == 2
    assert err.startswith(f"forge: --resume continues session r1 with its stored parameters ({PARAMS} + no --set "
                          "values); the --set beta.scale=2 given would be ignored (beta.scale: 1.05 -> 2.0)"), err
    assert "To rerun from a phase with new parameters use: forge run --from r1:PHASE [--params P] " \
           "[--set k=v ...] [--session NEW]" in err
    other = tmp_path / "other.yaml"
    other.write_text("run:\n  seed: 3\n  tracking: jsonl\nalpha:\n  width: 16\nbeta:\n  scale: 3.0\n")
    code, _, err = _forge(capsys, "--resume", "r1", "--params", str(other))
    assert code == 2 and f"the --params {other} given would be ignored (beta.scale: 1.05 -> 3.0)" in err, err
    assert "forge run --from r1:PHASE" in err
    assert _snapshot(done, "r1") == before and _sessions(done) == ["r1"], "a refusal writes nothing"
    with pytest.raises(RefusedError, match="--resume continues session r1"):  # the Python API refuses too
        run_pipeline(session="r1", resume=True, overrides={"beta": {"scale": 2}}, specs=ALL, log=lambda m: None)


def test_resume_refusal_suggests_the_phase_to_rerun_from(outputs, capsys):
    """Beta failed in r3: the refusal's example reruns from 2 with the values given."""
    with pytest.raises(Exception, match="did not pass its gate"):
        run_pipeline(PARAMS, session="r3", overrides={"beta.fail_gate": True}, specs=ALL, log=lambda m: None,
                     notebooks=False)
    code, _, err = _forge(capsys, "--resume", "r3", "--set", "beta.fail_gate=false")
    assert code == 2 and f"({PARAMS} + --set beta.fail_gate=true)" in err
    assert "(beta.fail_gate: true -> false)" in err
    assert err.rstrip().endswith("e.g. forge run --from r3:2 --set beta.fail_gate=false"), err


def test_resume_with_the_same_parameters_continues(done, capsys, tmp_path):
    copy = tmp_path / "copy.yaml"
    copy.write_text((paths.resolve(PARAMS)).read_text())
    for extra in (["--params", PARAMS], ["--params", str(copy)], ["--set", "beta.scale=1.05"], []):
        code, out, err = _forge(capsys, "--resume", "r1", *extra)
        assert code == 0, (extra, err)
        assert re.search(r"01_alpha\s+skipped", out) and re.search(r"02_beta\s+skipped", out), out


def test_from_reruns_later_phases_with_new_values_and_leaves_the_session(done, capsys):
    before = _snapshot(done, "r1")
    code, out, err = _forge(capsys, "--from", "r1:2", "--set", "beta.scale=2", "--session", "r2")
    assert code == 0, err
    assert re.search(r"02_beta\s+completed", out) and "01_alpha" not in out.split("02_beta")[-1]
    assert "upstream 01_alpha taken from session r1" in out
    alpha = paths.relative(done / "r1" / "01_alpha")
    assert not (done / "r2" / "01_alpha").exists(), "the earlier phases stay session r1's"
    params = yaml.safe_load((done / "r2" / "02_beta" / "params.yaml").read_text())
    assert params["beta"]["scale"] == 2 and params["overrides"] == {"beta.scale": 2}
    result = json.loads((done / "r2" / "02_beta" / "result.json").read_text())
    assert result["metrics"]["scale"] == 2 and result["status"] == "ok"
    assert result["upstream"] == {"session": "r1", "phase": "alpha", "folder": alpha}
    with ModelRegistry(done / "registry.db") as reg:
        row = reg.get_session("r2")
        assert row["status"] == "completed"
        assert row["config"]["from"] == {"session": "r1", "phase": "beta"}
        assert row["config"]["phases"] == ["beta"]
    assert _snapshot(done, "r1") == before, "session r1's files and registry rows are untouched"
    code, out, err = _forge(capsys, "--resume", "r2")  # the new session resumes after r1's phase again
    assert code == 0 and re.search(r"02_beta\s+skipped", out), err
    assert "upstream 01_alpha taken from session r1" in out
    assert _snapshot(done, "r1") == before


def test_from_by_name_derives_the_new_session_name(done, capsys):
    code, out, err = _forge(capsys, "--from", "r1:beta", "--set", "beta.scale=3")
    assert code == 0, err
    (name,) = [s for s in _sessions(done) if s != "r1"]
    assert re.fullmatch(r"r1-from2-\d{8}-\d{6}", name), name
    beta = PhaseResult.load(done / name / "02_beta")
    assert beta.metrics["scale"] == 3 and beta.upstream["session"] == "r1"


def test_from_refusals_are_clear_and_write_nothing(done, capsys):
    with pytest.raises(Exception, match="phase 01_alpha of session .* did not pass its gate"):  # u5: its Phase 1 failed
        run_pipeline(PARAMS, session="u5", overrides={"alpha.min_params": 10**9}, specs=ALL, log=lambda m: None,
                     notebooks=False)
    # SQLite's -wal/-shm files come and go with the registry's connections: the folders and files that stay
    entries = lambda: sorted(p for p in done.iterdir() if not p.name.endswith(("-wal", "-shm")))  # noqa: E731
    sessions, before = _sessions(done), entries()
    cases = {
        ("--from", "r1:1"): "01_alpha is the first phase, so nothing of session r1 would be reused; that is a new "
                            "run: forge run",
        ("--from", "r1:alpha"): "that is a new run",
        ("--from", "u5:2"): "session u5 has no completed 01_alpha",
        ("--from", "ghost:2"): "unknown session 'ghost'",
        ("--from", "r1:gamma"): "unknown phase 'gamma'",
        ("--from", "r1:2", "--session", "r1"): "session 'r1' already exists",
        ("--from", "r1:2", "--phases", "1-2"): "the selection must begin at 02_beta",
    }
    for args, message in cases.items():
        code, _, err = _forge(capsys, *args)
        assert code == 2 and message in err, (args, err)
    assert _sessions(done) == sessions and entries() == before, "a refused --from creates no session"
    for args, message in ((["--from", "r1"], "--from expects SESSION:PHASE"),
                          (["--resume", "r1", "--from", "r1:2"], "not allowed with argument --resume")):
        with pytest.raises(SystemExit) as exit_info:  # argparse: a malformed or conflicting request
            main(["run", *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
