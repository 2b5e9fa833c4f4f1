"""``seedlm``: SeedLM (``forgelib.quant.seedlm``): a block of ``C`` weights as a ``K``-bit LFSR seed and ``P`` 4-bit
coefficients with a shared 4-bit exponent. In an artifact the seeds are packed to K bits, the coefficients (offset
by 8) and the exponents (offset by 15) to 4 bits each."""
from __future__ import annotations

import torch

from ..packing import pack_bits, unpack_bits
import math

from ..seedlm import TAPS, SeedLMConfig, compress_matrix, decompress_matrix
from .registry import Parts, as_matrix, meta_int, meta_shape, need_part, packed_size, register_codec

SEEDLM = {"K": 12, "C": 8, "P": 3}
SEEDLM_LIMITS = {"K": tuple(sorted(TAPS)), "C": range(1, 65), "P": range(1, 17)}  # a tabulated LFSR; P <= C


@register_codec("seedlm", SEEDLM, SEEDLM_LIMITS)
class _SeedLM:
    @staticmethod
    def encode(tensor: torch.Tensor, settings: dict, hessian: torch.Tensor | None = None) -> tuple[Parts, dict]:
        config = SeedLMConfig(K=int(settings["K"]), C=int(settings["C"]), P=int(settings["P"]))
        q = compress_matrix(as_matrix(tensor), config)
        meta = dict(K=config.K, C=config.C, P=config.P, pad=q["pad"], matrix=list(q["shape"]), n=len(q["seed"]),
                    seconds_per_block=q["seconds_per_block"])
        return {"seeds": pack_bits(q["seed"], config.K), "coefs": pack_bits(q["coef"].to(torch.int64) + 8, 4),
                "exps": pack_bits(q["exp"].to(torch.int64) + 15, 4)}, meta

    @staticmethod
    def check(parts: Parts, meta: dict, shape: tuple[int, ...]) -> None:
        K, C, P = meta["K"], meta["C"], meta["P"]
        if P > C:
            raise ValueError(f"P {P} must not exceed C {C}")
        meta_shape(meta, "matrix", shape)
        n, pad = meta_int(meta, "n"), meta_int(meta, "pad", below=C)
        if n * C - pad != math.prod(shape):
            raise ValueError(f"{n} blocks of {C} less {pad} padding are not the {math.prod(shape)} values of shape "
                             f"{list(shape)}")
        need_part(parts, "seeds", torch.uint8, packed_size(n, K))
        need_part(parts, "coefs", torch.uint8, packed_size(n * P, 4))
        need_part(parts, "exps", torch.uint8, packed_size(n, 4))

    @staticmethod
    def decode(parts: Parts, meta: dict, shape: tuple[int, ...]) -> torch.Tensor:
        config = SeedLMConfig(K=meta["K"], C=meta["C"], P=meta["P"])
        n = meta["n"]
        packed = {"seed": unpack_bits(parts["seeds"], config.K, n),
                  "coef": (unpack_bits(parts["coefs"], 4, n * config.P) - 8).reshape(n, config.P),
                  "exp": unpack_bits(parts["exps"], 4, n) - 15, "shape": tuple(meta["matrix"]), "pad": meta["pad"]}
        return decompress_matrix(packed, config).reshape(shape)
