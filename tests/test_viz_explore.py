"""The viz layer as a new user explores a finished run: the generation playground (re-runs on every change, a busy
line, the question echoed, the answer format explained, max tokens within the context), the model inspector
(packed ternary layers counted, Phase-7 expert scalings shown), the metrics explorer (several metrics, a kept
choice) and readable tables and plots. Widgets are driven through their controls; tiny real models only."""
import struct

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

CONTEXT = 24
"""max_position_embeddings of the playground's tiny models: a small context, so the cap is cheap to reach."""


def _text(html_widget) -> str:
    import html

    return html.unescape(html_widget.value).removeprefix("<pre>").removesuffix("</pre>")


@pytest.fixture(scope="module")
def tok():
    from helpers import task_tokenizer

    return task_tokenizer()


def _tiny_lm(tok, seed: int, context: int = CONTEXT, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=context, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=tied)).eval()


@pytest.fixture(scope="module")
def entries(tok, tmp_path_factory):
    """Two chain entries (``forgelib.scorecard.chain_models`` rows) of two different tiny models."""
    root = tmp_path_factory.mktemp("chain")
    rows = []
    for number, phase, seed in ((1, "cognate", 0), (2, "evomerge", 1)):
        folder = root / phase
        _tiny_lm(tok, seed).save_pretrained(folder)
        tok.save_pretrained(folder)
        rows.append({"number": number, "phase": phase, "role": "model", "path": folder, "experts": None})
    return rows


@pytest.fixture
def chain_of(entries, monkeypatch):
    """``phase_playground(session="s")`` offers ``entries`` (the session's chain, as ``session_models`` reads it)."""
    monkeypatch.setattr("forgelib.scorecard.session_models", lambda session: entries)
    return entries


# --- the playground ------------------------------------------------------------------------------------


def test_playground_reruns_on_a_model_change_and_on_every_setting(chain_of):
    from forgelib.viz.playground import phase_playground

    box = phase_playground("s", question="2+3=")
    c = box.controls
    assert box.last_trace["model"] == "2 evomerge/model"
    c["model"].value = 0  # the same question, another model: answered again, under the new name
    assert box.last_trace["model"] == "1 cognate/model" and _text(c["out"]).startswith("1 cognate/model: 2+3=")
    c["max_tokens"].value = 3
    assert box.last_trace["max_new_tokens"] == 3
    before = box.last_trace
    c["temperature"].value = 0.5
    assert box.last_trace is not before
    before = box.last_trace
    c["think"].value = True
    assert box.last_trace is not before


def test_playground_shows_a_busy_line_echoes_the_question_and_explains_the_format(chain_of, monkeypatch):
    from forgelib.viz import playground

    seen = []
    real = playground.trace_answer

    def spy(*args, **kwargs):
        seen.append(_text(box.controls["out"]))
        return real(*args, **kwargs)

    box = playground.phase_playground("s", question="2+3=")
    monkeypatch.setattr(playground, "trace_answer", spy)
    box.controls["question"].value = "4*5="
    assert seen == ["running 2 evomerge/model on '4*5=' …"]  # while the model runs
    lines = _text(box.controls["out"]).splitlines()
    assert lines[0] == "2 evomerge/model: 4*5=" and lines[1].startswith("  answer: ")  # the question above
    legend = _text(box.controls["legend"])
    assert "'a;b#answer'" in legend and "'<|tool|>expr<|/tool|>' is a calculator call" in legend
    assert "'<|result|>' the value it returned" in legend
    assert not box.controls["run"].disabled


def test_a_max_tokens_a_greedy_answer_ended_within_does_not_run_again(chain_of, monkeypatch):
    from forgelib.viz import playground

    calls = []

    def fake(entry, question, max_new_tokens, temperature, think, loaded=None):
        calls.append((max_new_tokens, temperature))
        return {"model": playground.entry_label(entry), "question": question, "text": "5#5", "expert": None,
                "thoughts": None, "calls": [], "act": None, "max_new_tokens": max_new_tokens, "capped": False,
                "context": CONTEXT, "stop": "eos", "n_generated": 3}

    monkeypatch.setattr(playground, "trace_answer", fake)
    box = playground.phase_playground("s", question="2+3=")
    c = box.controls
    first = c["max_tokens"].value  # the context left after the prompt
    c["max_tokens"].value = 3  # the answer took 3 tokens and ended: the same answer, nothing generated
    assert calls == [(first, 0.0)] and box.last_trace["max_new_tokens"] == 3
    c["max_tokens"].value = 2  # too few now: generated again
    c["temperature"].value = 0.5
    c["max_tokens"].value = 10  # sampling: every setting runs again
    assert calls == [(first, 0.0), (2, 0.0), (2, 0.5), (10, 0.5)]


def test_max_tokens_is_capped_at_the_context_left_after_the_prompt(chain_of, tok):
    entries = chain_of
    from forgelib.data.tokenizer import encode_prompts
    from forgelib.viz.playground import phase_playground, trace_answer, trace_lines

    prompt = len(encode_prompts(tok, ["12+30="])[0])
    box = phase_playground("s", question="12+30=")
    c = box.controls
    assert c["max_tokens"].max == CONTEXT - prompt and c["max_tokens"].value == CONTEXT - prompt  # 40 clamped
    assert box.last_trace["max_new_tokens"] == CONTEXT - prompt
    trace = trace_answer(entries[0], "12+30=", max_new_tokens=500)  # the static form is capped too
    assert trace["max_new_tokens"] == CONTEXT - prompt and trace["capped"]
    assert f"max tokens cut to {CONTEXT - prompt}: the model's context is {CONTEXT} tokens" in "\n".join(
        trace_lines(trace))
    long_question = "1+" * 40 + "1="
    c["question"].value = long_question  # no room left: said in the answer's place, nothing generated
    text = _text(c["out"])
    assert "fills the model's 24-token context and leaves no room for an answer; shorten it" in text
    with pytest.raises(ValueError, match="shorten it"):
        trace_answer(entries[0], long_question)


def test_playground_loads_models_without_progress_bars(chain_of, capfd):
    from transformers.utils import logging as hf_logging

    from forgelib.viz.playground import phase_playground

    hf_logging.enable_progress_bar()
    try:
        box = phase_playground("s", question="2+3=")
        box.controls["model"].value = 0
    finally:
        hf_logging.disable_progress_bar()
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err


# --- the model inspector --------------------------------------------------------------------------------


def test_inspector_counts_and_shows_packed_ternary_layers(tmp_path, tiny_llama):
    from forgelib.quant import convert_to_bitnet, export_packed
    from forgelib.quant.bitnet import ternary_dequantize, ternary_quantize
    from forgelib.viz.inspect import inspect_model, model_inspector

    convert_to_bitnet(tiny_llama)
    export_packed(tiny_llama, tmp_path / "packed", packing="base3")
    info = inspect_model(tmp_path / "packed")
    assert info["parameters"] == sum(p.numel() for p in tiny_llama.parameters())  # weights, not packed bytes
    assert info["per_kind"]["mlp"] == sum(p.numel() for n, p in tiny_llama.named_parameters() if ".mlp." in n)
    rows = {r["name"]: r for r in info["matrices"]}
    name = "model.layers.1.mlp.down_proj.weight"
    codes, scale = ternary_quantize(tiny_llama.model.layers[1].mlp.down_proj.weight)
    assert rows[name]["stored"] == "ternary, packed base3" and rows[name]["shape"] == list(codes.shape)
    assert [rows[name][f"share_{v}"] for v in (-1, 0, 1)] == [round(float((codes == v).float().mean()), 4)
                                                              for v in (-1, 0, 1)]
    assert sum(r["stored"] == "ternary, packed base3" for r in rows.values()) == 14  # every projection
    box = model_inspector(tmp_path / "packed")
    assert "ternary, packed base3 × 14" in _text(box.controls["head"])
    box.controls["matrix"].value = name
    counts = sum(p.get_height() for p in box.last_figure.axes[0].patches)
    assert counts == codes.numel() and "share_0" in _text(box.controls["row"])
    spectrum = box.last_figure.axes[1].lines[0].get_ydata()
    want = torch.linalg.svdvals(ternary_dequantize(codes, scale, torch.float32)).numpy()
    assert spectrum == pytest.approx(want, rel=1e-4)


def test_inspector_shows_each_experts_scalings_per_matrix(tmp_path, tiny_llama):
    import yaml

    from forgelib.experts import apply_svf, remove_svf, save_expert
    from forgelib.viz.inspect import inspect_model, model_inspector

    phase = tmp_path / "07_experts"
    tiny_llama.save_pretrained(phase / "models" / "model")
    (phase / "params.yaml").write_text(yaml.safe_dump({"experts": {"svf": {"rescale": True}}}))
    svf = apply_svf(tiny_llama)
    gen = torch.Generator().manual_seed(0)
    zs = []
    for c in range(2):
        svf.load_z({n: torch.randn(z.shape, generator=gen) for n, z in svf.z.items()})
        zs.append(svf.get_z())
        save_expert(svf, phase / "experts" / f"expert_{c}.safetensors")
    remove_svf(svf)
    torch.save({"centroids": torch.zeros(2, 4), "k": 2}, phase / "experts" / "router.pt")
    info = inspect_model(phase / "models" / "model")
    layer = "model.layers.0.mlp.up_proj"
    sigma = torch.linalg.svdvals(tiny_llama.model.layers[0].mlp.up_proj.weight.detach())
    gate = torch.sigmoid(zs[1][layer])
    factor = gate * sigma.sum() / (sigma * gate).sum()  # SVF: the singular values' sum is kept
    got = info["experts"]["expert_1"][layer]
    assert [got["mean"], got["min"], got["max"]] == pytest.approx(
        [float(factor.mean()), float(factor.min()), float(factor.max())], abs=2e-4)
    assert set(info["experts"]) == {"expert_0", "expert_1"} and len(info["experts"]["expert_0"]) == 14
    box = model_inspector(phase / "models" / "model")
    shown = _text(box.controls["experts"])
    assert "1 = unchanged" in shown and "expert_1" in shown and layer in shown
    assert f"{got['mean']:.4f}" in shown


def test_inspector_names_each_artifact_tensors_codec_and_ternary_shares(tmp_path, tiny_llama):
    from forgelib.quant.artifact import artifact_report, save_compressed
    from forgelib.quant.bitnet import ternary_quantize
    from forgelib.viz.inspect import inspect_model

    up = "model.layers.0.mlp.up_proj.weight"
    save_compressed(tiny_llama, tmp_path / "c" / "model.forge", {up: {"codec": "ternary"},
                                                                 "lm_head.weight": {"codec": "rtn", "bits": 4}})
    info = inspect_model(tmp_path / "c")
    rows = {r["name"]: r for r in info["matrices"]}
    report = artifact_report(tmp_path / "c" / "model.forge")
    bits = 8 * report["per_tensor_bytes"][up] / tiny_llama.model.layers[0].mlp.up_proj.weight.numel()
    assert rows[up]["stored"] == f"ternary, {bits:.3g} bits" and rows["lm_head.weight"]["stored"].startswith("rtn, 4")
    assert rows["model.embed_tokens.weight"]["stored"].startswith("raw16, 16")
    codes = ternary_quantize(tiny_llama.model.layers[0].mlp.up_proj.weight)[0]
    assert rows[up]["share_0"] == round(float((codes == 0).float().mean()), 4)
    assert info["parameters"] == report["weights"]


# --- the metrics explorer --------------------------------------------------------------------------------


def test_metrics_explorer_overlays_several_metrics_and_keeps_the_choice(tmp_path):
    import json

    from forgelib.viz.inspect import metrics_explorer

    files = []
    for run, scale in (("r1", 1.0), ("r2", 2.0)):
        f = tmp_path / run / "01_x" / "metrics.jsonl"
        f.parent.mkdir(parents=True)
        f.write_text("\n".join(json.dumps({"step": s, "train/loss": scale / (s + 1), "eval/acc": scale * s / 10})
                               for s in range(4)))
        files.append(f)
    box = metrics_explorer(files)
    c = box.controls
    c["runs"].value = ("r1/01_x",)
    c["metrics"].value = ("train/loss",)
    c["runs"].value = ("r1/01_x", "r2/01_x")  # another run chosen: the metric stays chosen
    assert c["metrics"].value == ("train/loss",)
    assert [line.get_label() for line in box.last_figure.axes[0].lines] == ["r1/01_x", "r2/01_x"]
    c["metrics"].value = ("eval/acc", "train/loss")  # two metrics overlaid, each line named by run and metric
    lines = {line.get_label(): list(line.get_ydata()) for line in box.last_figure.axes[0].lines}
    assert set(lines) == {"r1/01_x: eval/acc", "r2/01_x: eval/acc", "r1/01_x: train/loss", "r2/01_x: train/loss"}
    assert lines["r2/01_x: eval/acc"] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    c["runs"].value = ("r2/01_x",)
    assert c["metrics"].value == ("eval/acc", "train/loss")


# --- readable tables and plots ----------------------------------------------------------------------------


def test_human_sizes_and_significant_digits():
    from forgelib.viz.format import human_bytes, show, sig

    assert [human_bytes(n) for n in (0, 1023, 1024, 182174, 1536 * 1024, 5 * 2**30)] == \
        ["0 B", "1023 B", "1 KiB", "178 KiB", "1.5 MiB", "5 GiB"]
    assert [sig(x) for x in (1.0846, 2.4195, 123.456, 0.0012345)] == [1.08, 2.42, 123.0, 0.00123]
    assert show("total_bytes", 182174.0) == "178 KiB" and show("packed_over_fp32_bytes", 0.1466) == "0.1466"
    assert show("questions", 1664) == "1,664" and show("x", 1e-06) == "1e-06" and show("ok", True) == "True"


def test_a_phase_result_table_has_one_row_per_metric_and_reads_its_values():
    from forgelib.results import GateCheck, PhaseResult

    result = PhaseResult("bitnet", 4, "s", metrics={
        "total_bytes_packed": 182174, "compression_vs_fp32": 6.821, "logits_max_abs_diff": 0.0, "acc": 0.5208,
        "guard_questions": 1664}, gate=[GateCheck("compression_vs_fp32", 6.821, 6.5),
                                        GateCheck("logits_max_abs_diff", 0.0, 1e-6, "<="),
                                        GateCheck("packed_over_fp32_bytes", 0.1466, 1.0, "<")])
    table = result.table()
    assert list(table.metric) == ["total_bytes_packed", "compression_vs_fp32", "logits_max_abs_diff", "acc",
                                  "guard_questions", "packed_over_fp32_bytes"]  # a gate on a metric: its row
    values, gates = dict(zip(table.metric, table.value)), dict(zip(table.metric, table.gate))
    assert values["total_bytes_packed"] == "178 KiB" and values["guard_questions"] == "1,664"
    assert gates["compression_vs_fp32"] == ">= 6.5 → pass" and gates["logits_max_abs_diff"] == "<= 1e-06 → pass"
    assert values["packed_over_fp32_bytes"] == "0.1466" and gates["packed_over_fp32_bytes"] == "< 1 → pass"
    assert "000000" not in table.to_html() and gates["acc"] == ""


def test_bitnet_size_table_reads_sizes_and_leaves_blank_what_does_not_apply():
    from forgelib.viz.bitnet import size_frame

    report = {"sizes": {"fp32": {"total_bytes": 182174},
                        "base3": {"total_bytes": 30000, "packed_bytes": 13518, "bits_per_ternary_weight": 1.6001,
                                  "bits_per_ternary_weight_with_scales": 1.6029, "other_bytes": 1540}}}
    frame = size_frame(report)
    assert list(frame.index) == ["fp32", "base3"]
    assert frame.loc["fp32"].tolist() == ["178 KiB", "1.00", "", "", "", ""]
    assert frame.loc["base3"].tolist() == ["29.3 KiB", "6.07", "13.2 KiB", "1.600", "1.603", "1.5 KiB"]
    assert "nan" not in frame.to_html().lower() and ".000000" not in frame.to_html()


def test_scorecard_counts_tied_weights_once_and_sizes_without_the_tokenizer(tmp_path, tok):
    from forgelib.scorecard import ScorecardParams, score_model
    from forgelib.suite import questions

    model = _tiny_lm(tok, 0, tied=True)
    folder = tmp_path / "1_cognate" / "models" / "trunk"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    entry = {"number": 1, "phase": "cognate", "role": "trunk", "path": folder, "experts": None}
    row = score_model(entry, questions("arith", (1, 1), 2, 0), ScorecardParams(max_new_tokens=4))
    assert row["values"] == sum(p.numel() for p in model.parameters())  # the tied head is the embedding
    weights = sum(f.stat().st_size for f in folder.iterdir() if f.name in ("model.safetensors", "config.json",
                                                                          "generation_config.json"))
    assert row["bytes"] == weights  # tokenizer.json and tokenizer_config.json are not the model's bytes
    assert row["bits_per_value"] == round(8 * weights / row["values"], 3)
    file = folder / "model.safetensors"
    header = 8 + struct.unpack("<Q", file.read_bytes()[:8])[0]
    assert file.stat().st_size - header == 4 * row["values"]  # every stored fp32 value counted, once
    assert row["tokens_per_s"] is None or row["tokens_per_s"] > 0


def test_packed_values_are_counted_by_their_weights(tiny_llama):
    from forgelib.quant import convert_to_bitnet
    from forgelib.quant.bitnet import PackedBitLinear
    from forgelib.scorecard import stored_values

    convert_to_bitnet(tiny_llama)
    want = stored_values(tiny_llama)
    layer = tiny_llama.model.layers[0].mlp.up_proj
    tiny_llama.model.layers[0].mlp.up_proj = PackedBitLinear.from_bitlinear(layer, "base3")
    assert stored_values(tiny_llama) == want + 1  # out × in ternary weights (not their packed bytes) and a scale


def test_tokens_per_second_warms_up_then_counts_the_fastest_timed_run(monkeypatch):
    import types

    from forgelib import scorecard, tools
    from forgelib.data.tasks import Sample

    now, durations, calls = [0.0], iter([9.0, 0.2, 0.1, 0.4, 0.05]), []

    def generate(lm, tokenizer, prompts, max_new_tokens, batch_size):
        calls.append(len(prompts))
        now[0] += next(durations)
        return [types.SimpleNamespace(n_generated=5, text="1+1=2#2") for _ in prompts]

    monkeypatch.setattr(tools, "generate_with_tools", generate)
    monkeypatch.setattr(scorecard, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    test = [Sample("arith", 1, f"{i}+1=", str(i + 1)) for i in range(20)]
    # the 9 s warm-up is not timed; runs go on until 0.3 s were timed (0.2 + 0.1 + 0.4), at least 3
    assert scorecard.tokens_per_second(None, None, test, 8) == round(16 * 5 / 0.1, 1)
    assert calls == [16, 16, 16, 16]
    assert scorecard.tokens_per_second(None, None, [], 8) is None


def test_targets_say_what_is_missing():
    from forgelib.scorecard import targets

    fp = [{"phase": "1 cognate", "model": m, "bytes": 400, "accuracy": 0.5} for m in ("trunk", "reasoning")]
    assert targets(fp) == {"missing": "no Phase-8 artifact in this chain: the targets compare the final artifact "
                                      "with the Phase-1 specialists (score a session whose Phase 8 completed)"}
    late = [{"phase": "7 experts", "model": "model", "bytes": 400, "accuracy": 0.5},
            {"phase": "8 compression", "model": "model", "bytes": 40, "accuracy": 0.5}]
    assert targets(late)["missing"].startswith("no Phase-1 specialists in this chain (it starts at 7 experts)")


CARD = [{"phase": p, "model": m, "values": 122905, "bytes": b, "bits_per_value": 8 * b / 122905, "ppl": ppl,
         "accuracy": acc, "experts": 0, "tokens_per_s": tps, "n": 2, "acc_arith": acc, "acc_logic": 1 - acc,
         "gate": "gate-failed" if p == "3 quietstar" else "pass"}
        for p, m, b, ppl, acc, tps in (("1 cognate", "trunk", 496725, 1.0846, 0.7679, 5737.6),
                                       ("1 cognate", "reasoning", 496725, 1.0793, 0.7798, 3497.1),
                                       ("3 quietstar", "model", 531580, 1.0738, 0.7857, 5635.8),
                                       ("8 compression", "model", 65324, 2.4897, 0.7946, 2990.8))]


def test_scorecard_table_is_compact_and_rounded():
    from forgelib.viz.scorecard import family_frame, scorecard_frame

    frame = scorecard_frame(CARD)
    assert list(frame.columns) == ["gate", "size", "bits/value", "ppl", "accuracy", "experts", "tokens/s"]
    assert list(frame.index) == ["1 cognate trunk", "1 cognate reasoning", "3 quietstar", "8 compression"]
    assert frame.loc["1 cognate trunk"].tolist() == ["pass", "485 KiB", 32.3, 1.08, 0.768, 0, 5700]
    assert frame.loc["3 quietstar", "gate"] == "gate-failed"
    assert frame.loc["8 compression", "ppl"] == 2.49 and frame.loc["8 compression", "size"] == "63.8 KiB"
    assert "noisy" in frame.attrs["note"] and "tied weights once" in frame.attrs["note"]
    families = family_frame(CARD)
    assert list(families.columns) == ["arith", "logic"] and families.loc["3 quietstar", "logic"] == 0.21
    assert max(len(line) for line in frame.to_string().splitlines()) < 90  # no sideways scrolling


def test_scorecard_plot_names_models_readably_in_one_legend():
    from forgelib.viz.scorecard import plot_scorecard

    fig = plot_scorecard(CARD)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["1 cognate trunk", "1 cognate reasoning", "3 quietstar", "8 compression"]
    assert not fig.axes[0].texts and not fig.axes[0].get_legend() and not fig.axes[1].get_legend()
    assert all(":" not in label for label in labels)


def test_quietstar_heatmap_writes_tokens_large_enough_to_read():
    from forgelib.viz.quietstar import plot_mixing_heatmap

    rows = [{"prompt": "10+51=", "tokens": ["1", "#", "<|eos|>"], "weights": [0.01, 0.2, 0.05],
             "answer": [False, True, True]}]
    ax = plot_mixing_heatmap({"heatmap": rows}).axes[0]
    assert [t.get_text() for t in ax.texts] == ["1", "#", "eos"] and min(t.get_fontsize() for t in ax.texts) >= 8
    assert ax.texts[0].get_fontsize() >= 10 and ax.texts[1].get_color() == "black"  # dark on the light end
    assert min(label.get_fontsize() for label in ax.get_yticklabels()) >= 9


def test_the_unseen_familys_mixture_weights_are_explained():
    from forgelib.viz.experts import unseen_frame

    frame = unseen_frame({"unseen": {"family": "modular", "alphas": [-1.0, 0.31],
                                     "test": {"base": 0.2, "mixture": 0.25, "expert_0": 0.2, "expert_1": 0.125}}})
    note = frame.attrs["note"]
    assert note.startswith("mixture weights (expert 0: -1.00, expert 1: +0.31): the per-expert coefficients")
    assert "a negative weight subtracts that expert's adjustment" in note and frame.attrs["alphas"] == [-1.0, 0.31]


def test_phase8_stage_table_reads_sizes_and_three_digit_perplexities():
    from forgelib.viz.compression import stage_frame

    report = {"reference": {"acc": 0.5, "ppl": 15.5132}, "n_test": 4,
              "stages": [{"name": "pack", "assign": {"m": {"codec": "ternary"}}, "bits_per_weight": 8.239,
                          "file_bytes": 126976, "acc": 0.5, "ppl": 15.4987, "gate": [], "kept": True}]}
    frame = stage_frame(report)
    assert frame["perplexity"].tolist() == [15.5, 15.5] and frame.loc["pack", "size"] == "124 KiB"
