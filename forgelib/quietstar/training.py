"""Training a Quiet-STaR model: the loss for ``forgelib.train`` (base + mixed + post-thought NLL, REINFORCE on the
thoughts; see ``forgelib.quietstar.model``) and the optimizer with the thought embeddings' own learning rate."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..data.tokenizer import IGNORE_INDEX
from .model import QuietStarModel


def quietstar_optimizer(model: QuietStarModel, **overrides):
    """The Phase-3 MuGrokfast preset (``overrides`` applied) for ``model``, with the thought embeddings in an
    AdamW group of their own at ``embedding_grad_scale`` × the learning rate (see that field)."""
    from ..optim import create_optimizer_from_phase

    optimizer = create_optimizer_from_phase(model, phase_num=3, **overrides)
    emb = model.thought_embeddings
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if p is not emb]
        if len(kept) != len(group["params"]):
            group["params"] = kept
            template = group
    extra = {k: v for k, v in template.items() if k != "params"}
    optimizer.param_groups = [g for g in optimizer.param_groups if g["params"]]
    optimizer.add_param_group({**extra, "params": [emb], "lr": extra["lr"] * model.qconfig.embedding_grad_scale})
    return optimizer


# --- training loss --------------------------------------------------------------------------------------


def future_targets(labels: torch.Tensor, n_true: int) -> torch.Tensor:
    """(B, T, n_true) with [b, t, i] = labels[b, t+1+i] (IGNORE_INDEX past the end)."""
    B, T = labels.shape
    padded = torch.cat([labels, labels.new_full((B, n_true), IGNORE_INDEX)], 1)
    return torch.stack([padded[:, 1 + i:T + 1 + i] for i in range(n_true)], -1)


def thinking_positions(needed: torch.Tensor, real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``needed`` (B, T) bool -> (positions (B, Q), keep (B, Q)): each row's needed positions in order, padded with
    the row's first real token (``real`` (B, T), the attention mask; default position 0; ``keep`` False) to the
    longest row's count Q (at least 1). Thoughts are independent of one another
    (each sees the real tokens up to its position and itself), so thinking only where a loss term counts computes
    the same terms as thinking everywhere, at Q / T of the cost (the prompt of a chat-framed question is most of it)."""
    counts = needed.sum(1)
    Q = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.argsort((~needed).to(torch.int8), dim=1, stable=True)[:, :Q]  # needed positions first, in order
    keep = torch.arange(Q, device=needed.device)[None, :] < counts[:, None]
    first = real.long().argmax(1, keepdim=True) if real is not None else torch.zeros_like(counts)[:, None]
    return torch.where(keep, order, first), keep


def loss_labels(cfg, batch: dict) -> torch.Tensor:
    """The labels the loss counts: the batch's (``think_at: answer``), or every real token (``think_at: all``)."""
    if cfg.think_at != "all":
        return batch["labels"]
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    return ids.masked_fill((mask if mask is not None else torch.ones_like(ids)) == 0, IGNORE_INDEX)


def loss_positions(cfg, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels, future targets (B, T, n_true), thinking positions (B, Q), keep (B, Q)) of one ``quietstar_loss`` step:
    a position thinks when one of its next n_true targets counts."""
    labels = loss_labels(cfg, batch)
    future = future_targets(labels, cfg.n_true)
    positions, keep = thinking_positions((future != IGNORE_INDEX).any(-1), batch.get("attention_mask"))
    return labels, future, positions, keep


def step_forward_tokens(cfg, batch: dict, n_passes: int | None = None) -> int:
    """Forward tokens of one ``quietstar_loss`` step on ``batch`` (what a hook on the base model counts): per pass,
    the base pass over B·T tokens, then n_thought + 1 + n_true steps over the B·Q thinking positions."""
    positions = loss_positions(cfg, batch)[2]
    B, T = batch["input_ids"].shape
    passes = cfg.n_passes if n_passes is None else n_passes
    return passes * B * (T + positions.shape[1] * (cfg.n_thought + 1 + cfg.n_true))


def quietstar_loss(model: QuietStarModel, batch: dict, kl: Callable | None = None,
                   noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The Quiet-STaR training loss for ``forgelib.train`` (``loss_fn=partial(quietstar_loss, kl=...)``).

    batch: input_ids, attention_mask, labels (answer-only labels mark the answer positions). ``kl(logits,
    input_ids, attention_mask)`` (a ``ReferenceKL``) regularizes the base logits toward the start model.
    Returns (loss, extras: base_nll, mixed_nll, thought_nll, gain (base − mixed NLL on the same tokens), mix_weight, rl,
    kl).
    """
    cfg = model.qconfig
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    labels, future, positions, keep = loss_positions(cfg, batch)  # positions (B, Q): only where a target counts
    P = cfg.n_passes
    B, T = ids.shape
    if noise is not None and noise.shape[1] == T:  # noise drawn for every position: the thinking ones' rows
        rows = positions.repeat_interleave(P, 0)
        noise = noise.gather(1, rows[:, :, None, None].expand(-1, -1, *noise.shape[2:]))
    th = model.think(ids, mask, positions=positions, n_passes=P, temperature=cfg.temperature, noise=noise)
    targets = future.gather(1, positions[..., None].expand(-1, -1, cfg.n_true))
    targets = targets.masked_fill(~keep[..., None], IGNORE_INDEX).repeat_interleave(P, 0)  # (B', Q, n_true)
    valid = targets != IGNORE_INDEX
    safe = targets.clamp(min=0)
    V = th.mixed_logits.shape[-1]
    mixed_nll = F.cross_entropy(th.mixed_logits.reshape(-1, V), safe.reshape(-1), reduction="none").view_as(safe)
    n_valid = valid.sum().clamp(min=1)
    mixed_loss = (mixed_nll * valid).sum() / n_valid
    base = th.base_logits[::P]  # (B, T, V): the passes share the base pass
    base_nll = F.cross_entropy(base[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        base_tok = F.cross_entropy(th.base_future_logits.float().reshape(-1, V), safe.reshape(-1),
                                   reduction="none").view_as(safe)
        gain = ((base_tok - mixed_nll.detach()) * valid).sum() / n_valid
    thought_nll = F.cross_entropy(th.thought_logits.float().reshape(-1, V), safe.reshape(-1),
                                  reduction="none").view_as(safe)  # (B', Q, n_true)
    thought_loss = (thought_nll * valid).sum() / n_valid
    loss = cfg.base_loss_weight * base_nll + mixed_loss + cfg.thought_loss_weight * thought_loss
    rl = torch.zeros((), device=ids.device)
    if cfg.thought_mode == "sample" and cfg.reinforce_weight > 0 and P > 1:
        if cfg.reward == "mixed":
            token_ll = -mixed_nll.detach()
        else:
            token_ll = -thought_nll.detach()
        rl = reinforce_term((token_ll * valid).sum(-1), th.logprob, valid[..., 0], P)
        loss = loss + cfg.reinforce_weight * rl
    kl_value = torch.zeros((), device=ids.device)
    if kl is not None:
        kl_value = kl(base, ids, mask)
        loss = loss + kl_value
    weight_mean = float((th.weights.detach() * valid).sum() / n_valid)
    return loss, {"base_nll": float(base_nll.detach()), "mixed_nll": float(mixed_loss.detach()),
                  "thought_nll": float(thought_loss.detach()),
                  "gain": float(gain), "mix_weight": weight_mean, "rl": float(rl.detach()),
                  "kl": float(kl_value.detach())}



def reinforce_term(reward: torch.Tensor, logprob: torch.Tensor, thinks: torch.Tensor, n_passes: int) -> torch.Tensor:
    """REINFORCE with the mean-over-passes baseline, positive advantages only.

    reward, logprob, thinks: (B·n_passes, Q) -- row b·n_passes + p is pass p of row b; ``thinks`` marks the
    positions that count. Returns ``-Σ max(0, r − mean_p r) · log π / #thinking positions`` (rewards detached),
    whose gradient raises the log-probability of every thought that beat its position's mean."""
    BP, Q = reward.shape
    grouped = reward.detach().view(BP // n_passes, n_passes, Q)
    advantage = (grouped - grouped.mean(1, keepdim=True)).view(BP, Q).clamp(min=0)
    thinks = thinks.float()
    return -(advantage * thinks * logprob).sum() / thinks.sum().clamp(min=1)
