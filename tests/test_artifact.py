"""One-file compressed artifacts: bit packing against a reference, the artifact round trip gives the logits of the
model compressed in memory, and the bit accounting equals the bytes on disk."""
import copy
import math

import pytest
import torch

from forgelib.quant.artifact import (_decode, _encode, artifact_report, load_compressed, pack_bits, save_compressed,
                                     unpack_bits)


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
    return plan


def test_the_artifact_gives_the_logits_of_the_model_compressed_in_memory(tiny_llama, tmp_path):
    from forgelib.quant import convert_to_bitnet

    convert_to_bitnet(tiny_llama)
    plan = _plan(tiny_llama)
    report = save_compressed(tiny_llama, tmp_path / "model.forge", plan)
    loaded = load_compressed(tmp_path / "model.forge")
    expected = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for name, tensor in expected.state_dict().items():
            stored, meta = _encode(name, tensor, plan.get(name, {}))
            tensor.copy_(_decode(name, stored, meta))
    ids = torch.randint(0, 64, (2, 9))
    assert torch.allclose(loaded(input_ids=ids).logits, expected(input_ids=ids).logits, atol=1e-5)
    assert loaded.generate(ids[:1, :3], max_new_tokens=4, do_sample=False).shape == (1, 7)
    # the ternary layers keep exactly the codes of the original model
    from forgelib.quant.bitnet import ternary_quantize

    original = dict(tiny_llama.named_parameters())
    for name, param in loaded.named_parameters():
        if name in plan and plan[name]["codec"] == "ternary":
            assert torch.equal(ternary_quantize(param)[0], ternary_quantize(original[name])[0])
    assert report["bits_per_weight"] < 8


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
        codec = plan.get(name, {}).get("codec", "raw16")
        if codec == "ternary":
            assert per[name] == math.ceil(n / 5) + 4  # base-3: 5 codes per byte, one fp32 scale
        elif codec == "rtn":
            groups = tensor.shape[0] * math.ceil(tensor.shape[1] / 16)
            assert per[name] == math.ceil(groups * 16 * 4 / 8) + groups * 2
        elif codec == "seedlm":
            blocks = math.ceil(n / 8)
            assert per[name] == math.ceil(blocks * 8 / 8) + math.ceil(blocks * 3 * 4 / 8) + math.ceil(blocks * 4 / 8)
        else:
            assert per[name] == 2 * n
    assert report["bits_per_weight"] == pytest.approx(8 * report["file_bytes"] / report["weights"])
