"""Notebook rough edges: strict JSON reports, repo-relative artifacts, widgets' initial state and submit
behaviour, readable tables and plots, the upstream a standalone phase took."""
import html
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


def test_params_table_has_one_row_per_dotted_key():
    from forgelib.params import load_section
    from forgelib.phases.cognate import Params
    from forgelib.viz.tables import params_table

    from forgelib.phases import PHASES

    from forgelib.phases.base import SHARED_SECTIONS

    params = load_section(paths.resolve("parameters/smoke.yaml"), "cognate", Params, None,
                          {s.name for s in PHASES} | set(SHARED_SECTIONS))
    shown = params_table(params)
    table = shown.frame
    assert list(table.columns) == ["value"] and table.index.name == "parameter"
    assert {"vocab_size", "model", "trunk", "reasoning"} <= set(table.index)
    assert f"hidden_size={params.model.hidden_size}," in table.loc["model", "value"]
    assert table.loc["vocab_size", "value"] == str(params.vocab_size) and len(table) < 30
    assert "..." not in shown._repr_html_() and "..." not in repr(shown), "no value is cut short"


def test_pipeline_summary_is_one_row_per_phase_with_a_headline():
    from forgelib.phases import PHASES
    from forgelib.pipeline import PhaseOutcome, summary_table

    r1 = PhaseResult("cognate", 1, "s", status="ok", duration_s=12.34,
                     metrics={"trunk_loss_first": 5.0, "trunk_acc_mean": 0.66, "chance_mean": 0.19,
                              "trunk_tokens_per_s": 900.0})
    r2 = PhaseResult("evomerge", 2, "s", status="ok", metrics={
        "champion_method": "ties", "champion_test_acc": 0.7, "evaluations": 40, "guard_margin": 0.1,
        "guard_questions": 360, "guard_worst_family": "logic", "guard_worst_diff": -0.0417,
        "guard_pooled_diff": 0.0123},
        gate=[GateCheck("keeps_logic", -0.09, -0.1, ">")])
    table = summary_table([PhaseOutcome(PHASES[0], "completed", r1, None, 20.0),
                           PhaseOutcome(PHASES[1], "completed", r2, None, 9.0)])
    assert list(table.columns) == ["status", "gate", "seconds", "kept", "headline"]
    assert list(table.index) == ["01_cognate", "02_evomerge"]
    assert table.loc["01_cognate", "headline"] == "trunk_acc_mean 0.66 · chance_mean 0.19"
    assert table.loc["02_evomerge", "headline"] == "champion_method ties · champion_test_acc 0.7"
    assert table.loc["01_cognate", "seconds"] == 12.3
    # the guard in a few words: the pooled difference and the worst family (Phase 1 has no input to guard)
    assert table.loc["01_cognate", "kept"] == ""
    assert table.loc["02_evomerge", "kept"] == "all +0.012, worst logic -0.042 (margin 0.1)"
    assert table.loc["02_evomerge", "gate"] == "pass" and table.loc["01_cognate", "gate"] == "pass"


def test_loss_plot_has_a_y_label_and_fitness_plot_integer_generations(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from forgelib.tracking import JsonlTracker
    from forgelib.viz import plot_history
    from forgelib.viz.evomerge import plot_fitness

    with JsonlTracker(tmp_path / "metrics.jsonl") as t:
        for step in range(3):
            t.log({"trunk/loss": 3.0 - step}, step=step)
    assert plot_history(tmp_path / "metrics.jsonl").axes[0].get_ylabel() == "training loss"
    gens = [{"method": "ties", "best": 0.1 * i, "mean": 0.05 * i} for i in range(3)]
    fig = plot_fitness({"evolution": {"generations": gens}})
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_xticks() if 0 <= t <= 2]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_phase2_score_table_has_a_chance_row():
    from forgelib.viz.evomerge import chance_frame, score_frame

    # rows as Phase 2's test table writes them into the report (the guard's questions; answers left out)
    row = {"accuracy": 0.5, "per_family": {"arith": 0.4, "logic": 0.6}, "answer_nll": 0.2, "score": 0.49}
    report = {"test": {"trunk": row, "champion": dict(row, accuracy=0.55, score=0.54)},
              "settings": {"trunk": {"n_cycles": 2}},
              "chance": {"per_family": {"logic": 0.6, "arith": 0.0}, "overall": 0.3}}
    frame = score_frame(report)
    assert list(frame.index) == ["trunk", "champion", "chance"] and frame.loc["chance", "accuracy"] == 0.3
    assert frame.loc["champion", "accuracy"] == 0.55 and frame.loc["champion", "score"] == 0.54
    assert frame.loc["trunk", "settings"] == "n_cycles=2"
    assert chance_frame(report).loc["logic", "chance"] == 0.6


def test_guard_table_shows_each_family_and_the_pooled_suite(tmp_path, monkeypatch):
    from forgelib.stats import noninferior
    from forgelib.suite import GuardReport, write_guard
    from forgelib.viz.tables import guard_table

    monkeypatch.setenv("FORGE_ROOT", str(tmp_path))
    answers = {"arith": {"before": [1] * 30, "after": [1] * 30},
               "logic": {"before": [1] * 30, "after": [0] * 12 + [1] * 18}}
    families = {f: noninferior(f, a["before"], a["after"], 0.1) for f, a in answers.items()}
    pooled = noninferior("all", [1] * 60, [1] * 30 + answers["logic"]["after"], 0.1)
    report = GuardReport(0.1, families, pooled, answers, {"arith": (1, 2), "logic": (1, 1)}, 1.0,
                         ("phase-3 model", "packed ternary"), {f: [] for f in answers})
    path = write_guard(report, tmp_path / "outputs" / "s" / "04_bitnet")
    result = PhaseResult("bitnet", 4, "s", artifacts={"guard": paths.relative(path)})
    frame = guard_table(result)
    assert list(frame["family"]) == ["arith", "logic", "all (family mean)"]
    assert list(frame["levels"]) == ["1-2", "1-1", ""] and list(frame["verdict"]) == ["pass", "FAIL", "FAIL"]
    assert list(frame["n"]) == [30, 30, 60] and frame["lower_bound"][1] == families["logic"].lower
    assert (frame["bound"] == -0.1).all() and frame["diff"][1] == -0.4
    assert frame.attrs["note"] == "phase-3 model → packed ternary, margin 0.1: a family was lost"
    assert list(guard_table(PhaseResult("cognate", 1, "s"))["note"]) == ["this phase ran no guard"]


def test_chance_levels_of_phase2_test_samples():
    from forgelib.data.tasks import build_mix
    from forgelib.phases.evomerge import Params, chance_levels

    params = Params(families=["logic", "arith"], levels=(1, 1))
    samples = build_mix({"logic": 1.0, "arith": 1.0}, (1, 1), 40, "test", 0)
    chance = chance_levels(params, samples, seed=0)
    assert set(chance["per_family"]) == {"logic", "arith"}
    assert chance["per_family"]["logic"] > 0.2 and chance["per_family"]["arith"] < 0.2
    assert chance["overall"] == pytest.approx(sum(chance["per_family"].values()) / 2)


def test_context_table_names_the_upstream_and_how_it_was_chosen(tmp_path, monkeypatch):
    from forgelib.phases.cognate import Params
    from forgelib.viz.tables import context_table

    monkeypatch.setenv("FORGE_ROOT", str(tmp_path))
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "outputs"))
    upstream = PhaseResult("cognate", 1, "old-run", status="ok")
    ctx = PhaseContext(spec=PhaseSpec(2, "evomerge", "m", "n.ipynb"), params=Params(), run=None, session="new",
                       dir=tmp_path / "outputs" / "new" / "02_evomerge", params_file=tmp_path / "p.yaml",
                       upstream=upstream, registry=None, tracker=None, result=PhaseResult("evomerge", 2, "new"),
                       upstream_how="not given: the newest completed run")
    table = context_table(ctx).frame
    line = table.loc["upstream", "value"]
    assert "session old-run" in line and "outputs/old-run/01_cognate" in line and "not given" in line
    assert table.loc["session", "value"] == "new" and "evomerge.trunk" in table.index
    assert "not used" not in " ".join(table["value"].astype(str)), "a trunk trained here uses every parameter"
    ctx.params = Params(init_from="smollm2")  # a pretrained trunk brings its shapes and tokenizer (installed or not)
    table = context_table(ctx).frame
    for key in ("vocab_size", "tokenizer_samples", "model"):
        assert table.loc[f"evomerge.{key}", "value"].endswith("(not used: the pretrained init_from brings its "
                                                              "shapes and its tokenizer)"), key
    assert "not used" not in table.loc["evomerge.max_len", "value"]


def test_playground_runs_on_submit_only_and_lists_examples():
    from forgelib.viz.cognate import playground_lines, playground_widget, prompt_examples, suite_answers

    examples = prompt_examples(["arith", "logic"])
    assert [e[0] for e in examples] == ["arith", "logic"] and all(e[1] and e[2] for e in examples)
    answers = suite_answers(["arith", "logic"], levels=[1], per_level=20)
    calls = []
    widget = playground_widget(lambda prompt: calls.append(prompt) or [f"model: {prompt}"], examples, answers)
    text, button = widget.children[0].children
    assert text.continuous_update is False, "typing must not send the prompt (Enter or leaving the box does)"
    assert calls == [examples[0][1]], "the example prompt runs once when the widget is built"
    assert text._trait_notifiers["value"]["change"], "Enter (a value change) runs the models"
    button.click()
    assert len(calls) == 2, "the Run button runs the models once"
    shown = widget.children[2].value
    assert all(f"<code>{html.escape(p)}</code>" in shown and f"<code>{html.escape(a)}</code>" in shown
               for _, p, a in examples)
    sample = next(iter(answers))
    assert playground_lines(sample, lambda p: [],
                            answers)[0] == f"expected answer: {answers[sample]!r} (a suite sample)"
    assert "unknown" in playground_lines("not a suite prompt", lambda p: [], answers)[0]


def test_suite_answers_cover_levels_whose_splits_hold_few_prompts():
    """The cpu set trains on levels 1-3; algebra level 3 holds fewer than 200 'fitness' prompts: the playground's
    answer lookup takes what there is instead of failing the notebook after Phase 1 has finished."""
    from forgelib.data.tasks import generate
    from forgelib.viz.cognate import suite_answers

    answers = suite_answers(["algebra"], range(1, 4), per_level=200)
    sample = generate("algebra", 3, 5, "test", 0)[0]
    assert answers[sample.prompt] == sample.answer
    assert len(answers) > 300


def test_a_display_cell_that_never_answers_fails_instead_of_hanging(tmp_path, monkeypatch):
    """Cells that run a phase or the pipeline have no time limit; any other cell gets DISPLAY_CELL_TIMEOUT_S, so a
    lost kernel reply ends the run with nbclient's CellTimeoutError (a cell that sleeps stands in for it)."""
    import nbformat
    from nbclient.exceptions import CellTimeoutError

    from forgelib import notebooks

    assert notebooks.cell_timeout(nbformat.v4.new_code_cell("result = run_phase(ctx)")) is None
    assert notebooks.cell_timeout(nbformat.v4.new_code_cell("outcomes = run_pipeline(p, 'all')")) is None
    assert notebooks.cell_timeout(nbformat.v4.new_code_cell("plot_kl_curves(report);")) == 600
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import time"), nbformat.v4.new_code_cell("time.sleep(5)")]
    nbformat.write(nb, tmp_path / "slow.ipynb")
    monkeypatch.setattr(notebooks, "DISPLAY_CELL_TIMEOUT_S", 1)
    with pytest.raises(CellTimeoutError):
        notebooks.execute(tmp_path / "slow.ipynb", tmp_path / "out.ipynb")
