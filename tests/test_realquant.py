"""`forge bench realquant` (``forgelib.bench.realquant``) without a real model: a GGUF file's bits per weight against
sizes computed by hand from GGML's block layouts, the byte accounting of an RTN-compressed tiny Llama against the
codec's layout formula, and the benchmark end to end on a tiny Llama written as a GGUF file, its perplexities checked
against an independent computation (the reference loaded again; RTN through the standalone quantize / dequantize
functions, not the codec registry)."""
from __future__ import annotations

import argparse
import json
import math

import gguf
import numpy as np
import pytest
import torch
from test_gguf import tiny_llama, write_llama_gguf

from forgelib.bench import realquant
from forgelib.evaluate import strided_perplexity
from forgelib.modelio import ModelLoadError, load_model, load_tokenizer_for
from forgelib.quant.codecs import rtn_dequantize, rtn_quantize

Q = gguf.GGMLQuantizationType
TEXTS = ["Hello world. The quick brown fox jumps over the lazy dog, and then it rests in the sun for a while.",
         "Paris is the capital of France. It lies on the river Seine and is known for its museums and cafes.",
         "A short third document about nothing much at all, written only so that the slice has to cut it."]
CALIBRATION = ["Calibration text is plain English prose too: it feeds the input second moments of the layers."]


def _write(path, tensors):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("sizes")
    for name, (data, kind) in tensors.items():
        if kind in (Q.Q4_1, Q.Q8_0):
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, data.astype(np.float16 if kind == Q.F16 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_bits_per_weight_are_the_block_layouts_sizes(tmp_path):
    rng = np.random.default_rng(0)
    path = _write(tmp_path / "sizes.gguf", {
        "token_embd.weight": (rng.standard_normal((64, 64), dtype=np.float32), Q.Q8_0),
        "blk.0.attn_q.weight": (rng.standard_normal((64, 64), dtype=np.float32), Q.Q4_1),
        "blk.0.ffn_down.weight": (rng.standard_normal((32, 64), dtype=np.float32), Q.F16),
        "blk.0.attn_norm.weight": (rng.standard_normal(64, dtype=np.float32), Q.F32)})
    # by hand: Q8_0 = 32 int8 + an fp16 scale per 32 weights (34 bytes), Q4_1 = 16 bytes of nibbles + fp16 scale
    # + fp16 min per 32 (20 bytes), F16 two bytes, F32 four
    q8, q41, f16, f32 = 4096 // 32 * 34, 4096 // 32 * 20, 2048 * 2, 64 * 4
    bits = realquant.gguf_bits(path)
    assert {k: v["bytes"] for k, v in bits["per_type"].items()} == {"Q8_0": q8, "Q4_1": q41, "F16": f16, "F32": f32}
    assert bits["per_type"]["Q4_1"]["bits_per_weight"] == 5.0 and bits["per_type"]["Q8_0"]["bits_per_weight"] == 8.5
    assert bits["linear"] == {"weights": 4096 + 2048, "bytes": q41 + f16,
                              "bits_per_weight": 8 * (q41 + f16) / (4096 + 2048)}
    assert bits["embeddings"]["bits_per_weight"] == 8.5 and bits["other"]["weights"] == 64
    size = path.stat().st_size
    assert bits["tensor_bytes"] == q8 + q41 + f16 + f32 and bits["other_bytes"] == size - bits["tensor_bytes"] > 0
    assert bits["params"] == 4096 + 4096 + 2048 + 64
    assert bits["file_bits_per_param"] == pytest.approx(8 * size / bits["params"])


def test_gguf_bits_refuse_a_file_that_is_not_a_whole_gguf(tmp_path):
    path = _write(tmp_path / "whole.gguf", {"blk.0.attn_q.weight": (np.ones((64, 64), np.float32), Q.Q4_1)})
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        realquant.gguf_bits(tmp_path / "cut.gguf")
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        realquant.gguf_bits(tmp_path / "not.gguf")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(a tiny Llama written as an F32 GGUF file, that file)."""
    model = tiny_llama()
    return model, write_llama_gguf(model, tmp_path_factory.mktemp("realquant") / "tiny.gguf")


def test_the_text_slice_stops_at_the_token_budget(tiny):
    tokenizer = load_tokenizer_for(tiny[1])
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    budget = lengths[0] + 10
    sliced = realquant.text_slice(tokenizer, TEXTS, budget)
    assert sliced[0] == TEXTS[0] and len(sliced) == 2 and TEXTS[1].startswith(sliced[1])
    assert sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in sliced) == pytest.approx(budget, abs=2)
    assert realquant.text_slice(tokenizer, TEXTS, n_docs=2) == TEXTS[:2]


def _args(**kw):
    base = dict(max_len=32, stride=16, batch_size=2, max_new_tokens=3,
                embeddings_spec={"codec": "rtn", "bits": 8, "group": 32})
    return argparse.Namespace(**{**base, **kw})


def test_rtn_bytes_are_the_codecs_layout(tiny, tmp_path):
    """3-bit codes in groups of 64 over rows of 32 or 48 inputs: each row padded to one whole group, codes packed
    across byte boundaries, one fp16 scale per group; embeddings 8-bit in groups of 32; norms fp32."""
    model, path = tiny
    reference, tokenizer = load_model(path), load_tokenizer_for(path)
    linears = realquant.linear_names(reference)
    assert len(linears) == 2 * 7
    state = reference.state_dict()
    args = _args(reference_state={k: v.clone() for k, v in state.items()})
    variant = {"name": "rtn3", "spec": {"codec": "rtn", "bits": 3, "group": 64}, "scope": linears,
               "label": "all linear", "extrapolate": False}
    row = realquant.run_variant(reference, tokenizer, TEXTS[:1], variant, args, tmp_path, {})

    def rtn(rows, cols, bits, group):
        groups = rows * math.ceil(cols / group)
        return math.ceil(groups * group * bits / 8) + 2 * groups

    expected = sum(rtn(*state[n].shape, 3, 64) for n in linears)
    assert row["scope_bytes"] == expected
    assert row["linear_bits_per_weight"] == 8 * expected / sum(state[n].numel() for n in linears)
    embeddings = rtn(*state["model.embed_tokens.weight"].shape, 8, 32) + rtn(*state["lm_head.weight"].shape, 8, 32)
    assert row["embeddings_bytes"] == embeddings
    norms = 4 * sum(t.numel() for n, t in state.items() if "norm" in n)
    assert row["file_bytes"] == row["header_bytes"] + expected + embeddings + norms
    params = sum(t.numel() for t in state.values())
    assert row["model_bits_per_weight"] == pytest.approx(8 * row["file_bytes"] / params)
    assert not list(tmp_path.iterdir())  # the artifact is removed once measured


def _rtn_model(path, bits, group):
    """The reference with every linear weight through the standalone RTN functions."""
    model = load_model(path)
    with torch.no_grad():
        for name in realquant.linear_names(model):
            weight = model.get_parameter(name)
            weight.copy_(rtn_dequantize(rtn_quantize(weight, bits, group)))
    return model


def test_the_benchmark_end_to_end_on_a_tiny_gguf(tiny, tmp_path, monkeypatch, capsys):
    model, path = tiny
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "outputs"))
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS))
    (tmp_path / "calibration.json").write_text(json.dumps(CALIBRATION))
    assert realquant.main(["--model", str(path), "--texts", str(tmp_path / "texts.json"), "--calibration-texts",
                           str(tmp_path / "calibration.json"), "--codecs", "raw16", "rtn", "hqq", "vq",
                           "--subset-codecs", "vq", "--subset", "model.layers.1.mlp.*", "--bits", "2", "4",
                           "--embeddings", "raw32", "--group", "16", "--docs", "2", "--max-len", "32", "--stride", "16",
                           "--max-new-tokens", "3"]) == 0
    [out] = (tmp_path / "outputs" / "bench").glob("realquant-*.json")
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["gguf (as shipped)", "raw16", "rtn2", "rtn4", "hqq2", "hqq4", "vq", "hqq3-subset"]
    tokenizer = load_tokenizer_for(path)
    ppl = strided_perplexity(load_model(path), tokenizer, TEXTS[:2], 32, 16)
    assert rows["gguf (as shipped)"]["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert rows["gguf (as shipped)"]["linear_bits_per_weight"] == 32.0  # an F32 file
    assert rows["gguf (as shipped)"]["model_bits_per_weight"] == 8 * path.stat().st_size / model.num_parameters()
    assert rows["rtn4"]["ppl"] == pytest.approx(strided_perplexity(_rtn_model(path, 4, 16), tokenizer, TEXTS[:2], 32,
                                                                   16), rel=1e-4)
    assert rows["rtn2"]["linear_bits_per_weight"] == 2 + 16 / 16 and rows["hqq4"]["linear_bits_per_weight"] == 4 + 2
    assert rows["raw16"]["ppl_ratio"] == pytest.approx(1, abs=1e-3) and rows["raw16"]["weight_rel_err"] < 1e-3
    assert rows["rtn2"]["weight_rel_err"] > rows["rtn4"]["weight_rel_err"] > rows["raw16"]["weight_rel_err"]
    assert rows["vq"]["scope_weights"] == rows["hqq3-subset"]["scope_weights"] == 3 * 32 * 48
    linear = 2 * (32 * 32 + 16 * 32 + 16 * 32 + 32 * 32 + 3 * 48 * 32)  # q, k, v (2 of 4 heads), o, gate, up, down
    assert report["linear_weights"] == linear
    assert rows["vq"]["est_all_linear_encode_s"] == pytest.approx(rows["vq"]["encode_s"] * linear / (3 * 32 * 48))
    assert 0 < rows["vq"]["encode_s"] <= rows["vq"]["artifact_s"] and 0 < rows["rtn2"]["encode_s"] <= rows["rtn2"][
        "artifact_s"]
    assert "est_all_linear_encode_s" not in rows["hqq3-subset"]  # the baseline's whole-model time is its own row's
    assert all(len(r["answers"]) == 3 for r in report["rows"]) and report["text"]["documents"] == 2
    markdown = out.with_suffix(".md").read_text()
    assert markdown.startswith("| variant |") and "IQ2_XXS ~2.06" in markdown and "| rtn2 | all linear | 3.00 |" \
        in markdown
    assert "| variant |" in capsys.readouterr().out
    assert not out.with_suffix("").exists()  # the artifacts' scratch folder is gone


def test_a_subset_that_matches_nothing_is_named(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "outputs"))
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS))
    with pytest.raises(SystemExit, match=r"'model\.layers\.15\.mlp\.down_proj\.weight' matches no linear weight"):
        realquant.main(["--model", str(tiny[1]), "--texts", str(tmp_path / "texts.json"), "--codecs", "seedlm"])


def test_a_wrong_model_or_setting_is_one_clear_line(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "outputs"))
    with pytest.raises(SystemExit, match="--model: GGUF file .*missing.gguf' does not exist"):
        realquant.main(["--model", str(tmp_path / "missing.gguf")])
    monkeypatch.setenv("FORGE_REALTEXT", str(tmp_path / "no-corpus"))
    with pytest.raises(SystemExit, match="no-corpus.* is not a folder.*or pass --texts"):
        realquant.main(["--model", str(tiny[1])])
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS))
    with pytest.raises(SystemExit, match="codec 'hqq': bits must be one of 1, 2, 3, 4, 8, got 5"):
        realquant.main(["--model", str(tiny[1]), "--texts", str(tmp_path / "texts.json"), "--codecs", "hqq",
                        "--bits", "5"])
    (tmp_path / "bad.json").write_text(json.dumps({"not": "a list"}))
    with pytest.raises(SystemExit, match="bad.json' is not a JSON list of documents"):
        realquant.main(["--model", str(tiny[1]), "--texts", str(tmp_path / "bad.json")])
