"""Notebook rough edges: strict JSON reports, repo-relative artifacts, widgets' initial state and submit
behaviour, readable tables and plots, the upstream a standalone phase took."""
import json
import math

import numpy as np
import pytest

from forgelib import paths
from forgelib.phases.base import PhaseContext, PhaseSpec
from forgelib.results import GateCheck, PhaseResult, write_json_atomic


def test_json_writer_writes_nan_and_inf_as_null(tmp_path):
    data = {"a": float("nan"), "b": [1.0, float("inf"), np.float32("nan")], "c": {"d": -math.inf}, "e": 2.5}
    path = write_json_atomic(tmp_path / "report.json", data)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    assert strict == {"a": None, "b": [1.0, None, None], "c": {"d": None}, "e": 2.5}


def test_nan_gate_value_round_trips_through_null(tmp_path):
    PhaseResult("p", 1, "s", gate=[GateCheck("loss", float("nan"), 0.0, "<")]).save(tmp_path)
    assert json.loads((tmp_path / "result.json").read_text())["gate"][0]["value"] is None
    back = PhaseResult.load(tmp_path)
    assert math.isnan(back.gate[0].value) and not back.gate_passed


def test_report_artifact_is_repo_relative(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_ROOT", str(tmp_path))
    folder = tmp_path / "outputs" / "s" / "01_x"
    ctx = PhaseContext(spec=PhaseSpec(1, "x", "m", "n.ipynb"), params=None, run=None, session="s", dir=folder,
                       params_file=tmp_path / "p.yaml", upstream=None, registry=None, tracker=None,
                       result=PhaseResult("x", 1, "s"))
    ctx.write_report({"acc": float("nan")})
    assert ctx.result.artifacts["report"] == "outputs/s/01_x/report.json"
    assert json.loads(paths.resolve(ctx.result.artifacts["report"]).read_text()) == {"acc": None}


@pytest.mark.parametrize("n", [2, 3, 4])
def test_merge_weight_slider_starts_on_its_grid_at_the_uniform_weight(n):
    from forgelib.viz.evomerge import weight_slider

    slider = weight_slider("reasoning", n)
    steps = (slider.value - slider.min) / slider.step
    assert abs(steps - round(steps)) < 1e-9, "the browser would snap an off-grid value"
    assert slider.value == pytest.approx(1 / n, abs=1e-12)
    assert slider.readout_format == ".3f" and not slider.continuous_update
