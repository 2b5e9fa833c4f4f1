"""MuonGrokfast: Muon for 2-D hidden matrices, AdamW for the rest, Grokfast filters, QK-clip.

One ``torch.optim.Optimizer`` whose parameter groups carry ``use_muon``:
- Muon groups (2-D hidden matrices): Nesterov momentum, Newton–Schulz orthogonalization and
  ``torch.optim.Muon``'s update and learning-rate rules (written out here only so that the iteration
  dtype can be chosen; see ``newton_schulz.py``);
- AdamW groups (embeddings, output head, norms, biases, any non-2-D tensor): PyTorch's own functional
  AdamW (``torch.optim.adamw.adamw``), so the maths is the library's.
The Grokfast filter acts on each group's gradients before momentum / Adam moments. After the update,
QK-clip rescales the attention heads whose last max logit exceeded tau (see ``qk_clip.py``).
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn
from torch.optim.adamw import adamw as functional_adamw

from .config import MuGrokfastConfig
from .grokfast import apply_grokfast
from .newton_schulz import muon_lr_scale, newton_schulz, resolve_ns_dtype
from .qk_clip import QKLogitMonitor, attach_qk_logit_monitor, find_qk_targets, qk_clip_

_EMBED_NAME_HINTS = ("lm_head", "embed")


def _module_params(get) -> set[int]:
    """ids of the parameters of the module returned by ``get()`` (a get_*_embeddings method), if any."""
    try:
        module = get()
    except (AttributeError, NotImplementedError):
        return set()
    return {id(p) for p in module.parameters()} if isinstance(module, nn.Module) else set()


def embedding_param_ids(model: nn.Module) -> set[int]:
    """ids of input-embedding and output-head parameters (excluded from Muon).

    Union of: the modules from ``get_input_embeddings()`` / ``get_output_embeddings()`` when the model
    has them, every ``nn.Embedding`` (e.g. learned positions), and parameters whose name contains
    "lm_head" or "embed".
    """
    ids: set[int] = set()
    for attr in ("get_input_embeddings", "get_output_embeddings"):
        if hasattr(model, attr):
            ids |= _module_params(getattr(model, attr))
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            ids |= {id(p) for p in module.parameters()}
    for name, p in model.named_parameters():
        if any(hint in name.lower() for hint in _EMBED_NAME_HINTS):
            ids.add(id(p))
    return ids


def split_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Split trainable parameters into (Muon: 2-D hidden matrices, AdamW: everything else), with names."""
    excluded = embedding_param_ids(model)
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (muon if p.ndim == 2 and id(p) not in excluded else adamw).append((name, p))
    return muon, adamw


def group_settings(config: MuGrokfastConfig, use_muon: bool) -> dict:
    """The per-group hyper-parameters that ``config`` gives a Muon or an AdamW group."""
    in_scope = config.grokfast_scope == "all" or config.grokfast_scope == ("muon" if use_muon else "adamw")
    common = {"use_muon": use_muon, "grokfast_filter": config.grokfast_filter,
              "grokfast_alpha": config.grokfast_alpha, "grokfast_window": config.grokfast_window,
              "grokfast_lambda": config.grokfast_lambda if in_scope else 0.0}
    if use_muon:
        wd = config.ste_weight_decay if config.ste_mode else config.weight_decay
        return {**common, "lr": config.lr, "weight_decay": wd, "momentum": config.momentum,
                "nesterov": config.nesterov, "ns_steps": config.ns_steps,
                "ns_coefficients": config.ns_coefficients, "ns_eps": config.ns_eps,
                "ns_dtype": config.ns_dtype, "adjust_lr_fn": config.adjust_lr_fn}
    lr = config.lr if config.adamw_lr is None else config.adamw_lr
    wd = config.weight_decay if config.adamw_weight_decay is None else config.adamw_weight_decay
    return {**common, "lr": lr, "weight_decay": wd, "betas": config.betas, "eps": config.eps}


class MuonGrokfast(torch.optim.Optimizer):
    """Muon + AdamW + Grokfast + QK-clip in one optimizer with one ``state_dict()``.

    Args:
        param_groups: dicts with "params" and "use_muon" (bool); any other key overrides the value that
            ``config`` gives that kind of group. Build them with ``MuonGrokfast.from_model``.
        config: the settings (default ``MuGrokfastConfig()``).
        model: the model whose attention heads QK-clip rescales after each step; needed only when
            ``config.qk_clip_tau`` is set (without a model QK-clip is off).

    STE mode (``config.ste_mode``) is for ternary quantization-aware training: the Muon group then holds
    the *latent* full-precision weights of the quantized layers (the forward pass quantizes them with a
    straight-through estimator, the optimizer never sees the ternary values) and their decoupled weight
    decay is ``ste_weight_decay`` (default 0) instead of ``weight_decay``. Why: absmean ternary codes
    round(W / mean|W|) do not change when W is scaled uniformly, so decay does not move the codes
    directly; it shrinks |W| and thereby makes each fixed-RMS Muon update flip more codes (a growing
    effective step size). Leave it 0 unless that annealing is wanted. The AdamW group (embeddings, head,
    norms: not quantized) keeps ``weight_decay``.

    After ``step()``, ``last_qk_clip`` lists the heads that QK-clip rescaled (see ``qk_clip_``).
    """

    def __init__(self, param_groups: Iterable[dict], config: MuGrokfastConfig | None = None,
                 model: nn.Module | None = None):
        self.config = config or MuGrokfastConfig()
        super().__init__(list(param_groups), {"lr": self.config.lr})
        self.model = model
        self.qk_monitor: QKLogitMonitor | None = None
        self.last_qk_clip: list[dict] = []
        self.stack_shapes: bool | None = None
        """Orthogonalize same-shaped Muon matrices as one stack: None = on CUDA only (a small model's step there
        is bound by kernel launches; on a CPU the arithmetic is, and one matrix at a time keeps its exact
        numbers)."""

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (dict with "params" and "use_muon"); missing settings come from ``self.config``."""
        if not isinstance(param_group, dict) or "use_muon" not in param_group:
            raise ValueError("each parameter group must be a dict with 'params' and 'use_muon'; "
                             "build them with MuonGrokfast.from_model(model, config)")
        group = {**group_settings(self.config, bool(param_group["use_muon"])), **param_group}
        params = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
        bad = [tuple(p.shape) for p in params if group["use_muon"] and p.ndim != 2]
        if bad:
            raise ValueError(f"Muon groups take 2-D matrices only, got shapes {bad}")
        super().add_param_group({**group, "params": params})

    @classmethod
    def from_model(cls, model: nn.Module, config: MuGrokfastConfig | None = None) -> "MuonGrokfast":
        """Build with hidden 2-D matrices in a Muon group and the rest in an AdamW group.

        With QK-clip on and no attention module of ``model`` reporting ``qk_max_logits`` yet, a
        Hugging Face Llama-style model gets ``attach_qk_logit_monitor`` (handle in ``.qk_monitor``);
        any other model gets a warning that QK-clip will do nothing.
        """
        muon, adamw = split_parameters(model)
        if config is not None and not config.muon:
            muon, adamw = [], muon + adamw
        groups = [{"params": [p for _, p in ps], "use_muon": flag}
                  for ps, flag in ((muon, True), (adamw, False)) if ps]
        opt = cls(groups, config, model=model)
        if opt.config.qk_clip_tau is not None and not find_qk_targets(model):
            try:
                opt.qk_monitor = attach_qk_logit_monitor(model)
            except ValueError as err:
                warnings.warn(f"QK-clip (tau={opt.config.qk_clip_tau}) will do nothing: {err}", stacklevel=2)
        return opt

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every group, then QK-clip. Returns the closure's loss if one was given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group_step(group)
            else:
                self._adamw_group_step(group)
        tau = self.config.qk_clip_tau
        if tau is not None and self.model is not None:
            self.last_qk_clip = qk_clip_(self.model, tau)
        return loss

    def _filtered_grads(self, group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(params with a gradient, their Grokfast-filtered gradients)."""
        params = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse or torch.is_complex(p) for p in params):
            raise RuntimeError("MuonGrokfast supports dense real gradients only")
        if params and group["grokfast_filter"] == "ema" and group["grokfast_lambda"] != 0.0:
            return params, self._ema_filtered(params, group)
        return params, [apply_grokfast(p.grad, self.state[p], group) for p in params]

    def _ema_filtered(self, params: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        """``grokfast_ema`` on every gradient of the group at once (foreach operations: a handful of launches
        instead of three per parameter); a parameter's first gradient starts its average, as there."""
        alpha, lamb = group["grokfast_alpha"], group["grokfast_lambda"]
        grads = [p.grad for p in params]
        seen = [i for i, p in enumerate(params) if "grokfast_ema" in self.state[p]]
        for i, p in enumerate(params):
            if "grokfast_ema" not in self.state[p]:
                self.state[p]["grokfast_ema"] = p.grad.detach().clone(memory_format=torch.preserve_format)
        if seen:
            mus = [self.state[params[i]]["grokfast_ema"] for i in seen]
            torch._foreach_mul_(mus, alpha)
            torch._foreach_add_(mus, [grads[i] for i in seen], alpha=1.0 - alpha)
        return list(torch._foreach_add(grads, [self.state[p]["grokfast_ema"] for p in params], alpha=lamb))

    def _muon_group_step(self, group: dict) -> None:
        """Muon: EMA momentum, Nesterov, Newton–Schulz, decoupled decay, shape-scaled step."""
        lr, m = group["lr"], group["momentum"]
        params, grads = self._filtered_grads(group)
        if not params:
            return
        bufs = []
        for p, g in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        torch._foreach_lerp_(bufs, grads, 1 - m)
        updates = torch._foreach_lerp(grads, bufs, m) if group["nesterov"] else bufs
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        shapes: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):  # on a GPU same-shaped matrices are orthogonalized together, in one stack
            stack = self.stack_shapes if self.stack_shapes is not None else p.device.type == "cuda"
            shapes.setdefault((tuple(p.shape), p.device, p.dtype, None if stack else i), []).append(i)
        for (shape, device, dtype, _), index in shapes.items():
            ns_dtype = resolve_ns_dtype(group["ns_dtype"], device)
            stack = updates[index[0]] if len(index) == 1 else torch.stack([updates[i] for i in index])
            ortho = newton_schulz(stack, group["ns_steps"], group["ns_coefficients"], group["ns_eps"], ns_dtype)
            alpha = -lr * muon_lr_scale(shape, group["adjust_lr_fn"])
            if len(index) == 1:
                params[index[0]].add_(ortho, alpha=alpha)
            else:
                torch._foreach_add_([params[i] for i in index], list(ortho.to(dtype).unbind(0)), alpha=alpha)

    def _adamw_group_step(self, group: dict) -> None:
        """AdamW through PyTorch's functional implementation (bias-corrected, decoupled decay)."""
        params, grads = self._filtered_grads(group)
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        functional_adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, beta1=beta1,
                         beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                         eps=group["eps"], maximize=False)
