"""Weight codecs for final compression beside SeedLM (``seedlm``): round-to-nearest with groups (the baseline a user
would pick), Hessian-weighted vector quantization with a residual codebook (VPTQ-style), and hyper-compression
(a group of weights as one point of an ergodic trajectory). Each ``*_quantize`` returns a dict of the tensors that
would be stored and ``*_dequantize`` rebuilds the matrix; ``*_bits`` counts every stored bit.

* **RTN** (``rtn_quantize``): per group of ``group`` consecutive weights of a row, symmetric integers of ``bits``
  bits times one fp16 scale ``max|w| / (2^(bits−1) − 1)``. Bits per weight: ``bits + 16 / group``.
* **VQ** (``vq_quantize``): each row scaled by its RMS (fp16 per row), cut into vectors of ``v`` consecutive input
  weights; a codebook of ``2^codebook_bits`` fp16 vectors fitted by k-means in which coordinate j is weighted by
  ``h_j``, the diagonal of the layer's Hessian proxy ``E[x_j²]`` from calibration activations (errors on inputs
  that are large cost more); then a second codebook on the residual. Bits: the indices, both codebooks, the scales.
* **Hyper-compression** (``hyper_quantize``, Fan et al. 2024): a group of ``n`` weights, mapped to [0, 1] by the
  row's (lo, hi), is represented by one integer ``k`` < 2^index_bits: the point ``frac(k · Δ · a)`` of the
  trajectory ``θ ↦ frac(θ a)`` on the unit torus, ``a`` a vector of rationally independent numbers (square roots of
  primes), which is dense (ergodic) so some ``θ`` comes near any target. The best ``k`` is found by exhaustive
  search over all 2^index_bits points. Bits: ``index_bits / n`` plus the rows' fp16 (lo, hi).
"""
from __future__ import annotations

import math

import torch


# --- round to nearest ---------------------------------------------------------------------------------


def _grouped(w: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    rows, cols = w.shape
    pad = (-cols) % group
    return torch.cat([w.float(), w.new_zeros(rows, pad).float()], 1).reshape(rows, -1, group), pad


def rtn_quantize(w: torch.Tensor, bits: int = 4, group: int = 32) -> dict:
    qmax = 2 ** (bits - 1) - 1
    g, pad = _grouped(w, group)
    scale = (g.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-12).half()
    codes = torch.round(g / scale.float()).clamp(-qmax - 1, qmax).to(torch.int8)
    return {"codes": codes, "scale": scale, "shape": tuple(w.shape), "pad": pad, "bits": bits, "group": group}


def rtn_dequantize(q: dict) -> torch.Tensor:
    rows, cols = q["shape"]
    return (q["codes"].float() * q["scale"].float()).reshape(rows, -1)[:, :cols]


def rtn_bits(q: dict) -> int:
    return q["codes"].numel() * q["bits"] + q["scale"].numel() * 16


def hqq_quantizer():
    """The ``hqq`` package's ``Quantizer``. ``make setup`` installs hqq beside the environment (``.venv/hqq``), not
    on the import path: where transformers and peft find hqq they import it at start-up, and its module runs
    ``torch.compile`` decorators (measured: about 1 s more for every ``import peft``). It is put on the path here,
    when a codec first needs it."""
    import sys
    from pathlib import Path

    try:
        from hqq.core.quantize import Quantizer
    except ImportError:
        side = Path(sys.prefix) / "hqq"
        if not (side / "hqq").is_dir():
            raise ImportError("the hqq codec needs the hqq package: `make setup` installs it in .venv/hqq "
                              "(pip install --target .venv/hqq --no-deps hqq==0.2.8.post1)") from None
        sys.path.append(str(side))
        from hqq.core.quantize import Quantizer
    return Quantizer


def hqq_quantize(w: torch.Tensor, bits: int = 4, group: int = 64) -> dict:
    """HQQ (half-quadratic quantization, the ``hqq`` package): per group of ``group`` consecutive weights (rows
    flattened, as the package groups them), unsigned ``bits``-bit codes with a scale and a zero point that HQQ's
    optimizer fits to a sparsity-promoting error; scale and zero stored as fp16. Bits per weight:
    ``bits + 32 / group``."""
    Quantizer = hqq_quantizer()
    rows, cols = w.shape
    if (rows * cols) % group:
        raise ValueError(f"hqq: the tensor's {rows * cols} values are not a multiple of the group size {group}")
    codes, meta = Quantizer.quantize(w.float().contiguous(), nbits=bits, group_size=group, optimize=True, axis=1,
                                     bitpack=False, compute_dtype=torch.float32, device="cpu")
    n = rows * cols // group
    return {"codes": codes.reshape(n, 1, group).to(torch.uint8), "scale": meta["scale"].reshape(n, 1).half(),
            "zero": meta["zero"].reshape(n, 1).half(), "shape": (rows, cols), "bits": bits, "group": group}


def hqq_dequantize(q: dict) -> torch.Tensor:
    rows, cols = q["shape"]
    n = q["codes"].shape[0]
    out = (q["codes"].reshape(n, -1).float() - q["zero"].float()) * q["scale"].float()
    return out.reshape(rows, cols)


def bfp_quantize(w: torch.Tensor, mantissa_bits: int = 3, block: int = 8, exp_bits: int = 4) -> dict:
    """Block floating point: blocks of ``block`` consecutive weights (rows flattened) share one power-of-two
    exponent ``e`` in ``[3 − 2^exp_bits, 2]`` (``exp_bits`` bits) and each weight keeps a signed ``mantissa_bits``
    integer: ``w ≈ m · 2^e``, ``e`` the smallest exponent with ``max|w| ≤ (2^(mantissa_bits−1) − 1) · 2^e``.
    Bits per weight: ``mantissa_bits + exp_bits / block``."""
    qmax = 2 ** (mantissa_bits - 1) - 1
    flat = w.detach().float().reshape(-1)
    pad = (-len(flat)) % block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, block)
    lo, hi = 3 - 2 ** exp_bits, 2
    amax = blocks.abs().amax(1).clamp(min=1e-30)
    e = torch.ceil(torch.log2(amax / qmax)).clamp(lo, hi)
    m = torch.round(blocks / 2.0 ** e[:, None]).clamp(-qmax - 1, qmax)
    return {"mant": m.to(torch.int64), "exp": e.to(torch.int64), "shape": tuple(w.shape), "pad": pad,
            "mantissa_bits": mantissa_bits, "exp_bits": exp_bits, "block": block, "exp_lo": lo}


def bfp_dequantize(q: dict) -> torch.Tensor:
    blocks = q["mant"].float() * 2.0 ** q["exp"].float()[:, None]
    return blocks.reshape(-1)[:math.prod(q["shape"])].reshape(q["shape"])


# --- vector quantization ------------------------------------------------------------------------------


def weighted_kmeans(x: torch.Tensor, weights: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> tuple:
    """k-means of vectors ``x`` (N, v) under the diagonal metric ``weights`` (v,): distance Σ_j w_j (x_j − c_j)²;
    centroids are plain means (the weighted-metric optimum for a diagonal metric); k-means++ seeding. Returns
    (codebook, labels)."""
    g = torch.Generator().manual_seed(seed)
    k = min(k, len(x))
    sw = weights.sqrt()
    xs = x * sw  # the metric becomes Euclidean
    centers = xs[torch.randint(len(x), (1,), generator=g)]
    while len(centers) < k:  # k-means++ seeding: the next center drawn with probability ~ squared distance
        d2 = torch.cdist(xs, centers).min(1).values ** 2
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / len(d2))
        centers = torch.cat([centers, xs[torch.multinomial(probs, 1, generator=g)]])
    for _ in range(iters):
        labels = torch.cdist(xs, centers).argmin(1)
        new = torch.zeros_like(centers).index_add_(0, labels, xs)
        counts = torch.bincount(labels, minlength=k).clamp(min=1)[:, None].float()
        new = new / counts
        empty = torch.bincount(labels, minlength=k) == 0
        new[empty] = centers[empty]
        if torch.allclose(new, centers):
            break
        centers = new
    labels = torch.cdist(xs, centers).argmin(1)
    return centers / sw, labels


def vq_quantize(w: torch.Tensor, v: int = 4, codebook_bits: int = 8, hessian_diag: torch.Tensor | None = None,
                residual: bool = True, seed: int = 0) -> dict:
    rows, cols = w.shape
    if cols % v:
        raise ValueError(f"the input size {cols} is not a multiple of the vector length {v}")
    scale = w.float().pow(2).mean(1, keepdim=True).sqrt().clamp(min=1e-12).half()
    x = (w.float() / scale.float()).reshape(-1, v)  # (rows * cols / v, v)
    h = hessian_diag.float().reshape(-1, v).mean(0) if hessian_diag is not None else torch.ones(v)
    h = h / h.mean()
    book, labels = weighted_kmeans(x, h, 2 ** codebook_bits, seed=seed)
    out = {"scale": scale, "book": book.half(), "labels": labels.to(torch.int32), "shape": (rows, cols), "v": v,
           "codebook_bits": codebook_bits}
    if residual:
        rest = x - book.half().float()[labels]
        book2, labels2 = weighted_kmeans(rest, h, 2 ** codebook_bits, seed=seed + 1)
        out.update(book2=book2.half(), labels2=labels2.to(torch.int32))
    return out


def vq_dequantize(q: dict) -> torch.Tensor:
    x = q["book"].float()[q["labels"].long()]
    if "book2" in q:
        x = x + q["book2"].float()[q["labels2"].long()]
    return x.reshape(q["shape"]) * q["scale"].float()


def vq_bits(q: dict) -> int:
    per_index = q["codebook_bits"]
    bits = q["labels"].numel() * per_index + q["book"].numel() * 16 + q["scale"].numel() * 16
    if "book2" in q:
        bits += q["labels2"].numel() * per_index + q["book2"].numel() * 16
    return bits


# --- hyper-compression --------------------------------------------------------------------------------

_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53)


def trajectory(n: int, index_bits: int) -> torch.Tensor:
    """(2^index_bits, n): the points frac(k · a), k = 0 … 2^index_bits − 1, of the ergodic trajectory θ ↦ frac(θ a)
    with a = (√2, √3, √5, …) (float64): an irrational rotation of the torus, dense in [0, 1)^n."""
    if n > len(_PRIMES):
        raise ValueError(f"group size {n} > {len(_PRIMES)}")
    a = torch.tensor([math.sqrt(p) for p in _PRIMES[:n]], dtype=torch.float64)
    return torch.frac(torch.arange(2 ** index_bits, dtype=torch.float64)[:, None] * a)


def hyper_search(u: torch.Tensor, index_bits: int, chunk: int = 2048) -> torch.Tensor:
    """For targets ``u`` (G, n) in [0, 1], the index of the nearest trajectory point (exhaustive)."""
    points = trajectory(u.shape[1], index_bits)
    return torch.cat([torch.cdist(u[i:i + chunk].double(), points).argmin(1) for i in range(0, len(u), chunk)])


def hyper_quantize(w: torch.Tensor, n: int = 4, index_bits: int = 16) -> dict:
    rows, cols = w.shape
    if cols % n:
        raise ValueError(f"the input size {cols} is not a multiple of the group size {n}")
    lo, hi = w.float().amin(1, keepdim=True).half(), w.float().amax(1, keepdim=True).half()
    span = (hi.float() - lo.float()).clamp(min=1e-12)
    u = ((w.float() - lo.float()) / span).reshape(-1, n)
    return {"index": hyper_search(u, index_bits).to(torch.int32), "lo": lo, "hi": hi, "shape": (rows, cols), "n": n,
            "index_bits": index_bits}


def hyper_dequantize(q: dict) -> torch.Tensor:
    rows, cols = q["shape"]
    points = trajectory(q["n"], q["index_bits"])
    u = points[q["index"].long()].float().reshape(rows, cols)
    return q["lo"].float() + u * (q["hi"].float() - q["lo"].float())


def hyper_bits(q: dict) -> int:
    return q["index"].numel() * q["index_bits"] + (q["lo"].numel() + q["hi"].numel()) * 16
