"""What a Quiet-STaR model thought while answering: ``generate_with_thoughts`` and its ``ThoughtTrace``."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .model import QuietStarModel


@dataclasses.dataclass
class ThoughtTrace:
    """What ``generate_with_thoughts`` produced: the answer (no thought tokens) and, per answer token, the
    thought written before it and the mixing weight given to it."""

    prompt: str
    text: str
    token_ids: list[int]
    steps: list[dict]  # per answer token: token, token_id, thought, thought_ids, weight


def generate_with_thoughts(model: QuietStarModel, tokenizer: Any, prompt: str,
                           max_new_tokens: int = 32) -> ThoughtTrace:
    """Greedy answer to ``prompt``, thinking before each answer token (see ``QuietStarModel.generate``)."""
    from ..data.tokenizer import encode_prompts

    row = encode_prompts(tokenizer, [prompt])[0]
    device = next(model.parameters()).device
    ids = torch.tensor([row], device=device)
    was_training = model.training
    model.eval()
    try:
        out, trace = model.generate(ids, torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                    return_trace=True)
    finally:
        model.train(was_training)
    steps, token_ids = [], []
    for step in trace:
        token = int(step["token"][0])
        if token == tokenizer.eos_token_id:
            break
        thought_ids = [int(t) for t in step["thought"][0]]
        token_ids.append(token)
        steps.append({"token": tokenizer.decode([token]), "token_id": token, "thought_ids": thought_ids,
                      "thought": tokenizer.decode(thought_ids), "weight": float(step["weight"][0])})
    return ThoughtTrace(prompt, tokenizer.decode(token_ids, skip_special_tokens=True), token_ids, steps)
