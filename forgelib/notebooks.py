"""The committed notebooks' form, and executing notebooks without kernel noise.

``python -m forgelib.notebooks strip [paths]`` (``make strip``) clears outputs and execution counts and stores
the metadata JupyterLab writes (so a notebook does not show as modified the moment it is opened);
``python -m forgelib.notebooks run IN OUT -p name value … -r name text …`` executes a notebook with papermill
(``make run``; ``-p`` values read as YAML scalars like papermill's own ``-p``, ``-r`` values kept as text).

Papermill writes each parameter into the notebook as code (``name = value``): a parameter's name must be one the
notebook's cell tagged ``parameters`` assigns, and its value plain data (text, numbers, booleans, None, lists and
mappings of them); anything else is refused (``NotebookParameterError``) before any kernel starts.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as dt
import os
import platform
import sys
from pathlib import Path
from typing import Any, Iterable

from . import paths
from .params import short
from .progress import BATCH_ENV

# What JupyterLab (ipykernel's kernel_info) writes into a notebook's metadata; only the version varies.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                 "mimetype": "text/x-python", "name": "python", "nbconvert_exporter": "python",
                 "pygments_lexer": "ipython3", "version": platform.python_version()}
# Kernels started here log errors only: ipykernel's "running over TCP without encryption" warning (the
# kernel listens on localhost) otherwise lands in the terminal and, for nested runs, in the notebook.
QUIET_KERNEL_ARGS = ["--IPKernelApp.log_level=ERROR"]
_CELL_KEYS_DROPPED = ("execution", "papermill", "scrolled", "collapsed")
# A cell that runs a phase or the pipeline may take hours; any other cell (tables, plots, widgets) takes seconds.
# Seen once on a loaded machine: a widget cell's execute_reply never reached papermill's client, which then
# waited forever (the kernel sat idle). Such a cell now fails with nbclient's CellTimeoutError after this long.
DISPLAY_CELL_TIMEOUT_S = 600
LONG_CELL_MARKERS = ("run_phase(", "run_pipeline(")


def cell_timeout(cell: Any) -> int | None:
    """nbclient's per-cell timeout: none for a cell that runs a phase or the pipeline, DISPLAY_CELL_TIMEOUT_S
    for any other."""
    source = cell.get("source", "") if isinstance(cell, dict) else getattr(cell, "source", "")
    return None if any(marker in source for marker in LONG_CELL_MARKERS) else DISPLAY_CELL_TIMEOUT_S


def notebook_files(roots: Iterable[str | Path] = ("notebooks", "tests/notebooks")) -> list[Path]:
    """Every ``.ipynb`` under ``roots`` (files or folders, relative to the repository root), checkpoints
    excluded."""
    found: list[Path] = []
    for root in roots:
        root = paths.resolve(root)
        found += [root] if root.is_file() else sorted(root.rglob("*.ipynb"))
    return [p for p in found if ".ipynb_checkpoints" not in p.parts]


def clean(nb: Any) -> Any:
    """``nb`` (an nbformat node) as committed: no outputs, no execution counts, no run metadata (papermill,
    widget state), the kernelspec and language_info JupyterLab writes; cell ids kept."""
    nb.metadata = {**{k: v for k, v in nb.metadata.items() if k not in ("papermill", "widgets")},
                   "kernelspec": dict(KERNELSPEC), "language_info": dict(LANGUAGE_INFO)}
    for cell in nb.cells:
        cell.metadata = {k: v for k, v in cell.metadata.items() if k not in _CELL_KEYS_DROPPED}
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def strip(files: Iterable[str | Path]) -> list[Path]:
    """Rewrite each notebook in its committed form (see :func:`clean`); returns the files that changed."""
    import nbformat

    changed = []
    for path in map(Path, files):
        before = path.read_text()
        nb = nbformat.reads(before, as_version=4)
        after = nbformat.writes(clean(nb))
        after += "" if after.endswith("\n") else "\n"  # as nbformat.write (and so JupyterLab) saves it
        if after != before:
            path.write_text(after)
            changed.append(path)
    return changed


class NotebookParameterError(ValueError):
    """A notebook parameter papermill must not inject: an unknown name, or a value that is not plain data."""


_SCALARS = (str, int, float, bool, type(None), dt.date)  # papermill writes each of these as a literal


def _plain(value: Any) -> bool:
    """Whether papermill's Python translator writes ``value`` as a literal: scalars, lists, and mappings with
    scalar keys, of them (a set, bytes or a tuple is written as its repr inside quotes, which a quote breaks out of)."""
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, _SCALARS) and _plain(v) for k, v in value.items())
    return False


def _assigned_names(code: str) -> list[str]:
    """The names a cell's top-level statements assign (``a = 1``, ``a: int = 1``, ``a, b = 1, 2``), in order; IPython
    magics and shell lines (``%…``, ``!…``) are skipped."""
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in code.splitlines()]
    tree = ast.parse("\n".join(lines))
    names: list[str] = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        for target in targets:
            elements = target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]
            names += [t.id for t in elements if isinstance(t, ast.Name) and t.id not in names]
    return names


def _parameters_cell(source: str | Path) -> dict | None:
    """The first cell tagged ``parameters`` (the one papermill injects after) of the notebook file ``source``, read
    as plain JSON (no nbformat import: a refusal is quick), or None."""
    import json

    try:
        with open(source, encoding="utf-8") as handle:
            nb = json.load(handle)
    except FileNotFoundError:
        raise NotebookParameterError(f"notebook {source} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # json errors are ValueErrors
        raise NotebookParameterError(f"notebook {source} cannot be read: {type(exc).__name__}") from None
    cells = nb.get("cells") if isinstance(nb, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        raise NotebookParameterError(f"notebook {source} is not a notebook: it has no list of cells")
    tagged = [c for c in cells if "parameters" in ((c.get("metadata") or {}).get("tags") or [])]
    return tagged[0] if tagged else None


def declared_parameters(source: str | Path) -> list[str] | None:
    """The names the notebook's cell tagged ``parameters`` assigns, or None when it has no such cell
    (NotebookParameterError: the notebook is missing, unreadable, or its parameters cell is not Python)."""
    cell = _parameters_cell(source)
    if cell is None:
        return None
    code = cell.get("source", "")
    if isinstance(code, list) and all(isinstance(line, str) for line in code):
        code = "".join(code)
    if cell.get("cell_type") != "code" or not isinstance(code, str):
        return []
    try:
        return _assigned_names(code)
    except (SyntaxError, ValueError, RecursionError) as exc:  # ValueError: a null byte
        where = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) else ""
        raise NotebookParameterError(f"notebook {source}: its parameters cell is not valid Python{where}, so no "
                                     "parameter can be checked") from None


def check_parameters(source: str | Path, parameters: dict | None) -> None:
    """Refuse (NotebookParameterError) a parameter whose name the notebook's parameters cell does not assign or
    whose value is not plain data (:func:`_plain`): papermill writes ``name = value`` into the notebook as code."""
    if not parameters:
        return
    declared = declared_parameters(source)
    allowed = ", ".join(declared) if declared else "none"
    for name, value in parameters.items():
        if declared is None:
            raise NotebookParameterError(f"notebook {source} has no cell tagged 'parameters', so it takes no "
                                         f"parameters (given: {short(name)})")
        if not isinstance(name, str) or not name.isidentifier():
            raise NotebookParameterError(f"parameter name {short(name)} is not a Python identifier; the parameters "
                                         f"cell of notebook {source} declares: {allowed}")
        if name not in declared:
            raise NotebookParameterError(f"notebook {source} has no parameter {short(name)}; its parameters cell "
                                         f"declares: {allowed}")
        if not _plain(value):
            raise NotebookParameterError(f"parameter {name} of notebook {source}: a value of type "
                                         f"{type(value).__name__} cannot be passed; give text, a number, true/false, "
                                         "null, or a list or mapping of these")


def execute(source: str | Path, output: str | Path, parameters: dict | None = None, *, log_output: bool = False,
            cwd: str | Path | None = None, kernel: "WarmKernel | None" = None) -> Path:
    """Execute ``source`` into ``output`` with papermill (kernel ``python3``, quiet kernel logs, cells saved as
    they finish, ``cell_timeout`` per cell); raises papermill's error with the failing cell's traceback.
    The parameters are checked first (:func:`check_parameters`: names the notebook declares, plain values).
    ``kernel``: a kernel started ahead (:class:`WarmKernel`) to run it in; it is shut down afterwards."""
    from .kernels import SlicedKernelManager

    extra = {"km": kernel.km} if kernel is not None else {"kernel_manager_class": SlicedKernelManager}
    try:
        check_parameters(source, parameters)
        import papermill as pm

        with batch_environment():  # the kernel papermill starts inherits it (forgelib.progress.batch_run)
            pm.execute_notebook(str(source), str(output), parameters=parameters or {}, kernel_name="python3",
                                cwd=str(cwd or paths.repo_root()), progress_bar=False, log_output=log_output,
                                request_save_on_cell_execute=True, extra_arguments=list(QUIET_KERNEL_ARGS),
                                timeout_func=cell_timeout, **extra)
    finally:
        if kernel is not None:
            kernel.shutdown()
    return Path(output)


@contextlib.contextmanager
def batch_environment():
    """``FORGE_BATCH=1`` (``forgelib.progress.BATCH_ENV``) in this process's environment while the block runs, so a
    kernel started inside it knows no one watches its widgets: its training progress is printed as static lines."""
    before = os.environ.get(BATCH_ENV)
    os.environ[BATCH_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(BATCH_ENV, None)
        else:
            os.environ[BATCH_ENV] = before


WARM_MODULES = ("torch", "transformers", "forgelib.phases", "forgelib.tracking", "forgelib.viz")
"""What every phase notebook imports first (~3 s): a kernel started ahead imports them while the phase before it
runs (on the core that phase leaves idle), into ``sys.modules`` only (the notebook's namespace stays empty)."""


class WarmKernel:
    """A ``python3`` kernel started now for a notebook that runs later (the pipeline starts the next phase's
    kernel as a phase begins): the process launches at once and boots, importing :data:`WARM_MODULES`, in the
    background. Pass it to :func:`execute`; :meth:`shutdown` ends it when it is not used."""

    def __init__(self, cwd: str | Path | None = None, modules: Iterable[str] = WARM_MODULES):
        from jupyter_core.utils import run_sync

        from .kernels import SlicedKernelManager

        warm = f"import importlib as _forge_il; [_forge_il.import_module(m) for m in {list(modules)!r}]; del _forge_il"
        self.km = SlicedKernelManager(kernel_name="python3")
        run_sync(self.km.start_kernel)(extra_arguments=[*QUIET_KERNEL_ARGS, f"--IPKernelApp.exec_lines={[warm]!r}"],
                                       cwd=str(cwd or paths.repo_root()), env={**os.environ, BATCH_ENV: "1"})

    def shutdown(self) -> None:
        """Ask the kernel to end (a graceful shutdown: its exit handlers run, e.g. a coverage measurement's save in
        ``make coverage``); one that does not end within jupyter_client's wait is killed."""
        from jupyter_core.utils import run_sync

        try:
            if self.km.has_kernel:
                run_sync(self.km.shutdown_kernel)(now=False)
        except Exception:  # already gone: nothing to end
            pass


def parameter_value(text: str):
    """A ``-p`` value as papermill's own command line reads it: a YAML scalar (``16`` an int, ``0.5`` a float,
    ``true`` a bool, ``null`` None, ``[1, 3]`` a list), else the text itself. ``-r`` keeps the text as it is."""
    from .params import YamlError, load_yaml

    try:
        value = load_yaml(text, "a notebook parameter")
    except YamlError:
        return text
    plain = isinstance(value, (int, float, bool, list, dict, type(None))) and _plain(value)
    return value if plain else text


def main(argv: list[str] | None = None) -> int:
    """``strip [paths…]`` or ``run IN OUT [-p NAME VALUE]… [-r NAME TEXT]… [--log-output]``."""
    parser = argparse.ArgumentParser(prog="python -m forgelib.notebooks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_strip = sub.add_parser("strip", help="clear outputs, store JupyterLab's metadata")
    p_strip.add_argument("paths", nargs="*", default=["notebooks", "tests/notebooks"])
    p_run = sub.add_parser("run", help="execute a notebook with papermill")
    p_run.add_argument("source")
    p_run.add_argument("output")
    p_run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                       help="a parameter, its value read as YAML (16, 0.5, true, null, [1, 3]; anything else is text)")
    p_run.add_argument("-r", "--parameter-raw", nargs=2, action="append", default=[], metavar=("NAME", "TEXT"),
                       help="a parameter whose value is the text as given (a session named 2026)")
    p_run.add_argument("--log-output", action="store_true", help="relay cell outputs to the terminal")
    args = parser.parse_args(argv)
    if args.command == "strip":
        for path in strip(notebook_files(args.paths)):
            print(f"stripped {paths.relative(path)}")
        return 0
    if args.log_output:  # papermill relays cell outputs through its logger
        import logging

        logging.basicConfig(level=logging.INFO, format="%(message)s")
    parameters = {name: parameter_value(value) for name, value in args.parameter} | dict(args.parameter_raw)
    try:
        check_parameters(args.source, parameters)
    except NotebookParameterError as exc:
        print(f"forge: {exc}", file=sys.stderr)
        return 2
    execute(args.source, args.output, parameters, log_output=args.log_output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
