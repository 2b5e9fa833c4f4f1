"""Real English text (forgelib.data.realtext): the reST cleaning on a worked example, the split by a stable hash of
the name, the missing-corpus error."""
import hashlib
import sys
from pathlib import Path

import pytest

from forgelib.data import realtext

SOURCE = """\
.. _tut-example:

:Author: A. N. Author

*****************
  A Worked Title
*****************

.. index:: single: example

This paragraph is
wrapped over two lines, with ``literal``, *emphasis*,
**strong**, :func:`open`, :class:`~collections.abc.Mapping`,
:ref:`the tutorial <tut-intro>`, :pep:`8`, :issue:`12345` and
`a link <https://example.org>`_ [#]_.

Here is an example::

   x = 1
   print(x)

>>> 1 + 1
2

+-----+-----+
| a   | b   |
+=====+=====+
| 1   | 2   |
+-----+-----+

=====  =====
col 1  col 2
=====  =====
1      2
=====  =====

.. function:: spam(eggs,
                   ham=None)
   :noindex:

   Return spam --- with eggs.

   .. versionchanged:: 3.2
      Added *ham*.

.. note::
   A note's prose stays.

.. code-block:: python

   import this

.. comment that goes
   over two lines

* First item,
  wrapped.
* Second item.

term
   Its definition.

.. [#] A footnote that goes.
"""

EXPECTED = """\
A Worked Title

This paragraph is wrapped over two lines, with literal, emphasis, strong, open(), Mapping, the tutorial, PEP 8, \
bpo-12345 and a link.

Here is an example:

Return spam \u2014 with eggs.

Added ham.

A note's prose stays.

First item, wrapped.
Second item.

term
Its definition."""


def test_cleaning_a_worked_example():
    assert realtext.clean_rst(SOURCE) == EXPECTED


@pytest.mark.parametrize("source, expected", [
    ("Use it like so ::\n\n    code()\n\nAfter.", "Use it like so\n\nAfter."),  # ` ::` goes entirely
    ("::\n\n    code()\n\nAfter.", "After."),
    ("Shown::\nnot indented, so no literal block.", "Shown: not indented, so no literal block."),
    ("It costs 1 + 2\n+ 3 units.", "It costs 1 + 2 + 3 units."),  # `+ 3` inside a paragraph is no list item
    ("A :ref:`bare-label` and :doc:`howto/sorting`.", "A bare label and sorting."),
    (":meth:`!str.split` and :file:`~/.pythonrc` and :samp:`python{X.Y}`", "str.split() and ~/.pythonrc and pythonX.Y"),
    (r"A \*star\* and an esc\ aped word.", "A *star* and an escaped word."),
    ("Section\n-------\n\nBody.", "Section\n\nBody."),
    ("| a | b |\n|---|", ""),  # no letters worth keeping
])
def test_cleaning_edge_cases(source, expected):
    assert realtext.clean_rst(source) == expected


# --------------------------------------------------------------------------------------------- the corpus on disk


def _corpus(folder: Path, names: list[str]) -> Path:
    for name in names:
        path = folder / f"{name}.rst.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"Title of {name}\n{'=' * (9 + len(name))}\n\nThe prose of {name} goes here.\n",
                        encoding="utf-8")
    return folder


def test_split_is_the_documented_hash_stable_and_disjoint(tmp_path):
    names = [f"library/mod{i}" for i in range(400)]
    for name in names[:20]:  # the rule, from hashlib directly
        u = int.from_bytes(hashlib.sha256(f"realtext:{name}".encode()).digest()[:8], "big") / 2 ** 64
        assert realtext.split_of(name) == ("test" if u < 0.5 else "calibration")
        assert realtext.split_of(name, 0.1) == ("test" if u < 0.1 else "calibration")
    tests = sum(realtext.split_of(n) == "test" for n in names)
    assert 150 < tests < 250  # a fair coin: mean 200, sd 10
    folder = _corpus(tmp_path / "_sources", names[:60])
    calibration, test = realtext.load_texts("calibration", folder), realtext.load_texts("test", folder)
    assert calibration and test and not set(calibration) & set(test)
    assert len(calibration) + len(test) == 60
    _corpus(folder, names[60:120])  # more documents: the old ones stay where they were
    assert set(test) <= set(realtext.load_texts("test", folder))
    assert set(calibration) <= set(realtext.load_texts("calibration", folder))
    with pytest.raises(ValueError, match="valid splits"):
        realtext.load_texts("train", folder)
    with pytest.raises(ValueError, match="test_share"):
        realtext.split_of("x", 1.0)


def test_documents_by_name_excluded_pages_and_min_chars(tmp_path, monkeypatch):
    folder = _corpus(tmp_path / "_sources", ["tutorial/classes", "license", "includes/example", "faq/general"])
    (folder / "faq" / "empty.rst.txt").write_text(".. only a comment\n", encoding="utf-8")
    monkeypatch.setenv(realtext.CORPUS_ENV, str(folder))
    docs = realtext.documents()
    assert list(docs) == ["faq/general", "tutorial/classes"]
    assert docs["tutorial/classes"] == "Title of tutorial/classes\n\nThe prose of tutorial/classes goes here."
    assert realtext.load_texts("test", min_chars=10 ** 6) == realtext.load_texts("calibration", min_chars=10 ** 6) == []
    info = realtext.corpus_info()
    assert info["documents"] == 2 and info["characters"] == sum(map(len, docs.values()))
    assert sum(s["documents"] for s in info["splits"].values()) == 2
    assert realtext.corpus_info(folder)["sha256"] == info["sha256"]


def test_a_missing_corpus_names_the_set_up_command(tmp_path, monkeypatch):
    monkeypatch.delenv(realtext.CORPUS_ENV, raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(realtext, "SYSTEM_DOCS", tmp_path / "usr-share-doc")
    with pytest.raises(realtext.RealTextUnavailableError, match="make setup-text"):
        realtext.load_texts("test")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(realtext.RealTextUnavailableError, match="nothing.*holds no"):
        realtext.corpus_dir(tmp_path / "nothing")
    monkeypatch.setenv(realtext.CORPUS_ENV, str(tmp_path / "gone"))
    with pytest.raises(realtext.RealTextUnavailableError, match="gone' is not a folder"):
        realtext.documents()
    found = _corpus(tmp_path / "venv" / "share" / "forge-realtext" / "python3.11-doc" / "_sources", ["a"])
    _corpus(tmp_path / "venv" / "share" / "forge-realtext" / "python3.9-doc" / "_sources", ["b"])
    monkeypatch.delenv(realtext.CORPUS_ENV)
    assert realtext.corpus_dir() == found  # the environment's newest


def test_the_installed_corpus_when_there_is_one():
    try:
        realtext.corpus_dir()
    except realtext.RealTextUnavailableError:
        pytest.skip("the real-text corpus is not installed (make setup-text)")
    info = realtext.corpus_info()
    assert info["documents"] > 100
    for split in realtext.SPLITS:
        assert info["splits"][split]["characters"] > 300_000
    docs = realtext.documents()
    text = "\n\n".join(docs.values())
    assert "\n.. " not in text and ".. code-block::" not in text and ":func:`" not in text and "\n>>> " not in text
    assert "Python" in docs["tutorial/classes"] and "class" in docs["tutorial/classes"]
