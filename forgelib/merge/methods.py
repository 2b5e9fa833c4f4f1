"""Merge methods on the tensors of one parameter, registered by name.

Every method is a function ``fn(tensors, base, **params) -> Tensor`` where ``tensors`` are the same parameter
taken from each source model (all of one shape) and ``base`` is that parameter in the trunk the sources were
trained from. Task vectors are ``tensor - base``. The semantics follow the reference merge toolkit's
conventions (parameter names and defaults are listed per method); deviations are documented on the method.

Shared parameters:

* ``weights`` -- one weight per source model (a scalar is broadcast); default 1.0 each.
* ``density`` -- fraction of task-vector entries kept by sparsifying methods (scalar or one per model).
* ``normalize`` -- divide the mixed task vector by the sum of the weights (of the agreeing models, for the
  sign-consensus methods).
* ``lambda_`` -- scale of the mixed task vector before it is added to the base (the toolkit's ``lambda``).
* ``seed`` / ``generator`` -- randomised methods draw their masks from ``generator`` when given, else from a
  fresh generator seeded with ``seed``, so a recipe rebuilds bit-exactly.

Arithmetic runs in float32 (float64 inputs stay float64) and the result is cast to the base's dtype.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask

Tensor = torch.Tensor


class MergeError(ValueError):
    """Bad input to a merge: wrong number of tensors, mismatched shapes, a parameter out of range."""


class UnknownMergeMethodError(KeyError):
    """A merge method name that is not registered."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: the tensor function and how it uses the base."""

    name: str
    fn: Callable[..., Tensor]
    base: str  # "required": task-vector methods; "optional": slerp, karcher; "unused": linear, passthrough
    randomized: bool
    evolvable: tuple[str, ...]  # continuous parameters an evolutionary search may tune

    @property
    def parameters(self) -> list[str]:
        """Names of the keyword parameters the method accepts."""
        sig = inspect.signature(self.fn)
        return [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_method(name: str, base: str, randomized: bool = False, evolvable: tuple[str, ...] = ()):
    """Decorator: register ``fn`` as merge method ``name`` (see :class:`MergeMethod`)."""

    def wrap(fn):
        if name in MERGE_METHODS:
            raise MergeError(f"merge method {name!r} is registered twice")
        MERGE_METHODS[name] = MergeMethod(name, fn, base, randomized, tuple(evolvable))
        return fn

    return wrap


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; an unknown name fails with the list of valid ones."""
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise UnknownMergeMethodError(
            f"unknown merge method {name!r}; valid methods: {sorted(MERGE_METHODS)}") from None


def merge_tensors(method: str, tensors: Sequence[Tensor], base: Tensor | None = None, **params) -> Tensor:
    """Merge one parameter's ``tensors`` (one per source model) with ``method``; see the module docstring.

    Raises :class:`UnknownMergeMethodError` for an unknown method and :class:`MergeError` for an unknown
    parameter, a missing base, or tensors whose shapes differ.
    """
    spec = get_method(method)
    unknown = sorted(set(params) - set(spec.parameters))
    if unknown:
        raise MergeError(f"merge method {method!r} got unknown parameter(s) {unknown}; "
                         f"valid parameters: {spec.parameters}")
    tensors = list(tensors)
    if not tensors:
        raise MergeError(f"merge method {method!r} needs at least one tensor, got none")
    if spec.base == "required" and base is None:
        raise MergeError(f"merge method {method!r} takes task vectors against a base; pass base=")
    _check_shapes(tensors, base if spec.base != "unused" else None, method)
    return spec.fn(tensors, base, **params)


# ---------------------------------------------------------------- helpers


def _check_shapes(tensors: list[Tensor], base: Tensor | None, method: str) -> None:
    shapes = [tuple(t.shape) for t in tensors] + ([tuple(base.shape)] if base is not None else [])
    if len(set(shapes)) != 1:
        raise MergeError(f"merge method {method!r}: tensors must share one shape, got {shapes} "
                         "(models with different vocabularies or widths cannot be merged)")


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _per_model(value, n: int, name: str) -> list[float]:
    """Broadcast a scalar to ``n`` models or check a list has one value per model."""
    if value is None:
        raise MergeError(f"parameter {name!r} is required")
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise MergeError(f"parameter {name!r} needs one value per model ({n}), got {len(values)}")
    return values


def _weight_column(weights: list[float], like: Tensor) -> Tensor:
    """Weights as a (N, 1, ..., 1) tensor that broadcasts over a stack of N tensors."""
    w = torch.tensor(weights, dtype=like.dtype, device=like.device)
    return w.view(-1, *([1] * (like.dim() - 1)))


def _task_vectors(tensors: list[Tensor], base: Tensor) -> list[Tensor]:
    dtype = _work_dtype(base)
    b = base.to(dtype)
    return [t.to(dtype) - b for t in tensors]


def _generator(seed: int | None, generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    if generator is not None:
        return generator
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else int(seed))
    return g


def _check_density(density: float, name: str = "density") -> None:
    if not 0.0 <= density <= 1.0:
        raise MergeError(f"parameter {name!r} must lie in [0, 1], got {density}")


# ---------------------------------------------------------------- sparsifiers (one task vector each)


def magnitude_prune(delta: Tensor, density: float) -> Tensor:
    """Keep the ``int(density * n)`` entries with the largest magnitude (TIES trimming), zero the rest. A
    positive density keeps at least one entry, as in the toolkit; density 0 keeps none."""
    _check_density(density)
    if density >= 1.0:
        return delta
    if density <= 0.0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.topk(delta.abs().reshape(-1), k).indices] = 1
    return delta * mask.view_as(delta)


def random_prune(delta: Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> Tensor:
    """DARE: keep each entry with probability ``density`` and rescale survivors by 1/density.

    Written here rather than taken from peft because peft's version draws from the global RNG; a
    recipe has to rebuild bit-exactly from its own seed.
    """
    _check_density(density)
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    kept = delta * mask
    return kept / density if rescale else kept


def outlier_prune(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest-magnitude entries (outliers), then the
    smallest ones, so that a ``density`` fraction survives. When ``density + gamma > 1`` fewer outliers are
    dropped so that the density is met, and with ``int(gamma * n) == 0`` none is (both as in the toolkit).
    """
    _check_density(density)
    _check_density(gamma, "gamma")
    if density >= 1.0:
        return delta
    n = delta.numel()
    n_keep = int(density * n)
    n_top = min(int(gamma * n), n - n_keep)
    n_bottom = n - n_keep - n_top
    order = torch.argsort(delta.abs().reshape(-1), stable=True)  # ascending magnitude
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[n_bottom:n - n_top]] = 1
    return delta * mask.view_as(delta)


def rank_sampling_prune(delta: Tensor, density: float, epsilon: float, generator: torch.Generator,
                        rescale: bool = True) -> Tensor:
    """DELLA MagPrune: keep probabilities rise linearly with magnitude rank along dimension 1, from
    ``density - epsilon`` (smallest) to ``density + epsilon`` (largest), so the mean keep rate is ``density``;
    survivors are rescaled by 1/p (their own keep probability) so the expectation equals the input.

    As in the toolkit, ranks are taken within each row of a matrix, over the whole of a 1-D tensor, and for
    3 or more dimensions along dimension 1 at each fixed index of the others. ``density +- epsilon`` must lie
    in (0, 1), and density 0 drops every entry (epsilon is then not checked), both as in the toolkit.
    Deviation: the toolkit's current release rescales to match the L1 norm instead of 1/p (the paper's and
    its earlier rule); a one-element row gets p = density rather than a division by zero.
    """
    _check_density(density)
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)
    if not (0.0 < density - epsilon and density + epsilon < 1.0):
        raise MergeError(f"della needs density - epsilon > 0 and density + epsilon < 1, "
                         f"got density={density}, epsilon={epsilon}")
    x = delta if delta.dim() > 1 else delta.reshape(1, -1)  # ranked along dim 1
    n = x.shape[1]
    ranks = torch.argsort(torch.argsort(x.abs(), dim=1, stable=True), dim=1).to(x.dtype)
    rank_norm = ranks / (n - 1) if n > 1 else torch.full_like(x, 0.5)
    probs = (density - epsilon) + 2.0 * epsilon * rank_norm
    mask = torch.bernoulli(probs, generator=generator)
    kept = x * mask / probs if rescale else x * mask
    return kept.reshape(delta.shape)


# ---------------------------------------------------------------- combining task vectors


def combine_task_vectors(deltas: list[Tensor], weights: list[float], consensus: bool,
                         normalize: bool) -> Tensor:
    """Weighted sum of task vectors; with ``consensus`` only entries agreeing with the elected sign count.

    Sign election is by the sign of the weighted sum per entry (peft's "total" rule, the toolkit's "sum"
    consensus). With ``normalize`` the sum is divided by the summed weights of the contributing models
    (the agreeing ones under consensus); a zero divisor is replaced by 1.
    """
    stacked = torch.stack(deltas, dim=0)  # (N, *shape)
    w = _weight_column(weights, stacked)  # (N, 1, ..., 1)
    weighted = stacked * w  # (N, *shape)
    if consensus:
        agree = calculate_majority_sign_mask(weighted, method="total").to(stacked.dtype)  # (N, *shape)
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    return mixed / divisor if normalize else mixed


def _task_merge(tensors, base, weights, deltas, consensus, normalize, lambda_) -> Tensor:
    w = _per_model(weights, len(tensors), "weights")
    mixed = combine_task_vectors(deltas, w, consensus, normalize)
    return (base.to(mixed.dtype) + lambda_ * mixed).to(base.dtype)


# ---------------------------------------------------------------- the methods


@register_method("linear", base="unused", evolvable=("weights",))
def linear(tensors, base=None, *, weights=1.0, normalize: bool = True) -> Tensor:
    """Weighted average of the tensors themselves: sum(w_i x_i) / sum(w_i) (no division without normalize).
    The base is not used."""
    w = _per_model(weights, len(tensors), "weights")
    dtype = _work_dtype(tensors[0])
    stacked = torch.stack([t.to(dtype) for t in tensors], dim=0)  # (N, *shape)
    col = _weight_column(w, stacked)
    out = (stacked * col).sum(dim=0)
    if normalize:
        total = col.sum()
        if total.abs() < 1e-8:
            raise MergeError(f"linear merge: the weights {w} sum to zero; cannot normalize")
        out = out / total
    return out.to(tensors[0].dtype)


@register_method("task_arithmetic", base="required", evolvable=("weights",))
def task_arithmetic(tensors, base, *, weights=1.0, normalize: bool = False, lambda_: float = 1.0) -> Tensor:
    """base + lambda * sum(w_i (x_i - base)) (divided by sum(w_i) with normalize)."""
    return _task_merge(tensors, base, weights, _task_vectors(tensors, base), False, normalize, lambda_)


@register_method("ties", base="required", evolvable=("weights", "density"))
def ties(tensors, base, *, weights=1.0, density=1.0, normalize: bool = True, lambda_: float = 1.0) -> Tensor:
    """TIES: trim each task vector to its top-``density`` magnitudes, elect a sign per entry by the sign of
    the weighted sum, and take the weighted mean over the agreeing entries (disjoint mean)."""
    dens = _per_model(density, len(tensors), "density")
    deltas = [magnitude_prune(d, p) for d, p in zip(_task_vectors(tensors, base), dens)]
    return _task_merge(tensors, base, weights, deltas, True, normalize, lambda_)


def _dare_deltas(tensors, base, density, rescale, seed, generator) -> list[Tensor]:
    dens = _per_model(density, len(tensors), "density")
    gen = _generator(seed, generator, base.device)
    return [random_prune(d, p, gen, rescale) for d, p in zip(_task_vectors(tensors, base), dens)]


@register_method("dare_linear", base="required", randomized=True, evolvable=("weights", "density"))
def dare_linear(tensors, base, *, weights=1.0, density=1.0, normalize: bool = False, rescale: bool = True,
                lambda_: float = 1.0, seed: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """DARE without sign consensus: randomly drop task-vector entries (keep probability ``density``),
    rescale survivors by 1/density, then add the weighted sum to the base.

    Deviation: the toolkit (0.1.5) rescales survivors so that the task vector keeps its L1 norm; 1/density
    is the DARE paper's rule (and peft's), equal to it in expectation."""
    deltas = _dare_deltas(tensors, base, density, rescale, seed, generator)
    return _task_merge(tensors, base, weights, deltas, False, normalize, lambda_)


@register_method("dare_ties", base="required", randomized=True, evolvable=("weights", "density"))
def dare_ties(tensors, base, *, weights=1.0, density=1.0, normalize: bool = False, rescale: bool = True,
              lambda_: float = 1.0, seed: int | None = None,
              generator: torch.Generator | None = None) -> Tensor:
    """DARE drop-and-rescale followed by TIES sign election and (un-normalized, the toolkit's default)
    disjoint merge."""
    deltas = _dare_deltas(tensors, base, density, rescale, seed, generator)
    return _task_merge(tensors, base, weights, deltas, True, normalize, lambda_)


@register_method("breadcrumbs", base="required", evolvable=("weights", "density"))
def breadcrumbs(tensors, base, *, weights=1.0, density=1.0, gamma: float = 0.01, normalize: bool = False,
                lambda_: float = 1.0) -> Tensor:
    """Model Breadcrumbs: drop the largest ``gamma`` and the smallest ``1 - density - gamma`` fraction of each
    task vector by magnitude, then add the weighted sum to the base (no sign consensus)."""
    dens = _per_model(density, len(tensors), "density")
    deltas = [outlier_prune(d, p, gamma) for d, p in zip(_task_vectors(tensors, base), dens)]
    return _task_merge(tensors, base, weights, deltas, False, normalize, lambda_)


@register_method("della", base="required", randomized=True, evolvable=("weights", "density"))
def della(tensors, base, *, weights=1.0, density=1.0, epsilon: float = 0.15, normalize: bool = True,
          rescale: bool = True, lambda_: float = 1.0, seed: int | None = None,
          generator: torch.Generator | None = None) -> Tensor:
    """DELLA: magnitude-rank-adaptive random drop (see :func:`rank_sampling_prune`), then TIES sign election
    and the normalized disjoint mean."""
    dens = _per_model(density, len(tensors), "density")
    gen = _generator(seed, generator, base.device)
    deltas = [rank_sampling_prune(d, p, epsilon, gen, rescale)
              for d, p in zip(_task_vectors(tensors, base), dens)]
    return _task_merge(tensors, base, weights, deltas, True, normalize, lambda_)


def slerp_pair(v0: Tensor, v1: Tensor, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical linear interpolation from ``v0`` (t = 0) to ``v1`` (t = 1), both flattened to one vector.

    The angle comes from the normalized vectors; the sine coefficients are applied to the original
    (unnormalized) tensors, so norms are interpolated too. Nearly colinear inputs (|cos| > dot_threshold)
    fall back to plain linear interpolation, where the sine formula would divide by ~0.
    """
    dtype = _work_dtype(v0)
    a, b = v0.to(dtype), v1.to(dtype)
    na, nb = a.norm(), b.norm()
    ua = a / na if na > eps else a
    ub = b / nb if nb > eps else b
    dot = float((ua * ub).sum())
    if abs(dot) > dot_threshold:
        out = (1.0 - t) * a + t * b
    else:
        theta = math.acos(dot)
        s0 = math.sin(theta - theta * t) / math.sin(theta)
        s1 = math.sin(theta * t) / math.sin(theta)
        out = s0 * a + s1 * b
    return out.to(v0.dtype)


@register_method("slerp", base="optional", evolvable=("t",))
def slerp(tensors, base=None, *, t: float = 0.5, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation between two endpoints: the base (t = 0) and the one source model (t = 1), or,
    given two source tensors, between them (then the base is not used). ``t`` is one number per tensor; to
    vary it by layer, set it per layer group in the recipe."""
    try:
        if isinstance(t, (str, bytes)):  # float("0.5") would parse it
            raise TypeError
        t = float(t)
    except (TypeError, ValueError):
        raise MergeError(f"slerp's 't' must be one number (0 = first endpoint, 1 = second), got {t!r}; "
                         "to vary t by layer, set it per layer group in the recipe's groups") from None
    if len(tensors) == 2:
        v0, v1 = tensors
    elif len(tensors) == 1 and base is not None:
        v0, v1 = base, tensors[0]
    else:
        raise MergeError(f"slerp needs a base and one model, or two models; got {len(tensors)} model(s) "
                         f"and {'a' if base is not None else 'no'} base")
    return slerp_pair(v0, v1, t, dot_threshold, eps)


def _rows(x: Tensor, filter_wise: bool) -> Tensor:
    """(R, C) view: when filter-wise one row per vector along the last dimension (the rows of a matrix),
    else the whole tensor as one row."""
    if filter_wise and x.dim() > 1:
        return x.reshape(-1, x.shape[-1])
    return x.reshape(1, -1)


@register_method("model_stock", base="required")
def model_stock(tensors, base, *, filter_wise: bool = False) -> Tensor:
    """Model Stock: move from the base towards the average of the k models by the ratio
    t = k cos(theta) / (1 + (k - 1) cos(theta)), with cos(theta) the mean pairwise cosine between the task
    vectors (with ``filter_wise``, per vector along the last dimension: per row of a matrix, as in the
    toolkit). Needs at least two models besides the base. Where 1 + (k - 1) cos(theta) is ~0 (opposed task
    vectors) t is set to 0, i.e. the base, as in the toolkit.
    """
    k = len(tensors)
    if k < 2:
        raise MergeError(f"model_stock needs at least two models besides the base, got {k}")
    dtype = _work_dtype(base)
    w0 = _rows(base.to(dtype), filter_wise)  # (R, C)
    ws = [_rows(w.to(dtype), filter_wise) for w in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            norms = (offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)).clamp(min=1e-6)  # (R,)
            cosines.append(((offsets[i] * offsets[j]).sum(dim=-1) / norms).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)  # (R, 1)
    denom = 1.0 + (k - 1) * cos
    ratio = torch.where(denom.abs() < 1e-6, torch.zeros_like(cos), k * cos / denom)  # (R, 1)
    w_avg = torch.stack(ws).mean(dim=0)  # (R, C)
    return (ratio * w_avg + (1.0 - ratio) * w0).reshape(base.shape).to(base.dtype)


def _karcher_direction(units: list[Tensor], alphas: list[float], max_iter: int, tol: float) -> Tensor:
    """Weighted Karcher (Frechet) mean of unit vectors on the sphere by Riemannian gradient steps:
    average the log maps of the points at the current mean, then follow the exponential map."""
    mean = sum(a * u for a, u in zip(alphas, units))
    mean = units[0].clone() if mean.norm() < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(alphas, units):
            cos = float((mean * u).sum().clamp(-1.0, 1.0))
            theta = math.acos(cos)
            if theta < tol:
                continue
            tangent += a * (theta / math.sin(theta)) * (u - cos * mean)  # log map of u at mean
        step = float(tangent.norm())
        if step < tol:
            break
        mean = math.cos(step) * mean + math.sin(step) * (tangent / step)  # exponential map
        mean = mean / mean.norm()
    return mean


@register_method("karcher", base="optional", evolvable=("weights",))
def karcher(tensors, base=None, *, weights=1.0, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Karcher mean: the weighted Riemannian mean of the tensors' directions on the unit sphere, scaled by
    the weighted mean of their norms (weights are normalized to sum to 1; uniform by default). Zero tensors
    take no part in the direction. A given base is merged in as one more point, as in the toolkit, with the
    mean of the models' weights (so with uniform weights every point, the base included, counts equally)."""
    w = _per_model(weights, len(tensors), "weights")
    total = sum(w)
    if abs(total) < 1e-12:
        raise MergeError(f"karcher: the weights {w} sum to zero")
    if base is not None:
        tensors, w = [*tensors, base], [*w, total / len(w)]
        total += w[-1]
    if len(tensors) == 1:
        return tensors[0]
    dtype = _work_dtype(tensors[0])
    flat = [t.to(dtype).reshape(-1) for t in tensors]
    norms = [float(f.norm()) for f in flat]
    alphas = [x / total for x in w]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    valid_sum = sum(alphas[i] for i in valid)
    direction = _karcher_direction([flat[i] / norms[i] for i in valid],
                                   [alphas[i] / valid_sum for i in valid], max_iter, tol)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return (scale * direction).reshape(tensors[0].shape).to(tensors[0].dtype)


@register_method("passthrough", base="unused")
def passthrough(tensors, base=None, *, scale: float = 1.0) -> Tensor:
    """Pass one model's tensor through unchanged (times ``scale``). Layer stacking -- building a model whose
    layers come from chosen sources -- is done at the model level by a recipe's ``layer_path``."""
    if len(tensors) != 1:
        raise MergeError(f"passthrough takes exactly one tensor, got {len(tensors)}")
    if scale == 1.0:
        return tensors[0]
    return (tensors[0].to(_work_dtype(tensors[0])) * scale).to(tensors[0].dtype)
