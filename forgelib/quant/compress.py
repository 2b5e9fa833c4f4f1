"""Compression plans for whole models: which codec each tensor gets, the calibration the codecs use, and the
measurement of a compressed model (size from the file, quality on the test split).

Tensors are addressed by **groups** (``tensor_groups``) or by ``fnmatch`` patterns on their names:

* ``ternary``: weights of BitLinear layers (Phase 4's ternary projections);
* ``embeddings``: the token embedding and the head (one tensor when tied);
* ``matrices``: every other tensor with two or more dimensions and at least ``MATRIX_MIN`` values (Quiet-STaR's
  mixing head, memory gates);
* ``small``: the rest (norms, biases, small matrices such as the thought embeddings);
* ``extras``: tensors that are not the model's (``extra::…``, e.g. Phase-7 expert vectors).

``plan_from(groups, assign)`` turns ``{selector: codec spec}`` into the per-tensor plan ``save_compressed`` takes;
later selectors win. ``input_hessians`` collects, for each 2-D tensor, the second moment ``E[x_j²]`` of the
inputs of the layer it weights (the diagonal of the layer's Hessian proxy ``XᵀX``), which ``vq`` uses.
"""
from __future__ import annotations

import fnmatch
import threading
import time
from typing import Any, Sequence

import torch
from torch import nn

from .artifact import EXTRA, _owned, check_spec

GROUPS = ("ternary", "embeddings", "matrices", "small", "extras")
MATRIX_MIN = 1024


def tensor_groups(model: nn.Module, extras: dict | None = None) -> dict[str, str]:
    """Every stored tensor name (tied tensors once) with its group (module docstring)."""
    from .bitnet import BitLinear

    ternary = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, BitLinear)}
    out = {}
    for name, tensor in _owned(model).items():
        if name in ternary:
            out[name] = "ternary"
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            out[name] = "embeddings"
        elif tensor.dim() >= 2 and tensor.numel() >= MATRIX_MIN:
            out[name] = "matrices"
        else:
            out[name] = "small"
    out.update({EXTRA + k: "extras" for k in (extras or {})})
    return out


def plan_from(groups: dict[str, str], assign: dict[str, dict], base: dict[str, dict] | None = None) -> dict[str, dict]:
    """``base`` updated by ``assign`` ({group or name pattern: codec spec}); a selector that matches nothing fails
    with the groups and a few names (a typo must not silently leave tensors uncompressed)."""
    plan = dict(base or {})
    for selector, spec in assign.items():
        names = [n for n, g in groups.items() if g == selector] if selector in GROUPS else \
            [n for n in groups if fnmatch.fnmatchcase(n, selector)]
        if not names and selector not in GROUPS:
            raise ValueError(f"selector {selector!r} matches no tensor; use a group ({', '.join(GROUPS)}) or a "
                             f"name pattern such as {next(iter(groups), 'model.*')!r}")
        for name in names:
            plan[name] = check_spec(name, dict(spec))
    return plan


def _consumer(model: nn.Module, name: str) -> nn.Module | None:
    """The Linear-like module whose input meets tensor ``name`` (a tied embedding: the head)."""
    modules = dict(model.named_modules())
    owner = modules.get(name.removesuffix(".weight"))
    if name.endswith("embed_tokens.weight"):
        head = modules.get(name.replace("model.embed_tokens.weight", "lm_head"))
        tied = head is not None and head.weight is owner.weight
        return head if tied else None
    return owner if isinstance(owner, nn.Linear) else None


@torch.no_grad()
def input_hessians(model: nn.Module, lm: nn.Module, batches: Sequence[dict], names: Sequence[str]) -> dict:
    """{tensor name: E[x_j²] over the real token positions of ``batches``} for each name in ``names`` weighting a
    Linear-like layer of ``model`` (``lm``: the causal LM to run, a submodule of ``model`` or the model)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks, current = [], {"mask": None}
    for name in names:
        module = _consumer(model, name)
        if module is None:
            continue

        def hook(_module, inputs, _output, name=name):
            x = inputs[0].detach().float()
            mask = current["mask"]
            rows = x[mask.bool()] if mask is not None and mask.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + rows.pow(2).sum(0).cpu()
            counts[name] = counts.get(name, 0) + len(rows)

        hooks.append(module.register_forward_hook(hook))
    was = lm.training
    lm.eval()
    try:
        for batch in batches:
            current["mask"] = batch.get("attention_mask")
            lm(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    finally:
        for h in hooks:
            h.remove()
        lm.train(was)
    return {n: sums[n] / max(1, counts[n]) for n in sums}


class PeakMemory:
    """Peak resident memory (bytes above the start) while the block runs, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    def _watch(self):
        import psutil

        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss - self.start)
            time.sleep(self.interval)

    def __enter__(self):
        import psutil

        self.start = psutil.Process().memory_info().rss
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any):
        self._stop.set()
        self._thread.join()
