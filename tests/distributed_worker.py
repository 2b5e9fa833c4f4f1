"""Run by tests/test_distributed.py under ``accelerate launch --cpu --num_processes 2``: trains a tiny seeded Llama
with forgelib.train.train on a fixed list of batches (dealt out to the processes in turn) and saves what each process
ends with. Usage: distributed_worker.py OUT_DIR [forward|parts] (parts: a loss hook that never calls the model's
``forward``, as the Quiet-STaR and curriculum losses do)."""
import json
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from forgelib.train import TrainConfig, default_loss, train

torch.set_num_threads(1)


def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def fixed_batches(n=4, rows=4, width=8):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 40, (rows, width), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def parts_loss(model, batch):
    """Cross-entropy from the decoder and the head called one by one (no ``model.forward``)."""
    hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state
    logits = model.lm_head(hidden)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    return loss, {}


LOSSES = {"forward": default_loss, "parts": parts_loss}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    loss_fn = LOSSES[sys.argv[2] if len(sys.argv) > 2 else "forward"]
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    history = train(model, iter(fixed_batches()), optimizer, TrainConfig(steps=2, log_every=1), loss_fn=loss_fn,
                    quiet=True)
    from accelerate import PartialState

    state = PartialState()
    torch.save(model.state_dict(), out / f"rank{state.process_index}.pt")
    (out / f"rank{state.process_index}.json").write_text(json.dumps(
        {"losses": history.losses, "tokens": history.tokens, "processes": state.num_processes}))
