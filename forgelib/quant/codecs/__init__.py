"""Weight codecs of the Phase-8 compressed artifacts (``forgelib.quant.artifact``), one module per family, each with
its quantize / dequantize maths and its registered artifact encode / decode (``registry``):

* ``raw``: ``raw16`` / ``raw32``, the values as fp16 / fp32.
* ``ternary``: a BitLinear weight, base-3 packed codes (5 per byte) and one fp32 scale.
* ``scalar``: ``rtn`` (round to nearest in groups, the baseline a user would pick) and ``hqq`` (the ``hqq``
  package's half-quadratic fit of scale and zero), ``bits`` and ``group``.
* ``bfp``: block floating point, ``mantissa_bits``, ``block``, ``exp_bits``.
* ``seedlm``: SeedLM (``forgelib.quant.seedlm``), ``K``, ``C``, ``P``.
* ``vq``: Hessian-weighted vector quantization with an optional residual codebook, ``v``, ``codebook_bits``,
  ``residual``.
* ``hyper``: hyper-compression (a group of weights as one point of an ergodic trajectory), ``n``, ``index_bits``.

``CODECS`` maps each name to its ``Codec``; ``codec_defaults()`` is the one table of the settings' defaults (a spec
may name only those settings; the standalone ``*_quantize`` functions take the same defaults); ``get_codec(name)``
fails with the valid names. A new codec: a module here with a class decorated by ``register_codec(name, defaults)``,
imported below.
"""
# first: the families register into it
from .registry import CODECS, Codec, as_matrix, codec_defaults, get_codec, register_codec
from . import raw, ternary  # noqa: F401  (registration order: the order CODECS lists them in)
from .scalar import hqq_dequantize, hqq_quantize, hqq_quantizer, rtn_bits, rtn_dequantize, rtn_quantize
from .bfp import bfp_dequantize, bfp_quantize
from . import seedlm  # noqa: F401
from .vq import vq_bits, vq_dequantize, vq_quantize, weighted_kmeans
from .hyper import hyper_bits, hyper_dequantize, hyper_quantize, hyper_search, trajectory

__all__ = ["CODECS", "Codec", "as_matrix", "codec_defaults", "get_codec", "register_codec", "rtn_quantize",
           "rtn_dequantize", "rtn_bits", "hqq_quantizer", "hqq_quantize", "hqq_dequantize", "bfp_quantize",
           "bfp_dequantize", "weighted_kmeans", "vq_quantize", "vq_dequantize", "vq_bits", "trajectory",
           "hyper_search", "hyper_quantize", "hyper_dequantize", "hyper_bits"]
