"""`forge bench optim-lm`: MuGrokfast (Phase-1 preset) vs AdamW on the task suite, same model and data.

A small ``LlamaForCausalLM`` is trained from the same initial weights on the same batches with each
optimizer (alternating step by step, so both see the same machine load) until a fixed budget of
training tokens (real, non-padding tokens) is spent. Reported: the validation loss (mean next-token NLL
over all tokens of held-out samples, and over their answer tokens only), the mean optimizer-step time and
the mean whole training-step time (forward, backward, step). Target: MuGrokfast's step at most 1.2x
AdamW's. MuGrokfast runs with the QK-logit monitor attached, so its step time includes QK-clip's logit
bookkeeping. Rows hold one task-suite sample each (batches trimmed to their longest row); the default
batch is large because the tokens per step matter: Newton–Schulz costs about 30*n^2*m flops per n x m
matrix per step whatever the batch, forward+backward about 6*n*m per token, so Muon's overhead is
roughly 5*n / (tokens per step), and small batches of short rows make any Muon step look expensive.
"""
from __future__ import annotations

import json
import statistics
import time

import torch

from ..data.tasks import build_mix, format_sample
from ..data.tokenizer import encode_samples, lm_batches, train_tokenizer
from ..optim import create_optimizer_from_phase, preset_config
from .grokking import write_result
from .options import build_parser

FAMILIES = ("arith", "multistep", "modular", "sequence", "logic", "algebra")


def build_data(args) -> dict:
    """Tokenizer and one-sample-per-row tensors: training and validation with the loss on every token,
    and validation with the loss on the answer tokens only."""
    mix = {f: 1.0 for f in FAMILIES}
    train = build_mix(mix, (1, args.max_level), args.train_samples, "train", args.seed)
    val = build_mix(mix, (1, args.max_level), args.val_samples, "test", args.seed)
    tok = train_tokenizer([format_sample(s) for s in train], vocab_size=args.vocab)
    enc = dict(max_len=args.max_len, drop_long=True)
    return {"tokenizer": tok, "train": encode_samples(tok, train, answer_only_loss=False, **enc),
            "val": encode_samples(tok, val, answer_only_loss=False, **enc),
            "val_answers": encode_samples(tok, val, answer_only_loss=True, **enc)}


def build_model(args, vocab_size: int, pad_id: int):
    """A small Llama (GQA, RMSNorm, RoPE, SwiGLU), seeded so every optimizer starts from the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=args.max_len, tie_word_embeddings=False, pad_token_id=pad_id)
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def mean_loss(model, encoded: dict, batch_size: int = 64) -> float:
    """Token-weighted mean NLL over the labelled tokens of ``encoded``."""
    model.eval()
    total, count = 0.0, 0
    for batch in lm_batches(encoded, batch_size, seed=0, epochs=1):
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * n
        count += n
    model.train()
    return total / max(count, 1)


def make_optimizer(name: str, model, args):
    """(optimizer, description): the Phase-1 MuGrokfast preset, or AdamW with the same lr/decay/betas."""
    preset = preset_config(1, lr=args.lr)
    if name == "mugrokfast":  # from_model attaches the QK-logit monitor to the Llama attention
        return create_optimizer_from_phase(model, 1, lr=args.lr), {"preset": 1, "lr": args.lr}
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=preset.betas,
                                weight_decay=preset.weight_decay)
        return opt, {"lr": args.lr, "betas": preset.betas, "weight_decay": preset.weight_decay}
    raise KeyError(f"unknown optimizer {name!r}; valid: ['adamw', 'mugrokfast']")


class _Run:
    """One optimizer's model, optimizer, warm-up schedule and timings."""

    def __init__(self, name: str, data: dict, args):
        tok = data["tokenizer"]
        self.model = build_model(args, len(tok), tok.pad_token_id)
        self.opt, self.described = make_optimizer(name, self.model, args)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / args.warmup))
        self.step_ms: list[float] = []
        self.opt_ms: list[float] = []

    def step(self, batch: dict) -> None:
        """One timed training step (forward, backward, optimizer step)."""
        start = time.perf_counter()
        self.model(**batch).loss.backward()
        opt_start = time.perf_counter()
        self.opt.step()
        opt_end = time.perf_counter()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_ms.append(1000 * (opt_end - start))
        self.opt_ms.append(1000 * (opt_end - opt_start))

    def report(self, data: dict, tokens: int) -> dict:
        steps = len(self.step_ms)
        skip = min(5, steps - 1)  # leave out the first steps (allocation, lazy state creation)
        return {"optimizer": self.described, "steps": steps, "tokens": tokens,
                "val_loss": round(mean_loss(self.model, data["val"]), 4),
                "val_answer_loss": round(mean_loss(self.model, data["val_answers"]), 4),
                "tokens_per_step": round(tokens / steps),
                "optimizer_step_ms": round(statistics.fmean(self.opt_ms[skip:]), 3),
                "train_step_ms": round(statistics.fmean(self.step_ms[skip:]), 3)}


def train_lockstep(names: tuple[str, ...], data: dict, args) -> dict:
    """Train one model per optimizer on the same batches, alternating step by step, until ``args.tokens``
    training tokens are consumed. Alternating makes the step times comparable on a shared machine whose
    load changes over time (running one optimizer after the other does not)."""
    runs = {name: _Run(name, data, args) for name in names}
    tokens = 0
    for batch in lm_batches(data["train"], args.batch_size, seed=args.seed, epochs=None):
        for run in runs.values():
            run.step(batch)
        tokens += int(batch["attention_mask"].sum())
        if tokens >= args.tokens:
            break
    return {name: run.report(data, tokens) for name, run in runs.items()}


def main(argv: list[str] | None = None) -> int:
    """CLI: ``forge bench optim-lm [--tokens N] [--hidden 128] [--layers 4] ...``; prints JSON."""
    ap = build_parser("optim-lm")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = build_data(args)
    runs = train_lockstep(("adamw", "mugrokfast"), data, args)
    a, m = runs["adamw"], runs["mugrokfast"]
    result = {"benchmark": "optim-lm", "settings": vars(args), "runs": runs,
              "mugrokfast_over_adamw": {
                  "val_loss_diff": round(m["val_loss"] - a["val_loss"], 4),
                  "train_step_time_ratio": round(m["train_step_ms"] / a["train_step_ms"], 3),
                  "optimizer_step_time_ratio": round(m["optimizer_step_ms"] / a["optimizer_step_ms"], 3)}}
    result["target_step_time_met"] = result["mugrokfast_over_adamw"]["train_step_time_ratio"] <= 1.2
    path = write_result(result, args.out, "optim-lm")
    print(json.dumps(result, indent=1))
    print(f"written: {path}")
    return 0
