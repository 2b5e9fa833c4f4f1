"""Packed BitNet checkpoints: ``export_packed`` writes one, ``load_packed`` reads it back for packed inference
(``PackedBitLinear``) or, with ``trainable=True``, as BitLinear modules to train on.

Folder layout: ``config.json`` (the model's config; its ``bitnet`` entry names the converted suffixes, the
activation bits and the ``packing``), ``model.safetensors`` and, when a tokenizer is passed, its files. The
safetensors file holds every tensor of ``model.state_dict()`` as is, except that each BitLinear ``<name>.weight``
is replaced by ``<name>.weight_packed`` (uint8, ``forgelib.quant.packing``) and ``<name>.weight_scale`` (float32
0-d, mean|W|), which are exactly the buffer names of ``PackedBitLinear``. The metadata entry ``bitnet`` (JSON)
records the packing, each packed weight's [out, in] shape and the aliases: a tensor reachable under two names
(tied ``lm_head.weight`` = ``model.embed_tokens.weight``) is written once under its first name and re-tied on load.

Export keeps only the ternary codes and one scale per matrix: the latent full-precision weights of a trained
BitLinear are lost, so ``load_packed(trainable=True)`` resumes from the dequantized weights (rescaled per matrix,
see ``latent_from_ternary``): the same forward, but a fresh latent state, so weights near a rounding boundary no
longer remember which side they were approaching.
"""
from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .bitnet import PackedBitLinear, bitlinear_modules, convert_to_bitnet, ternary_quantize
from .packing import check_packing, pack_ternary, packed_shape, unpack_ternary

WEIGHTS_NAME = "model.safetensors"
METADATA_KEY = "bitnet"


class PackedModelError(ValueError):
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
    """Bytes before a safetensors file's tensor data: the 8-byte little-endian header length plus the header."""
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


@torch.no_grad()
def export_packed(model: nn.Module, path, packing: str = "2bit", tokenizer=None) -> dict:
    """Write ``model`` (converted with ``convert_to_bitnet``) as a packed folder (layout in the module docstring).

    Returns the byte accounting: ``packed_bytes`` (ternary codes), ``scale_bytes``, ``other_bytes`` (every other
    tensor), ``tensor_bytes`` (their sum), ``header_bytes``, ``file_bytes`` (model.safetensors on disk, equal to
    tensor_bytes + header_bytes), ``ternary_weights``, ``bits_per_ternary_weight`` (codes only) and
    ``bits_per_ternary_weight_with_scales``."""
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
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()
               if key not in aliases and key not in packed_names}
    accounting = dict(packing=packing, other_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
                      packed_bytes=0, scale_bytes=0, ternary_weights=0)
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
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"packing": packing, "shapes": shapes, "aliases": aliases}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", METADATA_KEY: json.dumps(record)})
    config = copy.deepcopy(model.config)
    config.bitnet = {**settings, "packing": packing}
    config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    accounting["tensor_bytes"] = accounting["packed_bytes"] + accounting["scale_bytes"] + accounting["other_bytes"]
    accounting["header_bytes"] = header_bytes(folder / WEIGHTS_NAME)
    accounting["file_bytes"] = (folder / WEIGHTS_NAME).stat().st_size
    n = accounting["ternary_weights"]
    accounting["bits_per_ternary_weight"] = 8 * accounting["packed_bytes"] / n
    accounting["bits_per_ternary_weight_with_scales"] = 8 * (accounting["packed_bytes"] + accounting["scale_bytes"]) / n
    return accounting


def _read_checked(file: Path) -> tuple[dict, dict]:
    """(tensors, bitnet record) of a packed model.safetensors, after checking that no tensor lies past the end of
    the file (a truncated file gets an error naming the tensors it lost, not safetensors' generic one)."""
    if not file.is_file():
        raise PackedModelError(f"{str(file)!r} does not exist: not a packed BitNet folder")
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            start = 8 + struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(start - 8))
        cut = sorted(name for name, info in header.items()
                     if name != "__metadata__" and start + info["data_offsets"][1] > size)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise PackedModelError(f"{str(file)!r}: unreadable safetensors header ({err!r})") from err
    if cut:
        raise PackedModelError(f"{str(file)!r} is truncated ({size} bytes): tensors {cut} lie past its end")
    record = json.loads((header.get("__metadata__") or {}).get(METADATA_KEY, "null") or "null")
    if not isinstance(record, dict) or "shapes" not in record:
        raise PackedModelError(f"{str(file)!r} has no '{METADATA_KEY}' metadata: not written by export_packed")
    with safe_open(str(file), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    return tensors, record


def _checked_codes(tensors: dict, name: str, shape: tuple, packing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, scale) of layer ``name``, their dtypes and shapes checked against the recorded weight shape."""
    packed, scale = tensors.get(f"{name}.weight_packed"), tensors.get(f"{name}.weight_scale")
    if packed is None or scale is None:
        raise PackedModelError(f"packed weight of {name!r} is missing ({name}.weight_packed / .weight_scale)")
    expected = packed_shape(shape, packing)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
        raise PackedModelError(
            f"tensor {name}.weight_packed is {packed.dtype} {list(packed.shape)}, but a {list(shape)} weight "
            f"packed as {packing!r} is uint8 {list(expected)} (truncated or tampered)")
    if scale.dtype != torch.float32 or scale.numel() != 1:
        raise PackedModelError(f"tensor {name}.weight_scale must be one float32, got {scale.dtype} "
                               f"{list(scale.shape)}")
    try:
        unpack_ternary(packed, shape, packing)  # rejects impossible byte values
    except ValueError as err:
        raise PackedModelError(f"tensor {name}.weight_packed: {err}") from err
    return packed, scale.reshape(())


def latent_from_ternary(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A latent weight whose absmean quantization gives back ``codes`` and (up to rounding in dtype) ``scale``.

    Not codes * scale itself: the mean |.| of that tensor is scale * (nonzero fraction), so re-quantizing it
    would shrink the scale (same codes, a different forward). The nonzero entries are instead set to
    +-scale * numel / nonzeros, whose mean |.| is the scale and whose ratio to it (>= 1) rounds and clips back to
    +-1. All-zero codes give zeros (scale eps, the same zero output)."""
    nonzero = int(torch.count_nonzero(codes))
    if nonzero == 0:
        return torch.zeros(codes.shape, dtype=dtype)
    magnitude = scale.double() * (codes.numel() / nonzero)
    return (codes.double() * magnitude).to(dtype)


def load_packed(path, dtype: torch.dtype = torch.float32, trainable: bool = False) -> nn.Module:
    """Load an ``export_packed`` folder as its model class (via AutoConfig / AutoModelForCausalLM.from_config).

    Default: every converted layer is a ``PackedBitLinear`` (packed codes + scale only), the logits equal those
    of the exported BitLinear model. ``trainable=True``: BitLinear layers whose latent weights are the dequantized
    ternary weights, rescaled by ``latent_from_ternary`` so that their own quantization gives back the exported
    codes and scale (the forward equals the packed one up to a rounding of each scale); the latent precision lost
    at export is not recoverable. Other floating tensors are cast to
    ``dtype``; scales stay float32. The model is built with its parameters on the meta device, so no full-
    precision copy of the packed matrices is ever made. Returns the model in eval mode."""
    import forgelib.models  # noqa: F401  (registers Cognate with the Auto classes)
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise PackedModelError(f"{str(folder)!r} has no config.json: not a packed BitNet folder")
    config = AutoConfig.from_pretrained(str(folder))
    settings = getattr(config, "bitnet", None)
    if not isinstance(settings, dict) or not {"include", "activation_bits", "packing"} <= set(settings):
        raise PackedModelError(f"{str(folder)!r}: config.json has no complete 'bitnet' entry (include, "
                               "activation_bits, packing): not written by export_packed")
    tensors, record = _read_checked(folder / WEIGHTS_NAME)
    packing = record["packing"]
    if packing != settings.get("packing"):
        raise PackedModelError(f"{str(folder)!r}: config.json says packing {settings.get('packing')!r}, "
                               f"model.safetensors {packing!r}")
    check_packing(packing)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    convert_to_bitnet(model, include=settings["include"],
                      quantize_activations=settings["activation_bits"] is not None)
    layers = bitlinear_modules(model)
    if set(layers) != set(record["shapes"]):
        raise PackedModelError(f"{str(folder)!r}: packed layers {sorted(record['shapes'])} do not match the "
                               f"model's converted layers {sorted(layers)}")
    state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in tensors.items()
             if not key.endswith((".weight_packed", ".weight_scale"))}
    for name, layer in layers.items():
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
    model.config.bitnet = {**settings, "packing": "none" if trainable else packing}
    return model.eval()


__all__ = ["PackedModelError", "export_packed", "load_packed", "latent_from_ternary", "header_bytes", "WEIGHTS_NAME"]
