"""Quiet-STaR: a causal LM that thinks before each token (parallel thoughts, mixing head, REINFORCE).

The method is described in ``model``'s docstring. The modules, by job:

* ``config``: ``QuietStarConfig`` (the ``quietstar`` phase section embeds it) and its allowed settings;
* ``model``: ``QuietStarModel`` (parallel thoughts, mixing head, ``generate``), ``base_lm``, the thought helpers;
* ``io``: the folder on disk (``save_quietstar``, ``is_quietstar``, ``CONFIG_FILE`` / ``EXTRA_FILE``); reading one
  back is ``forgelib.modelio``'s;
* ``trace``: ``generate_with_thoughts`` -- each answer token with the thought before it;
* ``training``: ``quietstar_loss`` (for ``forgelib.train``), ``reinforce_term``, ``quietstar_optimizer``.
"""
from __future__ import annotations

from .config import REWARDS, THINK_AT, THOUGHT_MODES, QuietStarConfig
from .io import CONFIG_FILE, EXTRA_FILE, is_quietstar, save_quietstar
from .model import (QuietStarModel, QuietStarOutput, Thoughts, base_lm, sample_tokens, thought_mask,
                    thought_vocabulary)
from .trace import ThoughtTrace, generate_with_thoughts
from .training import future_targets, quietstar_loss, quietstar_optimizer, reinforce_term

__all__ = ["CONFIG_FILE", "EXTRA_FILE", "REWARDS", "THINK_AT", "THOUGHT_MODES", "QuietStarConfig", "QuietStarModel",
           "QuietStarOutput", "ThoughtTrace", "Thoughts", "base_lm", "future_targets", "generate_with_thoughts",
           "is_quietstar", "quietstar_loss", "quietstar_optimizer", "reinforce_term", "sample_tokens",
           "save_quietstar", "thought_mask", "thought_vocabulary"]
