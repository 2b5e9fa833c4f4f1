"""Explore a finished session without retraining.

An executed phase notebook in ``outputs/<session>/NN_phase/`` keeps its tables and plots, but its widgets are dead
text (papermill's outputs are untrusted and its kernel is gone), and running it again would train again. Instead:

* every phase notebook has the parameter ``explore = None``; set to a session's name, ``open_phase`` opens that
  session's finished run of the phase (``forgelib.phases.base.open_finished``) and ``run_phase`` returns its stored
  result, so every display cell after them (tables, plots, the playground and inspectors) works unchanged;
* :func:`open_phase_results` gives the same in any Python session: the context, the result and the report;
* ``forge open SESSION [PHASE]`` (:func:`write_explore_notebooks`) writes ``outputs/<session>/explore/NN_phase.ipynb``,
  copies of the phase notebooks with ``explore`` set, and prints how to open them in JupyterLab.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from . import paths
from .phases.base import NothingToExploreError, PhaseContext, check_finished, finished_sessions, open_finished
from .phases.specs import PHASES, PhaseSpec, get_spec
from .results import PhaseResult, load_report

EXPLORE_FOLDER = "explore"
"""``outputs/<session>/explore/``: where ``forge open`` writes the explore copies of the phase notebooks."""


@dataclasses.dataclass
class PhaseResults:
    """What a phase notebook's display cells need from a finished run: ``ctx`` (the notebook's ``ctx``), ``result``
    (its ``result``) and ``report`` (report.json, None when the phase wrote none)."""

    ctx: PhaseContext
    result: PhaseResult
    report: dict | None

    @property
    def dir(self) -> Path:
        return self.ctx.dir


def open_phase_results(session: str, phase: str | int | PhaseSpec) -> PhaseResults:
    """The finished run of ``phase`` (a name, number or ``NN_name``) in ``session``, opened to look at: nothing is
    run, locked or written. NothingToExploreError when it did not finish there (naming sessions where it did)."""
    spec = phase if isinstance(phase, PhaseSpec) else get_spec(phase)
    ctx = open_finished(spec, session)
    report = load_report(ctx.result) if "report" in ctx.result.artifacts else None
    return PhaseResults(ctx, ctx.result, report)


def finished_phases(session: str) -> list[PhaseSpec]:
    """The phases that finished in ``session`` (status ok, gate held or failed under ``run.gates: warn``), in
    order."""
    from .phases.base import completed_result

    return [spec for spec in PHASES if completed_result(session, spec) is not None]


def explore_notebook(session: str, spec: PhaseSpec) -> Path:
    """Write ``outputs/<session>/explore/<NN_phase>.ipynb``: the committed phase notebook with ``explore`` set to
    ``session`` in its parameters cell and no outputs. Returns its path."""
    import nbformat

    from .notebooks import clean

    nb = clean(nbformat.read(paths.resolve(spec.notebook), as_version=4))
    cell = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
    lines = cell.source.splitlines() if cell is not None else []
    at = [i for i, line in enumerate(lines) if re.match(r"explore\s*=", line)]
    if not at:
        raise NothingToExploreError(f"{spec.notebook} has no parameter 'explore' to set")
    lines[at[0]] = f"explore = {session!r}  # the finished session shown: nothing is run"
    cell.source = "\n".join(lines)
    out = paths.outputs_root() / session / EXPLORE_FOLDER / Path(spec.notebook).name
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return out


def write_explore_notebooks(session: str, phase: str | int | None = None) -> list[Path]:
    """The explore notebooks of ``session``: of ``phase`` (checked to have finished there), or of every phase that
    finished there. NothingToExploreError when there is none; nothing is written then."""
    from .phases.base import phase_dir

    if phase is not None:
        spec = get_spec(int(phase) if isinstance(phase, str) and phase.isdigit() else phase)
        check_finished(spec, session, with_params=False)  # refuses, naming why, before anything is written
        return [explore_notebook(session, spec)]
    if not phase_dir(session, PHASES[0]).parent.is_dir():
        others = sorted({s for spec in PHASES for s in finished_sessions(spec, 3)})[:5]
        hint = f"sessions with finished phases: {', '.join(others)}" if others else "no session has finished a phase"
        raise NothingToExploreError(f"there is no session {session!r} under {paths.relative(paths.outputs_root())}; "
                                    f"{hint}")
    specs = finished_phases(session)
    if not specs:
        raise NothingToExploreError(f"no phase finished in session {session} "
                                    f"({paths.relative(phase_dir(session, PHASES[0]).parent)}): nothing to explore")
    return [explore_notebook(session, spec) for spec in specs]


def lab_instructions(notebooks: list[Path], port: int = 8888) -> list[str]:
    """The lines ``forge open`` prints: each notebook written, then the JupyterLab command and URL of the first."""
    root, first = paths.repo_root().resolve(), notebooks[0].resolve()
    lab_root = root if first.is_relative_to(root) else first.parent
    shown = first.relative_to(lab_root).as_posix()
    return [*(f"wrote {paths.relative(p)}" for p in notebooks),
            "open it in JupyterLab, then Run > Run All Cells (nothing trains; the widgets work):",
            f"  cd {lab_root} && jupyter lab --port {port} {shown}",
            f"  or, where JupyterLab already runs from {lab_root}: http://localhost:{port}/lab/tree/{shown}"]
