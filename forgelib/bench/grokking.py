"""`forge bench grokking`: steps and seconds to grok `a·b mod 97` for several optimizers.

The Grokfast paper's task: every pair (a, b) with a in [0, 97), b in [1, 97) (9,312 pairs), half of them
for training; input tokens [a, op, b, =], loss on the answer only (the logits at "="); a 2-layer
pre-LayerNorm decoder of width 128 with 4 heads; batch 512; 10-step linear warm-up. Each optimizer runs
with several seeds (same seed = same split, initial weights and batches for every optimizer) until it
reaches ``--stop-at`` validation accuracy or the step cap; a target not reached is reported censored
("> cap"). Seconds count training steps only (forward, backward, optimizer), not evaluation.

Optimizers (``--optimizers``; a name may carry overrides: ``mugrokfast[grokfast_scope=adamw]``):
- paper-adam: Adam, lr 1e-3, betas (0.9, 0.98), no weight decay (the paper's baseline);
- paper-grokfast: the same Adam with L2 0.005 and the Grokfast-EMA filter (alpha 0.98, lambda 2);
- adamw: tuned AdamW (lr 1e-3, betas (0.9, 0.98), decoupled weight decay 1.0);
- muon: MuonGrokfast with the Phase-1 preset's settings but lambda 0 (Muon + AdamW, no filter);
- mugrokfast: the Phase-1 MuGrokfast preset (``forgelib.optim.PRESETS[1]``).
"""
from __future__ import annotations

import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import paths
from ..optim import MuonGrokfast, grokfast_ema, preset_config
from ..results import dumps_json
from .options import GROKKING_OPTIMIZERS as OPTIMIZERS, build_parser

PRIME = 97
TARGETS = (0.95, 0.99)

# OPTIMIZERS (forgelib.bench.options): name -> (kind, settings). kind "torch:<Class>" builds torch.optim.<Class>;
# "muongrokfast" builds MuonGrokfast from the Phase-1 preset with the settings as overrides.


# --- data and model ----------------------------------------------------------------------------------


def make_data(seed: int, p: int = PRIME, train_frac: float = 0.5) -> dict[str, torch.Tensor]:
    """All (a, b) pairs as [a, op, b, =] token rows with answer a*b mod p, split by a seeded shuffle."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(1, p), indexing="ij")
    a, b = a.flatten(), b.flatten()  # (N,)
    x = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1)  # (N, 4)
    y = (a * b) % p  # (N,)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(train_frac * len(y))
    tr, va = order[:n_train], order[n_train:]
    return {"train_x": x[tr], "train_y": y[tr], "val_x": x[va], "val_y": y[va]}


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with separate q/k/v projections (so Muon orthogonalizes each one,
    which a packed in-projection would not allow); reports ``qk_max_logits`` for QK-clip natively."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads = self.num_key_value_heads = heads
        self.head_dim = dim // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.qk_max_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, T, Dh)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, H, T, T)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
        self.qk_max_logits = logits.detach().transpose(0, 1).reshape(self.num_heads, -1).amax(1)  # (H,)
        out = logits.softmax(-1) @ v  # (B, H, T, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm block: attention and a 4x GELU MLP, each with a residual connection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GrokDecoder(nn.Module):
    """Token + learned position embeddings, ``layers`` blocks, final LayerNorm, untied output head."""

    def __init__(self, vocab: int = PRIME + 2, dim: int = 128, layers: int = 2, heads: int = 4,
                 seq_len: int = 4):
        super().__init__()
        self.embed_tokens, self.embed_positions = nn.Embedding(vocab, dim), nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> logits of the last position (B, V): the answer is read at "="."""
        x = self.embed_tokens(ids) + self.embed_positions(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)  # (B, T, D)
        return self.lm_head(self.norm(x[:, -1]))


# --- optimizers ---------------------------------------------------------------------------------------


def parse_optimizer_spec(spec: str) -> tuple[str, str, dict]:
    """``name`` or ``name[key=value,...]`` -> (label, kind, settings); values are JSON or plain strings."""
    match = re.fullmatch(r"([\w-]+)(?:\[(.*)\])?", spec.strip())
    if not match or match.group(1) not in OPTIMIZERS:
        raise KeyError(f"unknown optimizer {spec!r}; valid: {sorted(OPTIMIZERS)} (optionally name[key=value,...])")
    kind, settings = OPTIMIZERS[match.group(1)]
    settings = dict(settings)
    for item in filter(None, (match.group(2) or "").split(",")):
        key, _, raw = item.partition("=")
        try:
            settings[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key.strip()] = raw.strip()
    return spec.strip(), kind, settings


def split_specs(text: str) -> list[str]:
    """Split "a,b[x=1,y=2],c" at the commas outside brackets."""
    specs = re.findall(r"[^,\[\]]+(?:\[[^\]]*\])?", text)
    return [s.strip() for s in specs if s.strip()]


class _FilteredTorchOptimizer:
    """A torch optimizer whose gradients first pass the Grokfast-EMA filter (the paper's usage)."""

    def __init__(self, opt: torch.optim.Optimizer, alpha: float, lamb: float):
        self.opt, self.alpha, self.lamb = opt, alpha, lamb
        self.filter_state: dict = {}

    def step(self) -> None:
        for group in self.opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = grokfast_ema(p.grad, self.filter_state.setdefault(p, {}), self.alpha, self.lamb)
        self.opt.step()


def build_optimizer(kind: str, settings: dict, model: nn.Module):
    """(object with .step(), the torch optimizer to schedule) for one optimizer spec."""
    if kind == "muongrokfast":
        opt = MuonGrokfast.from_model(model, preset_config(1, **settings))
        return opt, opt
    settings = dict(settings)
    alpha, lamb = settings.pop("grokfast_alpha", None), settings.pop("grokfast_lambda", None)
    cls = getattr(torch.optim, kind.split(":", 1)[1])
    opt = cls(model.parameters(), **settings)
    return (_FilteredTorchOptimizer(opt, alpha, lamb) if lamb else opt), opt


# --- one run ------------------------------------------------------------------------------------------


@dataclass
class RunSettings:
    """Budget and schedule of one training run."""

    max_steps: int = 3000
    eval_every: int = 20
    batch_size: int = 512
    warmup_steps: int = 10
    stop_at: float | None = 0.99
    device: str = "cpu"


@dataclass
class RunRecord:
    """What one (optimizer, seed) run measured. ``steps_to``/``seconds_to`` map a target to None when
    the target was not reached by ``steps_run`` (censored)."""

    optimizer: str
    seed: int
    steps_run: int = 0
    train_seconds: float = 0.0
    optimizer_seconds: float = 0.0
    steps_to: dict = field(default_factory=dict)
    seconds_to: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # [step, train loss, validation accuracy]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> float:
    """Exact-match accuracy of the argmax answer."""
    model.eval()
    correct = sum((model(x[i:i + chunk]).argmax(-1) == y[i:i + chunk]).sum().item()
                  for i in range(0, len(y), chunk))
    model.train()
    return correct / len(y)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed_step(model, stepper, sched, xb, yb, record: RunRecord, device: str) -> float:
    """One training step; adds its wall-clock time to ``record``; returns the loss."""
    _sync(device)
    start = time.perf_counter()
    loss = F.cross_entropy(model(xb), yb)
    loss.backward()
    _sync(device)
    opt_start = time.perf_counter()
    stepper.step()
    sched.step()
    model.zero_grad(set_to_none=True)
    _sync(device)
    end = time.perf_counter()
    record.train_seconds += end - start
    record.optimizer_seconds += end - opt_start
    return loss.item()


def train_run(spec: str, seed: int, settings: RunSettings, progress: bool = False) -> RunRecord:
    """Train the decoder with one optimizer spec and seed; evaluate every ``eval_every`` steps."""
    label, kind, opt_settings = parse_optimizer_spec(spec)
    data = {k: v.to(settings.device) for k, v in make_data(seed).items()}
    torch.manual_seed(seed)
    model = GrokDecoder().to(settings.device)
    stepper, opt = build_optimizer(kind, opt_settings, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / settings.warmup_steps))
    gen = torch.Generator().manual_seed(seed + 1)
    record, n_train = RunRecord(label, seed), len(data["train_y"])
    for step in range(1, settings.max_steps + 1):
        idx = torch.randint(0, n_train, (settings.batch_size,), generator=gen).to(settings.device)
        loss = _timed_step(model, stepper, sched, data["train_x"][idx], data["train_y"][idx], record,
                           settings.device)
        if not math.isfinite(loss):
            break
        record.steps_run = step
        if step % settings.eval_every == 0 or step == settings.max_steps:
            acc = accuracy(model, data["val_x"], data["val_y"])
            record.history.append([step, round(loss, 5), round(acc, 5)])
            for target in TARGETS:
                if acc >= target and target not in record.steps_to:
                    record.steps_to[target], record.seconds_to[target] = step, record.train_seconds
            if progress:
                print(f"{label} seed {seed} step {step} loss {loss:.4f} val {acc:.4f}", flush=True)
            if settings.stop_at is not None and acc >= settings.stop_at:
                break
    return record


# --- summary ------------------------------------------------------------------------------------------


def _key(target: float) -> str:
    return f"{round(target * 100)}"


def run_summary(r: RunRecord) -> dict:
    """A run as JSON: steps/seconds to each target (None = not reached), final accuracy, step times."""
    out = {"seed": r.seed, "steps_run": r.steps_run,
           "final_val_acc": r.history[-1][2] if r.history else None,
           "ms_per_step": round(1000 * r.train_seconds / max(r.steps_run, 1), 2),
           "optimizer_ms_per_step": round(1000 * r.optimizer_seconds / max(r.steps_run, 1), 2)}
    for t in TARGETS:
        out[f"steps_to_{_key(t)}"] = r.steps_to.get(t)
        out[f"seconds_to_{_key(t)}"] = round(r.seconds_to[t], 2) if t in r.seconds_to else None
    return out


def censored_median(values: list[float | None], bounds: list[float]) -> float | str:
    """Median where None means "not reached; at least the matching bound": a median that falls on a
    censored run is reported as the string "> bound"."""
    pairs = sorted(((math.inf if v is None else v), b) for v, b in zip(values, bounds))
    n = len(pairs)
    middle = pairs[(n - 1) // 2:n // 2 + 1]
    if all(math.isfinite(v) for v, _ in middle):
        return round(statistics.fmean(v for v, _ in middle), 2)
    return f"> {round(min(b for v, b in middle if not math.isfinite(v)), 2)}"


def _ratio(other: float | str, ref: float | str) -> float | str | None:
    """other / ref; a censored other gives a lower bound "> x"; a censored reference gives None."""
    if isinstance(ref, str):
        return None
    if isinstance(other, str):
        return f"> {round(float(other[2:]) / ref, 2)}"
    return round(other / ref, 2)


def summarize(records: list[RunRecord], reference: str) -> dict:
    """Per-optimizer runs and medians, plus the speedups of ``reference`` over every other optimizer."""
    by_opt: dict[str, list[RunRecord]] = {}
    for r in records:
        by_opt.setdefault(r.optimizer, []).append(r)
    result = {}
    for name, runs in by_opt.items():
        med = {}
        for t in TARGETS:
            k = _key(t)
            med[f"steps_to_{k}"] = censored_median([r.steps_to.get(t) for r in runs], [r.steps_run for r in runs])
            med[f"seconds_to_{k}"] = censored_median([r.seconds_to.get(t) for r in runs],
                                                     [r.train_seconds for r in runs])
        med["ms_per_step"] = round(statistics.median(run_summary(r)["ms_per_step"] for r in runs), 2)
        result[name] = {"runs": [run_summary(r) for r in runs], "median": med}
    speedups = {}
    if reference in result:
        ref = result[reference]["median"]
        for name, entry in result.items():
            if name != reference:
                speedups[name] = {f"{kind}_to_{_key(t)}": _ratio(entry["median"][f"{kind}_to_{_key(t)}"],
                                                                  ref[f"{kind}_to_{_key(t)}"])
                                  for t in TARGETS for kind in ("steps", "seconds")}
    return {"optimizers": result, "speedups_of_" + reference: speedups}


# --- entry points -------------------------------------------------------------------------------------


def run_benchmark(optimizers: list[str], seeds: int = 3, max_steps: int = 3000, eval_every: int = 20,
                  stop_at: float | None = 0.99, threads: int | None = 1, device: str = "cpu",
                  reference: str = "mugrokfast", progress: bool = False) -> dict:
    """Run every optimizer spec with seeds 0..seeds-1; returns settings, summary and curves (JSON-ready)."""
    for spec in optimizers:
        parse_optimizer_spec(spec)  # fail on a typo before any training
    if threads:
        torch.set_num_threads(threads)
    settings = RunSettings(max_steps=max_steps, eval_every=eval_every, stop_at=stop_at, device=device)
    # Seed-major order: a change of machine load over time then affects every optimizer alike.
    records = [train_run(spec, seed, settings, progress) for seed in range(seeds) for spec in optimizers]
    return {"benchmark": "grokking", "task": f"a*b mod {PRIME}, 50% train, batch 512, 2x128 decoder, 4 heads",
            "settings": {**settings.__dict__, "seeds": seeds, "threads": torch.get_num_threads(),
                         "optimizers": {s: parse_optimizer_spec(s)[1:] for s in optimizers}},
            **summarize(records, reference),
            "curves": {f"{r.optimizer}|{r.seed}": r.history for r in records}}


def plot_validation_curves(result: dict):
    """Validation accuracy against step: one colour per optimizer, one thin line per seed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours: dict[str, str] = {}
    for key, history in result["curves"].items():
        name = key.rsplit("|", 1)[0]
        first = name not in colours
        colour = colours.setdefault(name, f"C{len(colours) % 10}")
        ax.plot([h[0] for h in history], [h[2] for h in history], color=colour, lw=1, alpha=0.8,
                label=name if first else None)
    for target in TARGETS:
        ax.axhline(target, color="grey", lw=0.6, ls="--")
    ax.set(xlabel="step", ylabel="validation accuracy", ylim=(0, 1.01),
           title=f"a*b mod {PRIME}: validation accuracy by optimizer")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def write_result(result: dict, out: str | None, stem: str) -> Path:
    """Write JSON under outputs/bench/ (or to ``out``, relative to the repository root)."""
    default = paths.outputs_root() / "bench" / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path = paths.resolve(out) if out else default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_json(result, indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI: ``forge bench grokking [--optimizers ...] [--seeds 3] [--max-steps 3000] ...``."""
    ap = build_parser("grokking")
    args = ap.parse_args(argv)
    specs = split_specs(args.optimizers)
    result = run_benchmark(specs, args.seeds, args.max_steps, args.eval_every,
                           args.stop_at if args.stop_at > 0 else None, args.threads, args.device,
                           args.reference, progress=not args.quiet)
    path = write_result(result, args.out, "grokking")
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=1))
    print(f"written: {path}")
    return 0
