"""Quiet-STaR: a causal LM that thinks before each token (parallel thoughts, mixing head, REINFORCE).

``QuietStarModel(base, tokenizer, config)`` wraps any causal LM forgelib loads (Cognate, Llama/Qwen2-style HF
models). For every position t of a sequence it writes a thought ``<|startofthought|> c_1 .. c_n
<|endofthought|>`` after the real prefix ``x≤t`` and predicts the next tokens from the thought's end:

* **Parallel thoughts.** One base pass over the real tokens fills a KV cache; then one forward pass per
  thought token handles *all* positions at once. The queries of step j (one per position t) see the real keys
  ``s ≤ t`` (padding hidden) and the keys of steps ``0..j`` *of their own position* only -- a 4-D mask of shape
  (B, 1, Q, T + (j+1)·Q) whose extension part is ``[I_Q I_Q .. I_Q]``. Position ids continue the prefix:
  step j at t has position ``p(t) + 1 + j``. The result equals writing each thought after its own prefix
  separately (``tests/test_quietstar.py`` checks it against that loop, with the same Gumbel noise).
* **After the thought** the eot token predicts ``x_{t+1}``; then the true tokens ``x_{t+1} .. x_{t+n_true-1}``
  are fed (teacher forcing) and predict ``x_{t+2} .. x_{t+n_true}``.
* **Mixing head**: an MLP on ``[h_base(t+i), h_thought(t, i)]`` gives ``w ∈ [0, 1]``; the prediction of
  ``x_{t+1+i}`` is ``logits_base + w · (logits_thought − logits_base)`` -- the same as mixing the final hidden
  states before the (linear) LM head. Its last layer starts at zero and ``w = clamp(a, 0, 1)``, so an untrained
  model gives exactly the base model's logits. Why a clamp and not a sigmoid: ``sigmoid(0) = 0.5`` would mix
  from the start, and a sigmoid started near 0 has a vanishing gradient. The clamp's gradient is passed
  straight through (also below 0, where the value stays 0): the head learns whether *opening* would help
  at a position even where it is closed -- a clamp with a dead zone stopped learning once most positions
  were closed.
* **Loss** = base NLL + mixed NLL of the ``n_true`` teacher-forced tokens + their post-thought NLL (unmixed,
  ``thought_loss_weight``: see there why) + REINFORCE on the thought tokens
  (+ the KL to the frozen start model from the Phase-3 MuGrokfast preset, added by the caller's ``kl``).
  The reward of a thought is the log-likelihood it gives the ``n_true`` true tokens (``reward="mixed"``: under
  the mixed prediction, as in the paper; ``"thought"``: under the post-thought prediction alone, which gives a
  signal before the mixing head opens); the advantage is the reward minus the mean over the ``n_passes``
  thoughts sampled at that position, and only positive advantages are reinforced.
* ``thought_mode="pause"`` writes the same number of content-free (learned, all equal) pause tokens and
  ``"random"`` uniform random tokens -- the honest ablations; neither has a REINFORCE term.

Thought tokens are sampled from the ordinary text vocabulary only (``thought_vocabulary``: no special tokens,
no lone bytes of multi-byte characters). The start/end/pause
embeddings are parameters of the wrapper (learning ``embedding_grad_scale`` times faster), initialised from
the base embedding rows of ``<|startofthought|>`` / ``<|endofthought|>``.

The Titans memory (a recurrence over the sequence order) and sliding windows cannot run under a parallel-thought
mask: such a model raises a clear error (run it with ``use_memory=False``).
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tokenizer import END_THOUGHT, START_THOUGHT
from .config import QuietStarConfig
from .io import save_quietstar


@dataclasses.dataclass
class Thoughts:
    """One thinking pass over a batch (B' = batch × passes rows; Q thinking positions per row)."""

    base_logits: torch.Tensor  # (B', T, V) the base model's next-token logits
    base_hidden: torch.Tensor  # (B', T, D) its final (normalised) hidden states
    positions: torch.Tensor  # (B', Q) the positions t that thought
    tokens: torch.Tensor  # (B', Q, n_thought) the thought's content tokens
    logprob: torch.Tensor  # (B', Q) log-probability of the content under the sampling distribution (0 if not sampled)
    thought_logits: torch.Tensor  # (B', Q, n_true, V) prediction of x_{t+1+i} after the thought
    base_future_logits: torch.Tensor  # (B', Q, n_true, V) the base prediction of x_{t+1+i} (at t+i)
    weights: torch.Tensor  # (B', Q, n_true) mixing weights
    mixed_logits: torch.Tensor  # (B', Q, n_true, V)


@dataclasses.dataclass
class QuietStarOutput:
    """``forward``'s result: mixed next-token logits (B, T, V) like any causal LM, plus what the thoughts were."""

    logits: torch.Tensor
    base_logits: torch.Tensor
    mix_weights: torch.Tensor  # (B, T)
    thought_tokens: torch.Tensor  # (B, T, n_thought)
    loss: torch.Tensor | None = None


def _straight_through_clamp(a: torch.Tensor) -> torch.Tensor:
    """clamp(a, 0, 1) in value, identity in gradient (see the module docstring)."""
    return a + (a.clamp(0.0, 1.0) - a).detach()


def _cache_for(model: nn.Module):
    """A fresh KV cache the model accepts (a CognateCache for Cognate: one layer per virtual layer)."""
    if getattr(model.config, "model_type", None) == "cognate":
        from ..models.cache import CognateCache

        return CognateCache(model.config)
    from transformers import DynamicCache

    return DynamicCache()


def sample_tokens(logits: torch.Tensor, allowed: torch.Tensor, temperature: float,
                  noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits`` (..., V) from ``softmax(logits / temperature)`` restricted to
    ``allowed`` (V,) by the Gumbel-max trick with ``noise`` (..., V) (drawn when None); temperature 0 is the
    argmax. Returns (tokens (...), their log-probability (...), 0 for greedy)."""
    masked = logits.float().masked_fill(~allowed, float("-inf"))
    if temperature == 0:
        return masked.argmax(-1), torch.zeros(masked.shape[:-1], device=logits.device)
    scaled = masked / temperature
    if noise is None:
        noise = -torch.log(-torch.log(torch.rand_like(scaled).clamp_(1e-20, 1.0)))
    tokens = (scaled + noise).argmax(-1)
    logp = F.log_softmax(scaled, -1).gather(-1, tokens[..., None]).squeeze(-1)
    return tokens, logp


def thought_mask(key_visible: torch.Tensor, step: int) -> torch.Tensor:
    """The 4-D mask of thought step ``step`` (0-based): ``key_visible`` (B, Q, T) marks the real keys each
    thinking position sees; every step appends Q keys of which a query sees only its own position's.
    Returns bool (B, 1, Q, T + (step+1)·Q), True = visible."""
    B, Q, _ = key_visible.shape
    own = torch.eye(Q, dtype=torch.bool, device=key_visible.device).expand(B, Q, Q)
    return torch.cat([key_visible, *([own] * (step + 1))], dim=-1)[:, None]


def thought_vocabulary(tokenizer: Any, vocab: int) -> torch.Tensor:
    """(vocab,) bool: the tokens a thought may use -- every token that decodes to text on its own, i.e. not a
    special token and not a lone byte of a multi-byte character (those decode to U+FFFD; the tasks are ASCII,
    so their embeddings are never trained, and greedy thoughts of the smoke model were made of them)."""
    allowed = torch.zeros(vocab, dtype=torch.bool)
    special = set(getattr(tokenizer, "all_special_ids", []))
    for i in range(min(vocab, len(tokenizer))):
        if i not in special:
            text = tokenizer.decode([i])
            allowed[i] = bool(text) and "\ufffd" not in text
    if not allowed.any():
        raise ValueError("the tokenizer has no ordinary text token to think with")
    return allowed


class QuietStarModel(nn.Module):
    """A causal LM with Quiet-STaR thoughts (see the module docstring).

    ``forward(input_ids, attention_mask)`` returns mixed next-token logits at every position (thinking with
    ``inference_temperature`` in eval mode), so ``forgelib.evaluate`` scores it like any model; ``generate``
    thinks before each new token and returns token ids without any thought token.
    """

    def __init__(self, base_model: nn.Module, tokenizer: Any, config: QuietStarConfig | None = None):
        super().__init__()
        self.base = base_model
        self.qconfig = config or QuietStarConfig()
        cfg = base_model.config
        if getattr(cfg, "use_memory", False):
            raise ValueError("Quiet-STaR cannot think in parallel with the Titans memory on (a recurrence over the "
                             "sequence order); load the model with use_memory=False")
        if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "model_type", None) == "cognate":
            raise ValueError("Quiet-STaR needs full attention; this Cognate model has a sliding_window")
        ids = {}
        for token in (START_THOUGHT, END_THOUGHT):
            found = tokenizer.convert_tokens_to_ids(token)
            vocab = base_model.get_input_embeddings().num_embeddings
            if found is None or found == tokenizer.unk_token_id or found >= vocab:
                raise ValueError(f"the tokenizer has no {token} token inside the model's vocabulary; add it with "
                                 f"forgelib.data.tokenizer.ensure_special_tokens and resize the embeddings")
            ids[token] = int(found)
        self.sot_id, self.eot_id = ids[START_THOUGHT], ids[END_THOUGHT]
        table = base_model.get_input_embeddings().weight
        vocab, hidden = base_model.get_output_embeddings().weight.shape
        self.register_buffer("thought_vocab", thought_vocabulary(tokenizer, vocab), persistent=False)
        # start, end, pause: initialised from the reserved tokens' rows (pause from the start token's)
        init = table.detach()[[self.sot_id, self.eot_id, self.sot_id]].clone()
        self.thought_embeddings = nn.Parameter(init)  # (3, D)
        self.mixing_head = nn.Sequential(nn.Linear(2 * hidden, self.qconfig.mixing_hidden), nn.ReLU(),
                                         nn.Linear(self.qconfig.mixing_hidden, 1))
        nn.init.zeros_(self.mixing_head[-1].weight)
        nn.init.zeros_(self.mixing_head[-1].bias)
        self.to(table.device)
        self.thinking = True
        """Whether forward/generate think (``no_thoughts`` turns it off for a block). Saved with the model: a model
        handed on without thinking (Phase 3's decision) answers as its base wherever it is loaded."""
        self.export_packing: str | None = None
        self.export_report: dict | None = None

    # --- the HF-like surface -------------------------------------------------------------------------

    @property
    def config(self):
        """The base model's config (runtime settings such as ``n_cycles`` live there)."""
        return self.base.config

    def get_input_embeddings(self):
        return self.base.get_input_embeddings()

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

    @contextlib.contextmanager
    def no_thoughts(self):
        """Within the block the model is its base: forward/generate give the base model's predictions."""
        before, self.thinking = self.thinking, False
        try:
            yield self
        finally:
            self.thinking = before

    # --- thinking ------------------------------------------------------------------------------------

    def _lm(self, cache, **kwargs):
        """(logits, final hidden states, the cache -- updated in place) of one base forward."""
        out = self.base(use_cache=True, output_hidden_states=True, cache=cache, **kwargs)
        return out.logits, out.hidden_states[-1], cache

    def _additive(self, mask: torch.Tensor, dtype) -> torch.Tensor:
        if getattr(self.base.config, "model_type", None) == "cognate":
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)

    def think(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              positions: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
              n_passes: int = 1, temperature: float | None = None, mode: str | None = None,
              n_true: int | None = None, noise: torch.Tensor | None = None,
              tokens: torch.Tensor | None = None) -> Thoughts:
        """Think at ``positions`` (B, Q) (default: every position) of ``input_ids`` (B, T), ``n_passes``
        thoughts each (rows repeated: row b·n_passes + p is pass p of row b).

        ``noise`` (B·n_passes, Q, n_thought, V): Gumbel noise for the samples (random mode: the token is the
        argmax of the noise over the allowed vocabulary); drawn from torch's RNG when None.
        ``position_ids`` (B, T): the real tokens' positions (default 0..T-1, as the base model's default).
        ``tokens`` (B·n_passes, Q, n_thought): think these given contents instead of sampling (``logprob`` is
        then their log-probability under the sampling distribution at ``temperature``)."""
        cfg = self.qconfig
        mode = cfg.thought_mode if mode is None else mode
        n_true = cfg.n_true if n_true is None else n_true
        temperature = (cfg.temperature if self.training else cfg.inference_temperature) if temperature is None \
            else temperature
        B, T = input_ids.shape
        device = input_ids.device
        mask2 = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if positions is None:
            positions = torch.arange(T, device=device).expand(B, T)
        rep = (lambda t: t.repeat_interleave(n_passes, 0)) if n_passes > 1 else (lambda t: t)
        ids, mask2, positions = rep(input_ids), rep(mask2), rep(positions)
        pos_given = position_ids is not None
        position_ids = rep(position_ids) if pos_given else torch.arange(T, device=device).expand(ids.shape[0], T)
        Bp, Q = positions.shape
        base_logits, base_hidden, cache = self._lm(input_ids=ids, attention_mask=mask2,
                                                   position_ids=position_ids if pos_given else None,
                                                   cache=_cache_for(self.base))
        key_visible = (torch.arange(T, device=device)[None, None, :] <= positions[:, :, None]) \
            & mask2.bool()[:, None, :]  # (B', Q, T)
        start_pos = position_ids.gather(1, positions) + 1  # (B', Q)
        true_next = ids.gather(1, (positions[..., None] + torch.arange(1, n_true, device=device)).clamp(max=T - 1)
                               .flatten(1)).view(Bp, Q, n_true - 1)  # x_{t+1} .. x_{t+n_true-1}
        tokens, logprob, after = self._thought_steps(cache, key_visible, start_pos, true_next, base_hidden.dtype,
                                                     mode=mode, n_true=n_true, temperature=temperature, noise=noise,
                                                     forced=tokens)
        thought_logits, b_logits, weights, mixed = self._mix(base_logits, base_hidden, positions, after, n_true, T)
        return Thoughts(base_logits, base_hidden, positions, tokens, logprob, thought_logits, b_logits, weights, mixed)

    def _thought_steps(self, cache, key_visible: torch.Tensor, start_pos: torch.Tensor, true_next: torch.Tensor,
                       dtype, *, mode: str, n_true: int, temperature: float, noise: torch.Tensor | None,
                       forced: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, list]:
        """The thought after the base pass in ``cache``: n_thought content steps, the end, then the true tokens;
        (content tokens (B', Q, n_thought), their log-probability (B', Q), [(logits, hidden) after eot and each
        true token])."""
        Bp, Q = start_pos.shape
        device = start_pos.device
        emb = self.thought_embeddings  # (3, D): start, end, pause
        embed = self.base.get_input_embeddings()
        n = self.qconfig.n_thought
        tokens = torch.full((Bp, Q, n), self.sot_id, dtype=torch.long, device=device)  # pause: shown as start
        logprob = torch.zeros(Bp, Q, device=device)
        after: list[tuple[torch.Tensor, torch.Tensor]] = []  # (logits, hidden) after eot and each true token
        step_input = emb[0].expand(Bp, Q, -1)
        for step in range(n + 1 + n_true):
            mask4 = self._additive(thought_mask(key_visible, step), dtype)
            logits, hidden, cache = self._lm(inputs_embeds=step_input, attention_mask=mask4,
                                             position_ids=start_pos + step, cache=cache)
            if step < n:  # choose content token `step`
                if mode == "pause":
                    step_input = emb[2].expand(Bp, Q, -1)
                    continue
                token, logprob = self._content_token(logits, step, mode, temperature, noise, forced, logprob)
                tokens[:, :, step] = token
                step_input = embed(token)
            elif step == n:
                step_input = emb[1].expand(Bp, Q, -1)
            else:  # after eot (step n+1) and after each true token
                after.append((logits, hidden))
                i = step - n - 1  # this output predicts x_{t+1+i}
                if i < n_true - 1:
                    step_input = embed(true_next[:, :, i])
        return tokens, logprob, after

    def _content_token(self, logits: torch.Tensor, step: int, mode: str, temperature: float,
                       noise: torch.Tensor | None, forced: torch.Tensor | None,
                       logprob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Content token ``step`` (B', Q): the ``forced`` one, else sampled (``mode``); and ``logprob`` plus its
        log-probability (unchanged for random tokens and forced ones at temperature 0)."""
        step_noise = None if noise is None else noise[:, :, step]
        if forced is not None:
            token = forced[:, :, step]
            if temperature > 0:
                scaled = logits.float().masked_fill(~self.thought_vocab, float("-inf")) / temperature
                logprob = logprob + F.log_softmax(scaled, -1).gather(-1, token[..., None]).squeeze(-1)
        elif mode == "random":
            if step_noise is None:
                step_noise = torch.rand(*logprob.shape, logits.shape[-1], device=logprob.device)
            token, _ = sample_tokens(torch.zeros_like(logits), self.thought_vocab, 1.0, step_noise)
        else:
            token, logp = sample_tokens(logits, self.thought_vocab, temperature, step_noise)
            logprob = logprob + logp
        return token, logprob

    def _mix(self, base_logits: torch.Tensor, base_hidden: torch.Tensor, positions: torch.Tensor,
             after: list[tuple[torch.Tensor, torch.Tensor]], n_true: int, T: int) -> tuple[torch.Tensor, ...]:
        """The thought's predictions mixed with the base model's of the same tokens: (thought logits, base logits,
        mixing weights, mixed logits), each (B', Q, n_true, ...)."""
        Bp, Q = positions.shape
        device = positions.device
        thought_logits = torch.stack([lg for lg, _ in after], 2)  # (B', Q, n_true, V)
        thought_hidden = torch.stack([h for _, h in after], 2)  # (B', Q, n_true, D)
        base_idx = (positions[..., None] + torch.arange(n_true, device=device)).clamp(max=T - 1)  # (B', Q, n_true)
        flat = base_idx.flatten(1)
        b_logits = base_logits.gather(1, flat[..., None].expand(-1, -1, base_logits.shape[-1])).view(
            Bp, Q, n_true, -1)
        b_hidden = base_hidden.gather(1, flat[..., None].expand(-1, -1, base_hidden.shape[-1])).view(
            Bp, Q, n_true, -1)
        a = self.mixing_head(torch.cat([b_hidden, thought_hidden.to(b_hidden.dtype)], -1)).squeeze(-1)
        weights = _straight_through_clamp(a.float())  # (B', Q, n_true)
        mixed = b_logits.float() + weights[..., None] * (thought_logits.float() - b_logits.float())
        return thought_logits, b_logits, weights, mixed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **unused) -> QuietStarOutput:
        """Mixed next-token logits (B, T, V) at every position (one thought each, no REINFORCE); with
        ``no_thoughts()`` the base model's logits."""
        if not self.thinking:
            logits = self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            B, T = input_ids.shape
            return QuietStarOutput(logits, logits, logits.new_zeros(B, T),
                                   torch.zeros(B, T, self.qconfig.n_thought, dtype=torch.long, device=logits.device))
        th = self.think(input_ids, attention_mask, position_ids=position_ids, n_true=1)
        return QuietStarOutput(th.mixed_logits[:, :, 0], th.base_logits, th.weights[:, :, 0], th.tokens)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, return_trace: bool = False, **unused):
        """Greedy decoding (left-padded prompts), thinking before every new token. Returns (B, T + new) ids
        like ``transformers`` generate -- thought tokens never enter the sequence -- or, with ``return_trace``,
        (ids, trace) where trace[k] = {"token": (B,), "thought": (B, n_thought), "weight": (B,)}.
        ``eos_token_id`` may be one id or a list (as in ``transformers``): a row is done at any of them."""
        ids = input_ids
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        eos_ids = [] if eos_token_id is None else [int(i) for i in torch.as_tensor(eos_token_id).flatten().tolist()]
        stop = torch.tensor(eos_ids, dtype=torch.long, device=ids.device)  # (E,)
        pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        trace = []
        for _ in range(max_new_tokens):
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as transformers' generate
            last = torch.full((ids.shape[0], 1), ids.shape[1] - 1, device=ids.device)
            if self.thinking:
                th = self.think(ids, mask, positions=last, position_ids=position_ids, n_true=1)
                logits, thought, weight = th.mixed_logits[:, 0, 0], th.tokens[:, 0], th.weights[:, 0, 0]
            else:
                logits = self.base(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
                thought = torch.zeros(ids.shape[0], 0, dtype=torch.long, device=ids.device)
                weight = logits.new_zeros(ids.shape[0])
            token = logits.argmax(-1).masked_fill(done, pad)
            trace.append({"token": token, "thought": thought, "weight": weight.float()})
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, (~done).long()[:, None]], 1)
            if eos_ids:
                done = done | torch.isin(token, stop)
            if bool(done.all()):
                break
        return (ids, trace) if return_trace else ids

    # --- save / load ---------------------------------------------------------------------------------

    def wrapper_settings(self) -> dict:
        """What a reader needs to rebuild this wrapper around its base (``forgelib.quant.artifact`` stores it;
        ``forgelib.modelio`` reads it back): the Quiet-STaR settings, the thought token ids and whether the model
        answers thinking (``thinking``: Phase 3 hands on the better of thinking and not thinking)."""
        return {"config": dataclasses.asdict(self.qconfig), "sot_id": self.sot_id, "eot_id": self.eot_id,
                "thinking": bool(self.thinking)}

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True, **kwargs) -> None:
        """The base as a normal HF folder (packed with ``export_packing`` = '2bit' or 'base3' when it is a BitNet
        model, ``forgelib.quant.export_packed``; its byte accounting lands in ``export_report``), plus the mixing
        head and thought embeddings (``quietstar.safetensors``) and the settings (``quietstar.json``) next to it.
        Int8 layers of the mixing head (``forgelib.quant.convert_to_int8``) are listed in ``quietstar.json``
        (``int8_modules``) and, when packed, stored as int8 codes + row maxima (``pack_int8_tensors``)."""
        save_quietstar(self, path, **kwargs)


def base_lm(model: nn.Module) -> nn.Module:
    """The causal LM itself: a QuietStarModel's ``base``, any other model unchanged."""
    return model.base if isinstance(model, QuietStarModel) else model

