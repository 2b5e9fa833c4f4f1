"""The source design's ``PromptManager``: the prompts the baking phase bakes, read as the phase reads them.

The source design baked prompts in its Phase 3; here Prompt Baking is Phase 6 (``baking``), and its prompt library
is the ``prompts`` list of a parameter file's ``baking`` section (``forgelib.baking.library.BakePrompt``: a tool
prompt and a persona prompt in the smoke set). ``get_phase3_prompts()`` (the design's name) and
``get_phase6_prompts()`` return their texts, ready for ``bake_prompt(model, text, ...)``; ``library()`` returns the
``BakePrompt`` objects (name, kind, text, answer prefix).

This module is not imported by ``forgelib.baking`` itself: it loads the phase's parameters (``forgelib.phases``),
which import the baking package.
"""
from __future__ import annotations

import os

from .library import BakePrompt

DEFAULT_PARAMS = "parameters/smoke.yaml"
"""The parameter file ``forge run`` and the notebooks use when none is given."""


class PromptManager:
    """The baking phase's prompt library, from a parameter file (default :data:`DEFAULT_PARAMS`)."""

    @staticmethod
    def library(params_file: str | os.PathLike = DEFAULT_PARAMS, overrides: dict | None = None) -> list[BakePrompt]:
        """The ``BakePrompt`` objects the baking phase bakes with ``params_file`` (and ``overrides``, as
        ``--set`` gives them), loaded and checked exactly as the phase loads them."""
        from ..phases import PHASES, get_spec
        from ..phases.base import load_phase_params

        return load_phase_params(get_spec("baking"), params_file, overrides, PHASES)[1].library

    @staticmethod
    def get_phase6_prompts(params_file: str | os.PathLike = DEFAULT_PARAMS,
                           overrides: dict | None = None) -> list[str]:
        """The texts of the baking phase's prompts, in library order (the order the phase bakes them)."""
        return [prompt.text for prompt in PromptManager.library(params_file, overrides)]

    @staticmethod
    def get_phase3_prompts(params_file: str | os.PathLike = DEFAULT_PARAMS,
                           overrides: dict | None = None) -> list[str]:
        """The source design's name for :meth:`get_phase6_prompts` (its prompt baking was Phase 3)."""
        return PromptManager.get_phase6_prompts(params_file, overrides)


__all__ = ["DEFAULT_PARAMS", "PromptManager"]
