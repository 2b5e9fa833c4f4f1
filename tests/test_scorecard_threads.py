"""The scorecard scores with the session's own thread count (a loaded machine's spinning threads made the same
scorecard 28x slower), and the guard's question pools are generated once per process."""
import torch
import yaml

from forgelib.scorecard import _stored_run, _threads
from forgelib.suite import _pool, questions


def test_threads_are_set_for_the_block_and_restored():
    before = torch.get_num_threads()
    with _threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_the_stored_run_section_is_the_last_phases(tmp_path):
    phase = tmp_path / "08_compression"
    (phase / "models" / "final").mkdir(parents=True)
    (phase / "params.yaml").write_text(yaml.safe_dump({"run": {"threads": 2, "seed": 3}}))
    assert _stored_run([{"path": phase / "models" / "final"}]) == {"threads": 2, "seed": 3}
    (phase / "params.yaml").write_text("guard: {}\n")
    assert _stored_run([{"path": phase / "models" / "final"}]) == {}


def test_a_pool_is_generated_once_and_its_prefixes_are_fresh_lists():
    _pool.cache_clear()
    first = questions("logic", (1, 2), 30, 7, pool=200)
    again = questions("logic", (1, 2), 50, 7, pool=200)
    assert _pool.cache_info().misses == 1 and _pool.cache_info().hits == 1
    assert again[:30] == first
    first.clear()
    assert questions("logic", (1, 2), 30, 7, pool=200) == again[:30]
