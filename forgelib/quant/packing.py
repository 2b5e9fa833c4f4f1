"""Storage formats of ternary weight codes (values in {-1, 0, 1}): "2bit" (4 codes per byte) and "base3" (5 per byte).

"2bit" -- the layout of transformers' BitNet integration (``transformers.integrations.bitnet.pack_weights`` /
``unpack_weights``, the format of ``microsoft/bitnet-b1.58-2B-4T``), so packed matrices can move between the two.
A code tensor of shape [d0, *rest] (a Linear weight is [out, in]) becomes uint8 of shape [R, *rest] with
R = ceil(d0 / 4). Row r of the codes goes to packed row ``r % R``, bits ``2 * (r // R)`` and up, storing
``code + 1`` in {0, 1, 2}: the first R rows fill bits 0-1 of every byte, the next R rows bits 2-3, then 4-5, 6-7.

    packed[p, j] = sum_{i=0..3} (codes[i * R + p, j] + 1) << (2 * i)

Rows past d0 (when d0 is not a multiple of 4) are stored as bits 00, exactly as transformers' ``pack_weights``
leaves them, so the bytes equal transformers' for every shape; ``unpack_weights`` decodes those padding rows
as -1 and returns 4R rows, which is why the original shape must be recorded. transformers keeps the scale next to
the packed matrix as ``weight_scale``; note that its packed ``BitLinear`` divides the output by ``weight_scale``
(it stores 1 / mean|W|), while forgelib's ``weight_scale`` is mean|W| itself (W ~ codes * weight_scale).

"base3" -- 5 codes per byte as the base-3 number ``sum_j (code_j + 1) * 3**j`` (3^5 = 243 <= 256), i.e. 1.6 bits
per weight instead of 2, over the row-major flattened tensor; the packed tensor is 1-D uint8 of length
ceil(numel / 5); padding digits are 0. It is compact storage, not a layout any kernel reads: unpacking needs
integer division by 3, so it is decoded back to codes before the matmul like "2bit".

Both formats round-trip exactly; the shape is not derivable from the packed tensor and is passed back in.

``pack_bits`` / ``unpack_bits``: non-negative integers of any width as a little-endian bit stream, the integer
fields of the compressed-artifact codecs (``forgelib.quant.codecs``), so that the bytes on disk are the bits a codec
claims.
"""
from __future__ import annotations

import math

import torch

#: Packing names accepted by ``pack_ternary`` / ``unpack_ternary`` and the export ("none" only in configs).
PACKINGS = ("2bit", "base3")
CODES_PER_BYTE = {"2bit": 4, "base3": 5}
_BASE3_POWERS = (1, 3, 9, 27, 81)


def check_packing(packing: str) -> str:
    """``packing`` if it is one of ``PACKINGS``, else ValueError naming the valid ones."""
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {', '.join(repr(p) for p in PACKINGS)}; got {packing!r}")
    return packing


def packed_shape(shape, packing: str) -> tuple[int, ...]:
    """Shape of the uint8 tensor that ``pack_ternary`` makes from codes of ``shape``."""
    check_packing(packing)
    shape = tuple(int(n) for n in shape)
    if len(shape) == 0:
        raise ValueError("ternary packing needs a tensor with at least one dimension, got a scalar")
    if packing == "2bit":
        return (math.ceil(shape[0] / 4), *shape[1:])
    return (math.ceil(math.prod(shape) / 5),)


def pack_ternary(codes: torch.Tensor, packing: str) -> torch.Tensor:
    """Pack ternary codes (any integer or float dtype, values in {-1, 0, 1}, at least 1-D) into uint8.

    "2bit": shape [ceil(d0/4), *rest], transformers' layout (module docstring); "base3": 1-D, 5 codes per byte."""
    check_packing(packing)
    if codes.dim() == 0:
        raise ValueError("ternary packing needs a tensor with at least one dimension, got a scalar")
    if codes.numel() and bool(((codes != -1) & (codes != 0) & (codes != 1)).any()):
        raise ValueError("pack_ternary: codes must all be -1, 0 or 1")
    digits = (codes.to(torch.int16) + 1).to(torch.uint8)  # {0, 1, 2}
    if packing == "2bit":
        rows = packed_shape(codes.shape, packing)[0]
        pad = 4 * rows - codes.shape[0]
        if pad:  # padding rows stored as 00, like transformers' pack_weights
            digits = torch.cat([digits, digits.new_zeros((pad, *codes.shape[1:]))])
        digits = digits.reshape(4, rows, *codes.shape[1:])  # (4, R, *rest): row i*R + p -> slot i of byte row p
        return digits[0] | (digits[1] << 2) | (digits[2] << 4) | (digits[3] << 6)  # (R, *rest)
    flat = digits.reshape(-1)
    pad = 5 * packed_shape(codes.shape, packing)[0] - flat.numel()
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 5).to(torch.int16)  # (N, 5)
    powers = torch.tensor(_BASE3_POWERS, dtype=torch.int16, device=codes.device)
    return (flat * powers).sum(-1).to(torch.uint8)  # (N,) values <= 242


def unpack_ternary(packed: torch.Tensor, shape, packing: str, check: bool = True) -> torch.Tensor:
    """Int8 codes in {-1, 0, 1} of the given ``shape`` from a ``pack_ternary`` output.

    ``check`` (default) verifies the packed tensor's dtype and shape against ``shape`` and that no byte holds an
    impossible value (a 2-bit field of 3, a base-3 byte >= 243); the packed inference path skips it per call."""
    check_packing(packing)
    shape = tuple(int(n) for n in shape)
    if check:
        expected = packed_shape(shape, packing)
        if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
            raise ValueError(f"a {list(shape)} tensor packed as {packing!r} is uint8 of shape {list(expected)}; "
                             f"got {packed.dtype} of shape {list(packed.shape)}")
    if packing == "2bit":
        fields = torch.stack([(packed >> (2 * i)) & 3 for i in range(4)])  # (4, R, *rest)
        if check and bool((fields == 3).any()):
            raise ValueError("unpack_ternary: a 2-bit field holds 3, which is no ternary code")
        digits = fields.reshape(-1, *packed.shape[1:])[:shape[0]]  # (d0, *rest)
    else:
        if check and bool((packed >= 243).any()):
            raise ValueError("unpack_ternary: a base-3 byte is >= 243, which no 5 ternary codes produce")
        value = packed.to(torch.int16)
        places = []
        for _ in range(5):
            places.append(value % 3)
            value = value // 3
        digits = torch.stack(places, -1).reshape(-1)[:math.prod(shape)].reshape(shape)  # (*shape)
    return digits.to(torch.int8) - 1


def pack_bits(values: torch.Tensor, width: int) -> torch.Tensor:
    """Non-negative integers (< 2^width) as a little-endian bit stream in uint8 (ceil(n · width / 8) bytes)."""
    v = values.reshape(-1).to(torch.int64)
    if len(v) and (int(v.min()) < 0 or int(v.max()) >= 1 << width):
        raise ValueError(f"values must lie in [0, 2^{width}), got [{int(v.min())}, {int(v.max())}]")
    bits = ((v[:, None] >> torch.arange(width)) & 1).reshape(-1)  # value-major, least significant bit first
    pad = (-len(bits)) % 8
    bits = torch.cat([bits, bits.new_zeros(pad)]).reshape(-1, 8)
    return (bits << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """The first ``n`` integers of width ``width`` of a ``pack_bits`` stream (int64)."""
    bits = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)[:n * width].reshape(n, width)
    return (bits << torch.arange(width)).sum(1)


__all__ = ["PACKINGS", "CODES_PER_BYTE", "check_packing", "packed_shape", "pack_ternary", "unpack_ternary",
           "pack_bits", "unpack_bits"]
