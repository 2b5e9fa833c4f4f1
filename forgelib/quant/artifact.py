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

Reading trusts nothing the file says: the safetensors header length is checked against the file
(``forgelib.models.weights.safetensors_header``), the metadata is inflated to at most ``META_MAX_BYTES`` (a zlib
bomb stops there), every entry's layout is checked against the payload, every codec's settings against their ranges
and its parts' sizes against its metadata (``Codec.check``), and the config against the stored shapes on a model
built on the meta device, all before ``from_config`` allocates; every refusal is an ``ArtifactError`` naming the
file.
"""
from __future__ import annotations

import base64
import json
import math
import struct
import time
import zlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..models.weights import ModelLoadError, check_weights_fit, is_shape, meta_model, safetensors_header
from ..params import cut, short
from .codecs import CODECS as _REGISTRY
from .codecs import get_codec
from .packing import pack_bits, unpack_bits  # noqa: F401  (part of this module's interface)

CODECS = tuple(_REGISTRY)
"""The registered codecs' names (``forgelib.quant.codecs.CODECS``), in registration order."""
EXTRA = "extra::"
"""Prefix of the entries that are not the model's (``extras``)."""
WRAPPED = "base."
"""Prefix of the causal LM's entries in an artifact of a wrapped model (a Quiet-STaR model's ``base``)."""
META_MAX_BYTES = 16 << 20
"""The inflated metadata (JSON) of an artifact may hold at most 16 MiB (a tiny model's is ~20 KB, a 7B model's about
100 KB); inflating stops there, so a zlib bomb costs 16 MiB and a few milliseconds."""
DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
          "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
          "bool": torch.bool}
"""The dtypes a stored part may have."""


class ArtifactError(ModelLoadError):
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
    try:
        codec.check_settings(codec.settings(spec))
    except ValueError as exc:
        raise ValueError(f"tensor {name!r}: {exc}") from None
    return spec


def _encode(name: str, tensor: torch.Tensor, spec: dict, hessian: torch.Tensor | None = None
            ) -> tuple[dict[str, torch.Tensor], dict]:
    """(stored parts, the entry's metadata) of one tensor under its codec (``hessian``: the input second moments
    of the layer the tensor feeds, used by ``vq``)."""
    codec = get_codec(check_spec(name, spec).get("codec", "raw16"))
    parts, meta = codec.encode(tensor.detach().float().cpu(), codec.settings(spec), hessian)
    return parts, {"codec": codec.name, "shape": list(tensor.shape), **meta}


def _check_entry(name: str, parts: dict[str, torch.Tensor], meta: dict, where: str = "the artifact") -> None:
    """An entry's codec settings within their ranges and its parts' sizes fitting its metadata and shape, by
    arithmetic alone (``Codec.check_settings``, ``Codec.check``): ArtifactError naming ``where`` and the tensor."""
    if meta["codec"] not in _REGISTRY:
        raise ArtifactError(f"tensor {name!r}: unknown codec {short(meta['codec'])} in the artifact")
    codec = _REGISTRY[meta["codec"]]
    try:
        codec.check_settings(meta)
        codec.check(parts, meta, tuple(meta["shape"]))
    except (ValueError, TypeError, KeyError) as exc:
        raise ArtifactError(f"{where}: tensor {short(name)} ({codec.name}): {cut(str(exc), 200)}") from None


def _decode(name: str, parts: dict[str, torch.Tensor], meta: dict, where: str = "the artifact") -> torch.Tensor:
    """One entry's tensor, checked first (``_check_entry``); a codec's own error is an ArtifactError too."""
    _check_entry(name, parts, meta, where)
    try:
        return _REGISTRY[meta["codec"]].decode(parts, meta, tuple(meta["shape"]))
    except (ValueError, RuntimeError, IndexError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{where}: tensor {short(name)} ({meta['codec']}) cannot be decoded: "
                            f"{cut(str(exc), 200)}") from None


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


def _unpack_meta(text: str, where: str = "the artifact") -> dict:
    """The header of an artifact from its metadata string: base64, then zlib inflated to at most
    ``META_MAX_BYTES``, then JSON, its form checked (``_check_header``); ArtifactError naming ``where`` otherwise."""
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(base64.b64decode(text, validate=True), META_MAX_BYTES + 1)
    except (ValueError, zlib.error) as exc:  # binascii.Error is a ValueError
        raise ArtifactError(f"{where}: the artifact metadata is not base64 zlib data ({cut(str(exc), 100)})") from None
    if len(raw) > META_MAX_BYTES:
        raise ArtifactError(f"{where}: the artifact metadata inflates past {META_MAX_BYTES} bytes (a zlib bomb, or "
                            "not an artifact); refused")
    if not inflater.eof:
        raise ArtifactError(f"{where}: the artifact metadata's zlib stream is cut short")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{where}: the artifact metadata is not JSON ({cut(str(exc), 100)})") from None
    _check_header(header, where)
    return header


def _entry_problem(entry) -> str | None:
    """What is wrong with the form of one entry of an artifact header, or None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("codec"), str) or not is_shape(entry.get("shape")):
        return "needs a codec name and a shape (a list of integers >= 0)"
    if entry["codec"] not in _REGISTRY:
        return f"has unknown codec {short(entry['codec'])} in the artifact; known: {', '.join(_REGISTRY)}"
    if not isinstance(entry.get("parts"), list):
        return "has no list of parts"
    for part in entry["parts"]:
        if not (isinstance(part, list) and len(part) == 4 and isinstance(part[0], str) and part[1] in DTYPES
                and is_shape(part[2]) and is_shape(part[3:])):
            return f"has a part {short(part)}, not [name, dtype, shape, bytes] with a dtype of {', '.join(DTYPES)}"
        if math.prod(part[2]) * DTYPES[part[1]].itemsize != part[3]:
            return f"has part {short(part[0])} of {part[1]} {part[2]} in {part[3]} bytes"
    return None


def _check_header(header, where: str) -> None:
    """The form of an artifact header: ``entries`` (each ``_entry_problem``-free), ``config`` with a
    ``model_type``, ``quietstar`` a table (empty for a plain causal LM)."""
    if not isinstance(header, dict) or not isinstance(header.get("entries"), dict) \
            or not isinstance(header.get("config"), dict):
        raise ArtifactError(f"{where}: the artifact metadata has no 'entries' and 'config' tables: not an Agent "
                            "Forge artifact")
    if not isinstance(header["config"].get("model_type"), str):
        raise ArtifactError(f"{where}: the artifact's config has no model_type (a name)")
    if not isinstance(header.setdefault("quietstar", {}), dict):
        raise ArtifactError(f"{where}: the artifact's 'quietstar' settings are not a table")
    for name, entry in header["entries"].items():
        problem = _entry_problem(entry)
        if problem:
            raise ArtifactError(f"{where}: tensor {short(name)} {problem}")


def _model_parts(model: nn.Module) -> tuple[nn.Module, dict]:
    """(the causal LM, the wrapper's settings or {}) of a model or of a wrapper around one (a Quiet-STaR model: it
    has ``base`` and ``wrapper_settings()``, ``forgelib.quietstar``)."""
    settings = getattr(model, "wrapper_settings", None)
    return (model.base, settings()) if callable(settings) else (model, {})


def save_compressed(model: nn.Module, path: str | Path, plan: dict[str, dict] | None = None, tokenizer=None,
                    hessians: dict[str, torch.Tensor] | None = None,
                    extras: dict[str, torch.Tensor] | None = None) -> dict:
    """Write ``model`` (a causal LM or a QuietStarModel) as one artifact file (module docstring); returns
    ``artifact_report(path)`` plus ``encode_seconds`` (per entry, the seconds its codec's encode took).
    ``plan`` may also name ``extra::<name>`` for an extra tensor (default raw16).
    ``tokenizer`` is saved beside the file (its folder). The file is written to a temporary name and renamed, so
    a failed write leaves an earlier artifact of that name intact."""
    from safetensors.torch import save_file

    plan, hessians, extras = plan or {}, hessians or {}, extras or {}
    unknown = sorted(set(plan) - set(model.state_dict()) - {EXTRA + k for k in extras})
    if unknown:
        raise ValueError(f"plan names tensors the model does not have: {unknown[:3]}")
    base, quietstar = _model_parts(model)
    tensors = {**_owned(model), **{EXTRA + k: v for k, v in extras.items()}}
    chunks, entries, offset, seconds = [], {}, 0, {}
    for name, tensor in tensors.items():
        started = time.perf_counter()
        parts, meta = _encode(name, tensor, plan.get(name, {}), hessians.get(name))
        seconds[name] = time.perf_counter() - started
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
    return {**artifact_report(path), "encode_seconds": seconds}


def read_parts(path: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(header, {entry: {part: tensor}}) of an artifact, its header and layout checked against the file before the
    payload is read (module docstring)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no artifact at {path}")
    tensors, metadata = safetensors_header(path, ArtifactError)
    payload = tensors.get("payload")
    if "forge_artifact" not in metadata or set(tensors) != {"payload"} or payload["dtype"] != "U8" \
            or len(payload["shape"]) != 1:
        raise ArtifactError(f"{path} is not an Agent Forge artifact (no forge_artifact metadata beside one uint8 "
                            "payload)")
    header = _unpack_meta(metadata["forge_artifact"], str(path))
    layout = sum(part[3] for entry in header["entries"].values() for part in entry["parts"])
    if layout != payload["shape"][0]:
        raise ArtifactError(f"{path}: the layout needs {layout} payload bytes but the payload holds "
                            f"{payload['shape'][0]} (truncated or tampered)")
    try:
        with safe_open(str(path), "pt") as handle:
            data = handle.get_tensor("payload")
    except Exception as exc:  # safetensors' own checks: the file is named
        raise ArtifactError(f"{path} is not an Agent Forge artifact ({type(exc).__name__}: {cut(str(exc), 200)})"
                            ) from None
    out, offset = {}, 0
    for name, entry in header["entries"].items():
        parts = {}
        for key, dtype, shape, nbytes in entry["parts"]:
            parts[key] = data[offset:offset + nbytes].clone().view(DTYPES[dtype]).reshape(shape)
            offset += nbytes
        out[name] = parts
    return header, out


def artifact_report(path: str | Path) -> dict:
    """Bytes on disk, header bytes, payload bytes per tensor, stored values (``weights``, extras included), and
    ``bits_per_weight`` = 8 × file bytes / weights: everything in the file counted."""
    path = Path(path)
    header, _ = read_parts(path)  # checks the header length against the file first
    with open(path, "rb") as handle:
        header_bytes = 8 + struct.unpack("<Q", handle.read(8))[0]
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
    header, parts = read_parts(path)
    return {n.removeprefix(EXTRA): _decode(n, parts[n], e, str(path)) for n, e in header["entries"].items()
            if n.startswith(EXTRA)}


def _config(header: dict, path: Path):
    """The transformers config of an artifact's ``config`` table (ArtifactError naming the file otherwise)."""
    from transformers import AutoConfig

    config_dict = dict(header["config"])
    model_type = config_dict.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **config_dict)
    except Exception as exc:  # transformers' own checks of a hostile config: ValueError, KeyError, TypeError...
        raise ArtifactError(f"{path}: the artifact's config (model_type {short(model_type)}) is no model "
                            f"configuration ({type(exc).__name__}: {cut(str(exc), 200)})") from None


def _checked_model(header: dict, parts: dict, path: Path) -> nn.Module:
    """The causal LM the artifact's config describes, allocated only once every entry (codec settings, parts'
    sizes) and the config (a model built on the meta device against the stored shapes) have been checked."""
    from transformers import AutoModelForCausalLM

    for name, entry in header["entries"].items():
        _check_entry(name, parts[name], entry, str(path))
    config = _config(header, path)
    wrapped = bool(header["quietstar"])
    stored = {name.removeprefix(WRAPPED): tuple(entry["shape"]) for name, entry in header["entries"].items()
              if not name.startswith(EXTRA) and (name.startswith(WRAPPED) or not wrapped)}
    plain = meta_model(config, stored, str(path), ArtifactError)
    check_weights_fit(plain, stored, str(path), ArtifactError, weights="the artifact's entries")
    return AutoModelForCausalLM.from_config(config)


def read_artifact(path: str | Path, wrap: Callable[[nn.Module, dict, dict], nn.Module] | None = None) -> nn.Module:
    """The model the artifact holds, eval mode: decoded tensors, BitLinear layers again where the config says so.
    An artifact of a wrapped model (a Quiet-STaR model) needs ``wrap(causal_lm, settings, stored)``, which builds
    the wrapper the stored state belongs to (``stored``: {name: shape} of the wrapper's own entries, to check the
    settings against before anything is allocated; ``forgelib.modelio.load_compressed`` passes it); without it
    ArtifactError says so. Every check of the file comes before any allocation (module docstring)."""
    import forgelib.models  # noqa: F401  (registers Cognate)

    path = Path(path)
    header, parts = read_parts(path)
    if header["quietstar"] and wrap is None:
        raise ArtifactError(f"{path}: the artifact holds a Quiet-STaR model; load it with "
                            "forgelib.modelio.load_model (or load_compressed)")
    model = _checked_model(header, parts, path)
    bitnet = getattr(model.config, "bitnet", None)
    if isinstance(bitnet, dict):
        from .bitnet import convert_to_bitnet

        try:
            convert_to_bitnet(model, include=bitnet.get("include"),
                              quantize_activations=bitnet.get("activation_bits") is not None)
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"{path}: the config's 'bitnet' entry cannot convert the model "
                                f"({cut(str(exc), 200)})") from None
    base = model
    if header["quietstar"]:
        own = {n: tuple(e["shape"]) for n, e in header["entries"].items() if not n.startswith((EXTRA, WRAPPED))}
        model = wrap(base, header["quietstar"], own)
    state = {n: _decode(n, parts[n], e, str(path)) for n, e in header["entries"].items() if not n.startswith(EXTRA)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a size mismatch of the wrapper's own tensors
        raise ArtifactError(f"{path}: the artifact does not fit its model ({cut(str(exc), 200)})") from None
    tied = {n for n in missing if n.endswith("lm_head.weight") and getattr(base.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ArtifactError(f"{path}: the artifact does not fit its config: missing {sorted(set(missing) - tied)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]}")
    if tied:
        base.tie_weights()
    return model.eval()
