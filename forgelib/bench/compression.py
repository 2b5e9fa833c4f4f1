"""`forge bench compression`: every compression method and baseline at its settings, on two models, side by side.

1. **Phase-7 system** (the phase's own situation): the ternary projections stay packed (base-3), each method alone
   compresses the embeddings and the other matrices; measured as Phase 8 measures (the two-pass routed system,
   experts carried in the file).
2. **Full-precision model** (Phase 3's, before BitNet): each method compresses every matrix (projections,
   embeddings, thought extras) — where the methods compete for the weights that matter most; measured without
   experts and without the ``tool`` family (that model never saw the calculator).

Per method: bits per weight of the whole artifact file (everything counted), accuracy and perplexity and their
retention against the uncompressed model, compression seconds, peak memory (resident, sampled). **SeedLM against
block floating point at matched bits** (3.5 bits: K=12, C=8, P=3 vs 3-bit mantissas in blocks of 8; 3.0 bits:
P=2 vs 2-bit mantissas in blocks of 4; both with 4-bit exponents). Points on the (bits down, accuracy up) Pareto
front are marked; the Phase-8 artifact (``--phase8``, default the newest) is placed against the RTN and HQQ points.
Deterministic: one model, one question set (Phase 8's own test questions for the parameter file's seed, so the
artifact's accuracy is comparable); VQ's k-means is seeded.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from .. import paths
from ..results import dumps_json
from .options import COMPRESSION_METHODS as METHODS, build_parser

MATCHED = [("seedlm3.5", "bfp3.5"), ("seedlm3.0", "bfp3.0")]


def pareto(rows: list[dict]) -> None:
    """Mark rows not dominated in (bits per weight down, accuracy up)."""
    for r in rows:
        r["pareto"] = not any(q["bits_per_weight"] <= r["bits_per_weight"] and q["acc"] >= r["acc"] and
                              (q["bits_per_weight"] < r["bits_per_weight"] or q["acc"] > r["acc"]) for q in rows)


def sweep(model, system, targets: list[str], base_assign: dict, methods: list[str], folder: Path,
          seed: int = 0) -> dict:
    """The uncompressed reference and one row per method (each alone on ``targets`` over ``base_assign``)."""
    from ..phases.compression import calibration, compress_and_measure
    from ..quant.compress import plan_from, tensor_groups

    reference = system.measure(model)
    hessians = calibration(model, system.tokenizer, system.params, seed)
    groups = tensor_groups(model, system.extras())
    base = plan_from(groups, base_assign)
    rows = []
    for name in ["raw16", *methods]:
        spec = {"codec": "raw16"} if name == "raw16" else METHODS[name]
        plan = plan_from(groups, {t: spec for t in targets if t in groups.values()}, base)
        row = compress_and_measure(model, system, plan, folder / f"{name}.forge", hessians, groups)
        row.update(name=name, spec=spec, acc_retention=round(row["acc"] / reference["acc"],
                                                             4) if reference["acc"] else None,
                   ppl_retention=round(reference["ppl"] / row["ppl"], 4))
        del row["correct"]
        rows.append(row)
        print(f"{name:10s} bits {row['bits_per_weight']:.3f} acc {row['acc']:.3f} ppl {row['ppl']:.3f} "
              f"({row['compress_s']} s)", flush=True)
    pareto(rows)
    return {"reference": {k: v for k, v in reference.items() if k not in ("correct", "texts")}, "rows": rows,
            "matched_bits": [{"seedlm": a, "bfp": b, **{f"{k}_{m}": next(r[k] for r in rows if r["name"] == m)
                                                          for m in (a, b) for k in ("bits_per_weight", "acc", "ppl")}}
                             for a, b in MATCHED if a in methods and b in methods]}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [k for k in ("phase7", "fp") if k in report]
    fig, axes = plt.subplots(len(parts), 2, figsize=(11, 3.8 * len(parts)), squeeze=False)
    for row_axes, part in zip(axes, parts):
        rows = report[part]["rows"]
        for ax, key in zip(row_axes, ("ppl", "acc")):
            for r in rows:
                ax.scatter(r["bits_per_weight"], r[key], marker="o" if r["pareto"] else "x", s=30)
                ax.annotate(r["name"], (r["bits_per_weight"], r[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            ax.axhline(report[part]["reference"][key], color="grey", ls="--", lw=1, label="uncompressed")
            if part == "phase7" and "phase8" in report:
                ax.scatter(report["phase8"]["bits_per_weight"], report["phase8"][key], marker="*", s=140, color="k",
                           label="Phase-8 artifact")
            ax.set_xlabel("bits per weight (whole file)")
            ax.set_ylabel({"ppl": "perplexity (log)", "acc": "exact-match accuracy"}[key])
            if key == "ppl":
                ax.set_yscale("log")
            ax.set_title({"phase7": "Phase-7 system (ternary packed)", "fp": "Phase-3 fp model (every matrix)"}[part]
                         + ("; o: Pareto front" if key == "acc" else ""), fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _parser() -> argparse.ArgumentParser:
    parser = build_parser("compression")
    return parser


def _phase3_folder(phase3: str | None, folder7: Path) -> Path:
    """``--phase3``, or the Quiet-STaR phase in Phase 7's upstream chain."""
    from ..results import upstream_chain

    if phase3:
        return paths.resolve(phase3)
    found = next((f for f, r in upstream_chain(folder7) if r.phase == "quietstar"), None)
    if found is None:
        raise SystemExit("no quietstar phase in the upstream chain; pass --phase3 FOLDER")
    return found


def _place_phase8(report: dict, phase8: str | None) -> None:
    """The Phase-8 artifact's numbers, and the RTN / HQQ rows that dominate it (none: it is on their front)."""
    from . import phase_folder
    from ..results import PhaseResult

    try:
        folder8 = phase_folder("compression", phase8)
    except SystemExit:  # no completed Phase 8: nothing to place
        return
    m = PhaseResult.load(folder8 / "result.json").metrics
    report["phase8"] = {"folder": paths.relative(folder8), "bits_per_weight": m["bits_per_weight"],
                        "acc": m["acc_final"], "ppl": m["ppl_final"], "acc_retention": m["acc_retention"]}
    if "phase7" in report:
        baselines = [r for r in report["phase7"]["rows"] if r["spec"]["codec"] in ("rtn", "hqq")]
        report["phase8"]["dominated_by"] = [r["name"] for r in baselines if r["bits_per_weight"] <= m["bits_per_weight"]
                                            and r["acc"] >= m["acc_final"]]


def main(argv: list[str] | None = None) -> int:
    import shutil

    from transformers import AutoTokenizer

    from . import phase_folder, phase_params
    from ..phases import PHASES, get_spec
    from ..phases.base import load_guard_params, load_phase_params
    from ..phases.compression import load_system
    from ..results import PhaseResult
    from ..modelio import load_lm

    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    params = phase_params("compression", args.params)
    folder7 = phase_folder("experts", args.phase7)
    out = paths.bench_output("compression", args.out)
    scratch = out.with_suffix("")  # the artifacts of the sweep (removed at the end)
    started = time.perf_counter()
    report = {"benchmark": "compression", "phase7_folder": paths.relative(folder7), "params_file": args.params,
              "what_varies": "nothing random but VQ's seeded k-means: one model, one question set per part"}
    result7 = PhaseResult.load(folder7 / "result.json")
    model_folder = paths.resolve(result7.models["model"]["path"])
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    spec = get_spec("compression")
    run_seed = load_phase_params(spec, args.params, None, PHASES)[0].seed
    ctx = _Ctx(result7, run_seed + 1000 * spec.number,  # Phase 8's seed: its test questions and calibration
               load_guard_params(args.params, None, PHASES))  # the guard section sizes the test questions
    if "phase7" in args.parts:
        report["phase7"] = {"what": "Phase-7 system: ternary packed, each method on embeddings + matrices",
                            **sweep(load_lm(model_folder), load_system(ctx, tokenizer, params), ["embeddings",
                                                                                                 "matrices"],
                                    {"ternary": {"codec": "ternary"}}, args.methods, scratch / "p7", ctx.seed)}
    if "fp" in args.parts:
        folder3 = _phase3_folder(args.phase3, folder7)
        fp_model = load_lm(paths.resolve(PhaseResult.load(folder3 / "result.json").models["model"]["path"]))
        # Phase 3 never saw the calculator: the tool family is left out of its questions
        plain = load_system(ctx, tokenizer, dataclasses.replace(
            params, use_experts=False, families=[f for f in params.families if f != "tool"]))
        report["fp"] = {"what": "Phase-3 full-precision model: each method on every matrix",
                        "phase3": paths.relative(folder3),
                        **sweep(fp_model, plain, ["embeddings", "matrices"], {}, args.methods, scratch / "fp",
                                ctx.seed)}
    _place_phase8(report, args.phase8)
    shutil.rmtree(scratch, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps_json(report, default=str))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {paths.relative(out)} and {paths.relative(out.with_suffix('.png'))}")
    return 0


@dataclasses.dataclass
class _Ctx:
    """What ``load_system`` reads from a phase context: the upstream result (for its experts), the seed and the
    ``guard`` section."""

    upstream: object
    seed: int
    guard_params: object = None
