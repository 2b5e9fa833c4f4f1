"""Notebook contract: clean (no outputs), thin (no def/class), one parameters cell with the agreed names."""
import ast
import json
from pathlib import Path

import pytest

from forgelib import paths
from forgelib.notebooks import KERNELSPEC, LANGUAGE_INFO, clean, execute, strip
from forgelib.phases import PHASES

ROOT = paths.repo_root()
NOTEBOOKS = sorted((ROOT / "notebooks").rglob("*.ipynb")) + sorted((ROOT / "tests" / "notebooks").glob("*.ipynb"))
PHASE_PARAMS = {"params_file", "overrides", "session", "upstream", "explore"}  # explore: forgelib.explore


def _cells(nb: Path) -> list[dict]:
    return json.loads(nb.read_text())["cells"]


def _params_cell(nb: Path) -> dict:
    cells = [c for c in _cells(nb) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{nb.name}: exactly one cell tagged 'parameters'"
    return cells[0]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_notebook_is_clean_and_thin(nb):
    for cell in _cells(nb):
        if cell["cell_type"] != "code":
            continue
        assert not cell.get("outputs") and cell.get("execution_count") is None, f"{nb.name} has outputs"
        tree = ast.parse("".join(cell["source"]))
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        assert not defs, f"{nb.name}: logic belongs in forgelib, found {[d.name for d in defs]}"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_notebook_is_stored_as_jupyterlab_saves_it(nb):
    """The kernelspec and language_info JupyterLab writes (so opening a notebook does not mark it modified),
    and exactly the form `make strip` writes."""
    import nbformat

    data = json.loads(nb.read_text())
    assert data["metadata"]["kernelspec"] == KERNELSPEC
    info = dict(data["metadata"]["language_info"])
    assert {**info, "version": LANGUAGE_INFO["version"]} == LANGUAGE_INFO
    text = nb.read_text()
    stored = nbformat.writes(clean(nbformat.reads(text, as_version=4)))
    assert text == stored + ("" if stored.endswith("\n") else "\n"), f"{nb.name}: run `make strip`"


def test_strip_clears_an_executed_notebook(tmp_path):
    executed = json.loads((ROOT / "tests" / "notebooks" / "alpha.ipynb").read_text())
    executed["metadata"].update(papermill={"duration": 1.0}, kernelspec={"name": "python3", "display_name": "x"})
    for cell in executed["cells"]:
        if cell["cell_type"] == "code":
            cell.update(execution_count=3, outputs=[{"output_type": "stream", "name": "stdout", "text": ["1\n"]}])
            cell["metadata"]["execution"] = {"iopub.status.busy": "2026-01-01"}
    path = tmp_path / "alpha.ipynb"
    path.write_text(json.dumps(executed))
    assert strip([path]) == [path] and strip([path]) == []
    back = json.loads(path.read_text())
    assert "papermill" not in back["metadata"] and back["metadata"]["kernelspec"] == KERNELSPEC
    code = [c for c in back["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None and "execution" not in c["metadata"] for c in code)
    assert any("parameters" in c["metadata"].get("tags", []) for c in code), "tags are kept"


def test_executed_notebook_has_no_kernel_warning(tmp_path, capfd):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    nbformat.write(nb, tmp_path / "in.ipynb")
    out = execute(tmp_path / "in.ipynb", tmp_path / "out.ipynb", cwd=tmp_path)
    cells = json.loads(out.read_text())["cells"]
    assert cells[0]["outputs"][0]["text"] == ["42\n"]
    assert "without encryption" not in capfd.readouterr().err, "ipykernel's transport warning is not shown"


@pytest.mark.parametrize("spec", PHASES, ids=lambda s: s.dirname)
def test_every_phase_has_a_contract_notebook(spec):
    nb = paths.resolve(spec.notebook)
    assert nb.is_file()
    cell = _params_cell(nb)
    tree = ast.parse("".join(cell["source"]))
    names = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets}
    assert names == PHASE_PARAMS
    values = {t.id: ast.literal_eval(n.value) for n in tree.body for t in n.targets}
    assert values["params_file"] == "parameters/smoke.yaml"
    assert all(isinstance(n, ast.Assign) for n in tree.body), "the parameters cell holds literals only"
    assert nb.name.startswith(f"{spec.number:02d}_")
    assert values["explore"] is None
    opening = [c for c in json.loads(nb.read_text())["cells"] if "open_phase(" in "".join(c["source"])]
    assert len(opening) == 1 and "explore=explore)" in "".join(opening[0]["source"]), "one call switches to explore"


def test_pipeline_notebook_parameters():
    cell = _params_cell(ROOT / "notebooks" / "00_pipeline.ipynb")
    tree = ast.parse("".join(cell["source"]))
    names = {t.id for n in tree.body for t in n.targets}
    assert {"params_file", "phases", "session", "resume", "overrides"} == names


def test_phase_modules_match_the_phase_list():
    from test_layers import PHASE_SHARED

    modules = {p.stem for p in (ROOT / "forgelib" / "phases").glob("*.py")} - {"__init__", *PHASE_SHARED}
    assert modules == {s.module.rsplit(".", 1)[1] for s in PHASES}
    assert [s.number for s in PHASES] == list(range(1, len(PHASES) + 1))


def test_run_parameters_are_read_like_papermills():
    """`python -m forgelib.notebooks run … -p per_family 16` gives the notebook an int (it was the text '16', which
    the scorecard refused); -r keeps text (a session named 2026)."""
    from forgelib.notebooks import parameter_value

    assert parameter_value("16") == 16 and parameter_value("0.5") == 0.5 and parameter_value("true") is True
    assert parameter_value("null") is None and parameter_value("[1, 3]") == [1, 3]
    assert parameter_value("parameters/smoke.yaml") == "parameters/smoke.yaml"
    assert parameter_value("s16-run") == "s16-run" and parameter_value("a: [") == "a: ["
