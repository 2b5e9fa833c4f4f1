"""QK-clip: keep every attention head's largest pre-softmax logit at or below tau.

The model interface (what an attention module must offer to be a QK-clip target):
- attributes ``q_proj`` and ``k_proj`` (``nn.Linear``; a bias, if present, is scaled with its rows),
  ``num_heads``, ``num_key_value_heads`` and ``head_dim`` (query head h uses rows
  [h*head_dim, (h+1)*head_dim) of q_proj and key/value head h // (num_heads // num_key_value_heads));
- after a forward pass, ``qk_max_logits``: a detached float tensor of shape (num_heads,) holding each
  head's largest pre-softmax logit q·k/sqrt(head_dim) (after RoPE, causal positions only) in that pass.
The Cognate model sets it natively. Hugging Face Llama-style models (LlamaAttention, Qwen2Attention, ...)
do not expose their logits: ``attach_qk_logit_monitor`` adds forward hooks that recompute them.

The rule (Kimi K2's): after a step, a head h with m_h > tau gets W_q rows scaled by sqrt(tau/m_h). Its
W_k rows get sqrt(tau/m_h) as well when h owns its key head (multi-head attention). With grouped-query
attention a key head is shared by several query heads: it is scaled by sqrt(tau/M_g), M_g the largest
m_h among the clipped heads of that group. Every clipped head then has logit <= tau (its factor is
sqrt(tau/m_h)*sqrt(tau/M_g) <= tau/m_h); the other heads of that group keep their W_q but their logits
shrink by sqrt(tau/M_g) through the shared keys. Heads of groups with no clipped head are not touched.
Written by hand: no maintained library implements QK-clip.
"""
from __future__ import annotations

import importlib
import math

import torch
from torch import nn

_INTERFACE = ("q_proj", "k_proj", "num_heads", "num_key_value_heads", "head_dim")


def find_qk_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that implements the QK-clip interface."""
    return [(name, m) for name, m in model.named_modules() if all(hasattr(m, a) for a in _INTERFACE)]


def _scale_rows_(linear: nn.Linear, rows: slice, factor: float) -> None:
    linear.weight[rows].mul_(factor)
    if linear.bias is not None:
        linear.bias[rows].mul_(factor)


@torch.no_grad()
def clip_attention_heads_(module: nn.Module, tau: float) -> list[dict]:
    """Apply QK-clip to one attention module; returns one record per clipped head.

    Also rescales the stored ``qk_max_logits`` to the values the new weights give for the same inputs,
    so a second call without a new forward pass does not clip again.
    """
    logits = getattr(module, "qk_max_logits", None)
    if logits is None:
        return []
    n_heads, n_kv, hd = module.num_heads, module.num_key_value_heads, module.head_dim
    if logits.shape != (n_heads,):
        raise ValueError(f"qk_max_logits must have shape ({n_heads},), got {tuple(logits.shape)}")
    group = n_heads // n_kv
    q_scale = torch.ones(n_heads, dtype=torch.float64)
    k_scale = torch.ones(n_kv, dtype=torch.float64)
    records = []
    for h, m in enumerate(logits.tolist()):
        if m > tau:
            q_scale[h] = math.sqrt(tau / m)
            k_scale[h // group] = min(k_scale[h // group].item(), math.sqrt(tau / m))
            records.append({"head": h, "max_logit": m})
    for h in torch.nonzero(q_scale < 1).flatten().tolist():
        _scale_rows_(module.q_proj, slice(h * hd, (h + 1) * hd), q_scale[h].item())
    for g in torch.nonzero(k_scale < 1).flatten().tolist():
        _scale_rows_(module.k_proj, slice(g * hd, (g + 1) * hd), k_scale[g].item())
    factor = q_scale * k_scale.repeat_interleave(group)  # (num_heads,)
    module.qk_max_logits = (logits.double() * factor.to(logits.device)).to(logits.dtype)
    for r in records:
        r.update(q_scale=q_scale[r["head"]].item(), k_scale=k_scale[r["head"] // group].item())
    return records


def qk_clip_(model: nn.Module, tau: float) -> list[dict]:
    """QK-clip every target module of ``model``; returns records {module, head, max_logit, q_scale, k_scale}."""
    records = []
    for name, module in find_qk_targets(model):
        records += [{"module": name, **r} for r in clip_attention_heads_(module, tau)]
    return records


def causal_max_logits(q: torch.Tensor, k: torch.Tensor, scaling: float,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head max of q·k*scaling over causal (and unmasked) positions.

    q: (B, H, T, D); k: (B, H, S, D) with the query positions the last T of the S key positions;
    attention_mask: optional 4-D mask broadcastable to (B, H, T, S), bool (True = attend) or additive
    float (0 = attend). Returns (H,).
    """
    t, s = q.shape[-2], k.shape[-2]
    logits = (q @ k.transpose(-1, -2)) * scaling  # (B, H, T, S)
    keep = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)  # (T, S)
    if attention_mask is not None and attention_mask.dim() == 4:
        m = attention_mask[..., -t:, -s:]
        keep = keep & (m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2)
    logits = logits.masked_fill(~keep, float("-inf"))
    return logits.transpose(0, 1).reshape(logits.shape[1], -1).amax(dim=1)  # (H,)


class QKLogitMonitor:
    """Handle returned by ``attach_qk_logit_monitor``: ``.modules`` are the hooked attention modules;
    ``.remove()`` detaches the hooks."""

    def __init__(self, modules: list[nn.Module], handles: list):
        self.modules = modules
        self._handles = handles

    def remove(self) -> None:
        """Detach every hook (the attributes already set stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _rotary_fn(module: nn.Module):
    """The modelling module's own ``apply_rotary_pos_emb`` (Llama's as the fallback)."""
    source = importlib.import_module(type(module).__module__)
    if hasattr(source, "apply_rotary_pos_emb"):
        return source.apply_rotary_pos_emb
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    return apply_rotary_pos_emb


def _active(training_only: bool) -> bool:
    """Whether a hook should record: always, or only in forwards with gradients (training)."""
    return not training_only or torch.is_grad_enabled()


def _make_hooks(module: nn.Module, training_only: bool):
    """(projection hook, attention hook): the first keeps q_proj/k_proj outputs of the current forward
    (so they are not computed twice), the second turns them into ``qk_max_logits``."""
    rotary = _rotary_fn(module)
    group = module.num_heads // module.num_key_value_heads
    scaling = getattr(module, "scaling", module.head_dim ** -0.5)
    stash: dict[str, tuple[nn.Module, torch.Tensor]] = {}

    def keep(name):
        def proj_hook(proj, args, output):
            if _active(training_only):
                stash[name] = (proj, output.detach())  # output: (B, T, heads * head_dim)
        return proj_hook

    def attn_hook(mod, args, kwargs, output):
        if _active(training_only):
            with torch.no_grad():
                mod.qk_max_logits = _max_logits(mod, args, kwargs, stash, rotary, group, scaling)
        stash.clear()
    return keep, attn_hook


def _max_logits(mod, args, kwargs, stash, rotary, group, scaling) -> torch.Tensor:
    """(num_heads,) max causal logits of one attention call, from its projections' outputs (recomputed
    from the hook's ``hidden_states`` if they were not seen) and the ``position_embeddings`` kwarg."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)  # (B, T, hidden)
    cos, sin = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
    shape = (*hidden.shape[:-1], -1, mod.head_dim)
    # Use a kept output only if it came from the module's current projection (a wrapper installed
    # later, e.g. a LoRA layer, changes the output; then recompute through the wrapper).
    q = stash["q"][1] if stash.get("q", (None,))[0] is mod.q_proj else mod.q_proj(hidden)
    k = stash["k"][1] if stash.get("k", (None,))[0] is mod.k_proj else mod.k_proj(hidden)
    q, k = q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2)  # (B, H, T, D), (B, KV, T, D)
    q, k = rotary(q, k, cos, sin)
    k = k.repeat_interleave(group, dim=1)  # (B, H, T, D): head h reads key head h // group
    return causal_max_logits(q.float(), k.float(), scaling, kwargs.get("attention_mask")).detach()


def attach_qk_logit_monitor(model: nn.Module, training_only: bool = True) -> QKLogitMonitor:
    """Make a Hugging Face Llama-style model a QK-clip target by hooking its attention modules.

    Each attention module (one with ``q_proj``, ``k_proj`` and a ``config`` holding
    ``num_attention_heads``) gets ``num_heads``, ``num_key_value_heads`` (and ``head_dim``) attributes and
    a forward hook (with kwargs) that takes q and k from the module's own projections (their outputs
    kept by hooks on ``q_proj``/``k_proj``, else recomputed from the hook's ``hidden_states``), applies
    the ``position_embeddings`` (cos, sin) kwarg with the model's ``apply_rotary_pos_emb``, and stores
    ``qk_max_logits``. Cost: RoPE on q and k again and a (B, H, T, T) logit tensor per layer. With
    ``training_only`` the hook does nothing when gradients are disabled (generation, evaluation), which
    also keeps it away from KV-cached decoding where the keys are not all in ``hidden_states``.
    Models with QK-norm (``q_norm``) are refused: scaling W_q does not change their normalized logits.
    """
    modules = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")
               and hasattr(getattr(m, "config", None), "num_attention_heads")]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no Llama-style attention module (q_proj, k_proj, config)")
    if any(hasattr(m, "q_norm") for m in modules):
        raise ValueError("attention with QK-norm (q_norm/k_norm) is not a QK-clip target")
    handles = []
    for m in modules:
        cfg = m.config
        m.num_heads = cfg.num_attention_heads
        m.num_key_value_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        if not hasattr(m, "head_dim"):
            m.head_dim = cfg.hidden_size // cfg.num_attention_heads
        keep, attn_hook = _make_hooks(m, training_only)
        handles += [m.q_proj.register_forward_hook(keep("q")), m.k_proj.register_forward_hook(keep("k")),
                    m.register_forward_hook(attn_hook, with_kwargs=True)]
    return QKLogitMonitor(modules, handles)
