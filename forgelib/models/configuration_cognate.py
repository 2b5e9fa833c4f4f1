"""Configuration of the Cognate model (Phase 1 of Agent Forge).

Cognate is a LLaMA-style decoder whose block stack is applied recursively (latent state ``z`` and answer
state ``y`` per position), with deep supervision over the recursion cycles, an ACT halting head and an
optional Titans-style associative memory gated into every attention layer. See ``modeling_cognate``.
"""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

#: Names accepted by ``CognateConfig.cycle_loss_weighting`` (see ``cycle_loss_weights``).
CYCLE_LOSS_WEIGHTINGS = ("linear", "uniform", "last")
#: Names accepted by ``CognateConfig.recursion``: "cycles" (the per-cycle deep supervision in one backward, with
#: per-cycle ACT freezing) or "trm" (supervision steps with a detached carry, see ``forgelib.models.trm``).
RECURSIONS = ("cycles", "trm")


MEMORY_STEPS = ("plain", "stable")


class CognateConfigError(ValueError):
    """A Cognate configuration value is impossible (the message names the field and what is allowed)."""


@strict
class CognateConfig(PreTrainedConfig):
    r"""Configuration of a ``CognateForCausalLM``.

    LLaMA fields (same names and meaning as ``transformers.LlamaConfig``): ``vocab_size``, ``hidden_size``,
    ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads`` (grouped-query
    attention; defaults to ``num_attention_heads``), ``head_dim`` (defaults to hidden/heads),
    ``max_position_embeddings``, ``rms_norm_eps``, ``rope_parameters`` (or the legacy ``rope_theta`` keyword),
    ``initializer_range``, ``tie_word_embeddings``, ``sliding_window`` (None = full causal attention; w = each
    query sees itself and the w-1 tokens before it), token ids and ``use_cache``.

    Recursion (TRM): ``n_latent`` latent updates ``z = net(z + y + x)`` per cycle, then ``y = net(y + z)``;
    ``n_cycles`` cycles. ``n_latent=0, n_cycles=1`` is a plain transformer.

    ``recursion`` is one of ``RECURSIONS``. "cycles" (the default): the cycles above, deep supervision over the
    cycles inside one backward, ACT freezing per cycle. "trm" (``forgelib.models.trm``): TRM's outer loop of
    ``supervision_steps`` steps, each ``n_cycles`` cycles (with ``grad_last_cycle_only``, the first
    ``n_cycles - 1`` without gradient, as TRM's deep recursion), the carry (y, z) detached between steps, the
    halting head read after each step (a token whose halting probability reaches ``halt_threshold`` keeps its state
    for the remaining steps; in training a sequence may, with probability ``halt_exploration_prob``, be kept from
    halting before a random step in [2, supervision_steps], TRM's exploration). Needs ``n_latent >= 1``.

    Deep supervision: ``cycle_loss_weighting`` is one of ``CYCLE_LOSS_WEIGHTINGS``: "linear" weighs cycle c
    (1-based) by c / sum(1..T), "uniform" by 1/T, "last" puts all weight on the final cycle.

    ACT: ``use_act`` builds the halting head (Linear on the normalized answer state, bias initialised to
    ``halt_bias_init``); ``act_loss_weight`` scales its BCE loss; in training and inference alike a token whose
    halting probability reaches ``halt_threshold`` keeps its state for the remaining cycles (so the states later
    cycles read at inference are the ones they were trained on).

    Memory (Titans MAG): ``memory_modules`` builds the memory parameters in every attention layer (defaults to
    ``use_memory``; build them without using them to keep shapes identical across specialists), ``use_memory``
    runs them, ``memory_chunk_size`` is the chunk length of the parallel update (1 = exact sequential).
    ``memory_step``: ``plain`` (a token's write step is its rate) or ``stable`` (the rate times (1 - eta) / chunk size:
    the chunked update cannot diverge, but each write is weaker; ``forgelib.models.memory``). Phase 1 builds a
    pretrained trunk ``stable`` (its hidden states over long prose made the plain chunked memory diverge).

    ``track_qk_logits``: every attention module records its per-head maximum pre-softmax logit (QK-clip) in each
    forward that trains (training mode or gradients on); inference (eval mode under no_grad: generation, scoring)
    skips it, an extra matmul per layer that cost 11% of a smoke model's generation time.
    """

    model_type = "cognate"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 256
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    sliding_window: int | None = None
    # recursion and deep supervision
    n_latent: int = 0
    n_cycles: int = 1
    cycle_loss_weighting: str = "linear"
    recursion: str = "cycles"
    supervision_steps: int = 1
    grad_last_cycle_only: bool = True
    halt_exploration_prob: float = 0.1
    # adaptive computation time
    use_act: bool = True
    act_loss_weight: float = 0.1
    halt_threshold: float = 0.5
    halt_bias_init: float = -5.0
    # Titans-style memory
    use_memory: bool = False
    memory_modules: bool | None = None
    memory_chunk_size: int = 16
    memory_step: str = "plain"
    # QK-clip support
    track_qk_logits: bool = True

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.memory_modules is None:
            self.memory_modules = bool(self.use_memory)
        # Checked here (not in a strict `validate_*` hook) so that callers get a plain ValueError subclass.
        self._check_shapes()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self._check_recursion_and_heads()
        super().__post_init__(**kwargs)

    def _check_shapes(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise CognateConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise CognateConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CognateConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads})")
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise CognateConfigError(f"head_dim must be an even integer >= 2 (RoPE rotates pairs), got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise CognateConfigError(f"sliding_window must be None or >= 1, got {self.sliding_window}")

    def _check_recursion_and_heads(self) -> None:
        if self.head_dim % 2:
            raise CognateConfigError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.n_cycles < 1:
            raise CognateConfigError(f"n_cycles must be >= 1, got {self.n_cycles}")
        if self.n_latent < 0:
            raise CognateConfigError(f"n_latent must be >= 0, got {self.n_latent}")
        if self.cycle_loss_weighting not in CYCLE_LOSS_WEIGHTINGS:
            raise CognateConfigError(
                f"cycle_loss_weighting must be one of {list(CYCLE_LOSS_WEIGHTINGS)}, got {self.cycle_loss_weighting!r}")
        self._check_trm()
        if not 0.0 < self.halt_threshold <= 1.0:
            raise CognateConfigError(f"halt_threshold must lie in (0, 1], got {self.halt_threshold}")
        if self.act_loss_weight < 0:
            raise CognateConfigError(f"act_loss_weight must be >= 0, got {self.act_loss_weight}")
        if self.memory_chunk_size < 1:
            raise CognateConfigError(f"memory_chunk_size must be >= 1, got {self.memory_chunk_size}")
        if self.memory_step not in MEMORY_STEPS:
            raise CognateConfigError(f"memory_step must be one of {list(MEMORY_STEPS)}, got {self.memory_step!r}")
        if self.use_memory and not self.memory_modules:
            raise CognateConfigError("use_memory=True needs memory_modules=True (or left unset)")

    def _check_trm(self) -> None:
        if self.recursion not in RECURSIONS:
            raise CognateConfigError(f"recursion must be one of {list(RECURSIONS)}, got {self.recursion!r}")
        if self.supervision_steps < 1:
            raise CognateConfigError(f"supervision_steps must be >= 1, got {self.supervision_steps}")
        if not 0.0 <= self.halt_exploration_prob <= 1.0:
            raise CognateConfigError(f"halt_exploration_prob must lie in [0, 1], got {self.halt_exploration_prob}")
        if self.recursion == "trm" and self.n_latent < 1:
            raise CognateConfigError(f"recursion='trm' needs n_latent >= 1 (TRM's latent z), got {self.n_latent}")

    @property
    def calls_per_forward(self) -> int:
        """Number of applications of the block stack in one forward with the configured recursion."""
        steps = self.supervision_steps if self.recursion == "trm" else 1
        return steps * self.n_cycles * (self.n_latent + 1)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """Build from a dict; a dict of another architecture (its ``model_type``) is refused with a clear error."""
        found = config_dict.get("model_type")
        if found not in (None, cls.model_type):
            raise CognateConfigError(
                f"model_type is {found!r} ({config_dict.get('architectures')}), not 'cognate'; load it with "
                "forgelib.modelio.load_model, or convert Llama weights with cognate_from_llama")
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_llama(cls, llama_config, **overrides) -> "CognateConfig":
        """A Cognate config with the shapes of a ``LlamaConfig`` and the recursion, ACT and memory switched off,
        so that the Llama weights load unchanged (same parameter names) and give the same logits."""
        for name, allowed in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
            if getattr(llama_config, name, allowed) != allowed:
                raise CognateConfigError(
                    f"{name}={getattr(llama_config, name)!r} is not supported by Cognate (needs {allowed!r})")
        fields = dict(
            vocab_size=llama_config.vocab_size, hidden_size=llama_config.hidden_size,
            intermediate_size=llama_config.intermediate_size, num_hidden_layers=llama_config.num_hidden_layers,
            num_attention_heads=llama_config.num_attention_heads,
            num_key_value_heads=llama_config.num_key_value_heads, head_dim=llama_config.head_dim,
            max_position_embeddings=llama_config.max_position_embeddings, rms_norm_eps=llama_config.rms_norm_eps,
            rope_parameters=dict(llama_config.rope_parameters), tie_word_embeddings=llama_config.tie_word_embeddings,
            initializer_range=llama_config.initializer_range, pad_token_id=llama_config.pad_token_id,
            bos_token_id=llama_config.bos_token_id, eos_token_id=llama_config.eos_token_id,
            n_latent=0, n_cycles=1, use_act=False, use_memory=False, memory_modules=False)
        fields.update(overrides)
        return cls(**fields)


__all__ = ["CognateConfig", "CognateConfigError", "CYCLE_LOSS_WEIGHTINGS", "RECURSIONS"]
