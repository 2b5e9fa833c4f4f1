"""Where `forge merge` may write, checked before any model is loaded, and what it must have written.

The outputs root belongs to sessions and the registry (a registered model folder changed by hand fails its checksum
on resume), so no output of `forge merge` goes under it, even with ``--force``. An existing non-empty folder is
written into only with ``--force`` (saving a model there deletes the shards of any model it held), never a source
of the merge itself; an existing file is never taken for a folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from .. import paths
from ..params import cut
from .methods import MergeError


class MergeSaveError(MergeError):
    """The merged model was saved, yet its folder holds no weights (or not all of its shards)."""


def _name(path: Path) -> str:
    return cut(str(path), 200)


def _under_outputs(path: Path) -> bool:
    root = paths.outputs_root().resolve()
    return path == root or root in path.parents


def _refuse_common(path: Path, flag: str, option: str) -> None:
    """Refused for any target: a path under the outputs root, or one whose parent folders include a file."""
    if _under_outputs(path):
        raise MergeError(f"{flag} {_name(path)} lies under the outputs root {_name(paths.outputs_root().resolve())}, "
                         f"whose folders belong to sessions and the registry; give {option} a path outside it")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise MergeError(f"{flag} {_name(path)} cannot be created: {_name(blocker)} is a file, not a folder")


def check_out_folder(out: str | Path, force: bool = False, sources: Iterable[str | Path] = (),
                     flag: str = "--out") -> Path:
    """The resolved output folder, refused (MergeError naming ``flag``, the option or the default that gave it)
    when it lies under the outputs root, is an existing file, overlaps a source folder, or is a non-empty folder
    and ``force`` is not set."""
    out = Path(out).expanduser().resolve()
    _refuse_common(out, flag, "--out")
    if out.exists() and not out.is_dir():
        raise MergeError(f"{flag} {_name(out)} is an existing file; give a folder")
    for source in sources:
        folder = Path(source).expanduser().resolve()
        if out == folder or folder in out.parents or out in folder.parents:
            raise MergeError(f"{flag} {_name(out)} overlaps the merge source {_name(folder)}; "
                             "give a folder outside the sources")
    if out.is_dir() and not force and next(out.iterdir(), None) is not None:
        raise MergeError(f"{flag} {_name(out)} is not empty; give a new or empty folder, or --force to write "
                         "into it (the model files it holds are replaced)")
    return out


def check_new_file(path: str | Path, force: bool = False, keep: Iterable[str | Path] = (),
                   flag: str = "--to-mergekit") -> Path:
    """The resolved path of a file to write, refused (MergeError naming ``flag``) when it lies under the outputs
    root, is a folder, is one of ``keep`` (the recipe itself), or exists and ``force`` is not set."""
    path = Path(path).expanduser().resolve()
    _refuse_common(path, flag, flag)
    if path.is_dir():
        raise MergeError(f"{flag} {_name(path)} is a folder; give a file name")
    if any(path == Path(k).expanduser().resolve() for k in keep):
        raise MergeError(f"{flag} {_name(path)} is the recipe itself; give another file name")
    if path.exists() and not force:
        raise MergeError(f"{flag} {_name(path)} already exists; give a new file name, or --force to overwrite it")
    return path


def check_weights_written(out: Path) -> None:
    """Raise MergeSaveError unless ``out`` holds the saved weights: a non-empty ``model.safetensors``, or an index
    whose every shard is a non-empty file."""
    index = out / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MergeSaveError(f"the merged model's index {_name(index)} cannot be read back: {cut(str(exc))}")
        missing = [s for s in shards if not _non_empty(out / s)]
        if not shards or missing:
            raise MergeSaveError(f"the merged model in {_name(out)} lacks weight shard(s) its index names "
                                 f"({cut(str(missing), 200) if missing else 'it names none'}); it was not saved")
        return
    if not _non_empty(out / "model.safetensors"):
        raise MergeSaveError(f"no weights were written to {_name(out)} (no model.safetensors after saving); "
                             "the merged model was not saved")


def _non_empty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0
