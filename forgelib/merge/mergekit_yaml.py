"""mergekit YAML interop: read a mergekit merge configuration as a :class:`MergeRecipe`, write a recipe as one.

A mergekit configuration names ``merge_method``, ``base_model``, ``models`` (each ``{model: NAME, parameters:
{weight, density, ...}}``), top-level ``parameters`` and ``dtype``. :func:`from_mergekit` maps the methods both
tools share onto ours (same names; parameter ``weight`` becomes our per-model ``weights`` list, ``lambda``
becomes ``lambda_``) and turns per-layer gradients into layer groups; :func:`to_mergekit` goes the other way and
lists what a mergekit configuration cannot say. Model names stay as written: ``forge merge`` resolves them as
folders (relative ones from the repository root), as it does for our recipes.

Gradients follow mergekit's rule (``mergekit/config.py``, ``evaluate_setting``, and ``mergekit/plan.py``,
``MergePlanner.plan_slice`` / ``plan_module``, read in arcee-ai/mergekit): layer ``i`` of ``N`` sits at position
``t = i / (N - 1)`` (``t = 1`` when ``N == 1``); a list of numbers ``[v_0, ..., v_{K-1}]`` is read at
``s = t * (K - 1)`` as ``(1 - f) * v[int(s)] + f * v[min(K - 1, int(s) + 1)]`` with ``f = s - int(s)``; a list
holding anything else takes ``v[int(t * (K - 1))]``. Tensors outside the layers (embeddings, final norm, output
head) are planned with a reader at ``t = 0``, so they take a gradient's first value (``plan_module`` in the
current planner; planners before the multi-module rewrite read the post-layer tensors at ``t = 1``).

Refused, with a :class:`MergeError` naming the part: ``slices`` and ``modules`` configurations (layer ranges,
passthrough stacking), parameters filtered by tensor name (``filter:``), methods we do not share (the message
lists the supported ones), a per-model ``gamma``/``epsilon`` that differs between models (ours take one value),
a ``rescale: true`` our method lacks, ``tokenizer_source: union`` (it re-maps embeddings), LoRA references
(``model+lora``) and top-level keys other than ``merge_method``, ``base_model``, ``models``, ``parameters``,
``dtype`` and ``tokenizer_source`` (``forge merge`` writes no tokenizer and says so).

``dtype`` is recorded as ``config["dtype"]``. :func:`merge_from_mergekit` (used by ``forge merge``) loads the
sources in that dtype, so the merged tensors are in it; our arithmetic still runs in float32 and casts back,
where mergekit computes in the dtype itself, so results agree to that dtype's rounding. :func:`merge_models`
on its own only sets the merged model's ``config.dtype`` (it casts no tensor; ``save_pretrained`` records the
tensors' real dtype).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import yaml

from ..params import YamlError, load_yaml, load_yaml_file

from .methods import MERGE_METHODS, MergeError, get_method
from .models import MergeRecipe, merge_models

_GTA_GLOBALS = ("int8_mask", "normalize", "rescale", "lambda")
MERGEKIT_PARAMETERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("weight",), ("normalize",)),
    "task_arithmetic": (("weight", "density"), _GTA_GLOBALS),
    "ties": (("weight", "density"), _GTA_GLOBALS),
    "dare_linear": (("weight", "density"), _GTA_GLOBALS),
    "dare_ties": (("weight", "density"), _GTA_GLOBALS),
    "breadcrumbs": (("weight", "density", "gamma"), _GTA_GLOBALS),
    "della": (("weight", "density", "epsilon"), _GTA_GLOBALS),
    "slerp": ((), ("t",)),
    "model_stock": ((), ("filter_wise",)),
    "karcher": ((), ("max_iter", "tol")),
}
"""The mergekit methods we share, with their (per-model, global) parameters as mergekit's merge methods
declare them (``tensor_parameters()`` / ``parameters()``)."""

_NOT_SHARED = {
    "breadcrumbs_ties": "our 'breadcrumbs' has no TIES sign consensus",
    "della_linear": "our 'della' always applies the TIES sign consensus",
    "passthrough": "layer stacking is a recipe 'layer_path', not a mergekit 'models' merge",
}
_REQUIRED = {"weight", "t"}  # mergekit fails without them (``ConfigParameterDef(required=True)``)
_DEFAULTS = {"density": 1.0, "gamma": 0.01, "epsilon": 0.15}  # mergekit's per-model defaults
_ONE_VALUE = ("gamma", "epsilon")  # per model in mergekit, one value for all models in our methods
_OUR_NAME = {"weight": "weights", "lambda": "lambda_"}
_MERGEKIT_NAME = {ours: theirs for theirs, ours in _OUR_NAME.items()}
_TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source")
_DTYPES = ("float16", "bfloat16", "float32", "float64")
_NON_LAYER_GROUPS = ("embed", "norm", "head", "other")


def supported_methods() -> list[str]:
    """mergekit methods :func:`from_mergekit` reads: those in :data:`MERGEKIT_PARAMETERS` that we register."""
    return [name for name in MERGEKIT_PARAMETERS if name in MERGE_METHODS]


def is_mergekit_config(data: Any) -> bool:
    """Whether ``data`` (a parsed YAML document) is a mergekit configuration: a mapping with ``merge_method``."""
    return isinstance(data, Mapping) and "merge_method" in data


def read_mergekit_file(path: str | Path) -> dict | None:
    """The mapping in ``path`` when it is a mergekit configuration, else None (also for an unreadable or invalid
    file: the caller's own recipe loader then reports what is wrong with it)."""
    try:
        data = load_yaml_file(path)
    except YamlError:
        return None
    return dict(data) if is_mergekit_config(data) else None


# ---------------------------------------------------------------- gradients


def layer_positions(num_layers: int) -> list[float]:
    """mergekit's interpolation position of each layer: ``i / (N - 1)``, or ``[1.0]`` for one layer
    (``MergePlanner.plan_slice`` in ``mergekit/plan.py``)."""
    if num_layers < 1:
        raise MergeError(f"num_layers must be >= 1, got {num_layers}")
    return [i / (num_layers - 1) for i in range(num_layers)] if num_layers > 1 else [1.0]


def evaluate_setting(setting: Any, t: float, where: str = "parameter") -> Any:
    """A parameter's value at position ``t`` in [0, 1]: a scalar as is, a list as a gradient (mergekit's
    ``evaluate_setting`` in ``mergekit/config.py``: numbers -- bools included, as in Python -- interpolate
    linearly between neighbouring entries; other lists step). ``where`` names the setting in errors."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list) and setting:
        if all(isinstance(e, (int, float)) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            return setting[int(t * (len(setting) - 1))]
    raise MergeError(f"{where}: expected a number or a non-empty list of numbers (a gradient), got {setting!r}")


def _unfiltered(setting: Any, where: str) -> Any:
    """``setting`` without mergekit's ``[{filter, value}, ...]`` form when that form applies to every tensor
    (its first entry has no filter or ``*``); a filter by tensor name is refused."""
    if isinstance(setting, Mapping):
        raise MergeError(f"{where}: a single {{filter, value}} mapping is not a valid mergekit setting; "
                         "write a number, a gradient list, or a list of {filter, value} entries")
    if isinstance(setting, list) and setting and all(isinstance(e, Mapping) for e in setting):
        first = setting[0]
        if set(first) - {"filter", "value"} or "value" not in first:
            raise MergeError(f"{where}: conditional entries hold 'value' and optional 'filter', got {first!r}")
        if first.get("filter") not in (None, "*"):
            raise MergeError(f"{where} is filtered by tensor name ({first['filter']!r}); our recipes set "
                             "parameters per layer group only, so filtered parameters are not supported")
        return _unfiltered(first["value"], where)
    return setting


def _check_gradient(setting: Any, where: str) -> None:
    evaluate_setting(setting, 0.0, where)  # type check; raises with ``where`` in the message


# ---------------------------------------------------------------- reading a mergekit configuration


def _names_a_file(text: str) -> bool:
    try:
        return "\n" not in text and Path(text).is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def _read_config(config: Mapping | str | Path) -> dict:
    """A configuration as a dict: a mapping, a file (a Path, or a one-line str naming an existing file) or
    YAML text."""
    if isinstance(config, Mapping):
        return dict(config)
    try:
        is_file = isinstance(config, Path) or _names_a_file(config)
        data = load_yaml_file(config) if is_file else load_yaml(config, "mergekit configuration")
    except (OSError, YamlError) as exc:
        raise MergeError(f"cannot read mergekit configuration {str(config)[:80]!r}: {exc}") from None
    if not is_mergekit_config(data):
        raise MergeError(f"{str(config)[:80]!r} is not a mergekit configuration (a mapping with 'merge_method')")
    return data


def _check_top_keys(data: Mapping) -> None:
    if "slices" in data or "modules" in data:
        raise MergeError("mergekit 'slices'/'modules' configurations (layer ranges, passthrough stacking) are "
                         "not supported; use the 'models' form, or a recipe layer_path for layer stacking")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise MergeError(f"unsupported mergekit key(s) {unknown}; supported keys: {list(_TOP_KEYS)}")
    if data.get("tokenizer_source") == "union":
        raise MergeError("tokenizer_source 'union' re-maps the embeddings to a merged vocabulary, which our "
                         "merges do not do (they need one shared vocabulary); use 'base' or a model name")
    if data.get("dtype") is not None and data["dtype"] not in _DTYPES:
        raise MergeError(f"mergekit dtype {data['dtype']!r} is not supported; supported: {list(_DTYPES)}")


def _method(data: Mapping) -> str:
    name = data["merge_method"]
    if name not in supported_methods():
        reason = f" ({_NOT_SHARED[name]})" if name in _NOT_SHARED else ""
        raise MergeError(f"mergekit merge method {name!r} is not supported{reason}; "
                         f"supported methods: {supported_methods()}")
    return name


def _model_entries(data: Mapping) -> list[tuple[str, dict]]:
    """``[(name, parameters)]`` of the ``models`` list; mergekit adds ``base_model`` when it is not listed."""
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise MergeError("a mergekit configuration needs a non-empty 'models' list")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str):
            raise MergeError(f"models[{i}] must be {{model: NAME, parameters: {{...}}}}, got {entry!r}")
        if set(entry) - {"model", "parameters"}:
            raise MergeError(f"models[{i}] has unsupported key(s) {sorted(set(entry) - {'model', 'parameters'})}")
        if not isinstance(entry.get("parameters") or {}, Mapping):
            raise MergeError(f"models[{i}]: 'parameters' must be a mapping, got {entry['parameters']!r}")
        if "+" in entry["model"]:
            raise MergeError(f"models[{i}]: {entry['model']!r} names a LoRA ('model+lora'), which is not supported")
        out.append((entry["model"], dict(entry.get("parameters") or {})))
    base = data.get("base_model")
    if base is not None and base not in [name for name, _ in out]:
        out.append((base, {}))
    return out


def _roles(method: str, base: str | None, names: list[str]) -> tuple[list[str], str]:
    """(source models, base) as our method takes them, from mergekit's inputs ``names`` and ``base_model``."""
    if method == "linear":  # every input is averaged, the base among them; it is only the architecture here
        return names, base or names[0]
    if method == "karcher" and base is None and len(names) > 1:  # inputs count alike; ours merges the base in
        return names[1:], names[0]
    if base is None:
        raise MergeError(f"mergekit method {method!r} needs a 'base_model'")
    sources = [n for n in names if n != base]
    if method == "slerp" and len(sources) != 1:
        raise MergeError(f"slerp interpolates between base_model and exactly one other model, got {sources}")
    if not sources:
        raise MergeError(f"mergekit method {method!r} needs at least one model besides base_model {base!r}")
    return sources, base


def _clean_settings(method: str, entries: list[tuple[str, dict]], globals_: Mapping) -> tuple[dict, dict]:
    """Validated settings: ({model: {key: setting}}, {key: setting}) with mergekit names, filters unwrapped and
    settings without effect in mergekit dropped."""
    per_model_keys, global_keys = MERGEKIT_PARAMETERS[method]
    models = {}
    for name, params in entries:
        for key in params:
            if key in global_keys:
                raise MergeError(f"model {name!r} sets {key!r}, a global parameter of mergekit's {method!r}; "
                                 "set it under the top-level 'parameters'")
            if key not in per_model_keys:
                raise MergeError(f"model {name!r} sets {key!r}, which mergekit's {method!r} does not take; "
                                 f"per-model parameters: {list(per_model_keys)}")
        models[name] = {k: _unfiltered(v, f"parameter {k!r} of model {name!r}") for k, v in params.items()}
    top = {}
    for key, value in globals_.items():
        if key not in per_model_keys + global_keys:
            raise MergeError(f"mergekit's {method!r} takes no parameter {key!r}; "
                             f"parameters: {list(per_model_keys + global_keys)}")
        top[key] = _unfiltered(value, f"parameter {key!r}")
    return _drop_no_effect(method, models, top)


def _drop_no_effect(method: str, models: dict, top: dict) -> tuple[dict, dict]:
    """Remove settings mergekit accepts but that change no value: ``int8_mask`` (the sign mask's dtype), and
    ``density``/``rescale`` for task_arithmetic (it sparsifies nothing). A ``rescale`` our method lacks is
    accepted only at mergekit's default for it, false."""
    drop = {"int8_mask"} | ({"density", "rescale"} if method == "task_arithmetic" else set())
    models = {n: {k: v for k, v in p.items() if k not in drop} for n, p in models.items()}
    top = {k: v for k, v in top.items() if k not in drop}
    if "rescale" in top and "rescale" not in get_method(method).parameters:
        if top.pop("rescale"):
            raise MergeError(f"rescale: true is not supported for {method!r} (mergekit then rescales each trimmed "
                             "task vector to keep its L1 norm; our method does not)")
    for where, settings in [*((f"model {n!r}", p) for n, p in models.items()), ("parameters", top)]:
        for key, value in settings.items():
            _check_gradient(value, f"{where}: {key!r}")
    return models, top


def _value(key: str, name: str, models: Mapping, top: Mapping, t: float) -> Any:
    """A per-model parameter of model ``name`` at ``t``: its own setting, else the top-level one, else
    mergekit's default (``ConfigReader.parameter`` in ``mergekit/config.py``)."""
    for settings in (models.get(name, {}), top):
        if key in settings:
            return evaluate_setting(settings[key], t)
    if key in _REQUIRED:
        raise MergeError(f"model {name!r} has no {key!r} (mergekit requires it per model or at the top level)")
    return _DEFAULTS[key]


def _params_at(method: str, sources: list[str], models: Mapping, top: Mapping, t: float) -> dict:
    """Our method parameters for a tensor at interpolation position ``t``."""
    per_model_keys, global_keys = MERGEKIT_PARAMETERS[method]
    out = {}
    for key in per_model_keys:
        if key not in _REQUIRED and key not in top and not any(key in models.get(n, {}) for n in sources):
            continue  # never set: our default, which equals mergekit's
        values = [_value(key, name, models, top, t) for name in sources]
        if key in _ONE_VALUE:
            if len(set(values)) > 1:
                raise MergeError(f"{key!r} differs between models ({dict(zip(sources, values))}); our "
                                 f"{method!r} takes one {key!r} for all models")
            out[key] = values[0]
        else:
            out[_OUR_NAME.get(key, key)] = values
    for key in global_keys:
        if key in top:
            out[_OUR_NAME.get(key, key)] = evaluate_setting(top[key], t)
        elif key in _REQUIRED:
            raise MergeError(f"mergekit's {method!r} needs the top-level parameter {key!r}")
    return out


def _has_gradient(sources: list[str], models: Mapping, top: Mapping) -> bool:
    """Whether a setting that applies to the sources is a list (a gradient over the layers)."""
    settings = [*top.values(), *(v for n in sources for v in models.get(n, {}).values())]
    return any(isinstance(v, list) for v in settings)


def _parse(data: Mapping) -> tuple[str, list[str], str, dict, dict]:
    """Checked parts of a configuration: (method, our source models, our base, per-model settings, top-level
    settings), settings with mergekit's names."""
    _check_top_keys(data)
    method = _method(data)
    entries = _model_entries(data)
    names = [name for name, _ in entries]
    if len(set(names)) != len(names):
        raise MergeError(f"mergekit 'models' names a model twice: {names}")
    sources, base = _roles(method, data.get("base_model"), names)
    if not isinstance(data.get("parameters") or {}, Mapping):
        raise MergeError(f"top-level 'parameters' must be a mapping, got {data['parameters']!r}")
    models, top = _clean_settings(method, entries, data.get("parameters") or {})
    return method, sources, base, models, top


def from_mergekit(config: Mapping | str | Path, num_layers: int | None = None) -> MergeRecipe:
    """The recipe equivalent to a mergekit ``models`` configuration (a dict, a YAML file or YAML text).

    Non-layer tensors get the parameters at ``t = 0`` (the recipe's ``parameters``); when the configuration
    holds gradients, layer ``i`` of ``num_layers`` gets group ``layers.{i}`` (group_size 1) with the values that
    differ (see the module docstring for mergekit's rule). ``base_model``'s own per-model parameters are
    ignored where it is the base, as in mergekit. ``dtype`` goes to ``config["dtype"]``. Raises
    :class:`MergeError` for anything not supported (the message names it).
    """
    data = _read_config(config)
    method, sources, base, models, top = _parse(data)
    parameters = _params_at(method, sources, models, top, 0.0)
    groups = {}
    if _has_gradient(sources, models, top):
        if num_layers is None:
            raise MergeError("the configuration holds per-layer gradients (lists); pass num_layers "
                             "(the model's num_hidden_layers) to spread them over the layers")
        for i, t in enumerate(layer_positions(num_layers)):
            at_t = _params_at(method, sources, models, top, t)
            differs = {k: v for k, v in at_t.items() if parameters.get(k) != v}
            if differs:
                groups[f"layers.{i}"] = differs
    config_settings = {"dtype": data["dtype"]} if data.get("dtype") else {}
    return MergeRecipe(method=method, models=sources, base=base, parameters=parameters, groups=groups,
                       group_size=1, config=config_settings)


# ---------------------------------------------------------------- merging a mergekit configuration


def merge_from_mergekit(config: Mapping | str | Path,
                        loader: Callable[[str], torch.nn.Module]) -> tuple[torch.nn.Module, MergeRecipe]:
    """Merge what a mergekit configuration describes, checked before any model loads: ``loader(name)`` loads
    each model once; the layer count is the base's ``config.num_hidden_layers``; with a ``dtype`` the models
    are cast to it before merging (see the module docstring)."""
    data = _read_config(config)
    _, sources, base, _, _ = _parse(data)
    loaded = {base: loader(base)}
    recipe = from_mergekit(data, num_layers=getattr(loaded[base].config, "num_hidden_layers", None))
    loaded.update({name: loader(name) for name in sources if name != base})
    dtype = recipe.config.get("dtype")
    if dtype:
        loaded = {name: model.to(getattr(torch, dtype)) for name, model in loaded.items()}
    return merge_models(recipe, {n: loaded[n] for n in sources}, loaded[base]), recipe


def source_names(config: Mapping | str | Path) -> list[str]:
    """The models a configuration loads, its base first (the configuration checked as for merging)."""
    _, sources, base, _, _ = _parse(_read_config(config))
    return [name for name in dict.fromkeys([base, *sources]) if name]


def count_layers(folder: str | Path) -> int | None:
    """``num_hidden_layers`` from a model folder's config.json, or None when it cannot be read."""
    from ..models.loading import read_model_config

    try:
        return int(read_model_config(folder)["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------- writing a recipe as a mergekit configuration


def _as_gradient(values: Sequence) -> Any:
    """The shortest mergekit setting that reads back exactly ``values`` at the layer positions: a scalar when
    they are all equal, else a gradient whose anchors fall on layers, else one entry per layer."""
    if all(v == values[0] for v in values):
        return values[0]
    n = len(values)
    positions = layer_positions(n)
    for k in range(2, n):
        if (n - 1) % (k - 1) == 0:
            anchors = list(values[:: (n - 1) // (k - 1)])
            if all(evaluate_setting(anchors, t) == v for t, v in zip(positions, values)):
                return anchors
    return list(values)


def _default(method: str, key: str) -> Any:
    """Our method's default for parameter ``key`` (None when it has none)."""
    param = inspect.signature(get_method(method).fn).parameters.get(key)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _per_model(value: Any, n: int) -> list:
    """A per-model parameter as one value per model (a scalar is broadcast, as our methods do)."""
    if not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise MergeError(f"a per-model parameter holds {len(value)} values for {n} models: {list(value)}")
    return list(value)


def _layer_values(recipe: MergeRecipe, key: str, num_layers: int | None) -> tuple[list, dict]:
    """(values at each layer, values of the non-layer groups) of parameter ``key``; one layer entry (the global
    value) when the layer count is unknown."""
    default = _default(recipe.method, key)
    if num_layers is None:
        return [recipe.parameters.get(key, default)], {}
    layers = [recipe.params_for(f"layers.{i // recipe.group_size}").get(key, default) for i in range(num_layers)]
    others = {g: recipe.params_for(g).get(key, default) for g in _NON_LAYER_GROUPS}
    return layers, others


def _check_non_layer(key: str, layers: list, others: dict, notes: list[str]) -> None:
    """Note the non-layer groups whose value differs from layer 0's (mergekit gives them the value at t = 0)."""
    differ = {g: v for g, v in others.items() if v != layers[0]}
    if differ:
        notes.append(f"parameter {key!r}: groups {differ} differ from layer 0 ({layers[0]!r}), but mergekit gives "
                     "embeddings, final norm and head the value at t = 0 (layer 0's); not expressible")


def _settings(recipe: MergeRecipe, num_layers: int | None, notes: list[str]) -> tuple[list[dict], dict]:
    """(per-model mergekit parameters, one dict per recipe model; top-level parameters)."""
    per_model_keys, global_keys = MERGEKIT_PARAMETERS[recipe.method]
    keys = dict.fromkeys([*recipe.parameters, *(k for g in recipe.groups.values() for k in g)])
    keys.update(dict.fromkeys(_OUR_NAME.get(k, k) for k in _REQUIRED & {*per_model_keys, *global_keys}))
    n = len(recipe.models)
    per_model, top = [{} for _ in range(n)], {}
    for key in keys:
        name = _MERGEKIT_NAME.get(key, key)
        layers, others = _layer_values(recipe, key, num_layers)
        if name in global_keys or (name in _ONE_VALUE and name in per_model_keys):
            _check_non_layer(key, layers, others, notes)
            setting = _as_gradient(layers)
            for target in (per_model if name in _ONE_VALUE else [top]):
                target[name] = setting
        elif name in per_model_keys:
            for j, model in enumerate(recipe.models):
                column = [_per_model(v, n)[j] for v in layers]
                column_others = {g: _per_model(v, n)[j] for g, v in others.items()}
                _check_non_layer(f"{key} of model {model!r}", column, column_others, notes)
                per_model[j][name] = _as_gradient(column)
        elif not _is_default(recipe.method, key, [*layers, *others.values()], n):
            notes.append(f"parameter {key!r} ({recipe.params_for('layers.0').get(key)!r}) of our "
                         f"{recipe.method!r} has no mergekit equivalent; left out")
    return per_model, top


def _is_default(method: str, key: str, values: list, n: int) -> bool:
    """Whether every value of ``key`` has the effect of our default (uniform weights: any equal weights)."""
    if key == "weights":
        return all(len(set(_per_model(v, n))) == 1 for v in values)
    return all(v == _default(method, key) for v in values)


def _mergekit_inputs(recipe: MergeRecipe, notes: list[str]) -> tuple[list[str], str | None]:
    """(models to list before the recipe's own, base_model) of the mergekit configuration."""
    method, models, base = recipe.method, recipe.models, recipe.base
    if method == "linear":
        if base is not None and base not in models:
            notes.append(f"base {base!r} is only the architecture template of a linear merge; mergekit's linear "
                         "would average it in as one more model, so base_model is left out")
        return [], base if base in models else None
    if method == "slerp" and len(models) == 2:
        if base not in (None, models[0]):
            notes.append(f"base {base!r} is only the architecture template here; mergekit's slerp runs from "
                         f"base_model {models[0]!r} (t = 0) to {models[1]!r} (t = 1), as ours does")
        return [], models[0]
    if method == "karcher" and base is None:
        return [], None
    if base is None:
        raise MergeError(f"the recipe names no base, but mergekit's {method!r} needs base_model")
    return ([base] if method == "slerp" else []), base


def _recipe_notes(recipe: MergeRecipe, num_layers: int | None, notes: list[str]) -> None:
    """Notes on the recipe fields a mergekit configuration cannot hold."""
    if recipe.groups and num_layers is None:
        notes.append(f"the per-layer-group parameters ({sorted(recipe.groups)}) need the model's layer count to "
                     "be written as mergekit gradients; pass num_layers (they are left out)")
    elif recipe.groups:
        n_groups = -(-num_layers // recipe.group_size)
        known = {f"layers.{g}" for g in range(n_groups)} | set(_NON_LAYER_GROUPS)
        stray = sorted(set(recipe.groups) - known)
        if stray:
            notes.append(f"groups {stray} match no tensor of a {num_layers}-layer model; left out")
    if get_method(recipe.method).randomized:
        notes.append(f"seed {recipe.seed}: mergekit draws its own random masks for {recipe.method!r}, so it will "
                     "not reproduce this merge bit-exactly")
    if recipe.layer_path:
        notes.append(f"layer_path ({len(recipe.layer_path)} layers) is not expressible (mergekit would need "
                     "'slices'); the configuration describes the parameter-space merge only")
    for key, value in recipe.config.items():
        if key != "dtype":
            notes.append(f"config setting {key}={value!r} (applied to the merged model's config) has no mergekit "
                         "equivalent")
    if recipe.checksums:
        notes.append("the sources' checksums are not carried (mergekit does not verify its inputs)")


def to_mergekit(recipe: MergeRecipe, num_layers: int | None = None) -> tuple[dict, list[str]]:
    """``recipe`` as a mergekit configuration dict, and notes naming what it cannot express.

    Layer groups (any group_size) become per-layer gradients over ``num_layers`` layers (the shortest list that
    reads back each layer's value exactly under mergekit's rule); without ``num_layers`` they are left out
    with a note. Also noted: non-layer groups whose values differ from layer 0's, parameters of ours mergekit
    lacks, the seed of randomised methods, a layer_path, config settings other than ``dtype``, checksums.
    Raises :class:`MergeError` for a method mergekit cannot run from ``models`` (passthrough) or a missing base.
    """
    if recipe.method not in MERGEKIT_PARAMETERS:
        raise MergeError(f"method {recipe.method!r} cannot be written as a mergekit 'models' configuration; "
                         f"writable methods: {sorted(MERGEKIT_PARAMETERS)}")
    notes: list[str] = []
    extra, base_model = _mergekit_inputs(recipe, notes)
    _recipe_notes(recipe, num_layers, notes)
    per_model, top = _settings(recipe, num_layers if recipe.groups else None, notes)
    models = [{"model": name} for name in extra]
    models += [{"model": name, **({"parameters": p} if p else {})} for name, p in zip(recipe.models, per_model)]
    out: dict[str, Any] = {"models": models, "merge_method": recipe.method}
    if base_model is not None:
        out["base_model"] = base_model
    if top:
        out["parameters"] = top
    if recipe.config.get("dtype"):
        out["dtype"] = recipe.config["dtype"]
    return out, notes


class _Dumper(yaml.SafeDumper):
    """YAML dumper writing lists of numbers (gradients, weights) in flow style, as mergekit's own does."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.SequenceNode:
    flow = all(isinstance(e, (int, float)) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def save_mergekit(recipe: MergeRecipe, path: str | Path, num_layers: int | None = None) -> list[str]:
    """Write ``recipe`` as a mergekit YAML file (see :func:`to_mergekit`), its notes as comments at the top;
    returns the notes."""
    config, notes = to_mergekit(recipe, num_layers)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# not expressible: {' '.join(note.split())}\n" for note in notes)
    path.write_text(header + yaml.dump(config, Dumper=_Dumper, sort_keys=False))
    return notes
