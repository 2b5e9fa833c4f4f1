"""Hostile inputs around secrets and code injection: the frontier client's API key (redirects, plain HTTP, proxies,
keys in parameters), notebook parameters papermill writes into a notebook as code, and `forge merge --compare`
checked before anything is written. Real local HTTP servers; no kernel is ever started."""
import datetime
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from forgelib.curriculum import FrontierClient, FrontierError

KEY = "sk-hostile-test-4242"

# ---------------------------------------------------------------------------------------------- frontier client


class _Recorder(BaseHTTPRequestHandler):
    """Records every request (method, path, Authorization); answers as the server's ``mode`` says: a redirect
    to ``server.location`` with status ``mode``, or a chat-completions reply."""

    def log_message(self, *args):
        pass

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.server.seen.append({"method": self.command, "path": self.path,
                                 "auth": self.headers.get("Authorization")})
        if isinstance(self.server.mode, int):
            self.send_response(self.server.mode)
            self.send_header("Location", self.server.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "ok"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _handle


def _serve(host: str):
    httpd = ThreadingHTTPServer((host, 0), _Recorder)
    httpd.daemon_threads = True
    httpd.seen, httpd.mode, httpd.location = [], "ok", ""
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    httpd.base = f"http://{host}:{httpd.server_address[1]}"
    return httpd


def _other_loopback() -> str:
    """127.0.0.2 when it can be bound (Linux routes all of 127/8 to lo), else 127.0.0.1 (another port: still
    another origin)."""
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
        return "127.0.0.2"
    except OSError:
        return "127.0.0.1"


@pytest.fixture
def servers(monkeypatch):
    monkeypatch.setenv("FRONTIER_HOSTILE_KEY", KEY)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    first, second = _serve("127.0.0.1"), _serve(_other_loopback())
    yield first, second
    for httpd in (first, second):
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_host_is_refused_and_never_receives_the_key(servers, code):
    first, second = servers
    first.mode, first.location = code, f"{second.base}/steal/chat/completions"
    client = FrontierClient(f"{first.base}/v1", "m", api_key_env="FRONTIER_HOSTILE_KEY", timeout=5)
    with pytest.raises(FrontierError) as info:
        client.chat([{"role": "user", "content": "hi"}])
    message = str(info.value)
    assert f"{first.base}/v1/chat/completions" in message and first.location in message
    assert f"HTTP {code}" in message and "redirect" in message and KEY not in message
    assert second.seen == [], "the other host received a request (and with it the key)"
    assert [r["auth"] for r in first.seen] == [f"Bearer {KEY}"]


def test_a_redirect_on_the_same_server_is_refused_too(servers):
    first, _ = servers
    first.mode, first.location = 302, "/elsewhere/chat/completions"
    client = FrontierClient(f"{first.base}/v1", "m", api_key_env="FRONTIER_HOSTILE_KEY", timeout=5)
    with pytest.raises(FrontierError, match="redirects to .*/elsewhere/chat/completions"):
        client.chat([])
    assert [r["path"] for r in first.seen] == ["/v1/chat/completions"]


def test_a_loopback_endpoint_is_reached_without_the_environments_proxy(servers, monkeypatch):
    import urllib.request

    first, proxy = servers
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's cached opener read the proxies of its time
    monkeypatch.setenv("http_proxy", proxy.base)
    monkeypatch.setenv("HTTP_PROXY", proxy.base)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    client = FrontierClient(f"{first.base}/v1", "m", api_key_env="FRONTIER_HOSTILE_KEY", timeout=5)
    assert client.chat([]) == "ok"
    assert proxy.seen == [] and [r["auth"] for r in first.seen] == [f"Bearer {KEY}"]


@pytest.mark.parametrize("endpoint", ["http://example.com/v1", "http://10.1.2.3:8000/v1", "HTTP://api.openai.com/v1",
                                      "http://127.0.0.1.example.com/v1", "http://localhost.example.com/v1",
                                      "http://[fe80::1]/v1"])
def test_plain_http_to_a_remote_host_is_refused(endpoint):
    with pytest.raises(ValueError, match="would send the API key unencrypted: use https://") as info:
        FrontierClient(endpoint, "m")
    assert "127.0.0.0/8, ::1, localhost" in str(info.value)


@pytest.mark.parametrize("endpoint", ["https://api.openai.com/v1", "http://127.0.0.1:8000/v1", "http://127.9.8.7/v1",
                                      "http://localhost:11434/v1", "http://[::1]:8080/v1", "https://example.com/v1/"])
def test_https_and_loopback_http_are_accepted(endpoint):
    assert FrontierClient(endpoint, "m").url == endpoint.rstrip("/") + "/chat/completions"


@pytest.mark.parametrize("endpoint, pattern", [
    ("ftp://example.com/v1", "must be an https:// URL with a host"),
    ("file:///etc/passwd", "must be an https:// URL with a host"),
    ("https:///v1", "must be an https:// URL with a host"),
    ("https://user:sk-in-url-123@example.com/v1", "must not carry credentials"),
    ("https://example.com/v1?api_key=sk-in-url-123", "without query or fragment"),
    ("https://example.com:port/v1#sk-in-url-123", "not a valid URL"),
])
def test_malformed_endpoints_are_named_without_any_secret_in_them(endpoint, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        FrontierClient(endpoint, "m")
    assert "sk-in-url-123" not in str(info.value) and len(str(info.value)) < 300


def test_the_key_is_never_taken_from_the_parameters_nor_stored(servers):
    first, _ = servers
    config = {"endpoint": f"{first.base}/v1", "model": "m", "api_key_env": "FRONTIER_HOSTILE_KEY"}
    for name in ("api_key", "API_KEY", "key", "token", "bearer_token", "password"):
        with pytest.raises(ValueError, match=f"frontier parameter '{name}' looks like a secret") as info:
            FrontierClient.from_config({**config, name: "sk-from-params-999"})
        assert "sk-from-params-999" not in str(info.value) and "environment variable" in str(info.value)
    # the key itself written where its variable's name belongs: refused, and not echoed
    with pytest.raises(ValueError, match="api_key_env must be the name of an environment variable") as info:
        FrontierClient.from_config({**config, "api_key_env": "sk-live-abc-123"})
    assert "sk-live-abc-123" not in str(info.value)
    client = FrontierClient.from_config({**config, "per_round": 2, "max_tokens": 64, "timeout": 5})
    assert client.chat([]) == "ok" and first.seen[-1]["auth"] == f"Bearer {KEY}"
    assert KEY not in repr(vars(client)) and KEY not in repr(client)


def test_the_curriculum_phase_refuses_a_plain_http_endpoint_before_loading_a_model(monkeypatch):
    from forgelib.phases import curriculum

    monkeypatch.setenv("FRONTIER_HOSTILE_KEY", KEY)
    params = curriculum.Params(frontier={"endpoint": "http://example.com/v1", "model": "m",
                                         "api_key_env": "FRONTIER_HOSTILE_KEY"})
    with pytest.raises(ValueError, match="unencrypted"):
        curriculum.frontier_client(params)

    class Stop(Exception):
        pass

    def no_model(*args, **kwargs):
        raise Stop("a model was loaded before the frontier endpoint was checked")

    monkeypatch.setattr(curriculum, "load_source", no_model)
    monkeypatch.setattr(curriculum, "_input_suite", lambda ctx: {})
    ctx = type("Ctx", (), {"seed": 0, "guard_params": None})()
    with pytest.raises(ValueError, match="unencrypted"):
        curriculum.run(params, ctx)


# ---------------------------------------------------------------------------------------------- notebook parameters


def _write_notebook(path, *cells):
    """A notebook file (nbformat 4 JSON) of code cells: each a source text, or (source, tags)."""
    cells = [(c, []) if isinstance(c, str) else c for c in cells]
    path.write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": "code", "id": f"c{i}", "metadata": {"tags": tags}, "execution_count": None, "outputs": [],
         "source": source.splitlines(keepends=True)} for i, (source, tags) in enumerate(cells)]}))
    return path


@pytest.fixture
def papermill_calls(monkeypatch):
    """papermill replaced by a recorder of the parameters it was given: no kernel can start."""
    import sys
    import types

    calls = []
    fake = types.ModuleType("papermill")
    fake.execute_notebook = lambda *args, **kwargs: calls.append(kwargs["parameters"])
    monkeypatch.setitem(sys.modules, "papermill", fake)
    return calls


@pytest.fixture
def notebook(tmp_path, papermill_calls):
    """A notebook whose parameters cell declares session, per_family, a, b, c and d."""
    params = "%matplotlib inline\nsession = None\nper_family: int = 48\na, b = 1, 2\nc = d = 0\nprint('no')"
    path = _write_notebook(tmp_path / "nb.ipynb", "import os", (params, ["parameters"]), "x = 1")
    return path, papermill_calls


def _run(notebook_path, *args):
    from forgelib import notebooks

    return notebooks.main(["run", str(notebook_path), str(notebook_path.with_name("out.ipynb")), *args])


def test_declared_parameters_come_from_the_parameters_cell(notebook):
    from forgelib.notebooks import declared_parameters

    assert declared_parameters(notebook[0]) == ["session", "per_family", "a", "b", "c", "d"]


@pytest.mark.parametrize("flag, name, expected", [
    ("-p", "session=__import__('os').system('touch pwned');x", "is not a Python identifier"),
    ("-r", "session=__import__('os').system('touch pwned');x", "is not a Python identifier"),
    ("-p", "sesion", "has no parameter 'sesion'"),
    ("-r", "os", "has no parameter 'os'"),
    ("-p", "print", "has no parameter 'print'"),
])
def test_a_parameter_name_the_notebook_does_not_declare_is_refused_before_any_kernel(notebook, capsys, flag, name,
                                                                                     expected):
    path, calls = notebook
    assert _run(path, flag, name, "1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("forge: ") and expected in err and str(path) in err
    assert err.endswith("declares: session, per_family, a, b, c, d") and len(err) < 400
    assert calls == [], "papermill was called"
    assert not path.with_name("out.ipynb").exists()


def test_a_long_hostile_name_is_cut_in_the_message(notebook, capsys):
    path, calls = notebook
    assert _run(path, "-p", "x" * 5000 + "=1;import os", "1") == 2
    err = capsys.readouterr().err
    assert len(err) < 500 and "characters)" in err and calls == []


def test_declared_names_and_plain_values_reach_papermill(notebook):
    path, calls = notebook
    assert _run(path, "-p", "per_family", "16", "-r", "session", "2026", "-p", "a", "{k: [1, .nan]}") == 0
    (given,) = calls
    assert given["per_family"] == 16 and given["session"] == "2026" and given["a"]["k"][0] == 1


def test_a_value_papermill_would_write_as_code_is_text_or_refused(notebook, tmp_path):
    """papermill writes a set, bytes or tuple as its repr inside double quotes: a quote in it broke out (seen:
    `-p session "[!!set {'\\"+str(1/0)+\\"'}]"` ran 1/0). Such a -p value is now the text; execute refuses it."""
    from forgelib.notebooks import NotebookParameterError, execute, parameter_value

    path, calls = notebook
    hostile = "[!!set {'\"+str(1/0)+\"'}]"
    assert parameter_value(hostile) == hostile
    assert parameter_value("{a: !!binary IiskMSsi}") == "{a: !!binary IiskMSsi}"
    assert parameter_value("[1, {k: 2024-01-01}]") == [1, {"k": datetime.date(2024, 1, 1)}]
    for value in ([{'"+str(1/0)+"'}], {"k": b'"+1+"'}, {b'"': 1}, ("a", '"')):
        with pytest.raises(NotebookParameterError, match="parameter session of notebook .* a value of type"):
            execute(path, tmp_path / "out.ipynb", {"session": value})
    assert calls == []


def test_a_notebook_without_parameters_cell_or_missing_is_named(tmp_path, capsys, papermill_calls):
    bare = _write_notebook(tmp_path / "bare.ipynb", "x = 1")
    assert _run(bare, "-p", "x", "2") == 2
    assert "has no cell tagged 'parameters', so it takes no parameters (given: 'x')" in capsys.readouterr().err
    assert _run(tmp_path / "missing.ipynb", "-p", "x", "2") == 2
    assert f"notebook {tmp_path / 'missing.ipynb'} does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.ipynb"
    for text, expected in [("{not json", "cannot be read: JSONDecodeError"), ("[1, 2]", "is not a notebook"),
                           ('{"cells": [1]}', "is not a notebook")]:
        broken.write_text(text)
        assert _run(broken, "-p", "x", "2") == 2
        assert f"notebook {broken} {expected}" in capsys.readouterr().err
    _write_notebook(broken, ("x = (\n", ["parameters"]))
    assert _run(broken, "-p", "x", "2") == 2
    assert "its parameters cell is not valid Python (line 1)" in capsys.readouterr().err
    assert papermill_calls == []


def test_the_committed_notebooks_declare_what_the_pipeline_passes():
    from forgelib import paths
    from forgelib.notebooks import declared_parameters
    from forgelib.phases import PHASES
    from forgelib.pipeline import SCORECARD_NOTEBOOK

    for spec in PHASES:
        assert {"params_file", "overrides", "session", "upstream"} <= set(declared_parameters(paths.resolve(
            spec.notebook)))
    assert "session" in declared_parameters(paths.resolve(SCORECARD_NOTEBOOK))
    assert {"params_file", "session", "overrides"} <= set(declared_parameters(paths.resolve(
        "notebooks/00_pipeline.ipynb")))


# ---------------------------------------------------------------------------------------------- forge merge --compare


@pytest.mark.parametrize("make, expected", [
    (lambda p: None, "no such folder; give a saved model folder (config.json and its weights)"),
    (lambda p: p.write_text("x"), "not a folder"),
    (lambda p: p.mkdir(), "has no config.json"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{")), "config.json is not valid JSON (line 1)"),
    (lambda p: (p.mkdir(), (p / "config.json").write_bytes(b"\xff{}")), "config.json cannot be read"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("[]")), "its config.json names no model_type"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text('{"model_type": "llama"}')), "no weights file"),
])
def test_merge_compare_is_checked_before_anything_is_merged_or_written(tmp_path, capsys, monkeypatch, make,
                                                                       expected):
    """(That a good --compare folder still compares: tests/test_integrity.py.)"""
    from forgelib import cli

    monkeypatch.setattr(cli, "cmd_merge", lambda args: pytest.fail("merge started before --compare was checked"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: linear\nmodels: [a, b]\n")
    target = tmp_path / "reference"
    make(target)
    with pytest.raises(SystemExit) as info:
        cli.main(["merge", str(recipe), "--out", str(tmp_path / "out"), "--compare", str(target)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"forge merge: error: argument --compare: {target}: ") and expected in err
    assert not (tmp_path / "out").exists()


def test_merge_compare_refuses_a_huge_config_without_reading_it(tmp_path, capsys, monkeypatch):
    from forgelib import cli

    folder = tmp_path / "reference"
    folder.mkdir()
    with open(folder / "config.json", "wb") as handle:  # sparse: 17 MiB claimed, nothing allocated
        handle.truncate(cli.CONFIG_MAX_BYTES + (1 << 20))
    monkeypatch.setattr(cli, "cmd_merge", lambda args: pytest.fail("merge started before --compare was checked"))
    with pytest.raises(SystemExit):
        cli.main(["merge", str(tmp_path / "recipe.yaml"), "--compare", str(folder)])
    assert f"config.json is {cli.CONFIG_MAX_BYTES + (1 << 20)} bytes" in capsys.readouterr().err
