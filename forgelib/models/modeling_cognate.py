"""Cognate: a LLaMA-style decoder with TRM recursion, deep supervision, ACT halting and Titans memory (MAG).

Parameter names equal ``transformers.LlamaForCausalLM``'s (``model.embed_tokens``, ``model.layers.{i}.self_attn.
{q,k,v,o}_proj``, ``model.layers.{i}.mlp.{gate,up,down}_proj``, the two layer norms, ``model.norm``,
``lm_head``), so Llama weights load directly; the extra parameters are ``model.halt_head`` (ACT) and
``model.layers.{i}.self_attn.memory.*`` (Titans memory).

Recursion (one shared block stack ``net`` = the layers): x is the embedded input, y starts as x and z as zeros
(no learned initial states: with ``n_latent=0, n_cycles=1`` the model is then exactly ``y = net(x)``, a plain
transformer). One cycle: ``for i in range(n_latent): z = net(z + y + x)`` then ``y = net(y + z)``. Logits come
from ``lm_head(norm(y))``. Call ``j`` of the stack uses cache layers ``j * num_hidden_layers + l``.

``recursion="trm"`` (opt-in; the default "cycles" is the above) runs TRM's outer loop: supervision steps over a
detached carry, cycles without gradient, the halting head read after each step (``forgelib.models.trm`` says what
TRM does and what differs here).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.utils import ModelOutput

from .cache import CognateCache, CognateCacheError, ensure_cache_layers
from .configuration_cognate import CognateConfig, CognateConfigError
from .memory import BiasInitLinear, CognateMemory, binary_entropy
from .trm import TRMCarry, TRMStep, step_losses, supervision_steps

# transformers 5.x renamed the cache field of the outputs from `past_key_values` to `cache`; follow the installed one.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# Keyword arguments that generate / trainers may pass and that Cognate does not use.
IGNORED_FORWARD_KWARGS = ("output_attentions", "num_items_in_batch", "cache_position", "token_type_ids")
# Above this many score entries the QK-max reduction runs in query blocks (bounds its extra memory).
QK_TRACK_BLOCK_ELEMENTS = 1 << 24


def cycle_loss_weights(name: str, n_cycles: int, device=None) -> torch.Tensor:
    """Deep-supervision weights of the cycles' losses, summing to 1 (cycle c is 1-based).

    "linear": c / (1 + 2 + ... + T) (later cycles weigh more); "uniform": 1 / T; "last": only the final cycle."""
    cycles = torch.arange(1, n_cycles + 1, dtype=torch.float32, device=device)
    if name == "linear":
        weights = cycles
    elif name == "uniform":
        weights = torch.ones_like(cycles)
    elif name == "last":
        weights = (cycles == n_cycles).float()
    else:
        raise CognateConfigError(f"cycle_loss_weighting must be one of linear, uniform, last; got {name!r}")
    return weights / weights.sum()


@dataclass
class CognateModelOutput(ModelOutput):
    """Output of ``CognateModel``.

    last_hidden_state: normalised final answer state (B, T, D); cache: the cache (or None);
    hidden_states: (x, outputs of the last stack call's layers, normalised final y) when asked for;
    cycle_states: normalised y after each cycle (when collected); halt_logits: (B, T, cycles) or None;
    act_cycles: (B, T) cycles used per token (first cycle whose halting probability reaches the threshold, else
    all cycles); gate_entropy: mean binary entropy of the memory gates (scalar) or None.
    recursion="trm": cycle_states and halt_logits are per supervision step, act_cycles counts supervision steps,
    step_active: per step the (B, T) tokens it updated (not halted before it); trm_carry: the detached carry."""

    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple | None = None
    cycle_states: tuple | None = None
    halt_logits: torch.Tensor | None = None
    act_cycles: torch.Tensor | None = None
    gate_entropy: torch.Tensor | None = None
    step_active: tuple | None = None
    trm_carry: TRMCarry | None = None


@dataclass
class CognateCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the Cognate diagnostics (all detached except ``loss``).

    cycle_losses: cross-entropy of each cycle (cycles,); lm_loss: their weighted sum; act_loss: halting BCE;
    act_cycles: (B, T); act_cycles_mean: scalar; gate_entropy: scalar or None. recursion="trm": per supervision
    step instead of per cycle; trm_carry: the carry to continue from (``forgelib.supervision``)."""

    cycle_losses: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    act_loss: torch.Tensor | None = None
    act_cycles: torch.Tensor | None = None
    act_cycles_mean: torch.Tensor | None = None
    gate_entropy: torch.Tensor | None = None
    trm_carry: TRMCarry | None = None


class _ForwardContext:
    """Everything one top-level forward shares with its layers: rotary tables, cache, masks, switches, stats."""

    def __init__(self, *, cos, sin, cache, past, q_len, real, sliding_window, num_layers, use_memory, track_qk,
                 custom=None, stable_memory=False):
        self.cos, self.sin, self.cache, self.past, self.q_len = cos, sin, cache, past, q_len
        self.custom = custom  # (B|1, 1, T, past + T) bool: a caller's 4-D mask, used as is (or None)
        self.real = real  # (B, past + T) bool (False = padding) or None
        self.real_new = None if real is None else real[:, past:]  # (B, T)
        self.sliding_window, self.num_layers = sliding_window, num_layers
        self.use_memory, self.track_qk, self.stable_memory = use_memory, track_qk, stable_memory
        self.gate_entropy_sum, self.gate_count = 0.0, 0
        self.layer_outputs: list | None = None
        self._masks: dict = {}

    def masks(self, kv_len: int):
        """(sdpa_mask or None, is_causal, allowed) for keys of length kv_len; allowed is bool (B|1, 1, T, kv_len)
        and marks the (real query, visible key) pairs, the positions QK tracking looks at.

        Keys are the last kv_len positions of the sequence so far (a sliding cache layer keeps only a window)."""
        if kv_len not in self._masks:
            self._masks[kv_len] = self._build_masks(kv_len)
        return self._masks[kv_len]

    def _build_masks(self, kv_len: int):
        if self.custom is not None:
            if kv_len != self.custom.shape[-1]:
                raise ValueError(f"the 4-D attention_mask covers {self.custom.shape[-1]} keys but the cache holds "
                                 f"{kv_len}")
            return self.custom, False, self.custom
        device = self.cos.device
        q_pos = self.past + torch.arange(self.q_len, device=device)  # (T,)
        k_pos = self.past + self.q_len - kv_len + torch.arange(kv_len, device=device)  # (Tk,)
        allowed = k_pos[None, :] <= q_pos[:, None]  # (T, Tk) causal
        if self.sliding_window is not None:
            allowed = allowed & (q_pos[:, None] - k_pos[None, :] < self.sliding_window)
        allowed = allowed[None, None]  # (1, 1, T, Tk)
        if self.real is not None:
            # Padded keys are hidden; a padded query sees only itself so that no softmax row is empty.
            own = (k_pos[None, :] == q_pos[:, None])[None, None]
            allowed = allowed & (self.real[:, None, None, k_pos] | own)  # (B, 1, T, Tk)
            real_pairs = allowed & self.real_new[:, None, :, None]  # QK tracking ignores padded queries
            return allowed, False, real_pairs
        if self.sliding_window is None and kv_len == self.q_len:
            return None, True, allowed
        if self.q_len == 1 and (self.sliding_window is None or kv_len <= self.sliding_window):
            return None, False, allowed
        return allowed, False, allowed

    def additive_bias(self, kv_len: int, groups: int, dtype) -> torch.Tensor:
        """The batch-shared mask as an additive bias (0 / -inf), repeated for ``groups`` query heads: (G*T, Tk)."""
        key = ("bias", kv_len, groups, dtype)
        if key not in self._masks:
            allowed = self.masks(kv_len)[2][0, 0]  # (T, Tk)
            bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))
            self._masks[key] = bias.repeat(groups, 1)
        return self._masks[key]

    def memory_state(self, vidx: int):
        """The memory state of virtual layer vidx carried by the cache (None = empty memory)."""
        return self.cache.memory.get(vidx) if isinstance(self.cache, CognateCache) else None

    def store_memory(self, vidx: int, state) -> None:
        if isinstance(self.cache, CognateCache):
            self.cache.memory[vidx] = state

    def add_gate(self, g: torch.Tensor) -> None:
        with torch.no_grad():
            self.gate_entropy_sum = self.gate_entropy_sum + binary_entropy(g.float()).sum()
            self.gate_count += g.numel()

    def gate_entropy(self):
        return None if self.gate_count == 0 else (self.gate_entropy_sum / self.gate_count).detach()


class CognateMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config: CognateConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CognateAttention(nn.Module):
    """Grouped-query causal self-attention with RoPE (optionally sliding-window) and the optional Titans memory.

    QK-clip interface: ``q_proj``, ``k_proj``, ``num_heads``, ``num_key_value_heads``, ``head_dim`` and, after
    each forward of the whole model, ``qk_max_logits``: (num_heads,) float tensor with each head's largest
    pre-softmax logit (after RoPE, over allowed positions, max over all recursion calls), or None when
    ``track_qk_logits`` is off."""

    def __init__(self, config: CognateConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        hidden, inner = config.hidden_size, self.num_heads * self.head_dim
        kv_inner = self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.k_proj = nn.Linear(hidden, kv_inner, bias=False)
        self.v_proj = nn.Linear(hidden, kv_inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden, bias=False)
        self.memory = (CognateMemory(hidden, self.num_heads, self.head_dim, config.memory_chunk_size)
                       if config.memory_modules else None)
        self.qk_max_logits: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, ctx: _ForwardContext, call_idx: int) -> torch.Tensor:
        B, T, _ = hidden.shape
        q = self.q_proj(hidden).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(hidden).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        v = self.v_proj(hidden).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        q_rot, k_rot = apply_rotary_pos_emb(q, k, ctx.cos, ctx.sin)
        vidx = call_idx * ctx.num_layers + self.layer_idx
        k_all, v_all = (k_rot, v) if ctx.cache is None else ctx.cache.update(k_rot, v, vidx)  # (B, Hkv, Tk, d)
        sdpa_mask, is_causal, allowed = ctx.masks(k_all.shape[-2])
        out = self._sdpa(q_rot, k_all, v_all, sdpa_mask, is_causal)  # (B, H, T, d)
        if ctx.track_qk:
            self._track_qk(q_rot, k_all, allowed, ctx)
        out = out.transpose(1, 2)  # (B, T, H, d)
        if ctx.use_memory and self.memory is not None:
            out = self._blend_memory(hidden, out, q, k, v, ctx, vidx)
        return self.o_proj(out.reshape(B, T, -1))

    def _sdpa(self, q, k, v, mask, is_causal: bool) -> torch.Tensor:
        """torch SDPA; grouped heads are passed natively only without a mask (with a mask the fused CUDA kernels
        lack GQA support and torch would fall back to the slow math kernel), else the keys are expanded."""
        groups = self.num_key_value_groups
        if groups > 1 and mask is not None:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, Tk, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scaling,
                                              enable_gqa=groups > 1 and mask is None)

    def _blend_memory(self, hidden, attn, q, k, v, ctx: _ForwardContext, vidx: int) -> torch.Tensor:
        # The memory runs in float32, autocast off (why: products of many decays and the rank-1 updates lose too
        # much in bf16, and the carried state must not drift between cached and uncached runs).
        k_h = k.repeat_interleave(self.num_key_value_groups, dim=1).float()  # (B, H, T, d)
        v_h = v.repeat_interleave(self.num_key_value_groups, dim=1).float()  # (B, H, T, d)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            out, state, g = self.memory(hidden.float(), attn.float(), q.float(), k_h, v_h,
                                        ctx.memory_state(vidx), ctx.real_new, stable=ctx.stable_memory)
        ctx.store_memory(vidx, state)
        ctx.add_gate(g)
        return out.to(attn.dtype)

    @torch.no_grad()
    def _track_qk(self, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, ctx: _ForwardContext) -> None:
        """Running max over calls of each head's largest allowed logit q.k/sqrt(d) (an extra matmul, no grad).

        Query heads are grouped under their key head (no key copies with GQA); a mask shared by the batch is
        fused into the matmul as an additive bias; the scale is applied to the (H,) maxima only (max commutes
        with a positive factor); very large score tensors are processed in slices of the batch x head axis."""
        B, H, T, d = q.shape
        Hkv, Tk, G = k.shape[1], k.shape[-2], self.num_key_value_groups
        q3 = q.reshape(B * Hkv, G * T, d)  # rows of head h = kv * G + g
        k3 = k.reshape(B * Hkv, Tk, d).transpose(1, 2)  # (B*Hkv, d, Tk)
        shared = allowed.shape[0] == 1
        bias = ctx.additive_bias(Tk, G, q.dtype) if shared else None  # (G*T, Tk)
        step = max(1, QK_TRACK_BLOCK_ELEMENTS // max(1, G * T * Tk))
        row_max = []
        for start in range(0, B * Hkv, step):
            if shared:
                scores = torch.baddbmm(bias, q3[start:start + step], k3[start:start + step])  # (n, G*T, Tk)
            else:
                batch = torch.arange(start, min(start + step, B * Hkv), device=q.device) // Hkv
                scores = torch.bmm(q3[start:start + step], k3[start:start + step]).view(-1, G, T, Tk)
                scores = scores.masked_fill_(~allowed[batch], float("-inf"))  # allowed[batch]: (n, 1, T, Tk)
            row_max.append(scores.amax(dim=-1).reshape(-1, G * T))  # (n, G*T)
        head_max = torch.cat(row_max).view(B, Hkv, G, T).amax(dim=(0, 3)).reshape(H).float() * self.scaling
        self.qk_max_logits = head_max if self.qk_max_logits is None else torch.maximum(self.qk_max_logits, head_max)


class CognateDecoderLayer(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, config: CognateConfig, layer_idx: int):
        super().__init__()
        self.self_attn = CognateAttention(config, layer_idx)
        self.mlp = CognateMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, ctx: _ForwardContext, call_idx: int) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), ctx, call_idx)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class CognateHaltHead(BiasInitLinear):
    """ACT halting head: one logit per token from the normalised answer state; its bias starts strongly negative
    (``halt_bias_init``, -5 by default) so that ACT starts at 'never halt' instead of collapsing to the minimum."""

    def __init__(self, hidden_size: int, bias_init: float):
        super().__init__(hidden_size, 1, bias_init)


class CognatePreTrainedModel(PreTrainedModel):
    """Shared set-up of the Cognate models (config class, init, capabilities)."""

    config: CognateConfig
    config_class = CognateConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["CognateDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        """Llama's init; Linears that carry a ``bias_init`` (halting head, memory rates and gate) start their bias
        there (values and reasons in memory.py and CognateConfig.halt_bias_init)."""
        super()._init_weights(module)
        if isinstance(module, BiasInitLinear):
            init.constant_(module.bias, module.bias_init)


@dataclass
class _Recursion:
    """The recursion and switches of one forward (config values, possibly overridden at call time)."""

    n_latent: int
    n_cycles: int
    use_memory: bool
    freeze: bool  # ACT per-token freezing
    collect: bool  # keep every cycle's state (deep supervision)
    trm: bool = False  # recursion="trm": supervision steps over a detached carry
    n_sup: int = 1  # supervision steps of this call (trm)
    grad_last: bool = False  # trm: the first n_cycles - 1 cycles of each step without gradient

    @property
    def calls(self) -> int:
        """Applications of the block stack in this forward (one cache layer set each)."""
        return self.n_sup * self.n_cycles * (self.n_latent + 1)

    @property
    def signature(self) -> tuple:
        """What a cache filled by this recursion is tied to (the cycles mode keeps its original triple)."""
        base = (self.n_latent, self.n_cycles, self.use_memory)
        return base + (("trm", self.n_sup, self.grad_last),) if self.trm else base


class CognateModel(CognatePreTrainedModel):
    """Embedding, the shared block stack applied recursively, final norm and the ACT halting head."""

    def __init__(self, config: CognateConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([CognateDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.halt_head = CognateHaltHead(config.hidden_size, config.halt_bias_init) if config.use_act else None
        self.last_act_cycles: torch.Tensor | None = None
        self.last_gate_entropy: torch.Tensor | None = None
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def attention_modules(self) -> list[CognateAttention]:
        """The attention module of every layer (for QK-clip)."""
        return [layer.self_attn for layer in self.layers]

    def resolve_recursion(self, n_cycles=None, n_latent=None, use_memory=None, act_freeze=None,
                          collect=False, supervision_steps=None) -> _Recursion:
        """Config values overridden by the call's arguments, checked."""
        cfg = self.config
        n_cycles = cfg.n_cycles if n_cycles is None else int(n_cycles)
        n_latent = cfg.n_latent if n_latent is None else int(n_latent)
        use_memory = cfg.use_memory if use_memory is None else bool(use_memory)
        if n_cycles < 1:
            raise CognateConfigError(f"n_cycles must be >= 1, got {n_cycles}")
        if n_latent < 0:
            raise CognateConfigError(f"n_latent must be >= 0, got {n_latent}")
        if use_memory and not cfg.memory_modules:
            raise CognateConfigError("use_memory=True but this model was built without memory_modules")
        freeze = True if act_freeze is None else bool(act_freeze)  # train and infer the same way
        rec = _Recursion(n_latent, n_cycles, use_memory, freeze and self.halt_head is not None, collect)
        if cfg.recursion != "trm":
            if supervision_steps is not None:
                raise CognateConfigError("supervision_steps is a setting of recursion='trm'; this model runs "
                                         f"recursion={cfg.recursion!r}")
            return rec
        n_sup = cfg.supervision_steps if supervision_steps is None else int(supervision_steps)
        if n_sup < 1 or n_latent < 1:
            raise CognateConfigError(f"recursion='trm' needs supervision_steps >= 1 and n_latent >= 1, got "
                                     f"{n_sup} and {n_latent}")
        rec.trm, rec.n_sup, rec.grad_last = True, n_sup, cfg.grad_last_cycle_only
        return rec

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, n_cycles=None, n_latent=None, use_memory=None, act_freeze=None,
                collect_cycles: bool = False, output_hidden_states: bool | None = None, supervision_steps=None,
                trm_carry: TRMCarry | None = None) -> CognateModelOutput:
        """Run the recursion. ``n_cycles``/``n_latent``/``use_memory`` (and, with recursion="trm",
        ``supervision_steps``) override the config for this call; ``act_freeze`` (default True, in training and
        inference alike) freezes halted tokens; ``collect_cycles`` keeps every cycle's (trm: step's) normalised
        state for deep supervision; ``trm_carry`` continues TRM's supervision steps from a carry (no cache).
        ``attention_mask`` is a 2-D padding mask, or a 4-D mask (B|1, 1, T, past + T) used as is (bool True or
        additive 0 = visible)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        rec = self.resolve_recursion(n_cycles, n_latent, use_memory, act_freeze, collect_cycles, supervision_steps)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        if use_cache is None:  # by default no cache while training (it would only cost time)
            use_cache = self.config.use_cache and not self.training
        if trm_carry is not None and (not rec.trm or use_cache or cache is not None):
            raise CognateConfigError("trm_carry needs recursion='trm' and no cache (use_cache=False)")
        cache = self._prepare_cache(cache, bool(use_cache) or cache is not None, rec)
        ctx = self._context(x, attention_mask, position_ids, cache, rec)
        for attn in self.attention_modules():
            attn.qk_max_logits = None
        if output_hidden_states:
            ctx.layer_outputs = []
        if rec.trm:
            return self._forward_trm(x, ctx, rec, trm_carry, output_hidden_states)
        y, states, halt_logits, act_cycles = self._recurse(x, ctx, rec)
        final = states[-1] if rec.collect else self.norm(y)  # (B, T, D)
        hidden_states = None
        if output_hidden_states:
            hidden_states = (x, *ctx.layer_outputs[:-1], final)
        self.last_act_cycles, self.last_gate_entropy = act_cycles.detach(), ctx.gate_entropy()
        return CognateModelOutput(
            last_hidden_state=final, cache=cache, hidden_states=hidden_states,
            cycle_states=tuple(states) if rec.collect else None,
            halt_logits=torch.stack(halt_logits, dim=-1) if halt_logits else None,
            act_cycles=act_cycles, gate_entropy=ctx.gate_entropy())

    def _forward_trm(self, x, ctx: _ForwardContext, rec: _Recursion, carry: TRMCarry | None,
                     output_hidden_states) -> CognateModelOutput:
        """recursion="trm": ``rec.n_sup`` supervision steps from ``carry`` (a new one: y = x, z = 0)."""
        carry = (carry or TRMCarry(rec.n_sup)).started(x, self.config.halt_exploration_prob, self.training)
        steps, carry = supervision_steps(
            lambda h, call: self._net(h, ctx, call), self.norm, self.halt_head, x, carry, rec.n_sup,
            n_latent=rec.n_latent, n_cycles=rec.n_cycles, grad_last_only=rec.grad_last,
            threshold=self.config.halt_threshold, freeze=rec.freeze)
        final = steps[-1].state  # (B, T, D); halted tokens kept their state
        hidden_states = (x, *ctx.layer_outputs[:-1], final) if output_hidden_states else None
        self.last_act_cycles, self.last_gate_entropy = carry.used, ctx.gate_entropy()
        halts = [s.halt_logits for s in steps if s.halt_logits is not None]
        return CognateModelOutput(
            last_hidden_state=final, cache=ctx.cache, hidden_states=hidden_states,
            cycle_states=tuple(s.state for s in steps) if rec.collect else None,
            halt_logits=torch.stack(halts, dim=-1) if halts else None, act_cycles=carry.used,
            gate_entropy=ctx.gate_entropy(), step_active=tuple(s.active for s in steps), trm_carry=carry)

    def _prepare_cache(self, cache, wanted: bool, rec: _Recursion):
        """A CognateCache when caching is wanted; a passed cache gets one layer per virtual layer."""
        if not wanted:
            return None
        if cache is None:
            cache = CognateCache(self.config)
        if not isinstance(cache, DynamicCache):
            raise CognateCacheError(f"Cognate needs a DynamicCache/CognateCache, got {type(cache).__name__}")
        if rec.use_memory and not isinstance(cache, CognateCache):
            raise CognateCacheError("memory states need a CognateCache (pass CognateCache(model.config))")
        if isinstance(cache, CognateCache):
            cache.check_signature(rec.signature)
        ensure_cache_layers(cache, rec.calls * self.config.num_hidden_layers, self.config.sliding_window)
        return cache

    def _context(self, x, attention_mask, position_ids, cache, rec: _Recursion) -> _ForwardContext:
        B, T, _ = x.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (past + torch.arange(T, device=x.device)).unsqueeze(0)  # (1, T)
        real = custom = None
        if attention_mask is not None and attention_mask.dim() == 4:
            custom = self._custom_mask(attention_mask, B, past + T, T, rec)
        elif attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask must be a 2-D padding mask of shape (batch, past + new tokens) = "
                                 f"{(B, past + T)}, got {tuple(attention_mask.shape)}")
            real = attention_mask.bool()
            if bool(real.all()):
                real = None  # no padding: the fast causal path applies
        cos, sin = self.rotary_emb(x, position_ids)  # (B|1, T, d) each
        return _ForwardContext(cos=cos, sin=sin, cache=cache, past=past, q_len=T, real=real,
                               sliding_window=self.config.sliding_window, num_layers=len(self.layers),
                               use_memory=rec.use_memory, custom=custom,
                               stable_memory=self.config.memory_step == "stable",
                               track_qk=self.config.track_qk_logits and (self.training or torch.is_grad_enabled()))

    def _custom_mask(self, mask: torch.Tensor, batch: int, kv_len: int, q_len: int, rec: _Recursion) -> torch.Tensor:
        """A caller's 4-D mask (B|1, 1, T, past + T): bool (True = visible) or additive float (0 = visible), used as
        is instead of the causal/padding mask (parallel thoughts build one; see forgelib.quietstar). The Titans
        memory (a chunked recurrence over the sequence order) and a sliding window have no meaning under an
        arbitrary mask, so they are refused."""
        if mask.shape[0] not in (1, batch) or mask.shape[1] != 1 or mask.shape[2:] != (q_len, kv_len):
            raise ValueError(f"a 4-D attention_mask must have shape (batch or 1, 1, new tokens, past + new tokens) = "
                             f"({batch}, 1, {q_len}, {kv_len}), got {tuple(mask.shape)}")
        if rec.use_memory:
            raise CognateConfigError("a 4-D attention_mask cannot be used with use_memory=True (the memory is a "
                                     "recurrence over the sequence order); run with use_memory=False")
        if self.config.sliding_window is not None:
            raise CognateConfigError("a 4-D attention_mask cannot be combined with sliding_window")
        return mask if mask.dtype == torch.bool else mask == 0

    def _net(self, hidden: torch.Tensor, ctx: _ForwardContext, call_idx: int) -> torch.Tensor:
        """One application of the shared block stack (call_idx picks the virtual cache layers)."""
        if ctx.layer_outputs is not None:
            ctx.layer_outputs.clear()
        for layer in self.layers:
            hidden = layer(hidden, ctx, call_idx)
            if ctx.layer_outputs is not None:
                ctx.layer_outputs.append(hidden)
        return hidden

    def _recurse(self, x: torch.Tensor, ctx: _ForwardContext, rec: _Recursion):
        """The TRM cycles with ACT bookkeeping. Returns y, per-cycle normalised states, per-cycle halt logits
        and the cycles used per token (B, T)."""
        y, z, call = x, None, 0
        reached = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)  # (B, T) halting passed
        act_cycles = torch.full(x.shape[:2], rec.n_cycles, dtype=torch.long, device=x.device)  # (B, T)
        states, halt_logits = [], []
        for cycle in range(rec.n_cycles):
            frozen = reached if (rec.freeze and cycle > 0) else None  # (B, T) or None
            for _ in range(rec.n_latent):
                z_new = self._net(y + x if z is None else z + y + x, ctx, call)
                z = z_new if frozen is None else torch.where(frozen[..., None], z, z_new)
                call += 1
            y_new = self._net(y if z is None else y + z, ctx, call)
            y = y_new if frozen is None else torch.where(frozen[..., None], y, y_new)
            call += 1
            if not (rec.collect or self.halt_head is not None):
                continue
            y_norm = self.norm(y)  # (B, T, D)
            if rec.collect:
                states.append(y_norm)
            if self.halt_head is not None:
                logit = self.halt_head(y_norm).squeeze(-1)  # (B, T)
                halt_logits.append(logit)
                newly = (torch.sigmoid(logit.detach()) >= self.config.halt_threshold) & ~reached
                act_cycles = torch.where(newly, cycle + 1, act_cycles)
                reached = reached | newly
        return y, states, halt_logits, act_cycles


def _halt_targets(labels: torch.Tensor, input_ids, attention_mask) -> torch.Tensor:
    """The next-token targets the halting head learns from: the labels where given, else the input token itself
    (prompt tokens under an answer-only loss), padding excluded. Halting freezes a prompt token's state as well
    as a written one's; trained on labelled tokens only, the head halted untrained prompt tokens after the first
    cycle (measured: 1-layer model trained at T=4 on arith/multistep/modular/algebra levels 1-3, 0.20 accuracy at
    every test-time T with halting vs 0.47 at T=4 without)."""
    if input_ids is None:
        return labels
    filled = torch.where(labels != -100, labels, input_ids.to(labels.device))
    if attention_mask is not None:
        filled = filled.masked_fill(attention_mask.to(labels.device) == 0, -100)
    return filled


class CognateForCausalLM(CognatePreTrainedModel, GenerationMixin):
    """Cognate with the language-model head, deep-supervised loss, ACT loss and generation support."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CognateConfig):
        super().__init__(config)
        self.model = CognateModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def attention_modules(self) -> list[CognateAttention]:
        """The attention module of every layer (QK-clip reads ``qk_max_logits`` and rescales q_proj/k_proj)."""
        return self.model.attention_modules()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, n_cycles=None, n_latent=None, use_memory=None,
                act_freeze=None, output_hidden_states=None, return_dict=None, past_key_values=None,
                supervision_steps=None, trm_carry=None, **kwargs) -> CognateCausalLMOutput:
        """Causal-LM forward.

        labels: (B, T) token ids (-100 = ignored), shifted inside as in transformers. With labels, the loss is
        the deep-supervision weighted sum of every cycle's cross-entropy plus ``act_loss_weight`` times the
        halting BCE. ``n_cycles``, ``n_latent``, ``use_memory`` override the config for this call (the benchmark
        measures test-time cycles this way); ``act_freeze=False`` turns per-token freezing off (default: on, in training
        as in inference).
        recursion="trm": the loss is the mean over supervision steps of each step's cross-entropy plus
        ``act_loss_weight`` times its halting BCE (``forgelib.models.trm.step_losses``); ``supervision_steps``
        overrides the config's; ``trm_carry`` continues from an earlier call's ``trm_carry`` (one supervision step
        per optimizer step: ``forgelib.supervision``).
        ``past_key_values`` is accepted as the older name of ``cache``."""
        unknown = sorted(set(kwargs) - set(IGNORED_FORWARD_KWARGS))
        if unknown:
            raise TypeError(f"CognateForCausalLM.forward got unexpected arguments {unknown}")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, n_cycles=n_cycles, n_latent=n_latent, use_memory=use_memory,
                         act_freeze=act_freeze, collect_cycles=labels is not None,
                         output_hidden_states=output_hidden_states, supervision_steps=supervision_steps,
                         trm_carry=trm_carry)
        losses = {}
        if labels is not None:
            cycle_logits = [self.lm_head(state) for state in out.cycle_states]  # each (B, T, V)
            halt_targets = _halt_targets(labels, input_ids, attention_mask)
            losses = (self._trm_losses(cycle_logits, out, labels, halt_targets) if out.trm_carry is not None
                      else self._losses(cycle_logits, out.halt_logits, labels, halt_targets))
            logits = cycle_logits[-1]
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                logits = logits[:, -logits_to_keep:]
        else:
            hidden = out.last_hidden_state
            if isinstance(logits_to_keep, int):
                hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
            else:  # a tensor of positions to keep
                hidden = hidden[:, logits_to_keep]
            logits = self.lm_head(hidden)
        result = CognateCausalLMOutput(
            logits=logits, hidden_states=out.hidden_states, act_cycles=out.act_cycles,
            act_cycles_mean=out.act_cycles.float().mean(), gate_entropy=out.gate_entropy, trm_carry=out.trm_carry,
            **{CACHE_FIELD: out.cache}, **losses)
        return result if return_dict is not False else result.to_tuple()

    def _losses(self, cycle_logits: list, halt_logits, labels: torch.Tensor, halt_targets: torch.Tensor) -> dict:
        """Deep-supervision cross-entropy per cycle, their weighted sum, and the ACT halting BCE whose target is
        'this cycle's argmax already equals the next token' at every position ``halt_targets`` covers (see
        :func:`_halt_targets`: prompt tokens too, since their states are frozen by halting as well). With a
        single cycle nothing is ever frozen: the BCE stays on the labelled tokens (measured at smoke: adding the
        prompt tokens there cost the 1-cycle trunk 0.77 -> 0.75 mean accuracy, recall 0.97 -> 0.78)."""
        targets = labels[:, 1:].to(cycle_logits[0].device)  # (B, T-1): position t predicts token t+1
        per_cycle = torch.stack([
            F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
            for logits in cycle_logits])  # (cycles,)
        weights = cycle_loss_weights(self.config.cycle_loss_weighting, len(cycle_logits), per_cycle.device)
        lm_loss = (weights * per_cycle).sum()
        result = dict(loss=lm_loss, lm_loss=lm_loss.detach(), cycle_losses=per_cycle.detach())
        if halt_logits is not None:
            # prompt tokens join only when there is a later cycle whose freezing the halting decides
            halt_next = (halt_targets if halt_logits.shape[-1] > 1 else labels)[:, 1:].to(targets.device)  # (B, T-1)
            valid = halt_next != -100
            correct = torch.stack([logits[:, :-1].argmax(-1) == halt_next for logits in cycle_logits], -1)
            bce = F.binary_cross_entropy_with_logits(
                halt_logits[:, :-1].float(), correct.float(), reduction="none")  # (B, T-1, cycles)
            act_loss = bce[valid].mean()
            result["loss"] = lm_loss + self.config.act_loss_weight * act_loss
            result["act_loss"] = act_loss.detach()
        return result

    def _trm_losses(self, step_logits: list, out: CognateModelOutput, labels: torch.Tensor,
                    halt_targets: torch.Tensor) -> dict:
        """recursion="trm": per supervision step, the cross-entropy on the supervised tokens it updated and the
        halting BCE (target: this step's argmax equals the next token, :func:`forgelib.models.trm.halt_correct`)
        on every position the halting decides on (``_halt_targets``: prompt tokens too, when the episode has more
        than one step) among them."""
        targets = labels[:, 1:].to(step_logits[0].device)  # (B, T-1)
        steps = [TRMStep(state, None if out.halt_logits is None else out.halt_logits[..., i], active)
                 for i, (state, active) in enumerate(zip(out.cycle_states, out.step_active))]
        # prompt tokens join when a later step's freezing depends on their halting (as in ``_losses``)
        judged = halt_targets if out.trm_carry.horizon > 1 else labels
        halt_next = judged[:, 1:].to(targets.device) if out.halt_logits is not None else None
        return step_losses(step_logits, steps, targets, halt_next, self.config.act_loss_weight)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Let generate start from a CognateCache (one layer per virtual layer, memory states kept)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        for key in ("cache", "past_key_values"):
            found = model_kwargs.get(key)
            if type(found) is DynamicCache and not getattr(found, "_is_user_defined", False):
                model_kwargs[key] = CognateCache(self.config)


__all__ = ["CognateForCausalLM", "CognateModel", "CognatePreTrainedModel", "CognateAttention",
           "CognateCausalLMOutput", "CognateModelOutput", "cycle_loss_weights", "CACHE_FIELD"]
