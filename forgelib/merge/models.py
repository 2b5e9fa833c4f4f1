"""Model-level merging: a recipe (method + per-layer-group parameters) applied to whole models.

A :class:`MergeRecipe` names the merge method, the source models (their order aligns with per-model
parameters such as ``weights``), global parameters, per-layer-group parameters and a seed. Parameters are
grouped by layer: ``embed``, ``layers.{g}`` (layer ``i`` falls in group ``g = i // group_size``), ``norm``
(the final norm), ``head`` (the output projection), and ``other`` for anything else. A tensor's parameters
are the global ones overridden by its group's.

An optional ``layer_path`` builds the output model layer by layer (passthrough stacking or data-flow
merging): entry ``[source, layer]`` puts layer ``layer`` of ``source`` at that depth, where ``source`` is a
model name, ``"base"`` (the trunk) or ``"merged"`` (the parameter-space merge the recipe's method makes).
Non-layer parameters come from the merged model, or from the base for ``passthrough``.

Models are built in memory (a copy of the base's architecture with the merged state dict); nothing is written
to disk unless :func:`save_recipe` is called, and :func:`rebuild_from_recipe` rebuilds the same model
bit-exactly from the YAML file (randomised methods are seeded per parameter from the recipe's seed).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import yaml

from ..params import YamlError, cut, load_yaml_file, short

from .methods import MergeError, get_method, merge_tensors

RESERVED_SOURCES = ("base", "merged")
_LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|block))\.(?P<idx>\d+)\.(?P<rest>.+)$")


class IncompatibleModelsError(MergeError):
    """Models that cannot be merged: different parameter names, shapes or vocabulary sizes."""


@dataclasses.dataclass
class MergeRecipe:
    """Everything needed to rebuild a merged model from its sources."""

    method: str
    """Registered merge method (see ``forgelib.merge.MERGE_METHODS``)."""
    models: list[str]
    """Source model names (registry ids or folders), in the order per-model parameters refer to."""
    base: str | None = None
    """Name of the trunk the task vectors are taken against (used by :func:`rebuild_from_recipe`)."""
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Global method parameters, e.g. ``{"weights": [1, 1], "density": 0.5}``."""
    groups: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Per-layer-group overrides keyed by group name (``embed``, ``layers.0``, ``norm``, ``head``, ...)."""
    group_size: int = 1
    """Layers per ``layers.{g}`` group."""
    seed: int = 0
    """Seed of the randomised methods (each parameter derives its own generator from it)."""
    layer_path: list[list] | None = None
    """Optional ``[[source, layer], ...]``, one entry per output layer (see the module docstring)."""
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Model-config settings applied to the merged model (e.g. Cognate's runtime ``n_cycles``/``use_memory``);
    they change no parameter shape."""
    checksums: dict[str, str] = dataclasses.field(default_factory=dict)
    """SHA-256 (``forgelib.checksums.compute_checksum``) of the base and each source by name, written by the
    phase that saved the recipe; a rebuild verifies them before loading (see :func:`verify_sources`)."""

    def __post_init__(self) -> None:
        get_method(self.method)  # unknown method -> error listing the valid ones
        if not self.models:
            raise MergeError("recipe field 'models' must name at least one source model")
        clash = sorted(set(self.models) & set(RESERVED_SOURCES))
        if clash or len(set(self.models)) != len(self.models):
            raise MergeError(f"recipe field 'models' must hold distinct names other than {RESERVED_SOURCES}, "
                             f"got {self.models}")
        if self.group_size < 1:
            raise MergeError(f"recipe field 'group_size' must be >= 1, got {self.group_size}")
        if self.method == "passthrough" and not self.layer_path:
            raise MergeError("method 'passthrough' needs a 'layer_path' ([[source, layer], ...])")

    def params_for(self, group: str) -> dict[str, Any]:
        """Method parameters for a tensor in ``group``: the global ones overridden by the group's."""
        return {**self.parameters, **self.groups.get(group, {})}

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (lists, floats) for YAML."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MergeRecipe":
        """Build from a dict; unknown keys fail with the list of valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise MergeError(f"unknown recipe field(s) {unknown}; valid fields: {valid}")
        return cls(**dict(data))


def _plain(value: Any) -> Any:
    """Convert numpy scalars/arrays and tuples to plain Python so YAML stays readable and exact."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return _plain(value.tolist())
    return value


def save_recipe(recipe: MergeRecipe, path: str | Path) -> Path:
    """Write ``recipe`` as YAML (floats are written with full precision, so rebuilds are bit-exact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    return path


def load_recipe(path: str | Path) -> MergeRecipe:
    """Read a recipe written by :func:`save_recipe`; a file that is not a valid recipe is a MergeError
    naming it."""
    try:
        data = load_yaml_file(path, f"recipe file {path}")
    except YamlError as exc:
        raise MergeError(str(exc)) from None
    if not isinstance(data, dict):
        raise MergeError(f"recipe file {path} does not hold a mapping")
    try:
        return MergeRecipe.from_dict(data)
    except (MergeError, TypeError, ValueError) as exc:
        raise MergeError(f"recipe file {path}: {exc}") from exc


def verify_sources(recipe: MergeRecipe, resolve: Callable[[str], Path]) -> list[str]:
    """Check the base and every source against the recipe's ``checksums`` (``resolve(name)`` gives the folder).
    Raises MergeError naming the first folder whose contents changed; returns the names that had no checksum
    to check (an older recipe or a hand-written one)."""
    from ..checksums import compute_checksum

    names = ([recipe.base] if recipe.base else []) + list(recipe.models)
    folders = check_checksum_entries(recipe, resolve)
    unchecked = [name for name in names if name not in folders]
    for name, folder in folders.items():  # in the recipe's order: base, then models
        expected = recipe.checksums[name].lower()
        actual = compute_checksum(folder)
        if actual != expected:
            raise MergeError(f"source model {short(name, 200)} at {cut(str(folder), 200)} was changed since the "
                             f"recipe was saved: sha256 {actual}, the recipe holds {expected}; refusing to rebuild "
                             "from it")
    return unchecked


MAX_SOURCE_ENTRIES = 10_000
"""The most files and folders a checksummed source folder may hold (a model folder holds a few dozen; hashing a
system folder named as a source would read it all)."""


def check_checksum_entries(recipe: MergeRecipe, resolve: Callable[[str], Path]) -> dict[str, Path]:
    """The folder of every source the recipe holds a checksum for, by name, each checked before anything is hashed:
    a checksum entry names the base or a model of the recipe and holds a SHA-256 hex digest, and its folder is a
    model folder (a folder with a config.json, at most ``MAX_SOURCE_ENTRIES`` entries). MergeError otherwise."""
    names = ([recipe.base] if recipe.base else []) + list(recipe.models)
    if not isinstance(recipe.checksums, Mapping):
        raise MergeError(f"recipe field 'checksums' must map source names to SHA-256 digests, got "
                         f"{short(recipe.checksums)}")
    for name, digest in recipe.checksums.items():
        if name not in names:
            raise MergeError(f"recipe checksum entry {short(name, 200)} names no source of the recipe; entries may "
                             f"name only its base and models: {short(names, 300)}")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise MergeError(f"recipe checksum of {short(name, 200)} must be a SHA-256 hex digest (64 characters "
                             f"0-9a-f), got {short(digest)}")
    return {name: _model_folder(name, Path(resolve(name))) for name in names if name in recipe.checksums}


def _model_folder(name: str, folder: Path) -> Path:
    """``folder`` when it is a model folder to hash (see :func:`check_checksum_entries`), else MergeError."""
    where = f"source model {short(name, 200)} of the recipe"
    if not folder.exists():
        raise MergeError(f"{where} is missing: {cut(str(folder), 200)}")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise MergeError(f"{where} at {cut(str(folder), 200)} is not a model folder (a folder holding "
                         "config.json); refusing to hash it")
    count, stack = 0, [folder]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                count += 1
                if count > MAX_SOURCE_ENTRIES:
                    raise MergeError(f"{where} at {cut(str(folder), 200)} holds more than {MAX_SOURCE_ENTRIES} "
                                     "files and folders, too many for a model folder; refusing to hash it")
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
    return folder


def uniform_recipe(names: Sequence[str], base: str | None = None) -> MergeRecipe:
    """The plain average merge of ``names`` (linear, equal weights): the baseline the search must beat."""
    return MergeRecipe(method="linear", models=list(names), base=base, parameters={"weights": 1.0})


# ---------------------------------------------------------------- parameter names and groups


def layer_index(name: str) -> int | None:
    """Index of the transformer block a parameter belongs to (``...layers.{i}.``), or None."""
    match = _LAYER_RE.match(name)
    return int(match.group("idx")) if match else None


def param_group(name: str, group_size: int = 1) -> str:
    """Layer group of a parameter name: ``layers.{i // group_size}``, ``embed``, ``norm``, ``head``, ``other``."""
    idx = layer_index(name)
    if idx is not None:
        return f"layers.{idx // group_size}"
    if "embed" in name or name.endswith(("wte.weight", "wpe.weight")):
        return "embed"
    if "lm_head" in name or name.startswith("output."):
        return "head"
    if "norm" in name or name.endswith(("ln_f.weight", "ln_f.bias")):
        return "norm"
    return "other"


def model_groups(model: torch.nn.Module, group_size: int = 1) -> list[str]:
    """The distinct layer groups of ``model``'s parameters, in parameter order."""
    seen: dict[str, None] = {}
    for name, _ in model.named_parameters():
        seen.setdefault(param_group(name, group_size), None)
    return list(seen)


def param_seed(seed: int, name: str) -> int:
    """A per-parameter seed: stable across runs and machines (crc32, not Python's salted hash)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


# ---------------------------------------------------------------- validation


def _vocab_size(model: torch.nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "vocab_size", None)


def validate_models(models: Mapping[str, torch.nn.Module], base: torch.nn.Module) -> None:
    """Check every model has the base's vocabulary size and exactly its parameter names and shapes."""
    base_shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    for label, model in models.items():
        if _vocab_size(model) != _vocab_size(base):
            raise IncompatibleModelsError(
                f"model {label!r} has vocab_size {_vocab_size(model)} but the base has {_vocab_size(base)}; "
                "models with different vocabularies cannot be merged")
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        missing, extra = sorted(base_shapes.keys() - shapes), sorted(shapes.keys() - base_shapes)
        if missing or extra:
            raise IncompatibleModelsError(
                f"model {label!r} has different parameters from the base: missing {missing[:5]}, "
                f"extra {extra[:5]} (different architecture or depth)")
        for name, shape in base_shapes.items():
            if shapes[name] != shape:
                raise IncompatibleModelsError(
                    f"parameter {name!r} has shape {shapes[name]} in model {label!r} but {shape} in the base")


def _resolve_models(recipe: MergeRecipe, models) -> dict[str, torch.nn.Module]:
    """Source models by name, in the recipe's order, from a mapping or a sequence aligned with it."""
    if isinstance(models, Mapping):
        missing = [n for n in recipe.models if n not in models]
        if missing:
            raise MergeError(f"recipe names model(s) {missing} that were not given; given: {sorted(models)}")
        return {n: models[n] for n in recipe.models}
    models = list(models)
    if len(models) != len(recipe.models):
        raise MergeError(f"recipe names {len(recipe.models)} models {recipe.models}, got {len(models)} models")
    return dict(zip(recipe.models, models))


# ---------------------------------------------------------------- merging


def merge_parameters(recipe: MergeRecipe, models: Mapping[str, torch.nn.Module],
                     base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Merged value of each of the base's parameters (tied parameters once), by the recipe's method."""
    spec = get_method(recipe.method)
    for reserved in ("seed", "generator"):
        if reserved in recipe.parameters or any(reserved in g for g in recipe.groups.values()):
            raise MergeError(f"recipe parameters may not set {reserved!r}; use the recipe's 'seed' field")
    sources = [dict(m.named_parameters()) for m in models.values()]
    merged = {}
    with torch.no_grad():
        for name, base_param in base.named_parameters():
            params = recipe.params_for(param_group(name, recipe.group_size))
            if spec.randomized:
                params["seed"] = param_seed(recipe.seed, name)
            tensors = [src[name].detach() for src in sources]
            base_tensor = base_param.detach() if spec.base != "unused" else None
            try:
                merged[name] = merge_tensors(recipe.method, tensors, base_tensor, **params)
            except MergeError as err:
                raise type(err)(f"{err} (parameter {name!r})") from None
    return merged


def _full_state(model: torch.nn.Module, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with its parameters, and their tied aliases, replaced by ``merged`` values."""
    owner = {p.data_ptr(): n for n, p in model.named_parameters()}
    out = {}
    for key, value in model.state_dict().items():
        name = key if key in merged else owner.get(value.data_ptr())
        out[key] = merged[name] if name in merged else value
    return out


def _layer_table(state: Mapping[str, torch.Tensor]) -> dict[int, list[tuple[str, str, str]]]:
    """Layer index -> [(prefix, rest, key)] for the keys that belong to a transformer block."""
    table: dict[int, list[tuple[str, str, str]]] = {}
    for key in state:
        match = _LAYER_RE.match(key)
        if match:
            table.setdefault(int(match.group("idx")), []).append((match.group("prefix"), match.group("rest"), key))
    return table


def _check_path(path: Sequence, sources: Sequence[str], n_layers: int) -> list[tuple[str, int]]:
    checked = []
    for depth, entry in enumerate(path):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise MergeError(f"layer_path[{depth}] must be [source, layer], got {entry!r}")
        source, layer = entry[0], entry[1]
        if source not in sources:
            raise MergeError(f"layer_path[{depth}] names source {source!r}; valid sources: {list(sources)}")
        if not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise MergeError(f"layer_path[{depth}] layer must be an integer in [0, {n_layers}), got {layer!r}")
        checked.append((source, layer))
    return checked


def _apply_layer_path(path: list[tuple[str, int]], pools: Mapping[str, Mapping[str, torch.Tensor]],
                      template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict whose block ``d`` is block ``path[d][1]`` of ``pools[path[d][0]]``; the rest from template."""
    table = _layer_table(template)
    out = {k: v for k, v in template.items() if layer_index(k) is None}
    for depth, (source, layer) in enumerate(path):
        for prefix, rest, key in table[layer]:
            out[f"{prefix}.{depth}.{rest}"] = pools[source][key]
    return out


def _build_model(base: torch.nn.Module, state: Mapping[str, torch.Tensor],
                 path: list[tuple[str, int]] | None) -> torch.nn.Module:
    """A new model with the base's architecture (depth ``len(path)`` when given) holding ``state``."""
    n_layers = len(_layer_table(base.state_dict()))
    if path is None or len(path) == n_layers:
        model = copy.deepcopy(base)
    else:
        config = copy.deepcopy(base.config)
        config.num_hidden_layers = len(path)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [base.config.layer_types[layer] for _, layer in path]
        param = next(base.parameters())
        model = type(base)(config).to(device=param.device, dtype=param.dtype)
    model.load_state_dict(state, strict=True)
    return model.train(base.training)


def merge_models(recipe: MergeRecipe, models: Mapping[str, torch.nn.Module] | Sequence[torch.nn.Module],
                 base: torch.nn.Module) -> torch.nn.Module:
    """Build the model ``recipe`` describes, in memory, from source ``models`` (by name, or a sequence in the
    recipe's order) and the trunk ``base`` (task vectors are taken against it; its architecture is copied).

    Raises :class:`IncompatibleModelsError` when the models' vocabularies, parameter names or shapes differ,
    and :class:`MergeError` for a bad recipe.
    """
    sources = _resolve_models(recipe, models)
    validate_models(sources, base)
    base_state = base.state_dict()
    if recipe.method == "passthrough":
        merged_state = base_state
    else:
        merged_state = _full_state(base, merge_parameters(recipe, sources, base))
    if not recipe.layer_path:
        return _apply_config(_build_model(base, merged_state, None), recipe.config)
    pools = {"base": base_state, **{n: m.state_dict() for n, m in sources.items()}}
    if recipe.method != "passthrough":
        pools["merged"] = merged_state
    path = _check_path(recipe.layer_path, list(pools), len(_layer_table(base_state)))
    return _apply_config(_build_model(base, _apply_layer_path(path, pools, merged_state), path), recipe.config)


def _apply_config(model: torch.nn.Module, settings: Mapping[str, Any]) -> torch.nn.Module:
    """Set the recipe's config settings on the merged model; an unknown setting is an error."""
    config = getattr(model, "config", None)
    for key, value in (settings or {}).items():
        if config is None or not hasattr(config, key):
            raise MergeError(f"recipe config setting {key!r} is not a field of the model's config")
        setattr(config, key, value)
    return model


def rebuild_from_recipe(recipe_path: str | Path, model_loader: Callable[[str], torch.nn.Module]) -> torch.nn.Module:
    """Rebuild the model a saved recipe describes; ``model_loader(name)`` loads the base and each source."""
    recipe = load_recipe(recipe_path)
    if recipe.base is None:
        raise MergeError(f"recipe {recipe_path} has no 'base'; rebuilding needs the trunk's name")
    base = model_loader(recipe.base)
    models = {name: model_loader(name) for name in recipe.models}
    return merge_models(recipe, models, base)
