"""SeedLM: a block of ``C`` weights as a ``K``-bit LFSR seed and ``P`` 4-bit coefficients with a shared exponent.

    seeds, coefs, exps, err = seed_search(blocks, SeedLMConfig(K=12, C=8, P=3))
    approx = reconstruct(seeds, coefs, exps, config)

A seed ``s`` (1 … 2^K − 1) drives a Fibonacci LFSR (``lfsr_states``; a primitive feedback polynomial per K, so
every non-zero seed runs through all 2^K − 1 states) whose next ``C·P`` states, mapped to (−1, 1), fill the
block's basis ``U_s`` (C × P). The block ``w`` is approximated by ``U_s t``: for every seed the least-squares
coefficients ``t = U_s⁺ w`` (pseudo-inverses computed once for all seeds), the ``top`` seeds with the smallest
least-squares error are kept, their coefficients quantized to ``coef_bits``-bit integers times ``2^e`` with one
shared exponent ``e`` per block (``exp_bits`` bits), and the seed whose quantized reconstruction is closest wins.
Bits per weight: ``(K + exp_bits + P · coef_bits) / C`` (``bits_per_weight``), e.g. K 16, C 8, P 3: 4.0.

The search is the cost: blocks × seeds × C multiply-adds, done in chunks of blocks (``chunk``) with batched
tensor products; ``seed_search`` returns the seconds it took per block beside the result.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch

# Feedback taps (exponents of a primitive polynomial x^K + ... + 1) for maximal-length Fibonacci LFSRs.
TAPS = {4: (4, 3), 5: (5, 3), 6: (6, 5), 7: (7, 6), 8: (8, 6, 5, 4), 10: (10, 7), 12: (12, 11, 10, 4),
        14: (14, 13, 12, 2), 16: (16, 15, 13, 4)}


@dataclasses.dataclass(frozen=True)
class SeedLMConfig:
    K: int = 16
    """Seed bits (an LFSR of K bits: 2^K − 1 seeds)."""
    C: int = 8
    """Weights per block."""
    P: int = 3
    """Coefficients per block."""
    coef_bits: int = 4
    exp_bits: int = 4
    top: int = 8
    """Seeds (best by least-squares error) whose quantized coefficients are compared."""
    chunk: int = 256
    """Blocks per batched search step (memory ~ chunk × 2^K × C floats)."""

    def __post_init__(self):
        if self.K not in TAPS:
            raise ValueError(f"K must be one of {sorted(TAPS)} (a primitive polynomial is tabulated), got {self.K}")
        if not 1 <= self.P <= self.C:
            raise ValueError(f"need 1 <= P <= C, got P={self.P}, C={self.C}")


def bits_per_weight(config: SeedLMConfig) -> float:
    """``(K + exp_bits + P · coef_bits) / C``: the seed, the shared exponent and the coefficients of one block."""
    return (config.K + config.exp_bits + config.P * config.coef_bits) / config.C


def lfsr_next(states: torch.Tensor, K: int) -> torch.Tensor:
    """One Fibonacci LFSR step for every state at once: the feedback bit is the XOR of the tapped bits (tap t is bit
    ``K − t``, counting from the least significant), shifted in at the top."""
    bit = torch.zeros_like(states)
    for t in TAPS[K]:
        bit ^= (states >> (K - t)) & 1
    return (states >> 1) | (bit << (K - 1))


def lfsr_states(seeds: torch.Tensor, K: int, n: int) -> torch.Tensor:
    """(len(seeds), n) the states after 1 … n steps from each seed (int64)."""
    states, out = seeds.to(torch.int64), []
    for _ in range(n):
        states = lfsr_next(states, K)
        out.append(states)
    return torch.stack(out, 1)


def basis(seeds: torch.Tensor, config: SeedLMConfig) -> torch.Tensor:
    """(S, C, P) the pseudo-random bases of ``seeds``: states mapped to (−1, 1) by ``2 s / 2^K − 1``."""
    states = lfsr_states(seeds, config.K, config.C * config.P).to(torch.float64)
    return (2.0 * states / (1 << config.K) - 1.0).reshape(len(seeds), config.C, config.P).to(torch.float32)


def quantize_coefficients(t: torch.Tensor, config: SeedLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer coefficients in [−2^(b−1), 2^(b−1) − 1], the shared exponent per row) for ``t`` (..., P): the
    exponent is the smallest power of two with which the largest positive and the most negative coefficient still
    fit, within the ``exp_bits`` range e ∈ [−2^exp_bits + 1, 0]."""
    qmax = 2 ** (config.coef_bits - 1) - 1  # positives up to qmax, negatives down to -(qmax + 1)
    e_min = -(2 ** config.exp_bits) + 1
    tiny = 1e-30
    need_pos = torch.log2(t.clamp(min=0).amax(-1).clamp(min=tiny) / qmax)
    need_neg = torch.log2((-t).clamp(min=0).amax(-1).clamp(min=tiny) / (qmax + 1))
    # the smallest exponent that fits both ends; 1e-4 absorbs the float error of an exact power of two
    e = torch.ceil(torch.maximum(need_pos, need_neg) - 1e-4).clamp(e_min, e_min + 2 ** config.exp_bits - 1)
    q = torch.round(t / torch.exp2(e)[..., None]).clamp(-qmax - 1, qmax)
    return q, e


def seed_search(blocks: torch.Tensor, config: SeedLMConfig) -> dict:
    """Best seed, integer coefficients and exponent per block (N, C); returns them with the squared error per
    block and ``seconds_per_block``."""
    if blocks.dim() != 2 or blocks.shape[1] != config.C:
        raise ValueError(f"blocks must be (N, {config.C}), got {tuple(blocks.shape)}")
    started = time.perf_counter()
    seeds = torch.arange(1, 1 << config.K)
    u = basis(seeds, config)  # (S, C, P)
    pinv = torch.linalg.pinv(u)  # (S, P, C)
    out = {k: [] for k in ("seed", "coef", "exp", "error")}
    top = min(config.top, len(seeds))
    for start in range(0, len(blocks), config.chunk):
        w = blocks[start:start + config.chunk].float()  # (n, C)
        t = torch.einsum("spc,nc->nsp", pinv, w)  # (n, S, P)
        err = ((w[:, None, :] - torch.einsum("scp,nsp->nsc", u, t)) ** 2).sum(-1)  # (n, S)
        cand = err.topk(top, largest=False).indices  # (n, top)
        tc = torch.gather(t, 1, cand[..., None].expand(-1, -1, config.P))  # (n, top, P)
        q, e = quantize_coefficients(tc, config)
        recon = torch.einsum("ntcp,ntp->ntc", u[cand], q * torch.exp2(e)[..., None])
        qerr = ((w[:, None, :] - recon) ** 2).sum(-1)  # (n, top)
        best = qerr.argmin(1)
        rows = torch.arange(len(w))
        out["seed"].append(seeds[cand[rows, best]])
        out["coef"].append(q[rows, best].to(torch.int8))
        out["exp"].append(e[rows, best].to(torch.int8))
        out["error"].append(qerr[rows, best])
    result = {k: torch.cat(v) for k, v in out.items()}
    result["seconds_per_block"] = (time.perf_counter() - started) / max(1, len(blocks))
    return result


def reconstruct(seeds: torch.Tensor, coefs: torch.Tensor, exps: torch.Tensor, config: SeedLMConfig) -> torch.Tensor:
    """(N, C) blocks from their seeds, integer coefficients and exponents."""
    return torch.einsum("ncp,np->nc", basis(seeds, config), coefs.float() * torch.exp2(exps.float())[:, None])


def compress_matrix(weight: torch.Tensor, config: SeedLMConfig) -> dict:
    """A matrix as SeedLM blocks (rows flattened, zero-padded to a multiple of C) with its per-block error."""
    flat = weight.detach().float().reshape(-1)
    pad = (-len(flat)) % config.C
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, config.C)
    found = seed_search(blocks, config)
    return {**found, "shape": tuple(weight.shape), "pad": pad}


def decompress_matrix(packed: dict, config: SeedLMConfig) -> torch.Tensor:
    flat = reconstruct(packed["seed"], packed["coef"], packed["exp"], config).reshape(-1)
    return flat[:math.prod(packed["shape"])].reshape(packed["shape"])
