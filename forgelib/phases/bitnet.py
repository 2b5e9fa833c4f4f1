"""Phase 4 — BitNet b1.58: the Phase-3 model with ternary weights, trained quantization-aware, packed on disk.

The Phase-3 model (a ``QuietStarModel``: base LM + mixing head + thought embeddings) is converted with
``forgelib.quant.convert_to_bitnet``: every attention/MLP projection of the base becomes a ``BitLinear`` (absmean
ternary weights, per-token 8-bit activations, straight-through gradients); the embedding matrix / LM head and the
mixing head compute with per-row int8 weights (``embedding_bits``, ``int8_mixing_head``: fake-quantized in training
and scoring, stored as int8 codes, so the packed model equals the scored one). Norms, the ACT head and the thought
embeddings keep full precision; the Titans memory, which a model running without it never uses, is left out of the
packed folder.

**Quantization-aware training** (``steps``): answer NLL + ``distill_weight`` × KL(full-precision model ‖ ternary
model) on the base logits (``ReferenceKL``) over the phase's families and, at share ``replay``, every family the
Phase-3 model knew (``forgelib.suite``: a ternary model trained on three families lost the others), or with ``loss:
quietstar`` the whole Phase-3 loss (mixed NLL after
thoughts, post-thought NLL, REINFORCE) plus that distillation; ``loss: auto`` (the default) takes ``quietstar`` when
Phase 3 handed its model on thinking and ``distill`` when it handed it on plain (``QuietStarModel.thinking``: then
nothing thinks from here on). The Phase-4 MuGrokfast preset (STE mode: the Muon group updates the latent
full-precision weights). The thought machinery stays in full precision; the ternary model is measured as the
Phase-3 model answers: thinking when it thinks, else without thoughts (the flag is kept in the packed folder).

**Measured** on the test split (``test_per_family`` samples of each family, with thoughts when the model thinks,
greedy): the Phase-3 model (``*_fp``, the phase's input), post-training ternarization without QAT (``*_ptq``, the
baseline a user would try first) and the QAT model (``*_ternary``): exact-match accuracy and answer NLL.
``acc_retention`` = acc_ternary / acc_fp, ``ppl_ratio`` = exp(nll_ternary − nll_fp). Sizes: the handed-on
folder's ``model.safetensors`` (``packing``, everything included: packed codes, scales, int8 embeddings, norms) and
the thought extras, against the same model in fp32.

**Gate**: the guard at ``allowed_loss`` (the accuracy the phase states it may trade for ternary weights): the
packed model, asked as later phases ask it, keeps every family of the Phase-3 model's suite (paired
non-inferiority per family, ``forgelib.stats``); the perplexity ratio's upper confidence bound (paired per-question
answer NLL) ≤ ``max_ppl_ratio``; fp32 bytes / packed bytes ≥ ``min_compression``; the reloaded packed model's logits
equal the fake-quantized model's, and the trainable reload Phase 5 trains equals the packed model (max |Δ| ≤ 1e-6).
``acc_retention`` on the phase's own families is reported beside.
The handed-on model (role ``model``) is the packed folder; ``forgelib.modelio.load_model(path)`` loads it
for inference and ``load_quietstar(path, trainable=True)`` as BitLinear layers for Phase 5.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..data.tasks import FAMILIES
from ..optim import ReferenceKL, create_optimizer_from_phase
from ..params import require_non_negative, require_positive
from ..progress import timed
from ..quant import bitlinear_modules, convert_to_bitnet, convert_to_int8, ternary_quantize
from ..quant.packing import PACKINGS
from ..results import GateCheck, PhaseResult
from ..quietstar import QuietStarModel, quietstar_loss
from ..modelio import load_quietstar
from ..train import TrainConfig, train
from .common import TaskData, chance_levels, check_levels, check_optimizer, score, test_samples, training_batches

HEADLINE = ("acc_fp", "acc_ternary", "acc_ptq", "acc_retention", "ppl_ratio", "bits_per_quantized_weight",
            "total_bytes_packed", "total_bytes_fp32")


LOSSES = ("auto", "distill", "quietstar")
"""``Params.loss``'s choices."""


@dataclasses.dataclass
class Params:
    """Phase 4 parameters (the ``bitnet`` section). Defaults are the smoke set."""

    source: str = "model"
    """Upstream model role (Phase 3 hands on ``model``)."""
    mix: dict[str, float] = dataclasses.field(default_factory=lambda: {"arith": 1.0, "multistep": 1.0,
                                                                       "algebra": 1.0})
    """Training families (fresh train-split samples) and the test families."""
    levels: tuple[int, int] = (1, 3)
    with_steps: bool = True
    max_len: int = 96
    batch_size: int = 32
    bucket: int = 16
    steps: int = 600
    """Quantization-aware training steps."""
    lr: float | None = None
    """Learning rate (None: the Phase-4 preset's)."""
    warmup_steps: int = 5
    distill_weight: float = 1.0
    """Weight of KL(full-precision Phase-3 model ‖ ternary model) on the base logits."""
    loss: str = "auto"
    """'distill': answer NLL + distillation on the base logits (one forward per step); 'quietstar': Phase 3's
    loss (thoughts, mixing, REINFORCE) + distillation, about 16 forwards per step (the smoke set measured 0.6 s
    per step against 0.04 s, so at the same time budget it trains 15 times fewer steps); 'auto': 'quietstar' when
    the Phase-3 model thinks (Phase 3's decision), else 'distill'."""
    ptq_baseline: bool = True
    """Also score post-training ternarization without QAT (the baseline a user would try first)."""
    quantize_activations: bool = True
    """Per-token 8-bit activations in the ternary layers (BitNet b1.58); False keeps them in full precision."""
    include: list[str] | None = None
    """Name suffixes of the Linear layers made ternary (None: every attention and MLP projection)."""
    int8_include: list[str] | None = None
    """Name suffixes of further Linear layers that compute with per-row int8 weights instead (e.g. the attention
    projections: measured at smoke, 600 QAT steps, mean accuracy over 7 families 0.556 with every projection ternary,
    0.733 with only the MLP ternary; the full-precision model 0.773)."""
    int4_include: list[str] | None = None
    """Name suffixes of further Linear layers that compute with per-row 4-bit weights (codes in [-7, 7], stored two
    to a byte): e.g. the attention projections, at half the bytes of ``int8_include``."""
    packing: str = "base3"
    """Packing of the handed-on model: 'base3' (5 codes per byte, 1.6 bits) or '2bit' (4 per byte)."""
    optimizer: dict[str, Any] = dataclasses.field(default_factory=dict)
    """MuGrokfast overrides of the Phase-4 preset."""
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(steps=1, log_every=10, schedule="cosine",
                                                                               min_lr_ratio=0.1))
    """Training-loop settings (``steps`` and ``warmup_steps`` come from this section's own fields)."""
    test_per_family: int = 48
    max_ppl_ratio: float = 1.5
    """Gate: exp(upper confidence bound of the mean per-question answer NLL difference, ternary − Phase-3 model) at
    most this."""
    allowed_loss: float = 0.15
    """The accuracy (absolute, per family) the phase states it may trade for ternary weights: the guard's margin
    (``forgelib.suite``) over every family the Phase-3 model knew."""
    replay: float = 0.5
    """Share of QAT samples drawn from every family the input model knew, at its levels (distilled like the rest):
    measured before it existed, a ternary model trained on three families lost logic, recall and sequence."""
    min_compression: float = 8.0
    """Gate: fp32 bytes / packed bytes (everything on disk) at least this."""
    embedding_bits: int | None = 8
    """8: the embedding matrix and LM head (tied or not) compute with per-row absmax int8 weights, fake-quantized
    in QAT and scoring and stored as int8 codes, so the packed model equals the scored one; None keeps fp32."""
    int8_mixing_head: bool = True
    """The Quiet-STaR mixing head's Linear layers with per-row int8 weights, likewise (measured at the smoke shape:
    its file takes 34,460 bytes in fp32, 10,120 in int8, of 80,870 / 56,530 packed in all)."""

    def __post_init__(self):
        require_positive(self, "max_len", "batch_size", "bucket", "steps", "test_per_family", "max_ppl_ratio")
        require_non_negative(self, "warmup_steps", "distill_weight", "min_compression")
        if not 0 < self.allowed_loss < 1:
            raise ValueError(f"allowed_loss must lie in (0, 1), got {self.allowed_loss}")
        if not 0 <= self.replay < 1:
            raise ValueError(f"replay must lie in [0, 1), got {self.replay}")
        unknown = sorted(set(self.mix) - set(FAMILIES))
        if unknown:
            raise ValueError(f"mix: unknown families {unknown}; valid: {sorted(FAMILIES)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {self.packing!r}")
        require_positive(self, "lr")
        check_levels(self, "levels")
        self.optimizer = check_optimizer(self.optimizer, 4)

    def data(self) -> TaskData:
        """The data settings in the shared form (``forgelib.phases.common``: the batches, test set and scorer Phase 3
        uses too)."""
        return TaskData(mix=dict(self.mix), levels=self.levels, with_steps=self.with_steps, max_len=self.max_len,
                        batch_size=self.batch_size, bucket=self.bucket, test_per_family=self.test_per_family)


# --- conversion, training, sizes ----------------------------------------------------------------------


def ternary_copy(model: QuietStarModel, params: Params) -> QuietStarModel:
    """A deep copy of ``model`` whose base projections are BitLinear, with int8 embeddings / LM head
    (``embedding_bits``) and mixing head (``int8_mixing_head``)."""
    twin = copy.deepcopy(model)
    convert_to_bitnet(twin.base, include=params.include, quantize_activations=params.quantize_activations,
                      embedding_bits=params.embedding_bits, int8_include=params.int8_include,
                      int4_include=params.int4_include)
    if params.int8_mixing_head:
        convert_to_int8(twin.mixing_head)
    return twin


def qat_loss(params: Params, model: QuietStarModel) -> str:
    """The loss QAT trains with: ``params.loss``, or for 'auto' 'quietstar' when ``model`` thinks, else 'distill'."""
    if params.loss != "auto":
        return params.loss
    return "quietstar" if model.thinking else "distill"


def train_qat(model: QuietStarModel, reference, tokenizer, params: Params, *, seed: int, tracker=None,
              device: str = "cpu", quiet: bool = True, suite: dict | None = None):
    """Quantization-aware training of ``model`` (a ternary copy) with the distillation loss, or Phase 3's loss
    + distillation (``qat_loss``)."""
    torch.manual_seed(seed)
    kl = ReferenceKL(reference, params.distill_weight) if params.distill_weight > 0 else None
    overrides = {**params.optimizer, **({"lr": params.lr} if params.lr is not None else {})}
    optimizer = create_optimizer_from_phase(model, phase_num=4, **overrides)
    config = dataclasses.replace(params.train, steps=params.steps, warmup_steps=params.warmup_steps)
    batches = training_batches(tokenizer, params.data(), seed, suite, params.replay)
    if qat_loss(params, model) == "quietstar":
        if not model.thinking:
            raise ValueError("loss: quietstar trains the thought path, but the Phase-3 model was handed on without "
                             "thinking (its quietstar.json says thinking: false); use loss: auto or distill")
        loss_fn = lambda m, b: quietstar_loss(m, b, kl=kl)  # noqa: E731
    else:
        loss_fn = lambda m, b: distill_loss(m, b, kl)  # noqa: E731
    history = train(model, batches, optimizer, config, loss_fn=loss_fn, tracker=tracker, device=device, desc="qat",
                    quiet=quiet)
    return model.eval(), history


def distill_loss(model: QuietStarModel, batch: dict, kl) -> tuple[torch.Tensor, dict]:
    """Answer NLL of the base logits + the distillation KL (no thoughts: the base does not think)."""
    import torch.nn.functional as F

    logits = model.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    extra = kl(logits, batch["input_ids"], batch["attention_mask"]) if kl is not None else logits.new_zeros(())
    return nll + extra, {"base_nll": float(nll.detach()), "kl": float(extra.detach())}


def ternary_histogram(model: QuietStarModel) -> dict[str, dict[str, float]]:
    """Per ternary layer: the share of weights quantized to -1, 0 and +1, and the scale."""
    out = {}
    for name, layer in bitlinear_modules(model.base).items():
        codes, scale = ternary_quantize(layer.weight.detach())
        n = codes.numel()
        out[name] = {"-1": int((codes == -1).sum()) / n, "0": int((codes == 0).sum()) / n,
                     "+1": int((codes == 1).sum()) / n, "scale": float(scale)}
    return out


def folder_bytes(folder: Path) -> dict[str, int]:
    """Bytes of the weight files of a saved model folder (model.safetensors and quietstar.safetensors)."""
    return {name: (folder / name).stat().st_size for name in ("model.safetensors", "quietstar.safetensors")
            if (folder / name).is_file()}


def size_table(fp_model: QuietStarModel, ternary: QuietStarModel) -> dict[str, dict[str, Any]]:
    """Total file bytes of the model (weights and thought extras) as fp32, fp16, 2-bit and base-3 packed, each
    written to disk and measured. The fp32 and fp16 rows save ``fp_model`` as the Phase-3 folder holds it (its
    unused Titans memory included); the packed rows leave unused modules out (``forgelib.quant.export``) and carry
    the export's accounting (int8 embeddings / LM head, ``dropped_weights``: values of the modules left out)."""
    rows = {}
    with tempfile.TemporaryDirectory(prefix="forge-bitnet-sizes-") as tmp:
        for label, model, dtype, packing in (("fp32", fp_model, torch.float32, None),
                                             ("fp16", fp_model, torch.float16, None),
                                             ("2bit", ternary, None, "2bit"), ("base3", ternary, None, "base3")):
            folder = Path(tmp) / label
            twin = copy.deepcopy(model)
            if dtype is not None:
                twin.to(dtype)
            twin.export_packing = packing
            twin.save_pretrained(folder)
            sizes = folder_bytes(folder)
            rows[label] = {"total_bytes": sum(sizes.values()), **sizes}
            if packing is not None:
                report = twin.export_report
                rows[label].update({k: report[k] for k in ("packed_bytes", "scale_bytes", "int8_bytes",
                                                           "int8_scale_bytes", "int4_bytes", "int4_scale_bytes",
                                                           "other_bytes", "header_bytes", "ternary_weights",
                                                           "int8_weights", "int4_weights", "dropped_weights",
                                                           "bits_per_ternary_weight",
                                                           "bits_per_ternary_weight_with_scales")})
    return rows


@torch.no_grad()
def logits_difference(a: QuietStarModel, b: QuietStarModel, tokenizer, samples, params: Params) -> float:
    """max |logits_a − logits_b| over the real positions of ``samples`` (with thoughts, greedy)."""
    from ..data.tokenizer import encode_samples

    enc = encode_samples(tokenizer, samples, params.max_len, answer_only_loss=True, with_steps=params.with_steps)
    length = int(enc["attention_mask"].sum(1).max())
    ids, mask = enc["input_ids"][:, :length], enc["attention_mask"][:, :length]
    la, lb = a(ids, mask).logits, b(ids, mask).logits
    return float((la - lb)[mask.bool()].abs().max())


# --- run ----------------------------------------------------------------------------------------------


def load_source(params: Params, ctx) -> tuple[QuietStarModel, Any, Path]:
    from transformers import AutoTokenizer

    folder = ctx.upstream_model_path(params.source)  # UpstreamError naming the roles it has when missing
    model = load_quietstar(folder).eval()  # first: it registers Cognate, which the tokenizer's config lookup needs
    return model, AutoTokenizer.from_pretrained(folder), folder


def ppl_ratio_bound(table: dict, confidence: float) -> float:
    """exp(one-sided upper confidence bound of the mean per-question answer NLL difference, ternary − fp)."""
    from ..stats import mean_bounds

    diffs = [t - f for t, f in zip(table["ternary"]["sample_nll"], table["fp"]["sample_nll"])]
    return math.exp(min(mean_bounds(diffs, confidence)[2], 50.0))


def gate_checks(metrics: dict, params: Params) -> list[GateCheck]:
    return [GateCheck("ppl_ratio_upper_bound", metrics["ppl_ratio_upper_bound"], params.max_ppl_ratio, "<="),
            GateCheck("compression_vs_fp32", metrics["compression_vs_fp32"], params.min_compression, ">="),
            GateCheck("trainable_reload_logits_max_abs_diff",
                      metrics.get("trainable_reload_logits_max_abs_diff", float("nan")), 1e-6, "<="),
            GateCheck("packed_over_fp32_bytes", metrics["total_bytes_packed"] / metrics["total_bytes_fp32"], 1.0, "<"),
            GateCheck("packed_logits_max_abs_diff", metrics["packed_logits_max_abs_diff"], 1e-6, "<=")]


def run(params: Params, ctx) -> PhaseResult:
    """Phase 4 (see the module docstring)."""
    torch.manual_seed(ctx.seed)
    fp_model, tokenizer, _ = load_source(params, ctx)
    data = params.data()
    test = test_samples(data, ctx.seed + 1)
    timing, table = {}, {}
    with timed(timing, "score_fp_ptq"):
        table["fp"] = score(fp_model, tokenizer, test, data)
        ptq = ternary_copy(fp_model, params).eval()
        if params.ptq_baseline:
            table["ptq"] = score(ptq, tokenizer, test, data)
    before = ternary_histogram(ptq)
    del ptq
    with timed(timing, "train"):
        ternary, history = train_qat(ternary_copy(fp_model, params), copy.deepcopy(fp_model.base), tokenizer, params,
                                     seed=ctx.seed, tracker=ctx.tracker, device=ctx.device, quiet=ctx.quiet,
                                     suite=ctx.input_suite)
    with timed(timing, "score_ternary"):
        table["ternary"] = score(ternary, tokenizer, test, data)
    ternary.export_packing = params.packing
    folder = ctx.save_model("model", ternary, tokenizer, metadata={"bitnet": dict(ternary.base.config.bitnet)})
    packed = load_quietstar(folder, tokenizer).eval()
    diff = logits_difference(ternary, packed, tokenizer, test[:16], data)
    # Phase 5 reloads the folder trainable (BitLinear / Int8 layers on rebuilt latent weights): it must start from
    # exactly the packed model (forgelib.quant.export.latent_from_ternary / latent_from_int8).
    reloaded = load_quietstar(folder, tokenizer, trainable=True).eval()
    ternary.export_report["trainable_reload_logits_max_abs_diff"] = logits_difference(packed, reloaded, tokenizer,
                                                                                      test[:16], data)
    del reloaded
    sizes = size_table(fp_model, ternary)
    export = ternary.export_report
    fp32 = sizes["fp32"]["total_bytes"]
    on_disk = sum(folder_bytes(folder).values())
    metrics = _metrics(table, export, on_disk, fp32, diff)
    report = {"thinking": fp_model.thinking, "loss": qat_loss(params, fp_model),
              "test": table, "sizes": sizes, "export": export, "ternary_share": {"ptq": before,
              "qat": ternary_histogram(ternary)}, "training": {"rows": history.rows, "seconds": history.seconds},
              "timing": timing, "chance": chance_levels(data, test, ctx.seed + 3), "families": sorted(params.mix),
              "levels": list(params.levels), "n_test": len(test), "packing": params.packing,
              "upstream_model": str(ctx.upstream_model_path(params.source))}
    metrics["ppl_ratio_upper_bound"] = round(ppl_ratio_bound(table, ctx.guard_params.confidence), 4)
    ctx.write_report(report)
    ctx.result.metrics.update(metrics)
    ctx.result.metrics["chance_test_acc"] = round(report["chance"]["overall"], 4)
    ctx.result.gate.extend(gate_checks(metrics, params))
    from ..suite import Asker

    ctx.guard(Asker(fp_model, tokenizer, label="phase-3 model"), Asker(packed, tokenizer, label="packed ternary"),
              margin=params.allowed_loss)
    return ctx.result


def _metrics(table: dict, export: dict, on_disk: int, fp32: int, diff: float) -> dict[str, Any]:
    fp, ternary = table["fp"], table["ternary"]
    retention = lambda row: row["accuracy"] / fp["accuracy"] if fp["accuracy"] > 0 else float("nan")  # noqa: E731
    ratio = lambda row: math.exp(min(row["answer_nll"] - fp["answer_nll"], 50.0))  # noqa: E731
    ptq = {}
    if "ptq" in table:
        ptq = {"acc_ptq": round(table["ptq"]["accuracy"], 4), "nll_ptq": round(table["ptq"]["answer_nll"], 4),
               "acc_retention_ptq": round(retention(table["ptq"]), 4), "ppl_ratio_ptq": round(ratio(table["ptq"]), 4)}
    return {"acc_fp": round(fp["accuracy"], 4), "acc_ternary": round(ternary["accuracy"], 4),
            "nll_fp": round(fp["answer_nll"], 4), "nll_ternary": round(ternary["answer_nll"], 4),
            "acc_retention": round(retention(ternary), 4), "ppl_ratio": round(ratio(ternary), 4), **ptq,
            "bits_per_quantized_weight": round(export["bits_per_ternary_weight_with_scales"], 4),
            "total_bytes_packed": on_disk, "total_bytes_fp32": fp32,
            "compression_vs_fp32": round(fp32 / on_disk, 3), "packed_logits_max_abs_diff": diff,
            **({"trainable_reload_logits_max_abs_diff": export["trainable_reload_logits_max_abs_diff"]}
               if "trainable_reload_logits_max_abs_diff" in export else {})}
