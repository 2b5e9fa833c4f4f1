"""Quantization of forgelib models: BitNet b1.58 (ternary weights, 8-bit activations) with packed storage.

``bitnet``: the quantizers, ``BitLinear`` (quantization-aware training), ``PackedBitLinear`` (inference on packed
codes) and ``convert_to_bitnet``; ``packing``: the 2-bit (transformers' layout) and base-3 code formats;
``export``: ``export_packed`` / ``load_packed`` checkpoints (ternary codes, int8 embeddings, 4-bit layers two codes
to a byte, unused modules left out).
"""
from .bitnet import (ACTIVATION_BITS, DEFAULT_BITNET_SUFFIXES, EMBEDDING_BITS, BitLinear, Int8Embedding, Int8Linear,
                     PackedBitLinear, activation_quantize, bitlinear_modules, convert_to_bitnet, convert_to_int8,
                     fake_quantize_activations, int8_dequantize, int8_modules, int8_quantize,
                     packed_bitlinear_modules, ternary_dequantize, ternary_quantize)
from .export import (PackedModelError, export_packed, header_bytes, latent_from_int8, latent_from_ternary, load_packed,
                     pack_int4, pack_int8_tensors, unpack_int4, unpack_int8_tensors)
from .packing import PACKINGS, check_packing, pack_ternary, packed_shape, unpack_ternary

__all__ = ["ACTIVATION_BITS", "DEFAULT_BITNET_SUFFIXES", "EMBEDDING_BITS", "BitLinear", "Int8Embedding", "Int8Linear",
           "PackedBitLinear", "activation_quantize", "bitlinear_modules", "convert_to_bitnet", "convert_to_int8",
           "fake_quantize_activations", "int8_dequantize", "int8_modules", "int8_quantize", "packed_bitlinear_modules",
           "ternary_dequantize", "ternary_quantize", "PackedModelError", "export_packed", "header_bytes",
           "latent_from_int8", "latent_from_ternary", "load_packed", "pack_int4", "pack_int8_tensors", "unpack_int4",
           "unpack_int8_tensors",
           "PACKINGS", "check_packing", "pack_ternary", "packed_shape", "unpack_ternary"]
