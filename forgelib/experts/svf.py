"""Singular Value Fine-tuning (SVF): an expert is one vector ``z`` per adapted weight matrix.

    svf = apply_svf(model, SVFConfig())       # SVD of every attention/MLP projection, once (cached)
    svf.z                                     # {module name: z (rank,)} — the only trainable parameters
    save_expert(svf, "experts/arith.safetensors"); svf.load_z(load_expert("experts/arith.safetensors"))

Each adapted matrix is decomposed once, ``W = U diag(σ) Vᵀ`` (``torch.linalg.svd``, reduced). The expert's matrix is

    W' = U diag(σ ⊙ sigmoid(z)) Vᵀ · (Σσ / Σ(σ ⊙ sigmoid(z)))

— the singular values rescaled by ``sigmoid(z)``, then renormalized so their sum is kept. A constant
``sigmoid(z)`` (e.g. the initial ``z = 0``) therefore reproduces ``W`` exactly (up to the SVD's float error). It is
registered with ``torch.nn.utils.parametrize`` on the layer's ``weight``: the layer computes with ``W'``, gradients
reach ``z`` only, and the stored weight stays as it was (frozen).

**Ternary (BitLinear) layers**: the decomposed matrix is the layer's *quantized* weight (codes × scale), and the
layer is told not to quantize ``W'`` again (``BitLinear.quantize_weight = False``): an expert's layer computes with
the full-precision ``W'`` built from the ternary matrix, while what is stored stays the ternary model plus the
small ``z`` vectors. ``remove_svf`` restores every layer (and the quantizer).

An expert has ``Σ rank(W)`` parameters (``SVFModel.expert_params``), e.g. 64 per 64×176 matrix.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class SVFConfig:
    """Which matrices get an expert vector, and how ``W'`` is formed."""

    target_modules: list[str] | None = None
    """Linear-module name suffixes (None: the attention and MLP projections)."""
    rescale: bool = True
    """Keep the sum of singular values (False: ``U diag(σ ⊙ sigmoid(z)) Vᵀ`` as is, i.e. half of W at z = 0)."""


class SVFParametrization(nn.Module):
    """``weight -> U diag(σ ⊙ sigmoid(z)) Vᵀ`` (rescaled); the original weight is ignored (kept frozen)."""

    def __init__(self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rescale: bool = True):
        super().__init__()
        self.register_buffer("u", u.contiguous())
        self.register_buffer("s", s.contiguous())
        self.register_buffer("vh", vh.contiguous())
        self.z = nn.Parameter(torch.zeros_like(s))
        self.rescale = rescale

    def scaled_singular_values(self) -> torch.Tensor:
        scaled = self.s * torch.sigmoid(self.z)
        if self.rescale:
            scaled = scaled * (self.s.sum() / scaled.sum().clamp(min=torch.finfo(scaled.dtype).tiny))
        return scaled

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return ((self.u * self.scaled_singular_values()) @ self.vh).to(original.dtype)


def target_layers(model: nn.Module, wanted: Sequence[str] | None = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules (BitLinear included) whose names end with one of ``wanted``."""
    wanted = tuple(wanted or DEFAULT_TARGETS)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.endswith(wanted)}
    if not layers:
        raise ValueError(f"no Linear module of {type(model).__name__} ends with any of {list(wanted)}")
    return layers


def _matrix(layer: nn.Linear) -> torch.Tensor:
    """The matrix the layer really multiplies by: the quantized weight of a BitLinear or Int8Linear, else ``weight``."""
    from ..quant.bitnet import BitLinear, Int8Linear

    with torch.no_grad():
        quantized = isinstance(layer, (BitLinear, Int8Linear))
        return (layer.quantized_weight() if quantized else layer.weight).detach().float()


def svd_cache(model: nn.Module, config: SVFConfig | None = None) -> dict[str, tuple[torch.Tensor, ...]]:
    """``{name: (U, σ, Vᵀ)}`` of every target matrix (reduced SVD in float32)."""
    config = config or SVFConfig()
    return {name: tuple(torch.linalg.svd(_matrix(layer), full_matrices=False))
            for name, layer in target_layers(model, config.target_modules).items()}


def save_svd_cache(cache: dict[str, tuple[torch.Tensor, ...]], path: str | Path) -> Path:
    """Write the SVD cache as one safetensors file (``<name>.U``, ``.S``, ``.Vh``)."""
    from safetensors.torch import save_file

    tensors = {f"{name}.{part}": t.contiguous() for name, usv in cache.items() for part, t in zip("USV", usv)}
    save_file(tensors, str(path))
    return Path(path)


def load_svd_cache(path: str | Path) -> dict[str, tuple[torch.Tensor, ...]]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return {n: (tensors[f"{n}.U"], tensors[f"{n}.S"], tensors[f"{n}.V"]) for n in names}


class SVFModel(nn.Module):
    """A model whose target matrices are SVF-parametrized; the ``z`` vectors are its only trainable parameters.
    Calls (``forward``, ``generate``, attribute access) go to the wrapped model."""

    def __init__(self, model: nn.Module, parametrizations: dict[str, SVFParametrization]):
        super().__init__()
        self.model = model
        self._names = list(parametrizations)
        self.params = nn.ModuleDict({n.replace(".", "/"): p for n, p in parametrizations.items()})

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return self.model(*args, **kwargs)
        with parametrize.cached():  # without gradients each matrix is built once per call, not at each use
            return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The wrapped model's ``generate``, each matrix ``U diag(σ') Vᵀ`` built once for the whole generation (not
        once per new token: on a 30-layer model that rebuilt 210 matrices at every token)."""
        with parametrize.cached():
            return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    def _param(self, name: str) -> SVFParametrization:
        return self.params[name.replace(".", "/")]

    @property
    def z(self) -> dict[str, nn.Parameter]:
        return {n: self._param(n).z for n in self._names}

    @property
    def expert_params(self) -> int:
        """Parameters of one expert: the sum of the adapted matrices' ranks."""
        return sum(int(z.numel()) for z in self.z.values())

    @torch.no_grad()
    def load_z(self, values: dict[str, torch.Tensor]) -> "SVFModel":
        """Set every ``z`` (a missing or extra name, or a wrong length, is an error naming it)."""
        if set(values) != set(self._names):
            missing, unexpected = sorted(set(self._names) - set(values)), sorted(set(values) - set(self._names))
            raise ValueError(f"expert vectors do not fit this model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        for name, value in values.items():
            z = self._param(name).z
            if tuple(value.shape) != tuple(z.shape):
                raise ValueError(f"expert vector {name!r}: shape {tuple(value.shape)}, "
                                 f"the model needs {tuple(z.shape)}")
            z.copy_(value.to(z))
        return self

    def get_z(self) -> dict[str, torch.Tensor]:
        return {n: z.detach().clone() for n, z in self.z.items()}

    def reset(self) -> "SVFModel":
        """``z = 0``: the base model's matrices."""
        return self.load_z({n: torch.zeros_like(z) for n, z in self.z.items()})

    def scalings(self) -> dict[str, torch.Tensor]:
        """Per matrix, the factor each singular value is multiplied by (``W'``'s σ over W's σ)."""
        return {n: (self._param(n).scaled_singular_values() / self._param(n).s.clamp(min=1e-12)).detach()
                for n in self._names}


def mix(experts: Sequence[dict[str, torch.Tensor]], alphas: Sequence[float]) -> dict[str, torch.Tensor]:
    """``Σ α_k z_k`` per matrix (the mixture the CEM search scores)."""
    if len(experts) != len(alphas) or not experts:
        raise ValueError(f"need one weight per expert, got {len(alphas)} weights for {len(experts)} experts")
    return {n: sum(float(a) * e[n] for a, e in zip(alphas, experts)) for n in experts[0]}


def apply_svf(model: nn.Module, config: SVFConfig | None = None,
              cache: dict[str, tuple[torch.Tensor, ...]] | None = None) -> SVFModel:
    """Parametrize the target matrices of ``model`` (in place) and freeze everything else (module docstring)."""
    from ..quant.bitnet import BitLinear, Int8Linear

    config = config or SVFConfig()
    layers = target_layers(model, config.target_modules)
    cache = cache if cache is not None else svd_cache(model, config)
    missing = sorted(set(layers) - set(cache))
    if missing:
        raise ValueError(f"the SVD cache has no entry for {missing[:3]} (built for another model?)")
    for p in model.parameters():
        p.requires_grad_(False)
    params = {}
    for name, layer in layers.items():
        u, s, vh = cache[name]
        if (u.shape[0], vh.shape[1]) != tuple(layer.weight.shape):
            raise ValueError(f"SVD cache entry {name!r} is {u.shape[0]}x{vh.shape[1]}, the layer is "
                             f"{tuple(layer.weight.shape)}")
        param = SVFParametrization(u.to(layer.weight.device), s.to(layer.weight.device), vh.to(layer.weight.device),
                                   config.rescale)
        if isinstance(layer, (BitLinear, Int8Linear)):
            layer.quantize_weight = False
        parametrize.register_parametrization(layer, "weight", param)
        params[name] = param
    return SVFModel(model, params)


def remove_svf(svf: SVFModel) -> nn.Module:
    """The wrapped model with every SVF parametrization removed (its stored weights, quantizer back on)."""
    from ..quant.bitnet import BitLinear, Int8Linear

    for name in svf._names:
        layer = svf.model.get_submodule(name)
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        if isinstance(layer, (BitLinear, Int8Linear)):
            layer.quantize_weight = True
    return svf.model


def save_expert(svf: SVFModel, path: str | Path, metadata: dict | None = None) -> Path:
    """Write the current ``z`` vectors as one small safetensors file (metadata: JSON strings)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: z.contiguous() for n, z in svf.get_z().items()}, str(path),
              metadata={"forge_svf": json.dumps(metadata or {})})
    return path


def load_expert(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def expert_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return json.loads((handle.metadata() or {}).get("forge_svf", "{}"))


def cem_search(score, k: int, iterations: int = 10, population: int = 16, elite: int = 4, seed: int = 0,
               init_std: float = 1.0, bounds: tuple[float, float] = (-1.0, 2.0),
               noise_decay: float = 0.8) -> tuple[list[float], float, list]:
    """Cross-entropy method over mixture weights ``α ∈ R^k`` maximizing ``score(α)`` (a few-shot accuracy).

    Each iteration samples ``population`` weight vectors from a diagonal Gaussian (clipped to ``bounds``), keeps the
    ``elite`` best and refits mean and std to them, the std widened by a decaying noise term
    (``init_std · noise_decay^t``, added in quadrature: the noisy CEM of Szita & Lőrincz 2006, since the plain
    update can shrink the std before the mean arrives). Returns (best α, its score, history of (iteration, best))."""
    g = torch.Generator().manual_seed(seed)
    mean, std = torch.full((k,), 1.0 / k), torch.full((k,), init_std)
    best, best_score, history = mean.tolist(), float(score(mean.tolist())), []
    for it in range(iterations):
        samples = (mean + std * torch.randn(population, k, generator=g)).clamp(*bounds)
        scores = torch.tensor([float(score(s.tolist())) for s in samples])
        order = scores.argsort(descending=True)[:elite]
        if float(scores[order[0]]) > best_score:
            best, best_score = samples[order[0]].tolist(), float(scores[order[0]])
        elites = samples[order]
        noise = init_std * noise_decay ** (it + 1)  # noisy CEM: keeps the search from collapsing too early
        mean = elites.mean(0)
        std = (elites.var(0, unbiased=False) + noise ** 2).sqrt().clamp(min=1e-3)
        history.append((it, best_score))
    return best, best_score, history


__all__ = ["SVFConfig", "SVFModel", "SVFParametrization", "apply_svf", "cem_search", "expert_metadata",
           "load_expert", "load_svd_cache", "mix", "remove_svf", "save_expert", "save_svd_cache", "svd_cache",
           "target_layers"]
