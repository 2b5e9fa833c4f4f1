"""Data for Agent Forge: the procedural task suite, the tokenizer, and loaders for text/JSONL/HF datasets.

`forgelib.data.tasks` is light (pure Python); the tokenizer and loaders import their libraries when used.
"""
from forgelib.data.base import Sample
from forgelib.data.tasks import FAMILIES, build_mix, check, format_sample, generate, get_family

__all__ = ["FAMILIES", "Sample", "build_mix", "check", "format_sample", "generate", "get_family"]
