"""Agent Forge: the library behind the phase notebooks (see README.md).

The source design's names are here too, imported on first use (``import forgelib`` stays light):
``forgelib.WandBIntegration`` (``forgelib.tracking``) and ``forgelib.PromptManager`` (``forgelib.baking.prompts``).
"""

__version__ = "0.1.0"

_LAZY = {"WandBIntegration": "forgelib.tracking", "PromptManager": "forgelib.baking.prompts"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'forgelib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
