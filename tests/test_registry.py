"""Tests of the SQLite model registry: checksums, sessions, runs, handoffs, cleanup, concurrency."""
import hashlib
import multiprocessing as mp
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from forgelib.registry import (ChecksumMismatchError, CorruptRegistryError, ModelNotFoundError, ModelRegistry,
                               RegistryError, SessionExistsError, UnknownRecordError, compute_checksum)


class FakeClock:
    """An injectable clock that only moves when told to."""

    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs) -> None:
        self.now += timedelta(**kwargs)


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _folder_reference_hash(files: dict[str, bytes]) -> str:
    """The documented folder format, written out independently: sorted names, NUL, size, bytes."""
    digest = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


@pytest.fixture
def reg(tmp_path):
    with ModelRegistry(tmp_path / "outputs" / "registry.db") as registry:
        yield registry


def test_file_checksum_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000  # > 1 MiB, so the chunked reader crosses a chunk boundary
    path = _write(tmp_path / "w.bin", data)
    assert compute_checksum(path) == hashlib.sha256(data).hexdigest()


def test_folder_checksum_covers_names_and_order(tmp_path):
    files = {"config.json": b"{}", "sub/b.safetensors": b"\x01\x02", "a.txt": b"xyz"}
    for name, data in files.items():
        _write(tmp_path / "m" / name, data)
    assert compute_checksum(tmp_path / "m") == _folder_reference_hash(files)
    (tmp_path / "m" / "a.txt").rename(tmp_path / "m" / "c.txt")  # same bytes, new name
    renamed = {"config.json": b"{}", "sub/b.safetensors": b"\x01\x02", "c.txt": b"xyz"}
    assert compute_checksum(tmp_path / "m") == _folder_reference_hash(renamed)
    assert _folder_reference_hash(renamed) != _folder_reference_hash(files)


def test_register_get_list_models(reg, tmp_path):
    data = b"w" * 3 * 2**20
    file_path = _write(tmp_path / "outputs" / "s1" / "m.bin", data)
    folder = tmp_path / "outputs" / "s1" / "folder"
    _write(folder / "x.bin", b"abc")
    m1 = reg.register_model(session_id="s1", phase_name="cognate", model_name="a",
                            model_path=file_path, metadata={"seed": 1}, parameter_count=123)
    m2 = reg.register_model(session_id="s1", phase_name="evomerge", model_name="b", model_path=folder)
    row = reg.get_model(m1)
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
    assert row["size_mb"] == pytest.approx(3.0)
    assert row["metadata"] == {"seed": 1} and row["parameter_count"] == 123
    assert reg.get_model(m2)["metadata"] == {} and reg.get_model(m2)["size_mb"] == 3 / 2**20
    assert [m["id"] for m in reg.list_models()] == [m1, m2]
    assert [m["id"] for m in reg.list_models(phase_name="evomerge")] == [m2]
    assert reg.list_models(session_id="other") == []
    assert reg.latest_model("s1", "cognate")["id"] == m1
    assert datetime.fromisoformat(row["created_at"]).utcoffset() == timedelta(0)


def test_register_errors(reg, tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        reg.register_model(session_id="s", phase_name="p", model_name="m",
                           model_path=tmp_path / "missing")
    path = _write(tmp_path / "m.bin", b"x")
    with pytest.raises(ValueError, match="metadata must be a dict"):
        reg.register_model(session_id="s", phase_name="p", model_name="m", model_path=path,
                           metadata=[1, 2])
    with pytest.raises(UnknownRecordError, match="unknown model id 99"):
        reg.get_model(99)
    assert reg.list_models() == []


def test_verify_detects_modified_and_missing_files(reg, tmp_path):
    path = _write(tmp_path / "model" / "weights.bin", b"original")
    model_id = reg.register_model(session_id="s", phase_name="p", model_name="m",
                                  model_path=tmp_path / "model")
    assert reg.verify_model(model_id) == str(tmp_path / "model")
    registered = reg.get_model(model_id)["sha256"]
    path.write_bytes(b"tampered")
    with pytest.raises(ChecksumMismatchError) as info:
        reg.verify_model(model_id)
    message = str(info.value)
    assert str(tmp_path / "model") in message and registered in message
    assert compute_checksum(tmp_path / "model") in message
    path.unlink()
    (tmp_path / "model").rmdir()
    with pytest.raises(ModelNotFoundError, match="are gone"):
        reg.verify_model(model_id)


def test_sessions_lifecycle(reg):
    created = reg.create_session("s1", {"params": "smoke", "seed": 3})
    assert created["status"] == "created" and created["config"] == {"params": "smoke", "seed": 3}
    with pytest.raises(SessionExistsError, match="already exists"):
        reg.create_session("s1", {})
    assert reg.create_session("s1", {"params": "cpu"}, exist_ok=True)["config"] == {"params": "cpu"}
    updated = reg.update_session("s1", status="running", current_phase="cognate", progress=0.25)
    assert (updated["status"], updated["current_phase"], updated["progress"]) == \
        ("running", "cognate", 0.25)
    with pytest.raises(ValueError, match="valid values: created, running"):
        reg.update_session("s1", status="bogus")
    with pytest.raises(ValueError, match="progress"):
        reg.update_session("s1", progress=25)
    with pytest.raises(UnknownRecordError, match=r"unknown session 'nope'.*\['s1'\]"):
        reg.get_session("nope")
    reg.create_session("s2")
    assert [s["id"] for s in reg.list_sessions()] == ["s1", "s2"]
    assert [s["id"] for s in reg.list_sessions(status="running")] == ["s1"]


def test_phase_runs_and_handoffs(tmp_path):
    clock = FakeClock(datetime(2025, 1, 1, tzinfo=timezone.utc))
    with ModelRegistry(tmp_path / "r.db", clock=clock) as reg:
        run = reg.start_phase_run("s", "cognate")
        clock.advance(seconds=90)
        done = reg.finish_phase_run(run, "completed", metrics={"loss": 1.5})
        assert done["duration_s"] == 90.0 and done["metrics"] == {"loss": 1.5}
        assert done["started_at"] == "2025-01-01T00:00:00.000000+00:00"
        with pytest.raises(ValueError, match="already 'completed'"):
            reg.finish_phase_run(run, "failed")
        with pytest.raises(ValueError, match="valid values: completed, failed"):
            reg.finish_phase_run(reg.start_phase_run("s", "evomerge"), "running")
        failed = reg.finish_phase_run(reg.start_phase_run("s", "evomerge"), "failed", error="OOM")
        assert failed["error"] == "OOM" and failed["status"] == "failed"
        assert [r["phase_name"] for r in reg.list_phase_runs("s")] == ["cognate", "evomerge",
                                                                       "evomerge"]
        model = reg.register_model(session_id="s", phase_name="cognate", model_name="m",
                                   model_path=_write(tmp_path / "m.bin", b"1"))
        reg.record_handoff("s", "cognate", model, "evomerge", True, {"n_models": 3})
        reg.record_handoff("s", "evomerge", None, "quietstar", False, {"reason": "no model"})
        handoffs = reg.list_handoffs("s")
        assert [(h["ok"], h["validation"]) for h in handoffs] == \
            [(True, {"n_models": 3}), (False, {"reason": "no model"})]
        with pytest.raises(UnknownRecordError):
            reg.record_handoff("s", "a", 999, "b", True, {})


def test_wal_mode_and_rows_survive_reopen(tmp_path):
    db = tmp_path / "r.db"
    with ModelRegistry(db) as reg:
        assert reg.journal_mode() == "wal"
        reg.create_session("s", {"k": [1, 2]})
        model_id = reg.register_model(session_id="s", phase_name="p", model_name="m",
                                      model_path=_write(tmp_path / "m.bin", b"z"))
    assert reg.closed
    with pytest.raises(Exception, match="closed"):
        reg.get_model(model_id)
    # TRUNCATE checkpoint emptied the WAL into the main file
    assert not (tmp_path / "r.db-wal").exists() or (tmp_path / "r.db-wal").stat().st_size == 0
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent setting
    assert raw.execute("SELECT model_name FROM models").fetchall() == [("m",)]
    raw.close()
    with ModelRegistry(db) as again:
        assert again.get_session("s")["config"] == {"k": [1, 2]}
        assert again.get_model(model_id)["sha256"] == hashlib.sha256(b"z").hexdigest()


def _sessions_with_models(reg, clock, root, n):
    """n sessions, one day apart, each with a model folder under root/<session>."""
    for i in range(n):
        session = f"s{i}"
        reg.create_session(session, {"i": i})
        _write(root / session / "model" / "w.bin", bytes([i]))
        model = reg.register_model(session_id=session, phase_name="p", model_name="m",
                                   model_path=root / session / "model")
        reg.finish_phase_run(reg.start_phase_run(session, "p"), "completed")
        reg.record_handoff(session, "p", model, "q", True, {})
        clock.advance(days=1)


def test_cleanup_keep_newest(tmp_path):
    clock = FakeClock(datetime(2025, 3, 1, tzinfo=timezone.utc))
    root = tmp_path / "outputs"
    with ModelRegistry(root / "registry.db", clock=clock) as reg:
        _sessions_with_models(reg, clock, root, 4)
        dry = reg.cleanup(keep_sessions=1, dry_run=True)
        assert dry["sessions"] == ["s2", "s1", "s0"] and dry["phase_runs"] == 3
        assert len(reg.list_sessions()) == 4 and (root / "s0" / "model").exists()
        report = reg.cleanup(keep_sessions=1)
        assert report["sessions"] == ["s2", "s1", "s0"] and report["handoffs"] == 3
        assert sorted(report["deleted_paths"]) == [str(root / f"s{i}" / "model") for i in range(3)]
        assert [s["id"] for s in reg.list_sessions()] == ["s3"]
        assert [m["session_id"] for m in reg.list_models()] == ["s3"]
        assert len(reg.list_phase_runs("s0")) == 0 and reg.list_handoffs("s0") == []
        assert not (root / "s0" / "model").exists() and (root / "s3" / "model" / "w.bin").exists()
        assert (root / "registry.db").exists()


def test_cleanup_max_age(tmp_path):
    clock = FakeClock(datetime(2025, 3, 1, tzinfo=timezone.utc))
    root = tmp_path / "outputs"
    with ModelRegistry(root / "registry.db", clock=clock) as reg:
        _sessions_with_models(reg, clock, root, 4)  # created Mar 1, 2, 3, 4; clock now Mar 5
        report = reg.cleanup(max_age_days=2.5)  # cutoff Mar 2 12:00
        assert report["sessions"] == ["s1", "s0"]
        report = reg.cleanup(max_age_days=0.5, now=datetime(2025, 3, 4, 6, tzinfo=timezone.utc))
        assert report["sessions"] == ["s2"]  # s3 (Mar 4 00:00) is only 6 h old at that moment
        assert [s["id"] for s in reg.list_sessions()] == ["s3"]
        with pytest.raises(ValueError, match="needs a policy"):
            reg.cleanup()
        with pytest.raises(ValueError, match="keep_sessions"):
            reg.cleanup(keep_sessions=-1)


def test_cleanup_never_deletes_outside_outputs_root(tmp_path):
    root = tmp_path / "outputs"
    outside = _write(tmp_path / "precious" / "model.bin", b"keep me")
    inside = _write(root / "old" / "model.bin", b"old")
    link = root / "old" / "link"
    link.symlink_to(tmp_path / "precious", target_is_directory=True)
    with ModelRegistry(root / "registry.db") as reg:
        for name, path in (("out", outside), ("in", inside), ("link", link), ("root", root)):
            reg.register_model(session_id="old", phase_name="p", model_name=name, model_path=path)
        reg.register_model(session_id="new", phase_name="p", model_name="shared",
                                    model_path=_write(root / "shared.bin", b"s"))
        reg.register_model(session_id="old", phase_name="p", model_name="shared2",
                           model_path=root / "shared.bin")
        report = reg.cleanup(keep_sessions=1)
    assert report["sessions"] == ["old"]
    assert report["deleted_paths"] == [str(inside)]
    reasons = {item["path"]: item["reason"] for item in report["skipped_paths"]}
    assert reasons[str(outside)].startswith("outside outputs_root")
    assert reasons[str(link)].startswith("outside outputs_root")  # link resolves outside
    assert reasons[str(root)].startswith("outside outputs_root")  # never the root itself
    assert reasons[str(root / "shared.bin")] == "still registered by a kept session"
    assert outside.read_bytes() == b"keep me" and not inside.exists()
    assert (root / "shared.bin").exists() and (root / "registry.db").exists()


def _register_many(args):
    """Worker: its own registry on the shared file, ``count`` registrations."""
    db, model_path, worker, count, start_at = args
    with ModelRegistry(db, timeout_s=10.0) as reg:
        time.sleep(max(0.0, start_at - time.time()))  # all four start writing at the same moment
        for i in range(count):
            reg.register_model(session_id=f"w{worker}", phase_name="p", model_name=f"m{i}",
                               model_path=model_path, metadata={"worker": worker, "i": i})
    return worker


def test_concurrent_writers(tmp_path):
    db = tmp_path / "registry.db"
    model_path = _write(tmp_path / "m.bin", b"weights")
    context = mp.get_context("spawn")  # fresh interpreters: forking a process that holds torch threads is unsafe
    started = time.perf_counter()
    with context.Pool(4) as pool:
        jobs = [(db, model_path, w, 200, time.time() + 1.0) for w in range(4)]
        assert sorted(pool.map(_register_many, jobs)) == [0, 1, 2, 3]
    assert time.perf_counter() - started < 20
    with ModelRegistry(db) as reg:
        models = reg.list_models()
        assert len(models) == 800
        assert len({(m["metadata"]["worker"], m["metadata"]["i"]) for m in models}) == 800
        assert [len(reg.list_models(session_id=f"w{w}")) for w in range(4)] == [200] * 4


def test_retries_when_another_process_holds_the_write_lock(tmp_path):
    """A writer that outlasts the busy timeout is waited out by the retry loop, not reported."""
    db = tmp_path / "r.db"
    model_path = _write(tmp_path / "m.bin", b"w")
    with ModelRegistry(db, timeout_s=0.05) as reg:
        blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock like a slow process would
        timer = threading.Timer(0.4, lambda: blocker.execute("COMMIT"))
        timer.start()
        started = time.perf_counter()
        model_id = reg.register_model(session_id="s", phase_name="p", model_name="m",
                                      model_path=model_path)
        assert time.perf_counter() - started >= 0.35  # it really had to wait for the blocker
        timer.join()
        blocker.close()
        assert reg.get_model(model_id)["model_name"] == "m"
    with ModelRegistry(db, timeout_s=0.01, max_retries=1) as reg:
        blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            reg.create_session("x")
        blocker.execute("ROLLBACK")
        blocker.close()


def test_corrupt_database_file_is_named_and_left_alone(tmp_path):
    db = tmp_path / "registry.db"
    db.write_bytes(b"not a database, just garbage bytes " * 200)
    with pytest.raises(CorruptRegistryError, match=f"{db}.*not a SQLite database"):
        ModelRegistry(db)
    assert db.read_bytes().startswith(b"not a database")
    assert issubclass(CorruptRegistryError, RegistryError)
