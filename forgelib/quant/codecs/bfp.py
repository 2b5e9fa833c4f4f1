"""Block floating point (``bfp``): blocks of ``block`` consecutive weights (rows flattened) share one power-of-two
exponent and each weight keeps a signed ``mantissa_bits`` integer. Bits per weight: ``mantissa_bits + exp_bits /
block``. In an artifact the mantissas are stored offset by 2^(mantissa_bits−1) and the exponents offset by their
lowest value, both bit-packed."""
from __future__ import annotations

import math

import torch

from ..packing import pack_bits, unpack_bits
from .registry import Parts, meta_int, need_part, packed_size, register_codec

BFP = {"mantissa_bits": 3, "block": 8, "exp_bits": 4}
BFP_LIMITS = {"mantissa_bits": range(2, 17), "block": range(1, 4097), "exp_bits": range(1, 9)}


def bfp_quantize(w: torch.Tensor, mantissa_bits: int = BFP["mantissa_bits"], block: int = BFP["block"],
                 exp_bits: int = BFP["exp_bits"]) -> dict:
    """Block floating point: blocks of ``block`` consecutive weights (rows flattened) share one power-of-two
    exponent ``e`` in ``[3 − 2^exp_bits, 2]`` (``exp_bits`` bits) and each weight keeps a signed ``mantissa_bits``
    integer: ``w ≈ m · 2^e``, ``e`` the smallest exponent with ``max|w| ≤ (2^(mantissa_bits−1) − 1) · 2^e``.
    Bits per weight: ``mantissa_bits + exp_bits / block``."""
    qmax = 2 ** (mantissa_bits - 1) - 1
    flat = w.detach().float().reshape(-1)
    pad = (-len(flat)) % block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, block)
    lo, hi = 3 - 2 ** exp_bits, 2
    amax = blocks.abs().amax(1).clamp(min=1e-30)
    e = torch.ceil(torch.log2(amax / qmax)).clamp(lo, hi)
    m = torch.round(blocks / 2.0 ** e[:, None]).clamp(-qmax - 1, qmax)
    return {"mant": m.to(torch.int64), "exp": e.to(torch.int64), "shape": tuple(w.shape), "pad": pad,
            "mantissa_bits": mantissa_bits, "exp_bits": exp_bits, "block": block, "exp_lo": lo}


def bfp_dequantize(q: dict) -> torch.Tensor:
    blocks = q["mant"].float() * 2.0 ** q["exp"].float()[:, None]
    return blocks.reshape(-1)[:math.prod(q["shape"])].reshape(q["shape"])


@register_codec("bfp", BFP, BFP_LIMITS)
class _BFP:
    @staticmethod
    def encode(tensor: torch.Tensor, settings: dict, hessian: torch.Tensor | None = None) -> tuple[Parts, dict]:
        q = bfp_quantize(tensor, int(settings["mantissa_bits"]), int(settings["block"]), int(settings["exp_bits"]))
        meta = {**{k: q[k] for k in ("mantissa_bits", "block", "exp_bits", "exp_lo", "pad")}, "n": len(q["exp"])}
        return {"mant": pack_bits(q["mant"] + (1 << (q["mantissa_bits"] - 1)), q["mantissa_bits"]),
                "exp": pack_bits(q["exp"] - q["exp_lo"], q["exp_bits"])}, meta

    @staticmethod
    def check(parts: Parts, meta: dict, shape: tuple[int, ...]) -> None:
        m, block, e = meta["mantissa_bits"], meta["block"], meta["exp_bits"]
        n, pad = meta_int(meta, "n"), meta_int(meta, "pad", below=block)
        if n * block - pad != math.prod(shape):
            raise ValueError(f"{n} blocks of {block} less {pad} padding are not the {math.prod(shape)} values of "
                             f"shape {list(shape)}")
        if meta.get("exp_lo") != 3 - 2 ** e:
            raise ValueError(f"metadata exp_lo must be {3 - 2 ** e} with exp_bits {e}")
        need_part(parts, "mant", torch.uint8, packed_size(n * block, m))
        need_part(parts, "exp", torch.uint8, packed_size(n, e))

    @staticmethod
    def decode(parts: Parts, meta: dict, shape: tuple[int, ...]) -> torch.Tensor:
        m, n = meta["mantissa_bits"], meta["n"]
        mant = unpack_bits(parts["mant"], m, n * meta["block"]).reshape(n, -1) - (1 << (m - 1))
        exp = unpack_bits(parts["exp"], meta["exp_bits"], n) + meta["exp_lo"]
        return bfp_dequantize({"mant": mant, "exp": exp, "shape": shape})
