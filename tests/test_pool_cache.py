"""The guard's question pools kept on disk (forgelib.data.pool_cache): the same questions as drawn afresh, a damaged
or tampered file ignored (drawn again, never a changed question), a name that carries the generator code's digest."""
import json

import pytest

from forgelib import paths, suite
from forgelib.data import pool_cache
from forgelib.data.tasks import FAMILIES


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path))
    monkeypatch.delenv("FORGE_QUESTION_CACHE", raising=False)
    suite._pool.cache_clear()
    yield tmp_path
    suite._pool.cache_clear()


def _drawn(family, levels, size, seed, monkeypatch):
    """The pool drawn with the cache off (the reference)."""
    monkeypatch.setenv("FORGE_QUESTION_CACHE", "0")
    suite._pool.cache_clear()
    out = suite.questions(family, levels, size, seed)
    monkeypatch.delenv("FORGE_QUESTION_CACHE")
    suite._pool.cache_clear()
    return out


def test_a_stored_pool_is_the_drawn_pool_for_every_family(fresh, monkeypatch):
    for family in sorted(FAMILIES):
        want = _drawn(family, (1, 2), 60, 7, monkeypatch)
        assert suite.questions(family, (1, 2), 60, 7) == want  # drawn and stored
        stored = pool_cache.cache_file(f"{family}-1-2-60-7")
        assert stored.is_file() and stored.parent == paths.outputs_root() / ".cache" / "questions"
        suite._pool.cache_clear()
        assert suite.questions(family, (1, 2), 60, 7) == want  # read back
        assert pool_cache.load(f"{family}-1-2-60-7", family, 60) == want


@pytest.mark.parametrize("damage", ["not json", "no rows", "a row edited", "another key", "wrong family", "bad row",
                                    "too many"])
def test_a_damaged_or_tampered_file_is_ignored_and_drawn_again(fresh, monkeypatch, damage):
    want = _drawn("arith", (1, 1), 20, 3, monkeypatch)
    suite.questions("arith", (1, 1), 20, 3)
    path = pool_cache.cache_file("arith-1-1-20-3")
    stored = json.loads(path.read_text())
    rows = stored["rows"]
    assert stored["key"] == "arith-1-1-20-3" and stored["sha256"] == pool_cache.stored_digest(rows)
    edited = {"not json": "{", "no rows": {**stored, "rows": []}, "a row edited": {**stored, "rows": [
        {**rows[0], "answer": "0"}, *rows[1:]]}, "another key": {**stored, "key": "arith-1-1-20-4"},
        "wrong family": {**stored, "rows": [{**r, "family": "logic"} for r in rows]},
        "bad row": {**stored, "rows": [{"prompt": 1}], "sha256": pool_cache.stored_digest([{"prompt": 1}])},
        "too many": {**stored, "rows": rows * 2, "sha256": pool_cache.stored_digest(rows * 2)}}[damage]
    path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    suite._pool.cache_clear()
    assert suite.questions("arith", (1, 1), 20, 3) == want
    assert json.loads(path.read_text()) == stored  # drawn again and written anew


def test_the_file_name_follows_the_generator_code(fresh, monkeypatch):
    suite.questions("logic", (1, 1), 10, 1)
    before = pool_cache.cache_file("logic-1-1-10-1")
    monkeypatch.setattr(pool_cache, "source_digest", lambda: "0" * 20)  # as if a family's code had changed
    assert pool_cache.cache_file("logic-1-1-10-1") != before and pool_cache.load("logic-1-1-10-1", "logic", 10) is None
    assert pool_cache.cache_file("../x-1-1-10-1") is None and pool_cache.cache_file("logic-1-1-10-1/..") is None


def test_off_switch_writes_nothing(fresh, monkeypatch):
    monkeypatch.setenv("FORGE_QUESTION_CACHE", "0")
    suite.questions("modular", (1, 1), 10, 2)
    assert not (fresh / ".cache").exists()
