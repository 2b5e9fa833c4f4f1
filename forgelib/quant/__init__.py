"""Quantization of forgelib models: BitNet b1.58 (ternary weights, 8-bit activations) with packed storage.

``bitnet``: the quantizers, ``BitLinear`` (quantization-aware training), ``PackedBitLinear`` (inference on packed
codes) and ``convert_to_bitnet``; ``packing``: the 2-bit (transformers' layout) and base-3 code formats;
``export``: ``export_packed`` / ``load_packed`` checkpoints.
"""
from .bitnet import (ACTIVATION_BITS, DEFAULT_BITNET_SUFFIXES, BitLinear, PackedBitLinear, activation_quantize,
                     bitlinear_modules, convert_to_bitnet, fake_quantize_activations, packed_bitlinear_modules,
                     ternary_dequantize, ternary_quantize)
from .export import PackedModelError, export_packed, header_bytes, latent_from_ternary, load_packed
from .packing import PACKINGS, check_packing, pack_ternary, packed_shape, unpack_ternary

__all__ = ["ACTIVATION_BITS", "DEFAULT_BITNET_SUFFIXES", "BitLinear", "PackedBitLinear", "activation_quantize",
           "bitlinear_modules", "convert_to_bitnet", "fake_quantize_activations", "packed_bitlinear_modules",
           "ternary_dequantize", "ternary_quantize", "PackedModelError", "export_packed", "header_bytes",
           "latent_from_ternary", "load_packed", "PACKINGS", "check_packing", "pack_ternary", "packed_shape",
           "unpack_ternary"]
