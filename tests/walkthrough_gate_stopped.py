"""By hand, not part of ``make test`` (~15-25 min on 2 cores): what a newcomer meets when a gate stops the chain, up
to a real browser.

    nice -n 10 .venv/bin/python tests/walkthrough_gate_stopped.py [--session S] [--fail KEY=VALUE] [--set KEY=VALUE]
        [--reuse]

1. ``forge run --session S --set bitnet.max_ppl_ratio=0.01``: the smoke chain with gates enforced and an impossible
   bound (Phase 4's ternary model would need an answer-NLL ratio upper bound <= 0.01 against its full-precision
   input) runs until Phase 4's gate stops it (exit status 1).
2. Its failure message (the last ``forge:`` line) is read: the failed check with its numbers and the two ways on.
3. The exploration way is run exactly as printed (``forge run --from S:4 --gates warn``): a new session runs Phases
   4-8 and the scorecard; Phase 4's gate fails again (the session's parameters, the impossible bound included, carry
   over), is reported, and its models are registered gate-failed.
4. ``forge open NEW 4`` writes the explore notebook; JupyterLab, started as ``forge open`` says, in headless Chromium:
   the explore notebook runs every cell (nothing trains) and says its gate failed; the registry browser
   (``registry_browser()``, as the README shows) lists S's retired Phase-4 model and NEW's gate-failed one, and the
   model's details (status, lineage across the two sessions); the scorecard notebook the run executed shows the
   gate column.

Everything runs under ``$FORGE_OUTPUTS`` (default: the repository's outputs/). What each step printed, the checks and
their timings go to ``<outputs>/walkthrough/<S>/walkthrough.md``, screenshots beside it. ``--reuse`` skips steps 1
and 3 when their logs are there (to redo the browser part). Exit status 0 when every check held.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from browser import JupyterLab, LabBrowser, find_browser, wait_for  # noqa: E402
from forgelib import paths  # noqa: E402

FAIL = "bitnet.max_ppl_ratio=0.01"
PHASE = "04_bitnet"


class Walk:
    """The walk's record: steps, exact messages, checks (a failed check is recorded, and the walk goes on)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.lines: list[str] = []
        self.failed: list[str] = []

    def step(self, title: str) -> None:
        self.lines += ["", f"## {title}", ""]
        print(f"\n== {title}", flush=True)

    def note(self, text: str) -> None:
        self.lines.append(text)
        print(text, flush=True)

    def quote(self, text: str, limit: int = 6000) -> None:
        text = text if len(text) <= limit else text[:limit // 2] + "\n[...]\n" + text[-limit // 2:]
        self.lines += ["```", text.rstrip(), "```"]
        print(text.rstrip(), flush=True)

    def check(self, ok: bool, what: str) -> bool:
        self.note(f"- {'OK' if ok else 'FAILED'}: {what}")
        if not ok:
            self.failed.append(what)
        return ok

    def save(self) -> Path:
        path = self.folder / "walkthrough.md"
        path.write_text("# Walk-through on a gate-stopped session\n" + "\n".join(self.lines) + "\n")
        return path


def forge(args: list[str], log: Path, reuse: bool = False) -> tuple[int, str, float]:
    """``forge ARGS`` (this interpreter, from the repository root): (exit status, stdout + stderr, seconds); kept
    in ``log`` (``reuse``: read back from there when it exists)."""
    if reuse and log.is_file():
        data = json.loads(log.read_text())
        return data["code"], data["output"], data["seconds"]
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "forgelib.cli", *args], cwd=paths.repo_root(),
                          capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    seconds = round(time.monotonic() - started, 1)
    output = done.stdout + done.stderr
    log.write_text(json.dumps({"args": args, "code": done.returncode, "output": output, "seconds": seconds}))
    return done.returncode, output, seconds


def stop_the_chain(walk: Walk, session: str, fail: str, extra: list[str], reuse: bool) -> str:
    """Step 1-2: the chain stopped by the forced failure; returns the failure message."""
    args = ["run", "--session", session, "--set", fail, *(a for kv in extra for a in ("--set", kv))]
    walk.step(f"1. forge {shlex.join(args)}")
    code, output, seconds = forge(args, walk.folder / "1_run.json", reuse)
    walk.note(f"exit status {code} after {seconds} s; the last lines:")
    walk.quote("\n".join(output.splitlines()[-12:]))
    walk.check(code == 1, "the chain stopped with exit status 1")
    message = next((line for line in reversed(output.splitlines()) if line.startswith("forge: ")), "")
    walk.step("2. The failure message")
    walk.quote(message)
    walk.check(f"phase {PHASE} of session {session} did not pass its gate: "
               "ppl_ratio_upper_bound = " in message and "(needs <= 0.01)" in message,
               "it names the failed check, its value and its bound")
    walk.check(f"`forge run --from {session}:4 --gates warn`" in message, "it names the exploration way, --gates warn")
    walk.check(f"`forge run --from {session}:4 --set bitnet.KEY=VALUE`" in message, "it names the rerun way, --set")
    return message


def explore_way(walk: Walk, session: str, message: str, reuse: bool) -> str:
    """Step 3: the --gates warn command of the message, run as printed; returns the new session."""
    commands = re.findall(r"`(forge run [^`]*)`", message)
    warn = next((c for c in commands if "--gates warn" in c), None)
    walk.step(f"3. The exploration way, as printed: {warn}")
    if not walk.check(warn is not None, "the message holds a `forge run ... --gates warn` command"):
        raise SystemExit(walk.save())
    code, output, seconds = forge(shlex.split(warn)[1:], walk.folder / "3_explore_run.json", reuse)
    walk.note(f"exit status {code} after {seconds} s; the lines that matter:")
    lines = output.splitlines()
    table = next((i for i, line in enumerate(lines) if line.lstrip().startswith("status ")), len(lines))
    walk.quote("\n".join(line for line in lines[:table] if line.startswith(("[forge] session", "[forge] WARN",
                                                                           "forge:", "[forge] 0")))
               + "\n" + "\n".join(lines[table:]))
    walk.check(code == 0, "the exploration run completed (exit status 0)")
    found = re.search(r"^\[forge\] session (\S+): ", output, re.M)
    new = found.group(1) if found else ""
    walk.check(bool(new) and new.startswith(f"{session}-from4-"), f"it ran as a new session ({new})")
    walk.check(f"[forge] WARNING {PHASE}: GATE FAILED, not enforced (run.gates: warn): ppl_ratio_upper_bound = "
               in output, "Phase 4's gate failed again (the impossible bound carried over) and was reported")
    walk.check("09_scorecard: completed" in output, "the scorecard ran at the end of the chain")
    return new


def registry_cli(walk: Walk, session: str, new: str) -> None:
    walk.step("`forge registry list` of both sessions (the Phase-4 rows)")
    for name in (session, new):
        code, output, _ = forge(["registry", "list", "--session", name], walk.folder / f"registry_{name}.json")
        rows = [line for line in output.splitlines() if "\tbitnet\t" in line or line.startswith("id\t")]
        walk.quote("\n".join(rows))
    return None


def forge_open(walk: Walk, new: str) -> tuple[Path, Path]:
    """Step 4: ``forge open NEW 4``; (the lab root it names, the notebook relative to it)."""
    walk.step(f"4. forge open {new} 4")
    code, output, _ = forge(["open", new, "4"], walk.folder / "4_open.json")
    walk.quote(output)
    walk.check(code == 0, "forge open wrote the explore notebook")
    found = re.search(r"^\s+cd (.+) && jupyter lab --port \d+ (\S+)$", output, re.M)
    if not walk.check(found is not None, "it says how to start JupyterLab"):
        raise SystemExit(walk.save())
    return Path(found.group(1)), Path(found.group(2))


def write_registry_notebook(folder: Path) -> Path:
    """A notebook holding the README's registry browser snippet (with the kernel JupyterLab starts without asking)."""
    from forgelib.notebooks import clean

    nb = clean(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from forgelib.viz.inspect import registry_browser\n\nregistry_browser()")]))
    path = folder / "registry_browser.ipynb"
    nbformat.write(nb, path)
    return path


def in_the_browser(walk: Walk, session: str, new: str, root: Path, notebook: Path) -> None:
    """Step 5: the explore notebook, the registry browser and the executed scorecard in JupyterLab."""
    chromium, chromedriver = find_browser()
    registry_nb = write_registry_notebook(root / notebook.parent)
    scorecard = paths.outputs_root() / new / "09_scorecard" / "09_scorecard.ipynb"
    # the kernels (started in the notebook's folder) import this checkout's forgelib, as papermill's (started in the
    # repository root) do, even where the installed forgelib is another checkout's (a git worktree)
    env = {"FORGE_OUTPUTS": str(paths.outputs_root()), "FORGE_ROOT": str(paths.repo_root()),
           "PYTHONPATH": os.pathsep.join(p for p in (str(paths.repo_root()), os.environ.get("PYTHONPATH")) if p)}
    work = walk.folder / "lab-state"
    with JupyterLab(root, work / "state", token=secrets.token_hex(16), env=env) as lab, \
            LabBrowser(lab, walk.folder, chromium, chromedriver, work / "chromium") as browser:
        explore_notebook(walk, browser, new, notebook.as_posix())
        lab.shutdown_kernels()
        registry_browser(walk, browser, session, new, registry_nb.relative_to(root).as_posix())
        lab.shutdown_kernels()
        if scorecard.resolve().is_relative_to(root.resolve()):
            executed_scorecard(walk, browser, scorecard.resolve().relative_to(root.resolve()).as_posix())
        else:
            walk.note(f"(the executed scorecard {scorecard} is outside the lab root {root}: not opened)")


def explore_notebook(walk: Walk, browser: LabBrowser, new: str, name: str) -> None:
    walk.step(f"5a. {name} in JupyterLab: Run > Run All Cells")
    browser.open_notebook(name)
    seconds = browser.run_all(name, timeout=300)
    text = browser.text()
    line = next((ln for ln in text.splitlines() if ln.startswith(f"[forge] {PHASE} of session {new}")), "")
    walk.note(f"ran every cell in {seconds:.0f} s; the run cell printed:")
    walk.quote(line)
    walk.check("nothing is run (explore). Its GATE FAILED, not enforced (run.gates: warn): ppl_ratio_upper_bound = "
               in line, "the explored notebook says nothing runs and that its gate failed, with the check")
    walk.check("qat:" not in text, "nothing trained (no QAT progress line)")
    table = browser.js("""
        const t = Array.from(window.jupyterapp.shell.currentWidget.node.querySelectorAll('.jp-OutputArea-output table'))
                  .find(t => t.innerText.includes('ppl_ratio_upper_bound'));
        if (t) t.scrollIntoView({block: 'center'});
        return t ? t.innerText : '';""")
    row = next((r for r in table.splitlines() if "ppl_ratio_upper_bound" in r), "")
    walk.note("the result table's gate row:")
    walk.quote(row)
    walk.check("FAIL" in row, "the result table marks the failed check")
    walk.note(f"screenshot {browser.screenshot('5a_explore_result_table')}")
    browser.js("""
        const o = Array.from(window.jupyterapp.shell.currentWidget.node.querySelectorAll('.jp-OutputArea-output'))
                  .find(o => o.innerText.includes('nothing is run (explore)'));
        if (o) o.scrollIntoView({block: 'start'});""")
    walk.note(f"screenshot {browser.screenshot('5a_explore_gate_failed_line')}")
    browser.raise_errors(name)
    walk.check(True, "no error output in the explored notebook")


def _select(browser: LabBrowser, label: str, choose) -> str:
    """Pick an option of the registry browser's dropdown ``label`` (``choose(texts) -> text``); the text picked."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    element = wait_for(lambda: browser.driver.find_element(
        By.XPATH, f"//div[contains(@class, 'widget-dropdown')][.//label[normalize-space()='{label}']]//select"),
        30, f"the registry browser's '{label}' dropdown")
    pick = Select(element)
    text = wait_for(lambda: choose([o.text.strip() for o in pick.options]), 30, f"an option to pick in '{label}'")
    pick.select_by_visible_text(text)
    return text


def _widget_text(browser: LabBrowser, index: int) -> str:
    return browser.js("""
        const html = window.jupyterapp.shell.currentWidget.node.querySelectorAll('.widget-html-content');
        return html.length > arguments[0] ? html[arguments[0]].innerText : '';""", index)


def registry_browser(walk: Walk, browser: LabBrowser, session: str, new: str, name: str) -> None:
    walk.step(f"5b. The registry browser ({name}: `registry_browser()`)")
    browser.open_notebook(name)
    browser.run_all(name, timeout=120)
    _select(browser, "status", lambda texts: "failed" in texts and "failed")
    listed = _select(browser, "session", lambda texts: session in texts and session)
    walk.check(listed == session, f"status 'failed' lists the stopped session {session}")
    tables = wait_for(lambda: (t := _widget_text(browser, 0)) and "bitnet" in t and t, 30, f"{session}'s tables")
    walk.note(f"session {session}, its models table:")
    walk.quote(tables)
    bitnet = [r for r in tables.splitlines() if re.match(r"\s*\d+\s+bitnet\s", r)]
    walk.check(bool(bitnet) and all("retired" in r for r in bitnet), f"{session}'s Phase-4 model shows as retired")
    walk.check(any("gate failed" in r for r in bitnet), "the table says why: its gate failed")
    walk.note(f"screenshot {browser.screenshot('5b_registry_stopped_session')}")
    _select(browser, "status", lambda texts: "any" in texts and "any")
    _select(browser, "session", lambda texts: new in texts and new)
    tables = wait_for(lambda: (t := _widget_text(browser, 0)) and new in t and "bitnet" in t and t, 30,
                      f"{new}'s tables")
    walk.note(f"session {new}, its runs and models:")
    walk.quote(tables)
    bitnet = [r for r in tables.splitlines() if re.match(r"\s*\d+\s+bitnet\s", r)]
    walk.check(bool(bitnet) and all("gate-failed" in r for r in bitnet), f"{new}'s Phase-4 model shows gate-failed")
    later = [r for r in tables.splitlines() if re.match(r"\s*\d+\s+(curriculum|baking|experts|compression)\s", r)]
    walk.check(bool(later) and all("active" in r.split() for r in later), "the later phases' models show active")
    picked = _select(browser, "model", lambda texts: next((t for t in texts if t.startswith("bitnet/model")), None))
    details = wait_for(lambda: (t := _widget_text(browser, 1)) and "lineage" in t and t, 30, "the model's details")
    walk.note(f"model {picked}, its details:")
    walk.quote(details)
    walk.check(details.splitlines()[0].endswith("gate-failed"), "the details give the model's status, gate-failed")
    walk.check("cognate/" in details and "quietstar/" in details,
               f"its lineage crosses into {session} (quietstar, evomerge, cognate)")
    browser.js("""const w = window.jupyterapp.shell.currentWidget.node.querySelector('.widget-vbox');
                  if (w) w.scrollIntoView({block: 'start'});""")
    walk.note(f"screenshot {browser.screenshot('5b_registry_exploration_session')}")
    browser.raise_errors(name)


def executed_scorecard(walk: Walk, browser: LabBrowser, name: str) -> None:
    walk.step(f"5c. The scorecard the exploration run executed ({name}), opened as is")
    browser.open_notebook(name)
    table = wait_for(lambda: browser.js("""
        const t = Array.from(window.jupyterapp.shell.currentWidget.node.querySelectorAll('.jp-OutputArea-output table'))
                  .find(t => t.innerText.includes('bits/value'));
        if (t) t.scrollIntoView({block: 'center'});
        return t ? t.innerText : '';"""), 30, "the scorecard table")
    walk.quote(table)
    row = next((r for r in table.splitlines() if r.startswith("4 bitnet")), "")
    walk.check("gate-failed" in row, "the scorecard's gate column marks 4 bitnet gate-failed")
    notes = [ln for ln in browser.text().splitlines() if ln.startswith("[forge] scorecard:")]
    walk.quote("\n".join(notes))
    walk.check(any("GATE FAILED, not enforced" in n for n in notes), "the scorecard says which phase's gate failed")
    walk.note(f"screenshot {browser.screenshot('5c_scorecard')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--session", default=f"gs-{time.strftime('%m%d-%H%M%S')}", help="the session stopped")
    parser.add_argument("--fail", default=FAIL, help=f"the impossible bound (default {FAIL})")
    parser.add_argument("--set", action="append", default=[], help="more overrides for step 1")
    parser.add_argument("--reuse", action="store_true", help="reuse the logs of steps 1 and 3 when there")
    args = parser.parse_args(argv)
    folder = paths.outputs_root() / "walkthrough" / args.session
    folder.mkdir(parents=True, exist_ok=True)
    walk = Walk(folder)
    walk.note(f"outputs {paths.outputs_root()}, session {args.session}, forced failure --set {args.fail}")
    try:
        message = stop_the_chain(walk, args.session, args.fail, args.set, args.reuse)
        new = explore_way(walk, args.session, message, args.reuse)
        registry_cli(walk, args.session, new)
        root, notebook = forge_open(walk, new)
        in_the_browser(walk, args.session, new, root, notebook)
    finally:
        print(f"\nrecord: {walk.save()}; {len(walk.failed)} check(s) failed", flush=True)
    return 1 if walk.failed else 0


if __name__ == "__main__":
    sys.exit(main())
