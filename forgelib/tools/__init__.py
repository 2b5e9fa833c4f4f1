"""Tools for the curriculum phase: a safe calculator, and greedy generation that runs the model's tool calls.

    calculator("821*92")                                   # "75532"
    traces = generate_with_tools(model, tok, ["821*92="])  # the model writes <|tool|>821*92<|/tool|>, the loop
                                                           # appends <|result|>75532, the model goes on: #75532
    correct, stats = tool_correctness(model, tok, samples, use_tool=True)

By job: ``calc`` (the calculator: pure Python, its bounds and error format), ``calls`` (the tool markup in text),
``generate`` (tool-aware generation and its scores; torch). Every public name is importable from here.
"""
from __future__ import annotations

from .calc import (ERROR_PREFIX, MAX_DEPTH, MAX_DIGITS, MAX_EXPONENT, MAX_LENGTH, SIGNIFICANT_DIGITS, TIME_LIMIT_S,
                   calculator)
from .calls import extract_tool_call, find_tool_calls
from .generate import ToolTrace, generate_with_tools, tool_correctness, tool_stats

__all__ = ["ERROR_PREFIX", "MAX_DEPTH", "MAX_DIGITS", "MAX_EXPONENT", "MAX_LENGTH", "SIGNIFICANT_DIGITS",
           "TIME_LIMIT_S", "ToolTrace", "calculator", "extract_tool_call", "find_tool_calls", "generate_with_tools",
           "tool_correctness", "tool_stats"]
