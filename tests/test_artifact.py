"""One-file compressed artifacts: bit packing against a reference, the artifact round trip gives the logits of the
model compressed in memory, and the bit accounting equals the bytes on disk."""
import copy
import math
import struct

import time

import pytest
import torch

from forgelib.modelio import load_compressed
from forgelib.quant.artifact import ArtifactError, load_extras, pack_bits, save_compressed, unpack_bits


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


# --- references written here, independent of the artifact's _encode / _decode -----------------------------


def _ref_rtn(w, bits, group):
    """Round to nearest, one group of ``group`` weights of a row at a time: scale max|g| / (2^(bits-1) - 1) stored
    as fp16, codes rounded and clipped to [-2^(bits-1), 2^(bits-1) - 1]."""
    qmax = 2 ** (bits - 1) - 1
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], group):
            g = w[r, start:start + group]
            scale = (g.abs().max() / qmax).half().float()
            out[r, start:start + group] = torch.round(g / scale).clamp(-qmax - 1, qmax) * scale
    return out


def _ref_bfp(w, mantissa_bits, block, exp_bits=4):
    """Block floating point over the flattened weights: exponent e = ceil(log2(max|b| / qmax)) in [3 - 2^exp_bits,
    2], mantissas round(b / 2^e) clipped."""
    qmax = 2 ** (mantissa_bits - 1) - 1
    flat, out = w.reshape(-1), torch.empty(w.numel())
    for start in range(0, len(flat), block):
        b = flat[start:start + block]
        e = min(max(math.ceil(math.log2(float(b.abs().max()) / qmax)), 3 - 2 ** exp_bits), 2)
        out[start:start + block] = torch.round(b / 2.0 ** e).clamp(-qmax - 1, qmax) * 2.0 ** e
    return out.reshape(w.shape)


def _ref_hyper(w, n, index_bits):
    """Each group of n weights of a row, mapped to [0, 1] by the row's fp16 (min, max), replaced by the nearest of
    the points frac(k * (sqrt 2, sqrt 3, ...)), k < 2^index_bits, found by brute force."""
    primes = [2, 3, 5, 7][:n]
    points = torch.tensor([[math.modf(k * math.sqrt(p))[0] for p in primes] for k in range(1 << index_bits)],
                          dtype=torch.float64)
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        lo, hi = w[r].min().half().float(), w[r].max().half().float()
        u = ((w[r] - lo) / (hi - lo)).reshape(-1, n).double()
        nearest = points[((u[:, None, :] - points[None]) ** 2).sum(-1).argmin(1)]
        out[r] = lo + nearest.reshape(-1).float() * (hi - lo)
    return out


def _ref_ternary_codes(w):
    """Absmean ternary codes: round(w / mean|w|) clipped to [-1, 1]."""
    return torch.round(w / w.abs().mean()).clamp(-1, 1)


def _reference_tensor(name, tensor, spec, hessian=None):
    """The tensor as its codec leaves it, computed without the artifact: hand-written above for raw16, rtn, bfp and
    hyper; seedlm, vq and hqq from their codec modules' quantize / dequantize (tested against a textbook LFSR and
    a brute-force fit, and against the hqq package, in test_seedlm and below); a ternary layer keeps its latent
    weight (its BitLinear quantizes it in the forward: the codes are compared separately)."""
    from forgelib.quant.codecs import hqq_dequantize, hqq_quantize, vq_dequantize, vq_quantize
    from forgelib.quant.seedlm import SeedLMConfig, compress_matrix, decompress_matrix

    codec, t = spec.get("codec", "raw16"), tensor.detach().float()
    if codec == "raw16":
        return t.half().float()
    if codec in ("raw32", "ternary"):
        return t.clone()
    if codec == "rtn":
        return _ref_rtn(t, spec["bits"], spec["group"])
    if codec == "bfp":
        return _ref_bfp(t, spec["mantissa_bits"], spec["block"])
    if codec == "hyper":
        return _ref_hyper(t, spec["n"], spec["index_bits"])
    if codec == "seedlm":
        config = SeedLMConfig(K=spec["K"], C=spec["C"], P=spec["P"])
        return decompress_matrix(compress_matrix(t, config), config)
    if codec == "vq":
        q = vq_quantize(t, spec["v"], spec["codebook_bits"], hessian_diag=hessian, residual=spec["residual"])
        return vq_dequantize(q)
    assert codec == "hqq"
    return hqq_dequantize(hqq_quantize(t, spec["bits"], spec["group"]))


def _expected_bytes(tensor, spec):
    """The payload bytes of one tensor under its codec, from the codec's layout."""
    n, rows = tensor.numel(), tensor.shape[0]
    codec = spec.get("codec", "raw16")
    if codec == "ternary":
        return math.ceil(n / 5) + 4  # base-3: 5 codes per byte, one fp32 scale
    if codec == "rtn":
        groups = rows * math.ceil(tensor.shape[1] / spec["group"])
        return math.ceil(groups * spec["group"] * spec["bits"] / 8) + groups * 2
    if codec == "hqq":
        groups = n // spec["group"]
        return math.ceil(n * spec["bits"] / 8) + groups * 2 * 2  # codes, fp16 scale and zero per group
    if codec == "seedlm":
        blocks = math.ceil(n / spec["C"])  # K-bit seeds, P 4-bit coefficients and a 4-bit exponent per block
        return math.ceil(blocks * spec["K"] / 8) + math.ceil(blocks * spec["P"] * 4 / 8) + math.ceil(blocks * 4 / 8)
    if codec == "vq":
        vectors, book = n // spec["v"], (1 << spec["codebook_bits"]) * spec["v"] * 2
        stages = 2 if spec.get("residual") else 1  # a residual codebook doubles books and indices
        return rows * 2 + stages * (book + math.ceil(vectors * spec["codebook_bits"] / 8))  # fp16 row scales
    if codec == "hyper":
        return math.ceil(n // spec["n"] * spec["index_bits"] / 8) + rows * 2 * 2  # indices, fp16 (lo, hi) per row
    if codec == "bfp":
        blocks = math.ceil(n / spec["block"])
        return math.ceil(blocks * spec["block"] * spec["mantissa_bits"] / 8) + math.ceil(blocks * 4 / 8)  # 4-bit exps
    return 4 * n if codec == "raw32" else 2 * n


def _file_header_bytes(path):
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


def test_the_artifact_gives_the_logits_of_the_model_compressed_in_memory(tiny_llama, tmp_path):
    """Every tensor read back equals its codec's result computed without the artifact (measured: equal; the
    uncompressed weights are 5e-3 to 3e-2 away), the logits equal the reference model's (measured 5e-8 apart; the
    uncompressed model's are 0.14 away at a logit scale of 0.37), and the bits per weight are those of the codecs'
    layouts plus the header (measured 3.39: 2.79 payload, 0.61 header)."""
    from forgelib.quant import convert_to_bitnet

    convert_to_bitnet(tiny_llama)
    plan = _plan(tiny_llama)
    hessians = {"model.layers.0.mlp.down_proj.weight": torch.rand(64) + 0.1}
    extras = {"expert_0.z": torch.randn(7), "router": torch.randn(2, 3)}
    report = save_compressed(tiny_llama, tmp_path / "model.forge", plan, hessians=hessians, extras=extras)
    loaded = load_compressed(tmp_path / "model.forge")
    expected = copy.deepcopy(tiny_llama)
    got = loaded.state_dict()
    with torch.no_grad():
        for name, tensor in expected.state_dict().items():
            spec = plan.get(name, {})
            reference = _reference_tensor(name, tensor, spec, hessians.get(name))
            if spec.get("codec") == "ternary":  # the ternary layers keep exactly the codes of the original model
                assert torch.equal(_ref_ternary_codes(got[name]), _ref_ternary_codes(reference)), name
                assert float(got[name].abs().mean()) == pytest.approx(float(reference.abs().mean()), rel=1e-6)
            else:
                assert torch.allclose(got[name], reference, rtol=0, atol=1e-6), name
            tensor.copy_(reference)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert loaded.generate(ids[:1, :3], max_new_tokens=4, do_sample=False).shape == (1, 7)
    back = load_extras(tmp_path / "model.forge")
    assert set(back) == set(extras)
    assert torch.equal(back["router"], extras["router"].half().float())
    # bits per weight: the codecs' payload from their layouts, plus the file's own header, over every stored value
    payload = sum(_expected_bytes(t, plan.get(n, {})) for n, t in tiny_llama.state_dict().items())
    payload += sum(2 * t.numel() for t in extras.values())  # extras: raw16
    weights = sum(t.numel() for t in tiny_llama.state_dict().values()) + sum(t.numel() for t in extras.values())
    assert report["weights"] == weights and report["payload_bytes"] == payload
    header = _file_header_bytes(tmp_path / "model.forge")
    assert report["bits_per_weight"] == pytest.approx(8 * (payload + header) / weights, rel=1e-12)


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
    started = time.perf_counter()
    report = save_compressed(tiny_llama, tmp_path / "model.forge", plan)
    wall = time.perf_counter() - started
    assert report["file_bytes"] == (tmp_path / "model.forge").stat().st_size
    # every entry's encode is timed, inside the call's own time
    assert set(report["encode_seconds"]) == set(tiny_llama.state_dict())
    assert all(s >= 0 for s in report["encode_seconds"].values()) and sum(report["encode_seconds"].values()) <= wall
    assert report["file_bytes"] == report["header_bytes"] + report["payload_bytes"]
    per = report["per_tensor_bytes"]
    for name, tensor in tiny_llama.state_dict().items():
        assert per[name] == _expected_bytes(tensor, plan.get(name, {})), name
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
    """Our codec gives the package's dequantized weights up to the fp16 storage of scale and zero (a bound derived
    per weight), and HQQ's optimizer earns its keep: its error is below plain asymmetric min-max rounding with the
    same bits and groups, written here (measured 0.0272 vs 0.0301, ratio 0.90; without the optimizer, as hqq's
    optimize=False, it is the min-max error exactly, ratio 1.00), which in turn beats symmetric RTN (0.0592)."""
    from forgelib.quant.codecs import hqq_dequantize, hqq_quantize, hqq_quantizer, rtn_dequantize, rtn_quantize

    Quantizer = hqq_quantizer()  # the package itself (installed beside the environment by make setup)

    torch.manual_seed(0)
    w = torch.randn(16, 64)
    ref_q, meta = Quantizer.quantize(w, nbits=3, group_size=32, optimize=True, axis=1, device="cpu",
                                     compute_dtype=torch.float32)
    ref = Quantizer.dequantize(ref_q, meta)
    q = hqq_quantize(w, 3, 32)
    ours = hqq_dequantize(q)
    # (c - z) s against (c - z16) s16: at most |c - z| |s - s16| + |s| |z - z16| per weight (float error aside)
    codes = q["codes"].reshape(-1, 32).float()
    scale, zero = meta["scale"].reshape(-1, 1).float(), meta["zero"].reshape(-1, 1).float()
    bound = ((codes - zero).abs() * (scale - scale.half().float()).abs()
             + scale.abs() * (zero - zero.half().float()).abs()).reshape(w.shape)
    assert bool(((ours - ref).abs() <= bound + 1e-5).all())  # measured: within 2e-7 of the bound, max 1.2e-3
    mse = lambda approx: float(((w - approx) ** 2).mean())  # noqa: E731
    groups = w.reshape(-1, 32)
    lo, hi = groups.amin(1, keepdim=True), groups.amax(1, keepdim=True)
    step = (hi - lo) / 7  # 3 bits: 8 levels from the group's min to its max
    min_max = (torch.round((groups - lo) / step).clamp(0, 7) * step + lo).reshape(w.shape)
    assert mse(ours) < 0.95 * mse(min_max)
    assert mse(min_max) < 0.6 * mse(rtn_dequantize(rtn_quantize(w, 3, 32)))


def test_block_floating_point_against_a_worked_example():
    from forgelib.quant.codecs import bfp_dequantize, bfp_quantize

    w = torch.tensor([[0.5, -0.25, 0.1, 0.0], [2.9, 1.0, -3.0, 0.2]])
    q = bfp_quantize(w, mantissa_bits=3, block=4, exp_bits=4)  # qmax 3
    # block 1: max 0.5 -> e = ceil(log2(0.5 / 3)) = -2, m = round(w * 4) = [2, -1, 0, 0]
    # block 2: max 3.0 -> e = 0, m = [3, 1, -3, 0]
    assert q["exp"].tolist() == [-2, 0]
    assert q["mant"].tolist() == [[2, -1, 0, 0], [3, 1, -3, 0]]
    assert torch.equal(bfp_dequantize(q), torch.tensor([[0.5, -0.25, 0.0, 0.0], [3.0, 1.0, -3.0, 0.0]]))
