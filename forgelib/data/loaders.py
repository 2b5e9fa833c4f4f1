"""Loaders for real corpora: plain text, JSONL, and Hugging Face datasets (hub names where there is
network or a cache, or local files/folders). Each returns a list of text documents."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".csv": "csv", ".parquet": "parquet"}


class DatasetUnavailableError(ValueError):
    """A dataset that cannot be loaded here (not cached and no network, or no such dataset)."""


def load_text(path: str | Path, by: str = "line") -> list[str]:
    """A UTF-8 text file as documents: one per non-empty line (`by="line"`) or per blank-line-separated
    paragraph (`by="paragraph"`)."""
    text = Path(path).read_text(encoding="utf-8")
    if by == "line":
        return [line for line in text.splitlines() if line.strip()]
    if by == "paragraph":
        return [block.strip() for block in text.split("\n\n") if block.strip()]
    raise ValueError(f"by must be one of ['line', 'paragraph'], got {by!r}")


def load_jsonl(path: str | Path, text_field: str = "text") -> list[str]:
    """The `text_field` of every record of a JSON-lines file (blank lines skipped)."""
    docs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise KeyError(f"{path}:{number}: no field {text_field!r}; the record has {keys}")
            docs.append(str(record[text_field]))
    return docs


def _builder_args(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """(path, kwargs) for `datasets.load_dataset`: a local file goes through its format's builder."""
    local = Path(name_or_path)
    if local.is_file():
        builder = _FILE_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise ValueError(f"cannot load {local}: unknown file type {local.suffix!r}; "
                             f"supported: {sorted(_FILE_BUILDERS)}")
        return builder, {"data_files": str(local)}
    return name_or_path, {}


def load_hf_dataset(name_or_path: str, split: str = "train", text_field: str = "text",
                    **kwargs: Any) -> list[str]:
    """Texts of one split of a dataset through `datasets.load_dataset`.

    `name_or_path` is a hub name (e.g. "roneneldan/TinyStories"; needs network or the HF cache), a local
    dataset folder, or a local .jsonl/.json/.txt/.csv/.parquet file (a single file is split "train").
    Extra keyword arguments go to `load_dataset` (e.g. `name="main"` for a configuration).
    """
    import datasets  # heavy; only when a dataset is actually loaded

    path, builder_kwargs = _builder_args(name_or_path)
    try:
        data = datasets.load_dataset(path, split=split, **builder_kwargs, **kwargs)
    except (FileNotFoundError, ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as err:
        raise DatasetUnavailableError(
            f"dataset {name_or_path!r} (split {split!r}) is not available here: {err}. Offline, only local "
            f"files and datasets already in the Hugging Face cache load (HF_HUB_OFFLINE="
            f"{datasets.config.HF_HUB_OFFLINE})") from err
    if text_field not in data.column_names:
        raise KeyError(f"dataset {name_or_path!r} has no column {text_field!r}; columns: {data.column_names}")
    return [str(value) for value in data[text_field]]
