"""Test phase 1: create a tiny real Llama model and save it."""
import dataclasses

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from forgelib.results import GateCheck


@dataclasses.dataclass
class Params:
    width: int = 16
    """hidden size of the tiny model"""
    min_params: int = 1
    """gate: the model must have at least this many parameters"""


def run(params, ctx):
    torch.manual_seed(ctx.seed)
    config = LlamaConfig(vocab_size=32, hidden_size=params.width, intermediate_size=2 * params.width,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    ctx.log({"params": n}, step=0)
    ctx.save_model("model", model)
    ctx.result.metrics["params"] = n
    ctx.result.gate.append(GateCheck("params", n, params.min_params, ">="))
    return ctx.result
