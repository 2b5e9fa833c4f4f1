"""One-file compressed artifacts: ``save_compressed(model, path, plan)`` and ``load_compressed(path)``, with every
stored bit counted.

A ``plan`` maps tensor names of ``model.state_dict()`` to a codec spec (a dict with ``codec`` and its settings);
tensors not named are stored as fp16 (``raw16``). The codecs (``CODECS``: raw16, raw32, ternary, rtn, hqq, bfp,
seedlm, vq, hyper) and the defaults of their settings live in the codec registry, ``forgelib.quant.codecs``: this
module is the container format only, and dispatches each tensor to its codec's encode / decode. Integer fields are
bit-packed (``pack_bits``) so that the bytes on disk are the bits the method claims.

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
from typing import Callable

import torch
from torch import nn

from .codecs import CODECS as _REGISTRY
from .codecs import get_codec
from .packing import pack_bits, unpack_bits  # noqa: F401  (part of this module's interface)

CODECS = tuple(_REGISTRY)
"""The registered codecs' names (``forgelib.quant.codecs.CODECS``), in registration order."""
EXTRA = "extra::"
"""Prefix of the entries that are not the model's (``extras``)."""


class ArtifactError(ValueError):
    """A file that is not a readable Agent Forge artifact, or one that does not fit its own layout."""


def check_spec(name: str, spec: dict) -> dict:
    """A codec spec with its settings checked against the codec's defaults (unknown codec or setting: ValueError
    naming the tensor, the codec, the bad setting and the valid ones)."""
    codec_name = spec.get("codec", "raw16")
    try:
        codec = get_codec(codec_name)
    except ValueError as exc:
        raise ValueError(f"tensor {name!r}: {exc}") from None
    extra = codec.unknown_settings(spec)
    if extra:
        raise ValueError(f"tensor {name!r}: codec {codec_name!r} has no setting {extra}; "
                         f"valid: {sorted(codec.defaults) or 'none'}")
    return spec


def _encode(name: str, tensor: torch.Tensor, spec: dict, hessian: torch.Tensor | None = None
            ) -> tuple[dict[str, torch.Tensor], dict]:
    """(stored parts, the entry's metadata) of one tensor under its codec (``hessian``: the input second moments
    of the layer the tensor feeds, used by ``vq``)."""
    codec = get_codec(check_spec(name, spec).get("codec", "raw16"))
    parts, meta = codec.encode(tensor.detach().float().cpu(), codec.settings(spec), hessian)
    return parts, {"codec": codec.name, "shape": list(tensor.shape), **meta}


def _decode(name: str, parts: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    if meta["codec"] not in _REGISTRY:
        raise ArtifactError(f"tensor {name!r}: unknown codec {meta['codec']!r} in the artifact")
    return _REGISTRY[meta["codec"]].decode(parts, meta, tuple(meta["shape"]))


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
            itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
            if raw.numel() != nbytes or math.prod(shape) * itemsize != nbytes:
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

        convert_to_bitnet(model, include=bitnet.get("include"),
                          quantize_activations=bitnet.get("activation_bits") is not None)
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
