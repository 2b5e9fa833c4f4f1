"""Model merging for Agent Forge's EvoMerge phase: merge methods (a registry keyed by name), model-level
merges driven by YAML recipes (mergekit configurations are read and written too), and CMA-ES search over recipes
and layer paths."""
from .evolve import EvolutionResult, RecipeSpace, evolve_layer_path, evolve_recipe
from .mergekit_yaml import from_mergekit, is_mergekit_config, save_mergekit, to_mergekit
from .methods import (MERGE_METHODS, MergeError, MergeMethod, UnknownMergeMethodError, get_method,
                      merge_tensors, register_method)
from .models import (IncompatibleModelsError, MergeRecipe, load_recipe, merge_models, merge_parameters,
                     model_groups, param_group, rebuild_from_recipe, save_recipe, uniform_recipe,
                     validate_models)

__all__ = [
    "MERGE_METHODS", "EvolutionResult", "IncompatibleModelsError", "MergeError", "MergeMethod", "MergeRecipe",
    "RecipeSpace", "UnknownMergeMethodError", "evolve_layer_path", "evolve_recipe", "from_mergekit", "get_method",
    "is_mergekit_config", "load_recipe", "merge_models", "merge_parameters", "merge_tensors", "model_groups",
    "param_group", "rebuild_from_recipe", "register_method", "save_mergekit", "save_recipe", "to_mergekit",
    "uniform_recipe", "validate_models",
]
