"""The tool markup in text: the call a completion waits on (``extract_tool_call``) and every call it made
(``find_tool_calls``). Pure text: no torch, no model."""
from __future__ import annotations

from ..data.base import TOOL_CLOSE, TOOL_OPEN, TOOL_RESULT

__all__ = ["extract_tool_call", "find_tool_calls"]


def extract_tool_call(text: str) -> str | None:
    """The expression of the last complete ``<|tool|>expr<|/tool|>`` call in `text` if it still waits for its
    result (no ``<|result|>`` follows its ``<|/tool|>``, whitespace aside), else None.

    None too when `text` has no ``<|/tool|>``, no ``<|tool|>`` opens the last one, or the span between them holds
    other tool markup (``<|tool|>a<|/tool|>b<|/tool|>`` is not a complete call)."""
    end = text.rfind(TOOL_CLOSE)
    if end < 0 or text[end + len(TOOL_CLOSE):].lstrip().startswith(TOOL_RESULT):
        return None
    start = text.rfind(TOOL_OPEN, 0, end)
    if start < 0:
        return None
    expr = text[start + len(TOOL_OPEN):end]
    return None if (TOOL_CLOSE in expr or TOOL_RESULT in expr) else expr


def find_tool_calls(text: str) -> list[str]:
    """The expressions of every complete ``<|tool|>expr<|/tool|>`` call in `text`, in order (results or not)."""
    calls = []
    for piece in text.split(TOOL_OPEN)[1:]:
        expr, closed, _ = piece.partition(TOOL_CLOSE)
        if closed and TOOL_RESULT not in expr:
            calls.append(expr)
    return calls

