"""Phase 6 — Prompt Baking: prompts turned into weights (``bake``), the prompt library (``library``), and the
prompt teaching that makes the pipeline's small models respond to prompts at all (``teach``)."""
from .bake import (PairBatch, PromptBakingConfig, add_lora, bake_prompt, encode_pairs, gap_closed, merge_baked,
                   pair_kl, prompt_kl, sample_trajectories, scale_adapter, teacher_logprobs)
from .library import BakePrompt, adheres, correct, normalize, styled, uses_tool
from .teach import teach_prompts

__all__ = ["BakePrompt", "PairBatch", "PromptBakingConfig", "add_lora", "adheres", "bake_prompt", "correct",
           "encode_pairs", "gap_closed", "merge_baked", "normalize", "pair_kl", "prompt_kl", "sample_trajectories",
           "scale_adapter", "styled", "teach_prompts", "teacher_logprobs", "uses_tool"]
