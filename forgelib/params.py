"""Parameter sets: YAML files in parameters/ loaded into typed dataclasses, strictly.

A parameter file has one section per phase (keyed by the phase's ``section`` name) plus an optional ``run``
section shared by every phase. Unknown sections, unknown keys and wrong types are errors that name the key,
the file and the allowed keys. An ``overrides`` dict (nested, or with dotted keys such as
``"cognate.trunk.steps"``) merges on top of the file before validation.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ParameterError(ValueError):
    """A parameter file or override does not fit the parameter dataclasses."""


@dataclasses.dataclass
class RunParams:
    """Settings shared by every phase of a run (the ``run`` section)."""

    seed: int = 0
    """Base random seed; each phase derives its own from it."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    threads: int = 1
    """torch CPU threads; on a busy 2-core machine 1 is usually fastest."""
    tracking: Literal["wandb", "jsonl", "none"] = "wandb"
    """'wandb' = W&B (offline unless wandb_mode says otherwise) + JSONL; 'jsonl' = JSONL only; 'none'."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode when tracking is 'wandb'. Offline runs can be uploaded later with `wandb sync`."""
    wandb_project: str = "agent-forge"
    quiet: bool = False
    """Hide progress bars (batch runs)."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
"""A decimal number as text: YAML 1.1 reads ``1e6`` or ``5e-4`` (no dot) as a string, so float fields take it."""


def _check_scalar(value: Any, tp: type, where: str) -> Any:
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ParameterError(f"{where}: expected {tp.__name__}, got a boolean ({value!r})")
    if isinstance(value, tp):
        return value
    raise ParameterError(f"{where}: expected {tp.__name__}, got {type(value).__name__} ({value!r})")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints become floats where floats are asked)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParameterError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build_dataclass(tp, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except ParameterError:
                continue
        raise ParameterError(f"{where}: {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ParameterError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParameterError(f"{where}: expected a list, got {type(value).__name__} ({value!r})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ParameterError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ParameterError(f"{where}: expected a mapping, got {type(value).__name__} ({value!r})")
        key_t, val_t = args if args else (Any, Any)
        return {coerce(k, key_t, f"{where} key"): coerce(v, val_t, f"{where}.{k}") for k, v in value.items()}
    return _check_scalar(value, tp, where)


def build_dataclass(cls: type, data: dict, where: str) -> Any:
    """Build ``cls`` from ``data`` strictly: unknown keys and wrong types raise ParameterError."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParameterError(
            f"{where}: unknown key(s) {unknown}; allowed keys of {cls.__name__}: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        default = _default_of(fields[name])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # A nested section given in part keeps the field's own defaults for the keys it leaves out.
            value = merge_overrides(to_dict(default), value)
        kwargs[name] = coerce(value, hints[name], f"{where}.{name}")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"{where}: {exc}") from exc
    return obj


def check_fields(cls: type, data: dict, where: str) -> dict:
    """``data`` as a partial set of ``cls``'s fields (e.g. overrides of a config dataclass): keys must be field
    names and values fit the field types (coerced like a full section); ParameterError names the problem."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ParameterError(f"{where}: unknown key(s) {unknown}; allowed keys of {cls.__name__}: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return {name: coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}


def require_positive(obj: Any, *names: str) -> None:
    """ValueError naming the first of ``obj``'s fields ``names`` that is set (not None) but not > 0."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def require_non_negative(obj: Any, *names: str) -> None:
    """ValueError naming the first of ``obj``'s fields ``names`` that is set (not None) but negative."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ParameterError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def merge_overrides(tree: dict, overrides: dict | None) -> dict:
    """Return ``tree`` with ``overrides`` merged on top (nested dicts merge; dotted keys address nested keys)."""
    out = copy.deepcopy(tree)
    for key, value in (overrides or {}).items():
        if "." in key:
            _set_dotted(out, key, value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: str | Path) -> dict:
    """Read a parameter file; a missing file or a file that is not a YAML mapping is a ParameterError."""
    path = Path(path)
    if not path.is_file():
        raise ParameterError(f"parameter file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParameterError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParameterError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_section(path: str | Path, section: str, cls: type, overrides: dict | None = None,
                 known_sections: typing.Iterable[str] = ()) -> Any:
    """Load one section of a parameter file into ``cls`` (an absent section gives the defaults).

    ``known_sections`` lists every section the file may hold; any other top-level key is an error, so a typo
    in a section name cannot silently fall back to defaults.
    """
    tree = merge_overrides(read_yaml(path), overrides)
    allowed = set(known_sections) | {section}
    unknown = sorted(set(tree) - allowed)
    if unknown:
        raise ParameterError(f"{path}: unknown section(s) {unknown}; allowed sections: {sorted(allowed)}")
    data = tree.get(section) or {}
    if not isinstance(data, dict):
        raise ParameterError(f"{path}: section {section!r} must be a mapping, got {data!r}")
    return build_dataclass(cls, data, f"{path}: {section}")


def to_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) as plain YAML/JSON-friendly data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
