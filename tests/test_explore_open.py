"""A finished session is explorable without retraining (``explore`` in each phase notebook, ``open_phase_results``,
``forge open``), and batch (papermill) runs print static progress lines instead of widget bars frozen at 0%."""
import json
import subprocess
import sys

import nbformat
import pytest
import yaml

from forgelib import cli, paths
from forgelib.notebooks import execute
from forgelib.phases.base import NothingToExploreError, open_phase, run_phase
from forgelib.progress import BATCH_ENV, StepLines, progress_bar
from forgelib.registry import ModelRegistry
from forgelib.results import PhaseResult
from helpers import pipeline_outputs  # noqa: F401  (fixture)
from pipeline_phases import ALL, SPECS

PARAMS = "tests/params/pipeline.yaml"


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(pipeline_outputs):
    """Session "done": the test phase alpha finished (in process, no notebook: ~1 s)."""
    run_phase(open_phase(SPECS["alpha"], PARAMS, None, "done", all_specs=ALL))
    return pipeline_outputs


# --- explore ----------------------------------------------------------------------------------------------------


def test_a_phase_notebook_in_explore_mode_shows_the_finished_run_and_runs_nothing(finished, tmp_path):
    folder = finished / "done" / "01_alpha"
    before = _snapshot(folder)
    with ModelRegistry(paths.registry_path()) as reg:
        runs, sessions = reg.list_phase_runs("done"), reg.list_sessions()
    out = execute(paths.resolve("tests/notebooks/alpha.ipynb"), tmp_path / "alpha.ipynb", {"explore": "done"})
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c["outputs"]]
    assert not any(o.get("output_type") == "error" for o in outputs)
    text = "".join(o.get("text", "") for o in outputs)
    assert "01_alpha of session done: the finished run's results" in text and "nothing is run (explore)" in text
    table = next(o["data"]["text/plain"] for o in outputs if o.get("output_type") == "execute_result")
    assert "params" in table and f"{PhaseResult.load(folder).metrics['params']:,}" in table  # as the table writes it
    assert _snapshot(folder) == before, "exploring wrote into the phase folder"
    assert sorted(p.name for p in (finished / "done").iterdir()) == ["01_alpha"]
    with ModelRegistry(paths.registry_path()) as reg:
        assert reg.list_phase_runs("done") == runs and reg.list_sessions() == sessions  # nothing ran, no new session


def test_open_phase_explore_gives_the_finished_context_and_run_phase_returns_its_result(finished, capsys):
    folder = finished / "done" / "01_alpha"
    before = _snapshot(folder)
    ctx = open_phase(SPECS["alpha"], "no/such/params.yaml", None, None, all_specs=ALL, explore="done")
    assert ctx.explored and ctx.session == "done" and ctx.dir == folder and ctx.session_lock is None
    assert ctx.params.width == 16 and ctx.run.seed == 3  # what the finished run used (its params.yaml)
    assert ctx.params_file == folder / "params.yaml"
    result = run_phase(ctx)
    assert result.metrics == PhaseResult.load(folder).metrics and result.ok
    assert "nothing is run (explore)" in capsys.readouterr().out
    assert _snapshot(folder) == before


def test_exploring_a_phase_that_did_not_finish_names_why_and_where_it_did(finished):
    with pytest.raises(NothingToExploreError) as info:
        open_phase(SPECS["alpha"], PARAMS, explore="nosuch", all_specs=ALL)
    message = str(info.value)
    assert message == (f"phase 01_alpha did not finish in session nosuch, so there is nothing to explore: there is no "
                       f"{paths.relative(finished / 'nosuch' / '01_alpha' / 'result.json')}; sessions where it "
                       "finished: done")
    assert not (finished / "nosuch").exists()
    # a failed run: its status is named
    result_file = finished / "done" / "01_alpha" / "result.json"
    data = json.loads(result_file.read_text())
    result_file.write_text(json.dumps({**data, "status": "failed"}))
    with pytest.raises(NothingToExploreError, match=r"did not finish in session done, .*result\.json says status "
                                                    r"'failed'; no session has finished it yet"):
        open_phase(SPECS["alpha"], PARAMS, explore="done", all_specs=ALL)


def test_exploring_with_unreadable_stored_parameters_names_the_file_and_key(finished):
    params_file = finished / "done" / "01_alpha" / "params.yaml"
    stored = yaml.safe_load(params_file.read_text())
    params_file.write_text(yaml.safe_dump({**stored, "alpha": {"width": 16, "widht": "x" * 5000}}))
    with pytest.raises(NothingToExploreError) as info:
        open_phase(SPECS["alpha"], PARAMS, explore="done", all_specs=ALL)
    message = str(info.value)
    assert "01_alpha/params.yaml: alpha: unknown key(s) ['widht']" in message and len(message) < 500


def _fake_finished_cognate(outputs, session="fin"):
    """A finished Phase-1 folder as far as ``forge open`` reads it (result.json, params.yaml, the registry)."""
    folder = outputs / session / "01_cognate"
    folder.mkdir(parents=True)
    PhaseResult("cognate", 1, session, status="ok").save(folder)
    (folder / "params.yaml").write_text(yaml.safe_dump({"run": {}, "guard": {}, "cognate": {}}))
    ModelRegistry(paths.registry_path()).close()
    return folder


def test_forge_open_writes_an_explore_copy_and_prints_how_to_open_it(pipeline_outputs, capsys):
    folder = _fake_finished_cognate(pipeline_outputs)
    before = _snapshot(folder)
    assert cli.main(["open", "fin"]) == 0
    out = capsys.readouterr().out
    written = pipeline_outputs / "fin" / "explore" / "01_cognate.ipynb"
    shown = paths.relative(written)
    assert out.splitlines()[0] == f"wrote {shown}"
    assert "jupyter lab --port 8888" in out and "http://localhost:8888/lab/tree/" in out
    nb = nbformat.read(written, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert "explore = 'fin'" in params.source and "explore=explore" in nb.cells[2].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert _snapshot(folder) == before
    assert cli.main(["open", "fin", "cognate", "--port", "9999"]) == 0
    assert "http://localhost:9999/lab/tree/" in capsys.readouterr().out


def test_forge_open_of_one_phase_loads_no_model_library(pipeline_outputs, monkeypatch, capsys):
    """Writing the explore copy reads the phase's files only: the phase module (torch) is never imported (by hand:
    `forge open fin 1` 2 s, 62 MB peak)."""
    from forgelib.phases.specs import PhaseSpec

    _fake_finished_cognate(pipeline_outputs)
    monkeypatch.setattr(PhaseSpec, "load", lambda self: pytest.fail(f"{self.module} was imported"))
    assert cli.main(["open", "fin", "1"]) == 0


@pytest.mark.parametrize("argv, expected", [
    (["open", "nosuch"], "forge: there is no session 'nosuch' under "),
    (["open", "fin", "2"], "forge: phase 02_evomerge did not finish in session fin, so there is nothing to explore: "
                           "there is no "),
    (["open", "fin", "12"], "forge: unknown phase 12; valid: ['1:cognate', "),
])
def test_forge_open_refuses_clearly_and_writes_nothing(pipeline_outputs, capsys, argv, expected):
    _fake_finished_cognate(pipeline_outputs)
    before = _snapshot(pipeline_outputs)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and len(err) < 400 and "Traceback" not in err
    assert _snapshot(pipeline_outputs) == before


def test_forge_open_of_an_unsafe_session_name_is_refused_by_its_argument(pipeline_outputs):
    done = subprocess.run([sys.executable, "-m", "forgelib.cli", "open", "../etc"], capture_output=True, text=True,
                          cwd=paths.repo_root())
    assert done.returncode == 2 and "invalid session name '../etc'" in done.stderr and "Traceback" not in done.stderr


# --- progress in batch runs ---------------------------------------------------------------------------------------


def test_step_lines_print_a_final_line_and_one_per_interval(capsys, monkeypatch):
    now = [0.0]
    monkeypatch.setattr("forgelib.progress.time.monotonic", lambda: now[0])
    bar = StepLines(range(1, 601), desc="qat", interval=10.0)
    for step in bar:
        now[0] = step * 0.075  # 45 s in all
        if step == 600:
            bar.set_postfix(loss="0.412")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(", ")[1] for line in lines[:-1]] == ["10 s", "20 s", "30 s", "40 s"]  # one per 10 s
    assert all(line.startswith("qat: ") and "/600 steps" in line for line in lines)
    assert lines[-1] == "qat: 600/600 steps, 45 s, loss=0.412"
    with StepLines(total=3, desc="evomerge", unit="evaluations", disable=True) as quiet:
        quiet.update(3)
    assert capsys.readouterr().out == ""


def test_progress_bar_is_tqdm_unless_the_batch_variable_is_set(monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.delenv(BATCH_ENV, raising=False)
    assert isinstance(progress_bar(range(3), desc="x", disable=True), tqdm)
    monkeypatch.setenv(BATCH_ENV, "1")
    assert isinstance(progress_bar(range(3), desc="x"), StepLines)


def test_training_in_a_batch_run_ends_on_a_static_line(monkeypatch, capsys):
    import torch

    from forgelib.train import TrainConfig, train

    monkeypatch.setenv(BATCH_ENV, "1")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)

    def loss_fn(model, batch):
        return ((model(batch["input_ids"]) - batch["labels"]) ** 2).mean(), {}

    batches = iter(lambda: {"input_ids": torch.ones(2, 4), "labels": torch.zeros(2, 4)}, None)
    train(model, batches, torch.optim.SGD(model.parameters(), 0.1), TrainConfig(steps=5, log_every=1),
          loss_fn=loss_fn, desc="qat")
    out = capsys.readouterr()
    assert out.out.splitlines()[-1].startswith("qat: 5/5 steps, 0 s, loss=") and "%" not in out.err


def test_papermill_kernels_are_batch_kernels(tmp_path, monkeypatch):
    """forgelib.notebooks.execute (how the pipeline runs each phase) starts papermill's kernel with the batch
    variable in its environment, and this process's environment is left as it was."""
    import os

    import papermill

    seen = []
    monkeypatch.delenv(BATCH_ENV, raising=False)
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: seen.append(os.environ.get(BATCH_ENV)))
    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "empty.ipynb")
    execute(tmp_path / "empty.ipynb", tmp_path / "out.ipynb")
    assert seen == ["1"] and BATCH_ENV not in os.environ


def test_a_warm_kernel_is_started_as_a_batch_kernel(monkeypatch):
    import forgelib.kernels
    from forgelib.notebooks import WarmKernel

    seen = {}

    class FakeManager:
        def __init__(self, **kwargs):
            self.has_kernel = False

        async def start_kernel(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(forgelib.kernels, "SlicedKernelManager", FakeManager)
    WarmKernel(modules=())
    assert seen["env"][BATCH_ENV] == "1" and seen["env"]["PATH"]
