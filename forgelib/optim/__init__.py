"""MuGrokfast: Muon for hidden matrices + AdamW for the rest, Grokfast gradient filters, QK-clip,
KL-to-reference regularization and an STE mode for ternary training.

Typical use::

    from forgelib.optim import create_optimizer_from_phase
    opt = create_optimizer_from_phase(model, phase_num=1, lr=2e-3)   # overrides: MuGrokfastConfig fields
    ...
    loss.backward(); opt.step()                  # Muon/AdamW update, then QK-clip (opt.last_qk_clip)

QK-clip needs attention modules that report ``qk_max_logits`` (see ``qk_clip.py``): the Cognate model
does natively; Hugging Face Llama-style models get ``attach_qk_logit_monitor`` automatically.
"""
from .config import MuGrokfastConfig, OptimConfigError
from .grokfast import grokfast_ema, grokfast_ma
from .kl import ReferenceKL, kl_divergence
from .muon_grokfast import MuonGrokfast, embedding_param_ids, split_parameters
from .newton_schulz import muon_lr_scale, newton_schulz, resolve_ns_dtype
from .presets import PRESETS, create_optimizer_from_phase, preset_config
from .qk_clip import (
    QKLogitMonitor, attach_qk_logit_monitor, causal_max_logits, clip_attention_heads_, find_qk_targets, qk_clip_,
)

__all__ = [
    "MuGrokfastConfig", "OptimConfigError", "MuonGrokfast", "PRESETS", "create_optimizer_from_phase",
    "preset_config", "split_parameters", "embedding_param_ids", "newton_schulz", "muon_lr_scale",
    "resolve_ns_dtype", "grokfast_ema", "grokfast_ma", "attach_qk_logit_monitor", "causal_max_logits",
    "clip_attention_heads_", "find_qk_targets", "qk_clip_", "QKLogitMonitor", "ReferenceKL", "kl_divergence",
]
