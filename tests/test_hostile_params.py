"""Hostile parameters are refused before a run creates anything: every section and key (of phases the run does not
select too, dict-typed fields included) is checked, numbers are finite, levels exist, the model's shape holds, the
device exists, and what the registry stores is bounded. ``forge run`` says ``forge: ...`` in one sentence naming the
key and exits 2, leaving the outputs root as it was (no session folder, lock, registry file or row)."""
import json
import re
import resource
import time

import pytest
import torch

from forgelib import cli
from forgelib.params import ParameterError
from forgelib.registry import ModelRegistry


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    """A fresh outputs root that must stay absent; no CUDA (as on this machine), whatever the machine; a phase that
    starts fails the test at once (the refusal must come first)."""
    import forgelib.phases
    import forgelib.pipeline

    def started(*args, **kwargs):
        raise AssertionError("a phase started: the parameters were not refused before the run")

    out = tmp_path / "outputs"
    monkeypatch.setenv("FORGE_OUTPUTS", str(out))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(forgelib.pipeline, "_run_in_process", started)
    monkeypatch.setattr(forgelib.phases, "run_phase", started)
    return out


def forge(capsys, *args) -> tuple[int, str]:
    """``forge ARGS`` in this process (a subprocess would import torch again: seconds per case): (status, stderr)."""
    status = cli.main(list(args))
    return status, capsys.readouterr().err


def _refused(capsys, outputs, *args) -> str:
    """The one-line ``forge: ...`` message of a request refused with status 2 that created nothing."""
    status, err = forge(capsys, *args)
    assert status == 2, err
    assert err.startswith("forge: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert len(err) < 600, err
    assert not outputs.exists(), sorted(p.name for p in outputs.rglob("*"))
    return err


@pytest.mark.parametrize("setting, match", [
    ("cognate.levels=[0,99]", r"cognate: levels must be \(lowest, highest\) with 1 <= lowest <= highest <= 10"),
    ("cognate.trunk.lr=.inf", r"cognate\.trunk\.lr: inf is not a finite number"),
    ("cognate.optimizer.lr=.nan", r"cognate\.optimizer\.lr: nan is not a finite number"),
    ("guard.margin=.nan", r"guard\.margin: nan is not a finite number"),
    ("cognate.model.num_attention_heads=3", r"cognate\.model: num_attention_heads \(3\) must divide hidden_size"),
    ("cognate.level_weights={99: 2}", r"cognate: level_weights: levels \[99\] are not levels 1\.\.10"),
    ("run.device=cuda:7", r"run\.device: device .cuda:7. requested but CUDA is not available; .*run\.device=auto"),
    ("run.device=gpu", r"run: device must be one of auto, cpu, cuda, cuda:N, mps; got 'gpu'"),
    ("curriculum.frontier.x=1", r"curriculum: frontier: unknown key\(s\) \['x'\]; allowed keys: \['endpoint'"),
    ("bitnet.optimizer.lrr=0.1", r"bitnet: optimizer: unknown key\(s\) \['lrr'\]; allowed keys of MuGrokfastConfig"),
    ("evomerge.runtime.n_cylces=2", r"evomerge: runtime: unknown key\(s\) \['n_cylces'\]; allowed keys"),
    ("experts.cem.elite=9", r"experts: cem: elite \(9\) must not exceed population \(6\)"),
    ("experts.svf.rescale=maybe", r"experts: svf\.rescale: expected bool, got str \('maybe'\)"),
])
def test_an_impossible_value_is_refused_before_anything_is_created(capsys, outputs, setting, match):
    err = _refused(capsys, outputs, "run", "--no-notebooks", "--set", setting)
    assert err.startswith("forge: ") and "parameters/smoke.yaml" in err
    assert re.search(match, err), err


def test_sections_of_phases_the_run_does_not_select_are_checked(capsys, outputs):
    err = _refused(capsys, outputs, "run", "--no-notebooks", "--phases", "1", "--set", "compression.levels=[0,99]")
    assert "compression: levels must be" in err


def test_a_device_this_machine_lacks_is_refused_by_forge_phase_too(capsys, outputs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    err = _refused(capsys, outputs, "phase", "cognate", "--set", "run.device=cuda:7")
    assert "run.device: device 'cuda:7' requested but only 1 CUDA device(s) exist" in err


def test_an_api_key_in_the_parameters_is_refused_and_never_echoed(capsys, outputs, monkeypatch):
    """The frontier client reads its key from the environment only (OPENAI_API_KEY unless api_key_env names
    another variable): a key in the parameters would be stored in the registry, params.yaml and the tracker."""
    monkeypatch.setenv("OPENAI_API_KEY", "")
    secret = "sk-live-0123456789abcdef"
    err = _refused(capsys, outputs, "run", "--no-notebooks", "--set", f"curriculum.frontier.api_key={secret}")
    assert "unknown key(s) ['api_key']" in err
    assert "the frontier client reads it only from the environment variable OPENAI_API_KEY" in err
    assert secret not in err
    err = _refused(capsys, outputs, "run", "--no-notebooks", "--set", f"curriculum.frontier.api_key_env={secret}")
    assert "api_key_env must be the name of an environment variable" in err and secret not in err
    err = _refused(capsys, outputs, "run", "--no-notebooks", "--set", f"curriculum.frontier.model=[{secret}]")
    assert "frontier.model: expected Optional[str] (the value is not shown" in err and secret not in err


def test_a_python_tag_in_set_is_refused_with_status_2(capsys, outputs):
    err = _refused(capsys, outputs, "run", "--set", "k=!!python/object/apply:os.system ['touch /tmp/forge-pwned']")
    assert err.startswith("forge: --set k: refused: could not determine a constructor for the tag")
    assert _refused(capsys, outputs, "run", "--set", "no-equals-sign") == \
        "forge: --set expects KEY=VALUE, got 'no-equals-sign'\n"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_short_set_that_expands_to_megabytes_is_refused_before_it_is_stored(capsys, outputs):
    """300 characters repeated by aliases: 900 KB once written out (params.yaml, the tracker's config). Counted
    without writing it out: refused at once, the message naming the section and the key."""
    from forgelib.params import MAX_STORED_BYTES

    value = "[&a " + "x" * 300 + ", " + ", ".join(["*a"] * 3_000) + "]"
    before, start = _peak_mb(), time.perf_counter()
    err = _refused(capsys, outputs, "run", "--no-notebooks", "--set", f"experts.answer_prefixes={value}")
    assert time.perf_counter() - start < 3.0 and _peak_mb() - before < 50
    assert f"experts: more than {MAX_STORED_BYTES // 1024} KB once stored (most of it in 'answer_prefixes')" in err


def test_a_parameter_file_that_expands_to_megabytes_is_refused(capsys, outputs, tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("compression:\n  answer_prefixes: [&a " + "y" * 1000 + ", " + ", ".join(["*a"] * 2_000) + "]\n")
    before, start = _peak_mb(), time.perf_counter()
    err = _refused(capsys, outputs, "run", "--no-notebooks", "--params", str(path))
    assert time.perf_counter() - start < 3.0 and _peak_mb() - before < 50
    assert "big.yaml: compression: more than 256 KB once stored" in err


def test_a_huge_value_is_shown_cut_in_messages(capsys, outputs):
    err = _refused(capsys, outputs, "run", "--no-notebooks", "--set", "run.device=" + "z" * 100_000)
    assert "run: device must be one of" in err and "(100002 characters)" in err
    err = _refused(capsys, outputs, "run", "--no-notebooks", "--set",
                   "cognate.vocab_size=[&a " + "w" * 5000 + ", " + ", ".join(["*a"] * 100) + "]")
    assert "cognate.vocab_size: expected int, got list" in err


def test_the_stored_size_is_counted_without_writing_it_out():
    from forgelib.params import MAX_STORED_BYTES, check_stored_size, stored_size

    value = {"a": ["x" * 1000] * 1_000_000}  # 1 GB as JSON, 8 MB in memory
    start = time.perf_counter()
    assert stored_size(value, MAX_STORED_BYTES) > MAX_STORED_BYTES
    assert time.perf_counter() - start < 0.5
    with pytest.raises(ParameterError, match=r"^cfg: more than 256 KB once stored \(most of it in 'a'\)"):
        check_stored_size(value, "cfg")
    small = {"params_file": "parameters/smoke.yaml", "overrides": {"cognate.trunk.steps": 20}, "phases": "all"}
    assert abs(stored_size(small) - len(json.dumps(small))) < 20


def test_the_registry_refuses_a_session_config_over_the_cap(tmp_path):
    from forgelib.registry import ConfigTooLargeError

    with ModelRegistry(tmp_path / "registry.db") as reg:
        start = time.perf_counter()
        with pytest.raises(ConfigTooLargeError, match=r"session 's1': its config would take more than 256 KB"):
            reg.create_session("s1", {"overrides": {"curriculum.frontier.x": ["lol" * 100] * 1_000_000}})
        assert time.perf_counter() - start < 1.0
        assert reg.list_sessions() == []
        reg.create_session("s2", {"overrides": {"cognate.trunk.steps": 20}})
        assert [s["id"] for s in reg.list_sessions()] == ["s2"]
