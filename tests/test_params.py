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
