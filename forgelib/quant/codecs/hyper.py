"""Hyper-compression (``hyper``, Fan et al. 2024): a group of ``n`` weights, mapped to [0, 1] by the row's (lo, hi),
is represented by one integer ``k`` < 2^index_bits: the point ``frac(k · Δ · a)`` of the trajectory ``θ ↦ frac(θ a)``
on the unit torus, ``a`` a vector of rationally independent numbers (square roots of primes), which is dense
(ergodic) so some ``θ`` comes near any target. The best ``k`` is found by exhaustive search over all 2^index_bits
points. Bits (``hyper_bits``): ``index_bits / n`` per weight plus the rows' fp16 (lo, hi). In an artifact the
indices are bit-packed to ``index_bits``."""
from __future__ import annotations

import math

import torch

from ..packing import pack_bits, unpack_bits
from .registry import Parts, as_matrix, meta_groups, need_part, packed_size, register_codec

HYPER = {"n": 4, "index_bits": 12}
HYPER_LIMITS = {"n": range(1, 17), "index_bits": range(1, 17)}  # one prime per coordinate; 2^16 points searched
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53)


def trajectory(n: int, index_bits: int) -> torch.Tensor:
    """(2^index_bits, n): the points frac(k · a), k = 0 … 2^index_bits − 1, of the ergodic trajectory θ ↦ frac(θ a)
    with a = (√2, √3, √5, …) (float64): an irrational rotation of the torus, dense in [0, 1)^n."""
    if n > len(_PRIMES):
        raise ValueError(f"group size {n} > {len(_PRIMES)}")
    a = torch.tensor([math.sqrt(p) for p in _PRIMES[:n]], dtype=torch.float64)
    return torch.frac(torch.arange(2 ** index_bits, dtype=torch.float64)[:, None] * a)


def hyper_search(u: torch.Tensor, index_bits: int, chunk: int = 2048) -> torch.Tensor:
    """For targets ``u`` (G, n) in [0, 1], the index of the nearest trajectory point (exhaustive)."""
    points = trajectory(u.shape[1], index_bits)
    return torch.cat([torch.cdist(u[i:i + chunk].double(), points).argmin(1) for i in range(0, len(u), chunk)])


def hyper_quantize(w: torch.Tensor, n: int = HYPER["n"], index_bits: int = HYPER["index_bits"]) -> dict:
    rows, cols = w.shape
    if cols % n:
        raise ValueError(f"the input size {cols} is not a multiple of the group size {n}")
    lo, hi = w.float().amin(1, keepdim=True).half(), w.float().amax(1, keepdim=True).half()
    span = (hi.float() - lo.float()).clamp(min=1e-12)
    u = ((w.float() - lo.float()) / span).reshape(-1, n)
    return {"index": hyper_search(u, index_bits).to(torch.int32), "lo": lo, "hi": hi, "shape": (rows, cols), "n": n,
            "index_bits": index_bits}


def hyper_dequantize(q: dict) -> torch.Tensor:
    rows, cols = q["shape"]
    points = trajectory(q["n"], q["index_bits"])
    u = points[q["index"].long()].float().reshape(rows, cols)
    return q["lo"].float() + u * (q["hi"].float() - q["lo"].float())


def hyper_bits(q: dict) -> int:
    return q["index"].numel() * q["index_bits"] + (q["lo"].numel() + q["hi"].numel()) * 16


@register_codec("hyper", HYPER, HYPER_LIMITS)
class _Hyper:
    @staticmethod
    def encode(tensor: torch.Tensor, settings: dict, hessian: torch.Tensor | None = None) -> tuple[Parts, dict]:
        n, bits = int(settings["n"]), int(settings["index_bits"])
        q = hyper_quantize(as_matrix(tensor), n, bits)
        meta = dict(n=n, index_bits=bits, matrix=list(q["shape"]), count=q["index"].numel())
        return {"index": pack_bits(q["index"], bits), "lo": q["lo"], "hi": q["hi"]}, meta

    @staticmethod
    def check(parts: Parts, meta: dict, shape: tuple[int, ...]) -> None:
        n, bits = meta["n"], meta["index_bits"]
        rows, cols = meta_groups(meta, shape, n, "count", "groups")
        need_part(parts, "index", torch.uint8, packed_size(meta["count"], bits))
        need_part(parts, "lo", torch.float16, shape=(rows, 1))
        need_part(parts, "hi", torch.float16, shape=(rows, 1))

    @staticmethod
    def decode(parts: Parts, meta: dict, shape: tuple[int, ...]) -> torch.Tensor:
        q = {"index": unpack_bits(parts["index"], meta["index_bits"], meta["count"]), "lo": parts["lo"],
             "hi": parts["hi"], "shape": tuple(meta["matrix"]), "n": meta["n"], "index_bits": meta["index_bits"]}
        return hyper_dequantize(q).reshape(shape)
