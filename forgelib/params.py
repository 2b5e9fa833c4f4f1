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


# --- bounded YAML ----------------------------------------------------------------------------------------------
# Every YAML the workbench reads (parameter files, --set values, merge recipes, stored params.yaml) goes through
# load_yaml: a size cap on the text, and a cap on the document as it would be once aliases are expanded (a
# 400-byte file of nested aliases expands to gigabytes), checked on the parsed node graph before anything is built.
YAML_MAX_BYTES = 1 << 20
YAML_MAX_NODES = 100_000
YAML_MAX_DEPTH = 64


class YamlError(ParameterError):
    """A YAML text is too large, too deep, expands too far, or is not valid (safe) YAML."""


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (messages never carry a huge value)."""
    return cut(repr(value), limit)


def cut(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _expanded_size(node: yaml.Node, what: str, max_nodes: int, max_depth: int) -> None:
    """Refuse a node graph whose alias-expanded tree exceeds ``max_nodes`` nodes or ``max_depth`` levels.

    Sizes are memoised per node, so the check is linear in the graph even when the tree is exponential."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    open_nodes: set[int] = set()
    while stack:
        current, done = stack.pop()
        key = id(current)
        if key in size:
            continue
        children = _children(current)
        if done:
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            open_nodes.discard(key)
            if size[key] > max_nodes or depth[key] > max_depth:
                raise YamlError(f"{what}: the YAML document expands to more than {max_nodes} values or "
                                f"{max_depth} levels (aliases included); refused")
            continue
        if key in open_nodes:
            raise YamlError(f"{what}: the YAML document refers to itself (a recursive alias); refused")
        open_nodes.add(key)
        stack.append((current, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load_yaml(text: str | bytes, what: str, max_bytes: int = YAML_MAX_BYTES, max_nodes: int = YAML_MAX_NODES,
              max_depth: int = YAML_MAX_DEPTH) -> Any:
    """Parse one safe-YAML document with bounds (``what`` names it in every message: a file, ``--set k``).

    Refused with a YamlError: a text over ``max_bytes``; a document whose alias-expanded tree has more than
    ``max_nodes`` values or ``max_depth`` levels; a recursive alias; a tag outside safe YAML (``!!python/...``);
    any syntax error. An empty document is None."""
    if len(text) > max_bytes:
        raise YamlError(f"{what}: {len(text)} bytes of YAML, more than the {max_bytes} allowed")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, what, max_nodes, max_depth)
        return loader.construct_document(node)
    except yaml.constructor.ConstructorError as exc:
        tag = getattr(exc, "problem", "") or "an unsupported value"
        raise YamlError(f"{what}: refused: {tag} (only plain YAML values are allowed){_where(exc)}") from None
    except yaml.YAMLError as exc:
        raise YamlError(f"{what}: not valid YAML: {cut(str(exc))}") from None
    except RecursionError:
        raise YamlError(f"{what}: the YAML document nests too deeply; refused") from None
    finally:
        loader.dispose()


def _where(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def load_yaml_file(path: str | Path, what: str | None = None, max_bytes: int = YAML_MAX_BYTES) -> Any:
    """``load_yaml`` of a file, its size checked before it is read (a missing file is a YamlError)."""
    path = Path(path)
    what = what or str(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise YamlError(f"{what}: cannot read: {exc.strerror or exc}") from None
    if size > max_bytes:
        raise YamlError(f"{what}: {size} bytes of YAML, more than the {max_bytes} allowed")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise YamlError(f"{what}: cannot read as text: {exc}") from None
    return load_yaml(text, what, max_bytes)


def read_yaml(path: str | Path) -> dict:
    """Read a parameter file; a missing file or a file that is not a YAML mapping is a ParameterError."""
    path = Path(path)
    if not path.is_file():
        raise ParameterError(f"parameter file not found: {path}")
    data = load_yaml_file(path) or {}
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
