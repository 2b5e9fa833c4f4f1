"""The Cognate model of Agent Forge and the loading of any local Hugging Face causal LM.

Importing this package registers ``CognateConfig`` (model_type ``cognate``) with ``AutoConfig`` and
``CognateForCausalLM`` / ``CognateModel`` with ``AutoModelForCausalLM`` / ``AutoModel``.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import CognateCache, CognateCacheError
from .configuration_cognate import CYCLE_LOSS_WEIGHTINGS, CognateConfig, CognateConfigError
from .modeling_cognate import (CognateAttention, CognateCausalLMOutput, CognateForCausalLM, CognateModel,
                               cycle_loss_weights)

AutoConfig.register(CognateConfig.model_type, CognateConfig, exist_ok=True)
AutoModel.register(CognateConfig, CognateModel, exist_ok=True)
AutoModelForCausalLM.register(CognateConfig, CognateForCausalLM, exist_ok=True)

from .loading import ModelLoadError, cognate_from_llama, load_cognate, load_hf_causal_lm  # noqa: E402

__all__ = ["CognateConfig", "CognateConfigError", "CognateForCausalLM", "CognateModel", "CognateAttention",
           "CognateCausalLMOutput", "CognateCache", "CognateCacheError", "CYCLE_LOSS_WEIGHTINGS",
           "cycle_loss_weights", "load_hf_causal_lm", "load_cognate", "cognate_from_llama", "ModelLoadError"]
