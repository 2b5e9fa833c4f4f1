"""Strict parameter loading: every file in parameters/ loads; typos and wrong types name the problem."""
import dataclasses
from typing import Literal, Optional

import pytest

from forgelib import paths
from forgelib.params import ParameterError, RunParams, build_dataclass, load_section, merge_overrides
from forgelib.phases import PHASES
from forgelib.phases.base import load_phase_params


@dataclasses.dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10


@dataclasses.dataclass
class Outer:
    name: str = "x"
    mode: Literal["a", "b"] = "a"
    inner: Inner = dataclasses.field(default_factory=Inner)
    mix: dict[str, float] = dataclasses.field(default_factory=dict)
    levels: tuple[int, int] = (1, 3)
    limit: Optional[int] = None


def test_every_parameter_file_loads_into_every_phase():
    files = sorted((paths.repo_root() / "parameters").glob("*.yaml"))
    assert {"smoke.yaml", "cpu.yaml", "gpu.yaml"} <= {f.name for f in files}
    for f in files:
        for spec in PHASES:
            run, params = load_phase_params(spec, f, None, PHASES)
            assert isinstance(run, RunParams)
            assert isinstance(params, spec.params_cls)


@pytest.mark.parametrize("name", ["smoke", "cpu", "gpu"])
def test_every_parameter_file_has_a_guard_whose_first_round_fits_its_cap(name):
    """The shared ``guard`` section loads, and the questions its rule asks at the guard's margin and at each phase's
    own stated loss (Phase 4's and Phase 8's allowed_loss) fit under max_questions: no family is capped by
    construction, which would leave the test short of the power the section states."""
    import yaml

    from forgelib.phases.base import load_guard_params
    from forgelib.suite import GuardParams

    file = paths.repo_root() / "parameters" / f"{name}.yaml"
    guard = load_guard_params(file, None, PHASES)
    assert isinstance(guard, GuardParams)
    assert guard.margin == yaml.safe_load(file.read_text())["guard"]["margin"]
    assert guard.needed() <= guard.max_questions
    for phase in ("bitnet", "compression"):
        assert guard.needed(_load(phase, None, name).allowed_loss) <= guard.max_questions, phase


@pytest.mark.parametrize("key, value, match", [
    ("guard.marign", 0.1, r"guard: unknown key\(s\) \['marign'\]"),
    ("guard.margin", 0.0, r"guard: margin must lie in \(0, 1\), got 0"),
    ("guard.chain_margin", 1.5, r"guard: chain_margin must lie in \(0, 1\)"),
    ("guard.power", 1.0, r"guard: power must lie in \[0.5, 1\)"),
    ("guard.discordance", 0.0, r"guard: discordance must lie in \(0, 1\]"),
    ("guard.max_questions", 0, r"guard: max_questions and batch_size must be >= 1"),
])
def test_bad_guard_values_name_the_key(key, value, match):
    from forgelib.phases.base import load_guard_params

    with pytest.raises(ParameterError, match=match):
        load_guard_params(paths.repo_root() / "parameters" / "smoke.yaml", {key: value}, PHASES)


@pytest.mark.parametrize("phase, key", [
    ("evomerge", "gate_z"), ("evomerge", "test_per_family"), ("quietstar", "gate_z"), ("quietstar", "acc_margin"),
    ("bitnet", "min_acc_retention"), ("experts", "gate_z"), ("experts", "min_expert_gain"),
    ("compression", "gate_z"), ("compression", "min_acc_retention"),
])
def test_removed_gate_keys_are_refused_by_name(phase, key):
    """The gates' old keys (replaced by one statistical rule: margins and the guard section) are unknown keys now:
    an old parameter file fails on them instead of running with a setting that is ignored."""
    with pytest.raises(ParameterError, match=rf"{phase}: unknown key\(s\) \['{key}'\]"):
        _load(phase, {f"{phase}.{key}": 1.0})


def test_nested_values_and_int_to_float():
    obj = build_dataclass(Outer, {"inner": {"lr": 1, "steps": 5}, "mix": {"a": 2}, "levels": [2, 4]}, "t")
    assert obj.inner.lr == 1.0 and isinstance(obj.inner.lr, float)
    assert obj.mix == {"a": 2.0} and obj.levels == (2, 4)


@pytest.mark.parametrize("data, match", [
    ({"nmae": "y"}, r"unknown key\(s\) \['nmae'\].*allowed keys of Outer.*'name'"),
    ({"inner": {"stpes": 3}}, r"t\.inner: unknown key\(s\) \['stpes'\]"),
    ({"inner": {"steps": "ten"}}, r"t\.inner\.steps: expected int, got str"),
    ({"inner": {"steps": True}}, r"expected int, got a boolean"),
    ({"mode": "c"}, r"t\.mode: 'c' is not one of \['a', 'b'\]"),
    ({"levels": [1]}, r"expected 2 items"),
    ({"limit": "x"}, r"t\.limit"),
])
def test_bad_values_name_the_key(data, match):
    with pytest.raises(ParameterError, match=match):
        build_dataclass(Outer, data, "t")


def test_unknown_section_and_file_named(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("outer:\n  name: z\ncognte:\n  x: 1\n")
    with pytest.raises(ParameterError, match=r"p\.yaml: unknown section\(s\) \['cognte'\]"):
        load_section(f, "outer", Outer, known_sections=["run"])


def test_overrides_merge_nested_and_dotted(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("outer:\n  name: z\n  inner:\n    lr: 0.5\n")
    obj = load_section(f, "outer", Outer, {"outer": {"inner": {"steps": 7}}, "outer.name": "w"})
    assert (obj.name, obj.inner.lr, obj.inner.steps) == ("w", 0.5, 7)
    assert merge_overrides({"a": {"b": 1}}, {"a.c": 2}) == {"a": {"b": 1, "c": 2}}


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParameterError, match="not found"):
        load_section(tmp_path / "nope.yaml", "outer", Outer)
    bad = tmp_path / "bad.yaml"
    bad.write_text("outer: [1, 2\n")
    with pytest.raises(ParameterError, match="not valid YAML"):
        load_section(bad, "outer", Outer)


@pytest.mark.parametrize("name", ["smoke", "cpu", "gpu"])
def test_every_parameter_set_can_stream_its_phase1_training_data(name):
    """Each stage's stream serves batches with (almost) nothing too long for max_len, and the test sets of the
    phase's levels and headroom levels can be drawn: a bad budget fails here, not hours into a run."""
    from forgelib.data.tokenizer import train_tokenizer
    from forgelib.phases.cognate import ROLES, test_samples, training_batches
    from forgelib.data.tasks import build_mix, format_sample

    spec = next(s for s in PHASES if s.name == "cognate")
    _, params = load_phase_params(spec, paths.repo_root() / "parameters" / f"{name}.yaml", None, PHASES)
    corpus = build_mix({f: 1.0 for f in params.trunk.mix}, params.levels, 300, "train", 0)
    tok = train_tokenizer([format_sample(s, with_steps=True) for s in corpus], vocab_size=params.vocab_size)
    for stage in [params.trunk, *(getattr(params, r) for r in ROLES)]:
        batches = training_batches(tok, params, stage, 0)
        batch = next(batches)
        assert batch["input_ids"].shape[0] == params.batch_size
        assert batches.stats.dropped_long <= 0.01 * (batches.stats.samples + batches.stats.dropped_long)
    assert len(test_samples(params, 0)) == params.eval_per_family * 7
    if params.headroom_levels:
        assert len(test_samples(params, 1, levels=tuple(params.headroom_levels))) == params.eval_per_family * 7


def _load(phase: str, overrides: dict | None, name: str = "smoke"):
    spec = next(s for s in PHASES if s.name == phase)
    return load_phase_params(spec, paths.repo_root() / "parameters" / f"{name}.yaml", overrides, PHASES)[1]


@pytest.mark.parametrize("phase, key, value, match", [
    ("cognate", "cognate.trunk.steps", 0, r"cognate: trunk\.steps is 0 but there is no init_from"),
    ("cognate", "cognate.trunk.steps", -1, r"cognate\.trunk: steps must be >= 0, got -1"),
    ("cognate", "cognate.memory.steps", 0, r"cognate: memory\.steps must be >= 1, got 0"),
    ("cognate", "cognate.reasoning.steps", -5, r"cognate\.reasoning: steps must be >= 0, got -5"),
    ("cognate", "cognate.speed.n_cycles", 0, r"cognate\.speed: n_cycles must be > 0"),
    ("cognate", "cognate.memory.warmup_steps", -1, r"cognate\.memory: warmup_steps must be >= 0"),
    ("cognate", "cognate.model.hidden_size", 0, r"cognate\.model: hidden_size must be > 0"),
    ("cognate", "cognate.model.num_hidden_layers", -2, r"cognate\.model: num_hidden_layers must be > 0"),
    ("cognate", "cognate.batch_size", 0, r"cognate: batch_size must be > 0"),
    ("cognate", "cognate.vocab_size", -1, r"cognate: vocab_size must be > 0"),
    ("cognate", "cognate.max_len", 0, r"cognate: max_len must be > 0"),
    ("cognate", "cognate.train.log_every", 0, r"cognate\.train: log_every must be > 0"),
    ("cognate", "cognate.train.checkpoint_every", -1, r"cognate\.train: checkpoint_every must be >= 0"),
    ("cognate", "cognate.expected_gain", 0, r"cognate: expected_gain must be > 0"),
    ("cognate", "cognate.min_accuracy_gain", -1, r"cognate: min_accuracy_gain must lie in \(-1, 1\), got -1"),
    ("evomerge", "evomerge.budget", 0, r"evomerge: budget must be > 0, got 0"),
    ("evomerge", "evomerge.budget", -40, r"evomerge: budget must be > 0, got -40"),
    ("evomerge", "evomerge.fitness_per_family", 0, r"evomerge: fitness_per_family must be > 0"),
    ("evomerge", "evomerge.group_size", 0, r"evomerge: group_size must be > 0"),
    ("evomerge", "evomerge.layer_path_budget", -1, r"evomerge: layer_path_budget must be >= 0"),
    ("evomerge", "evomerge.finalists", 0, r"evomerge: finalists must be > 0"),
    ("evomerge", "evomerge.select_per_family", 0, r"evomerge: select_per_family must be > 0"),
    ("quietstar", "quietstar.test_per_family", 0, r"quietstar: test_per_family must be > 0"),
    ("experts", "experts.test_per_level", 0, r"experts: test_per_level must be > 0"),
    ("experts", "experts.unseen_per_level", 0, r"experts: unseen_per_level must be > 0"),
    ("compression", "compression.test_per_level", 0, r"compression: test_per_level must be > 0"),
    ("compression", "compression.sweep_questions", 0, r"compression: sweep_questions must be > 0"),
])
def test_non_positive_counts_sizes_and_budgets_are_refused(phase, key, value, match):
    with pytest.raises(ParameterError, match=match):
        _load(phase, {key: value})


def test_a_lora_stage_with_checkpoints_is_refused_naming_both():
    with pytest.raises(ParameterError, match=r"checkpoint_every is 10 but speed train\(s\) a LoRA adapter .*set "
                                             r"train\.checkpoint_every: 0 or lora_r: 0"):
        _load("cognate", {"cognate.speed.lora_r": 4, "cognate.train.checkpoint_every": 10})
    assert _load("cognate", {"cognate.speed.lora_r": 4}).speed.lora_r == 4


def test_train_config_refuses_non_positive_steps():
    from forgelib.train import TrainConfig

    with pytest.raises(ValueError, match=r"steps must be > 0, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"grad_clip must be None or > 0"):
        TrainConfig(grad_clip=-1.0)


def test_optimizer_keys_are_checked_when_parameters_load():
    with pytest.raises(ParameterError, match=r"cognate: optimizer: unknown key\(s\) \['lrr'\]; allowed keys of "
                                             r"MuGrokfastConfig: \[.*'lr'.*'weight_decay'"):
        _load("cognate", {"cognate.optimizer.lrr": 0.1})
    with pytest.raises(ParameterError, match=r"optimizer\.lr: expected float, got str \('fast'\)"):
        _load("cognate", {"cognate.optimizer.lr": "fast"})
    with pytest.raises(ParameterError, match=r"weight_decay.*>= 0"):
        _load("cognate", {"cognate.optimizer.weight_decay": -0.5})


def test_exponent_numbers_from_set_parse_as_floats():
    """YAML 1.1 reads ``1e6`` as a string; a float field takes it as the number it spells."""
    from forgelib.cli import _parse_set

    params = _load("cognate", _parse_set(["cognate.optimizer.lr=1e6", "cognate.reasoning.lr=5e-4",
                                          "cognate.min_disagreement=2E-2"]))
    assert params.optimizer["lr"] == 1e6 and isinstance(params.optimizer["lr"], float)
    assert params.reasoning.lr == 5e-4 and params.min_disagreement == 0.02
    with pytest.raises(ParameterError, match=r"cognate\.trunk\.steps: expected int, got str \('1e3'\)"):
        _load("cognate", _parse_set(["cognate.trunk.steps=1e3"]))
