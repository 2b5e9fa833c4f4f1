"""Plain-text ``--help``: docstrings written with Markdown/reST marks (backticks, ``**bold**``, ``# headings``) turned
into plain text wrapped to the terminal, and one argparse formatter that appends each option's default.

Used by ``forge`` (``forgelib.cli``) and every ``forge bench NAME`` (``forgelib.bench.options``).
"""
from __future__ import annotations

import argparse
import re
import shutil
import textwrap

_CODE = re.compile(r"``(.+?)``|`([^`\n]+)`", re.S)
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*", re.S)
_EMPHASIS = re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])")  # *word*, never 30*n^2*m
_ITEM = re.compile(r"^(\s*)(- |\* |\d+\. |\([a-z]\) )")
_HEADING = re.compile(r"^\s*#+\s+")


def width() -> int:
    """The text width of help output: the terminal's (``$COLUMNS`` when set), between 60 and 100 columns."""
    return max(60, min(100, shutil.get_terminal_size((100, 24)).columns - 2))


def unmark(text: str) -> str:
    """``text`` without inline marks: ``code`` and `code` become the bare text, **bold** and *emphasis* lose their
    stars, a heading its hashes, a ``* `` bullet becomes ``- ``."""
    text = _CODE.sub(lambda m: m.group(1) or m.group(2), text)
    text = _BOLD.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\1", text)
    lines = [_HEADING.sub("", line) for line in text.splitlines()]
    return "\n".join(re.sub(r"^(\s*)\* ", r"\1- ", line) for line in lines)


def _blocks(text: str) -> list[tuple[str, str]]:
    """``text`` as (kind, body) blocks: ``("code", lines)`` for a block indented 4+ spaces after a blank line (kept
    as it is), ``("item", first line + continuations)`` for a paragraph or a list item."""
    blocks: list[tuple[str, str]] = []
    blank = True
    for line in text.splitlines():
        if not line.strip():
            blank = True
            blocks.append(("blank", ""))
            continue
        indent = len(line) - len(line.lstrip())
        if indent >= 4 and (blank or (blocks and blocks[-1][0] == "code")) and not _ITEM.match(line):
            blocks.append(("code", line))
        elif _ITEM.match(line) or blank or not blocks or blocks[-1][0] != "item":
            blocks.append(("item", line.rstrip()))
        else:
            blocks[-1] = ("item", f"{blocks[-1][1]} {line.strip()}")
        blank = False
    return blocks


def plain_text(doc: str | None, columns: int | None = None) -> str:
    """A docstring as plain help text: marks removed (:func:`unmark`), every paragraph and list item re-wrapped to
    ``columns`` (default :func:`width`) with its hanging indent, indented example blocks kept as they are."""
    columns = columns or width()
    out: list[str] = []
    for kind, body in _blocks(unmark(textwrap.dedent(doc or "")).strip("\n")):
        if kind == "blank":
            if out and out[-1] != "":
                out.append("")
        elif kind == "code":
            out.append(body.rstrip())
        else:
            item = _ITEM.match(body)
            hang = " " * (len(item.group(0)) if item else len(body) - len(body.lstrip()))
            lead = body[:len(body) - len(body.lstrip())]
            out.append(textwrap.fill(body.strip(), columns, initial_indent=lead, subsequent_indent=hang,
                                     break_on_hyphens=False))
    return "\n".join(out).strip("\n")


def first_sentence(doc: str | None) -> str:
    """The first paragraph of a docstring in plain words, on one line (a ``forge bench NAME:`` lead removed)."""
    paragraph = unmark(textwrap.dedent(doc or "").strip()).split("\n\n")[0]
    return re.sub(r"^forge bench [\w-]+:\s*", "", " ".join(paragraph.split()))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as given (already plain text, see :func:`plain_text`); each option's help followed
    by its default when it has one worth saying (not None, False or empty, and not already named in the help)."""

    def __init__(self, prog: str, **kwargs):
        kwargs.setdefault("width", width())
        kwargs.setdefault("max_help_position", 30)
        super().__init__(prog, **kwargs)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or default in ("", []) \
                or "default" in text.lower():
            return text
        if isinstance(default, (list, tuple)):
            every = action.choices is not None and list(default) == list(action.choices)
            shown = "all" if every else " ".join(map(str, default))
        else:
            shown = str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def has_markdown(text: str | None) -> list[str]:
    """The Markdown marks left in ``text`` (``**``, a backtick, a ``#`` heading), for tests and checks."""
    text = text or ""
    marks = [mark for mark in ("**", "`") if mark in text]
    if any(_HEADING.match(line) for line in text.splitlines()):
        marks.append("# heading")
    return marks
