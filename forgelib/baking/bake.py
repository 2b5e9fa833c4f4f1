"""Prompt Baking: turn a prompt ``u`` into a LoRA adapter so that the unprompted model behaves as the prompted one.

    baked = bake_prompt(model, "Use the calculator. ", tokenizer, questions, PromptBakingConfig(steps=60))
    report = baked.baking_report            # KL per step, held-out KL curve, gap closed
    model = merge_baked(baked)              # merge_and_unload: the adapter folded into the weights

Objective (Prompt Baking): minimize ``KL( P_θ(·|u, x, y<j) ‖ P_θ+LoRA(·|x, y<j) )`` over trajectories ``y``
sampled from the prompted model. The **teacher** is the same network with the adapter *disabled* and the
prompt prepended (or another model given as ``teacher``: Phase 6 bakes every cycle from the prompt-taught
model); the **student** has the adapter on and no prompt. The KL is over the full vocabulary at every
position both see after the question: the positions that predict the trajectory's tokens and its end
(``<|eos|>`` when the sample ended). Teacher log-probabilities are computed once (the teacher never changes: its
weights are frozen and the adapter is off) and reused every step.

Trajectories come from ``forgelib.tools.generate_with_tools`` at ``temperature`` (the prompted model's calculator
calls get their results, as at inference). Pairs longer than the model's context are left out.

**Ternary (BitLinear) layers.** The adapter of a BitLinear layer is applied *inside* the quantizer: the layer
computes with ``ternary(W + s·BA)`` (straight-through gradient to A and B), not ``ternary(W) + s·BA``. Merging
(``merge_and_unload``) then writes ``W + s·BA`` into the latent weight and the merged layer's forward is exactly
the adapted one: the model stays all-ternary and nothing of the bake is lost to a later rounding (a plain LoRA
merged into a ternary layer would be re-quantized: a different model). Measured cost in
``forge bench baking``. Plain ``nn.Linear`` layers (Llama-style models) get peft's standard LoRA.

**Half-baking** (``half_baking=True``): the adapter's scaling is multiplied by ``half_baking_factor`` after
training (partial strength; the KL-against-step curve is the other, early-stop, view). **Prompt pursuit**
(``prompt_pursuit``): bake, merge, prompt the baked model with ``u`` again and bake that, ``rounds`` times.
**Sequential baking** (``sequential_bake``): bake u1, merge, bake u2 on the merged model, ...

**Gap closed** on held-out inputs: ``1 − KL(prompted ‖ baked) / KL(prompted ‖ unbaked)``, with trajectories
sampled once from the prompted model (``eval_data``).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.base import Sample
from ..data.tokenizer import encode_prompts, pad_id
from ..params import require_non_negative, require_positive

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class PromptBakingConfig:
    """Settings of one bake (the phase's ``bake`` section)."""

    steps: int = 60
    """Optimizer steps of the bake."""
    lr: float = 2e-3
    """Learning rate of the LoRA matrices (MuGrokfast, Phase-6 preset otherwise)."""
    optimizer: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Further MuGrokfast overrides of the Phase-6 preset (QK-clip is always off: it would move the frozen
    weights the teacher shares)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the adapter is scaled by ``lora_alpha / lora_r``)."""
    target_modules: list[str] | None = None
    """Module name suffixes that get an adapter (None: attention and MLP projections that exist)."""
    batch_size: int = 16
    """Trajectory pairs per step (and as many retain pairs, with ``retain_data``)."""
    trajectories: int = 128
    """Trajectories sampled from the prompted model per bake (calibration inputs are cycled)."""
    temperature: float = 1.0
    """Sampling temperature of the trajectories (0: greedy)."""
    max_new_tokens: int = 48
    """Longest sampled trajectory in tokens."""
    max_len: int | None = None
    """Longest teacher sequence kept (None: the model's ``max_position_embeddings``)."""
    half_baking: bool = False
    """Scale the trained adapter by ``half_baking_factor`` before merging (partial strength)."""
    half_baking_factor: float = 0.5
    """With ``half_baking``: the adapter's scaling is multiplied by this after training (partial strength)."""
    eval_every: int = 10
    """Held-out KL every N steps (with ``eval_data``; 0: only before and after)."""
    ternary_aware: bool = True
    """On BitLinear layers, apply the adapter inside the quantizer (exact merge). False: peft's plain LoRA beside
    the ternary layer (its merge is re-quantized; the benchmark measures what that loses)."""
    retain_weight: float = 1.0
    """Weight of the retain term (with ``retain_data``): KL(model without adapter ‖ student) on unprompted
    trajectories of inputs the prompt should not change."""
    retain_temperature: float | None = None
    """Sampling temperature of the retain trajectories (None: ``temperature``; 0: the greedy answers, the ones the
    guard asks)."""
    seed: int = 0
    """Seed of the trajectories, the adapter's initialisation and the batch order."""

    def __post_init__(self):
        require_positive(self, "steps", "lr", "lora_r", "lora_alpha", "batch_size", "trajectories", "max_new_tokens")
        require_non_negative(self, "temperature", "eval_every", "retain_weight")
        if self.retain_temperature is not None and not self.retain_temperature >= 0:
            raise ValueError(f"retain_temperature must be None or >= 0, got {self.retain_temperature!r}")
        if not 0 <= self.half_baking_factor <= 1:
            raise ValueError(f"half_baking_factor must be in [0, 1], got {self.half_baking_factor}")


# --- trajectories and paired encodings ----------------------------------------------------------------


def _prompt_text(x: str | Sample) -> str:
    return x.prompt if isinstance(x, Sample) else str(x)


@torch.no_grad()
def sample_trajectories(model: nn.Module, tokenizer, prompt: str, inputs: Sequence[str | Sample], n: int,
                        temperature: float = 1.0, max_new_tokens: int = 48, seed: int = 0) -> list[tuple[str, str,
                                                                                                         bool]]:
    """``n`` trajectories of the model prompted with ``prompt`` (``inputs`` cycled): ``(x, y, ended)`` with ``y``
    the completion (tool markup and results kept) and ``ended`` whether it stopped at eos."""
    from ..tools import generate_with_tools

    xs = [_prompt_text(inputs[i % len(inputs)]) for i in range(n)]
    torch.manual_seed(seed)
    traces = generate_with_tools(_unwrapped(model), tokenizer, [prompt + x for x in xs], max_new_tokens,
                                 batch_size=64, temperature=temperature)
    return [(x, t.text, t.stop == "eos") for x, t in zip(xs, traces)]


@dataclasses.dataclass
class PairBatch:
    """Teacher (``t_*``: prompt + x + y) and student (``s_*``: x + y) rows of the same trajectories, right-padded,
    with the positions whose next-token distributions are compared (``*_pos`` (B, J), ``pos_mask`` (B, J))."""

    t_ids: torch.Tensor
    t_mask: torch.Tensor
    t_pos: torch.Tensor
    s_ids: torch.Tensor
    s_mask: torch.Tensor
    s_pos: torch.Tensor
    pos_mask: torch.Tensor
    targets: torch.Tensor
    """The trajectory's token at each compared position (for the supervised alternative); -100 on padding."""

    def __len__(self) -> int:
        return self.t_ids.shape[0]

    def select(self, index: torch.Tensor | list[int]) -> "PairBatch":
        index = torch.as_tensor(index)
        return PairBatch(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def encode_pairs(tokenizer, prompt: str, trajectories: Sequence[tuple[str, str, bool]],
                 max_len: int | None = None) -> PairBatch:
    """Encode trajectories as teacher/student pairs (see ``PairBatch``); pairs whose teacher row is longer than
    ``max_len`` are left out (a ValueError when none is left)."""
    from ..data.tokenizer import plain_ids

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    xs = encode_prompts(tokenizer, [x for x, _, _ in trajectories])
    uxs = encode_prompts(tokenizer, [prompt + x for x, _, _ in trajectories])
    ys = plain_ids(tokenizer, [y for _, y, _ in trajectories])
    t_rows, s_rows, t_pos, s_pos, targets = [], [], [], [], []
    for x, ux, y, (_, _, ended) in zip(xs, uxs, ys, trajectories):
        resp = y + (eos if ended else [])
        if not resp or (max_len and len(ux) + len(resp) > max_len):
            continue
        t_rows.append(ux + resp)
        s_rows.append(x + resp)
        t_pos.append(list(range(len(ux) - 1, len(ux) - 1 + len(resp))))
        s_pos.append(list(range(len(x) - 1, len(x) - 1 + len(resp))))
        targets.append(resp)
    if not t_rows:
        raise ValueError(f"no trajectory fits max_len={max_len} (prompt {prompt!r})")
    pad = pad_id(tokenizer)
    t_ids, s_ids = _pad(t_rows, pad), _pad(s_rows, pad)
    return PairBatch(t_ids=t_ids, t_mask=_pad([[1] * len(r) for r in t_rows], 0), t_pos=_pad(t_pos, 0),
                     s_ids=s_ids, s_mask=_pad([[1] * len(r) for r in s_rows], 0), s_pos=_pad(s_pos, 0),
                     pos_mask=_pad([[1] * len(p) for p in t_pos], 0).bool(), targets=_pad(targets, -100))


def _gather(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V) at positions pos (B, J) -> (B, J, V)."""
    return logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def _unwrapped(model: nn.Module) -> nn.Module:
    return model


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
    return _gather(out.logits.float(), pos.to(device))


def adapter_off(model: nn.Module):
    """Context in which a peft model runs without its adapter (a plain model: nothing changes)."""
    import contextlib

    return model.disable_adapter() if hasattr(model, "disable_adapter") and hasattr(model, "peft_config") \
        else contextlib.nullcontext()


@torch.no_grad()
def teacher_logprobs(model: nn.Module, pairs: PairBatch, batch_size: int = 64) -> torch.Tensor:
    """Log-probabilities (B, J, V) of the prompted model with the adapter disabled, at the compared positions."""
    out = []
    was = model.training
    model.eval()
    with adapter_off(model):
        for i in range(0, len(pairs), batch_size):
            b = pairs.select(list(range(i, min(i + batch_size, len(pairs)))))
            out.append(F.log_softmax(_logits(model, b.t_ids, b.t_mask, b.t_pos), -1).cpu())
    model.train(was)
    width = max(o.shape[1] for o in out)
    return torch.cat([F.pad(o, (0, 0, 0, width - o.shape[1])) for o in out])


def pair_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over compared positions of KL(teacher ‖ student), full vocabulary (mask (B, J) marks real ones)."""
    per_pos = _position_kl(student_logits, teacher_logp)
    m = mask.to(per_pos.device, per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp(min=1)


def _position_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) at every position (B, J), full vocabulary."""
    logp_s = F.log_softmax(student_logits.float(), -1)
    return F.kl_div(logp_s, teacher_logp.to(logp_s.device), log_target=True, reduction="none").sum(-1)  # (B, J)


def pair_kl_rows(student_logits: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per pair (B,): the KL(teacher ‖ student) summed over its compared positions."""
    per_pos = _position_kl(student_logits, teacher_logp)
    return (per_pos * mask.to(per_pos.device, per_pos.dtype)).sum(-1)


@torch.no_grad()
def prompt_kl_rows(model: nn.Module, pairs: PairBatch, teacher_logp: torch.Tensor, adapter: bool = True,
                   batch_size: int = 64) -> tuple[list[float], list[int]]:
    """Per pair: KL(prompted teacher ‖ model without the prompt) summed over its compared positions, and the number
    of those positions (``adapter=False``: the model with its adapter disabled, i.e. the unbaked model)."""
    import contextlib

    was = model.training
    model.eval()
    sums: list[float] = []
    with (contextlib.nullcontext() if adapter else adapter_off(model)):
        for i in range(0, len(pairs), batch_size):
            idx = list(range(i, min(i + batch_size, len(pairs))))
            b = pairs.select(idx)
            logits = _logits(model, b.s_ids, b.s_mask, b.s_pos)
            sums += pair_kl_rows(logits, teacher_logp[idx][:, :logits.shape[1]], b.pos_mask).tolist()
    model.train(was)
    return sums, [int(c) for c in pairs.pos_mask.sum(1).tolist()]


@torch.no_grad()
def prompt_kl(model: nn.Module, pairs: PairBatch, teacher_logp: torch.Tensor, adapter: bool = True,
              batch_size: int = 64) -> float:
    """KL(prompted teacher ‖ model without the prompt), per compared position, over ``pairs`` (``adapter=False``:
    the model with its adapter disabled, i.e. the unbaked model)."""
    sums, counts = prompt_kl_rows(model, pairs, teacher_logp, adapter, batch_size)
    return sum(sums) / max(sum(counts), 1)


def gap_closed(kl_baked: float, kl_unbaked: float) -> float:
    """``1 − KL(prompted ‖ baked) / KL(prompted ‖ unbaked)`` (nan when the prompt changes nothing)."""
    return 1.0 - kl_baked / kl_unbaked if kl_unbaked > 0 else float("nan")


# --- LoRA, ternary-aware ------------------------------------------------------------------------------


def _ternary_lora_class():
    from peft.tuners.lora import Linear as LoraLinear

    class TernaryLoraLinear(LoraLinear):
        """peft LoRA on a BitLinear: the adapted latent ``W + s·BA`` is quantized as a whole (see the module
        docstring), so ``merge`` gives the same forward."""

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            active = [a for a in self.active_adapters if a in self.lora_A]
            if self.disable_adapters or self.merged or not active:
                return super().forward(x, *args, **kwargs)
            base = self.get_base_layer()
            weight = base.weight
            for name in active:
                weight = weight + self.get_delta_weight(name)
            return base.forward_with_weight(x, weight)

    return TernaryLoraLinear


def target_modules(model: nn.Module, wanted: Sequence[str] | None = None) -> list[str]:
    """The Linear-module name suffixes of ``wanted`` (default DEFAULT_TARGETS) that ``model`` has (an error when
    none matches)."""
    wanted = list(wanted or DEFAULT_TARGETS)
    found = sorted({w for name, m in model.named_modules() if isinstance(m, nn.Linear)
                    for w in wanted if name.endswith(w)})
    if not found:
        raise ValueError(f"no Linear module of {type(model).__name__} ends with any of {wanted}")
    return found


def add_lora(model: nn.Module, config: PromptBakingConfig, adapter_name: str = "default") -> nn.Module:
    """``model`` wrapped by peft with a fresh LoRA adapter (ternary-aware on BitLinear layers)."""
    from peft import LoraConfig, get_peft_model

    from ..quant.bitnet import BitLinear, Int8Linear

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=target_modules(model, config.target_modules))
    if config.ternary_aware and any(isinstance(m, (BitLinear, Int8Linear)) for m in model.modules()):
        adapted = _ternary_lora_class()  # int8 projections too: the adapter inside their quantizer
        lora._register_custom_module({BitLinear: adapted, Int8Linear: adapted})
    torch.manual_seed(config.seed)
    return get_peft_model(model, lora, adapter_name=adapter_name)


def scale_adapter(model: nn.Module, factor: float) -> None:
    """Multiply every active adapter's scaling by ``factor`` (half-baking)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.active_adapters:
                if name in module.scaling:
                    module.scaling[name] *= factor


def merge_baked(model: nn.Module) -> nn.Module:
    """Fold the adapter into the weights (peft ``merge_and_unload``) and return the plain model."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


# --- the bake -----------------------------------------------------------------------------------------


def _optimizer(model: nn.Module, config: PromptBakingConfig):
    from ..optim import create_optimizer_from_phase

    overrides = {**config.optimizer, "lr": config.lr, "qk_clip_tau": None}
    return create_optimizer_from_phase(model, phase_num=6, **overrides)


def _batch(pairs: PairBatch, teacher_logp: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    b = pairs.select(idx)
    width, j = int(b.s_mask.sum(1).max()), int(b.pos_mask.sum(1).max())
    return {"input_ids": b.s_ids[:, :width], "attention_mask": b.s_mask[:, :width], "pos": b.s_pos[:, :j],
            "pos_mask": b.pos_mask[:, :j], "teacher_logp": teacher_logp[idx][:, :j], "targets": b.targets[:, :j]}


def _shuffled(n: int, batch_size: int, g: torch.Generator):
    while True:
        yield from torch.randperm(n, generator=g).split(batch_size)


def _batches(pairs: PairBatch, teacher_logp: torch.Tensor, batch_size: int, seed: int,
             retain: tuple[PairBatch, torch.Tensor] | None = None):
    """Endless shuffled batches of the bake pairs; with ``retain``, each also carries a ``retain`` batch of the
    same size from the retain pairs (nested under the key, moved to the device by ``_to_device``)."""
    g = torch.Generator().manual_seed(seed)
    order = _shuffled(len(pairs), batch_size, g)
    keep = _shuffled(len(retain[0]), batch_size, g) if retain else None
    while True:
        batch = _batch(pairs, teacher_logp, next(order))
        if retain:
            batch["retain"] = _batch(*retain, next(keep))
        yield batch


def _student_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    device = batch["input_ids"].device
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].to(device))
    return _gather(out.logits, batch["pos"].to(device))


def kl_loss(model: nn.Module, batch: dict, retain_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The baking loss: KL(teacher ‖ student) at the compared positions, plus ``retain_weight`` × the same KL on
    the retain pairs (unprompted teacher) when the batch carries them."""
    loss = pair_kl(_student_logits(model, batch), batch["teacher_logp"], batch["pos_mask"])
    extras = {"bake_kl": float(loss.detach())}
    if "retain" in batch:
        r = batch["retain"]
        keep = pair_kl(_student_logits(model, r), r["teacher_logp"], r["pos_mask"])
        extras["retain_kl"] = float(keep.detach())
        loss = loss + retain_weight * keep
    return loss, extras


def sft_loss(model: nn.Module, batch: dict, retain_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The supervised alternative on the same trajectories: cross-entropy of the sampled tokens (the retain pairs,
    when present, by the same cross-entropy on the unprompted model's samples)."""
    def ce(b):
        logits = _student_logits(model, b)
        return F.cross_entropy(logits.flatten(0, 1).float(), b["targets"].to(logits.device).flatten(),
                               ignore_index=-100)

    loss = ce(batch)
    if "retain" in batch:
        loss = loss + retain_weight * ce(batch["retain"])
    return loss, {}


def context_length(model: nn.Module, config: PromptBakingConfig) -> int | None:
    return config.max_len or getattr(getattr(model, "config", None), "max_position_embeddings", None)


def teacher_pairs(model: nn.Module, tokenizer, prompt: str, inputs: Sequence[str | Sample], n: int,
                  config: PromptBakingConfig, seed: int) -> tuple[PairBatch, torch.Tensor]:
    """``n`` trajectories of the model prompted with ``prompt`` (``inputs`` cycled, sampled as ``config`` says),
    as teacher/student pairs that fit the context, with the teacher's log-probabilities (adapter off)."""
    trajectories = sample_trajectories(model, tokenizer, prompt, list(inputs), n, config.temperature,
                                       config.max_new_tokens, seed)
    pairs = encode_pairs(tokenizer, prompt, trajectories, context_length(model, config))
    return pairs, teacher_logprobs(model, pairs)


def _train_adapter(model: nn.Module, pairs: PairBatch, teacher_logp: torch.Tensor,
                   retain: tuple[PairBatch, torch.Tensor] | None, held: tuple[PairBatch, torch.Tensor] | None,
                   config: PromptBakingConfig, loss: str, tracker: Any, desc: str):
    """Train the adapter ``config.steps`` steps on ``pairs`` (and the ``retain`` pairs), by ``loss`` ('kl' or 'sft'),
    evaluating the KL on the ``held`` pairs when there are any; returns the training history."""
    from ..train import TrainConfig, train

    optimizer = _optimizer(model, config)
    train_config = TrainConfig(steps=config.steps, log_every=max(1, config.steps // 4),
                               eval_every=config.eval_every if held else 0)
    loss_fn = kl_loss if loss == "kl" else sft_loss
    return train(model, _batches(pairs, teacher_logp, config.batch_size, config.seed, retain), optimizer,
                 train_config, loss_fn=lambda m, b: loss_fn(m, b, config.retain_weight), tracker=tracker,
                 quiet=True, desc=desc, evaluate=(lambda m: {"heldout_kl": prompt_kl(m, *held)}) if held else None)


def _measure_baked(model: nn.Module, held: tuple[PairBatch, torch.Tensor], unbaked: list[float], positions: list[int],
                   report: dict) -> None:
    """The baked model's held-out KL into ``report``: ``kl_baked``, ``gap_closed`` and per input ``heldout``."""
    baked, _ = prompt_kl_rows(model, *held)
    report["kl_baked"] = sum(baked) / max(sum(positions), 1)
    report["gap_closed"] = gap_closed(report["kl_baked"], report["kl_unbaked"])
    report["heldout"] = {"kl_unbaked": unbaked, "kl_baked": baked, "positions": positions}


def bake_prompt(model: nn.Module, prompt: str, tokenizer, calibration_data: Sequence[str | Sample],
                config: PromptBakingConfig | None = None, eval_data: Sequence[str | Sample] | None = None,
                loss: str = "kl", tracker: Any = None, desc: str = "bake",
                retain_data: Sequence[str | Sample] | None = None, teacher: nn.Module | None = None) -> nn.Module:
    """Bake ``prompt`` into a LoRA adapter on ``model`` (see the module docstring); returns the peft model with
    the adapter on and ``.baking_report``: ``train_kl`` per step, the held-out ``curve`` (step, KL) and, with
    ``eval_data``, ``kl_unbaked``, ``kl_baked`` and ``gap_closed`` (after half-baking when it is on), and per held-out
    input (``heldout``) the summed KL unbaked and baked and its compared positions (``forgelib.baking.gap``: the
    gap's confidence bound).
    ``loss='sft'`` trains the same adapter by cross-entropy on the same trajectories (the benchmark's
    alternative). A model that already carries an adapter gets it merged first (sequential baking).

    ``retain_data``: inputs the prompt should leave alone (other task families). Their trajectories (one per input,
    at least ``config.trajectories``, inputs cycled; at ``config.retain_temperature``) are sampled from the model
    without prompt and adapter, and each step adds ``retain_weight`` × KL(that model ‖ student)
    on a batch of them: the same objective with the empty prompt, so the adapter learns "u on these inputs,
    nothing on those" (measured on the smoke chain: without it, baking the persona prompt took the unrelated
    ``tool`` family from 0.34 to 0.00 accuracy).

    ``teacher``: another model whose prompted behaviour is the target (it samples the trajectories and gives the
    teacher log-probabilities; default: ``model`` itself with the adapter off, the paper's setting). The unbaked
    reference of the held-out gap stays ``model`` with the adapter off, and the retain term keeps ``model``'s own
    unprompted behaviour."""
    config = config or PromptBakingConfig()
    if loss not in ("kl", "sft"):
        raise ValueError(f"loss must be 'kl' or 'sft', got {loss!r}")
    started = time.perf_counter()
    model = add_lora(merge_baked(model), config)
    model.eval()
    source = model if teacher is None else teacher.eval()
    pairs, teacher_logp = teacher_pairs(source, tokenizer, prompt, calibration_data, config.trajectories, config,
                                        config.seed)
    retain_config = config if config.retain_temperature is None else dataclasses.replace(
        config, temperature=config.retain_temperature)
    retain = teacher_pairs(model, tokenizer, "", retain_data, max(config.trajectories, len(retain_data or ())),
                           retain_config, config.seed + 2) if retain_data else None
    held = teacher_pairs(source, tokenizer, prompt, eval_data, len(eval_data), config, config.seed + 1) \
        if eval_data else None
    report: dict[str, Any] = {"prompt": prompt, "pairs": len(pairs), "curve": []}
    if held:
        unbaked, positions = prompt_kl_rows(model, *held, adapter=False)
        report["kl_unbaked"] = sum(unbaked) / max(sum(positions), 1)
        report["curve"].append({"step": 0, "kl": prompt_kl(model, *held)})

    history = _train_adapter(model, pairs, teacher_logp, retain, held, config, loss, tracker, desc)
    report["curve"] += [{"step": e["step"], "kl": e["heldout_kl"]} for e in history.evals]
    report["train_loss"] = history.losses
    if config.half_baking:
        scale_adapter(model, config.half_baking_factor)
    model.eval()
    if held:
        _measure_baked(model, held, unbaked, positions, report)
    report["seconds"] = round(time.perf_counter() - started, 2)
    model.baking_report = report
    model.baking_heldout = held  # (pairs, teacher log-probs): re-measure after merging or scaling
    return model


def heldout_kl(model: nn.Module, tokenizer, prompt: str, inputs: Sequence[str | Sample], config: PromptBakingConfig,
               seed: int, teacher: nn.Module | None = None) -> dict[str, list]:
    """More held-out inputs for a bake that is still a peft model (adapter not merged): one trajectory each from the
    prompted teacher of the bake (``teacher``, default the model with the adapter off), and per input the summed
    KL(prompted ‖ unbaked), KL(prompted ‖ baked) and the compared positions, as ``baking_report["heldout"]`` holds
    them."""
    source = model if teacher is None else teacher.eval()
    with adapter_off(source):
        trajectories = sample_trajectories(source, tokenizer, prompt, list(inputs), len(inputs), config.temperature,
                                           config.max_new_tokens, seed)
    pairs = encode_pairs(tokenizer, prompt, trajectories, context_length(model, config))
    teacher = teacher_logprobs(source, pairs)  # adapter off
    unbaked, positions = prompt_kl_rows(model, pairs, teacher, adapter=False)
    baked, _ = prompt_kl_rows(model, pairs, teacher)
    return {"kl_unbaked": unbaked, "kl_baked": baked, "positions": positions}
