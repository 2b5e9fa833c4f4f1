"""One-file compressed artifacts: bit packing against a reference, the artifact round trip gives the logits of the
model compressed in memory, and the bit accounting equals the bytes on disk."""
import copy
import math

import pytest
import torch

from forgelib.quant.artifact import (ArtifactError, _decode, _encode, load_compressed, load_extras, pack_bits,
                                     save_compressed, unpack_bits)


@pytest.mark.parametrize("width", [1, 3, 4, 12, 16])
def test_pack_bits_round_trips_and_matches_a_bit_string_reference(width):
    torch.manual_seed(width)
    values = torch.randint(0, 1 << width, (37,))
    packed = pack_bits(values, width)
    assert len(packed) == math.ceil(37 * width / 8)
    assert torch.equal(unpack_bits(packed, width, 37), values)
    stream = "".join(format(int(v), f"0{width}b")[::-1] for v in values)  # LSB first per value
    stream += "0" * (len(packed) * 8 - len(stream))
    want = [int(stream[i:i + 8][::-1], 2) for i in range(0, len(stream), 8)]
    assert packed.tolist() == want
    with pytest.raises(ValueError, match="must lie in"):
        pack_bits(torch.tensor([1 << width]), width)


def _plan(model):
    plan = {n: {"codec": "ternary"} for n, _ in model.named_parameters() if n.endswith("proj.weight")}
    plan["model.embed_tokens.weight"] = {"codec": "seedlm", "K": 8, "C": 8, "P": 3}
    plan["lm_head.weight"] = {"codec": "rtn", "bits": 4, "group": 16}
    plan["model.layers.0.mlp.down_proj.weight"] = {"codec": "vq", "v": 4, "codebook_bits": 4, "residual": True}
    plan["model.layers.1.mlp.down_proj.weight"] = {"codec": "hqq", "bits": 3, "group": 32}
    plan["model.layers.1.self_attn.o_proj.weight"] = {"codec": "hyper", "n": 2, "index_bits": 8}
    plan["model.layers.0.self_attn.o_proj.weight"] = {"codec": "bfp", "mantissa_bits": 3, "block": 8}
    plan["model.norm.weight"] = {"codec": "raw32"}
    return plan


def _compressed_in_memory(model, plan, hessians=None):
    expected = copy.deepcopy(model)
    with torch.no_grad():
        for name, tensor in expected.state_dict().items():
            parts, meta = _encode(name, tensor, plan.get(name, {}), (hessians or {}).get(name))
            tensor.copy_(_decode(name, parts, meta))
    return expected


def test_the_artifact_gives_the_logits_of_the_model_compressed_in_memory(tiny_llama, tmp_path):
    from forgelib.quant import convert_to_bitnet

    convert_to_bitnet(tiny_llama)
    plan = _plan(tiny_llama)
    hessians = {"model.layers.0.mlp.down_proj.weight": torch.rand(64) + 0.1}
    extras = {"expert_0.z": torch.randn(7), "router": torch.randn(2, 3)}
    report = save_compressed(tiny_llama, tmp_path / "model.forge", plan, hessians=hessians, extras=extras)
    loaded = load_compressed(tmp_path / "model.forge")
    expected = _compressed_in_memory(tiny_llama, plan, hessians)
    ids = torch.randint(0, 64, (2, 9))
    assert torch.allclose(loaded(input_ids=ids).logits, expected(input_ids=ids).logits, atol=1e-5)
    assert loaded.generate(ids[:1, :3], max_new_tokens=4, do_sample=False).shape == (1, 7)
    # the ternary layers keep exactly the codes of the original model
    from forgelib.quant.bitnet import ternary_quantize

    original = dict(tiny_llama.named_parameters())
    for name, param in loaded.named_parameters():
        if name in plan and plan[name]["codec"] == "ternary":
            assert torch.equal(ternary_quantize(param)[0], ternary_quantize(original[name])[0])
    back = load_extras(tmp_path / "model.forge")
    assert set(back) == set(extras)
    assert torch.allclose(back["router"], extras["router"].half().float())
    assert report["bits_per_weight"] < 8


def test_a_tied_head_is_stored_once_and_tied_again(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    report = save_compressed(model, tmp_path / "m.forge", {"model.embed_tokens.weight": {"codec": "rtn", "bits": 8}})
    loaded = load_compressed(tmp_path / "m.forge")
    assert "lm_head.weight" not in report["per_tensor_bytes"]
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 64, (1, 5))
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0.05)


def test_bit_accounting_equals_the_bytes_on_disk(tiny_llama, tmp_path):
    from forgelib.quant import convert_to_bitnet

    convert_to_bitnet(tiny_llama)
    plan = _plan(tiny_llama)
    report = save_compressed(tiny_llama, tmp_path / "model.forge", plan)
    assert report["file_bytes"] == (tmp_path / "model.forge").stat().st_size
    assert report["file_bytes"] == report["header_bytes"] + report["payload_bytes"]
    per = report["per_tensor_bytes"]
    for name, tensor in tiny_llama.state_dict().items():
        n = tensor.numel()
        spec = plan.get(name, {"codec": "raw16"})
        rows = tensor.shape[0]
        if spec["codec"] == "ternary":
            want = math.ceil(n / 5) + 4  # base-3: 5 codes per byte, one fp32 scale
        elif spec["codec"] == "rtn":
            groups = rows * math.ceil(tensor.shape[1] / 16)
            want = math.ceil(groups * 16 * 4 / 8) + groups * 2
        elif spec["codec"] == "hqq":
            groups = n // 32
            want = math.ceil(n * 3 / 8) + groups * 2 * 2  # codes, fp16 scale and zero per group
        elif spec["codec"] == "seedlm":
            blocks = math.ceil(n / 8)
            want = math.ceil(blocks * 8 / 8) + math.ceil(blocks * 3 * 4 / 8) + math.ceil(blocks * 4 / 8)
        elif spec["codec"] == "vq":
            vectors = n // 4
            want = rows * 2 + 2 * (16 * 4 * 2 + math.ceil(vectors * 4 / 8))  # row scales, two books + indices
        elif spec["codec"] == "hyper":
            want = math.ceil(n // 2 * 8 / 8) + rows * 2 * 2  # one 8-bit index per pair, fp16 (lo, hi) per row
        elif spec["codec"] == "bfp":
            blocks = math.ceil(n / 8)
            want = math.ceil(blocks * 8 * 3 / 8) + math.ceil(blocks * 4 / 8)  # 3-bit mantissas, 4-bit exponents
        elif spec["codec"] == "raw32":
            want = 4 * n
        else:
            want = 2 * n
        assert per[name] == want, name
    assert report["bits_per_weight"] == pytest.approx(8 * report["file_bytes"] / report["weights"])
    assert report["header_bytes"] < 2500  # the layout is zlib-compressed: small beside the payload


def test_a_tampered_or_foreign_file_fails_with_a_clear_error(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    save_compressed(tiny_llama, tmp_path / "m.forge")
    data = bytearray((tmp_path / "m.forge").read_bytes())
    (tmp_path / "cut.forge").write_bytes(bytes(data[:-100]))
    with pytest.raises(Exception, match="cut.forge"):
        load_compressed(tmp_path / "cut.forge")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ArtifactError, match="not an Agent Forge artifact"):
        load_compressed(tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        save_compressed(tiny_llama, tmp_path / "x.forge", {"model.norm.weight": {"codec": "zip"}})
    with pytest.raises(ValueError, match="has no setting"):
        save_compressed(tiny_llama, tmp_path / "x.forge", {"model.norm.weight": {"codec": "rtn", "bitz": 4}})
    assert (tmp_path / "m.forge").is_file() and not (tmp_path / "x.forge").exists()


def test_hqq_codec_matches_the_hqq_package():
    from forgelib.quant.codecs import hqq_dequantize, hqq_quantize, hqq_quantizer, rtn_dequantize, rtn_quantize

    Quantizer = hqq_quantizer()  # the package itself (installed beside the environment by make setup)

    torch.manual_seed(0)
    w = torch.randn(16, 64)
    ref_q, meta = Quantizer.quantize(w, nbits=3, group_size=32, optimize=True, axis=1, device="cpu",
                                     compute_dtype=torch.float32)
    ref = Quantizer.dequantize(ref_q, meta)
    ours = hqq_dequantize(hqq_quantize(w, 3, 32))
    assert torch.allclose(ours, ref, atol=0.01)  # equal up to the fp16 storage of scale and zero
    rtn_err = ((w - rtn_dequantize(rtn_quantize(w, 3, 32))) ** 2).mean()
    assert ((w - ours) ** 2).mean() < 1.5 * rtn_err


def test_block_floating_point_against_a_worked_example():
    from forgelib.quant.codecs import bfp_dequantize, bfp_quantize

    w = torch.tensor([[0.5, -0.25, 0.1, 0.0], [2.9, 1.0, -3.0, 0.2]])
    q = bfp_quantize(w, mantissa_bits=3, block=4, exp_bits=4)  # qmax 3
    # block 1: max 0.5 -> e = ceil(log2(0.5 / 3)) = -2, m = round(w * 4) = [2, -1, 0, 0]
    # block 2: max 3.0 -> e = 0, m = [3, 1, -3, 0]
    assert q["exp"].tolist() == [-2, 0]
    assert q["mant"].tolist() == [[2, -1, 0, 0], [3, 1, -3, 0]]
    assert torch.equal(bfp_dequantize(q), torch.tensor([[0.5, -0.25, 0.0, 0.0], [3.0, 1.0, -3.0, 0.0]]))
