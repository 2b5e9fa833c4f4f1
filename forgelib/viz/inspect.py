"""Inspectors for any session and model: a registry browser, a model inspector and a metrics explorer.

Each has a **static** form (tables and figures: what a batch run under papermill keeps) and an ipywidgets form
built on it (``*_widget``), whose callbacks are plain functions a test can drive.

* ``registry_tables`` / ``registry_browser``: sessions (filtered by status), a session's phase runs and models,
  a model's metadata, headline metrics and **lineage** (which phase made it from which model, through the
  registry's recorded handoffs).
* ``inspect_model`` / ``model_inspector``: parameter counts per module kind (packed ternary layers by their
  weights), weight statistics, how each matrix is stored and histograms per layer, the ternary share (−1 / 0 / +1)
  of ternary layers (BitLinear, packed, an artifact's ternary tensors), the singular-value spectrum of a matrix, the
  bits per weight of a Phase-8 artifact (per codec), and the experts' singular-value scalings (Phase 7's experts, or
  those a Phase-8 artifact carries).
* ``load_metrics`` / ``metrics_explorer``: any metrics of any runs' ``metrics.jsonl`` over steps, overlaid.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import matplotlib.pyplot as plt
import torch

from .. import paths

HEADLINE_LIMIT = 8
STATUS_LIMIT = 100
"""Characters of a model's status in the registry tables: a retirement's whole reason, e.g. ``retired: registered by
phase run 4 of 04_bitnet, and its gate failed`` (60 cut it before 'gate failed'); a folder moved aside may be cut in
its path (the path column shows it)."""


# --- registry ------------------------------------------------------------------------------------------


def _registry(registry=None):
    from ..registry import ModelRegistry

    return registry if registry is not None else ModelRegistry(paths.registry_path())


def registry_tables(registry=None, session: str | None = None, status: str | None = None) -> dict[str, Any]:
    """DataFrames ``sessions`` (``status`` filter), and for ``session``: ``runs`` and ``models``."""
    import pandas as pd

    from ..registry import model_status_text

    reg = _registry(registry)
    sessions = pd.DataFrame([{k: s[k] for k in ("id", "status", "current_phase", "progress", "created_at")}
                             for s in reg.list_sessions(status)])
    out = {"sessions": sessions}
    if session:
        out["runs"] = pd.DataFrame([{"phase": r["phase_name"], "status": r["status"],
                                     "seconds": round(r["duration_s"] or 0, 1),
                                     "headline": ", ".join(f"{k}={v}" for k, v in list((r["metrics"] or {}).items())
                                                           [:HEADLINE_LIMIT])}
                                    for r in reg.list_phase_runs(session)])
        out["models"] = pd.DataFrame([{"id": m["id"], "phase": m["phase_name"], "role": m["model_name"],
                                       "status": model_status_text(m, STATUS_LIMIT),
                                       "parameters": f"{m['parameter_count']:,}" if m["parameter_count"] else "",
                                       "MB": round(m["size_mb"] or 0, 3), "path": paths.relative(m["model_path"])}
                                      for m in reg.list_models(session)])
    return out


def model_lineage(model_id: int, registry=None) -> list[dict[str, Any]]:
    """The chain of models that led to ``model_id``, newest first: each ``{id, phase, role, path}``. The phase a
    model came from is the source of the registry's handoff into its phase; the model taken from there is that
    phase's ``model`` or ``champion`` (what a phase takes by default); a phase with neither (Phase 1: trunk and
    specialists) contributes all its models and ends the chain. A handoff row names the session its source model
    belongs to, so the chain follows ``--from`` sessions back to the Phase-1 trunk; retired models are passed over."""
    reg = _registry(registry)

    def row(m: dict) -> dict:
        return {"id": m["id"], "phase": m["phase_name"], "role": m["model_name"],
                "path": paths.relative(m["model_path"])}

    model = reg.get_model(model_id)
    chain, seen = [row(model)], {model["id"]}
    while True:
        into = [h for h in reg.list_handoffs(model["session_id"])
                if h["target_phase"] == model["phase_name"] and h["ok"]]
        if not into:
            return chain
        source = into[-1]["source_model_id"]  # in another session's folder after a --from
        owner = reg.get_model(source)["session_id"] if source is not None else model["session_id"]
        models = [m for m in reg.list_models(owner, into[-1]["source_phase"])
                  if m["model_name"] not in ("tokenizer", "taught") and m["id"] not in seen and not m["retired_at"]]
        pick = next((m for m in reversed(models) if m["model_name"] in ("model", "champion")), None)
        if pick is None:
            return chain + [row(m) for m in models]
        chain.append(row(pick))
        seen.add(pick["id"])
        model = pick


def _plain_value(value: Any) -> str:
    """A metadata value as a reader writes it: a list as ``a, b``, a mapping as ``key=value, ...``, else its text."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_plain_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_plain_value(v) for v in value) + "]"
    return str(value)


def metadata_lines(metadata: dict | None, limit: int = 160) -> list[str]:
    """A model's registry metadata, one indented ``key: value`` line per entry (a nested mapping as a ``key:`` line
    and one more indented line per entry of it, deeper ones as ``key=value`` pairs; each value cut at ``limit``
    characters); the role is left out (the first line names it)."""
    from ..params import cut

    lines = []
    for key, value in (metadata or {}).items():
        if key == "role":
            continue
        if isinstance(value, dict) and value:
            lines.append(f"  {key}:")
            lines += [f"    {k}: {cut(_plain_value(v), limit)}" for k, v in value.items()]
        else:
            lines.append(f"  {key}: {cut(_plain_value(value), limit)}")
    return lines


def model_details(model_id: int, registry=None) -> list[str]:
    """Text lines: a model's registry row (with its status), the headline metrics of the run that made it, its
    lineage."""
    from ..registry import model_status_text

    reg = _registry(registry)
    m = reg.get_model(model_id)
    lines = [f"model {m['id']}: {m['model_name']} of phase {m['phase_name']} (session {m['session_id']}), "
             f"{model_status_text(m)}",
             f"  path {paths.relative(m['model_path'])}, "
             + (f"{m['parameter_count']:,} parameters, " if m["parameter_count"] else "")
             + f"{(m['size_mb'] or 0) * 1024:.1f} KiB, sha256 {m['sha256'][:12]}…",
             *metadata_lines(m["metadata"])]
    runs = [r for r in reg.list_phase_runs(m["session_id"], m["phase_name"]) if r["status"] == "completed"]
    if runs:
        metrics = runs[-1]["metrics"] or {}
        lines.append("  headline: " + ", ".join(f"{k}={v}" for k, v in list(metrics.items())[:HEADLINE_LIMIT]))
    steps: list[str] = []
    last_phase = None
    for c in model_lineage(model_id, reg):  # a phase's several models (Phase 1) joined with +
        text = f"{c['role']} (#{c['id']})"
        if c["phase"] == last_phase:
            steps[-1] += f" + {text}"
        else:
            steps.append(f"{c['phase']}/{text}")
        last_phase = c["phase"]
    lines.append("  lineage: " + " ← ".join(steps))
    return lines


def registry_browser(registry=None):
    """Widget: status filter → session → its runs and models; a model → details and lineage."""
    import ipywidgets as w

    reg = _registry(registry)
    status = w.Dropdown(options=["any", "completed", "running", "failed", "interrupted"], description="status")
    session = w.Dropdown(options=[], description="session")
    model = w.Dropdown(options=[], description="model")
    tables, details = w.HTML(), w.HTML()

    def refresh_sessions(change=None):
        frame = registry_tables(reg, status=None if status.value == "any" else status.value)["sessions"]
        session.options = list(frame["id"]) if len(frame) else []

    def show_session(change=None):
        if not session.value:
            tables.value, model.options = "", []
            return
        t = registry_tables(reg, session.value)
        tables.value = (_table(t["runs"], "no phase runs", "headline") + _table(t["models"], "no models", "status"))
        model.options = [(f"{r.phase}/{r.role} (#{r.id})", int(r.id)) for r in t["models"].itertuples()] \
            if len(t["models"]) else []

    def show_model(change=None):
        details.value = _pre("\n".join(model_details(model.value, reg))) if model.value is not None else ""

    status.observe(refresh_sessions, names="value")
    session.observe(show_session, names="value")
    model.observe(show_model, names="value")
    refresh_sessions()
    box = w.VBox([w.HBox([status, session]), tables, model, details])
    box.controls = {"status": status, "session": session, "model": model, "tables": tables, "details": details}
    return box


def _table(frame, empty: str, wide: str) -> str:
    """``frame`` as an HTML table styled as JupyterLab styles a DataFrame's output, the long text column ``wide``
    wrapping inside its cell and left-aligned (a text table in a ``<pre>`` wrapped its lines across the columns)."""
    if not len(frame):
        return _pre(empty)
    html = frame.to_html(index=False, border=0).replace(
        "<table", '<table style="margin: 0.5em 0"', 1)
    column = list(frame.columns).index(wide) + 1 if wide in frame.columns else 0
    cells = f".forge-registry-{wide} td:nth-child({column}), .forge-registry-{wide} th:nth-child({column})"
    style = f"<style>{cells} {{text-align: left; white-space: normal; max-width: 42em}}</style>" if column else ""
    return f'{style}<div class="jp-RenderedHTMLCommon forge-registry-{wide}">{html}</div>'


def _pre(text: str) -> str:
    import html

    return f"<pre>{html.escape(text)}</pre>"


def _show(fig) -> None:
    """Display a figure inside a widget's Output, then close it (no second copy at the cell's end)."""
    from IPython.display import display

    display(fig)
    plt.close(fig)


# --- model inspector -----------------------------------------------------------------------------------


def _kind(name: str) -> str:
    for key, kind in (("embed", "embeddings"), ("lm_head", "head"), ("norm", "norms"), ("self_attn", "attention"),
                      ("attn", "attention"), ("mlp", "mlp"), ("mixing_head", "thought extras"),
                      ("thought", "thought extras"), ("memory", "memory")):
        if key in name:
            return kind
    return "other"


def _stored_as(module, name: str, codecs: dict[str, dict]) -> str:
    """How a matrix is stored: its Phase-8 codec (with bits per value), or its layer's format."""
    from ..quant.bitnet import BitLinear, Int8Embedding, Int8Linear, PackedBitLinear

    if name in codecs:
        return f"{codecs[name]['codec']}, {codecs[name]['bits']:.3g} bits"
    if isinstance(module, PackedBitLinear):
        return f"ternary, packed {module.packing}"
    if isinstance(module, BitLinear):
        return "ternary (latent weights)"
    if isinstance(module, (Int8Linear, Int8Embedding)):
        return f"int{getattr(module, 'bits', 8)}"
    return "full precision"


def _artifact_codecs(folder: Path) -> dict[str, dict]:
    """``{tensor: {codec, bits}}`` of a Phase-8 artifact folder (bits per value of that tensor's stored parts), {}
    for any other folder."""
    import math

    if not (folder / "model.forge").is_file():
        return {}
    from ..quant.artifact import read_parts

    entries = read_parts(folder / "model.forge")[0]["entries"]
    return {name: {"codec": e["codec"], "bits": 8 * sum(p[3] for p in e["parts"]) / max(1, math.prod(e["shape"]))}
            for name, e in entries.items()}


def _matrix_row(name: str, weight: torch.Tensor, module, codecs: dict[str, dict]) -> dict[str, Any]:
    """One matrix's statistics; a ternary layer's share of -1 / 0 / +1 codes."""
    from ..quant.bitnet import BitLinear, PackedBitLinear, ternary_quantize

    w = weight.detach().float()
    row = {"name": name, "shape": list(w.shape), "stored": _stored_as(module, name, codecs),
           "std": round(float(w.std()), 5), "abs_max": round(float(w.abs().max()), 4)}
    codes = module.ternary_codes() if isinstance(module, PackedBitLinear) else \
        ternary_quantize(w)[0] if isinstance(module, BitLinear) or codecs.get(name, {}).get("codec") == "ternary" \
        else None
    if codes is not None:
        row.update({f"share_{v}": round(float((codes == v).float().mean()), 4) for v in (-1, 0, 1)})
    return row


def matrix_weight(model, name: str) -> torch.Tensor:
    """The weight matrix ``name`` as the model computes with it: a parameter, or a packed ternary layer's codes ×
    scale (``<layer>.weight``: packed layers keep their weights as buffers)."""
    from ..quant.bitnet import packed_bitlinear_modules

    params = dict(model.named_parameters())
    if name in params:
        return params[name].detach().float()
    return packed_bitlinear_modules(model)[name.removesuffix(".weight")].dequantized_weight()


def inspect_model(path: str | Path) -> dict[str, Any]:
    """Parameter counts per module kind (tied weights once; a packed ternary layer counts its out × in weights),
    per-matrix statistics and how each is stored (ternary share of BitLinear and packed layers, the codec of a
    Phase-8 artifact's tensors), the artifact's bits (a Phase-8 folder) and the scalings of the experts the model
    answers with (Phase 7's folder, or those a Phase-8 artifact carries)."""
    from ..modelio import load_lm
    from ..quant.bitnet import packed_bitlinear_modules

    folder = paths.resolve(path)
    model = load_lm(folder)
    modules = dict(model.named_modules())
    codecs = _artifact_codecs(folder)
    kinds: dict[str, int] = {}
    layers = []
    weights = [(n, lambda p=p: p) for n, p in model.named_parameters()]
    weights += [(f"{n}.weight", m.dequantized_weight) for n, m in packed_bitlinear_modules(model).items()]
    for name, weight in weights:  # a packed layer's matrix unpacked only while its row is computed
        w = weight()
        kinds[_kind(name)] = kinds.get(_kind(name), 0) + w.numel()
        if w.dim() == 2:
            layers.append(_matrix_row(name, w, modules.get(name.removesuffix(".weight")), codecs))
        del w
    out: dict[str, Any] = {"folder": paths.relative(folder), "parameters": sum(kinds.values()), "per_kind": kinds,
                           "matrices": layers}
    if codecs:
        from ..quant.artifact import artifact_report

        report = artifact_report(folder / "model.forge")
        out["artifact"] = {"bits_per_weight": round(report["bits_per_weight"], 4), "file_bytes": report["file_bytes"],
                           "weights_per_codec": report["weights_per_codec"]}
    scalings = expert_scalings(folder, model)
    if scalings:
        out["experts"] = scalings
    out["_model"] = model
    return out


def expert_scalings(folder: Path, model) -> dict[str, dict[str, dict[str, float]]]:
    """Per expert and adapted matrix, the mean / min / max of the factors its singular values are multiplied by
    (SVF, ``forgelib.experts.svf``: 1 = unchanged), for the experts a Phase-7 folder or a Phase-8 artifact answers
    with; {} for a model without experts."""
    from ..experts import SVFConfig, apply_svf, remove_svf
    from ..scorecard import ScorecardParams, measuring_system
    from ..quietstar import base_lm

    experts_dir = folder.parent.parent / "experts"
    entry = {"path": folder, "experts": experts_dir if (experts_dir / "router.pt").is_file() else None}
    system = measuring_system(entry, None, [], ScorecardParams())
    if not system.experts:
        return {}
    svf = apply_svf(base_lm(model), SVFConfig(**system.svf_config))
    try:
        out = {}
        for c, z in enumerate(system.experts):
            svf.load_z(z)
            out[f"expert_{c}"] = {n: {"mean": round(float(s.mean()), 4), "min": round(float(s.min()), 4),
                                      "max": round(float(s.max()), 4)} for n, s in svf.scalings().items()}
        return out
    finally:
        remove_svf(svf)


def weight_figure(info: dict, name: str) -> "plt.Figure":
    """Histogram of one matrix's weights and its singular-value spectrum."""
    w = matrix_weight(info["_model"], name)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    a.hist(w.flatten().numpy(), bins=60, color="C0")
    a.set_title(f"{name}: weights", fontsize=8)
    s = torch.linalg.svdvals(w)
    b.semilogy(s.numpy(), ".-")
    b.set_title("singular values", fontsize=8)
    b.set_xlabel("index")
    fig.tight_layout()
    return fig


def model_tables(info: dict):
    """(parameters per kind, per-matrix statistics) as DataFrames: the static form."""
    import pandas as pd

    kinds = pd.DataFrame({"parameters": info["per_kind"]}).sort_values("parameters", ascending=False)
    return kinds, pd.DataFrame(info["matrices"]).set_index("name")


def experts_frame(info: dict):
    """The experts' singular-value scalings (``expert_scalings``), one row per expert and matrix: mean, min, max
    (1 = unchanged); an empty frame for a model without experts."""
    import pandas as pd

    rows = [{"expert": e, "matrix": n, **v} for e, per in (info.get("experts") or {}).items() for n, v in per.items()]
    frame = pd.DataFrame(rows, columns=["expert", "matrix", "mean", "min", "max"]).set_index(["expert", "matrix"])
    frame.attrs["note"] = ("each expert's factor on the singular values of each matrix it adapts (SVF: "
                           "W' = U diag(σ·factor) Vᵀ); 1 = unchanged, above 1 = that direction amplified")
    return frame


def _summary_lines(info: dict, kinds) -> list[str]:
    """The inspector's head: the parameter count, how the matrices are stored, the artifact's bits."""
    lines = [f"{info['folder']}: {info['parameters']:,} parameters (tied weights once, packed ternary layers by "
             "their weights)"]
    stored: dict[str, int] = {}
    for row in info["matrices"]:
        stored[row["stored"]] = stored.get(row["stored"], 0) + 1
    lines.append("matrices stored as: " + ", ".join(f"{k} × {v}" for k, v in stored.items()))
    if "artifact" in info:
        lines.append(f"artifact: {info['artifact']['bits_per_weight']} bits per weight, "
                     f"{info['artifact']['file_bytes']:,} bytes; "
                     f"values per codec {info['artifact']['weights_per_codec']}")
    return lines + [kinds.to_string()]


def model_inspector(path: str | Path):
    """Widget: the tables, a matrix picker showing its histogram and spectrum (and a ternary layer's shares of
    -1 / 0 / +1), the artifact's bits, and the experts' scalings per matrix."""
    import ipywidgets as w

    info = inspect_model(path)
    kinds, matrices = model_tables(info)
    pick = w.Dropdown(options=list(matrices.index), description="matrix", layout=w.Layout(width="70%"))
    head, row, figure = w.HTML(_pre("\n".join(_summary_lines(info, kinds)))), w.HTML(), w.Output()
    experts = experts_frame(info)
    scalings = w.HTML(_pre(f"expert scalings ({experts.attrs['note']}):\n{experts.to_string()}")
                      if len(experts) else "")

    def show(change=None):
        row.value = _pre(json.dumps(matrices.loc[pick.value].dropna().to_dict(), default=str))
        figure.clear_output(wait=True)
        with figure:
            fig = weight_figure(info, pick.value)
            _show(fig)
        box.last_figure = fig

    box = w.VBox([head, pick, row, figure, scalings])
    pick.observe(show, names="value")
    show()
    box.controls = {"matrix": pick, "figure": figure, "head": head, "row": row, "experts": scalings}
    box.info = info
    return box


# --- metrics explorer ----------------------------------------------------------------------------------


def load_metrics(files: Iterable[str | Path]):
    """Long DataFrame (run, step, metric, value) of numeric entries in ``metrics.jsonl`` files; ``run`` names the
    session and phase folder."""
    import pandas as pd

    rows = []
    for file in files:
        file = paths.resolve(file)
        run = f"{file.parent.parent.name}/{file.parent.name}"
        for line in file.read_text().splitlines():
            entry = json.loads(line)
            step = entry.get("step")
            for key, value in entry.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    rows.append({"run": run, "step": step, "metric": key, "value": float(value)})
    return pd.DataFrame(rows, columns=["run", "step", "metric", "value"])


def plot_metric(frame, metrics: str | Iterable[str], runs: Iterable[str] | None = None) -> "plt.Figure":
    """One or several metrics over steps, one line per run and metric (overlaid on one axis)."""
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for metric in metrics:
        sub = frame[frame.metric == metric]
        for run in (runs or sorted(sub.run.unique())):
            part = sub[sub.run == run].sort_values("step")
            if len(part):
                ax.plot(part.step, part.value, ".-", label=run if len(metrics) == 1 else f"{run}: {metric}", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel(metrics[0] if len(metrics) == 1 else "value")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def metrics_explorer(files: Iterable[str | Path] | None = None, session_glob: str = "*"):
    """Widget: runs (several) and metrics (several: ctrl/shift-click) → the overlaid curves. A chosen metric stays
    chosen while the runs change, as long as one of the runs logged it. ``files`` default: every ``metrics.jsonl``
    under ``outputs/<session_glob>/``."""
    import ipywidgets as w

    files = list(files) if files is not None else sorted(paths.outputs_root().glob(f"{session_glob}/*/metrics.jsonl"))
    frame = load_metrics(files)
    runs = w.SelectMultiple(options=sorted(frame.run.unique()), description="runs", rows=6,
                            layout=w.Layout(width="60%"))
    metrics = w.SelectMultiple(options=[], description="metrics", rows=6, layout=w.Layout(width="60%"))
    out = w.Output()
    updating = []

    def update_metrics(change=None):
        chosen = frame[frame.run.isin(runs.value)] if runs.value else frame.iloc[0:0]
        options = sorted(chosen.metric.unique())
        kept = tuple(m for m in metrics.value if m in options)
        updating.append(True)  # one redraw for the new runs, not one per intermediate value
        try:
            metrics.options = options
            metrics.value = kept
        finally:
            updating.pop()

    def show(change=None):
        if updating:
            return
        out.clear_output(wait=True)
        if metrics.value and runs.value:
            with out:
                fig = plot_metric(frame, metrics.value, runs.value)
                _show(fig)
            box.last_figure = fig

    box = w.VBox([runs, metrics, out])
    runs.observe(update_metrics, names="value")
    runs.observe(show, names="value")
    metrics.observe(show, names="value")
    box.controls = {"runs": runs, "metrics": metrics, "out": out}
    box.frame = frame
    return box
