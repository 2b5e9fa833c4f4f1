"""Parameter sets: YAML files in parameters/ loaded into typed dataclasses, strictly.

A parameter file has one section per phase (keyed by the phase's ``section`` name) plus an optional ``run``
section shared by every phase. Unknown sections, unknown keys and wrong types are errors that name the key,
the file and the allowed keys. An ``overrides`` dict (nested, or with dotted keys such as
``"cognate.trunk.steps"``) merges on top of the file before validation.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
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
    workers: int = 0
    """Independent jobs of a phase run side by side in this many threads (the specialists of Phase 1, the models
    a phase asks the same questions): 0 (auto) = on a CPU its cores // ``threads``, at most 2; on a GPU 1. Results
    are the same for every value (``forgelib.jobs``)."""
    tracking: Literal["wandb", "jsonl", "none"] = "wandb"
    """'wandb' = W&B (offline unless wandb_mode says otherwise) + JSONL; 'jsonl' = JSONL only; 'none'."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode when tracking is 'wandb'. Offline runs can be uploaded later with `wandb sync`."""
    wandb_project: str = "agent-forge"
    quiet: bool = False
    """Hide progress bars (batch runs)."""
    gates: Literal["enforce", "warn"] = "enforce"
    """'enforce': a phase whose gate fails stops the chain; 'warn' (exploration): the failure is reported, the
    phase's models are registered as gate-failed and the chain goes on (``forge run --gates warn``)."""

    def __post_init__(self):
        # The device's form is checked here; whether this machine has it, before a run creates anything
        # (``forgelib.pipeline``: a parameter file may name a device of another machine).
        if not _DEVICE_RE.fullmatch(self.device.strip().lower()):
            raise ValueError(f"device must be one of auto, cpu, cuda, cuda:N, mps; got {short(self.device)}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2**32), got {self.seed}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if not 0 <= self.workers <= 64:
            raise ValueError(f"workers must lie in [0, 64] (0: auto), got {self.workers}")


_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if typing.get_args(tp):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
"""A decimal number as text: YAML 1.1 reads ``1e6`` or ``5e-4`` (no dot) as a string, so float fields take it."""


def _check_scalar(value: Any, tp: type, where: str) -> Any:
    if tp is Any:
        return _check_finite(value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ParameterError(f"{where}: expected {tp.__name__}, got a boolean ({value!r})")
    if isinstance(value, tp):
        return _check_finite(value, where) if tp is float else value
    raise ParameterError(f"{where}: expected {tp.__name__}, got {type(value).__name__} ({short(value)})")


def _check_finite(value: Any, where: str) -> Any:
    """``value`` unchanged; ParameterError naming ``where`` if it is, or (a list or mapping) holds, an infinite or
    NaN number: no parameter means anything at ``.inf`` or ``.nan``."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ParameterError(f"{where}: {item!r} is not a finite number; give a finite value")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return value


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints become floats where floats are asked)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParameterError(f"{where}: expected a mapping of {tp.__name__} fields, got {short(value)}")
        return build_dataclass(tp, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for arg in options:
            try:
                return coerce(value, arg, where)
            except ParameterError as exc:
                error = exc
        if len(options) == 1:  # Optional[X]: X's own message says what is wrong
            raise error
        raise ParameterError(f"{where}: {short(value)} fits none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ParameterError(f"{where}: {short(value)} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParameterError(f"{where}: expected a list, got {type(value).__name__} ({short(value)})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ParameterError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ParameterError(f"{where}: expected a mapping, got {type(value).__name__} ({short(value)})")
        key_t, val_t = args if args else (Any, Any)
        return {coerce(k, key_t, f"{where} key"): coerce(v, val_t, f"{where}.{cut(str(k), 80)}")
                for k, v in value.items()}
    return _check_scalar(value, tp, where)


def build_dataclass(cls: type, data: dict, where: str) -> Any:
    """Build ``cls`` from ``data`` strictly: unknown keys and wrong types raise ParameterError."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParameterError(
            f"{where}: unknown key(s) {cut(str(unknown), 200)}; allowed keys of {cls.__name__}: {sorted(fields)}")
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
    except (TypeError, ValueError) as exc:  # __post_init__'s checks: the message cut, in case it quotes a value
        raise ParameterError(f"{where}: {cut(str(exc), 1000)}") from exc
    return obj


def check_fields(cls: type, data: dict, where: str) -> dict:
    """``data`` as a partial set of ``cls``'s fields (e.g. overrides of a config dataclass): keys must be field
    names and values fit the field types (coerced like a full section); ParameterError names the problem."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ParameterError(f"{where}: unknown key(s) {cut(str(unknown), 200)}; allowed keys of {cls.__name__}: "
                             f"{sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return {name: coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}


def require_positive(obj: Any, *names: str) -> None:
    """ValueError naming the first of ``obj``'s fields ``names`` that is set (not None) but not > 0."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {short(value)}")


def require_non_negative(obj: Any, *names: str) -> None:
    """ValueError naming the first of ``obj``'s fields ``names`` that is set (not None) but negative."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {short(value)}")


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
            raise ParameterError(f"override {cut(dotted, 80)!r}: {cut(part, 80)!r} is not a section")
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


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when installed (about 10x faster)


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
    loader = _LOADER(text)
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
    what = what or str(path)
    return load_yaml(_read_text(Path(path), what, max_bytes), what, max_bytes)


def _read_text(path: Path, what: str, max_bytes: int = YAML_MAX_BYTES) -> str:
    """The file's text, its size checked before it is read (YamlError naming ``what``)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise YamlError(f"{what}: cannot read: {exc.strerror or exc}") from None
    if size > max_bytes:
        raise YamlError(f"{what}: {size} bytes of YAML, more than the {max_bytes} allowed")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise YamlError(f"{what}: cannot read as text: {exc}") from None


@functools.lru_cache(maxsize=8)
def _parsed(text: str, what: str) -> Any:
    """``load_yaml(text, what)``, remembered: a run reads its parameter file once per section (~80 ms a parse of
    smoke.yaml on a busy machine); keyed by the text itself, so an edited file is parsed again."""
    return load_yaml(text, what)


def read_yaml(path: str | Path) -> dict:
    """Read a parameter file; a missing file or a file that is not a YAML mapping is a ParameterError."""
    return copy.deepcopy(_sections(path))


def _sections(path: str | Path) -> dict:
    """``read_yaml``'s mapping, shared with later reads of the same text: never to be changed in place."""
    path = Path(path)
    if not path.is_file():
        raise ParameterError(f"parameter file not found: {path}")
    data = _parsed(_read_text(path, str(path)), str(path)) or {}
    if not isinstance(data, dict):
        raise ParameterError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_section(path: str | Path, section: str, cls: type, overrides: dict | None = None,
                 known_sections: typing.Iterable[str] = ()) -> Any:
    """Load one section of a parameter file into ``cls`` (an absent section gives the defaults).

    ``known_sections`` lists every section the file may hold; any other top-level key is an error, so a typo
    in a section name cannot silently fall back to defaults.
    """
    tree, overrides = _sections(path), overrides or {}
    allowed = set(known_sections) | {section}
    unknown = sorted((set(tree) | {str(k).split(".")[0] for k in overrides}) - allowed)
    if unknown:
        raise ParameterError(f"{path}: unknown section(s) {cut(str(unknown), 200)}; allowed sections: "
                             f"{sorted(allowed)}")
    # Only this section is copied and merged (a run loads each section of its file: copying the whole file each
    # time costs seconds when a file holds a long list).
    own = {k: v for k, v in overrides.items() if str(k).split(".")[0] == section}
    data = merge_overrides({section: tree[section]} if section in tree else {}, own).get(section) or {}
    if not isinstance(data, dict):
        raise ParameterError(f"{path}: section {section!r} must be a mapping, got {short(data)}")
    obj = build_dataclass(cls, data, f"{path}: {section}")
    check_stored_size(to_dict(obj), f"{path}: {section}")
    return obj


# --- what is stored ---------------------------------------------------------------------------------------------
# A session's parameters are stored: the registry's session config (the parameter file's name, the --set values),
# each phase folder's params.yaml and the tracker's config. A few hundred bytes of YAML aliases can stand for
# gigabytes once written out (351 MB in registry.db from one --set), so what is stored is measured first, without
# writing it out, and refused over MAX_STORED_BYTES.
MAX_STORED_BYTES = 256 * 1024
"""The most a parameter section, or a session's config, may take as JSON (the real ones take a few KB)."""


def flatten(tree: Any, prefix: str = "") -> dict:
    """A nested mapping as ``{"a.b.c": value}`` (dotted keys kept as they are)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) and value else {name: value})
    return out


def yaml_value(value: Any) -> str:
    """``value`` as a ``--set`` writes it (YAML flow style, one line)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text.removesuffix("...").strip()


def set_arguments(overrides: dict | None) -> list[str]:
    """Overrides as the command-line arguments that give them: ``["--set", "a.b=1", ...]``."""
    return [arg for key, value in flatten(overrides or {}).items() for arg in ("--set", f"{key}={yaml_value(value)}")]


def stored_size(value: Any, limit: int | None = None) -> int:
    """About how many bytes ``value`` (plain data and dataclasses) takes as JSON, counted without writing it out
    (a string by its length, shared objects once per use); the count stops as soon as it passes ``limit``."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            item = {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(item)
            stack.extend(item)
        else:
            total += len(repr(item))
        if limit is not None and total > limit:
            break
    return total


def check_stored_size(value: Any, what: str, limit: int = MAX_STORED_BYTES) -> None:
    """ParameterError naming ``what`` when ``value`` would take more than ``limit`` bytes as JSON (and, for a
    mapping, the key that takes the most)."""
    if stored_size(value, limit) <= limit:
        return
    biggest = ""
    if isinstance(value, dict) and value:
        key = max(value, key=lambda k: stored_size(value[k], limit))
        biggest = f" (most of it in {cut(str(key), 80)!r})"
    raise ParameterError(f"{what}: more than {limit // 1024} KB once stored{biggest}; refused before anything is "
                         "written: parameters are settings, keep their lists and strings short")


def to_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) as plain YAML/JSON-friendly data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
