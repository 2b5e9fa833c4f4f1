"""MuGrokfast presets per phase (numbers from shared PHASES.md) and the optimizer factory."""
from __future__ import annotations

from torch import nn

from .config import MuGrokfastConfig, OptimConfigError
from .muon_grokfast import MuonGrokfast

PRESETS: dict[int, MuGrokfastConfig] = {
    # Phase 1 (Cognate pretraining from scratch): lr 1e-3, Grokfast lambda 0.3 (on the AdamW group, the
    # config default), tau 30, and decoupled weight decay 1.0, chosen by measurement on `forge bench
    # grokking` (a*b mod 97, steps to 99% validation accuracy):
    #   weight decay 0 / 0.1 / 1.0 (seed 0, cap 3000, filter on all groups): not reached (val 0.83) /
    #   not reached (0.98) / 720; Muon alone: not reached / not reached / 660.
    #   This preset, 1 CPU thread, medians over 3 seeds: 720 steps (55 s) vs Muon alone 700 (55 s),
    #   AdamW (wd 1.0) 1180 (75 s), the paper's Grokfast-EMA 2040 (135 s), the paper's Adam > 8000.
    #   Grokfast on top of Muon never helped on this task: lambda 0.1 / 0.3 / 1 / 2 gave 720 / 760 /
    #   840 / 960 steps (filter on all groups; lambda 1 and 2 from seed 0 only).
    1: MuGrokfastConfig(lr=1e-3, grokfast_lambda=0.3, qk_clip_tau=30.0, weight_decay=1.0),
    # The fine-tuning presets (3, 5, 6, 7) keep weight decay 0: decay would pull the weights toward zero,
    # away from the model they start from (the KL term of phases 3 and 7 keeps them near it instead).
    # Phase 3 (Quiet-STaR fine-tuning): lower lr, light Grokfast, tighter clip, KL 0.1 to the base model.
    3: MuGrokfastConfig(lr=5e-4, grokfast_lambda=0.1, qk_clip_tau=25.0, kl_weight=0.1),
    # Phase 4 (BitNet quantization-aware training): STE mode (the Muon group holds the latent weights of the
    # ternary layers, no decay on them); lr 3e-3 with Phase 4's cosine decay to 0.1x -- the latent weights must
    # move by a good part of mean|W| for a code to flip. Measured (smoke Phase-3 model, 600 steps of batch 32,
    # accuracy retention with thoughts): cosine from 1e-3 / 2e-3 / 3e-3 / 5e-3: 0.31 / 0.64 / 0.75 / 0.61;
    # constant 1e-3: 0.53. No Grokfast (it amplifies slow gradient components, under the STE mostly the
    # quantization error's); QK-clip kept.
    4: MuGrokfastConfig(lr=3e-3, grokfast_lambda=0.0, qk_clip_tau=30.0, ste_mode=True),
    # Phase 5 (curriculum on a ternary model): strong Grokfast (lambda 2, the paper's value) and STE mode:
    # the Muon group updates latent full-precision weights without weight decay.
    # (With the default grokfast_scope "adamw" the filter acts on embeddings, head and norms; set
    # grokfast_scope="all" to filter the latent matrices too.)
    5: MuGrokfastConfig(lr=1e-3, grokfast_lambda=2.0, qk_clip_tau=30.0, ste_mode=True),
    # Phase 6 (prompt baking, LoRA): small lr, light Grokfast. LoRA A/B matrices are 2-D, so they go to
    # Muon and the "adamw"-scoped filter does not touch them (use grokfast_scope="all" for that). QK-clip
    # rescales the base q/k weights only, not a LoRA adapter's delta.
    6: MuGrokfastConfig(lr=1e-4, grokfast_lambda=0.2, qk_clip_tau=30.0),
    # Phase 7 (SVF experts): lower lr, light Grokfast, tau 28, KL 0.05 to the base model.
    7: MuGrokfastConfig(lr=5e-4, grokfast_lambda=0.15, qk_clip_tau=28.0, kl_weight=0.05),
}


def preset_config(phase_num: int, **overrides) -> MuGrokfastConfig:
    """The preset of ``phase_num`` with ``overrides`` (MuGrokfastConfig field names) applied.

    Unknown phase numbers or override names raise OptimConfigError listing the valid ones.
    """
    if phase_num not in PRESETS:
        raise OptimConfigError(f"no MuGrokfast preset for phase {phase_num!r}; valid: {sorted(PRESETS)}")
    return PRESETS[phase_num].replace(**overrides)


def create_optimizer_from_phase(model: nn.Module, phase_num: int = 1, **overrides) -> MuonGrokfast:
    """A MuonGrokfast for ``model`` with the phase's preset (see ``PRESETS``) and ``overrides``.

    The model is attached for QK-clip; a Hugging Face Llama-style model gets the QK-logit monitor
    automatically (see ``MuonGrokfast.from_model``).
    """
    return MuonGrokfast.from_model(model, preset_config(phase_num, **overrides))
