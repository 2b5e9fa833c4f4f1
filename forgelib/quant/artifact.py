"""One-file compressed artifacts: ``save_compressed(model, path, plan)`` and ``load_compressed(path)``, with every
stored bit counted.

A ``plan`` maps tensor names of ``model.state_dict()`` to a codec; tensors not named are stored as fp16
(``raw16``). Codecs: ``raw16`` / ``raw32``; ``ternary`` (a BitLinear weight: its codes packed base-3, 5 per byte,
and one fp32 scale; ``forgelib.quant.packing``); ``rtn`` (``bits``, ``group``; integer codes bit-packed to ``bits``
bits each); ``seedlm`` (``K``, ``C``, ``P``; seeds packed to K bits, coefficients to 4, exponents to 4). Integer
fields are bit-packed (``pack_bits``) so that the bytes on disk are the bits the method claims, plus the
safetensors header.

The file is a safetensors file: one or more uint8/float16 tensors per model tensor, and in its metadata the model's
``config.json``, the plan, the shapes, and (optionally) the tokenizer's ``tokenizer.json``. ``artifact_report``
reads back the size on disk and the payload bits per tensor (the header counted as overhead), so bits per weight
are computed from the file itself.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn


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
    bits = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)[:n * width].reshape(n, width)
    return (bits << torch.arange(width)).sum(1)


def _encode(name: str, tensor: torch.Tensor, spec: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """(stored tensors, the entry's metadata) of one tensor under its codec."""
    codec = spec.get("codec", "raw16")
    meta: dict[str, Any] = {"codec": codec, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    t = tensor.detach().float().cpu()
    if codec in ("raw16", "raw32"):
        return {name: t.half() if codec == "raw16" else t}, meta
    if codec == "ternary":
        from .bitnet import ternary_quantize
        from .packing import pack_ternary

        codes, scale = ternary_quantize(t)
        return {f"{name}.packed": pack_ternary(codes, "base3"), f"{name}.scale": scale.reshape(1)}, meta
    if codec == "rtn":
        from .codecs import rtn_quantize

        bits, group = int(spec.get("bits", 4)), int(spec.get("group", 32))
        q = rtn_quantize(t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1), bits, group)
        meta.update(bits=bits, group=group, pad=q["pad"], matrix=list(q["shape"]), n=q["codes"].numel())
        return {f"{name}.codes": pack_bits(q["codes"].to(torch.int64) + (1 << (bits - 1)), bits),
                f"{name}.scale": q["scale"]}, meta
    if codec == "seedlm":
        from .seedlm import SeedLMConfig, compress_matrix

        config = SeedLMConfig(K=int(spec.get("K", 12)), C=int(spec.get("C", 8)), P=int(spec.get("P", 3)))
        q = compress_matrix(t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1), config)
        meta.update(K=config.K, C=config.C, P=config.P, pad=q["pad"], matrix=list(q["shape"]), n=len(q["seed"]),
                    seconds_per_block=q["seconds_per_block"])
        return {f"{name}.seeds": pack_bits(q["seed"], config.K),
                f"{name}.coefs": pack_bits(q["coef"].to(torch.int64) + 8, 4),
                f"{name}.exps": pack_bits(q["exp"].to(torch.int64) + 15, 4)}, meta
    raise ValueError(f"tensor {name!r}: unknown codec {codec!r}; valid: raw16, raw32, ternary, rtn, seedlm")


def _decode(name: str, tensors: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    shape, codec = tuple(meta["shape"]), meta["codec"]
    if codec in ("raw16", "raw32"):
        return tensors[name].float().reshape(shape)
    if codec == "ternary":
        from .export import latent_from_ternary
        from .packing import unpack_ternary

        codes = unpack_ternary(tensors[f"{name}.packed"], shape, "base3")
        return latent_from_ternary(codes, tensors[f"{name}.scale"][0], torch.float32)
    if codec == "rtn":
        from .codecs import rtn_dequantize

        bits, n = meta["bits"], meta["n"]
        codes = (unpack_bits(tensors[f"{name}.codes"], bits, n) - (1 << (bits - 1))).to(torch.int8)
        scale = tensors[f"{name}.scale"]
        q = {"codes": codes.reshape(scale.shape[0], scale.shape[1], -1), "scale": scale, "shape": tuple(meta["matrix"])}
        return rtn_dequantize(q).reshape(shape)
    if codec == "seedlm":
        from .seedlm import SeedLMConfig, decompress_matrix

        config = SeedLMConfig(K=meta["K"], C=meta["C"], P=meta["P"])
        n = meta["n"]
        packed = {"seed": unpack_bits(tensors[f"{name}.seeds"], config.K, n),
                  "coef": (unpack_bits(tensors[f"{name}.coefs"], 4, n * config.P) - 8).reshape(n, config.P),
                  "exp": unpack_bits(tensors[f"{name}.exps"], 4, n) - 15, "shape": tuple(meta["matrix"]),
                  "pad": meta["pad"]}
        return decompress_matrix(packed, config).reshape(shape)
    raise ValueError(f"tensor {name!r}: unknown codec {codec!r} in the artifact")


def _owned(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without second names of tied tensors (the first name is stored, the rest re-tied on load)."""
    seen, out = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor
    return out


def save_compressed(model: nn.Module, path: str | Path, plan: dict[str, dict] | None = None, tokenizer=None) -> dict:
    """Write ``model`` as one artifact file (module docstring); returns ``artifact_report(path)``."""
    from safetensors.torch import save_file

    plan = plan or {}
    unknown = sorted(set(plan) - set(model.state_dict()))
    if unknown:
        raise ValueError(f"plan names tensors the model does not have: {unknown[:3]}")
    stored, entries = {}, {}
    for name, tensor in _owned(model).items():
        tensors, meta = _encode(name, tensor, plan.get(name, {}))
        stored.update({k: v.contiguous() for k, v in tensors.items()})
        entries[name] = meta
    metadata = {"forge_artifact": json.dumps({"entries": entries, "config": model.config.to_dict()})}
    if tokenizer is not None:
        metadata["tokenizer"] = tokenizer.backend_tokenizer.to_str()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(stored, str(path), metadata=metadata)
    return artifact_report(path)


def artifact_report(path: str | Path) -> dict:
    """Bytes on disk, header bytes, payload bytes per model tensor, weights, and bits per weight (file bytes × 8 /
    weights: everything counted)."""
    from safetensors import safe_open

    path = Path(path)
    with open(path, "rb") as handle:
        header = 8 + struct.unpack("<Q", handle.read(8))[0]
    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()["forge_artifact"])
        sizes = {k: handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys()}
    weights = sum(math.prod(e["shape"]) for e in meta["entries"].values())
    per = {name: sum(v for k, v in sizes.items() if k == name or k.startswith(name + ".")) for name in meta["entries"]}
    file_bytes = path.stat().st_size
    return {"file_bytes": file_bytes, "header_bytes": header, "payload_bytes": sum(sizes.values()),
            "per_tensor_bytes": per, "weights": weights, "bits_per_weight": 8 * file_bytes / weights}


def load_compressed(path: str | Path) -> nn.Module:
    """The model the artifact holds (decoded tensors; BitLinear layers again where the config says so), eval mode."""
    import forgelib.models  # noqa: F401  (registers Cognate)
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()["forge_artifact"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    config_dict = dict(meta["config"])
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config)
    bitnet = getattr(config, "bitnet", None)
    if isinstance(bitnet, dict):
        from .bitnet import convert_to_bitnet

        convert_to_bitnet(model, include=bitnet.get("include"), quantize_activations=bitnet.get("activation_bits") is not None)
    state = {name: _decode(name, tensors, entry) for name, entry in meta["entries"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path}: the artifact does not fit its config: missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    if tied:
        model.tie_weights()
    return model.eval()
