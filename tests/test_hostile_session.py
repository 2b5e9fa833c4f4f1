"""Sessions, the registry, clean and resume against a hostile user: a damaged result.json of a completed phase, a
registry row naming another session's folder, a full disk while a model is saved, a damaged registry file.

Real registries and the pipeline's own tiny test phases (tests/pipeline_phases) run in this process; each refusal is
checked to come before the dangerous work (nothing recomputed, moved, deleted or written).
"""
import errno
import hashlib
import json
import re
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from forgelib.cli import main
from forgelib.phases import OutputNotWritableError, open_phase, run_phase
from forgelib.phases.base import DamagedResultError, UpstreamError, as_phase_error, load_upstream, write_model_folder
from forgelib.pipeline import RefusedError, run_pipeline
from forgelib.registry import CorruptRegistryError, ModelRegistry
from forgelib.results import PhaseResult
from helpers import completed_r1, outputs_of_test_phases, pipeline_outputs  # noqa: F401  (fixtures: done, outputs)
from pipeline_phases import ALL, SPECS

PARAMS = "tests/params/pipeline.yaml"




def _tree(folder: Path) -> dict:
    """Every file under ``folder`` (outside the lock folder): relative path -> (mtime, bytes)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file() and ".locks" not in p.parts and ".cache" not in p.parts}


def _rows(outputs: Path, session: str):
    with ModelRegistry(outputs / "registry.db") as reg:
        return (reg.get_session(session), reg.list_models(session_id=session), reg.list_phase_runs(session),
                reg.list_handoffs(session))


def _forge(capsys, *args) -> tuple[int, str]:
    """``forge ARGS`` through the CLI's main: (exit status, stderr); argparse's exit counts as the status."""
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _model_folder(folder: Path, session: str) -> None:
    (folder / "models" / "m").mkdir(parents=True, exist_ok=True)
    (folder / "models" / "m" / "w.bin").write_bytes(session.encode())


def _registered_folder(reg: ModelRegistry, session: str, folder: Path) -> None:
    _model_folder(folder, session)
    reg.create_session(session, {})
    reg.register_model(session_id=session, phase_name="x", model_name="m", model_path=folder / "models" / "m")


# ---------------------------------------------------------------- 1. a completed phase with a damaged result.json
def _bad_byte(text: str) -> bytes:
    return text.encode()[:40] + b"\xff" + text.encode()[41:]


def _gate_abc(text: str) -> bytes:
    data = json.loads(text)
    data["gate"][0]["value"] = "abc"
    return json.dumps(data).encode()


def _models_entry(text: str) -> bytes:
    data = json.loads(text)
    data["models"]["model"] = "outputs/elsewhere"
    return json.dumps(data).encode()


DAMAGES = {"bad byte": (_bad_byte, "not a valid phase result"),
           "gate value 'abc'": (_gate_abc, ": could not convert string to float: 'abc'"),
           "models entry": (_models_entry, "models['model'] must be an object with a 'path'"),
           "missing": (None, "the file is missing")}


@pytest.mark.parametrize("phase", ["01_alpha", "02_beta"])
def test_resume_refuses_a_completed_phase_whose_result_is_damaged(done, capsys, phase):
    result_file = done / "r1" / phase / "result.json"
    good = result_file.read_text()
    before, rows = _tree(done / "r1"), _rows(done, "r1")
    for name, (damage, reason) in DAMAGES.items():
        if damage is None:
            result_file.unlink()
        else:
            result_file.write_bytes(damage(good))
        damaged = _tree(done / "r1")
        code, err = _forge(capsys, "run", "--resume", "r1", "--no-notebooks")
        assert code == 2, (name, err)
        assert err.startswith(f"forge: phase {phase} of session r1 completed (registry phase run "), (name, err)
        assert f"its result {result_file} cannot be used: " in err and reason in err, (name, err)
        assert "neither recomputed nor moved aside: restore that file" in err
        assert _tree(done / "r1") == damaged and _rows(done, "r1") == rows, f"{name}: nothing is written"
        with pytest.raises(RefusedError, match=f"phase {phase} of session r1 completed"):  # the Python API too
            run_pipeline(session="r1", resume=True, specs=ALL, log=lambda m: None, notebooks=False)
        with pytest.raises(DamagedResultError, match=f"{phase} of session r1 completed"):  # and a standalone phase
            open_phase(SPECS[phase.split("_")[1]], PARAMS, session="r1", all_specs=ALL)
        if phase == "01_alpha":  # nor is it taken as the upstream of a rerun
            code, err = _forge(capsys, "run", "--from", "r1:2", "--no-notebooks")
            assert code == 2 and err.startswith("forge: --from r1:2: phase 01_alpha of session r1 completed"), err
        assert not list((done / "r1").glob("*.incomplete-*")) and _tree(done / "r1") == damaged
        result_file.write_text(good)
    assert _tree(done / "r1").keys() == before.keys()
    code, _ = _forge(capsys, "run", "--resume", "r1", "--no-notebooks")
    assert code == 0, "restored, the session resumes (both phases kept)"


def test_malformed_models_entries_are_named_not_an_attribute_error(done):
    folder = done / "r1" / "01_alpha"
    good = json.loads((folder / "result.json").read_text())
    for models, where in (({"model": "x" * 5000}, "models['model']"), ({"model": {"path": 7}}, "models['model']"),
                          ({"model": {"path": "p", "registry_id": "1"}}, "models['model']"), ([], "'models'")):
        (folder / "result.json").write_text(json.dumps(dict(good, models=models)))
        start = re.escape(f"{folder / 'result.json'}: not a valid phase result (")
        with pytest.raises(ValueError, match=start) as info:
            PhaseResult.load(folder)
        assert f"{where} must be" in str(info.value) and len(str(info.value)) < 500
        with pytest.raises(UpstreamError, match="not a valid phase result"):
            load_upstream(folder)


# ---------------------------------------------------------------- 2. forge clean stays inside its session's folder
def test_clean_never_deletes_another_sessions_folder(outputs, capsys):
    long_ago = datetime(2020, 1, 1, tzinfo=timezone.utc)
    _model_folder(outputs / "new" / "01_x", "new")
    with ModelRegistry(outputs / "registry.db", clock=lambda: long_ago) as reg:
        _registered_folder(reg, "old", outputs / "old" / "01_x")
        for target in (outputs / "new", outputs / "new" / "01_x", outputs / "old" / ".." / "new" / "01_x" / "models"):
            reg.register_model(session_id="old", phase_name="x", model_name="evil", model_path=target)
    with ModelRegistry(outputs / "registry.db") as reg:
        _registered_folder(reg, "new", outputs / "new" / "01_x")
    code, err = _forge(capsys, "clean", "--max-age-days", "30")
    assert code == 0, err
    assert (outputs / "new" / "01_x" / "models" / "m" / "w.bin").read_bytes() == b"new"
    assert not (outputs / "old").exists(), "the session cleaned goes, with its own model"
    with ModelRegistry(outputs / "registry.db") as reg:
        assert [s["id"] for s in reg.list_sessions()] == ["new"]
        report = reg.cleanup(keep_sessions=0, dry_run=True)  # the same rule in the registry's own cleanup
        assert report["deleted_paths"] == [str(outputs / "new" / "01_x" / "models" / "m")]


def test_clean_keeps_a_session_folder_that_holds_a_kept_sessions_model(outputs, capsys):
    long_ago = datetime(2020, 1, 1, tzinfo=timezone.utc)
    with ModelRegistry(outputs / "registry.db", clock=lambda: long_ago) as reg:
        _registered_folder(reg, "old", outputs / "old" / "01_x")
    with ModelRegistry(outputs / "registry.db") as reg:
        _registered_folder(reg, "new", outputs / "old" / "02_y")  # registered by "new", inside old's folder
    code, err = _forge(capsys, "clean", "--max-age-days", "30")
    assert code == 0, err
    assert (outputs / "old" / "02_y" / "models" / "m" / "w.bin").read_bytes() == b"new"
    assert not (outputs / "old" / "01_x" / "models" / "m").exists()
    with ModelRegistry(outputs / "registry.db") as reg:
        assert [s["id"] for s in reg.list_sessions()] == ["new"]


def test_cleanup_reports_why_a_foreign_path_is_kept(tmp_path):
    root = tmp_path / "outputs"
    with ModelRegistry(root / "registry.db") as reg:
        _registered_folder(reg, "a", root / "a" / "01_x")
        _registered_folder(reg, "b", root / "b" / "01_x")
        reg.register_model(session_id="a", phase_name="x", model_name="b's", model_path=root / "b")
        reg.register_model(session_id="a", phase_name="x", model_name="own", model_path=root / "a")
        report = reg.delete_sessions(["a"])
    reasons = {item["path"]: item["reason"] for item in report["skipped_paths"]}
    assert reasons == {str(root / "b"): f"outside the folder of session 'a' ({root / 'a'})",
                       str(root / "a" / "01_x" / "models" / "m"): "already gone"}  # went with its session's folder
    assert report["deleted_paths"] == [str(root / "a")]
    assert (root / "b" / "01_x" / "models" / "m" / "w.bin").exists()


@pytest.mark.parametrize("value", ["inf", "Infinity", "-inf", "nan"])
def test_clean_refuses_a_non_finite_age(outputs, capsys, value):
    with ModelRegistry(outputs / "registry.db") as reg:
        _registered_folder(reg, "s", outputs / "s" / "01_x")
    code, err = _forge(capsys, "clean", f"--max-age-days={value}")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"forge clean: error: argument --max-age-days: must be a finite number >= 0, got {value}"), err
    assert (outputs / "s" / "01_x" / "models" / "m" / "w.bin").exists()


def test_registry_cleanup_takes_only_a_finite_age_and_any_finite_one(tmp_path):
    with ModelRegistry(tmp_path / "registry.db") as reg:
        reg.create_session("s", {})
        for bad in (float("inf"), float("nan"), -1.0, "30", True):
            with pytest.raises(ValueError, match="max_age_days must be a finite, non-negative number of days"):
                reg.select_sessions(max_age_days=bad)
        assert reg.select_sessions(max_age_days=1e300) == []  # older than any date: none (no OverflowError)
        assert reg.select_sessions(max_age_days=0, now=datetime.now(timezone.utc) + timedelta(days=1)) == ["s"]


# ---------------------------------------------------------------- 3. a full disk while a model is saved
def _full_disk_safetensors(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _full_disk_oserror(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("full_disk", [_full_disk_safetensors, _full_disk_oserror])
def test_full_disk_while_saving_a_model_is_named_and_leaves_nothing_behind(outputs, monkeypatch, full_disk):
    """What safetensors raises on a full disk (seen on a 256 KiB tmpfs): the temporary folder goes, the earlier
    model of the role and the phase's other files stay, and the error names the model, the folder and the cause."""
    ctx = open_phase(SPECS["alpha"], PARAMS, session="full", all_specs=ALL)
    model = _tiny_model()
    ctx.save_model("model", model)
    models = ctx.dir / "models"
    before = _tree(ctx.dir)
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full_disk)
    with pytest.raises(OutputNotWritableError) as info:
        ctx.save_model("model", model)
    assert str(info.value) == (
        f"cannot write {models / 'model'}: No space left on device (the disk is full) while saving model 'model'; the "
        "partial copy was removed and nothing already written was touched: free some disk space, then forge run "
        "--resume full")
    assert sorted(p.name for p in models.iterdir()) == ["model"], "no temporary .model.* folder is left"
    assert _tree(ctx.dir) == before, "the earlier model and the other files are untouched"
    ctx.session_lock.release()


def test_full_disk_fails_the_phase_with_the_message(outputs, monkeypatch):
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", _full_disk_safetensors)
    with pytest.raises(OutputNotWritableError, match=r"cannot write .*01_alpha/models/model: No space left on device "
                       r"\(the disk is full\) while saving model 'model'"):
        run_phase(open_phase(SPECS["alpha"], PARAMS, session="full2", all_specs=ALL))
    assert not list((outputs / "full2" / "01_alpha" / "models").iterdir())
    result = PhaseResult.load(outputs / "full2" / "01_alpha")
    assert result.status == "failed" and "the disk is full" in result.error
    with ModelRegistry(outputs / "registry.db") as reg:
        assert [r["status"] for r in reg.list_phase_runs("full2")] == ["failed"]
        assert reg.list_models(session_id="full2") == []


def test_write_model_folder_keeps_other_errors_and_maps_library_disk_errors(tmp_path):
    final = tmp_path / "models" / "m"

    def broken(tmp):
        (tmp / "half").write_text("x")
        raise KeyError("not a disk problem")

    with pytest.raises(KeyError):
        write_model_folder(final, broken, "model 'm'")
    assert list((tmp_path / "models").iterdir()) == []
    from safetensors import SafetensorError

    error = as_phase_error(SafetensorError("Error while serializing: I/O error: No space left on device "
                                           "(os error 28)"), tmp_path / "ckpt")
    assert isinstance(error, OutputNotWritableError)
    assert str(error) == f"cannot write {tmp_path / 'ckpt'}: No space left on device"


def _tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))


# ---------------------------------------------------------------- 4. a damaged registry file, bad JSON rows
def _corrupt_page(db: Path, table: str) -> str:
    """Overwrite ``table``'s root page with garbage (a damaged sector); returns the file's sha256 afterwards."""
    conn = sqlite3.connect(db)
    page = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = bytearray(db.read_bytes())
    data[(page - 1) * size:page * size] = b"\xa5" * size
    db.write_bytes(bytes(data))
    return hashlib.sha256(db.read_bytes()).hexdigest()


def _registry_message(db: Path) -> str:
    return f"forge: registry {db} is damaged ("


@pytest.mark.parametrize("command", [("registry", "list"), ("registry", "sessions"), ("clean", "--keep", "0")])
def test_registry_with_a_corrupt_page_is_named_and_never_written(outputs, capsys, command):
    with ModelRegistry(outputs / "registry.db") as reg:
        _registered_folder(reg, "s", outputs / "s" / "01_x")
    db = outputs / "registry.db"
    digest = _corrupt_page(db, "models")
    code, err = _forge(capsys, *command)
    assert code == 2 and err.startswith(_registry_message(db)), err
    assert "nothing was written to it: restore it from a backup, or move it aside" in err
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest and (outputs / "s" / "01_x").exists()


def test_resume_on_a_corrupt_registry_refuses_before_writing(done, capsys):
    db = done / "registry.db"
    digest = _corrupt_page(db, "models")
    files = _tree(done / "r1")
    code, err = _forge(capsys, "run", "--resume", "r1", "--no-notebooks")
    assert code == 2 and err.startswith(_registry_message(db)), err
    assert "handoff" not in err
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest, "nothing is written into the damaged file"
    assert _tree(done / "r1") == files


def _set_column(db: Path, sql: str, *args) -> None:
    conn = sqlite3.connect(db)
    conn.execute(sql, args)
    conn.commit()
    conn.close()


def test_bad_json_in_a_session_config_is_named(done, capsys):
    db = done / "registry.db"
    _set_column(db, "UPDATE sessions SET config = ? WHERE id = 'r1'", "{not json" + "x" * 5000)
    for command in (("registry", "sessions"), ("run", "--resume", "r1", "--no-notebooks")):
        code, err = _forge(capsys, *command)
        assert code == 2, err
        assert err.startswith(f"forge: registry {db}: sessions row 'r1': its config column is not valid JSON ("), err
        assert "repair or delete that row (sqlite3), or move the registry aside" in err and len(err) < 500
    _set_column(db, "UPDATE sessions SET config = '[1, 2]' WHERE id = 'r1'")
    code, err = _forge(capsys, "run", "--resume", "r1", "--no-notebooks")
    assert code == 2 and "sessions row 'r1': its config column holds list, not a JSON object" in err


def test_bad_json_in_model_metadata_is_named(done, capsys):
    db = done / "registry.db"
    model_id = _rows(done, "r1")[1][-1]["id"]
    _set_column(db, "UPDATE models SET metadata = '{\"role\": ' WHERE id = ?", model_id)
    code, err = _forge(capsys, "registry", "list")
    assert code == 2 and err.startswith(f"forge: registry {db}: models row {model_id} of session 'r1': its metadata "
                                        "column is not valid JSON ("), err


# ---------------------------------------------------------------- 5. a resume reads the session's rows first
def test_bad_json_in_model_metadata_is_named_before_a_resume_writes(done, capsys):
    db = done / "registry.db"
    model_id = _rows(done, "r1")[1][-1]["id"]
    _set_column(db, "UPDATE models SET metadata = '{\"role\": ' WHERE id = ?", model_id)
    rows_before = sqlite3.connect(db).execute("SELECT * FROM sessions, handoffs, phase_runs").fetchall()
    files = _tree(done / "r1")
    code, err = _forge(capsys, "run", "--resume", "r1", "--no-notebooks")
    assert code == 2 and err.startswith(f"forge: registry {db}: models row {model_id} of session 'r1': its metadata "
                                        "column is not valid JSON ("), err
    assert "handoff" not in err
    assert sqlite3.connect(db).execute("SELECT * FROM sessions, handoffs, phase_runs").fetchall() == rows_before
    assert _tree(done / "r1") == files
    with pytest.raises(CorruptRegistryError, match=f"models row {model_id} of session 'r1'"):
        run_pipeline(session="r1", resume=True, specs=ALL, log=lambda m: None, notebooks=False)
