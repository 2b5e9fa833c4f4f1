"""``ternary``: a BitLinear weight as its absmean ternary codes packed base-3 (5 per byte) and one fp32 scale
(``forgelib.quant.bitnet.ternary_quantize``, ``forgelib.quant.packing``). Decoded as a latent weight whose ternary
quantization gives back exactly those codes and that scale (``forgelib.quant.export.latent_from_ternary``)."""
from __future__ import annotations

import torch

import math

from .registry import Parts, need_part, register_codec


@register_codec("ternary", {})
class _Ternary:
    @staticmethod
    def encode(tensor: torch.Tensor, settings: dict, hessian: torch.Tensor | None = None) -> tuple[Parts, dict]:
        from ..bitnet import ternary_quantize
        from ..packing import pack_ternary

        codes, scale = ternary_quantize(tensor)
        return {"packed": pack_ternary(codes, "base3"), "scale": scale.reshape(1)}, {}

    @staticmethod
    def check(parts: Parts, meta: dict, shape: tuple[int, ...]) -> None:
        if not shape:
            raise ValueError("a ternary tensor has at least one dimension")
        need_part(parts, "packed", torch.uint8, math.ceil(math.prod(shape) / 5))  # base-3: 5 codes a byte
        need_part(parts, "scale", torch.float32, 1)

    @staticmethod
    def decode(parts: Parts, meta: dict, shape: tuple[int, ...]) -> torch.Tensor:
        from ..export import latent_from_ternary
        from ..packing import unpack_ternary

        codes = unpack_ternary(parts["packed"], shape, "base3")
        return latent_from_ternary(codes, parts["scale"][0], torch.float32)
