"""Packed BitNet checkpoints: ``export_packed`` writes one, ``load_packed`` reads it back for packed inference
(``PackedBitLinear``) or, with ``trainable=True``, as BitLinear modules to train on.

Folder layout: ``config.json`` (the model's config; its ``bitnet`` entry names the converted suffixes, the
activation bits, the embedding bits and the ``packing``), ``model.safetensors`` and, when a tokenizer is passed,
its files. The safetensors file holds every tensor of ``model.state_dict()`` as is, except:

* each BitLinear ``<name>.weight`` is replaced by ``<name>.weight_packed`` (uint8, ``forgelib.quant.packing``) and
  ``<name>.weight_scale`` (float32 0-d, mean|W|), which are exactly the buffer names of ``PackedBitLinear``;
* each Int8Embedding / Int8Linear ``<name>.weight`` (``convert_to_bitnet(embedding_bits=8)``) by
  ``<name>.weight_int8`` (int8 codes) and ``<name>.weight_absmax`` (float32, one per row); a 4-bit Int8Linear
  (``int4_include``) by ``<name>.weight_int4`` (uint8, two codes to a byte: ``pack_int4``) and ``.weight_absmax``;
* modules the saved config never runs are left out (``unused_modules``: a Cognate model's Titans memory when
  ``use_memory`` is off); the saved config says they are not built (``memory_modules: false``), so the loaded model
  has no such parameters at all and its output cannot differ (switching the memory on raises a clear error).

The metadata entry ``bitnet`` (JSON) records the packing, each packed weight's [out, in] shape, the int8 weights'
shapes, the modules left out and the aliases: a tensor reachable under two names (tied ``lm_head.weight`` =
``model.embed_tokens.weight``) is written once under its first name and re-tied on load.

Export keeps only the codes and the scales: the latent full-precision weights of a trained model are lost, so
``load_packed(trainable=True)`` resumes from latent weights rebuilt from them (``latent_from_ternary``,
``latent_from_int8``) whose own quantization gives back exactly the stored codes and scales: the reloaded
trainable model computes exactly the packed model's logits, but from a fresh latent state (weights near a
rounding boundary no longer remember which side they were approaching).
"""
from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..models.weights import (ModelLoadError, check_weights_fit, is_shape, meta_model, read_json_file,
                              safetensors_header)
from ..params import cut, short
from .bitnet import (PackedBitLinear, bitlinear_modules, convert_to_bitnet, int8_dequantize, int8_modules,
                     int8_quantize, int_max, ternary_quantize)
from .packing import PACKINGS, check_packing, pack_ternary, packed_shape, unpack_ternary

WEIGHTS_NAME = "model.safetensors"
METADATA_KEY = "bitnet"


class PackedModelError(ModelLoadError):
    """A packed BitNet folder cannot be loaded (the message names the file or tensor and what is wrong)."""


def _aliases(model: nn.Module) -> dict[str, str]:
    """state_dict names that are a second name of an earlier tensor (tied weights, shared modules) -> first name."""
    keys = set(model.state_dict())
    first: dict[int, str] = {}
    aliases = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if tensor is None or name not in keys:
            continue
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def header_bytes(path) -> int:
    """Bytes before a safetensors file's tensor data: the 8-byte little-endian header length plus the header
    (PackedModelError when the length field claims more than the file holds)."""
    size = Path(path).stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
    length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
    if length is None or length > size - 8:
        raise PackedModelError(f"{path}: its header length field ({length}) does not fit the file's {size} bytes")
    return 8 + length


def unused_modules(model: nn.Module) -> list[str]:
    """Names of the modules the model's config never runs, which ``export_packed`` leaves out: a Cognate model's
    Titans memory (``memory_modules`` built, ``use_memory`` off). Nothing else (the ACT halting head is kept: with
    ``use_act`` it runs in every forward, even at one cycle, and its logits enter the training loss)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "cognate" or not getattr(config, "memory_modules", False) \
            or getattr(config, "use_memory", False):
        return []
    from ..models.memory import CognateMemory

    return [name for name, module in model.named_modules() if isinstance(module, CognateMemory)]


def _saved_config(model: nn.Module, settings: dict, packing: str, dropped: list[str]):
    config = copy.deepcopy(model.config)
    config.bitnet = {**settings, "packing": packing}
    if dropped:  # the only modules unused_modules drops: Cognate's memory
        config.memory_modules = False
    return config


def _checked_layers(model: nn.Module, packing: str) -> tuple[dict, dict, dict, set[str], set[str]]:
    """What ``export_packed`` packs, checked: (the BitLinear layers, the config's ``bitnet`` settings, the tied
    tensors' aliases, the packed weights' names, the int8 weights' names); ValueError naming what cannot be packed."""
    check_packing(packing)
    layers = bitlinear_modules(model)
    if not layers:
        raise ValueError(f"export_packed: {type(model).__name__} has no BitLinear layer; call convert_to_bitnet first")
    settings = getattr(getattr(model, "config", None), "bitnet", None)
    if not isinstance(settings, dict) or "include" not in settings:
        raise ValueError("export_packed: model.config has no 'bitnet' entry; convert the model with convert_to_bitnet")
    aliases = _aliases(model)
    packed_names = {f"{name}.weight" for name in layers}
    tangled = sorted(n for pair in aliases.items() if set(pair) & packed_names for n in pair)
    if tangled:
        raise ValueError(f"export_packed: BitLinear weights shared with other tensors cannot be packed: {tangled}")
    int8_names = {f"{name}.weight" for name in int8_modules(model)}
    tangled = sorted(n for pair in aliases.items() if len(set(pair) & int8_names) == 1 for n in pair)
    if tangled:
        raise ValueError(f"export_packed: int8 weights shared with full-precision modules: {tangled}")
    return layers, settings, aliases, packed_names, int8_names


def _pack_layers(layers: dict, packing: str, tensors: dict, accounting: dict) -> dict[str, list[int]]:
    """Each BitLinear layer's packed ternary codes and scale into ``tensors`` (counted in ``accounting``); their
    weights' shapes."""
    shapes = {}
    for name, layer in layers.items():
        codes, scale = ternary_quantize(layer.weight)
        packed = pack_ternary(codes.cpu(), packing)
        tensors[f"{name}.weight_packed"] = packed
        tensors[f"{name}.weight_scale"] = scale.cpu().reshape(())
        shapes[name] = list(layer.weight.shape)
        accounting["packed_bytes"] += packed.numel()
        accounting["scale_bytes"] += 4
        accounting["ternary_weights"] += codes.numel()
    return shapes


def _pack_int8_layers(state: dict, int8_layers: dict[str, str], tensors: dict, accounting: dict,
                      bits: int = 8) -> dict:
    """The int8 (``bits=4``: int4) layers' codes and row maxima into ``tensors`` (counted in ``accounting``); their
    weights' shapes."""
    shapes = {name: list(state[key].shape) for name, key in int8_layers.items()}
    tensors.update(pack_int8_tensors({key: state[key] for key in int8_layers.values()}, int8_layers, bits))
    suffix, kind = (INT8_SUFFIX, "int8") if bits == 8 else (INT4_SUFFIX, "int4")
    for name in int8_layers:
        accounting[f"{kind}_bytes"] += tensors[name + suffix].numel()
        accounting[f"{kind}_scale_bytes"] += 4 * tensors[name + ABSMAX_SUFFIX].numel()
        accounting[f"{kind}_weights"] += math.prod(shapes[name])
    return shapes


def _file_accounting(accounting: dict, file: Path) -> dict:
    """``accounting`` completed from the written file: tensor, header and file bytes, bits per ternary weight."""
    accounting["tensor_bytes"] = sum(accounting[k] for k in ("packed_bytes", "scale_bytes", "int8_bytes",
                                                             "int8_scale_bytes", "int4_bytes", "int4_scale_bytes",
                                                             "other_bytes"))
    accounting["header_bytes"] = header_bytes(file)
    accounting["file_bytes"] = file.stat().st_size
    n = accounting["ternary_weights"]
    accounting["bits_per_ternary_weight"] = 8 * accounting["packed_bytes"] / n
    accounting["bits_per_ternary_weight_with_scales"] = 8 * (accounting["packed_bytes"] + accounting["scale_bytes"]) / n
    return accounting


@torch.no_grad()
def export_packed(model: nn.Module, path, packing: str = "2bit", tokenizer=None) -> dict:
    """Write ``model`` (converted with ``convert_to_bitnet``) as a packed folder (layout in the module docstring).

    Returns the byte accounting: ``packed_bytes`` (ternary codes), ``scale_bytes``, ``int8_bytes`` (int8 codes),
    ``int8_scale_bytes`` (their row maxima), ``int4_bytes`` / ``int4_scale_bytes`` / ``int4_weights`` (the
    same for 4-bit layers), ``other_bytes`` (every other tensor), ``tensor_bytes`` (their sum),
    ``header_bytes``, ``file_bytes`` (model.safetensors on disk, equal to tensor_bytes + header_bytes),
    ``ternary_weights``, ``int8_weights``, ``dropped_weights`` (values of the modules left out),
    ``dropped_modules``, ``bits_per_ternary_weight`` (codes only) and ``bits_per_ternary_weight_with_scales``."""
    layers, settings, aliases, packed_names, int8_names = _checked_layers(model, packing)
    bits = {name: getattr(module, "bits", 8) for name, module in int8_modules(model).items()}
    int_layers = {name.removesuffix(".weight"): name for name in sorted(int8_names) if name not in aliases}
    int8_layers = {name: key for name, key in int_layers.items() if bits[name] == 8}
    int4_layers = {name: key for name, key in int_layers.items() if bits[name] == 4}
    dropped = unused_modules(model)
    state = model.state_dict()
    is_dropped = lambda key: any(key.startswith(prefix + ".") for prefix in dropped)  # noqa: E731
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()
               if key not in aliases and key not in packed_names and key not in int8_names and not is_dropped(key)}
    accounting = dict(packing=packing, other_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
                      packed_bytes=0, scale_bytes=0, int8_bytes=0, int8_scale_bytes=0, ternary_weights=0,
                      int8_weights=0, int4_bytes=0, int4_scale_bytes=0, int4_weights=0,
                      dropped_weights=sum(v.numel() for k, v in state.items() if is_dropped(k) and k not in aliases),
                      dropped_modules=list(dropped))
    shapes = _pack_layers(layers, packing, tensors, accounting)
    int8_shapes = _pack_int8_layers(state, int8_layers, tensors, accounting)
    int4_shapes = _pack_int8_layers(state, int4_layers, tensors, accounting, bits=4)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"packing": packing, "shapes": shapes, "aliases": aliases, "int8": int8_shapes, "dropped": dropped,
              **({"int4": int4_shapes} if int4_shapes else {})}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", METADATA_KEY: json.dumps(record)})
    _saved_config(model, settings, packing, dropped).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return _file_accounting(accounting, folder / WEIGHTS_NAME)


def _record(file: Path, text: str | None) -> dict:
    """The ``bitnet`` metadata record of a packed file, its layout checked (PackedModelError naming the file)."""
    try:
        record = json.loads(text or "null")
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict) or "shapes" not in record:
        raise PackedModelError(f"{str(file)!r} has no '{METADATA_KEY}' metadata: not written by export_packed")
    record = {"aliases": {}, "int8": {}, "int4": {}, "dropped": [], **record}
    tables = (record["shapes"], record["int8"], record["int4"])
    if not isinstance(record.get("packing"), str) \
            or not all(isinstance(t, dict) and all(is_shape(v) and v for v in t.values()) for t in tables) \
            or not isinstance(record["aliases"], dict) \
            or not all(isinstance(v, str) for v in record["aliases"].values()):
        raise PackedModelError(f"{file}: the '{METADATA_KEY}' metadata is malformed (packing: a name; shapes, int8 "
                               "and int4: layer -> shape; aliases: tensor -> tensor)")
    return record


def _read_checked(file: Path) -> tuple[dict, dict]:
    """(tensors, bitnet record) of a packed model.safetensors, after checking its header against the file
    (``forgelib.models.weights.safetensors_header``: a header length beyond the file is refused before anything is
    read, a truncated file gets an error naming the tensors it lost) and the record's layout."""
    if not file.is_file():
        raise PackedModelError(f"{str(file)!r} does not exist: not a packed BitNet folder")
    _, metadata = safetensors_header(file, PackedModelError)
    record = _record(file, metadata.get(METADATA_KEY))
    try:
        with safe_open(str(file), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # safetensors' own checks (overlapping offsets, ...): the file is named
        raise PackedModelError(f"{file}: unreadable safetensors file ({cut(str(err), 200)})") from None
    return tensors, record


def _packed_shape_problem(packed: torch.Tensor, name: str, shape: tuple, packing: str) -> str | None:
    expected = packed_shape(shape, packing)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
        return (f"tensor {name}.weight_packed is {packed.dtype} {list(packed.shape)}, but a {list(shape)} weight "
                f"packed as {packing!r} is uint8 {list(expected)} (truncated or tampered)")
    return None


def _logical_shapes(tensors: dict, record: dict, packing: str) -> dict[str, tuple[int, ...]]:
    """{state name: shape} the stored tensors stand for: a packed layer's weight has its recorded shape (checked
    against the packed tensor), an int8 weight its codes' shape; scales stand for nothing of the plain model."""
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(".weight_packed"):
            name = key.removesuffix(".weight_packed")
            if name not in record["shapes"]:
                raise PackedModelError(f"tensor {short(key)} has no shape in the '{METADATA_KEY}' metadata")
            shape = tuple(record["shapes"][name])
            problem = _packed_shape_problem(tensor, name, shape, packing)
            if problem:
                raise PackedModelError(problem)
            out[f"{name}.weight"] = shape
        elif key.endswith(INT8_SUFFIX):
            out[key.removesuffix(INT8_SUFFIX) + ".weight"] = tuple(tensor.shape)
        elif key.endswith(INT4_SUFFIX):
            name = key.removesuffix(INT4_SUFFIX)
            if name not in record["int4"]:
                raise PackedModelError(f"tensor {short(key)} has no shape in the '{METADATA_KEY}' metadata")
            shape = tuple(record["int4"][name])
            if tensor.dtype != torch.uint8 or tuple(tensor.shape) != int4_packed_shape(shape):
                raise PackedModelError(f"tensor {key} is {tensor.dtype} {list(tensor.shape)}, but a {list(shape)} "
                                       f"weight packed as 4-bit codes is uint8 {list(int4_packed_shape(shape))} "
                                       "(truncated or tampered)")
            out[f"{name}.weight"] = shape
        elif not key.endswith((".weight_scale", ABSMAX_SUFFIX)):
            out[key] = tuple(tensor.shape)
    return out


def _checked_codes(tensors: dict, name: str, shape: tuple, packing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, scale) of layer ``name``, their dtypes and shapes checked against the recorded weight shape."""
    packed, scale = tensors.get(f"{name}.weight_packed"), tensors.get(f"{name}.weight_scale")
    if packed is None or scale is None:
        raise PackedModelError(f"packed weight of {name!r} is missing ({name}.weight_packed / .weight_scale)")
    problem = _packed_shape_problem(packed, name, shape, packing)
    if problem:
        raise PackedModelError(problem)
    if scale.dtype != torch.float32 or scale.numel() != 1:
        raise PackedModelError(f"tensor {name}.weight_scale must be one float32, got {scale.dtype} "
                               f"{list(scale.shape)}")
    try:
        unpack_ternary(packed, shape, packing)  # rejects impossible byte values
    except ValueError as err:
        raise PackedModelError(f"tensor {name}.weight_packed: {err}") from err
    return packed, scale.reshape(())


def latent_from_ternary(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A latent weight whose absmean quantization (``ternary_quantize``) gives back exactly ``codes`` and ``scale``.

    Not codes * scale itself: the mean |.| of that tensor is scale * (nonzero fraction), so re-quantizing it
    would shrink the scale (same codes, a different forward). The k nonzero entries are instead +-m with
    m = scale * numel / k (>= scale, so each rounds and clips back to +-1), except one, which takes the remainder
    ``scale * numel - (k - 1) * m``. Why the remainder: the float64 sum ``ternary_quantize`` takes is then exact
    in any summation order (every partial sum is j * m or j * m + remainder, at most 24 + log2(k) bits), and it
    misses scale * numel only by the float32 rounding of the remainder, 1/k of an ulp of the scale, so the mean
    rounds back to exactly ``scale`` (a single m for all entries missed it by up to an ulp: measured up to 1.3e-3
    on logits of a trained model, through the 8-bit activation rounding). The result is checked, and the
    remainder nudged by an ulp while it is not exact (the tiny-k corner). All-zero codes give zeros (scale eps,
    the same zero output). Exact in float32; another ``dtype`` rounds the latent again."""
    nonzero = int(torch.count_nonzero(codes))
    if nonzero == 0:
        return torch.zeros(codes.shape, dtype=dtype)
    scale32 = scale.detach().float().reshape(())
    target = scale32.double() * codes.numel()  # exact: 24-bit scale times numel < 2**29
    m = (target / nonzero).float()
    latent = codes.float() * m  # (out, in): entries 0, +-m
    flat = latent.view(-1)
    first = int(torch.nonzero(codes.reshape(-1))[0])
    sign = float(codes.reshape(-1)[first])
    rest = (target - (nonzero - 1) * m.double()).float()  # the remainder, float32
    candidates, up, down = [rest], rest, rest
    for _ in range(4):  # the tiny-k corner: the neighbours of the remainder, nearest first
        up, down = torch.nextafter(up, torch.tensor(math.inf)), torch.nextafter(down, torch.tensor(-math.inf))
        candidates += [up, down]
    for value in candidates:
        flat[first] = sign * value
        got_codes, got_scale = ternary_quantize(latent)
        if got_scale == scale32 and torch.equal(got_codes, codes.to(torch.int8)):
            break
    else:
        flat[first] = sign * rest
    return latent.to(dtype)


def latent_from_int8(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype, bits: int = 8) -> torch.Tensor:
    """A latent weight whose per-row int8 quantization (``int8_quantize``) gives back exactly ``codes`` and
    ``absmax``: ``codes * absmax / 127`` (the values the int8 layer computes with), with the entries whose code is
    +-127 set to +-absmax itself, so that the row maximum, hence the step absmax / 127, is the stored one bit for
    bit (``127 * step`` would round). ``bits=4``: the same with 7. Exact in float32; another ``dtype`` rounds the
    latent again."""
    latent = int8_dequantize(codes, absmax, torch.float32, bits)  # (rows, cols)
    full = codes.abs() == int_max(bits)
    latent = torch.where(full, codes.sign().float() * absmax.float().unsqueeze(-1), latent)
    return latent.to(dtype)


INT8_SUFFIX, INT4_SUFFIX, ABSMAX_SUFFIX = ".weight_int8", ".weight_int4", ".weight_absmax"
INT4_OFFSET = 8
"""A 4-bit code c in [-7, 7] is stored as the nibble c + 8 (1..15; 0 never occurs)."""


def int4_packed_shape(shape) -> tuple[int, ...]:
    """The uint8 shape ``pack_int4`` gives for codes of ``shape``: two codes to a byte along the last dimension."""
    *rows, cols = shape
    return (*rows, (cols + 1) // 2)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes in [-7, 7] (any integer dtype, last dimension ``cols``) as uint8, two to a byte: column 2j in
    the low nibble, 2j + 1 in the high one, each stored as code + 8; an odd last column is paired with code 0."""
    if codes.numel() and int(codes.abs().max()) > int_max(4):
        raise ValueError("pack_int4: codes must lie in [-7, 7]")
    nibbles = (codes.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    if nibbles.shape[-1] % 2:
        nibbles = torch.cat([nibbles, torch.full((*nibbles.shape[:-1], 1), INT4_OFFSET, dtype=torch.uint8)], dim=-1)
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, shape) -> torch.Tensor:
    """The int8 codes of ``shape`` that ``pack_int4`` packed into ``packed`` (ValueError for a byte no packing
    writes: a nibble 0, or a padding nibble other than code 0)."""
    if packed.dtype != torch.uint8 or tuple(packed.shape) != int4_packed_shape(shape):
        raise ValueError(f"4-bit codes of {list(shape)} are uint8 {list(int4_packed_shape(shape))}, got "
                         f"{packed.dtype} {list(packed.shape)}")
    low, high = packed & 0x0F, packed >> 4
    nibbles = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)
    cols = shape[-1]
    if cols % 2 and bool((nibbles[..., cols:] != INT4_OFFSET).any()):
        raise ValueError("the padding nibble of an odd last column is not code 0")
    nibbles = nibbles[..., :cols]
    if bool((nibbles == 0).any()):
        raise ValueError("a nibble 0 (code -8) is no 4-bit code in [-7, 7]")
    return (nibbles.to(torch.int16) - INT4_OFFSET).to(torch.int8)


def pack_int8_tensors(tensors: dict[str, torch.Tensor], names, bits: int = 8) -> dict[str, torch.Tensor]:
    """``tensors`` with each ``<name>.weight`` of ``names`` (module names) replaced by ``<name>.weight_int8`` and
    ``<name>.weight_absmax`` (``int8_quantize``); ``bits=4``: by ``<name>.weight_int4`` (``pack_int4``) and the
    absmax; the other entries unchanged."""
    out = dict(tensors)
    for name in names:
        codes, absmax = int8_quantize(out.pop(f"{name}.weight"), bits=bits)
        stored = codes.cpu().contiguous() if bits == 8 else pack_int4(codes.cpu())
        out[name + (INT8_SUFFIX if bits == 8 else INT4_SUFFIX)], out[name + ABSMAX_SUFFIX] = \
            stored, absmax.cpu().contiguous()
    return out


def unpack_int8_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                        where: str = "", int4_shapes: dict | None = None) -> dict[str, torch.Tensor]:
    """The inverse of ``pack_int8_tensors``: every ``<name>.weight_int8`` / ``.weight_absmax`` pair becomes the latent
    ``<name>.weight`` of ``latent_from_int8`` (checked: int8 codes in [-127, 127], one float32 absmax per row;
    PackedModelError naming ``where`` otherwise); every ``<name>.weight_int4`` / ``.weight_absmax`` pair likewise
    at 4 bits, its weight's shape from ``int4_shapes`` (the file's record); the other entries unchanged."""
    suffixes = (INT8_SUFFIX, INT4_SUFFIX, ABSMAX_SUFFIX)
    out = {key: value for key, value in tensors.items() if not key.endswith(suffixes)}
    names = {key[:-len(suffix)] for key in tensors for suffix in suffixes if key.endswith(suffix)}
    int4_shapes = int4_shapes or {}
    for name in sorted(names):
        bits = 4 if name + INT4_SUFFIX in tensors else 8
        suffix = INT8_SUFFIX if bits == 8 else INT4_SUFFIX
        codes, absmax = tensors.get(name + suffix), tensors.get(name + ABSMAX_SUFFIX)
        if codes is None or absmax is None:
            raise PackedModelError(f"{where}: int{bits} weight of {name!r} is missing ({name}{suffix} / "
                                   f"{ABSMAX_SUFFIX})")
        if bits == 4:
            if name + INT8_SUFFIX in tensors or name not in int4_shapes:
                raise PackedModelError(f"{where}: 4-bit weight of {name!r}: no recorded shape, or int8 codes beside")
            try:
                codes = unpack_int4(codes, tuple(int4_shapes[name]))
            except ValueError as err:
                raise PackedModelError(f"{where}: tensor {name}{INT4_SUFFIX}: {err}") from None
        if codes.dtype != torch.int8 or codes.dim() < 1 or bool((codes == -int_max(8) - 1).any()):
            raise PackedModelError(f"{where}: tensor {name}{INT8_SUFFIX} must hold int8 codes in [-127, 127], got "
                                   f"{codes.dtype} {list(codes.shape)}")
        if absmax.dtype != torch.float32 or tuple(absmax.shape) != tuple(codes.shape[:-1]) \
                or not bool((absmax > 0).all()):
            raise PackedModelError(f"{where}: tensor {name}{ABSMAX_SUFFIX} must be float32 {list(codes.shape[:-1])} "
                                   f"and positive, got {absmax.dtype} {list(absmax.shape)}")
        out[f"{name}.weight"] = latent_from_int8(codes, absmax, dtype, bits)
    return out


def _packed_config(folder: Path):
    """(config, its ``bitnet`` settings) of a packed folder, config.json read within bounds."""
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise PackedModelError(f"{str(folder)!r} has no config.json: not a packed BitNet folder")
    read_json_file(folder / "config.json", PackedModelError)  # its size and form, before transformers reads it
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as err:  # transformers' own checks of a hostile config: ValueError, KeyError, TypeError...
        raise PackedModelError(f"{folder / 'config.json'} cannot be read as a model configuration "
                               f"({type(err).__name__}: {cut(str(err), 200)})") from None
    settings = getattr(config, "bitnet", None)
    if not isinstance(settings, dict) or not {"include", "activation_bits", "packing"} <= set(settings):
        raise PackedModelError(f"{str(folder)!r}: config.json has no complete 'bitnet' entry (include, "
                               "activation_bits, packing): not written by export_packed")
    return config, settings


def _packed_record(folder: Path, config, settings: dict) -> tuple[dict, dict]:
    """(tensors, bitnet record) of a packed folder, checked against its config before any model is built: the
    packing of both, and the model the config describes (built on the meta device) against the stored shapes."""
    tensors, record = _read_checked(folder / WEIGHTS_NAME)
    packing = record["packing"]
    if packing != settings.get("packing"):
        raise PackedModelError(f"{str(folder)!r}: config.json says packing {short(settings.get('packing'))}, "
                               f"model.safetensors {short(packing)}")
    if packing not in PACKINGS:
        raise PackedModelError(f"{str(folder)!r}: packing {short(packing)} is none of {', '.join(PACKINGS)}")
    stored = _logical_shapes(tensors, record, packing)
    plain = meta_model(config, stored, str(folder), PackedModelError)
    check_weights_fit(plain, stored, str(folder), PackedModelError, covered=set(record["aliases"]),
                      weights=WEIGHTS_NAME)
    return tensors, record


def _converted_model(folder: Path, config, settings: dict, record: dict, dtype: torch.dtype) -> nn.Module:
    """The config's model on the meta device (buffers real), converted as the ``bitnet`` entry says; its converted
    and int8 layers checked against the record."""
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        convert_to_bitnet(model, include=settings["include"],
                          quantize_activations=settings["activation_bits"] is not None,
                          embedding_bits=settings.get("embedding_bits"), int8_include=settings.get("int8_include"),
                          int4_include=settings.get("int4_include"))
    except (ValueError, TypeError) as err:
        raise PackedModelError(f"{folder / 'config.json'}: its 'bitnet' entry cannot convert the model "
                               f"({cut(str(err), 200)})") from None
    layers = bitlinear_modules(model)
    if set(layers) != set(record["shapes"]):
        raise PackedModelError(f"{str(folder)!r}: packed layers {sorted(record['shapes'])} do not match the "
                               f"model's converted layers {sorted(layers)}")
    for bits, key in ((8, "int8"), (4, "int4")):
        wanted = {name for name, module in int8_modules(model).items()
                  if f"{name}.weight" not in record["aliases"] and getattr(module, "bits", 8) == bits}
        if wanted != set(record[key]):
            raise PackedModelError(f"{str(folder)!r}: {key} weights {sorted(record[key])} do not match the "
                                   f"model's {key} layers {sorted(wanted)} (config embedding_bits "
                                   f"{settings.get('embedding_bits')!r}, int8_include "
                                   f"{settings.get('int8_include')!r}, int4_include {settings.get('int4_include')!r})")
    return model


def _int8_state(model: nn.Module, tensors: dict, dtype: torch.dtype, where: str,
                int4_shapes: dict | None = None) -> dict[str, torch.Tensor]:
    """The latent weights of the int8 and int4 layers (``unpack_int8_tensors``), their shapes checked against the
    model."""
    int8_state = unpack_int8_tensors({k: v for k, v in tensors.items()
                                      if k.endswith((INT8_SUFFIX, INT4_SUFFIX, ABSMAX_SUFFIX))},
                                     dtype, where=where, int4_shapes=int4_shapes)
    for key, latent in int8_state.items():
        name = key.removesuffix(".weight")
        expected = tuple(model.get_submodule(name).weight.shape)
        if tuple(latent.shape) != expected:
            raise PackedModelError(f"layer {name!r}: int8 weight shape {list(latent.shape)}, model expects "
                                   f"{list(expected)}")
    return int8_state


def _packed_layers(model: nn.Module, tensors: dict, record: dict, dtype: torch.dtype, trainable: bool) -> dict:
    """The state of the converted layers: latent BitLinear weights (``trainable``), or packed codes and scales with
    each layer replaced by a ``PackedBitLinear`` on the meta device."""
    packing, state = record["packing"], {}
    for name, layer in bitlinear_modules(model).items():
        shape = tuple(record["shapes"][name])
        if shape != tuple(layer.weight.shape):
            raise PackedModelError(f"layer {name!r}: packed weight shape {list(shape)}, model expects "
                                   f"{list(layer.weight.shape)}")
        packed, scale = _checked_codes(tensors, name, shape, packing)
        if trainable:
            state[f"{name}.weight"] = latent_from_ternary(unpack_ternary(packed, shape, packing), scale, dtype)
        else:
            model.set_submodule(name, PackedBitLinear(layer.in_features, layer.out_features, packing,
                                                      bias=layer.bias is not None,
                                                      quantize_activations=layer.quantize_activations,
                                                      device="meta", dtype=dtype))
            state[f"{name}.weight_packed"], state[f"{name}.weight_scale"] = packed, scale
    return state


def _assign(model: nn.Module, state: dict, record: dict, folder: Path) -> None:
    """Load ``state`` into the meta model (assigned, no copy), re-tie the aliases, and refuse any value left out."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = sorted(set(missing) - set(record["aliases"]))
    if missing or unexpected:
        raise PackedModelError(f"{str(folder)!r}: tensors do not fit the model: missing {missing}, "
                               f"unexpected {sorted(unexpected)}")
    for alias, source in record["aliases"].items():
        owner, _, leaf = alias.rpartition(".")
        module = model.get_submodule(owner)
        target = model.get_parameter(source) if leaf in module._parameters else model.get_buffer(source)
        (module._parameters if leaf in module._parameters else module._buffers)[leaf] = target
    left = sorted(name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta)
    if left:
        raise PackedModelError(f"{str(folder)!r}: no values for {left}")


def load_packed(path, dtype: torch.dtype = torch.float32, trainable: bool = False) -> nn.Module:
    """Load an ``export_packed`` folder as its model class (via AutoConfig / AutoModelForCausalLM.from_config).

    Default: every converted layer is a ``PackedBitLinear`` (packed codes + scale only), the logits equal those
    of the exported BitLinear model. ``trainable=True``: BitLinear layers whose latent weights are rebuilt by
    ``latent_from_ternary`` so that their own quantization gives back exactly the exported codes and scale (in
    float32 the logits equal the packed model's bit for bit); the latent precision lost at export is not
    recoverable. Int8 embeddings / LM heads come back (both modes) as Int8Embedding / Int8Linear on the latent of
    ``latent_from_int8``, which computes with exactly the stored int8 values. Modules left out at export are not
    built (the saved config says so). Other floating tensors are cast to ``dtype``; scales stay float32. The
    model is built with its parameters on the meta device, so no full-precision copy of the packed matrices is
    ever made; before it is built, the config is checked against the file's header (a config claiming other or
    larger dimensions than the stored tensors is refused without allocating). Returns the model in eval mode."""
    import forgelib.models  # noqa: F401  (registers Cognate with the Auto classes)

    folder = Path(path)
    config, settings = _packed_config(folder)
    tensors, record = _packed_record(folder, config, settings)
    model = _converted_model(folder, config, settings, record, dtype)
    state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in tensors.items()
             if not key.endswith((".weight_packed", ".weight_scale", INT8_SUFFIX, INT4_SUFFIX, ABSMAX_SUFFIX))}
    state.update(_int8_state(model, tensors, dtype, str(folder / WEIGHTS_NAME), record["int4"]))
    state.update(_packed_layers(model, tensors, record, dtype, trainable))
    _assign(model, state, record, folder)
    model.config.bitnet = {**settings, "packing": "none" if trainable else record["packing"]}
    return model.eval()


__all__ = ["PackedModelError", "export_packed", "load_packed", "latent_from_ternary", "latent_from_int8",
           "pack_int8_tensors", "unpack_int8_tensors", "pack_int4", "unpack_int4", "unused_modules", "header_bytes",
           "WEIGHTS_NAME"]
