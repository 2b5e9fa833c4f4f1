"""BitNet b1.58 layers: ternary weights and 8-bit activations, trained through a straight-through estimator.

Weights (absmean, per tensor): ``scale = max(mean(|W|), 1e-5)``, ``codes = clip(round(W / scale), -1, 1)``
in {-1, 0, 1} and ``W_q = codes * scale``. Every weight costs log2(3) = 1.58 bits of information; the matmul
needs no multiplications by weights, only additions, subtractions and one scale per tensor. The mean is summed in
float64 and rounded to float32 once (``ternary_quantize``): that makes it reproducible exactly from a packed
file (``forgelib.quant.export.latent_from_ternary``), which a float32 sum is not.

Activations (absmax, per token): ``s_x = 127 / max(max_j |x_j|, 1e-5)`` over the last dimension,
``x_q = clip(round(x * s_x), -128, 127) / s_x`` (the clip never bites at -128: |x * s_x| <= 127).
``torch.round`` rounds halves to even (0.5 -> 0, 1.5 -> 2), as transformers' BitNet code does.

Training (quantization-aware): the forward uses W_q and x_q, the backward treats both quantizers as the identity
(straight-through estimator), so the latent full-precision weight ``BitLinear.weight`` receives exactly the
gradient a plain Linear would get at W_q. The STE is written ``q.detach() + (w - w.detach())`` rather than the
textbook ``w + (q - w).detach()``: both have gradient 1 w.r.t. w, but the textbook form evaluates to
``w + (q - w)``, which floating point rounds away from q by an ulp now and then, while ``w - w.detach()`` is an
exact 0; so the fake-quantized forward equals the packed inference forward bit for bit.

Only the attention and MLP projections are made ternary (``convert_to_bitnet``); norms, the ACT halting head and the
Titans memory keep their precision, as in the BitNet b1.58 papers (the projections hold most parameters; the small
rest is precision-sensitive). The embedding matrix and the LM head stay full precision unless
``convert_to_bitnet(embedding_bits=8)`` makes them ``Int8Embedding`` / ``Int8Linear``: per-row absmax int8 weights
(``int8_quantize``), fake-quantized in every forward with the same straight-through estimator, so the model
trains, is scored and is packed (int8 codes + one float32 absmax per row) with the very same values. Further
Linear layers may compute with per-row int8 weights (``int8_include``) or per-row 4-bit ones (``int4_include``:
codes in [-7, 7], step absmax / 7, packed two to a byte), the same quantizer at another ``bits``.
``BitLinear`` subclasses ``nn.Linear`` so that peft LoRA (which dispatches on isinstance nn.Linear) attaches to it.
``PackedBitLinear`` is the inference layer: it keeps only the packed codes (``forgelib.quant.packing``) and the
scale, and unpacks one matrix per call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .packing import check_packing, pack_ternary, packed_shape, unpack_ternary

#: Name suffixes of the Linear layers ``convert_to_bitnet`` converts by default (LLaMA / Cognate names).
DEFAULT_BITNET_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ACTIVATION_BITS = 8
EMBEDDING_BITS = (8,)
"""The ``embedding_bits`` ``convert_to_bitnet`` offers (besides None: full precision)."""
INT8_MAX = 127
INT_BITS = (8, 4)
"""The per-row integer widths an ``Int8Linear`` computes with (``bits``)."""
EPS = 1e-5


def int_max(bits: int) -> int:
    """The largest code of a symmetric per-row ``bits``-bit quantizer: 127 for 8 bits, 7 for 4 (2^(bits-1) - 1)."""
    if bits not in INT_BITS:
        raise ValueError(f"per-row integer weights have {' or '.join(map(str, INT_BITS))} bits, got {bits!r}")
    return 2 ** (bits - 1) - 1


def ternary_quantize(w: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternary quantization of a whole tensor (no gradient).

    Returns ``(codes, scale)``: int8 codes in {-1, 0, 1} of w's shape and the float32 0-d scale
    ``max(mean(|w|), eps)``, with ``w ~ codes * scale``. Computed in float32 whatever w's dtype, except the mean:
    the sum of |w| is taken in float64 and divided by numel there, then rounded to float32 once. Why: a float32
    sum depends on the summation order and rounds at every step, so no latent weight rebuilt from (codes, scale)
    could be guaranteed to give back exactly ``scale``; in float64 the sum of the rebuilt latent (all entries
    +-m but one, ``latent_from_ternary``) is exact in any order, and so is the scale (Phase 5's reload)."""
    with torch.no_grad():
        w32 = w.detach().float()
        mean = (w32.abs().double().sum() / w32.numel()).float()  # () exact sum of a rebuilt latent, see above
        scale = mean.clamp(min=eps)  # ()
        codes = (w32 / scale).round().clamp(-1, 1).to(torch.int8)
    return codes, scale


def ternary_dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale`` (exact in float32), cast to ``dtype``: the weight both BitLinear paths multiply by."""
    return (codes.float() * scale.float()).to(dtype)


def int8_quantize(w: torch.Tensor, eps: float = EPS, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 quantization over the last dimension (no gradient): embeddings and LM heads.

    Returns ``(codes, absmax)``: int8 codes in [-127, 127] of w's shape and the float32 row maxima (...,)
    ``max(max_j |w_j|, eps)``, with ``w ~ codes * (absmax / 127)`` (``int8_dequantize``). The file stores the
    absmax, not the step absmax / 127: a rebuilt latent whose largest entries are exactly +-absmax (and
    codes * step elsewhere) gives back the same absmax, step and codes (``latent_from_int8``), whereas a stored
    step would have to be recovered from 127 * step, which float32 rounds. ``bits=4``: codes in [-7, 7], step
    absmax / 7 (``int_max``)."""
    q_max = int_max(bits)
    with torch.no_grad():
        w32 = w.detach().float()
        absmax = w32.abs().amax(dim=-1).clamp(min=eps)  # (...,)
        codes = (w32 / (absmax / q_max).unsqueeze(-1)).round().clamp(-q_max, q_max).to(torch.int8)
    return codes, absmax


def int8_dequantize(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype, bits: int = 8) -> torch.Tensor:
    """``codes * (absmax / 127)`` per row in float32 (``bits=4``: absmax / 7), cast to ``dtype``: the matrix an
    Int8 layer computes with."""
    return (codes.float() * (absmax.float() / int_max(bits)).unsqueeze(-1)).to(dtype)


def activation_quantize(x: torch.Tensor, bits: int = ACTIVATION_BITS,
                        eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax quantization over the last dimension (no gradient).

    Returns ``(q, s_x)``: integer codes (int8 for 8 bits) of x's shape and the float32 scales (..., 1) with
    ``s_x = (2^(bits-1) - 1) / max(max|x|, eps)``, so that ``x ~ q / s_x``. Computed in float32."""
    q_max = 2 ** (bits - 1) - 1
    with torch.no_grad():
        x32 = x.detach().float()
        s_x = q_max / x32.abs().amax(dim=-1, keepdim=True).clamp(min=eps)  # (..., 1)
        q = (x32 * s_x).round().clamp(-q_max - 1, q_max)  # (..., D)
    return q.to(torch.int8 if bits <= 8 else torch.int32), s_x


def fake_quantize_activations(x: torch.Tensor, bits: int = ACTIVATION_BITS) -> torch.Tensor:
    """``q / s_x`` from ``activation_quantize`` in x's dtype (no gradient)."""
    q, s_x = activation_quantize(x, bits)
    return (q.float() / s_x).to(x.dtype)


def _straight_through(quantized: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """Value ``quantized`` (exactly), gradient w.r.t. ``latent`` the identity (see the module docstring)."""
    if not (torch.is_grad_enabled() and latent.requires_grad):
        return quantized
    return quantized + (latent - latent.detach())


class BitLinear(nn.Linear):
    """A Linear that trains a latent full-precision ``weight`` and computes with its ternary quantization.

    Forward: ``F.linear(x_q, W_q, bias)`` with W_q = absmean ternary weight and x_q = per-token 8-bit activations
    (``quantize_activations=False`` keeps x as is), straight-through gradients on both. ``weight`` and ``bias`` are
    ordinary Parameters, so optimizers, peft LoRA and ``state_dict`` see a plain Linear."""

    quantize_weight = True
    """False while an SVF expert parametrizes ``weight`` with a matrix already built from the ternary one."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 quantize_activations: bool = True):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.quantize_activations = quantize_activations

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantize_activations: bool = True) -> "BitLinear":
        """A BitLinear holding the very same weight (and bias) Parameters as ``linear`` (no copy)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                    quantize_activations=quantize_activations)
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer.train(linear.training)

    def quantized_weight(self) -> torch.Tensor:
        """W_q = codes * scale in the weight's dtype (no gradient)."""
        codes, scale = ternary_quantize(self.weight)
        return ternary_dequantize(codes, scale, self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_weight(x, self.weight)

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The forward with ``weight`` as the latent matrix (a LoRA-adapted latent ``W + BA`` is quantized as a
        whole, so that merging the adapter into ``weight`` gives the very same forward: ``forgelib.baking``)."""
        if self.quantize_weight:
            codes, scale = ternary_quantize(weight)
            w_q = _straight_through(ternary_dequantize(codes, scale, weight.dtype), weight)  # (out, in)
        else:  # an SVF expert's matrix, built from the quantized weight (forgelib.experts)
            w_q = weight
        if self.quantize_activations:
            x = _straight_through(fake_quantize_activations(x), x)  # (..., in)
        return F.linear(x, w_q, self.bias)  # (..., out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantize_activations={self.quantize_activations}"


class PackedBitLinear(nn.Module):
    """Inference form of a BitLinear: buffers ``weight_packed`` (uint8, ``forgelib.quant.packing``) and
    ``weight_scale`` (float32 0-d), plus ``bias`` if any. Each forward unpacks the codes of this one matrix,
    multiplies exactly as ``BitLinear`` does (so the outputs are equal) and drops the unpacked weight again:
    the model's full-precision matrices never exist all at once. Not trainable (see ``load_packed(trainable=True)``)."""

    def __init__(self, in_features: int, out_features: int, packing: str, bias: bool = False,
                 quantize_activations: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.packing = check_packing(packing)
        self.quantize_activations = quantize_activations
        shape = packed_shape((out_features, in_features), packing)
        self.register_buffer("weight_packed", torch.zeros(shape, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_bitlinear(cls, layer: BitLinear, packing: str) -> "PackedBitLinear":
        """Pack a BitLinear's quantized weight (its bias is shared, detached)."""
        check_packing(packing)
        packed = cls(layer.in_features, layer.out_features, packing, bias=False,
                     quantize_activations=layer.quantize_activations, device="meta")
        codes, scale = ternary_quantize(layer.weight)
        packed.weight_packed = pack_ternary(codes, packing)
        packed.weight_scale = scale
        packed.bias = None if layer.bias is None else layer.bias.detach()
        return packed

    def ternary_codes(self) -> torch.Tensor:
        """The int8 codes (out, in)."""
        return unpack_ternary(self.weight_packed, (self.out_features, self.in_features), self.packing, check=False)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """codes * scale (out, in): the quantized weight, as BitLinear computes with it."""
        return ternary_dequantize(self.ternary_codes(), self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_q = self.dequantized_weight(x.dtype)  # (out, in), freed on return
        if self.quantize_activations:
            x = fake_quantize_activations(x)  # (..., in)
        return F.linear(x, w_q, self.bias)  # (..., out)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) would round the scale to that dtype; keep it float32 and follow only the device.
        scale = self.weight_scale
        super()._apply(fn, recurse)
        self.weight_scale = scale.to(self.weight_packed.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, packing={self.packing!r}, "
                f"bias={self.bias is not None}, quantize_activations={self.quantize_activations}")


def _int8_forward_weight(weight: torch.Tensor, bits: int = 8) -> torch.Tensor:
    codes, absmax = int8_quantize(weight, bits=bits)
    return _straight_through(int8_dequantize(codes, absmax, weight.dtype, bits), weight)


class Int8Embedding(nn.Embedding):
    """An Embedding that trains a latent full-precision ``weight`` and looks rows up in its per-row int8
    quantization (``int8_quantize``, straight-through gradient). Same Parameter and state_dict as nn.Embedding."""

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "Int8Embedding":
        """An Int8Embedding holding the very same weight Parameter (no copy)."""
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, embedding.max_norm,
                    embedding.norm_type, embedding.scale_grad_by_freq, embedding.sparse, device="meta")
        layer.weight = embedding.weight  # the same Parameter object: a tied LM head stays tied
        return layer.train(embedding.training)

    def quantized_weight(self) -> torch.Tensor:
        """codes * absmax / 127 in the weight's dtype (no gradient)."""
        codes, absmax = int8_quantize(self.weight)
        return int8_dequantize(codes, absmax, self.weight.dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.embedding(input, _int8_forward_weight(self.weight), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


class Int8Linear(nn.Linear):
    """A Linear (an LM head, or a projection named in ``int8_include``) computing with the per-row int8 quantization
    of its latent ``weight`` (one absmax per output row, as for the embedding it may be tied to); activations stay as
    they are. ``bits = 4`` (a projection named in ``int4_include``): the same quantizer with codes in [-7, 7].
    ``quantize_weight = False`` computes with ``weight`` as it is (an SVF expert's parametrized matrix, built from
    the quantized one, as for BitLinear)."""

    quantize_weight = True
    bits = 8
    """8, or 4 for a layer ``from_linear(bits=4)`` made (set on the instance)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8) -> "Int8Linear":
        """An Int8Linear holding the very same weight (and bias) Parameters as ``linear`` (no copy), computing with
        ``bits``-bit codes (8 or 4)."""
        int_max(bits)
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        if bits != cls.bits:
            layer.bits = bits
        return layer.train(linear.training)

    def quantized_weight(self) -> torch.Tensor:
        """codes * absmax / 127 (4 bits: / 7) in the weight's dtype (no gradient)."""
        codes, absmax = int8_quantize(self.weight, bits=self.bits)
        return int8_dequantize(codes, absmax, self.weight.dtype, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_weight(x, self.weight)

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's forward with ``weight`` in place of its own latent weight (quantized the same way): a
        LoRA adapter ``W + s·BA`` acts inside the quantizer, so merging it gives the same forward."""
        weight = _int8_forward_weight(weight, self.bits) if self.quantize_weight else weight
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}"


def _matches(name: str, suffixes) -> bool:
    return any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)


_FROM_CONFIG = "config"


def convert_to_bitnet(model: nn.Module, include=None, quantize_activations: bool = True,
                      embedding_bits: int | None | str = _FROM_CONFIG, int8_include=_FROM_CONFIG,
                      int4_include=_FROM_CONFIG) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose name ends with one of ``include`` (default
    ``DEFAULT_BITNET_SUFFIXES``, matched at a '.' boundary) by a ``BitLinear`` holding the same Parameters.

    ``embedding_bits=8`` also makes the input embedding an ``Int8Embedding`` and the output embedding (LM head) an
    ``Int8Linear``, on the same Parameters (tied ones stay tied); None keeps them full precision; the default takes
    the setting the model's ``config.bitnet`` already records (a model rebuilt from a saved BitNet config), else
    None. ``int8_include``: name suffixes of further Linear layers (not made ternary) that compute with per-row int8
    weights (``Int8Linear``), e.g. the attention projections of a model too narrow to keep its attention in ternary
    weights; ``int4_include``: the same with per-row 4-bit weights (``Int8Linear`` with ``bits=4``); the defaults
    take the config's record, else none. Everything else (norms, the halting head, the memory's Linears) is left
    untouched. Records ``model.config.bitnet`` (included suffixes, activation bits, embedding bits, int8 and int4
    suffixes, packing "none") so a saved config says so. Layers that already are BitLinear / Int8 are kept;
    ValueError if nothing matches. Returns the model."""
    config = getattr(model, "config", None)
    recorded = getattr(config, "bitnet", None) if config is not None else None
    recorded = recorded if isinstance(recorded, dict) else {}
    if embedding_bits == _FROM_CONFIG:
        embedding_bits = recorded.get("embedding_bits")
    if isinstance(int8_include, str) and int8_include == _FROM_CONFIG:
        int8_include = recorded.get("int8_include")
    if isinstance(int4_include, str) and int4_include == _FROM_CONFIG:
        int4_include = recorded.get("int4_include")
    if embedding_bits is not None and embedding_bits not in EMBEDDING_BITS:
        raise ValueError(f"convert_to_bitnet: embedding_bits must be None or one of {EMBEDDING_BITS}, "
                         f"got {embedding_bits!r}")
    suffixes = tuple(DEFAULT_BITNET_SUFFIXES if include is None else include)
    targets = [name for name, module in model.named_modules()
               if _matches(name, suffixes) and isinstance(module, nn.Linear)]
    if not targets:
        raise ValueError(f"convert_to_bitnet: no nn.Linear in {type(model).__name__} ends with any of {suffixes}")
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, BitLinear):
            model.set_submodule(name, BitLinear.from_linear(module, quantize_activations))
    if embedding_bits is not None:
        _convert_embeddings(model)
    int8_suffixes, int4_suffixes = tuple(int8_include or ()), tuple(int4_include or ())
    _convert_int_layers(model, suffixes, int8_suffixes, int4_suffixes)
    if config is not None:
        config.bitnet = {"include": list(suffixes), "weight_quant": "absmean-ternary-per-tensor",
                         "activation_bits": ACTIVATION_BITS if quantize_activations else None,
                         "embedding_bits": embedding_bits, "packing": "none",
                         **({"int8_include": list(int8_suffixes)} if int8_suffixes else {}),
                         **({"int4_include": list(int4_suffixes)} if int4_suffixes else {})}
    return model


def _convert_int_layers(model: nn.Module, ternary: tuple, int8_suffixes: tuple, int4_suffixes: tuple) -> None:
    """The Linear layers named by ``int8_suffixes`` / ``int4_suffixes`` to 8-bit / 4-bit ``Int8Linear`` (same
    Parameters); ValueError for a suffix named twice or one that matches no Linear."""
    for other, key in ((int8_suffixes, "int8 (int8_include)"), (int4_suffixes, "int4 (int4_include)")):
        clash = sorted(set(other) & set(ternary))
        if clash:
            raise ValueError(f"convert_to_bitnet: {clash} are named both ternary (include) and {key}")
    clash = sorted(set(int8_suffixes) & set(int4_suffixes))
    if clash:
        raise ValueError(f"convert_to_bitnet: {clash} are named both int8 (int8_include) and int4 (int4_include)")
    for bits, named in ((8, int8_suffixes), (4, int4_suffixes)):
        targets = [name for name, module in model.named_modules()
                   if named and _matches(name, named) and type(module) is nn.Linear]
        if named and not targets and not any(_matches(n, named) for n in int8_modules(model)):
            raise ValueError(f"convert_to_bitnet: no nn.Linear in {type(model).__name__} ends with any of the "
                             f"int{bits} suffixes {named}")
        for name in targets:
            model.set_submodule(name, Int8Linear.from_linear(model.get_submodule(name), bits=bits))


def _convert_embeddings(model: nn.Module) -> None:
    """The input embedding to Int8Embedding and the output embedding to Int8Linear (same Parameters)."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embedding, head = get_in() if get_in else None, get_out() if get_out else None
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"convert_to_bitnet(embedding_bits=8): {type(model).__name__} has no nn.Embedding input "
                         "embedding")
    if head is not None and not isinstance(head, nn.Linear):
        if head.weight is embedding.weight:
            raise ValueError("convert_to_bitnet(embedding_bits=8): the output embedding tied to the input one is "
                             f"a {type(head).__name__}, not an nn.Linear")
        head = None
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    if not isinstance(embedding, Int8Embedding):
        model.set_submodule(names[id(embedding)], Int8Embedding.from_embedding(embedding))
    if head is not None and not isinstance(head, Int8Linear):
        model.set_submodule(names[id(head)], Int8Linear.from_linear(head))


def convert_to_int8(module: nn.Module, names=None) -> nn.Module:
    """Replace, in place, the ``nn.Linear`` submodules ``names`` of ``module`` (default: every nn.Linear in it) by
    ``Int8Linear`` layers holding the same Parameters (per-row int8 weights, straight-through): e.g. a Quiet-STaR
    mixing head, outside the base model ``convert_to_bitnet`` converts. Returns the module."""
    targets = names if names is not None else [name for name, sub in module.named_modules()
                                               if type(sub) is nn.Linear]
    for name in targets:
        sub = module.get_submodule(name)
        if not isinstance(sub, nn.Linear):
            raise ValueError(f"convert_to_int8: {name!r} is a {type(sub).__name__}, not an nn.Linear")
        if not isinstance(sub, Int8Linear):
            module.set_submodule(name, Int8Linear.from_linear(sub))
    return module


def bitlinear_modules(model: nn.Module) -> dict[str, BitLinear]:
    """Every BitLinear of the model by its module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, BitLinear)}


def packed_bitlinear_modules(model: nn.Module) -> dict[str, PackedBitLinear]:
    """Every PackedBitLinear of the model by its module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, PackedBitLinear)}


def int8_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Int8Embedding / Int8Linear of the model by its module name (a tied pair: both names)."""
    return {name: module for name, module in model.named_modules(remove_duplicate=False)
            if isinstance(module, (Int8Embedding, Int8Linear))}


__all__ = ["DEFAULT_BITNET_SUFFIXES", "ACTIVATION_BITS", "EMBEDDING_BITS", "ternary_quantize", "ternary_dequantize",
           "int8_quantize", "int8_dequantize", "int_max", "INT_BITS", "activation_quantize",
           "fake_quantize_activations", "BitLinear", "PackedBitLinear", "Int8Embedding", "Int8Linear",
           "convert_to_bitnet", "convert_to_int8", "bitlinear_modules", "packed_bitlinear_modules", "int8_modules"]
