"""`forge bench cognate`: three measurements of the Phase-1 model, printed as JSON (also under outputs/bench/).

(a) throughput — training tokens/s of Cognate (n=0, T=1, memory and ACT off) vs ``LlamaForCausalLM`` of
    identical shape and weights, interleaved in one run (rounds alternate the two; medians reported);
(b) cycles — a one-layer model trained with T=4 cycles (deep supervision), with ACT halting and without (same
    data and seed), evaluated at test-time T = 1, 2, 4, 8 (exact-match accuracy per family, cycles ACT spends
    per prompt and per written token): does thinking longer help, and what does halting cost?
(c) memory — ``recall`` with the queried pair further back than the attention window, memory on vs off,
    same data, seed and training budget.
"""
from __future__ import annotations

import statistics
import time

import torch

from .. import paths
from ..data.tasks import build_mix, format_sample, generate
from ..data.tokenizer import encode_samples, lm_batches, token_distance, train_tokenizer
from ..evaluate import exact_match_accuracy, mean_nll
from ..models import CognateConfig, CognateForCausalLM
from ..results import dumps_json
from ..train import TrainConfig, train
from .options import build_parser


def _tokenizer(seed: int, vocab_size: int = 320):
    corpus = build_mix({f: 1.0 for f in ("arith", "multistep", "algebra", "recall", "sequence", "logic")},
                       (1, 3), 2000, "train", seed)
    return train_tokenizer([format_sample(s, with_steps=True) for s in corpus], vocab_size=vocab_size)


def _shape(args) -> dict:
    return dict(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


# --- (a) throughput -----------------------------------------------------------------------------------


def _time_steps(model, batch, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bench_throughput(args) -> dict:
    """Interleaved rounds: each round times ``steps`` training steps of Llama, then of Cognate."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    shape = _shape(args)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=512, tie_word_embeddings=False, **shape))
    cognate = CognateForCausalLM(CognateConfig.from_llama(llama.config))
    cognate.load_state_dict(llama.state_dict(), strict=False)
    ids = torch.randint(0, 512, (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    times = {"llama": [], "cognate": []}
    _time_steps(llama, batch, 2), _time_steps(cognate, batch, 2)  # warm-up
    for _ in range(args.rounds):
        times["llama"].append(_time_steps(llama, batch, args.steps))
        times["cognate"].append(_time_steps(cognate, batch, args.steps))
    tokens = args.batch * args.seq * args.steps
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    return {"tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
            "ratio_cognate_over_llama": round(tps["cognate"] / tps["llama"], 3),
            "params": sum(p.numel() for p in llama.parameters()), "rounds": args.rounds,
            "steps_per_round": args.steps, "batch": args.batch, "seq": args.seq, "target": ">= 0.9"}


# --- shared training ----------------------------------------------------------------------------------


def _train(model, tokenizer, samples, args, seed: int):
    encoded = encode_samples(tokenizer, samples, args.max_len, answer_only_loss=False, drop_long=True)
    batches = lm_batches(encoded, 16, seed=seed, epochs=None)
    from ..optim import create_optimizer_from_phase

    optimizer = create_optimizer_from_phase(model, phase_num=1)
    return train(model, batches, optimizer, TrainConfig(steps=args.train_steps, log_every=50), quiet=True)


def _new_model(tokenizer, args, **config) -> CognateForCausalLM:
    torch.manual_seed(args.seed)
    return CognateForCausalLM(CognateConfig(
        vocab_size=len(tokenizer), **_shape(args), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **config))


# --- (b) test-time cycles -----------------------------------------------------------------------------


def bench_cycles(args, tokenizer) -> dict:
    """(b) with ACT halting on and off (``--cycles-act``), one model each, same data and seed."""
    modes = [m.strip() for m in args.cycles_act.split(",") if m.strip()]
    if not modes or set(modes) - {"on", "off"}:
        raise SystemExit(f"--cycles-act: give on, off or on,off; got {args.cycles_act!r}")
    return {f"act_{mode}": _cycles_run(args, tokenizer, mode == "on") for mode in modes}


def _cycles_run(args, tokenizer, use_act: bool) -> dict:
    """A one-layer Cognate trained with ``--cycles-train`` recursion cycles (deep supervision; ACT halting in
    training as in inference when ``use_act``) on Phase 1's streamed recipe, evaluated at test-time T = 1, 2, 4,
    8: exact-match accuracy per family and the cycles spent per token. One layer: depth comes from the cycles."""
    from ..data.stream import LengthBucketedBatches, TaskStream
    from ..evaluate import accuracy_by_family
    from ..optim import create_optimizer_from_phase

    mix = {"arith": 1, "multistep": 1, "modular": 1, "algebra": 1}
    levels = (1, args.cycles_max_level)
    shape = {**_shape(args), "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 1}
    torch.manual_seed(args.seed)
    model = CognateForCausalLM(CognateConfig(
        vocab_size=len(tokenizer), **shape, n_latent=0, n_cycles=args.cycles_train, use_act=use_act,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id))
    batches = LengthBucketedBatches(tokenizer, TaskStream(mix, levels, "train", args.seed), 16, args.max_len,
                                    with_steps=True, seed=args.seed)
    optimizer = create_optimizer_from_phase(model, phase_num=1, lr=2e-3, weight_decay=0.1)
    history = train(model, batches, optimizer, TrainConfig(steps=args.cycles_steps, log_every=50, warmup_steps=50,
                                                           schedule="cosine", min_lr_ratio=0.1), quiet=True)
    test = build_mix(mix, levels, args.eval_samples, "test", args.seed + 1)
    encoded = encode_samples(tokenizer, test, args.max_len + 32, with_steps=True)
    completion = encoded["labels"] != -100  # (N, T) the tokens the model writes (worked steps and answer)
    rows = {}
    for cycles in (1, 2, 4, 8):
        model.config.n_cycles = cycles
        with torch.no_grad():
            used = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).act_cycles
        acc = accuracy_by_family(model, tokenizer, test, batch_size=64, with_steps=True)
        prompt = encoded["attention_mask"].bool() & ~completion
        rows[cycles] = {"accuracy": round(sum(acc.values()) / len(acc), 4),
                        "by_family": {k: round(v, 4) for k, v in acc.items()},
                        "mean_cycles_prompt_tokens": round(float(used[prompt].float().mean()), 3),
                        "mean_cycles_written_tokens": round(float(used[completion].float().mean()), 3)}
    model.config.n_cycles = args.cycles_train
    return {"trained_cycles": args.cycles_train, "layers": 1, "levels": list(levels), "train_steps": args.cycles_steps,
            "n_test": len(test), "final_train_loss": round(history.last_loss, 4),
            "train_seconds": round(history.seconds, 1),
            "by_test_time_cycles": rows}


# --- (c) memory beyond the attention window -----------------------------------------------------------


def _recall_set(n: int, split: str, distances: list[int], seed: int) -> list:
    per = max(1, n // len(distances))
    out = []
    for i, d in enumerate(distances):
        out += generate("recall", 1, per, split, seed + i, distance=d)
    return out


def bench_memory(args, tokenizer) -> dict:
    """Same data/seed/budget; window W tokens; queried pair 2W..4W characters before the query."""
    window = args.window
    distances = [2 * window, 3 * window, 4 * window]
    train_set = _recall_set(4000, "train", distances, args.seed)
    test_set = _recall_set(args.eval_samples, "test", distances, args.seed + 1)
    gaps = sorted(token_distance(tokenizer, s) for s in test_set)
    out = {"window_tokens": window, "distances_chars": distances, "train_steps": args.train_steps,
           "n_test": len(test_set), "chance": 0.1,
           "token_gap_min_median": [gaps[0], gaps[len(gaps) // 2]],
           "note": "distance mode lists the queried pair first; the answer lies further back than the window"}
    for label, use_memory in (("memory_off", False), ("memory_on", True)):
        model = _new_model(tokenizer, args, sliding_window=window, use_memory=use_memory, memory_modules=True,
                           use_act=False)
        history = _train(model, tokenizer, train_set, args, args.seed)
        out[label] = {"accuracy": round(exact_match_accuracy(model, tokenizer, test_set, batch_size=32), 4),
                      "answer_nll": round(mean_nll(model, tokenizer, test_set, max_len=args.max_len + 16,
                                                   answer_only=True), 4),
                      "final_train_loss": round(history.last_loss, 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("cognate")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    report: dict = {"benchmark": "cognate", "threads": args.threads, "torch": torch.__version__}
    tokenizer = _tokenizer(args.seed) if {"cycles", "memory"} & set(parts) else None
    runners = {"throughput": lambda: bench_throughput(args), "cycles": lambda: bench_cycles(args, tokenizer),
               "memory": lambda: bench_memory(args, tokenizer)}
    for part in parts:
        if part not in runners:
            parser.error(f"unknown part {part!r}; valid: {sorted(runners)}")
        started = time.perf_counter()
        report[part] = runners[part]()
        report[part]["seconds"] = round(time.perf_counter() - started, 1)
    text = dumps_json(report)
    print(text)
    out = paths.bench_output("cognate", args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0
