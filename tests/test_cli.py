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


def test_typo_in_override_is_reported(outputs):
    proc = forge("run", "--set", "cognate.trunk.stpes=3")
    assert proc.returncode == 1 and "stpes" in proc.stderr and "allowed keys" in proc.stderr
