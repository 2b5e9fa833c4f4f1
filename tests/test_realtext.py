"""Real English text (forgelib.data.realtext) and the strided perplexity (forgelib.evaluate.strided_perplexity):
the reST cleaning on a worked example, the split by a stable hash of the name, the missing-corpus error, and the
perplexity against a brute force that scores one token at a time with exactly its windowed context."""
import hashlib
import math
import sys
from pathlib import Path

import pytest
import torch

from forgelib.data import realtext
from forgelib.evaluate import strided_nll, strided_perplexity, strided_windows

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


# --------------------------------------------------------------------------------------------- strided perplexity


class CharTokenizer:
    """Characters as ids (mod the vocabulary): what strided_nll needs of a tokenizer, nothing more."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) % self.vocab for c in text] for text in texts]}


@pytest.fixture(scope="module")
def sharp_llama():
    """A tiny Llama with large weights: its predictions depend strongly on the context (so a wrong context
    shows far above the tolerance)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.5, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


def _context_start(t: int, n: int, max_len: int, stride: int) -> int:
    """Where the context of token t starts, from the definition: the first window (ending at min(max_len, n))
    scores tokens 1..; the window that ends at the first of max_len + k*stride (or n) after t scores t and reads
    the max_len tokens before its end."""
    end = min(max_len, n)
    while end <= t:
        end = min(end + stride, n)
    return max(0, end - max_len)


def _brute_force(model, rows, max_len, stride, shift=0):
    """(summed NLL, count): every token t >= 1 alone, from exactly its context (``shift`` moves the start, to
    show that the test tells a wrong context)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in rows:
            for t in range(1, len(ids)):
                start = _context_start(t, len(ids), max_len, stride)
                assert t - start <= max_len - 1 and (t < max_len or t - start >= max_len - stride)
                start = min(start + shift, t - 1)
                logits = model(input_ids=torch.tensor([ids[start:t]])).logits[0, -1].double()
                total -= torch.log_softmax(logits, -1)[ids[t]].item()
                count += 1
    return total, count


TEXTS = ["The quick brown fox jumps over the lazy dog; " * 2, "Short.", "x", "", "Pack my box with five dozen jugs"]


@pytest.mark.parametrize("max_len, stride", [(8, 1), (8, 3), (8, 7), (16, 5), (128, 64)])
def test_strided_perplexity_equals_the_one_token_at_a_time_brute_force(sharp_llama, max_len, stride):
    tok = CharTokenizer(64)
    rows = tok(TEXTS, add_special_tokens=False)["input_ids"]
    ref_total, ref_count = _brute_force(sharp_llama, rows, max_len, stride)
    assert ref_count == sum(max(len(r) - 1, 0) for r in rows)  # every token but each text's first
    for batch_size in (1, 3, 100):
        total, count = strided_nll(sharp_llama, tok, TEXTS, max_len, stride, batch_size)
        assert count == ref_count
        assert total == pytest.approx(ref_total, rel=1e-5)
    ppl = strided_perplexity(sharp_llama, tok, TEXTS, max_len, stride, batch_size=4)
    assert ppl == pytest.approx(math.exp(ref_total / ref_count), rel=1e-5)
    if max_len < len(rows[0]):  # a context one token short is far outside the tolerance
        wrong, _ = _brute_force(sharp_llama, rows, max_len, stride, shift=1)
        assert abs(wrong - ref_total) > 1e-3 * abs(ref_total)


def test_one_window_is_the_library_loss(sharp_llama):
    """A text within one window: the summed NLL is transformers' own shifted loss times the tokens it scores."""
    tok = CharTokenizer(64)
    ids = tok([TEXTS[0]], add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        loss = sharp_llama(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    total, count = strided_nll(sharp_llama, tok, [TEXTS[0]], max_len=len(ids), stride=3)
    assert count == len(ids) - 1 and total / count == pytest.approx(loss, rel=1e-5)


def test_strided_windows_cover_every_token_once():
    assert strided_windows(10, 4, 2) == [(0, 1, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    assert strided_windows(10, 4, 3) == [(0, 1, 4), (3, 4, 7), (6, 7, 10)]
    assert strided_windows(3, 8, 4) == [(0, 1, 3)]
    assert strided_windows(1, 8, 4) == strided_windows(0, 8, 4) == []
    for n in range(0, 40):
        for max_len in (2, 3, 7, 16):
            for stride in range(1, max_len):
                windows = strided_windows(n, max_len, stride)
                scored = [t for _, first, end in windows for t in range(first, end)]
                assert scored == list(range(1, n))
                assert all(0 <= start < first and end - start <= max_len for start, first, end in windows)


def test_strided_perplexity_refuses_bad_settings(sharp_llama):
    tok = CharTokenizer(64)
    with pytest.raises(ValueError, match="stride must be in 1..max_len-1 = 1..7"):
        strided_perplexity(sharp_llama, tok, ["abc"], max_len=8, stride=8)
    with pytest.raises(ValueError, match="stride"):
        strided_perplexity(sharp_llama, tok, ["abc"], max_len=8, stride=0)
    with pytest.raises(ValueError, match="max_len must be >= 2"):
        strided_perplexity(sharp_llama, tok, ["abc"], max_len=1, stride=1)
    with pytest.raises(ValueError, match="batch_size"):
        strided_perplexity(sharp_llama, tok, ["abc"], max_len=8, stride=4, batch_size=0)
    with pytest.raises(TypeError, match="sequence of strings"):
        strided_perplexity(sharp_llama, tok, "abc", max_len=8, stride=4)
    with pytest.raises(ValueError, match="no tokens to score"):
        strided_perplexity(sharp_llama, tok, ["a", ""], max_len=8, stride=4)
