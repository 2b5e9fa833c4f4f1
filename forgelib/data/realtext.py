"""Real English prose, offline: the reStructuredText sources of Python's documentation (PSF License Version 2), as
Debian's ``python3.X-doc`` package ships them; ``make setup-text`` unpacks them into the environment
(``<venv>/share/forge-realtext/python3.X-doc/_sources``), nothing is fetched at run time.

    texts = load_texts("test")            # cleaned prose, one string per document, in name order
    ppl = evaluate.strided_perplexity(model, tok, texts, max_len=1024, stride=512)

Cleaning keeps what a reader of the rendered page reads as prose: paragraphs (re-flowed), titles, list items,
admonitions and the descriptions of functions/classes; it drops comments, targets, code and literal blocks, doctests,
tables, signatures, options and index entries, and turns inline markup into its text. Documents fall into
``calibration`` or ``test`` by a stable hash of their name, so adding a document moves no other.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
from pathlib import Path

from forgelib.data.base import stable_unit
from forgelib.params import short

__all__ = ["CORPUS_ENV", "EXCLUDED", "SETUP_COMMAND", "SPLITS", "RealTextUnavailableError", "clean_rst",
           "corpus_dir", "corpus_info", "documents", "inline_text", "load_texts", "split_of"]

SETUP_COMMAND = "make setup-text"
CORPUS_ENV = "FORGE_REALTEXT"  # a folder of *.rst.txt (a `_sources` folder) that overrides the search
SPLITS = ("calibration", "test")
EXCLUDED = ("license", "copyright", "contents", "about", "includes/")  # legal text, tables of contents, code
SUFFIX = ".rst.txt"
SYSTEM_DOCS = Path("/usr/share/doc")  # where a system-wide `apt-get install python3-doc` puts python3.X/html/_sources


class RealTextUnavailableError(FileNotFoundError):
    """The real-text corpus is not installed here (or the folder given holds no reST sources)."""


# ----------------------------------------------------------------------------------------------- where it lives


def _minor(path: Path) -> int:
    match = re.search(r"python3\.(\d+)", str(path))
    return int(match.group(1)) if match else 0


def _candidates() -> list[Path]:
    """Where set-up puts the sources (this environment's share/), then a system-wide python3-doc; the newest
    Python first within each place."""
    def newest_first(found):
        return sorted(found, key=_minor, reverse=True)
    return (newest_first(Path(sys.prefix, "share", "forge-realtext").glob("python3.*-doc/_sources"))
            + newest_first(SYSTEM_DOCS.glob("python3.*/html/_sources")))


def corpus_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder of ``*.rst.txt`` sources: ``path`` if given, else ``$FORGE_REALTEXT``, else the newest one that
    ``make setup-text`` unpacked into this environment, else a system-wide ``python3-doc``."""
    given = path if path is not None else os.environ.get(CORPUS_ENV)
    if given is not None:
        folder = Path(given).expanduser()
        problem = ("is not a folder" if not folder.is_dir() else
                   f"holds no *{SUFFIX} files" if next(folder.rglob("*" + SUFFIX), None) is None else None)
        if problem:
            raise RealTextUnavailableError(f"real-text corpus folder {short(str(folder))} {problem} (give the "
                                           f"_sources folder of Python's documentation, or unset ${CORPUS_ENV} "
                                           f"and run `{SETUP_COMMAND}`)")
        return folder
    found = _candidates()
    if not found:
        raise RealTextUnavailableError(
            f"the real-text corpus (Python's documentation sources) is not installed: run `{SETUP_COMMAND}` "
            f"(it unpacks Debian's python3-doc into {Path(sys.prefix, 'share', 'forge-realtext')}; needs apt-get "
            f"and, once, `apt-get update`), or set ${CORPUS_ENV} to a folder of *{SUFFIX} files")
    return found[0]


# ----------------------------------------------------------------------------------------------- block structure

# Directives whose body is prose (admonitions, version notes, the descriptions of documented objects); every other
# directive (code, tables, index, toctree, images, math, productionlist, ...) goes whole.
_PROSE_DIRECTIVES = frozenset({
    "note", "warning", "seealso", "versionadded", "versionchanged", "deprecated", "deprecated-removed",
    "impl-detail", "attention", "caution", "danger", "error", "hint", "important", "tip", "admonition", "topic",
    "sidebar", "glossary", "centered"})
_OBJECT_DIRECTIVES = frozenset({
    "function", "class", "method", "attribute", "data", "exception", "decorator", "decoratormethod", "classmethod",
    "staticmethod", "coroutinefunction", "coroutinemethod", "abstractmethod", "awaitablefunction",
    "awaitablemethod", "describe", "object", "option", "cmdoption", "envvar", "opcode", "pdbcommand",
    "2to3fixer", "type", "macro", "member", "var", "struct", "enum", "enumerator", "union", "property"})
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.-]+)::(.*)$")
_EXPLICIT = re.compile(r"^(\s*)\.\.(\s|$)")
_ADORNMENT = re.compile(r"^\s*([!-/:-@\[-`{-~])\1{2,}\s*$")  # ====, ----, ^^^^ ... (one punctuation char)
_TABLE_BORDER = re.compile(r"^\s*(\+[-=+]+\+|=+( +=+)+)\s*$")  # grid `+--+--+`, simple `===  ===`
_OPTION = re.compile(r"^\s*:[\w -]+:(\s|$)")  # `:noindex:`, `:synopsis: text`; docinfo `:Author: A`
_TARGET_ITEM = re.compile(r"^(\s*[-*+]\s+)\.\. _[^:]*:\s*$")  # a list item that starts with a target


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """The index after the block from ``start`` of lines blank or indented more than ``indent`` (trailing blank
    lines are left to the caller)."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
        end += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return end


def _directive_body(name: str, body: list[str]) -> list[str]:
    """The prose lines of a kept directive's body, dedented: the leading options go, and for a documented object
    everything before the first blank line (the signature's continuation lines and the options)."""
    start = 0
    if name in _OBJECT_DIRECTIVES:
        while start < len(body) and body[start].strip():
            start += 1
    while start < len(body) and (_OPTION.match(body[start]) or not body[start].strip()):
        start += 1
    rest = body[start:]
    margin = min((_indent(line) for line in rest if line.strip()), default=0)
    return [line[margin:] for line in rest]


def _table_end(lines: list[str], start: int) -> int:
    """The index after a grid or simple table whose border is ``lines[start]``."""
    end = start + 1
    if lines[start].lstrip().startswith("+"):
        while end < len(lines) and lines[end].lstrip()[:1] in ("+", "|"):
            end += 1
        return end
    while end < len(lines):  # a simple table: up to a border that the text after it does not continue
        if _TABLE_BORDER.match(lines[end]) and (end + 1 == len(lines) or not lines[end + 1].strip()):
            return end + 1
        end += 1
    return end


def _explicit_markup(lines: list[str], i: int, out: list[str]) -> int:
    """A directive, comment, target or footnote at ``lines[i]``: its kept prose to ``out``; the next index."""
    indent = _indent(lines[i])
    end = _block_end(lines, i + 1, indent)
    match = _DIRECTIVE.match(lines[i])
    name = match.group(2).split(":")[-1] if match else ""
    if name in _PROSE_DIRECTIVES or name in _OBJECT_DIRECTIVES:
        out.append("")
        out += _prose_lines(_directive_body(name, lines[i + 1:end]))
        out.append("")
    return end


def _literal_intro(line: str) -> str:
    """A paragraph line ending in ``::`` as it reads: ``Example::`` -> ``Example:``, ``text ::`` -> ``text``."""
    stripped = line.rstrip()
    if stripped.strip() == "::":
        return ""
    return stripped[:-3] if stripped.endswith(" ::") else stripped[:-1]


def _prose_lines(lines: list[str]) -> list[str]:
    """The lines that remain of reST source once explicit markup, literal blocks, doctests, tables and title
    adornments are gone (indentation kept, blank lines where blocks were)."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if _EXPLICIT.match(line):
            i = _explicit_markup(lines, i, out)
            continue
        if _TARGET_ITEM.match(line):  # `*  .. _label:`: the item's text follows on the next lines
            out.append(_TARGET_ITEM.match(line).group(1).rstrip())
            i += 1
            continue
        if _OPTION.match(line):  # a field list: document info (`:Author: ...`) and the like
            i = _block_end(lines, i + 1, _indent(line))
            continue
        if _TABLE_BORDER.match(line):
            i = _table_end(lines, i)
            out.append("")
            continue
        if stripped.startswith(">>>"):  # a doctest block runs to the next blank line
            while i < len(lines) and lines[i].strip():
                i += 1
            continue
        if _ADORNMENT.match(line):
            out.append("")
            i += 1
            continue
        if stripped.endswith("::"):
            out.append(_literal_intro(line))
            end = _block_end(lines, i + 1, _indent(line))
            literal = any(lines[j].strip() for j in range(i + 1, end))
            i = end if literal else i + 1
            continue
        out.append(line)
        i += 1
    return out


# ----------------------------------------------------------------------------------------------- inline markup

_INLINE = re.compile(
    r"(?P<lit>``(?P<litx>\S.*?)``)"
    r"|(?P<role>:(?P<rolename>[\w:.+-]+):`(?P<rolex>[^`]+)`)"
    r"|(?P<ref>`(?P<refx>[^`]+)`_{0,2})"
    r"|(?P<strong>\*\*(?P<strongx>[^*\s][^*]*?)\*\*)"
    r"|(?P<em>(?<![\w\\*])\*(?P<emx>[^\s*][^*]*?)(?<=\S)\*(?![\w*]))"
    r"|(?P<foot>\s?\[(?:#[\w-]*|\d+|\*)\]_)"
    r"|(?P<subst>\|(?P<substx>\w[\w -]*)\|)"
    r"|(?P<dash>(?<=[\w ])---(?=[\w ]))"
    r"|(?P<esc>\\(?P<escx>.))", re.S)
_TITLED = re.compile(r"^(.*?)\s*<[^<>]*>$", re.S)
_CALLABLE_ROLES = frozenset({"func", "meth", "c:func", "c:macro"})
_NUMBERED_ROLES = {"pep": "PEP ", "rfc": "RFC ", "issue": "bpo-", "gh": "gh-"}
_LABEL_ROLES = frozenset({"ref", "doc", "token", "keyword"})
_SHORTENED = re.compile(r"^~[\w.:-]+(\(\))?$")  # `~a.b.c` shows `c`; `~python-grammar:expression` too


def _role_text(role: str, content: str) -> str:
    """What Sphinx shows for ``:role:`content```: a title before ``<target>``, ``~a.b`` as ``b``, ``PEP 8``,
    ``bpo-123``; a bare ``:ref:`` label as its words."""
    role = role.lower()
    if role in _NUMBERED_ROLES:
        return _NUMBERED_ROLES[role] + content.split("#")[0]
    titled = _TITLED.match(content)
    if titled and titled.group(1):
        return re.sub(r"\\(.)", r"\1", titled.group(1))
    text = re.sub(r"\\(.)", r"\1", content.lstrip("!"))
    if _SHORTENED.match(text):
        text = re.split(r"[.:]", text)[-1]
    if role in ("samp", "file"):
        text = text.replace("{", "").replace("}", "")
    if role in _LABEL_ROLES:
        text = re.sub(r"[-_]+", " ", text.rsplit("/", 1)[-1])
    if role in _CALLABLE_ROLES and not text.endswith(")"):
        text += "()"
    return text


def _inline(match: re.Match) -> str:
    kind = match.lastgroup
    if kind == "lit":
        return match.group("litx")
    if kind == "role":
        return _role_text(match.group("rolename"), match.group("rolex"))
    if kind == "ref":
        titled = _TITLED.match(match.group("refx"))
        return titled.group(1) if titled and titled.group(1) else match.group("refx")
    if kind == "esc":
        return "" if match.group("escx") == " " else match.group("escx")
    if kind == "foot":
        return ""
    if kind == "dash":
        return "\u2014"
    return match.group(kind + "x")


def inline_text(text: str) -> str:
    """reST inline markup as the text it renders to (literals, roles, references, emphasis, escapes)."""
    return _INLINE.sub(_inline, text)


# ----------------------------------------------------------------------------------------------- paragraphs

_BULLET = re.compile(r"^([-*+\u2022]|#\.|\(?\d+[.)])\s+")


def _paragraphs(lines: list[str]) -> list[list[str]]:
    """Runs of non-blank lines."""
    out: list[list[str]] = [[]]
    for line in lines:
        if line.strip():
            out[-1].append(line)
        elif out[-1]:
            out.append([])
    return [p for p in out if p]


def _reflow(paragraph: list[str]) -> str:
    """One paragraph's lines as text: the source's wrapped lines joined by spaces, inline markup rendered. A new
    line starts at each item of a list (a paragraph that starts with a bullet; the markers go) and where the
    indentation changes other than inside an item (a definition after its term)."""
    first = _BULLET.match(paragraph[0].strip())
    lines: list[str] = []
    previous, item_column = -1, -1
    for raw in paragraph:
        indent, text = _indent(raw), raw.strip()
        bullet = _BULLET.match(text) if first and indent == _indent(paragraph[0]) else None
        if bullet and not bullet.group(1)[0].isdigit():
            text = text[bullet.end():]
        if lines and not bullet and indent in (previous, item_column):
            lines[-1] += " " + text
        else:
            lines.append(text)
            item_column = indent + bullet.end() if bullet else -1
        previous = indent
    text = inline_text("\n".join(lines))
    return "\n".join(re.sub(r"\s+", " ", line).strip() for line in text.split("\n"))


def _is_prose(paragraph: str) -> bool:
    """Mostly letters (what is left of a code fragment, a table or a list of symbols is not)."""
    visible = re.sub(r"\s", "", paragraph)
    letters = sum(ch.isalpha() for ch in visible)
    return letters >= 2 and letters >= 0.6 * len(visible)


def clean_rst(text: str) -> str:
    """reST source as prose: paragraphs separated by blank lines, each re-flowed (see the module's docstring)."""
    lines = text.expandtabs(8).splitlines()
    paragraphs = (_reflow(p) for p in _paragraphs(_prose_lines(lines)))
    return "\n\n".join(p for p in paragraphs if p and _is_prose(p))


# ----------------------------------------------------------------------------------------------- the corpus


def split_of(name: str, test_share: float = 0.5) -> str:
    """``"test"`` or ``"calibration"`` for a document, from a stable hash of its name (the same on every machine;
    adding a document moves no other)."""
    if not 0.0 < test_share < 1.0:
        raise ValueError(f"test_share must be in (0, 1), got {short(test_share)}")
    return "test" if stable_unit(f"realtext:{name}") < test_share else "calibration"


def _is_excluded(name: str) -> bool:
    return any(name == e or (e.endswith("/") and name.startswith(e)) for e in EXCLUDED)


@functools.lru_cache(maxsize=4)
def _cleaned(folder: str, listing: tuple[tuple[str, int, int], ...]) -> tuple[tuple[str, str], ...]:
    """(name, cleaned text) of the listed documents; ``listing`` (name, size, mtime) keys the cache, so a changed
    corpus is read again."""
    out = []
    for name, _, _ in listing:
        path = Path(folder, name + SUFFIX)
        try:
            text = clean_rst(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise RealTextUnavailableError(f"real-text document {short(str(path))} is not UTF-8 ({err})") from err
        if text:
            out.append((name, text))
    return tuple(out)


def documents(path: str | os.PathLike | None = None) -> dict[str, str]:
    """Every document of the corpus, cleaned, by name (its path under ``_sources`` without ``.rst.txt``), in name
    order; the licence, copyright, contents and about pages and the code includes are left out, and so is a
    document with no prose left."""
    folder = corpus_dir(path).resolve()
    listing = []
    for file in folder.rglob("*" + SUFFIX):
        name = file.relative_to(folder).as_posix()[:-len(SUFFIX)]
        if not _is_excluded(name):
            stat = file.stat()
            listing.append((name, stat.st_size, stat.st_mtime_ns))
    return dict(_cleaned(str(folder), tuple(sorted(listing))))


def load_texts(split: str, path: str | os.PathLike | None = None, test_share: float = 0.5,
               min_chars: int = 0) -> list[str]:
    """The cleaned documents of one split (``"calibration"`` or ``"test"``), in name order, each at least
    ``min_chars`` characters long."""
    if split not in SPLITS:
        raise ValueError(f"unknown real-text split {short(split)}; valid splits: {list(SPLITS)}")
    return [text for name, text in documents(path).items()
            if split_of(name, test_share) == split and len(text) >= min_chars]


def corpus_info(path: str | os.PathLike | None = None, test_share: float = 0.5) -> dict[str, object]:
    """What a result should record about the corpus: where, which package version, sizes per split and a digest
    of the cleaned text (two machines with the same digest scored the same text)."""
    folder = corpus_dir(path)
    docs = documents(folder)
    version_file = folder.parent / "VERSION"
    digest = hashlib.sha256()
    sizes = {split: {"documents": 0, "characters": 0} for split in SPLITS}
    for name, text in docs.items():
        digest.update(f"{name}\0{text}\0".encode("utf-8"))
        split = split_of(name, test_share)
        sizes[split]["documents"] += 1
        sizes[split]["characters"] += len(text)
    package = re.search(r"python3\.\d+(-doc)?", str(folder))
    return {"corpus": "python-docs-rst", "folder": str(folder), "package": package.group(0) if package else None,
            "version": version_file.read_text(encoding="utf-8").strip() if version_file.is_file() else None,
            "license": "PSF License Version 2", "test_share": test_share, "documents": len(docs),
            "characters": sum(len(t) for t in docs.values()), "splits": sizes, "sha256": digest.hexdigest()}
