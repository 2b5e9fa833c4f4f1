"""New questions written by a frontier model, over the OpenAI-compatible chat-completions protocol.

Optional: ``enabled(config)`` is true only when the parameters name an ``endpoint`` *and* the environment holds
the API key (variable ``api_key_env``, default ``OPENAI_API_KEY``); without both, nothing is ever sent. The
client speaks ``POST {endpoint}/chat/completions`` with ``Authorization: Bearer <key>`` and a JSON body
``{"model", "messages", "temperature", "max_tokens"}``, and reads ``choices[0].message.content``: any server with
that protocol works (OpenAI, vLLM, llama.cpp's server, a local test server). Only the standard library is used.

``propose_questions(family, level, examples, n)`` shows the model a few generated questions of the family and
level as JSON lines ``{"prompt": ..., "answer": ...}`` and asks for ``n`` new ones in the same format. A frontier
model gets answers wrong and drifts from the format, so every proposed item is checked, and kept only if

1. its line parses as a JSON object with a string ``prompt`` and a string (or number) ``answer``;
2. its prompt is in the family's format: ``verify.solve`` re-solves it with the family's grammar (that also
   gives the worked steps, so hints work on it), and the family's own checker ``tasks.check`` accepts the
   proposed answer against the recomputed one (for a family without a solver: the proposed answer as is);
3. its prompt falls in the train split (``tasks.split_of(prompt) == "train"``): a question that lands in the
   fitness or test split is never trained on;
4. it is neither one of the examples nor a repeat.

The rejected items and their reasons are kept in ``last_rejected`` (for logs). The level is not verified: a
question counts at the level it was asked for. Errors (no key, timeout, connection failure, HTTP 4xx/5xx, a
response that is not the protocol's JSON) raise ``FrontierError`` naming the URL and the status; the key is read
from the environment at each call, never stored on the client and never put in a message.

The key is guarded: the endpoint must be ``https://`` (plain ``http://`` only for a loopback host: 127.0.0.0/8,
``::1``, ``localhost``, reached without any proxy), without credentials, query or fragment in the URL; no redirect is
followed (the key would go with it to wherever the server points: a redirect is a ``FrontierError`` naming both
URLs); ``api_key_env`` must be a variable *name*, and a parameter that looks like a secret (``api_key``, ``token``,
...) is refused by ``from_config``: the key comes only from the environment.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Mapping, Sequence

from forgelib.data.base import ANSWER_MARK, FAMILIES, Sample
from forgelib.data.tasks import check, split_of
from forgelib.params import cut, short

from .verify import SOLVERS, solve

__all__ = ["FrontierClient", "FrontierError", "enabled", "build_messages", "parse_proposals", "check_endpoint",
           "check_key_env"]

_EXCERPT = 300  # characters of an error body quoted in a FrontierError
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_SECRET_WORDS = ("key", "token", "secret", "password", "passwd", "auth", "bearer", "credential")
_SETTINGS = ("endpoint", "model", "api_key_env", "timeout", "temperature", "max_tokens", "per_round")


class FrontierError(RuntimeError):
    """The frontier endpoint could not be used (no key, timeout, HTTP error, malformed response)."""


def _get(config: Any, name: str, default: Any = None) -> Any:
    """`config[name]` for a mapping, `config.name` for a parameter dataclass."""
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def enabled(config: Any, environ: Mapping[str, str] | None = None) -> bool:
    """Whether frontier questions are on: `config` (a mapping or a parameter object with `endpoint` and
    optionally `api_key_env`) names an endpoint and the key variable is set (non-empty) in the environment."""
    environ = os.environ if environ is None else environ
    endpoint = _get(config, "endpoint")
    key_env = _get(config, "api_key_env") or "OPENAI_API_KEY"
    return isinstance(endpoint, str) and bool(endpoint.strip()) and bool(environ.get(key_env))


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a URL's host name) is this machine: ``localhost``, 127.0.0.0/8 or ``::1``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(endpoint: Any) -> str:
    """``endpoint`` without trailing slashes, or a ValueError saying why the API key may not be sent there:
    ``https://`` only (``http://`` for a loopback host), no ``user:password@``, query or fragment."""
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ValueError("endpoint must name the API base URL, e.g. https://api.openai.com/v1")
    endpoint = endpoint.strip().rstrip("/")
    # what a message may show: no user:password@, query or fragment (they may hold a secret)
    shown = short(re.sub(r"//[^/]*@", "//", re.split(r"[?#]", endpoint, maxsplit=1)[0]))
    try:
        parts = urllib.parse.urlsplit(endpoint)
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError:
        raise ValueError(f"frontier endpoint {shown} is not a valid URL") from None
    if parts.scheme.lower() not in ("https", "http") or not parts.hostname:
        raise ValueError(f"frontier endpoint {shown} must be an https:// URL with a host, e.g. "
                         "https://api.openai.com/v1")
    if parts.username is not None or parts.password is not None:
        raise ValueError("frontier endpoint must not carry credentials (user:password@host): the API key is read "
                         "only from the environment variable named by api_key_env")
    if parts.query or parts.fragment or "?" in endpoint or "#" in endpoint:
        raise ValueError(f"frontier endpoint {shown} must be a base URL without query or fragment "
                         "(/chat/completions is appended to it)")
    if parts.scheme.lower() == "http" and not is_loopback(parts.hostname):
        raise ValueError(f"frontier endpoint {shown} would send the API key unencrypted: use https:// (plain "
                         "http:// is allowed only for a loopback host: 127.0.0.0/8, ::1, localhost)")
    return endpoint


def check_key_env(name: Any) -> str:
    """``name`` when it is an environment variable's name, else a ValueError that does not echo it (it may be
    the key itself, written where its variable's name belongs)."""
    if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
        raise ValueError("api_key_env must be the name of an environment variable (letters, digits and _, not "
                         "starting with a digit), e.g. OPENAI_API_KEY; the value given is not shown in case it is "
                         "the key itself")
    return name


def _refuse_secrets(config: Any) -> None:
    """A ValueError when the frontier parameters hold a setting that looks like a secret (``api_key``, ``token``,
    ...): the key is read only from the environment. The value is never shown."""
    names = config.keys() if isinstance(config, Mapping) else getattr(config, "__dict__", {}).keys()
    for name in names:
        lowered = str(name).lower()
        if name not in _SETTINGS and any(word in lowered for word in _SECRET_WORDS):
            raise ValueError(f"frontier parameter {short(str(name))} looks like a secret and is refused: the API key "
                             "is read only from the environment variable named by api_key_env (default "
                             "OPENAI_API_KEY); remove it from the parameters")


def build_messages(family: str, level: int, examples: Sequence[Sample], n: int) -> list[dict[str, str]]:
    """The chat messages that ask for `n` new questions like `examples`, as JSON lines."""
    description = FAMILIES[family].description if family in FAMILIES else family
    shown = "\n".join(json.dumps({"prompt": s.prompt, "answer": s.answer}) for s in examples)
    return [
        {"role": "system", "content": (
            "You write practice problems for a small language model. Reply with JSON lines only: one object "
            '{"prompt": "...", "answer": "..."} per line, no other text, no code fences.')},
        {"role": "user", "content": (
            f"Task family '{family}': {description}. Difficulty level {level} (of 10).\n"
            f"Examples at this level, one JSON object per line:\n{shown}\n"
            f"Write {n} new problems of the same kind and difficulty, different from the examples, in exactly "
            "the same format (the same characters, spacing and punctuation; the answer exactly as in the "
            "examples, nothing else). The answers must be correct. One JSON object per line.")},
    ]


def _json_items(text: str) -> list[tuple[str, Any]]:
    """(raw line, parsed value or None) for each non-empty line; a whole-text JSON array counts item by item."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            values = json.loads(stripped)
            if isinstance(values, list):
                return [(json.dumps(v), v) for v in values]
        except json.JSONDecodeError:
            pass
    out = []
    for line in stripped.splitlines():
        line = line.strip().rstrip(",")
        if not line or line.startswith("```"):
            continue
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            out.append((line, None))
    return out


def _judge(value: Any, family: str, level: int) -> tuple[Sample | None, str]:
    """The accepted Sample for one parsed item, or None and the reason it was rejected."""
    if not isinstance(value, dict) or not isinstance(value.get("prompt"), str):
        return None, "not an object with a string prompt"
    answer = value.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int)):
        return None, "no string or integer answer"
    prompt, answer = value["prompt"], str(answer).strip()
    if not prompt or not answer or ANSWER_MARK in prompt or ANSWER_MARK in answer:
        return None, f"empty, or uses the answer mark {ANSWER_MARK!r}"
    if family in SOLVERS:
        solution = solve(family, prompt)
        if solution is None:
            return None, "prompt not in the family's format"
        sample = Sample(prompt, solution.answer, family, level, solution.steps)
    else:
        sample = Sample(prompt, answer, family, level)
    if not check(sample, answer):
        return None, f"wrong answer (expected {sample.answer!r})"
    if split_of(prompt) != "train":
        return None, f"prompt in the {split_of(prompt)!r} split"
    return sample, ""


def parse_proposals(text: str, family: str, level: int, exclude: Sequence[str] = (), limit: int | None = None,
                    meta: dict[str, Any] | None = None) -> tuple[list[Sample], list[dict[str, str]]]:
    """The accepted questions in a model's reply (module docstring for the rules) and the rejected items with
    their reasons. Prompts in `exclude` (the examples) and repeats are rejected; at most `limit` are kept."""
    accepted: list[Sample] = []
    rejected: list[dict[str, str]] = []
    seen = set(exclude)
    for raw, value in _json_items(text):
        if value is None:
            rejected.append({"item": raw[:200], "reason": "not JSON"})
            continue
        sample, reason = _judge(value, family, level)
        if sample is not None and sample.prompt in seen:
            sample, reason = None, "repeats an example or an earlier item"
        if sample is not None and limit is not None and len(accepted) >= limit:
            sample, reason = None, "more than asked for"
        if sample is None:
            rejected.append({"item": raw[:200], "reason": reason})
            continue
        sample.meta = dict(meta or {})
        seen.add(sample.prompt)
        accepted.append(sample)
    return accepted, rejected


class FrontierClient:
    """An OpenAI-compatible chat-completions client for writing questions (module docstring)."""

    def __init__(self, endpoint: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 30,
                 temperature: float = 0.7, max_tokens: int = 2048):
        self.endpoint = check_endpoint(endpoint)
        if not isinstance(model, str) or not model.strip():
            raise ValueError("model must name the frontier model, e.g. gpt-4o-mini")
        self.model, self.api_key_env, self.timeout = model, check_key_env(api_key_env), float(timeout)
        self.temperature, self.max_tokens = float(temperature), int(max_tokens)
        self.last_rejected: list[dict[str, str]] = []
        self.requests = 0

    @classmethod
    def from_config(cls, config: Any) -> "FrontierClient":
        """A client from a parameter mapping/object with `endpoint`, `model` and optional `api_key_env`,
        `timeout`, `temperature`, `max_tokens` (a setting that looks like a secret, e.g. `api_key`, is refused)."""
        _refuse_secrets(config)
        kwargs = {name: _get(config, name) for name in ("api_key_env", "timeout", "temperature", "max_tokens")}
        return cls(_get(config, "endpoint"), _get(config, "model"),
                   **{name: value for name, value in kwargs.items() if value is not None})

    @property
    def url(self) -> str:
        return f"{self.endpoint}/chat/completions"

    def __repr__(self) -> str:
        return f"FrontierClient(endpoint={self.endpoint!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _key(self) -> str:
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise FrontierError(f"{self.url}: no API key: the environment variable {self.api_key_env} is not set "
                                "(nothing was sent)")
        return key

    def chat(self, messages: list[dict[str, str]]) -> str:
        """Send one chat-completions request; the reply's `choices[0].message.content`."""
        key = self._key()
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Accept": "application/json", "Authorization": f"Bearer {key}"})
        self.requests += 1
        try:
            with self._opener().open(request, timeout=self.timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            excerpt = _scrub(exc.read(_EXCERPT * 4).decode("utf-8", "replace"), key)[:_EXCERPT]
            raise FrontierError(f"{self.url}: HTTP {exc.code} {exc.reason}: {excerpt}") from None
        except (TimeoutError, socket.timeout):
            raise FrontierError(f"{self.url}: timed out after {self.timeout:g} s") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise FrontierError(f"{self.url}: timed out after {self.timeout:g} s") from None
            raise FrontierError(f"{self.url}: connection failed: {_scrub(str(exc.reason), key)}") from None
        except OSError as exc:  # e.g. a connection reset while reading
            raise FrontierError(f"{self.url}: connection failed: {_scrub(str(exc), key)}") from None
        return _content(self.url, status, raw, key)

    def _opener(self) -> urllib.request.OpenerDirector:
        """urllib's opener that follows no redirect (the key would go along) and, for a loopback endpoint, uses no
        proxy (an ``http_proxy`` would see the key in clear text)."""
        host = urllib.parse.urlsplit(self.endpoint).hostname or ""
        proxies = urllib.request.ProxyHandler({} if is_loopback(host) else None)
        return urllib.request.build_opener(proxies, _NoRedirect())

    def propose_questions(self, family: str, level: int, examples: list[Sample], n: int) -> list[Sample]:
        """Up to `n` new, checked questions of `family` at `level` written after `examples` (module docstring:
        the acceptance rules); the rejected items are in `last_rejected`."""
        if n <= 0:
            self.last_rejected = []
            return []
        reply = self.chat(build_messages(family, level, examples, n))
        accepted, self.last_rejected = parse_proposals(
            reply, family, level, exclude=[s.prompt for s in examples], limit=n,
            meta={"source": "frontier", "model": self.model})
        return accepted


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect (301, 302, 303, 307, 308): the request carries the API key."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        fp.close()
        raise FrontierError(f"{req.full_url}: HTTP {code}: the server redirects to {cut(newurl, 200)}; a redirect is "
                            "not followed while the API key is attached (nothing was sent there): set the frontier "
                            "endpoint to the URL that answers")


def _scrub(text: str, key: str) -> str:
    """`text` with the key (should a server echo it) blanked out."""
    return text.replace(key, "***") if key else text


def _content(url: str, status: int, raw: bytes, key: str) -> str:
    """`choices[0].message.content` of a chat-completions response body."""
    try:
        data = json.loads(raw.decode("utf-8"))
        content = data["choices"][0]["message"]["content"]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        excerpt = _scrub(raw[:_EXCERPT].decode("utf-8", "replace"), key)
        raise FrontierError(f"{url}: HTTP {status} but the response is not JSON ({exc.__class__.__name__}): "
                            f"{excerpt!r}") from None
    except (KeyError, IndexError, TypeError):
        raise FrontierError(f"{url}: HTTP {status} but the response has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise FrontierError(f"{url}: HTTP {status} but choices[0].message.content is not text")
    return content
