"""Model files read as hostile input: every size a file claims is checked against the file before anything is read or
allocated, and every refusal is a ``ModelLoadError`` (or the caller's subclass) of one sentence naming the file.

* ``read_json_file``: a JSON object from a file of bounded size (``config.json``, an index, ``quietstar.json``).
* ``safetensors_header``: a safetensors file's tensor table and metadata from its header alone, the header length
  checked against the file size and ``HEADER_MAX_BYTES``, each entry's byte count against its dtype and shape, and
  every tensor against the end of the file (a truncated file names the tensors it lost).
* ``stored_shapes``: {tensor: shape} of a model folder's safetensors weights (one file or an index of shards); a
  folder holding only a pickle checkpoint is refused, never unpickled.
* ``meta_model`` / ``check_weights_fit``: the model a config describes, built on the meta device (no memory) once its
  layer count is known to fit the stored tensors, and its state compared with the stored shapes: a config that does
  not match its weights (other shapes, tensors missing or left over, or more values than stored) is refused before
  ``from_pretrained`` / ``from_config`` allocates anything.
* ``check_folder_weights``: the three above for a Hugging Face model folder.
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import torch
from torch import nn

from ..params import cut, short

CONFIG_MAX_BYTES = 1 << 20
"""A model folder's JSON file (config.json, an index, quietstar.json) over 1 MiB is refused unread (a real
config.json is a few KB; an index of a 70B model ~100 KB)."""
HEADER_MAX_BYTES = 16 << 20
"""A safetensors header over 16 MiB is refused unread (a 7B model's is ~30 KB; safetensors' own limit is 100 MB)."""
SLACK_VALUES = 1 << 24
"""Values a model built from its config may hold beyond the stored ones (non-persistent buffers such as rotary
tables): 16 Mi values, 64 MB in float32."""
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "num_local_experts", "num_experts",
                    "n_routed_experts")
"""Config keys that count modules: each module holds at least one stored tensor, so a count above the number of
stored tensors is refused before the model is built (building 10^5 layers takes minutes, even on the meta device)."""
WEIGHTS_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack")
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
            "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
"""Bytes per value of each safetensors dtype."""


class ModelLoadError(ValueError):
    """A model folder cannot be loaded as asked (the message says what was found)."""


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_shape(value) -> bool:
    """A list of non-negative integers (bools excluded), at most 8 long."""
    return isinstance(value, (list, tuple)) and len(value) <= 8 and all(_is_count(n) for n in value)


def read_json_file(file: str | Path, error: type[ValueError] = ModelLoadError,
                   max_bytes: int = CONFIG_MAX_BYTES) -> dict:
    """The JSON object in ``file``, its size checked before it is read (``error`` naming the file otherwise)."""
    file = Path(file)
    size = file.stat().st_size
    if size > max_bytes:
        raise error(f"{file} is {size} bytes, more than the {max_bytes} a model folder's JSON file may hold")
    try:
        data = json.loads(file.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise error(f"{file} is not valid JSON ({cut(str(err), 120)})") from None
    if not isinstance(data, dict):
        raise error(f"{file} must hold a JSON object, got a {type(data).__name__}")
    return data


def _header_json(file: Path, error: type[ValueError]) -> tuple[dict, int, int]:
    """(the parsed header, its length, the file size) of a safetensors file, the length checked first."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise error(f"{file} is {size} bytes: too short for a safetensors file")
        length = struct.unpack("<Q", head)[0]
        if length > size - 8:
            raise error(f"{file}: the header length field says {length} bytes, but the file has only {size - 8} "
                        "after it (truncated or not a safetensors file)")
        if length > HEADER_MAX_BYTES:
            raise error(f"{file}: a {length}-byte safetensors header, more than the {HEADER_MAX_BYTES} read here")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise error(f"{file}: unreadable safetensors header ({cut(str(err), 120)})") from None
    if not isinstance(header, dict):
        raise error(f"{file}: the safetensors header is a {type(header).__name__}, not a JSON object")
    return header, length, size


def _entry_problem(info) -> str | None:
    """What is wrong with one tensor entry of a safetensors header, or None."""
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or not is_shape(info.get("shape")):
        return "needs a dtype and a shape (a list of non-negative integers)"
    if info["dtype"] not in ITEMSIZE:
        return f"has dtype {short(info['dtype'])}, none of {', '.join(ITEMSIZE)}"
    offsets = info.get("data_offsets")
    if not is_shape(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        return f"has data_offsets {short(offsets)}, not [begin, end] with 0 <= begin <= end"
    if offsets[1] - offsets[0] != math.prod(info["shape"]) * ITEMSIZE[info["dtype"]]:
        return (f"is {info['dtype']} {info['shape']} ({math.prod(info['shape']) * ITEMSIZE[info['dtype']]} bytes) "
                f"but spans {offsets[1] - offsets[0]} bytes")
    return None


def safetensors_header(file: str | Path, error: type[ValueError] = ModelLoadError) -> tuple[dict, dict]:
    """({tensor: {"dtype", "shape", "data_offsets"}}, metadata) of a safetensors file, read from its header alone
    and checked (module docstring); ``error`` names the file and what is wrong."""
    file = Path(file)
    if not file.is_file():
        raise error(f"{file} does not exist")
    header, length, size = _header_json(file, error)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise error(f"{file}: the safetensors __metadata__ must map names to strings")
    for name, info in header.items():
        problem = _entry_problem(info)
        if problem:
            raise error(f"{file}: tensor {short(name)} {problem}")
    lost = sorted((n for n, i in header.items() if 8 + length + i["data_offsets"][1] > size),
                  key=lambda n: -header[n]["data_offsets"][1])
    if lost:
        more = f" (and {len(lost) - 5} more)" if len(lost) > 5 else ""
        raise error(f"{file} is truncated ({size} bytes): tensors {lost[:5]}{more} lie past its end")
    return header, metadata


def _no_weights(folder: Path, error: type[ValueError]) -> ValueError:
    """The error for a folder without safetensors weights: a pickle checkpoint is named and refused."""
    pickled = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickled:
        return error(f"{folder / pickled[0]} is a pickle checkpoint, never loaded here (unpickling can run code): "
                     f"convert it to {WEIGHTS_FILE} with save_pretrained(safe_serialization=True) where you trust it")
    return error(f"{folder} has no {WEIGHTS_FILE} (nor {INDEX_FILE}): no weights to load")


def stored_shapes(folder: str | Path, error: type[ValueError] = ModelLoadError) -> dict[str, tuple[int, ...]]:
    """{tensor: shape} of a model folder's safetensors weights (``model.safetensors``, or the shards of
    ``model.safetensors.index.json``), from the headers alone; a pickle checkpoint is refused (never unpickled)."""
    folder = Path(folder)
    if (folder / WEIGHTS_FILE).is_file():
        header, _ = safetensors_header(folder / WEIGHTS_FILE, error)
        return {name: tuple(info["shape"]) for name, info in header.items()}
    if not (folder / INDEX_FILE).is_file():
        raise _no_weights(folder, error)
    weight_map = read_json_file(folder / INDEX_FILE, error).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise error(f"{folder / INDEX_FILE} has no weight_map of tensor names to shard files")
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if Path(s).name != s or s in (".", "..")]
    if outside:
        raise error(f"{folder / INDEX_FILE} names shard {short(outside[0])}, which is not a file of the folder")
    out: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        header, _ = safetensors_header(folder / shard, error)
        out.update((name, tuple(info["shape"])) for name, info in header.items())
    unlisted = sorted(set(weight_map) - set(out))
    if unlisted:
        raise error(f"{folder / INDEX_FILE} lists {len(unlisted)} tensors no shard holds, e.g. {short(unlisted[0])}")
    return out


def meta_model(config, stored: dict, where: str, error: type[ValueError] = ModelLoadError) -> nn.Module:
    """The causal LM ``config`` describes, built on the meta device (no memory is allocated), after refusing a
    module count (``LAYER_COUNT_KEYS``) above the number of stored tensors."""
    from transformers import AutoModelForCausalLM

    for key in LAYER_COUNT_KEYS:
        value = getattr(config, key, None)
        if _is_count(value) and value > len(stored):
            raise error(f"{where}: the config says {key}={value}, but the weights hold only {len(stored)} tensors")
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as err:  # a hostile config can fail anywhere in a model's __init__
        raise error(f"{where}: the config (model_type {short(getattr(config, 'model_type', None))}) does not "
                    f"describe a causal LM that can be built here ({type(err).__name__}: {cut(str(err), 200)})"
                    ) from None


def _names(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, set[str]], int]:
    """({state name: shape}, {state name: every name of the same tensor}, values of the unique parameters and
    buffers) of a (meta) model."""
    keys = set(model.state_dict())
    groups: dict[int, set[str]] = {}
    shapes, values = {}, 0
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if tensor is None:
            continue
        if id(tensor) not in groups:
            groups[id(tensor)] = set()
            values += tensor.numel()
        if name in keys:
            groups[id(tensor)].add(name)
            shapes[name] = tuple(tensor.shape)
    return shapes, {name: group for group in groups.values() for name in group}, values


def _renamer(model: nn.Module, stored: dict):
    """A function taking the base model's prefix off a state name when the stored names have none (GPT-2's
    checkpoints name ``h.0...``, the model ``transformer.h.0...``; transformers adds the prefix on load)."""
    prefix = (getattr(model, "base_model_prefix", "") or "") + "."
    if prefix == "." or any(name.startswith(prefix) for name in stored):
        return lambda name: name
    return lambda name: name.removeprefix(prefix)


def _ignored(model: nn.Module, attr: str, name: str) -> bool:
    return any(re.search(pattern, name) for pattern in getattr(model, attr, None) or ())


def check_weights_fit(model: nn.Module, stored: dict, where: str, error: type[ValueError] = ModelLoadError,
                      covered: set[str] = frozenset(), weights: str = "the weights") -> None:
    """Refuse (``error``) a model (built on the meta device by ``meta_model``) whose state does not match the stored
    {name: shape}: a shape that differs, a tensor missing (not a second name of a stored one, not in ``covered``)
    or left over, or more parameter and buffer values than stored plus ``SLACK_VALUES``."""
    shapes, groups, values = _names(model)
    rename = _renamer(model, stored)
    expected = {rename(n): shape for n, shape in shapes.items()}
    aliases = {rename(n): {rename(o) for o in group} for n, group in groups.items()}
    differ = [n for n in expected if n in stored and tuple(stored[n]) != expected[n]]
    if differ:
        n = differ[0]
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        raise error(f"{where}: the config does not match {weights}: {n} is {list(expected[n])} by the config but "
                    f"{list(stored[n])} in {weights}{more}")
    known = set(stored) | set(covered)
    missing = sorted(n for n in expected if not aliases.get(n, {n}) & known
                     and not _ignored(model, "_keys_to_ignore_on_load_missing", n))
    unexpected = sorted(n for n in stored if n not in expected
                        and not _ignored(model, "_keys_to_ignore_on_load_unexpected", n))
    if missing or unexpected:
        gaps = ([f"{len(missing)} tensors of the model are not stored (e.g. {missing[:3]})"] if missing else []) + \
            ([f"{len(unexpected)} stored tensors are not in the model (e.g. {[short(n) for n in unexpected[:3]]})"]
             if unexpected else [])
        raise error(f"{where}: the config does not match {weights}: {'; '.join(gaps)}")
    held = sum(math.prod(shape) for shape in stored.values())
    if values > held + SLACK_VALUES:
        raise error(f"{where}: the config describes a model of {values} values, but only {held} are stored in "
                    f"{weights}")


def check_folder_weights(folder: str | Path, error: type[ValueError] = ModelLoadError) -> None:
    """A Hugging Face folder's config.json checked against its safetensors weights before anything is loaded
    (``stored_shapes``, ``meta_model``, ``check_weights_fit``)."""
    from transformers import AutoConfig

    folder = Path(folder)
    stored = stored_shapes(folder, error)
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as err:  # transformers' own checks of a hostile config: ValueError, KeyError, TypeError...
        raise error(f"{folder / 'config.json'} cannot be read as a model configuration "
                    f"({type(err).__name__}: {cut(str(err), 200)})") from None
    model = meta_model(config, stored, str(folder), error)
    weights = WEIGHTS_FILE if (folder / WEIGHTS_FILE).is_file() else f"the shards of {INDEX_FILE}"
    check_weights_fit(model, stored, str(folder), error, weights=weights)


__all__ = ["CONFIG_MAX_BYTES", "HEADER_MAX_BYTES", "SLACK_VALUES", "ModelLoadError", "check_folder_weights",
           "check_weights_fit", "is_shape", "meta_model", "read_json_file", "safetensors_header", "stored_shapes"]
