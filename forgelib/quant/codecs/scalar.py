"""Scalar quantization in groups: round to nearest (``rtn``, the baseline a user would pick) and HQQ (``hqq``, the
``hqq`` package's half-quadratic fit of scale and zero). Each ``*_quantize`` returns a dict of the tensors that would
be stored and ``*_dequantize`` rebuilds the matrix; ``rtn_bits`` counts every stored bit.

* **RTN** (``rtn_quantize``): per group of ``group`` consecutive weights of a row, symmetric integers of ``bits``
  bits times one fp16 scale ``max|w| / (2^(bits−1) − 1)``. Bits per weight: ``bits + 16 / group``. In an artifact
  the codes are stored offset by 2^(bits−1) (unsigned) and bit-packed.
* **HQQ** (``hqq_quantize``): per group of ``group`` consecutive weights (rows flattened), unsigned ``bits``-bit codes
  with an fp16 scale and zero. Bits per weight: ``bits + 32 / group``.
"""
from __future__ import annotations

import torch

from ..packing import pack_bits, unpack_bits
import math

from .registry import Parts, as_matrix, meta_int, meta_shape, need_part, packed_size, register_codec

RTN = {"bits": 4, "group": 32}
HQQ = {"bits": 4, "group": 32}
RTN_LIMITS = {"bits": range(2, 9), "group": range(1, 4097)}  # signed int8 codes with at least one level each side
HQQ_LIMITS = {"bits": (1, 2, 3, 4, 8), "group": range(1, 4097)}  # the widths the hqq package quantizes to


def _grouped(w: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    rows, cols = w.shape
    pad = (-cols) % group
    return torch.cat([w.float(), w.new_zeros(rows, pad).float()], 1).reshape(rows, -1, group), pad


def rtn_quantize(w: torch.Tensor, bits: int = RTN["bits"], group: int = RTN["group"]) -> dict:
    qmax = 2 ** (bits - 1) - 1
    g, pad = _grouped(w, group)
    scale = (g.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-12).half()
    codes = torch.round(g / scale.float()).clamp(-qmax - 1, qmax).to(torch.int8)
    return {"codes": codes, "scale": scale, "shape": tuple(w.shape), "pad": pad, "bits": bits, "group": group}


def rtn_dequantize(q: dict) -> torch.Tensor:
    rows, cols = q["shape"]
    return (q["codes"].float() * q["scale"].float()).reshape(rows, -1)[:, :cols]


def rtn_bits(q: dict) -> int:
    return q["codes"].numel() * q["bits"] + q["scale"].numel() * 16


def hqq_quantizer():
    """The ``hqq`` package's ``Quantizer``. ``make setup`` installs hqq beside the environment (``.venv/hqq``), not
    on the import path: where transformers and peft find hqq they import it at start-up, and its module runs
    ``torch.compile`` decorators (measured: about 1 s more for every ``import peft``). It is put on the path here,
    when a codec first needs it."""
    import sys
    from pathlib import Path

    try:
        from hqq.core.quantize import Quantizer
    except ImportError:
        side = Path(sys.prefix) / "hqq"
        if not (side / "hqq").is_dir():
            raise ImportError("the hqq codec needs the hqq package: `make setup` installs it in .venv/hqq "
                              "(pip install --target .venv/hqq --no-deps hqq==0.2.8.post1)") from None
        sys.path.append(str(side))
        from hqq.core.quantize import Quantizer
    return Quantizer


def hqq_quantize(w: torch.Tensor, bits: int = HQQ["bits"], group: int = HQQ["group"]) -> dict:
    """HQQ (half-quadratic quantization, the ``hqq`` package): per group of ``group`` consecutive weights (rows
    flattened, as the package groups them), unsigned ``bits``-bit codes with a scale and a zero point that HQQ's
    optimizer fits to a sparsity-promoting error; scale and zero stored as fp16. Bits per weight:
    ``bits + 32 / group``."""
    Quantizer = hqq_quantizer()
    rows, cols = w.shape
    if (rows * cols) % group:
        raise ValueError(f"hqq: the tensor's {rows * cols} values are not a multiple of the group size {group}")
    codes, meta = Quantizer.quantize(w.float().contiguous(), nbits=bits, group_size=group, optimize=True, axis=1,
                                     bitpack=False, compute_dtype=torch.float32, device="cpu")
    n = rows * cols // group
    return {"codes": codes.reshape(n, 1, group).to(torch.uint8), "scale": meta["scale"].reshape(n, 1).half(),
            "zero": meta["zero"].reshape(n, 1).half(), "shape": (rows, cols), "bits": bits, "group": group}


def hqq_dequantize(q: dict) -> torch.Tensor:
    rows, cols = q["shape"]
    n = q["codes"].shape[0]
    out = (q["codes"].reshape(n, -1).float() - q["zero"].float()) * q["scale"].float()
    return out.reshape(rows, cols)


# --- artifact codecs ----------------------------------------------------------------------------------


def _encode_grouped(quantize, offset_codes: bool, tensor: torch.Tensor, settings: dict) -> tuple[Parts, dict]:
    """Parts and metadata of ``rtn`` (signed codes, stored offset by 2^(bits−1)) or ``hqq`` (unsigned, a zero)."""
    bits, group = int(settings["bits"]), int(settings["group"])
    q = quantize(as_matrix(tensor), bits, group)
    meta = dict(bits=bits, group=group, matrix=list(q["shape"]), n=q["codes"].numel(), groups=list(q["scale"].shape))
    offset = 1 << (bits - 1) if offset_codes else 0
    parts = {"codes": pack_bits(q["codes"].to(torch.int64) + offset, bits), "scale": q["scale"]}
    if "zero" in q:
        parts["zero"] = q["zero"]
    return parts, meta


def _check_grouped(parts: Parts, meta: dict, shape: tuple[int, ...], groups: list[int]) -> None:
    """The metadata's counts and the parts' sizes of an ``rtn`` / ``hqq`` entry with these ``groups``."""
    if meta.get("groups") != groups:
        raise ValueError(f"metadata groups {meta.get('groups')} must be {groups} for matrix {meta['matrix']} in groups "
                         f"of {meta['group']}")
    n = meta_int(meta, "n")
    if n != math.prod(groups) * meta["group"]:
        raise ValueError(f"metadata n {n} must be {math.prod(groups) * meta['group']} codes")
    need_part(parts, "codes", torch.uint8, packed_size(n, meta["bits"]))
    need_part(parts, "scale", torch.float16, shape=groups)


def _codes(parts: Parts, meta: dict) -> torch.Tensor:
    groups = meta["groups"]
    return unpack_bits(parts["codes"], meta["bits"], meta["n"]).reshape(groups[0], groups[1], -1)


@register_codec("rtn", RTN, RTN_LIMITS)
class _RTN:
    @staticmethod
    def encode(tensor: torch.Tensor, settings: dict, hessian: torch.Tensor | None = None) -> tuple[Parts, dict]:
        return _encode_grouped(rtn_quantize, True, tensor, settings)

    @staticmethod
    def check(parts: Parts, meta: dict, shape: tuple[int, ...]) -> None:
        rows, cols = meta_shape(meta, "matrix", shape)
        _check_grouped(parts, meta, shape, [rows, math.ceil(cols / meta["group"]), 1])  # rows padded to whole groups

    @staticmethod
    def decode(parts: Parts, meta: dict, shape: tuple[int, ...]) -> torch.Tensor:
        codes = _codes(parts, meta) - (1 << (meta["bits"] - 1))
        return rtn_dequantize({"codes": codes, "scale": parts["scale"], "shape": tuple(meta["matrix"])}).reshape(shape)


@register_codec("hqq", HQQ, HQQ_LIMITS)
class _HQQ:
    @staticmethod
    def encode(tensor: torch.Tensor, settings: dict, hessian: torch.Tensor | None = None) -> tuple[Parts, dict]:
        return _encode_grouped(hqq_quantize, False, tensor, settings)

    @staticmethod
    def check(parts: Parts, meta: dict, shape: tuple[int, ...]) -> None:
        rows, cols = meta_shape(meta, "matrix", shape)
        if rows * cols % meta["group"]:
            raise ValueError(f"{rows * cols} values are not whole groups of {meta['group']}")
        groups = [rows * cols // meta["group"], 1]
        _check_grouped(parts, meta, shape, groups)
        need_part(parts, "zero", torch.float16, shape=groups)

    @staticmethod
    def decode(parts: Parts, meta: dict, shape: tuple[int, ...]) -> torch.Tensor:
        q = {"codes": _codes(parts, meta), "scale": parts["scale"], "zero": parts["zero"],
             "shape": tuple(meta["matrix"])}
        return hqq_dequantize(q).reshape(shape)
