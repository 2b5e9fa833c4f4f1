"""Titans-style neural memory for Cognate, used as a gate on attention (MAG).

Per head a linear associative memory ``M`` (d x d) is read before it is written, ``m_t = M_{t-1} q_t``, and
written by one gradient step on ``||M k_t - v_t||^2`` with momentum ("surprise") and a forget gate:

    grad_t = 2 (M k_t - v_t) k_t^T
    S_t = eta_t S_{t-1} - theta_t grad_t
    M_t = (1 - alpha_t) M_{t-1} + S_t

eta, theta, alpha are per-token, per-head rates from ``sigmoid(Linear(x_t))``; with ``stable=True`` (the config's
``memory_step: stable``) the step is bounded by the momentum and the chunk size C (below):
``theta_t = sigmoid(Linear(x_t)) * (1 - eta_t) / C``.

Chunked form: inside a chunk of C tokens every gradient is taken at ``M0``, the memory at the chunk start
(C = 1 is exactly the sequential recursion above). The recursions for S and M are then linear with scalar decays,
so each chunk is a few batched matmuls, computed for all chunks at once; only a two-matmul recursion of the chunk
start states runs sequentially (derivation in ``_chunk_terms``). No library offers this update, so it
is written here by hand; the tests check it against plain token-by-token loops.

Why a stable step is ``(1 - eta) / C`` of the rate: every gradient of a chunk is taken at ``M0`` and the momentum sums
them, so along a key direction the chunk moves the memory's error by about ``sum_j sum_(r<=j) eta^(j-r) theta_r``
times the curvature: up to C / (1 - eta) times one token's step. Similar keys over a chunk (prose repeats its
directions) then made the chunked memory diverge: on SmolLM2's hidden states a memory specialist's perplexity on
128-token windows of real text was 7.9e6 with C = 16 and 7.4e13 with C = 4, against 27.3 token by token. With the
step scaled so, the chunk's map of (error, momentum) along any key direction has spectral radius below 1 for every
eta, theta in (0, 1) and forget rate (checked on a grid, and on products of chunks with random per-token rates);
``tests/test_cognate_model.py`` runs 512 tokens of one key at the largest rates, bounded, where the unscaled step
explodes. The price: every write is C / (1 - eta) times weaker, and a memory that must store a pair from one
sighting learns it far more slowly (``forge bench cognate --parts memory``, recall beyond a 16-token window after 400
steps: 1.00 with the plain step, 0.14 with the stable one, 0.09 with the memory off). So the plain step stays the
default (the smoke and cpu sets' prompts are short enough for it) and Phase 1 builds a pretrained trunk stable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Initial biases of the data-dependent rates (why: a fresh memory should forget slowly and step moderately,
# and the output gate should start attention-dominated so that switching memory on perturbs a trained trunk
# only a little).
ETA_BIAS_INIT = 0.0       # momentum sigmoid(0) = 0.5
THETA_BIAS_INIT = 0.0     # step size sigmoid(0) = 0.5 (keys are unit-norm, so 2*theta < 2 keeps sequential LMS stable)
ALPHA_BIAS_INIT = -4.0    # forget rate sigmoid(-4) ~ 0.018: a horizon of ~50 tokens before any learning
GATE_BIAS_INIT = 2.0      # g = sigmoid(2) ~ 0.88 weight on attention

PENDING_KEYS = ("k", "v", "log_eta", "theta", "log_keep")


@dataclass
class MemoryState:
    """What a memory carries between calls: M and S at the last chunk boundary, and the tokens seen since
    (``pending``: dict of PENDING_KEYS -> (B, H, P, ...) with P < chunk size, or None)."""

    M: torch.Tensor  # (B, H, d, d)
    S: torch.Tensor  # (B, H, d, d)
    pending: dict | None = None

    def map_batch(self, fn) -> "MemoryState":
        """Apply ``fn`` to every tensor along the batch dimension (beam reorder, repeat, select)."""
        pending = None if self.pending is None else {key: fn(t) for key, t in self.pending.items()}
        return MemoryState(fn(self.M), fn(self.S), pending)


def _decay_matrix(log_cum: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """D[j, i] = prod_{l=i+1..j} exp(log_rate_l) for i <= j, else 0, from the inclusive cumulative sums.

    log_cum: (B, H, C); lower: (C, C) bool lower-triangular. Returns (B, H, C, C)."""
    diff = log_cum.unsqueeze(-1) - log_cum.unsqueeze(-2)  # (B, H, C, C): L_j - L_i
    return diff.masked_fill(~lower, float("-inf")).exp()


def _chunk_terms(q, k, v, log_eta, theta, log_keep) -> dict:
    """Everything about each chunk that does not depend on its start state, for all chunks at once.

    Inputs are split into chunks: q, k, v (B, H, N, C, d); log_eta = log(eta), theta, log_keep = log(1 - alpha)
    (B, H, N, C). Within a chunk every gradient is taken at its start state M0: with u_r = 2 (M0 k_r - v_r),
      S_j = E_j S0 - sum_{r<=j} F[j,r] theta_r u_r k_r^T,            E_j = prod_{l<=j} eta_l
      M_j = A_j M0 + c_j S0 - sum_{r<=j} K[j,r] theta_r u_r k_r^T,    A_j = prod_{l<=j} (1 - alpha_l)
    with F[i,r] = prod_{l=r+1..i} eta_l, B[j,i] = prod_{l=i+1..j} (1 - alpha_l), K = B @ F, c = B @ E.
    Everything is linear in (M0, S0), so (row form, X^T written X'):
      reads_j = M_{j-1} q_j:  reads = Qm M0' + Qs S0' + R
      M_C = M0 PM + c_C S0 + QM,   S_C = M0 PS + E_C S0 + QS.
    """
    C = q.shape[-2]
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    cum_keep, cum_eta = log_keep.cumsum(-1), log_eta.cumsum(-1)  # (B, H, N, C)
    B_mat = _decay_matrix(cum_keep, lower)  # (B, H, N, C, C)
    F_mat = _decay_matrix(cum_eta, lower)  # (B, H, N, C, C)
    K_mat = B_mat @ F_mat  # (B, H, N, C, C)
    E, A = cum_eta.exp(), cum_keep.exp()  # (B, H, N, C)
    c = (B_mat @ E.unsqueeze(-1)).squeeze(-1)  # (B, H, N, C)
    # Reads use the state before token j: shift A, c and K down by one row (A_0 = 1, c_0 = 0, K_0 = 0).
    A_prev = F.pad(A[..., :-1], (1, 0), value=1.0)  # (B, H, N, C)
    c_prev = F.pad(c[..., :-1], (1, 0))  # (B, H, N, C)
    W = F.pad(K_mat[..., :-1, :], (0, 0, 1, 0)) * (q @ k.transpose(-1, -2))  # (B, H, N, C, C)
    theta_k, theta_v = theta.unsqueeze(-1) * k, theta.unsqueeze(-1) * v  # (B, H, N, C, d)
    w_K, w_F = K_mat[..., -1, :].unsqueeze(-1), F_mat[..., -1, :].unsqueeze(-1)  # (B, H, N, C, 1)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return dict(
        Qm=A_prev.unsqueeze(-1) * q - 2.0 * (W @ theta_k), Qs=c_prev.unsqueeze(-1) * q, R=2.0 * (W @ theta_v),
        PM=A[..., -1, None, None] * eye - 2.0 * (w_K * theta_k).transpose(-1, -2) @ k,  # (B, H, N, d, d)
        PS=-2.0 * (w_F * theta_k).transpose(-1, -2) @ k,  # (B, H, N, d, d)
        QM=2.0 * (w_K * theta_v).transpose(-1, -2) @ k, QS=2.0 * (w_F * theta_v).transpose(-1, -2) @ k,
        c_end=c[..., -1, None, None], E_end=E[..., -1, None, None])  # (B, H, N, 1, 1)


def _propagate(terms: dict, M: torch.Tensor, S: torch.Tensor):
    """The only sequential part (two small matmuls per chunk): the start states of every chunk, stacked to
    (B, H, N, d, d) for M and for S, and the states after the last chunk."""
    starts_M, starts_S = [], []
    for n in range(terms["PM"].shape[2]):
        starts_M.append(M)
        starts_S.append(S)
        M, S = (M @ terms["PM"][:, :, n] + terms["c_end"][:, :, n] * S + terms["QM"][:, :, n],
                M @ terms["PS"][:, :, n] + terms["E_end"][:, :, n] * S + terms["QS"][:, :, n])
    return torch.stack(starts_M, dim=2), torch.stack(starts_S, dim=2), M, S


def _with_pending(state: MemoryState | None, q, new: dict) -> tuple[torch.Tensor, dict, int]:
    """Prepend the state's pending tokens to the new ones (their queries are zeros: their reads were done)."""
    if state is None or state.pending is None:
        return q, new, 0
    P = state.pending["k"].shape[-2]
    q_all = torch.cat([q.new_zeros(*q.shape[:-2], P, q.shape[-1]), q], dim=-2)
    merged = {key: torch.cat([state.pending[key], new[key]], dim=-2 if new[key].dim() == 4 else -1)
              for key in PENDING_KEYS}
    return q_all, merged, P


def _split_chunks(t: torch.Tensor, chunk: int, pad: int) -> torch.Tensor:
    """(B, H, L[, d]) -> (B, H, N, C[, d]), zero-padding the time axis at the end by ``pad``.

    Zero padding is harmless: padded tokens come after every real one, so they change no real read, and the end
    state of a partial chunk is never used (its tokens are kept as pending instead)."""
    if t.dim() == 4:
        t = F.pad(t, (0, 0, 0, pad))
        return t.view(*t.shape[:2], -1, chunk, t.shape[-1])
    t = F.pad(t, (0, pad))
    return t.view(*t.shape[:2], -1, chunk)


def memory_scan(q, k, v, log_eta, theta, log_keep, state: MemoryState | None, chunk_size: int):
    """Run the memory over new tokens, continuing ``state`` (None = empty memory).

    q, k, v: (B, H, T, d); log_eta, theta, log_keep: (B, H, T). Chunks are aligned to the start of the whole
    sequence (pending tokens included), so a prefix processed in pieces gives the same reads as in one piece.
    Returns reads (B, H, T, d) and the new MemoryState."""
    new = dict(k=k, v=v, log_eta=log_eta, theta=theta, log_keep=log_keep)
    q_all, seq, P = _with_pending(state, q, new)
    L, d = q_all.shape[-2], q.shape[-1]
    pad = -L % chunk_size
    chunks = {key: _split_chunks(t, chunk_size, pad) for key, t in seq.items()}
    terms = _chunk_terms(_split_chunks(q_all, chunk_size, pad), chunks["k"], chunks["v"], chunks["log_eta"],
                         chunks["theta"], chunks["log_keep"])
    M = q.new_zeros(*q.shape[:2], d, d) if state is None else state.M  # (B, H, d, d)
    S = torch.zeros_like(M) if state is None else state.S
    M0, S0, M_last, S_last = _propagate(terms, M, S)  # (B, H, N, d, d) x2, (B, H, d, d) x2
    reads = terms["Qm"] @ M0.transpose(-1, -2) + terms["Qs"] @ S0.transpose(-1, -2) + terms["R"]  # (B,H,N,C,d)
    reads = reads.flatten(2, 3)[..., P:L, :]  # (B, H, T, d)
    done = L - (L % chunk_size)  # tokens in complete chunks
    if done == L:
        return reads, MemoryState(M_last, S_last, None)
    n_full = done // chunk_size
    pending = {key: (t[..., done:, :] if t.dim() == 4 else t[..., done:]) for key, t in seq.items()}
    return reads, MemoryState(M0[:, :, n_full], S0[:, :, n_full], pending)


def binary_entropy(g: torch.Tensor) -> torch.Tensor:
    """Elementwise binary entropy (nats) of probabilities g."""
    g = g.clamp(1e-7, 1 - 1e-7)
    return -(g * g.log() + (1 - g) * (1 - g).log())


class BiasInitLinear(nn.Linear):
    """A Linear whose bias starts at ``bias_init`` (the model's weight init reads the attribute)."""

    def __init__(self, in_features: int, out_features: int, bias_init: float):
        super().__init__(in_features, out_features)
        self.bias_init = bias_init


class CognateMemory(nn.Module):
    """Per-head linear memory blended into one attention layer: ``g * attn + (1 - g) * mem``, ``g = sigmoid(W x)``.

    It reuses the attention's own queries, keys and values (before RoPE: the memory is position-free), with
    queries and keys L2-normalised per head so that the step ``theta`` is a bounded learning rate."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, chunk_size: int):
        super().__init__()
        self.num_heads, self.head_dim, self.chunk_size = num_heads, head_dim, chunk_size
        self.eta_proj = BiasInitLinear(hidden_size, num_heads, ETA_BIAS_INIT)
        self.theta_proj = BiasInitLinear(hidden_size, num_heads, THETA_BIAS_INIT)
        self.alpha_proj = BiasInitLinear(hidden_size, num_heads, ALPHA_BIAS_INIT)
        self.out_gate = BiasInitLinear(hidden_size, num_heads * head_dim, GATE_BIAS_INIT)

    def rates(self, x: torch.Tensor, real: torch.Tensor | None, stable: bool = False):
        """log eta, theta (``stable``: at most (1 - eta) / chunk_size), log(1 - alpha), each (B, H, T), from x
        (B, T, D). Padding (real == False) writes nothing and decays nothing, so left padding leaves the empty memory
        untouched."""
        log_eta = F.logsigmoid(self.eta_proj(x)).transpose(1, 2)  # (B, H, T)
        theta = torch.sigmoid(self.theta_proj(x)).transpose(1, 2)  # (B, H, T)
        if stable:  # (1 - eta) / C: a chunk that cannot diverge (module docstring)
            theta = theta * (-torch.expm1(log_eta) / self.chunk_size)
        log_keep = F.logsigmoid(-self.alpha_proj(x)).transpose(1, 2)  # (B, H, T): log(1 - sigmoid(a))
        if real is not None:
            keep = real.unsqueeze(1)  # (B, 1, T)
            log_eta, theta, log_keep = (t.masked_fill(~keep, 0.0) for t in (log_eta, theta, log_keep))
        return log_eta, theta, log_keep

    def forward(self, x, attn, q, k, v, state: MemoryState | None, real: torch.Tensor | None, stable: bool = False):
        """Blend memory reads into the attention output.

        x: normalised layer input (B, T, D); attn: attention output (B, T, H, d); q: (B, H, T, d) and k, v:
        (B, H, T, d) already expanded to the query heads. Returns blended (B, T, H, d), the new state and the
        gate g (B, T, H*d)."""
        q_n, k_n = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        log_eta, theta, log_keep = self.rates(x, real, stable)
        reads, new_state = memory_scan(q_n, k_n, v, log_eta, theta, log_keep, state, self.chunk_size)
        g = torch.sigmoid(self.out_gate(x))  # (B, T, H*d)
        mem = reads.transpose(1, 2)  # (B, T, H, d)
        blended = g.view_as(attn) * attn + (1 - g.view_as(attn)) * mem
        return blended, new_state, g


__all__ = ["BiasInitLinear", "CognateMemory", "MemoryState", "memory_scan", "binary_entropy"]
