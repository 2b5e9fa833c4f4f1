"""Phase 7 — self-guided experts (Transformer²): SVF expert vectors (``svf``), the model's own clustering of its
hidden states (``discover``), REINFORCE / cross-entropy training of an expert (``train``), two-pass routing, mixtures
and the routing-settings search (``route``)."""
from .svf import (SVFConfig, SVFModel, apply_svf, cem_search, load_expert, load_svd_cache, mix, remove_svf,
                  save_expert, save_svd_cache, svd_cache)

__all__ = ["SVFConfig", "SVFModel", "apply_svf", "cem_search", "load_expert", "load_svd_cache", "mix", "remove_svf",
           "save_expert", "save_svd_cache", "svd_cache"]
