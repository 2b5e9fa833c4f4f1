"""Vector quantization (``vq``, VPTQ-style): each row scaled by its RMS (fp16 per row), cut into vectors of ``v``
consecutive input weights; a codebook of ``2^codebook_bits`` fp16 vectors fitted by k-means in which coordinate j is
weighted by ``h_j``, the diagonal of the layer's Hessian proxy ``E[x_j²]`` from calibration activations (errors on
inputs that are large cost more); with ``residual``, a second codebook on the residual. Bits (``vq_bits``): the
indices, the codebooks, the scales. In an artifact the indices are bit-packed to ``codebook_bits``."""
from __future__ import annotations

import torch

from ..packing import pack_bits, unpack_bits
from .registry import Parts, as_matrix, meta_groups, need_part, packed_size, register_codec

VQ = {"v": 4, "codebook_bits": 8, "residual": False}
VQ_LIMITS = {"v": range(1, 17), "codebook_bits": range(1, 17)}


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


def vq_quantize(w: torch.Tensor, v: int = VQ["v"], codebook_bits: int = VQ["codebook_bits"],
                hessian_diag: torch.Tensor | None = None, residual: bool = VQ["residual"], seed: int = 0) -> dict:
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


def _check_stage(parts: Parts, suffix: str, n: int, v: int, cb: int) -> int:
    """The codebook of one stage (``book`` / ``book2``: 1 to 2^cb fp16 vectors of ``v``) and its packed indices;
    returns the codebook's size."""
    book = need_part(parts, "book" + suffix, torch.float16)
    if book.dim() != 2 or book.shape[1] != v or not 1 <= book.shape[0] <= 2 ** cb:
        raise ValueError(f"part 'book{suffix}' has shape {list(book.shape)}, not 1 to {2 ** cb} vectors of {v}")
    need_part(parts, "labels" + suffix, torch.uint8, packed_size(n, cb))
    return book.shape[0]


@register_codec("vq", VQ, VQ_LIMITS)
class _VQ:
    @staticmethod
    def encode(tensor: torch.Tensor, settings: dict, hessian: torch.Tensor | None = None) -> tuple[Parts, dict]:
        v, cb = int(settings["v"]), int(settings["codebook_bits"])
        q = vq_quantize(as_matrix(tensor), v, cb, hessian_diag=hessian, residual=bool(settings["residual"]))
        meta = dict(v=v, codebook_bits=cb, matrix=list(q["shape"]), n=q["labels"].numel(), book=list(q["book"].shape),
                    residual="book2" in q, hessian=hessian is not None)
        parts = {"scale": q["scale"], "book": q["book"], "labels": pack_bits(q["labels"], cb)}
        if "book2" in q:
            parts.update(book2=q["book2"], labels2=pack_bits(q["labels2"], cb))
        return parts, meta

    @staticmethod
    def check(parts: Parts, meta: dict, shape: tuple[int, ...]) -> None:
        v, cb = meta["v"], meta["codebook_bits"]
        rows, cols = meta_groups(meta, shape, v, "n", "vectors")
        need_part(parts, "scale", torch.float16, shape=(rows, 1))
        for suffix in ("", "2") if meta.get("residual") else ("",):
            _check_stage(parts, suffix, meta["n"], v, cb)

    @staticmethod
    def decode(parts: Parts, meta: dict, shape: tuple[int, ...]) -> torch.Tensor:
        cb, n = meta["codebook_bits"], meta["n"]
        q = {"scale": parts["scale"], "book": parts["book"], "labels": unpack_bits(parts["labels"], cb, n),
             "shape": tuple(meta["matrix"])}
        if meta["residual"]:
            q.update(book2=parts["book2"], labels2=unpack_bits(parts["labels2"], cb, n))
        for suffix in ("", "2") if meta["residual"] else ("",):
            if n and int(q["labels" + suffix].max()) >= len(q["book" + suffix]):
                raise ValueError(f"an index of labels{suffix} lies past the {len(q['book' + suffix])} codebook "
                                 "vectors")
        return vq_dequantize(q).reshape(shape)
