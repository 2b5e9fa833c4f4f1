"""KV cache for Cognate: one cache layer per *virtual* layer, plus the memory states.

The recursion calls the block stack several times per forward; call ``j`` of layer ``l`` is virtual layer
``j * num_hidden_layers + l`` (each call sees different inputs, so each needs its own keys and values). The
Titans memory of each virtual layer is stored next to its keys and values, so cached generation continues the
memory exactly where the previous step left it.
"""
from __future__ import annotations

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .memory import MemoryState


class CognateCacheError(ValueError):
    """A cache cannot be used the way it was asked to (the message says why and what to do)."""


def new_cache_layer(sliding_window: int | None):
    """A growing cache layer; a sliding one keeps only the last ``sliding_window - 1`` tokens."""
    if sliding_window is None:
        return DynamicLayer()
    return DynamicSlidingWindowLayer(sliding_window=sliding_window)


def ensure_cache_layers(cache, count: int, sliding_window: int | None) -> None:
    """Make sure ``cache`` has at least ``count`` layers (a DynamicCache built from a config has only one per
    real layer; the recursion needs one per virtual layer)."""
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        return  # that cache appends layers on its own
    while len(cache.layers) < count:
        cache.layers.append(new_cache_layer(sliding_window))


class CognateCache(DynamicCache):
    """A DynamicCache that also holds the memory states and remembers the recursion it was filled with.

    ``memory``: dict virtual layer index -> MemoryState. ``signature``: (n_latent, n_cycles, use_memory) of the
    first forward; a later forward with another recursion is refused (its virtual layers would not line up)."""

    def __init__(self, config=None):
        super().__init__()
        self.layer_class_to_replicate = None  # layers are added by ensure_cache_layers with the right type
        self.sliding_window = getattr(config, "sliding_window", None) if config is not None else None
        self.memory: dict[int, MemoryState] = {}
        self.signature: tuple | None = None

    def check_signature(self, signature: tuple) -> None:
        """Record the recursion of the first forward; refuse a different one later."""
        if self.signature is None or self.get_seq_length() == 0:
            self.signature = signature
        elif signature != self.signature:
            raise CognateCacheError(
                f"this cache was filled with (n_latent, n_cycles, use_memory)={self.signature}, the call asks for "
                f"{signature}; use a fresh cache (or generate) when changing the recursion")

    def _map_memory(self, fn) -> None:
        self.memory = {idx: state.map_batch(fn) for idx, state in self.memory.items()}

    def reorder_cache(self, beam_idx):
        """Reorder keys, values and memory states for beam search."""
        super().reorder_cache(beam_idx)
        self._map_memory(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        """Repeat every batch entry ``repeats`` times (keys, values and memory)."""
        super().batch_repeat_interleave(repeats)
        self._map_memory(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        """Keep only the batch entries ``indices`` (keys, values and memory)."""
        super().batch_select_indices(indices)
        self._map_memory(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Crop keys and values; impossible once memory states exist (the memory cannot be rolled back)."""
        if self.memory and tokens_to_remove != 0:
            raise CognateCacheError("a cache holding Titans memory states cannot be cropped (no rollback of M)")
        super().crop(tokens_to_remove)

    def reset(self):
        """Empty keys, values and memory."""
        super().reset()
        self.memory.clear()
        self.signature = None


__all__ = ["CognateCache", "CognateCacheError", "ensure_cache_layers", "new_cache_layer"]
