"""Integrity of sessions and handoffs: verified upstream paths, safe session names, one run per session,
`forge clean` against running sessions, and stale phase runs after a crash. Real registries, real tiny models."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from forgelib import paths
from forgelib.phases import UpstreamError, open_phase, run_phase
from forgelib.pipeline import PipelineError, run_pipeline
from forgelib.registry import ModelRegistry, RegistryError
from forgelib.results import PhaseResult
from helpers import pipeline_outputs  # noqa: F401  (fixture)
from pipeline_phases import ALL, SPECS

PARAMS = "tests/params/pipeline.yaml"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def outputs(pipeline_outputs):
    return pipeline_outputs


def _execute(spec, session, upstream=None):
    return run_phase(open_phase(spec, PARAMS, session=session, upstream=upstream, all_specs=ALL))


def _edit_result(folder: Path, role: str, **changes) -> None:
    data = json.loads((folder / "result.json").read_text())
    data["models"][role].update(changes)
    (folder / "result.json").write_text(json.dumps(data))


def forge(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "forgelib.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


# ---------------------------------------------------------------- 1. checksum bypass through result.json
def test_upstream_is_loaded_from_the_verified_registry_path_not_result_json(outputs):
    alpha = _execute(SPECS["alpha"], "u1")
    real = paths.resolve(alpha.models["model"]["path"])
    decoy = real.parent / "decoy"
    shutil.copytree(real, decoy)
    (decoy / "model.safetensors").write_bytes(b"not the verified weights")
    _edit_result(outputs / "u1" / "01_alpha", "model", path=str(decoy))
    ctx = open_phase(SPECS["beta"], PARAMS, session="u1", upstream=outputs / "u1" / "01_alpha", all_specs=ALL)
    with pytest.raises(UpstreamError, match=r"result\.json names .*decoy.* but registry row \d+ holds"):
        ctx.upstream_model_path()


def test_upstream_without_a_registry_row_is_refused(outputs):
    _execute(SPECS["alpha"], "u2")
    folder = outputs / "u2" / "01_alpha"
    _edit_result(folder, "model", registry_id=None)
    ctx = open_phase(SPECS["beta"], PARAMS, session="u2", upstream=folder, all_specs=ALL)
    with pytest.raises(UpstreamError, match=r"model 'model' .*has no registry row.*result\.json"):
        ctx.upstream_model_path()
    _edit_result(folder, "model", registry_id=999)
    ctx = open_phase(SPECS["beta"], PARAMS, session="u2", upstream=folder, all_specs=ALL)
    with pytest.raises(UpstreamError, match=r"model 'model' .*registry id 999.*not in the registry"):
        ctx.upstream_model_path()


def test_upstream_row_of_another_session_is_refused(outputs):
    _execute(SPECS["alpha"], "u3")
    other = _execute(SPECS["alpha"], "u4")
    _edit_result(outputs / "u3" / "01_alpha", "model", **other.models["model"])
    ctx = open_phase(SPECS["beta"], PARAMS, session="u3", upstream=outputs / "u3" / "01_alpha", all_specs=ALL)
    with pytest.raises(UpstreamError, match=r"registry row \d+ belongs to session 'u4'"):
        ctx.upstream_model_path()


def test_skipped_phase_must_still_verify(outputs):
    _execute(SPECS["alpha"], "u5")
    weights = outputs / "u5" / "01_alpha" / "models" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(PipelineError, match=r"01_alpha of session u5 completed earlier but .*checksum mismatch"):
        run_pipeline(PARAMS, phases="1", session="u5", specs=ALL, log=lambda m: None)


# ---------------------------------------------------------------- 2. session names stay inside outputs/
BAD_NAMES = ["../../x", "/tmp/forge-abs", "a/b/c", "a b", "", "..", ".hidden", "a..b", "x" * 101]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_session_names_are_refused_at_every_entry_point(outputs, tmp_path, name):
    from forgelib.session import InvalidSessionNameError, check_session_name

    rule = r"invalid session name .*must be 1-100 characters from A-Z a-z 0-9"
    with pytest.raises(InvalidSessionNameError, match=rule):
        check_session_name(name)
    if name:  # an empty session means "a new one" to these entry points
        with pytest.raises(InvalidSessionNameError, match=rule):
            open_phase(SPECS["alpha"], PARAMS, session=name, all_specs=ALL)
        with pytest.raises(InvalidSessionNameError, match=rule):
            run_pipeline(PARAMS, session=name, specs=ALL, log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"] or not tmp_path.joinpath("x").exists()
    assert not Path("/tmp/forge-abs").exists()
    assert not list(outputs.glob("*/01_alpha")) if outputs.exists() else True


def test_cli_refuses_unsafe_session_names(outputs):
    for flag in ("--session", "--resume"):
        proc = forge("run", flag, "../../x")
        assert proc.returncode == 2, proc.stderr
        assert "invalid session name '../../x'" in proc.stderr and "A-Z a-z 0-9" in proc.stderr


def test_good_session_names_pass():
    from forgelib.phases.base import new_session_id
    from forgelib.session import check_session_name

    for name in ("s1", "20250301-120000-run", "a.b_c-d", new_session_id(), "x" * 100):
        assert check_session_name(name) == name


def test_make_run_with_an_unsafe_session_creates_no_folder(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    # PYTHON/PY are `true`: setup and papermill would "succeed" instantly if the recipe got that far.
    proc = subprocess.run(["make", "--no-print-directory", "run", "SESSION=a b", "PYTHON=true", "PY=true"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "invalid session name" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Makefile"]


# ---------------------------------------------------------------- 3. one process per session
def test_second_lock_on_a_session_fails_at_once_naming_the_holder(outputs):
    from forgelib.session import SessionInUseError, SessionLock

    first = SessionLock("dup")  # two opens in one process are two open file descriptions: they conflict
    with pytest.raises(SessionInUseError, match=rf"session 'dup' is in use by process {os.getpid()}"):
        SessionLock("dup")
    first.release()
    with SessionLock("dup") as again:
        assert again.held


def test_lock_held_by_another_process_blocks_pipeline_and_cli(outputs):
    from forgelib.session import SessionInUseError

    holder = subprocess.Popen([sys.executable, "-c", "import sys; from forgelib.session import SessionLock; "
                               "l = SessionLock('dup'); print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SessionInUseError, match=rf"in use by process {holder.pid}"):
            run_pipeline(PARAMS, session="dup", specs=ALL, log=lambda m: None)
        with pytest.raises(SessionInUseError, match=rf"in use by process {holder.pid}"):
            open_phase(SPECS["alpha"], PARAMS, session="dup", all_specs=ALL)
        proc = forge("run", "--session", "dup", timeout=60)
        assert proc.returncode == 1 and f"session 'dup' is in use by process {holder.pid}" in proc.stderr
        assert not (outputs / "dup").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    _execute(SPECS["alpha"], "dup")  # free again once the holder ended


def test_reopening_a_phase_in_the_same_process_shares_the_lock(outputs):
    from forgelib.session import SessionInUseError, SessionLock

    first = open_phase(SPECS["alpha"], PARAMS, session="re", all_specs=ALL)  # a notebook cell run twice
    second = open_phase(SPECS["alpha"], PARAMS, session="re", all_specs=ALL)
    assert first.session_lock is second.session_lock and second.session_lock.users == 2
    run_phase(second)
    with pytest.raises(SessionInUseError):  # the first context still holds the session
        SessionLock("re")
    first.session_lock.release()
    SessionLock("re").release()


# ---------------------------------------------------------------- 4. forge clean vs running sessions
def _sessions(out: Path, names) -> None:
    with ModelRegistry(out / "registry.db") as reg:
        for i, session in enumerate(names):
            folder = out / session / "01_x" / "models" / "m"
            folder.mkdir(parents=True)
            (folder / "weights.bin").write_bytes(bytes([i]) * 10)
            (out / session / "01_x" / "result.json").write_text("{}")
            reg.create_session(session, {"i": i})
            reg.register_model(session_id=session, phase_name="x", model_name="m", model_path=str(folder))


def test_clean_skips_a_session_in_use_and_deletes_folders_with_rows(outputs):
    from forgelib.session import SessionLock

    _sessions(outputs, ("old", "mid", "new"))
    with SessionLock("old"):
        dry = forge("clean", "--keep", "1", "--dry-run")
        assert json.loads(dry.stdout)["session_dirs"] == [str(outputs / "mid")] and (outputs / "mid").exists()
        proc = forge("clean", "--keep", "1")
    assert proc.returncode == 0, proc.stderr
    assert f"skipped session 'old': in use by process {os.getpid()}" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["sessions"] == ["mid"] and report["skipped_sessions"][0]["session"] == "old"
    assert not (outputs / "mid").exists(), "the whole session folder goes with its rows"
    assert (outputs / "old" / "01_x" / "models" / "m" / "weights.bin").exists()
    with ModelRegistry(outputs / "registry.db") as reg:
        assert sorted(s["id"] for s in reg.list_sessions()) == ["new", "old"]


def test_resume_after_clean_proves_models_exist(outputs):
    _execute(SPECS["alpha"], "c1")
    with ModelRegistry(outputs / "registry.db") as reg:  # rows and model files go, result.json stays
        reg.cleanup(keep_sessions=0)
    assert PhaseResult.load(outputs / "c1" / "01_alpha").ok
    with pytest.raises(PipelineError, match=r"01_alpha of session c1 completed earlier but .*not in the registry"):
        run_pipeline(PARAMS, phases="1", session="c1", specs=ALL, log=lambda m: None)


# ---------------------------------------------------------------- 5. stale runs after a crash
def test_resume_marks_stale_runs_interrupted_and_retires_their_models(outputs):
    _execute(SPECS["alpha"], "k1")
    with ModelRegistry(outputs / "registry.db") as reg:  # a beta attempt that died after saving a model
        run_id = reg.start_phase_run("k1", "beta")
        folder = outputs / "k1" / "02_beta" / "models" / "model"
        shutil.copytree(outputs / "k1" / "01_alpha" / "models" / "model", folder)
        beta_model = reg.register_model(session_id="k1", phase_name="beta", model_name="model", model_path=folder)
    run_pipeline(PARAMS, phases="1", session="k1", specs=ALL, log=lambda m: None)
    with ModelRegistry(outputs / "registry.db") as reg:
        run = reg.get_phase_run(run_id)
        assert run["status"] == "interrupted" and "interrupted" in run["error"]
        retired = reg.get_model(beta_model)
        assert retired["retired_at"] and f"phase run {run_id}" in retired["retired_reason"]
        with pytest.raises(RegistryError, match=rf"model {beta_model} .*retired"):
            reg.verify_model(beta_model)
        alpha_model = reg.list_models(session_id="k1", phase_name="alpha")[0]
        assert alpha_model["retired_at"] is None
        assert [r["status"] for r in reg.list_phase_runs("k1")] == ["completed", "interrupted"]


def test_open_phase_also_recovers_stale_runs(outputs):
    with ModelRegistry(outputs / "registry.db") as reg:
        run_id = reg.start_phase_run("k2", "alpha")
    _execute(SPECS["alpha"], "k2")
    with ModelRegistry(outputs / "registry.db") as reg:
        assert [r["status"] for r in reg.list_phase_runs("k2")] == ["interrupted", "completed"]
        assert reg.get_phase_run(run_id)["status"] == "interrupted"


OLD_PHASE_RUNS = """CREATE TABLE phase_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    phase_name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    started_at TEXT NOT NULL, finished_at TEXT, duration_s REAL, metrics TEXT, error TEXT)"""


def test_registry_of_the_old_schema_is_migrated(tmp_path):
    db = tmp_path / "registry.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY, config TEXT NOT NULL, status TEXT NOT NULL, "
                 "current_phase TEXT, progress REAL NOT NULL DEFAULT 0.0, created_at TEXT NOT NULL, "
                 "updated_at TEXT NOT NULL)")
    conn.execute(OLD_PHASE_RUNS)
    conn.execute("INSERT INTO sessions VALUES ('old', '{}', 'running', NULL, 0.0, '2025', '2025')")
    conn.execute("INSERT INTO phase_runs (session_id, phase_name, status, started_at, metrics) "
                 "VALUES ('old', 'p', 'running', '2025-03-01T00:00:00.000000+00:00', '{}')")
    conn.commit()
    conn.close()
    with ModelRegistry(db) as reg:
        marked = reg.interrupt_stale_runs("old")
        assert [r["status"] for r in marked] == ["interrupted"]
        assert reg.list_phase_runs("old")[0]["status"] == "interrupted"


# --- forge merge verifies what it rebuilds from ------------------------------------------------------


@pytest.fixture
def merge_sources(tmp_path, tiny_llama):
    """A trunk and two perturbed copies saved as folders, and a recipe over them holding their checksums."""
    import copy

    import torch

    from forgelib.merge import MergeRecipe, save_recipe
    from forgelib.registry import compute_checksum

    folders = {}
    for i, name in enumerate(("trunk", "a", "b")):
        model = copy.deepcopy(tiny_llama)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * i)
        folders[name] = tmp_path / name
        model.save_pretrained(folders[name])
    names = {k: str(v) for k, v in folders.items()}
    recipe = MergeRecipe("task_arithmetic", [names["a"], names["b"]], names["trunk"], parameters={"weights": 0.5},
                         checksums={v: compute_checksum(v) for v in names.values()})
    return folders, save_recipe(recipe, tmp_path / "recipe.yaml")


def _forge_merge(*args):
    from forgelib.cli import main

    return main(["merge", *map(str, args)])


def test_forge_merge_rebuilds_from_verified_sources(merge_sources, tmp_path, capsys):
    _, recipe = merge_sources
    assert _forge_merge(recipe, "--out", tmp_path / "out") == 0
    assert "rebuilt model written to" in capsys.readouterr().out


def test_forge_merge_refuses_a_tampered_source(merge_sources, tmp_path, capsys):
    folders, recipe = merge_sources
    weights = folders["b"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in a tensor
    weights.write_bytes(bytes(data))
    assert _forge_merge(recipe, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"forge: source model '{folders['b']}' at {folders['b']} was changed since the recipe was saved" in err
    assert not (tmp_path / "out").exists(), "nothing rebuilt from a tampered source"


def test_forge_merge_names_an_invalid_recipe_file(tmp_path, capsys):
    bad = tmp_path / "recipe.yaml"
    bad.write_text("method: [unclosed\n")
    assert _forge_merge(bad) == 2
    assert f"forge: recipe file {bad}: not valid YAML" in capsys.readouterr().err
    bad.write_text("method: linear\nmodels: [x]\nweights: 1\n")
    assert _forge_merge(bad) == 2
    assert f"recipe file {bad}: unknown recipe field(s) ['weights']" in capsys.readouterr().err


def test_forge_merge_names_a_garbage_config(merge_sources, tmp_path, capsys):
    from forgelib.merge import load_recipe, save_recipe

    folders, recipe_path = merge_sources
    recipe = load_recipe(recipe_path)
    recipe.checksums = {}  # a hand-written recipe: nothing to verify, so the load itself must fail clearly
    save_recipe(recipe, recipe_path)
    (folders["a"] / "config.json").write_text("{not json")
    assert _forge_merge(recipe_path, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "holds no checksum" in err and f"forge: cannot load merge source {folders['a']}: " in err


def test_forge_merge_compare_reports_bit_identity(merge_sources, tmp_path, capsys):
    _, recipe = merge_sources
    assert _forge_merge(recipe, "--out", tmp_path / "one") == 0
    assert _forge_merge(recipe, "--out", tmp_path / "two", "--compare", tmp_path / "one") == 0
    assert f"bit-identical to {tmp_path / 'one'}: True" in capsys.readouterr().out
