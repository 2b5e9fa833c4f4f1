"""Shared fixtures: single-threaded torch and tiny real models. (Environment set-up: ../conftest.py.)"""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def tiny_llama():
    """A real 2-layer LlamaForCausalLM (~30k parameters), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()
