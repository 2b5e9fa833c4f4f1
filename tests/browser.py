"""Machinery for the real-browser test (tests/test_phases.py): JupyterLab on loopback, driven by headless Chromium
through selenium.

* :func:`find_browser` — Chromium, chromedriver and selenium, else :class:`BrowserUnavailable` naming what is
  missing (`.ci/run` installs Debian's ``chromium`` and ``chromium-driver``).
* :func:`copy_notebook` — a copy of a notebook with its ``parameters`` cell set to given values.
* :class:`JupyterLab` — ``jupyter lab`` (this interpreter's) on 127.0.0.1, a free port, a token the caller sets,
  every Jupyter/IPython folder inside a temporary folder; stopped (kernels included) on exit, even on failure.
* :class:`LabBrowser` — a headless Chromium on that server: open a notebook, run all cells (menu Run → Run All
  Cells), wait until every cell ran, fail with the text of any error output, save screenshots.

Every wait is bounded and fails with a message that says what it waited for.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import nbformat

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/lib/chromium/chromium")
CHROMEDRIVER_NAMES = ("chromedriver",)
CHROMEDRIVER_PATHS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")

STDERR_MIME = "application/vnd.jupyter.stderr"
# JupyterLab user settings for the test: no news/update requests (no network), no toasts over the widgets, and
# every cell attached to the page (the default windowing may leave off-screen cells out of the DOM).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


class BrowserUnavailable(RuntimeError):
    """Chromium, chromedriver or selenium is not installed (the test skips with this message)."""


class BrowserTestError(AssertionError):
    """The browser test saw something wrong (an error output, a wait that timed out)."""


def _first(names: tuple[str, ...], fixed: tuple[str, ...], env: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env] if Path(os.environ[env]).is_file() else None
    for name in names:
        if found := shutil.which(name):
            return found
    return next((p for p in fixed if Path(p).is_file() and os.access(p, os.X_OK)), None)


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths; ``$FORGE_CHROMIUM`` / ``$FORGE_CHROMEDRIVER`` override the search.
    Raises :class:`BrowserUnavailable` naming whatever is missing."""
    missing = []
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package (pip install -e '.[dev]')")
    chromium = _first(CHROMIUM_NAMES, CHROMIUM_PATHS, "FORGE_CHROMIUM")
    driver = _first(CHROMEDRIVER_NAMES, CHROMEDRIVER_PATHS, "FORGE_CHROMEDRIVER")
    for found, what, env in ((chromium, "chromium", "FORGE_CHROMIUM"), (driver, "chromedriver", "FORGE_CHROMEDRIVER")):
        if found is None:
            missing.append(f"{what} (${env}={os.environ[env]} is not a file)" if os.environ.get(env)
                           else f"{what} (not on PATH, not /usr/bin/{what})")
    if missing:
        raise BrowserUnavailable("; ".join(missing))
    return chromium, driver


def copy_notebook(src: str | os.PathLike, dest: str | os.PathLike, **params: Any) -> Path:
    """``src`` written to ``dest`` without outputs, each ``name = …`` line of its ``parameters`` cell replaced
    by ``name = repr(value)`` (a name the cell lacks is appended)."""
    nb = nbformat.read(src, as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        raise ValueError(f"{src} has no cell tagged 'parameters'")
    lines = cell.source.splitlines()
    for name, value in params.items():
        pattern = re.compile(rf"^{re.escape(name)}\s*=")
        hits = [i for i, line in enumerate(lines) if pattern.match(line)]
        if hits:
            lines[hits[0]] = f"{name} = {value!r}"
        else:
            lines.append(f"{name} = {value!r}")
    cell.source = "\n".join(lines)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest)
    return dest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.25,
             on_timeout: Callable[[], str] | None = None) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); after ``timeout`` seconds raise
    :class:`BrowserTestError` naming ``what`` (plus ``on_timeout()``'s details). An exception raised by
    ``condition`` that is a BrowserTestError ends the wait at once."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except BrowserTestError:
            raise
        except Exception as exc:  # a stale element, a page still loading: try again until the deadline
            last_exc = exc
        if time.monotonic() > deadline:
            details = on_timeout() if on_timeout else ""
            if last_exc is not None:
                details += f"\n  last error while polling: {type(last_exc).__name__}: {last_exc}"
            raise BrowserTestError(f"timed out after {timeout:.0f}s waiting for {what}{details}")
        time.sleep(interval)


def _run_with_timeout(fn: Callable[[], Any], timeout: float) -> bool:
    """Run ``fn`` in a daemon thread; True when it finished within ``timeout`` (its exceptions are ignored)."""
    thread = threading.Thread(target=lambda: _quietly(fn), daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        pass


class _Started:
    """A context manager over ``start()`` / ``stop()``: a failed start still stops what it began."""

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class JupyterLab(_Started):
    """``jupyter lab`` of this interpreter on 127.0.0.1 serving ``root_dir``; a context manager.

    ``env`` adds variables to the server's (and so the kernels') environment; Jupyter's and IPython's folders,
    JupyterLab's settings and workspaces all live under ``state_dir`` (never the home directory).
    """

    def __init__(self, root_dir: str | os.PathLike, state_dir: str | os.PathLike, token: str | None = None,
                 env: dict[str, str] | None = None, start_timeout: float = 60.0):
        self.root_dir = Path(root_dir)
        self.state_dir = Path(state_dir)
        self.token = token or secrets.token_hex(16)
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.log_path = self.state_dir / "jupyterlab.log"

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("FORGE_SESSION_LOCK", None)  # this process holds no session lock the kernels may inherit
        folders = {"JUPYTER_CONFIG_DIR": "jupyter-config", "JUPYTER_DATA_DIR": "jupyter-data",
                   "JUPYTER_RUNTIME_DIR": "jupyter-runtime", "IPYTHONDIR": "ipython",
                   "JUPYTERLAB_SETTINGS_DIR": "lab-settings", "JUPYTERLAB_WORKSPACES_DIR": "lab-workspaces",
                   "MPLCONFIGDIR": "matplotlib"}
        for var, name in folders.items():
            path = self.state_dir / name
            path.mkdir(parents=True, exist_ok=True)
            env[var] = str(path)
        env.setdefault("WANDB_MODE", "disabled")
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(self.extra_env)
        return env

    def _write_settings(self, settings_dir: Path) -> None:
        for rel, values in LAB_SETTINGS.items():
            file = settings_dir / rel
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps(values))

    def start(self) -> "JupyterLab":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = self._environment()
        self._write_settings(Path(env["JUPYTERLAB_SETTINGS_DIR"]))
        self.port = free_port()
        cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--ServerApp.token={self.token}", "--ServerApp.password=",
               f"--ServerApp.root_dir={self.root_dir}",
               f"--LabApp.user_settings_dir={env['JUPYTERLAB_SETTINGS_DIR']}",
               f"--LabApp.workspaces_dir={env['JUPYTERLAB_WORKSPACES_DIR']}",
               "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.extension_manager=readonly", "--LabApp.expose_app_in_browser=True",
               "--ServerApp.allow_root=True"]
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(cmd, cwd=self.root_dir, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._answers, self.start_timeout, f"JupyterLab to answer on {self.base_url}/api/status",
                 interval=0.3, on_timeout=self.log_tail)
        return self

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise BrowserTestError(f"jupyter lab exited with code {self.process.returncode}{self.log_tail()}")
        try:
            return self.api("GET", "/api/status", timeout=2) is not None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, timeout: float = 20.0) -> None:
        """Shut the server down through its API (it stops its kernels), then terminate whatever is left of it
        and of every process it started."""
        if self.process is None:
            return
        try:
            import psutil
            family = psutil.Process(self.process.pid).children(recursive=True)
        except Exception:
            family = []
        if self.process.poll() is None:
            try:
                self.api("POST", "/api/shutdown", timeout=5)
            except Exception:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        for child in family:  # kernels run in sessions of their own: not reached through the process group
            try:
                if child.is_running():
                    child.kill()
            except Exception:
                pass
        self._log.close()
        self.process = None

    # -- helpers ---------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base_url}/{path.lstrip('/')}{sep}token={self.token}"

    def api(self, method: str, path: str, timeout: float = 10) -> Any:
        req = urllib.request.Request(self.url(path), method=method, data=b"" if method != "GET" else None)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else {}

    def shutdown_kernels(self) -> None:
        """End every session (and its kernel): a notebook done with frees its memory before the next one."""
        for sess in self.api("GET", "/api/sessions"):
            self.api("DELETE", f"/api/sessions/{sess['id']}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        text = re.sub(rf"token={self.token}", "token=…", text)
        return f"\n  --- jupyter lab log (last {chars} characters) ---\n{text[-chars:]}"


class LabBrowser(_Started):
    """Headless Chromium (selenium) on a :class:`JupyterLab`; screenshots go to ``shots``; a context manager."""

    def __init__(self, lab: JupyterLab, shots: str | os.PathLike, chromium: str, chromedriver: str,
                 profile_dir: str | os.PathLike):
        self.lab = lab
        self.shots = Path(shots)
        self.shots.mkdir(parents=True, exist_ok=True)
        self.chromium, self.chromedriver = chromium, chromedriver
        self.profile_dir = Path(profile_dir)
        self.driver = None
        self.saved: list[Path] = []

    def start(self) -> "LabBrowser":
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = self.chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                    "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-crash-reporter", "--password-store=basic", f"--user-data-dir={self.profile_dir}"):
            options.add_argument(arg)
        options.unhandled_prompt_behavior = "accept"  # a "leave page?" prompt must not block a navigation
        home = self.profile_dir / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
               "XDG_CACHE_HOME": str(home / ".cache")}
        service = Service(executable_path=self.chromedriver, env=env,
                          log_output=str(self.profile_dir.parent / "chromedriver.log"))
        self.driver = webdriver.Chrome(options=options, service=service)
        self.driver.set_page_load_timeout(60)
        self.driver.set_script_timeout(30)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        if self.driver is None:
            return
        driver, self.driver = self.driver, None
        if not _run_with_timeout(driver.quit, timeout):
            process = getattr(getattr(driver, "service", None), "process", None)
            if process is not None and process.poll() is None:
                process.kill()

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None and self.driver is not None:
            _quietly(lambda: self.screenshot("failure"))
        self.stop()

    # -- the page ------------------------------------------------------------------------------------------
    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        if not self.driver.save_screenshot(str(path)):
            raise BrowserTestError(f"could not save the screenshot {path}")
        self.saved.append(path)
        return path

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def notebook_panel(self):
        """The notebook panel in front (the active tab's)."""
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden)")

    def open_notebook(self, name: str, timeout: float = 60.0) -> None:
        """Load JupyterLab on ``/lab/tree/<name>`` (a fresh workspace) and wait until the notebook shows its
        cells and its kernel is idle."""
        self.driver.get(self.lab.url(f"lab/tree/{name}?reset"))
        wait_for(lambda: self.js("return !!window.jupyterapp && !!window.jupyterapp.shell"), timeout,
                 "the JupyterLab application to load", on_timeout=self._diagnostics)
        wait_for(lambda: self._kernel_status(name) == "idle", timeout,
                 f"{name} to open with an idle kernel", on_timeout=lambda: self._diagnostics(name))

    def _kernel_status(self, name: str) -> str | None:
        return self.js("""
            const w = window.jupyterapp.shell.currentWidget;
            if (!w || !w.context || w.context.path !== arguments[0]) return null;
            if (!w.content || !w.content.widgets || w.content.widgets.length === 0) return null;
            const k = w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
            return k ? k.status : null;""", name)

    def _prompts(self) -> list[str]:
        return self.js("""
            const w = window.jupyterapp.shell.currentWidget;
            return Array.from(w.node.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt'))
                        .map(e => e.textContent.trim());""")

    def run_all(self, name: str, timeout: float = 180.0) -> float:
        """Menu Run → Run All Cells, then wait until every code cell has an execution count and the kernel is
        idle; an error output ends the wait with its text. Returns the seconds it took."""
        from selenium.webdriver.common.by import By

        started = time.monotonic()
        before = self._prompts()
        menu = wait_for(lambda: next((e for e in self.driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item")
                                      if e.text.strip() == "Run"), None), 15, "the menu bar's Run menu")
        menu.click()
        item = wait_for(lambda: self.driver.find_element(
            By.CSS_SELECTOR, ".lm-Menu-item[data-command='runmenu:run-all']"), 10,
            "the menu item Run All Cells")
        item.click()
        wait_for(lambda: self._prompts() != before, 20, "Run All Cells to start (a prompt to change)",
                 on_timeout=lambda: self._diagnostics(name))

        def done() -> bool:
            self.raise_errors(name)
            prompts = self._prompts()
            return (self._kernel_status(name) == "idle" and bool(prompts)
                    and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts))

        wait_for(done, timeout, f"every cell of {name} to run (no [*] or [ ] prompt left, kernel idle)",
                 interval=0.5, on_timeout=lambda: self._diagnostics(name))
        return time.monotonic() - started

    def error_texts(self) -> list[str]:
        """Texts of the error outputs in the front notebook (stderr outputs holding a traceback)."""
        return self.js(f"""
            const w = window.jupyterapp.shell.currentWidget;
            return Array.from(w.node.querySelectorAll('.jp-OutputArea-output[data-mime-type="{STDERR_MIME}"]'))
                        .map(e => e.innerText)
                        .filter(t => /Traceback|Error:|Exception/.test(t));""")

    def raise_errors(self, name: str) -> None:
        errors = self.error_texts()
        if errors:
            _quietly(lambda: self.screenshot(f"error-{Path(name).stem}"))
            raise BrowserTestError(f"{name} shows {len(errors)} error output(s) in JupyterLab:\n"
                                   + "\n---\n".join(e[-3000:] for e in errors))

    def text(self) -> str:
        """The front notebook's visible text (its cells and outputs)."""
        return self.js("return window.jupyterapp.shell.currentWidget.node.innerText")

    def save(self) -> None:
        self.js("return window.jupyterapp.commands.execute('docmanager:save')")

    def _diagnostics(self, name: str | None = None) -> str:
        parts = []
        try:
            if name:
                parts.append(f"kernel status {self._kernel_status(name)!r}, prompts {self._prompts()}")
            parts.append(f"page {self.driver.current_url.split('?')[0]}")
            _quietly(lambda: self.screenshot("timeout"))
            parts.append(f"screenshot {self.shots / 'timeout.png'}")
        except Exception as exc:
            parts.append(f"(no page state: {type(exc).__name__})")
        return "\n  " + "; ".join(parts) + self.lab.log_tail(1500)
