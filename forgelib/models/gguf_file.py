"""GGUF files (llama.cpp's one-file format) as model sources: the file checked, then the causal LM and the tokenizer
it holds loaded through transformers, which dequantizes every weight to a float32 tensor (a plain
``LlamaForCausalLM`` for a Llama file) and builds the tokenizer, with its chat template, from the file's metadata.

    check_gguf_file("SmolLM2-135M-Instruct.Q4_1.gguf")      # the path, or a ModelLoadError saying what is wrong
    model = load_gguf_causal_lm(path)                        # transformers' GGUF loader; needs the gguf package
    tokenizer = load_gguf_tokenizer(path)

The architecture floor of the one way in: ``forgelib.modelio.load_model`` (kind ``"gguf"``) calls these, one load at
a time and with transformers' loading bar off.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import struct
from importlib import metadata
from pathlib import Path
from typing import Any

from ..params import cut, short
from .weights import ModelLoadError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # the versions gguf-py and transformers read (llama.cpp writes 3)
GGUF_SUFFIX = ".gguf"
GGUF_MIN_PACKAGE = (0, 10)  # transformers' GGUF_MIN_VERSION
SETUP_HINT = "install it with `make setup` (the dev extra) or `make setup-real` (the real models' extra)"

__all__ = ["GGUF_MAGIC", "GGUF_SUFFIX", "GGUF_VERSIONS", "check_gguf_file", "is_gguf_path", "load_gguf_causal_lm",
           "load_gguf_tokenizer", "require_gguf_package"]


def _starts_with_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def is_gguf_path(path: str | Path) -> bool:
    """Whether ``path`` names a GGUF model source: a ``.gguf`` name (existing or not: loading it says what is wrong)
    or an existing file that starts with the GGUF magic."""
    path = Path(path)
    return path.suffix.lower() == GGUF_SUFFIX or path.is_file() and _starts_with_magic(path)


def check_gguf_file(path: str | Path) -> Path:
    """``path`` as a Path when it is a readable GGUF file of a version transformers reads (magic ``GGUF``, version 2
    or 3), else a ModelLoadError naming what was found. Reads the first 8 bytes only."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"GGUF file {cut(str(path), 200)!r} does not exist")
    if not path.is_file():
        raise ModelLoadError(f"{cut(str(path), 200)!r} is not a file: a GGUF model source is one .gguf file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ModelLoadError(f"GGUF file {cut(str(path), 200)!r} cannot be read: {exc.strerror or exc}") from None
    if not head:
        raise ModelLoadError(f"{cut(str(path), 200)!r} is empty, not a GGUF file")
    if head[:4] != GGUF_MAGIC:
        raise ModelLoadError(f"{cut(str(path), 200)!r} is not a GGUF file: it starts with {short(head[:4])}, not "
                             f"{GGUF_MAGIC!r}")
    if len(head) < 8:
        raise ModelLoadError(f"{cut(str(path), 200)!r}: the GGUF file ends inside its header ({len(head)} bytes)")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in GGUF_VERSIONS:
        raise ModelLoadError(f"{cut(str(path), 200)!r}: GGUF version {version} is not one of {list(GGUF_VERSIONS)}, "
                             "the versions that can be read here")
    return path


def require_gguf_package() -> None:
    """The ``gguf`` package (llama.cpp's gguf-py) that transformers reads GGUF weights with, at a version it accepts;
    a ModelLoadError naming the set-up command when it is missing or too old."""
    try:
        importlib.import_module("gguf")
    except ImportError:
        raise ModelLoadError(f"loading a GGUF file needs the gguf package, which is not installed: {SETUP_HINT}") \
            from None
    try:
        found = metadata.version("gguf")
    except metadata.PackageNotFoundError:
        return  # importable without distribution metadata (a source checkout): let transformers judge it
    numbers = tuple(int(part) for part in found.split(".")[:2] if part.isdigit())
    if numbers < GGUF_MIN_PACKAGE:
        raise ModelLoadError(f"loading a GGUF file needs gguf >= {'.'.join(map(str, GGUF_MIN_PACKAGE))}, found "
                             f"{found}: {SETUP_HINT}")


@contextlib.contextmanager
def _dequantizing_bar(progress: bool):
    """transformers' "Converting and de-quantizing GGUF tensors" bar (a plain tqdm of its GGUF loader, outside its
    progress-bar switch) off unless ``progress``; put back afterwards. Callers load one model at a time."""
    try:
        loader = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:  # a transformers without its legacy GGUF loader: nothing to switch off
        loader = None
    bar = getattr(loader, "tqdm", None)
    if progress or bar is None:
        yield
        return
    loader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        loader.tqdm = bar


def _source(path: str | Path) -> tuple[str, str]:
    """(the folder, the file as an absolute path) for transformers' ``from_pretrained(folder, gguf_file=file)``: an
    absolute file is taken as it is, never looked up in the working directory or on the Hub."""
    path = check_gguf_file(path).resolve()
    return str(path.parent), str(path)


def _as_plain_model(model: Any) -> Any:
    """``model`` without transformers' GGUF quantizer when every weight came back as a dense tensor (what its GGUF
    loader does for a Llama file): the quantizer left attached refuses ``save_pretrained``, so a loaded file could not
    be saved as a model folder. A model holding packed GGUF layers (transformers' kernels path) keeps it."""
    quantizer = getattr(model, "hf_quantizer", None)
    packed = any(type(module).__name__.lower().startswith("gguf") for module in model.modules())
    if quantizer is not None and not packed:
        quantizer.remove_quantization_config(model)
    return model


def load_gguf_causal_lm(path: str | Path, progress: bool = False, **kwargs) -> Any:
    """The causal LM a GGUF file holds, through transformers (``AutoModelForCausalLM.from_pretrained(folder,
    gguf_file=...)``): quantized weights come back dequantized (float32 unless ``dtype`` says otherwise), a Llama
    file as ``LlamaForCausalLM``. ``kwargs`` go to ``from_pretrained``; ``progress``: show its dequantizing bar.
    A file transformers cannot read (an architecture it does not know, a truncated file) is a ModelLoadError."""
    from transformers import AutoModelForCausalLM

    folder, file = _source(path)
    require_gguf_package()
    try:
        with _dequantizing_bar(progress):
            return _as_plain_model(AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, **kwargs))
    except (ValueError, KeyError, IndexError, TypeError, NotImplementedError, OSError, struct.error) as exc:
        raise ModelLoadError(f"{cut(file, 200)!r}: the GGUF file cannot be loaded as a causal LM: "
                             f"{type(exc).__name__}: {cut(str(exc), 300)}") from exc


def load_gguf_tokenizer(path: str | Path) -> Any:
    """The tokenizer a GGUF file describes (its vocabulary, merges, special tokens and chat template), through
    ``AutoTokenizer.from_pretrained(folder, gguf_file=...)``; a file without one is a ModelLoadError."""
    from transformers import AutoTokenizer

    folder, file = _source(path)
    require_gguf_package()  # transformers reads the tokenizer's metadata with it too
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=file)
    except (ValueError, KeyError, IndexError, TypeError, NotImplementedError, OSError, struct.error) as exc:
        raise ModelLoadError(f"{cut(file, 200)!r}: no tokenizer can be built from the GGUF file: "
                             f"{type(exc).__name__}: {cut(str(exc), 300)}") from exc
