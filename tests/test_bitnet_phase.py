"""Phase 4 pieces on tiny real models: the gate, packed Quiet-STaR folders (thoughts included) that reload with
equal logits, the one loader for packed / fake-quantized / plain folders, and the phase on a Llama upstream."""
import pytest
import torch

from forgelib.phases.bitnet import Params, gate_checks
from forgelib.quant import BitLinear, bitlinear_modules, convert_to_bitnet, packed_bitlinear_modules
from forgelib.quietstar import QuietStarConfig, QuietStarModel
from forgelib.modelio import load_quietstar


@pytest.fixture(scope="module")
def tok():
    from forgelib.data.tasks import build_mix, format_sample, suite_families
    from forgelib.data.tokenizer import train_tokenizer

    mix = {f: 1 for f in suite_families()}
    texts = [format_sample(s, with_steps=True) for s in build_mix(mix, (1, 3), 300, "train", 0)]
    return train_tokenizer(texts, vocab_size=300)


def cognate(tok):
    from forgelib.models import CognateConfig, CognateForCausalLM

    torch.manual_seed(0)
    return CognateForCausalLM(CognateConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, use_act=True,
        memory_modules=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)).eval()


def llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()


def thinking(base, tok):
    qs = QuietStarModel(base, tok, QuietStarConfig(n_thought=2))
    torch.manual_seed(1)
    with torch.no_grad():  # an opened mixing head, so that the thoughts matter in the logits
        for p in qs.mixing_head.parameters():
            p.normal_(0, 0.3)
        qs.mixing_head[-1].bias.fill_(0.3)
    return qs.eval()


def batch(tok):
    rows = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in ["12+7=19#19", "x+5=9;x=4"]]
    T = max(map(len, rows))
    ids = torch.full((2, T), tok.pad_token_id)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize("make", [cognate, llama], ids=["cognate", "llama"])
@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_packed_thinking_model_reloads_with_equal_logits(tok, tmp_path, make, packing):
    qs = thinking(make(tok), tok)
    convert_to_bitnet(qs.base)
    qs.export_packing = packing
    qs.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    packed = load_quietstar(tmp_path / "m")
    assert len(packed_bitlinear_modules(packed.base)) == 14 and not bitlinear_modules(packed.base)
    ids, mask = batch(tok)
    with torch.no_grad():
        ours, theirs = qs(ids, mask).logits, packed(ids, mask).logits
    assert torch.equal(ours[mask.bool()], theirs[mask.bool()])  # thoughts, mixing and ternary layers alike
    report = qs.export_report
    assert report["file_bytes"] == (tmp_path / "m" / "model.safetensors").stat().st_size
    # trainable reload: BitLinear layers that quantize to the same codes
    again = load_quietstar(tmp_path / "m", trainable=True)
    assert len(bitlinear_modules(again.base)) == 14
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask).logits[mask.bool()], ours[mask.bool()], atol=1e-4, rtol=1e-4)


def test_one_loader_for_plain_fake_quantized_and_packed_folders(tok, tmp_path):
    from forgelib.modelio import load_causal_lm
    from forgelib.quant import export_packed

    model = convert_to_bitnet(cognate(tok))
    model.save_pretrained(tmp_path / "fake")  # packing 'none': plain Linear weights on disk
    export_packed(model, tmp_path / "packed", "base3")
    fake, packed = load_causal_lm(tmp_path / "fake"), load_causal_lm(tmp_path / "packed")
    assert all(isinstance(m,
                          BitLinear) for m in bitlinear_modules(fake).values()) and len(bitlinear_modules(fake)) == 14
    assert len(packed_bitlinear_modules(packed)) == 14
    ids, mask = batch(tok)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(fake(input_ids=ids, attention_mask=mask).logits, ref)
        assert torch.equal(packed(input_ids=ids, attention_mask=mask).logits, ref)


def _metrics(**changes):
    metrics = {"ppl_ratio_upper_bound": 1.2, "compression_vs_fp32": 9.0, "trainable_reload_logits_max_abs_diff": 0.0,
               "total_bytes_packed": 100, "total_bytes_fp32": 900, "packed_logits_max_abs_diff": 0.0}
    return {**metrics, **changes}


GATE = {"ppl_ratio_upper_bound", "compression_vs_fp32", "trainable_reload_logits_max_abs_diff",
        "packed_over_fp32_bytes", "packed_logits_max_abs_diff"}


def test_gate_names_each_failure():
    checks = {c.name: c for c in gate_checks(_metrics(), Params())}
    assert set(checks) == GATE and all(c.passed for c in checks.values())
    assert checks["packed_over_fp32_bytes"].value == pytest.approx(100 / 900)
    checks = {c.name: c for c in gate_checks(_metrics(), Params(max_ppl_ratio=1.1, min_compression=10.0))}
    assert [n for n, c in checks.items() if not c.passed] == ["ppl_ratio_upper_bound", "compression_vs_fp32"]
    assert (checks["ppl_ratio_upper_bound"].bound, checks["compression_vs_fp32"].bound) == (1.1, 10.0)
    checks = {c.name: c for c in gate_checks(_metrics(packed_logits_max_abs_diff=1e-3, total_bytes_packed=1000,
                                                      trainable_reload_logits_max_abs_diff=2e-6), Params())}
    assert {n for n, c in checks.items() if not c.passed} == {"packed_logits_max_abs_diff", "packed_over_fp32_bytes",
                                                              "trainable_reload_logits_max_abs_diff"}
    missing = _metrics()
    del missing["trainable_reload_logits_max_abs_diff"]  # never measured: the check fails, it is not skipped
    assert not {c.name: c for c in gate_checks(missing, Params())}["trainable_reload_logits_max_abs_diff"].passed


def test_ppl_ratio_bound_is_the_upper_bound_of_the_paired_nll_difference():
    import math
    import random

    from forgelib.phases.bitnet import ppl_ratio_bound
    from forgelib.stats import mean_bounds

    gen = random.Random(0)
    fp = [gen.uniform(0.5, 1.5) for _ in range(50)]
    ternary = [x + 0.1 + gen.uniform(-0.2, 0.2) for x in fp]
    table = {"fp": {"sample_nll": fp}, "ternary": {"sample_nll": ternary}}
    upper = mean_bounds([t - f for t, f in zip(ternary, fp)], 0.95)[2]
    assert ppl_ratio_bound(table, 0.95) == pytest.approx(math.exp(upper))
    assert ppl_ratio_bound(table, 0.99) > ppl_ratio_bound(table, 0.95) > math.exp(0.1 - 0.05)
    same = {"fp": {"sample_nll": fp}, "ternary": {"sample_nll": list(fp)}}
    assert ppl_ratio_bound(same, 0.95) == 1.0  # no difference on any question: exactly 1


def test_bad_phase4_parameters_are_named():
    with pytest.raises(ValueError, match="packing"):
        Params(packing="3bit")
    with pytest.raises(ValueError, match="loss"):
        Params(loss="mse")
    for bad, match in (({"allowed_loss": 0.0}, "allowed_loss must lie in"), ({"allowed_loss": 1.0}, "allowed_loss"),
                       ({"replay": 1.0}, "replay must lie in"), ({"min_compression": -1.0}, "min_compression")):
        with pytest.raises(ValueError, match=match):
            Params(**bad)


def test_removed_retention_key_is_refused(tmp_path):
    from forgelib.params import ParameterError, load_section

    path = tmp_path / "p.yaml"
    path.write_text("bitnet:\n  min_acc_retention: 0.5\n")
    with pytest.raises(ParameterError, match="min_acc_retention"):
        load_section(path, "bitnet", Params, None, {"bitnet", "run"})


def test_bitnet_phase_on_a_llama_style_thinking_model(tok, tmp_path, monkeypatch):
    import json

    from forgelib import paths
    from forgelib.phases import open_phase
    from forgelib.registry import ModelRegistry
    from forgelib.results import PhaseResult
    from helpers import SUITE, TINY_GUARD

    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "out"))
    qs = thinking(llama(tok), tok)
    folder = tmp_path / "model"
    qs.save_pretrained(folder)
    tok.save_pretrained(folder)
    up = PhaseResult("quietstar", 3, "llama4", status="ok", suite=SUITE)
    with ModelRegistry(paths.registry_path()) as reg:
        up.models["model"] = {"path": str(folder), "registry_id": reg.register_model(
            session_id="llama4", phase_name="quietstar", model_name="model", model_path=str(folder))}
    overrides = {"run": {"quiet": True, "tracking": "jsonl"}, **TINY_GUARD,
                 "bitnet": {"steps": 3, "test_per_family": 2, "max_ppl_ratio": 1e9, "allowed_loss": 0.4}}
    ctx = open_phase("bitnet", "parameters/smoke.yaml", overrides, session="llama4", upstream=up)
    assert ctx.result.suite == SUITE  # handed on unchanged
    result = ctx.spec.load().run(ctx.params, ctx)
    metrics = result.metrics
    assert metrics["packed_logits_max_abs_diff"] == 0.0
    assert metrics["trainable_reload_logits_max_abs_diff"] <= 1e-6
    assert metrics["total_bytes_packed"] < metrics["total_bytes_fp32"]
    assert metrics["compression_vs_fp32"] == round(metrics["total_bytes_fp32"] / metrics["total_bytes_packed"], 3)
    assert 1.6 <= metrics["bits_per_quantized_weight"] < 1.7  # base-3 codes plus one scale per matrix
    model_dir = paths.resolve(result.models["model"]["path"])
    assert metrics["total_bytes_packed"] == sum(
        (model_dir / f).stat().st_size for f in ("model.safetensors", "quietstar.safetensors"))
    assert type(load_quietstar(model_dir).base).__name__ == "LlamaForCausalLM"
    # the gate: the phase's own checks from the metrics, then the guard at allowed_loss over the input's suite
    gate = {c.name: c for c in result.gate}
    assert set(gate) == GATE | {"keeps_arith", "keeps_logic"}
    assert gate["compression_vs_fp32"].value == metrics["compression_vs_fp32"]
    assert gate["ppl_ratio_upper_bound"].value == metrics["ppl_ratio_upper_bound"]
    report = json.loads((ctx.dir / "report.json").read_text())
    from forgelib.phases.bitnet import ppl_ratio_bound

    assert metrics["ppl_ratio_upper_bound"] == round(ppl_ratio_bound(report["test"], 0.95), 4)
    guard = json.loads((ctx.dir / "guard.json").read_text())
    assert guard["margin"] == metrics["guard_margin"] == 0.4
    assert set(guard["families"]) == {"arith", "logic"}
    for family in ("arith", "logic"):
        row = guard["families"][family]
        assert gate[f"keeps_{family}"].bound == -0.4 and gate[f"keeps_{family}"].value == row["lower"]
        assert 8 <= row["n"] <= 16 and len(guard["answers"][family]["after"]) == row["n"]  # TINY_GUARD's sizes
    assert result.artifacts["guard"].endswith("guard.json")
