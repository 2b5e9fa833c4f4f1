"""Notebook contract: clean (no outputs), thin (no def/class), one parameters cell with the agreed names."""
import ast
import json
from pathlib import Path

import pytest

from forgelib import paths
from forgelib.phases import PHASES

ROOT = paths.repo_root()
NOTEBOOKS = sorted((ROOT / "notebooks").rglob("*.ipynb")) + sorted((ROOT / "tests" / "notebooks").glob("*.ipynb"))
PHASE_PARAMS = {"params_file", "overrides", "session", "upstream"}


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


def test_pipeline_notebook_parameters():
    cell = _params_cell(ROOT / "notebooks" / "00_pipeline.ipynb")
    tree = ast.parse("".join(cell["source"]))
    names = {t.id for n in tree.body for t in n.targets}
    assert {"params_file", "phases", "session", "resume", "overrides"} == names


def test_phase_modules_match_the_phase_list():
    modules = {p.stem for p in (ROOT / "forgelib" / "phases").glob("*.py")} - {"__init__", "base"}
    assert modules == {s.module.rsplit(".", 1)[1] for s in PHASES}
    assert [s.number for s in PHASES] == list(range(1, len(PHASES) + 1))
