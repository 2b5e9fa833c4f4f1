"""The `forge` command as a user runs it: registry listing, cleanup (dry run and real), errors."""
import json
import subprocess
import sys

import pytest

from forgelib.registry import ModelRegistry


def forge(*args, env=None):
    return subprocess.run([sys.executable, "-m", "forgelib.cli", *args], capture_output=True, text=True, env=env)


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    out = tmp_path / "outputs"
    monkeypatch.setenv("FORGE_OUTPUTS", str(out))
    with ModelRegistry(out / "registry.db") as reg:
        for i, session in enumerate(("old", "mid", "new")):
            folder = out / session / "01_x" / "models" / "m"
            folder.mkdir(parents=True)
            (folder / "weights.bin").write_bytes(bytes([i]) * 10)
            reg.create_session(session, {"i": i})
            reg.register_model(session_id=session, phase_name="x", model_name="m", model_path=str(folder))
    return out


def test_registry_list_and_sessions(outputs):
    listing = forge("registry", "list", "--json")
    assert listing.returncode == 0
    assert {m["session_id"] for m in json.loads(listing.stdout)} == {"old", "mid", "new"}
    sessions = forge("registry", "sessions")
    assert sessions.returncode == 0 and "new" in sessions.stdout


def test_clean_keeps_newest_and_deletes_rows_and_files_together(outputs):
    dry = forge("clean", "--keep", "1", "--dry-run")
    assert dry.returncode == 0 and (outputs / "old").exists()
    done = forge("clean", "--keep", "1")
    assert done.returncode == 0, done.stderr
    assert not (outputs / "old" / "01_x" / "models" / "m").exists()
    assert (outputs / "new" / "01_x" / "models" / "m" / "weights.bin").exists()
    with ModelRegistry(outputs / "registry.db") as reg:
        assert [m["session_id"] for m in reg.list_models()] == ["new"]


def test_clean_without_a_policy_and_unknown_benchmark_are_refused(outputs):
    assert forge("clean").returncode == 2
    bench = forge("bench", "nope")
    assert bench.returncode == 2 and "valid:" in bench.stderr


def test_resume_of_unknown_session_exits_with_message(outputs):
    proc = forge("run", "--resume", "ghost")
    assert proc.returncode == 1 and "unknown session 'ghost'" in proc.stderr
    assert "forge registry sessions" in proc.stderr


def test_typo_in_override_is_reported(outputs):
    proc = forge("run", "--set", "cognate.trunk.stpes=3")
    assert proc.returncode == 2 and "stpes" in proc.stderr and "allowed keys" in proc.stderr


def _one_line_error(proc) -> str:
    """The CLI's error: no traceback, a non-zero exit, the message on the last stderr line."""
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_clean_refuses_a_negative_keep(outputs):
    message = _one_line_error(forge("clean", "--keep", "-1"))
    assert "--keep" in message and ">= 0" in message and "-1" in message
    assert _one_line_error(forge("clean", "--max-age-days", "-2")).count("--max-age-days") == 1
    assert (outputs / "old" / "01_x" / "models" / "m" / "weights.bin").exists()


@pytest.mark.parametrize("command", [("registry", "sessions"), ("clean", "--keep", "1"), ("run", "--phases", "1")])
def test_corrupt_registry_is_named_not_a_traceback(tmp_path, monkeypatch, command):
    out = tmp_path / "outputs"
    out.mkdir()
    garbage = bytes(range(256)) * 16
    (out / "registry.db").write_bytes(garbage)
    monkeypatch.setenv("FORGE_OUTPUTS", str(out))
    message = _one_line_error(forge(*command))
    assert str(out / "registry.db") in message and "not a SQLite database" in message
    assert (out / "registry.db").read_bytes() == garbage, "the user's file is never overwritten"


def test_bad_phase_selection_names_the_valid_forms(outputs):
    message = _one_line_error(forge("run", "--phases", "1-x"))
    assert "'1-x'" in message and "'all'" in message and "'1-2'" in message and "'1,2'" in message
    assert "unknown phase 99" in _one_line_error(forge("run", "--phases", "99"))
    assert not (outputs / ".locks").exists() or not list((outputs / ".locks").iterdir())


def test_empty_resume_is_an_error_not_a_new_run(outputs):
    message = _one_line_error(forge("run", "--resume", ""))
    assert "--resume" in message and "invalid session name ''" in message
    with ModelRegistry(outputs / "registry.db") as reg:
        assert sorted(s["id"] for s in reg.list_sessions()) == ["mid", "new", "old"]


def test_bench_help_is_the_benchmarks_own():
    proc = forge("bench", "grokking", "--help")
    assert proc.returncode == 0 and "usage: forge bench grokking" in proc.stdout, proc.stdout + proc.stderr
    listing = forge("bench", "--help")
    assert listing.returncode == 0 and "grokking" in listing.stdout and "NAME --help" in listing.stdout


def test_the_run_help_example_override_loads():
    """The ``--set`` example that ``forge run --help`` prints is a valid override of the default parameters."""
    import re

    from forgelib.cli import _parse_set, build_parser
    from forgelib.phases import PHASES
    from forgelib.phases.base import load_phase_params

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    example = re.search(r"e\.g\. --set (\S+=\S+)", " ".join(run.format_help().split())).group(1)
    overrides = _parse_set([example])
    for spec in PHASES:
        load_phase_params(spec, run.get_default("params"), overrides, PHASES)


@pytest.mark.parametrize("command", [("registry", "sessions"), ("run", "--phases", "1")])
def test_outputs_folder_that_is_a_file_is_one_line(tmp_path, monkeypatch, command):
    blocker = tmp_path / "outputs"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FORGE_OUTPUTS", str(blocker))
    message = _one_line_error(forge(*command))
    assert message == f"forge: cannot write {blocker}: {blocker} is a file, not a folder"
    assert blocker.read_text() == "not a folder"
