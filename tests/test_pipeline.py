"""The pipeline end to end with real papermill runs of two small real phases (tests/pipeline_phases)."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forgelib import paths
from forgelib.params import ParameterError
from forgelib.phases import PhaseController, UpstreamError, open_phase
from forgelib.phases.base import OutputNotWritableError
from forgelib.pipeline import PipelineError, UnknownSessionError, run_pipeline
from forgelib.registry import ModelRegistry
from forgelib.results import PhaseResult
from helpers import pipeline_outputs  # noqa: F401  (fixture)
from pipeline_phases import ALL, SPECS

PARAMS = "tests/params/pipeline.yaml"


@pytest.fixture
def outputs(pipeline_outputs):
    return pipeline_outputs


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_pipeline_runs_phases_and_records_everything(outputs):
    outcomes = run_pipeline(PARAMS, session="s1", specs=ALL, log=lambda m: None)
    assert [o.status for o in outcomes] == ["completed", "completed"]
    for spec in ALL:
        folder = outputs / "s1" / spec.dirname
        assert (folder / Path(spec.notebook).name).is_file(), "executed notebook is the run's record"
        result = PhaseResult.load(folder)
        assert result.ok and result.gate_passed and result.models["model"]["registry_id"]
        rows = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
        assert rows and "step" in rows[0]
        assert (folder / "params.yaml").is_file()
    beta = PhaseResult.load(outputs / "s1" / "02_beta")
    assert beta.metrics["scale"] == 1.05  # the parameter file's value reached the notebook
    with ModelRegistry(outputs / "registry.db") as reg:
        assert len(reg.list_models(session_id="s1")) == 2
        assert [r["status"] for r in reg.list_phase_runs("s1")] == ["completed", "completed"]
        handoffs = reg.list_handoffs("s1")
        assert [h["ok"] for h in handoffs] == [True, True]
        assert reg.get_session("s1")["status"] == "completed"


def test_pipeline_without_notebooks_runs_the_phases_in_process(outputs):
    """notebooks=False (`forge run --no-notebooks`): the same results, registry rows and handoffs, no notebooks."""
    outcomes = run_pipeline(PARAMS, session="s1p", specs=ALL, log=lambda m: None, notebooks=False)
    assert [o.status for o in outcomes] == ["completed", "completed"]
    for spec in ALL:
        folder = outputs / "s1p" / spec.dirname
        assert not (folder / Path(spec.notebook).name).exists()
        assert PhaseResult.load(folder).ok
    assert PhaseResult.load(outputs / "s1p" / "02_beta").metrics["scale"] == 1.05
    with ModelRegistry(outputs / "registry.db") as reg:
        assert len(reg.list_models(session_id="s1p")) == 2
        assert [h["ok"] for h in reg.list_handoffs("s1p")] == [True, True]
        assert reg.get_session("s1p")["status"] == "completed"
    with pytest.raises(PipelineError, match="phase 02_beta of session .* did not pass its gate"):
        run_pipeline(PARAMS, session="s2p", specs=ALL, overrides={"beta": {"fail_gate": True}}, log=lambda m: None,
                     notebooks=False)
    assert PhaseResult.load(outputs / "s2p" / "02_beta").status == "failed"


@pytest.mark.slow
def test_failed_phase_stops_pipeline_and_keeps_earlier_outputs(outputs):
    with pytest.raises(PipelineError, match="did not pass its gate"):
        run_pipeline(PARAMS, session="s2", specs=ALL, overrides={"beta": {"fail_gate": True}}, log=lambda m: None)
    alpha = PhaseResult.load(outputs / "s2" / "01_alpha")
    assert alpha.ok
    beta_dir = outputs / "s2" / "02_beta"
    assert (beta_dir / "beta.ipynb").is_file(), "the failed notebook is kept as the record"
    failed = PhaseResult.load(beta_dir)
    assert failed.status == "failed" and "gate_ok" in failed.error


@pytest.mark.slow
def test_kill_mid_phase_then_resume_keeps_completed_phase(outputs, tmp_path):
    hold = tmp_path / "hold"
    hold.write_text("hold beta")
    env = dict(os.environ, FORGE_TEST_HOLD=str(hold))
    code = ("import sys; from forgelib.pipeline import run_pipeline; from pipeline_phases import ALL; "
            f"run_pipeline({PARAMS!r}, session='s3', specs=ALL)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=paths.repo_root(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = outputs / "s3" / "02_beta" / "started"
    deadline = time.time() + 120
    while not started.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert started.exists(), "beta never started"
    before = _snapshot(outputs / "s3" / "01_alpha")
    os.killpg(proc.pid, signal.SIGKILL)  # the pipeline dies mid-phase
    proc.wait()
    # The phase kernel runs in its own session; ipykernel's parent poller ends it within ~1 s of its
    # parent's death. Keep it held until then so it cannot finish the phase behind the test's back.
    time.sleep(3)
    hold.unlink()
    outcomes = run_pipeline(session="s3", resume=True, specs=ALL, log=lambda m: None)
    assert [o.status for o in outcomes] == ["skipped", "completed"]
    assert _snapshot(outputs / "s3" / "01_alpha") == before, "a completed phase is never recomputed"
    assert PhaseResult.load(outputs / "s3" / "02_beta").ok
    assert list((outputs / "s3").glob("02_beta.incomplete-*")), "the killed attempt is kept aside"
    with ModelRegistry(outputs / "registry.db") as reg:
        assert [r["status"] for r in reg.list_phase_runs("s3")] == ["completed", "interrupted", "completed"]


def test_typo_in_parameter_file_fails_before_anything_runs(outputs, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("alpha:\n  widht: 16\n")
    with pytest.raises(ParameterError, match=r"widht.*allowed keys.*width"):
        run_pipeline(bad, session="s4", specs=ALL, log=lambda m: None)
    assert not (outputs / "s4").exists()


def test_resume_of_unknown_session_is_a_clear_error(outputs):
    with pytest.raises(UnknownSessionError, match="unknown session 'nope'"):
        run_pipeline(session="nope", resume=True, specs=ALL, log=lambda m: None)


def test_missing_upstream_is_a_clear_error(outputs, tmp_path):
    with pytest.raises(UpstreamError, match="no phase result"):
        open_phase(SPECS["beta"], PARAMS, session="s5", upstream=tmp_path / "missing", all_specs=ALL)


def _execute(spec, session, upstream=None):
    from forgelib.phases import run_phase

    return run_phase(open_phase(spec, PARAMS, session=session, upstream=upstream, all_specs=ALL))


def test_checksum_mismatch_of_upstream_is_refused(outputs):
    alpha = _execute(SPECS["alpha"], "s6")
    weights = paths.resolve(alpha.models["model"]["path"]) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the checkpoint
    weights.write_bytes(bytes(data))
    ctx = open_phase(SPECS["beta"], PARAMS, session="s6", upstream=outputs / "s6" / "01_alpha", all_specs=ALL)
    with pytest.raises(UpstreamError, match="failed verification"):
        ctx.upstream_model_path()


def test_completed_phase_is_never_overwritten(outputs):
    from forgelib.phases import PhaseError

    _execute(SPECS["alpha"], "s7")
    before = _snapshot(outputs / "s7" / "01_alpha")
    with pytest.raises(PhaseError, match="already completed"):
        _execute(SPECS["alpha"], "s7")
    assert _snapshot(outputs / "s7" / "01_alpha") == before


def test_unwritable_output_folder_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the outputs folder should be")
    monkeypatch.setenv("FORGE_OUTPUTS", str(blocker))
    with pytest.raises(OutputNotWritableError, match="cannot write"):
        open_phase(SPECS["alpha"], PARAMS, session="s8", all_specs=ALL)
    assert blocker.read_text().startswith("a file")


def test_phase_controller_contract(outputs):
    controller = PhaseController(SPECS["alpha"], PARAMS, session="s9", all_specs=ALL)
    assert controller.validate_input() is True
    result = controller.execute()
    assert controller.validate_output(result)
    beta = PhaseController(SPECS["beta"], PARAMS, session="s9", all_specs=ALL)
    assert beta.validate_input([outputs / "s9" / "01_alpha"])
    assert beta.execute([outputs / "s9" / "01_alpha"]).ok


def _session_status(outputs, session):
    with ModelRegistry(outputs / "registry.db") as reg:
        return reg.get_session(session)["status"], [r["status"] for r in reg.list_phase_runs(session)]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_model_write_failure_is_a_phase_error_and_the_session_ends_failed(outputs, monkeypatch, code):
    """A full disk (or a read-only folder) while a model is saved: a PhaseError naming the folder, the registry
    says failed, and the half-written temporary folder is gone."""
    from transformers import PreTrainedModel

    from forgelib.phases import PhaseError, run_phase

    def failing_save(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half a checkpoint")
        raise OSError(code, os.strerror(code), str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing_save)
    ctx = open_phase(SPECS["alpha"], PARAMS, session="w1", all_specs=ALL)
    with pytest.raises(PhaseError) as info:
        run_phase(ctx)
    models = outputs / "w1" / "01_alpha" / "models"
    assert f"cannot write {models / 'model'}: {os.strerror(code)}" in str(info.value)
    assert _session_status(outputs, "w1") == ("failed", ["failed"])
    assert list(models.iterdir()) == [], "no temporary folder left behind"
    assert PhaseResult.load(outputs / "w1" / "01_alpha").status == "failed"


def test_full_disk_while_writing_result_json(outputs, monkeypatch):
    """result.json cannot be written: the model already saved stays, no temporary file is left, the registry
    row ends failed rather than running."""
    import forgelib.results as results
    from forgelib.phases import PhaseError, run_phase

    real_fdopen = os.fdopen

    class FullDisk:  # the temporary file's handle: a first chunk lands, then the disk is full
        def __init__(self, fd, *args, **kwargs):
            self.handle = real_fdopen(fd, *args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            self.handle.write(text[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    ctx = open_phase(SPECS["alpha"], PARAMS, session="w2", all_specs=ALL)
    monkeypatch.setattr(results.os, "fdopen", FullDisk)
    with pytest.raises(PhaseError, match=f"cannot write {outputs / 'w2' / '01_alpha' / 'result.json'}: "
                                         "No space left on device"):
        run_phase(ctx)
    folder = outputs / "w2" / "01_alpha"
    assert _session_status(outputs, "w2") == ("failed", ["failed"])
    assert not list(folder.glob(".result.json.*")), "no temporary file left behind"
    assert (folder / "models" / "model" / "model.safetensors").is_file(), "what was written is kept"


def test_phase_folder_that_is_a_file_is_named_and_the_lock_freed(outputs):
    from forgelib.session import SessionLock

    blocker = outputs / "w3" / "01_alpha"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the phase folder should be")
    with pytest.raises(OutputNotWritableError, match=f"cannot write {blocker}: {blocker} is a file, not a folder"):
        open_phase(SPECS["alpha"], PARAMS, session="w3", all_specs=ALL)
    assert blocker.read_text().startswith("a file")
    SessionLock("w3").release()  # the failed open let go of the session


def test_pipeline_with_a_file_for_its_session_folder_ends_failed(outputs):
    blocker = outputs / "w4"
    outputs.mkdir(parents=True)
    blocker.write_text("a file where the session folder should be")
    with pytest.raises(OutputNotWritableError, match=f"{blocker} is a file, not a folder"):
        run_pipeline(PARAMS, session="w4", specs=ALL, log=lambda m: None)
    assert _session_status(outputs, "w4") == ("failed", [])
    assert blocker.read_text().startswith("a file")


def test_partial_run_names_the_upstream_it_takes_from_another_session(outputs, capsys):
    from forgelib.pipeline import Pipeline

    _execute(SPECS["alpha"], "u1")
    folder = paths.relative(outputs / "u1" / "01_alpha")
    logs = []
    pipe = Pipeline(PARAMS, "2", "u2", specs=ALL, log=logs.append)
    try:
        assert pipe._initial_upstream().session == "u1"
    finally:
        pipe.close()
    assert any("taken from session u1" in m and folder in m for m in logs), logs
    capsys.readouterr()
    result = _execute(SPECS["beta"], "u3")  # a phase opened on its own takes the newest Phase 1 too
    assert f"taken from session u1 ({folder})" in capsys.readouterr().out
    expected = {"session": "u1", "phase": "alpha", "folder": folder}
    assert result.upstream == expected
    assert json.loads((outputs / "u3" / "02_beta" / "result.json").read_text())["upstream"] == expected


def test_partial_run_without_any_upstream_fails_before_running(outputs):
    with pytest.raises(PipelineError, match=r"phase 02_beta needs a completed 01_alpha: none in session 'u5' "
                                            r"or any other session; run --phases 1 first"):
        run_pipeline(PARAMS, "2", session="u5", specs=ALL, log=lambda m: None)
    assert _session_status(outputs, "u5")[0] == "failed"
    assert not (outputs / "u5" / "02_beta").exists()
