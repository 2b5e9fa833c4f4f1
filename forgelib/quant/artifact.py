"""One-file compressed artifacts: ``save_compressed(model, path, plan)`` and ``load_compressed(path)``, with every
stored bit counted.

A ``plan`` maps tensor names of ``model.state_dict()`` to a codec spec (a dict with ``codec`` and its settings);
tensors not named are stored as fp16 (``raw16``). Codecs (``CODECS``):

* ``raw16`` / ``raw32``: the values as fp16 / fp32.
* ``ternary``: a BitLinear weight: its codes packed base-3 (5 per byte) and one fp32 scale (``forgelib.quant.packing``).
* ``rtn``: round to nearest, ``bits`` and ``group`` (``codecs.rtn_quantize``); codes bit-packed, fp16 scales.
* ``hqq``: HQQ (the ``hqq`` package's half-quadratic optimizer of scale and zero), ``bits`` and ``group``; codes
  bit-packed, fp16 scale and zero per group.
* ``bfp``: block floating point, ``mantissa_bits``, ``block``, ``exp_bits`` (``codecs.bfp_quantize``).
* ``seedlm``: ``K``, ``C``, ``P`` (``forgelib.quant.seedlm``): seeds packed to K bits, coefficients to 4, exponents
  to 4.
* ``vq``: ``v``, ``codebook_bits``, ``residual`` (``codecs.vq_quantize``, Hessian-weighted when the calibration
  gives the tensor's input second moments): indices bit-packed, fp16 codebooks and row scales.
* ``hyper``: ``n``, ``index_bits`` (``codecs.hyper_quantize``): trajectory indices bit-packed, fp16 row ranges.

Integer fields are bit-packed (``pack_bits``) so that the bytes on disk are the bits the method claims.

The file is a safetensors file with **one** uint8 tensor, the payload: every stored part of every tensor back to
back. Its metadata holds, zlib-compressed and base64-encoded, the model's ``config``, each entry's codec, shape and
parts (name, dtype, shape, in payload order), a Quiet-STaR model's settings, and ``extras`` (tensors that are not
the model's, e.g. Phase-7 expert vectors). The tokenizer is written beside the file (``tokenizer.json``): it is not
counted as weights; ``artifact_report`` reads the bytes back and counts the header (metadata) as overhead, so
``bits_per_weight = 8 × file bytes / stored values`` counts everything in the file.
"""
from __future__ import annotations

import base64
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

CODECS = ("raw16", "raw32", "ternary", "rtn", "hqq", "bfp", "seedlm", "vq", "hyper")
EXTRA = "extra::"
"""Prefix of the entries that are not the model's (``extras``)."""


class ArtifactError(ValueError):
    """A file that is not a readable Agent Forge artifact, or one that does not fit its own layout."""


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


def _matrix(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)


def check_spec(name: str, spec: dict) -> dict:
    """A codec spec with its settings checked (unknown codec or setting: ValueError naming the tensor)."""
    allowed = {"raw16": set(), "raw32": set(), "ternary": set(), "rtn": {"bits", "group"}, "hqq": {"bits", "group"},
               "bfp": {"mantissa_bits", "block", "exp_bits"}, "seedlm": {"K", "C", "P"}, "vq": {"v", "codebook_bits", "residual"}, "hyper": {"n", "index_bits"}}
    codec = spec.get("codec", "raw16")
    if codec not in allowed:
        raise ValueError(f"tensor {name!r}: unknown codec {codec!r}; valid: {', '.join(CODECS)}")
    extra = set(spec) - allowed[codec] - {"codec"}
    if extra:
        raise ValueError(f"tensor {name!r}: codec {codec!r} has no setting {sorted(extra)}; "
                         f"valid: {sorted(allowed[codec]) or 'none'}")
    return spec


def _encode(name: str, tensor: torch.Tensor, spec: dict, hessian: torch.Tensor | None = None
            ) -> tuple[dict[str, torch.Tensor], dict]:
    """(stored parts, the entry's metadata) of one tensor under its codec (``hessian``: the input second moments
    of the layer the tensor feeds, used by ``vq``)."""
    codec = check_spec(name, spec).get("codec", "raw16")
    meta: dict[str, Any] = {"codec": codec, "shape": list(tensor.shape)}
    t = tensor.detach().float().cpu()
    if codec in ("raw16", "raw32"):
        return {"": t.half() if codec == "raw16" else t}, meta
    if codec == "ternary":
        from .bitnet import ternary_quantize
        from .packing import pack_ternary

        codes, scale = ternary_quantize(t)
        return {"packed": pack_ternary(codes, "base3"), "scale": scale.reshape(1)}, meta
    if codec in ("rtn", "hqq"):
        from .codecs import hqq_quantize, rtn_quantize

        bits, group = int(spec.get("bits", 4)), int(spec.get("group", 32))
        quantize = rtn_quantize if codec == "rtn" else hqq_quantize
        q = quantize(_matrix(t), bits, group)
        meta.update(bits=bits, group=group, matrix=list(q["shape"]), n=q["codes"].numel(), groups=list(q["scale"].shape))
        offset = 1 << (bits - 1) if codec == "rtn" else 0  # rtn codes are signed
        parts = {"codes": pack_bits(q["codes"].to(torch.int64) + offset, bits), "scale": q["scale"]}
        if "zero" in q:
            parts["zero"] = q["zero"]
        return parts, meta
    if codec == "bfp":
        from .codecs import bfp_quantize

        q = bfp_quantize(t, int(spec.get("mantissa_bits", 3)), int(spec.get("block", 8)), int(spec.get("exp_bits", 4)))
        meta.update({k: q[k] for k in ("mantissa_bits", "block", "exp_bits", "exp_lo", "pad")}, n=len(q["exp"]))
        return {"mant": pack_bits(q["mant"] + (1 << (q["mantissa_bits"] - 1)), q["mantissa_bits"]),
                "exp": pack_bits(q["exp"] - q["exp_lo"], q["exp_bits"])}, meta
    if codec == "seedlm":
        from .seedlm import SeedLMConfig, compress_matrix

        config = SeedLMConfig(K=int(spec.get("K", 12)), C=int(spec.get("C", 8)), P=int(spec.get("P", 3)))
        q = compress_matrix(_matrix(t), config)
        meta.update(K=config.K, C=config.C, P=config.P, pad=q["pad"], matrix=list(q["shape"]), n=len(q["seed"]),
                    seconds_per_block=q["seconds_per_block"])
        return {"seeds": pack_bits(q["seed"], config.K), "coefs": pack_bits(q["coef"].to(torch.int64) + 8, 4),
                "exps": pack_bits(q["exp"].to(torch.int64) + 15, 4)}, meta
    if codec == "vq":
        from .codecs import vq_quantize

        v, cb = int(spec.get("v", 4)), int(spec.get("codebook_bits", 8))
        q = vq_quantize(_matrix(t), v, cb, hessian_diag=hessian, residual=bool(spec.get("residual", False)))
        meta.update(v=v, codebook_bits=cb, matrix=list(q["shape"]), n=q["labels"].numel(), book=list(q["book"].shape),
                    residual="book2" in q, hessian=hessian is not None)
        parts = {"scale": q["scale"], "book": q["book"], "labels": pack_bits(q["labels"], cb)}
        if "book2" in q:
            parts.update(book2=q["book2"], labels2=pack_bits(q["labels2"], cb))
        return parts, meta
    from .codecs import hyper_quantize  # hyper

    n, bits = int(spec.get("n", 4)), int(spec.get("index_bits", 12))
    q = hyper_quantize(_matrix(t), n, bits)
    meta.update(n=n, index_bits=bits, matrix=list(q["shape"]), count=q["index"].numel())
    return {"index": pack_bits(q["index"], bits), "lo": q["lo"], "hi": q["hi"]}, meta


def _decode(name: str, parts: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    shape, codec = tuple(meta["shape"]), meta["codec"]
    if codec in ("raw16", "raw32"):
        return parts[""].float().reshape(shape)
    if codec == "ternary":
        from .export import latent_from_ternary
        from .packing import unpack_ternary

        codes = unpack_ternary(parts["packed"], shape, "base3")
        return latent_from_ternary(codes, parts["scale"][0], torch.float32)
    if codec in ("rtn", "hqq"):
        from .codecs import hqq_dequantize, rtn_dequantize

        bits, groups = meta["bits"], meta["groups"]
        codes = unpack_bits(parts["codes"], bits, meta["n"]).reshape(groups[0], groups[1], -1)
        if codec == "rtn":
            q = {"codes": codes - (1 << (bits - 1)), "scale": parts["scale"], "shape": tuple(meta["matrix"])}
            return rtn_dequantize(q).reshape(shape)
        q = {"codes": codes, "scale": parts["scale"], "zero": parts["zero"], "shape": tuple(meta["matrix"])}
        return hqq_dequantize(q).reshape(shape)
    if codec == "bfp":
        from .codecs import bfp_dequantize

        m, n = meta["mantissa_bits"], meta["n"]
        mant = unpack_bits(parts["mant"], m, n * meta["block"]).reshape(n, -1) - (1 << (m - 1))
        exp = unpack_bits(parts["exp"], meta["exp_bits"], n) + meta["exp_lo"]
        return bfp_dequantize({"mant": mant, "exp": exp, "shape": shape})
    if codec == "seedlm":
        from .seedlm import SeedLMConfig, decompress_matrix

        config = SeedLMConfig(K=meta["K"], C=meta["C"], P=meta["P"])
        n = meta["n"]
        packed = {"seed": unpack_bits(parts["seeds"], config.K, n),
                  "coef": (unpack_bits(parts["coefs"], 4, n * config.P) - 8).reshape(n, config.P),
                  "exp": unpack_bits(parts["exps"], 4, n) - 15, "shape": tuple(meta["matrix"]), "pad": meta["pad"]}
        return decompress_matrix(packed, config).reshape(shape)
    if codec == "vq":
        from .codecs import vq_dequantize

        q = {"scale": parts["scale"], "book": parts["book"], "labels": unpack_bits(parts["labels"], meta["codebook_bits"],
                                                                                    meta["n"]),
             "shape": tuple(meta["matrix"])}
        if meta["residual"]:
            q.update(book2=parts["book2"], labels2=unpack_bits(parts["labels2"], meta["codebook_bits"], meta["n"]))
        return vq_dequantize(q).reshape(shape)
    if codec == "hyper":
        from .codecs import hyper_dequantize

        q = {"index": unpack_bits(parts["index"], meta["index_bits"], meta["count"]), "lo": parts["lo"],
             "hi": parts["hi"], "shape": tuple(meta["matrix"]), "n": meta["n"], "index_bits": meta["index_bits"]}
        return hyper_dequantize(q).reshape(shape)
    raise ArtifactError(f"tensor {name!r}: unknown codec {codec!r} in the artifact")


def _owned(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without second names of tied tensors (the first name is stored, the rest re-tied on load)."""
    seen, out = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor
    return out


def _pack_meta(obj: dict) -> str:
    return base64.b64encode(zlib.compress(json.dumps(obj, separators=(",", ":")).encode(), 9)).decode()


def _unpack_meta(text: str) -> dict:
    return json.loads(zlib.decompress(base64.b64decode(text)))


def _model_parts(model: nn.Module) -> tuple[nn.Module, dict]:
    """(the causal LM, the wrapper's settings or {}) of a model or of a wrapper around one (a Quiet-STaR model: it
    has ``base`` and ``wrapper_settings()``, ``forgelib.thoughts``)."""
    settings = getattr(model, "wrapper_settings", None)
    return (model.base, settings()) if callable(settings) else (model, {})


def save_compressed(model: nn.Module, path: str | Path, plan: dict[str, dict] | None = None, tokenizer=None,
                    hessians: dict[str, torch.Tensor] | None = None,
                    extras: dict[str, torch.Tensor] | None = None) -> dict:
    """Write ``model`` (a causal LM or a QuietStarModel) as one artifact file (module docstring); returns
    ``artifact_report(path)``. ``plan`` may also name ``extra::<name>`` for an extra tensor (default raw16).
    ``tokenizer`` is saved beside the file (its folder). The file is written to a temporary name and renamed, so
    a failed write leaves an earlier artifact of that name intact."""
    from safetensors.torch import save_file

    plan, hessians, extras = plan or {}, hessians or {}, extras or {}
    unknown = sorted(set(plan) - set(model.state_dict()) - {EXTRA + k for k in extras})
    if unknown:
        raise ValueError(f"plan names tensors the model does not have: {unknown[:3]}")
    base, quietstar = _model_parts(model)
    tensors = {**_owned(model), **{EXTRA + k: v for k, v in extras.items()}}
    chunks, entries, offset = [], {}, 0
    for name, tensor in tensors.items():
        parts, meta = _encode(name, tensor, plan.get(name, {}), hessians.get(name))
        layout = []
        for key, part in parts.items():
            raw = part.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
            layout.append([key, str(part.dtype).removeprefix("torch."), list(part.shape), raw.numel()])
            chunks.append(raw)
            offset += raw.numel()
        entries[name] = {**meta, "parts": layout}
    header = {"entries": entries, "config": base.config.to_dict(), "quietstar": quietstar}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({"payload": torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)}, str(tmp),
                  metadata={"forge_artifact": _pack_meta(header)})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path.parent)
    return artifact_report(path)


def _read(path: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(header, {entry: {part: tensor}}) of an artifact, its layout checked against the payload."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no artifact at {path}")
    try:
        with safe_open(str(path), "pt") as handle:
            header = _unpack_meta((handle.metadata() or {})["forge_artifact"])
            payload = handle.get_tensor("payload")
    except Exception as exc:  # safetensors' own errors, a missing key, a bad header: all name the file
        raise ArtifactError(f"{path} is not an Agent Forge artifact ({type(exc).__name__}: {exc})") from exc
    out, offset = {}, 0
    for name, entry in header["entries"].items():
        parts = {}
        for key, dtype, shape, nbytes in entry["parts"]:
            raw = payload[offset:offset + nbytes].clone()
            if raw.numel() != nbytes or math.prod(shape) * torch.empty(0, dtype=getattr(torch, dtype)).element_size() != nbytes:
                raise ArtifactError(f"{path}: the payload does not fit the layout of {name!r} (truncated or tampered)")
            parts[key] = raw.view(getattr(torch, dtype)).reshape(shape)
            offset += nbytes
        out[name] = parts
    if offset != payload.numel():
        raise ArtifactError(f"{path}: {payload.numel() - offset} payload bytes beyond the layout (tampered)")
    return header, out


def artifact_report(path: str | Path) -> dict:
    """Bytes on disk, header bytes, payload bytes per tensor, stored values (``weights``, extras included), and
    ``bits_per_weight`` = 8 × file bytes / weights: everything in the file counted."""
    path = Path(path)
    with open(path, "rb") as handle:
        header_bytes = 8 + struct.unpack("<Q", handle.read(8))[0]
    header, _ = _read(path)
    per = {name: sum(p[3] for p in e["parts"]) for name, e in header["entries"].items()}
    weights = sum(math.prod(e["shape"]) for e in header["entries"].values())
    codecs: dict[str, int] = {}
    for e in header["entries"].values():
        codecs[e["codec"]] = codecs.get(e["codec"], 0) + math.prod(e["shape"])
    file_bytes = path.stat().st_size
    return {"file_bytes": file_bytes, "header_bytes": header_bytes, "payload_bytes": sum(per.values()),
            "per_tensor_bytes": per, "weights": weights, "weights_per_codec": codecs,
            "bits_per_weight": 8 * file_bytes / weights}


def load_extras(path: str | Path) -> dict[str, torch.Tensor]:
    """The extra tensors of an artifact (decoded), by the names ``save_compressed`` was given."""
    header, parts = _read(path)
    return {n.removeprefix(EXTRA): _decode(n, parts[n], e) for n, e in header["entries"].items() if n.startswith(EXTRA)}


def read_artifact(path: str | Path, wrap: Callable[[nn.Module, dict], nn.Module] | None = None) -> nn.Module:
    """The model the artifact holds, eval mode: decoded tensors, BitLinear layers again where the config says so.
    An artifact of a wrapped model (a Quiet-STaR model) needs ``wrap(causal_lm, settings)``, which builds the wrapper
    the stored state belongs to (``forgelib.modelio.load_compressed`` passes it); without it ArtifactError says so."""
    import forgelib.models  # noqa: F401  (registers Cognate)
    from transformers import AutoConfig, AutoModelForCausalLM

    header, parts = _read(path)
    config_dict = dict(header["config"])
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config)
    bitnet = getattr(config, "bitnet", None)
    if isinstance(bitnet, dict):
        from .bitnet import convert_to_bitnet

        convert_to_bitnet(model, include=bitnet.get("include"), quantize_activations=bitnet.get("activation_bits") is not None)
    base = model
    if header.get("quietstar"):
        if wrap is None:
            raise ArtifactError(f"{path}: the artifact holds a Quiet-STaR model; load it with "
                                "forgelib.modelio.load_model (or load_compressed)")
        model = wrap(base, header["quietstar"])
    state = {n: _decode(n, parts[n], e) for n, e in header["entries"].items() if not n.startswith(EXTRA)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight") and getattr(base.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ArtifactError(f"{path}: the artifact does not fit its config: missing {sorted(set(missing) - tied)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]}")
    if tied:
        base.tie_weights()
    return model.eval()
