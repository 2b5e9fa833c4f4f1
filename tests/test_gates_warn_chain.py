"""``forge run --gates warn`` on the product's own chain, each phase in its notebook (papermill): Phase 1 (cognate)
with an impossible bound (``cognate.min_above_chance=0.99``: every family's accuracy lower bound more than 0.99
above chance) fails its gate, the chain goes on into Phase 2 (evomerge), and the result, the executed notebook, the
registry, ``forge registry list`` and the scorecard (its table's ``gate`` column) all say which phase's models are
gate-failed.

Kept to ~40 s: two phases at a tiny size (the trunk 30 steps, specialists 6, evomerge 18 fitness evaluations, the
guard 16 questions per family), one chain shared by the tests below.
"""
import contextlib
import io
import json

import nbformat
import pytest

from forgelib import cli
from forgelib.registry import ModelRegistry
from forgelib.results import PhaseResult

TINY = {"run.quiet": "true", "run.tracking": "jsonl", "cognate.trunk.steps": 30, "cognate.eval_per_family": 4,
        "cognate.tokenizer_samples": 300, "cognate.min_disagreement": 0, "cognate.min_accuracy_gain": -0.5,
        "cognate.expected_gain": 0.5, "guard.margin": 0.5, "guard.max_questions": 16, "evomerge.budget": 18,
        "evomerge.per_layer": "false", "evomerge.families": "[arith,logic]", "evomerge.fitness_per_family": 3,
        "evomerge.select_per_family": 3, "evomerge.finalists": 2, "evomerge.margin": 0.9,
        **{f"cognate.{s}.{k}": v for s in ("reasoning", "memory", "speed") for k, v in (("steps", 6),
                                                                                        ("warmup_steps", 2))}}
IMPOSSIBLE = "cognate.min_above_chance=0.99"
"""Phase 1's gate asks every trunk family's accuracy lower bound to clear chance by more than this."""
SESSION = "gw"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """``forge run --phases 1-2 --gates warn --set cognate.min_above_chance=0.99`` (notebooks, papermill):
    (exit status, what it printed, the outputs root)."""
    out = tmp_path_factory.mktemp("gates-warn") / "outputs"
    mp = pytest.MonkeyPatch()
    mp.setenv("FORGE_OUTPUTS", str(out))
    argv = ["run", "--phases", "1-2", "--gates", "warn", "--session", SESSION, "--set", IMPOSSIBLE]
    for key, value in TINY.items():
        argv += ["--set", f"{key}={value}"]
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = cli.main(argv)
    yield code, printed.getvalue() + errors.getvalue(), out
    mp.undo()


def test_the_chain_goes_on_past_the_gate_failed_phase_and_says_so(chain):
    code, printed, out = chain
    assert code == 0, printed
    warning = next(line for line in printed.splitlines() if line.startswith("[forge] WARNING 01_cognate: "))
    assert warning.startswith("[forge] WARNING 01_cognate: GATE FAILED, not enforced (run.gates: warn): trunk_")
    assert "_lower_bound_minus_chance = " in warning and "(needs > 0.99)" in warning
    assert warning.endswith("its models are registered as gate-failed and the chain goes on")
    assert "[forge] 02_evomerge: completed in " in printed
    assert (f"[forge] session {SESSION}: all 2 phase(s) completed; GATE FAILED, not enforced (run.gates: warn), in "
            "01_cognate: their models are registered as gate-failed") in printed
    table = {line.split()[0]: line.split() for line in printed.splitlines() if line[:3] in ("01_", "02_")}
    assert table["01_cognate"][1:4] == ["completed", "FAIL", "(warn)"] and table["02_evomerge"][1:3] == [
        "completed", "pass"]
    # each phase ran as its notebook; Phase 1's executed notebook shows the warning where its run cell printed it
    for name in ("01_cognate", "02_evomerge"):
        assert (out / SESSION / name / f"{name}.ipynb").is_file()
    nb = nbformat.read(out / SESSION / "01_cognate" / "01_cognate.ipynb", as_version=4)
    shown = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert warning.removeprefix("[forge] ") in shown


def test_the_gate_failed_phase_result_says_so_and_the_next_phase_took_its_model(chain):
    _, _, out = chain
    cognate = PhaseResult.load(out / SESSION / "01_cognate")
    assert cognate.ok and cognate.gate_failed and not cognate.gate_passed
    failed = [c for c in cognate.gate if not c.passed]
    assert failed and all(c.name.endswith("_lower_bound_minus_chance") and c.bound == 0.99 for c in failed)
    assert len(cognate.failed_checks) == len(failed) == 7, "one per trunk family"
    assert all(f.startswith("trunk_") and f.endswith(" (needs > 0.99)") for f in cognate.failed_checks)
    evomerge = PhaseResult.load(out / SESSION / "02_evomerge")
    assert evomerge.ok and evomerge.gate_passed and not evomerge.gate_failed
    assert evomerge.upstream["session"] == SESSION and evomerge.upstream["phase"] == "cognate"


def test_the_registry_marks_the_gate_failed_phases_models(chain, capsys):
    _, _, out = chain
    with ModelRegistry(out / "registry.db") as reg:
        cognate, evomerge = reg.list_models(SESSION, "cognate"), reg.list_models(SESSION, "evomerge")
        assert reg.get_session(SESSION)["status"] == "completed"
        assert [r["status"] for r in reg.list_phase_runs(SESSION)] == ["completed", "completed"]
        assert all(h["ok"] for h in reg.list_handoffs(SESSION))
    assert {r["model_name"] for r in cognate} >= {"trunk", "reasoning", "memory", "speed"}
    for row in cognate:
        assert row["status"] == "gate-failed" and not row["retired_at"], row
        assert row["metadata"]["gate_failed"] is True and row["metadata"]["failed_checks"]
    assert evomerge and all(r["status"] == "active" for r in evomerge)
    assert cli.main(["registry", "list", "--session", SESSION]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    keys = header.split("\t")
    listed = {(r["phase_name"], r["model_name"]): r["status"] for r in (dict(zip(keys, line.split("\t")))
                                                                        for line in lines)}
    assert listed[("cognate", "trunk")] == "gate-failed" and listed[("evomerge", "champion")] == "active"


def test_the_scorecard_of_the_chain_shows_the_gate_column(chain, capsys):
    from forgelib.scorecard import ScorecardParams, scorecard
    from forgelib.viz.scorecard import scorecard_frame

    card = scorecard(SESSION, ScorecardParams(families=["arith"], per_family=2, max_new_tokens=4))
    notes = capsys.readouterr().out
    assert "[forge] scorecard: partial: the chain ends at phase 2 (evomerge), the last one completed" in notes
    assert ("[forge] scorecard: GATE FAILED, not enforced (run.gates: warn), in phase(s) 1 cognate: their models "
            "are marked gate-failed (column 'gate')") in notes
    frame = scorecard_frame(card)
    assert list(frame.columns)[0] == "gate"
    gates = frame["gate"].to_dict()
    assert {label: gate for label, gate in gates.items() if label.startswith("1 cognate")} == {
        f"1 cognate {role}": "gate-failed" for role in ("trunk", "reasoning", "memory", "speed")}
    assert gates["2 evomerge champion"] == "pass"
    assert "gate-failed" in frame.to_string()
    json.dumps(card)  # what the pipeline's in-process scorecard writes to scorecard.json


def test_the_gate_failed_phase_can_be_explored_and_says_its_gate_failed(chain, capsys):
    """``forge open`` writes the explore copy of the gate-failed phase, and opened to explore it says (nothing runs)
    that its gate failed, with the checks."""
    from forgelib.phases.base import open_phase, run_phase

    _, _, out = chain
    assert cli.main(["open", SESSION, "1"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"wrote {out / SESSION / 'explore' / '01_cognate.ipynb'}")
    result = run_phase(open_phase("cognate", "parameters/smoke.yaml", explore=SESSION))
    assert result.gate_failed
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"[forge] 01_cognate of session {SESSION}: the finished run's results (")
    assert "; nothing is run (explore). Its GATE FAILED, not enforced (run.gates: warn): trunk_" in line
    assert line.endswith("; and 2 more; its models are registered as gate-failed")
