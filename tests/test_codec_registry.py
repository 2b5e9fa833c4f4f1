"""The codec registry (``forgelib.quant.codecs``), over EVERY registered codec: a round trip through the artifact
keeps each codec's error under its bound (a bound a broken codec, zeros or a sign-only reconstruction, does not
meet), the bytes stored are the codec's layout computed here from its settings, a typo'd setting fails naming
itself, and the defaults are one table shared by the registry, the artifact and the quantize functions.

A codec added later is picked up by the parametrisation and fails here until it gets a bound (``BOUNDS``) and a
byte formula (``EXPECTED_BYTES``)."""
import inspect
import math

import pytest
import torch

from forgelib.quant import artifact
from forgelib.quant.codecs import CODECS, codec_defaults, get_codec, register_codec

ROWS, COLS = 64, 128
NAMES = list(CODECS)

# Relative Frobenius error ||decoded - w|| / ||w|| allowed at the codec's default settings on a seeded 64 x 128
# standard normal matrix (measured: rtn 0.096, hqq 0.074, bfp 0.263, seedlm 0.189, vq 0.257, hyper 0.198). A
# broken codec lands at 1.0 (zeros) or 0.606 (sign(w) * mean|w|, the best one-bit guess): every bound is at least
# BROKEN_FACTOR times below that. raw32 must be exact, raw16 within fp16 rounding, and ternary is checked on its
# codes and scale (its decoded latent is not codes * scale, see forgelib.quant.export.latent_from_ternary).
BOUNDS = {"rtn": 0.12, "hqq": 0.10, "bfp": 0.30, "seedlm": 0.23, "vq": 0.30, "hyper": 0.24}
EXACT = {"raw16", "raw32", "ternary"}
BROKEN_FACTOR = 2.0

# A second setting per codec with settings, so the byte formulas are checked off the defaults too.
OTHER_SETTINGS = {"rtn": {"bits": 3, "group": 64}, "hqq": {"bits": 2, "group": 64},
                  "bfp": {"mantissa_bits": 2, "block": 4, "exp_bits": 3}, "seedlm": {"K": 8, "C": 8, "P": 2},
                  "vq": {"v": 2, "codebook_bits": 5, "residual": True}, "hyper": {"n": 2, "index_bits": 8}}


def _bytes_rtn(rows, cols, s):
    groups = rows * math.ceil(cols / s["group"])  # each row padded to whole groups; one fp16 scale per group
    return math.ceil(groups * s["group"] * s["bits"] / 8) + 2 * groups


def _bytes_hqq(rows, cols, s):
    groups = rows * cols // s["group"]  # bits per code, fp16 scale and fp16 zero per group
    return math.ceil(rows * cols * s["bits"] / 8) + 2 * 2 * groups


def _bytes_bfp(rows, cols, s):
    blocks = math.ceil(rows * cols / s["block"])  # a mantissa per weight (padded block), an exponent per block
    return math.ceil(blocks * s["block"] * s["mantissa_bits"] / 8) + math.ceil(blocks * s["exp_bits"] / 8)


def _bytes_seedlm(rows, cols, s):
    blocks = math.ceil(rows * cols / s["C"])  # K-bit seed, P 4-bit coefficients, one 4-bit exponent per block
    return math.ceil(blocks * s["K"] / 8) + math.ceil(blocks * s["P"] * 4 / 8) + math.ceil(blocks * 4 / 8)


def _bytes_vq(rows, cols, s):
    vectors, stages = rows * cols // s["v"], 2 if s["residual"] else 1  # a residual codebook: books and indices x2
    book = 2 ** s["codebook_bits"] * s["v"] * 2  # fp16 codebook entries
    return 2 * rows + stages * (book + math.ceil(vectors * s["codebook_bits"] / 8))  # + an fp16 scale per row


def _bytes_hyper(rows, cols, s):
    return math.ceil(rows * cols // s["n"] * s["index_bits"] / 8) + 2 * 2 * rows  # indices, fp16 (lo, hi) per row


EXPECTED_BYTES = {"raw16": lambda r, c, s: 2 * r * c, "raw32": lambda r, c, s: 4 * r * c,
                  "ternary": lambda r, c, s: math.ceil(r * c / 5) + 4,  # base-3, 5 codes a byte; fp32 scale
                  "rtn": _bytes_rtn, "hqq": _bytes_hqq, "bfp": _bytes_bfp, "seedlm": _bytes_seedlm, "vq": _bytes_vq,
                  "hyper": _bytes_hyper}


def _matrix():
    return torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(0))


def _rel(approx, w):
    return float((approx - w).norm() / w.norm())


def _settings_cases():
    cases = [(n, {}) for n in NAMES] + [(n, s) for n, s in OTHER_SETTINGS.items() if n in CODECS]
    return [pytest.param(n, s, id=f"{n}-" + ("-".join(f"{k}{v}" for k, v in s.items()) or "defaults"))
            for n, s in cases]


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_through_the_artifact_is_within_the_codecs_bound(name, tiny_llama, tmp_path):
    """The matrix stored as an extra of a tiny real model, read back by load_extras: the container gives exactly the
    codec's own decode, and the error is under the codec's bound, which zeros and sign(w) * mean|w| miss."""
    from forgelib.quant.bitnet import ternary_dequantize, ternary_quantize

    w = _matrix()
    report = artifact.save_compressed(tiny_llama, tmp_path / "m.forge", {"extra::w": {"codec": name}},
                                      extras={"w": w})
    back = artifact.load_extras(tmp_path / "m.forge")["w"]
    codec = get_codec(name)
    direct = codec.decode(*codec.encode(w, codec.settings({}), None), (ROWS, COLS))
    assert back.shape == w.shape and back.dtype == torch.float32 and torch.equal(back, direct)
    assert report["per_tensor_bytes"]["extra::w"] == EXPECTED_BYTES[name](ROWS, COLS, codec_defaults(name))
    if name == "raw32":
        assert torch.equal(back, w)
    elif name == "raw16":
        assert torch.allclose(back, w, rtol=2.0 ** -11, atol=2.0 ** -24) and not torch.equal(back, w)
    elif name == "ternary":  # the codes and the scale come back exactly
        codes, scale = ternary_quantize(w)
        got_codes, got_scale = ternary_quantize(back)
        assert torch.equal(got_codes, codes) and torch.equal(got_scale, scale)
        assert torch.equal(ternary_dequantize(got_codes, got_scale, torch.float32), ternary_dequantize(codes, scale,
                                                                                                       torch.float32))
    else:
        assert name in BOUNDS, f"codec {name!r} has no error bound in BOUNDS: add one (and its byte formula)"
        broken = min(_rel(torch.zeros_like(w), w), _rel(torch.sign(w) * w.abs().mean(), w))
        assert BOUNDS[name] * BROKEN_FACTOR <= broken  # the bound tells a working codec from a broken one
        assert _rel(back, w) < BOUNDS[name]


@pytest.mark.parametrize("name, settings", _settings_cases())
def test_the_bytes_stored_are_the_codecs_layout(name, settings):
    """Encode the matrix; the stored parts' bytes equal the layout computed here from the settings (defaults
    filled in from the table)."""
    assert name in EXPECTED_BYTES, f"codec {name!r} has no byte formula in EXPECTED_BYTES: add one"
    codec = get_codec(name)
    spec = {"codec": name, **settings}
    parts, meta = artifact._encode("w", _matrix(), artifact.check_spec("w", spec))
    stored = sum(p.numel() * p.element_size() for p in parts.values())
    assert stored == EXPECTED_BYTES[name](ROWS, COLS, codec.settings(spec))
    assert meta["codec"] == name and meta["shape"] == [ROWS, COLS]
    assert artifact._decode("w", parts, meta).shape == (ROWS, COLS)


@pytest.mark.parametrize("name", NAMES)
def test_a_typo_in_a_setting_fails_naming_it(name):
    with pytest.raises(ValueError) as err:
        artifact.check_spec("layer.w", {"codec": name, "bitz": 3})
    message = str(err.value)
    assert "'layer.w'" in message and repr(name) in message and "bitz" in message
    assert all(key in message for key in codec_defaults(name)) and (codec_defaults(name) or "none" in message)
    with pytest.raises(ValueError, match="bitz"):
        artifact._encode("layer.w", _matrix(), {"codec": name, "bitz": 3})
    for key in codec_defaults(name):  # every real setting passes, a near miss of it does not
        assert artifact.check_spec("layer.w", {"codec": name, key: codec_defaults(name)[key]})
        with pytest.raises(ValueError, match=f"{key}_"):
            artifact.check_spec("layer.w", {"codec": name, f"{key}_": 1})


def test_one_defaults_table_shared_by_the_registry_the_artifact_and_the_quantize_functions():
    from forgelib.quant import codecs

    assert tuple(CODECS) == artifact.CODECS
    assert set(CODECS) >= {"raw16", "raw32", "ternary", "rtn", "hqq", "bfp", "seedlm", "vq", "hyper"}
    table = codec_defaults()
    assert list(table) == list(CODECS)
    for name, codec in CODECS.items():
        assert codec.name == name and dict(codec.defaults) == table[name] == codec_defaults(name)
        assert codec.settings({"codec": name}) == table[name]
    assert table["rtn"] == {"bits": 4, "group": 32} and table["hqq"] == {"bits": 4, "group": 32}
    assert table["hyper"] == {"n": 4, "index_bits": 12}
    assert table["vq"] == {"v": 4, "codebook_bits": 8, "residual": False}
    quantizers = {"rtn": codecs.rtn_quantize, "hqq": codecs.hqq_quantize, "bfp": codecs.bfp_quantize,
                  "vq": codecs.vq_quantize, "hyper": codecs.hyper_quantize}
    for name, fn in quantizers.items():
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in table[name]} == table[name], name
    codec_defaults("rtn")["bits"] = 99  # a copy: the table does not change
    assert CODECS["rtn"].defaults["bits"] == 4
    with pytest.raises(TypeError):
        CODECS["rtn"].defaults["bits"] = 99  # read-only


def test_an_unknown_codec_and_a_second_registration_fail_clearly():
    with pytest.raises(ValueError, match="unknown codec 'zip'; valid: " + ", ".join(CODECS)):
        get_codec("zip")
    with pytest.raises(ValueError, match="tensor 'layer.w': unknown codec 'zip'"):
        artifact.check_spec("layer.w", {"codec": "zip"})
    with pytest.raises(ValueError, match="registered twice"):
        register_codec("rtn", {})(type("Again", (), {"encode": None, "decode": None}))
    with pytest.raises(artifact.ArtifactError, match="unknown codec 'zip' in the artifact"):
        artifact._decode("w", {}, {"codec": "zip", "shape": [1]})
