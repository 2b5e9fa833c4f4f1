"""``raw16`` / ``raw32``: the values as fp16 / fp32 (no settings); ``raw16`` is what a tensor a plan does not name
gets."""
from __future__ import annotations

import torch

import math

from .registry import Parts, need_part, register_codec


@register_codec("raw16", {})
class _Raw16:
    @staticmethod
    def encode(tensor: torch.Tensor, settings: dict, hessian: torch.Tensor | None = None) -> tuple[Parts, dict]:
        return {"": tensor.half()}, {}

    @staticmethod
    def check(parts: Parts, meta: dict, shape: tuple[int, ...]) -> None:
        need_part(parts, "", torch.float16, math.prod(shape))

    @staticmethod
    def decode(parts: Parts, meta: dict, shape: tuple[int, ...]) -> torch.Tensor:
        return parts[""].float().reshape(shape)


@register_codec("raw32", {})
class _Raw32:
    @staticmethod
    def encode(tensor: torch.Tensor, settings: dict, hessian: torch.Tensor | None = None) -> tuple[Parts, dict]:
        return {"": tensor}, {}

    @staticmethod
    def check(parts: Parts, meta: dict, shape: tuple[int, ...]) -> None:
        need_part(parts, "", torch.float32, math.prod(shape))

    decode = _Raw16.decode
