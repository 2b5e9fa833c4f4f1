"""Model loaders read hostile files: every size a file claims is checked against the file and the stored tensors
before anything is allocated, hashed or unpickled, and every refusal is one sentence naming the file and what is
wrong (``ModelLoadError``; ``ArtifactError`` / ``PackedModelError`` are kinds of it).

Each hostile file is a small valid one (an artifact, a packed folder, a plain folder of a 1-layer Llama) with its
header edited. ``guarded`` makes reaching the dangerous step itself a failure: building a model anywhere but on
the meta device, ``from_pretrained``, or ``torch.load``; and every refusal is timed (well under a second)."""
import base64
import json
import shutil
import struct
import time
import tracemalloc
import zlib

import pytest
import torch

from forgelib.modelio import ModelLoadError, load_model
from forgelib.quant.artifact import ArtifactError, _pack_meta, _unpack_meta, load_extras, save_compressed
from forgelib.quant.codecs import CODECS

FAST = 1.0  # seconds: every refusal here takes a few milliseconds (measured 1-30 ms)


class Reached(BaseException):
    """The dangerous step was reached (a BaseException, so no ``except Exception`` of the code under test hides it)."""


@pytest.fixture
def guarded(monkeypatch):
    """Fail the test the moment a model is built off the meta device, ``from_pretrained`` runs, or anything is
    unpickled."""
    from transformers import AutoModelForCausalLM

    build = AutoModelForCausalLM.from_config.__func__

    def from_config(cls, *args, **kwargs):
        if torch.get_default_device().type != "meta":
            raise Reached("a model was built for real")
        return build(cls, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise Reached("weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", classmethod(from_config))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(torch, "load", refuse)


def refused(error, match, call, *args, **kwargs) -> str:
    """The message of the ``error`` that ``call`` raises (matching ``match``) within ``FAST`` seconds."""
    started = time.perf_counter()
    with pytest.raises(error, match=match) as info:
        call(*args, **kwargs)
    assert time.perf_counter() - started < FAST
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    return message


def tiny_llama(layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=False)).eval()


def edit_json(file, **changes):
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def set_header_length(file, length: int) -> None:
    data = bytearray(file.read_bytes())
    data[:8] = struct.pack("<Q", length)
    file.write_bytes(bytes(data))


# --- artifacts --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A valid artifact of a 1-layer Llama with one extra per codec (an 8 x 16 matrix each)."""
    folder = tmp_path_factory.mktemp("artifact")
    extras = {name: torch.randn(8, 16, generator=torch.Generator().manual_seed(1)) for name in CODECS}
    save_compressed(tiny_llama(), folder / "m.forge", {f"extra::{n}": {"codec": n} for n in CODECS}, extras=extras)
    return folder / "m.forge"


def rewrite(artifact, target, edit=None, metadata: str | None = None):
    """A copy of ``artifact`` at ``target`` with its header edited by ``edit(header)`` (or its metadata string
    replaced by ``metadata``), the payload unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(artifact), "pt") as handle:
        header, payload = _unpack_meta(handle.metadata()["forge_artifact"]), handle.get_tensor("payload")
    if edit is not None:
        edit(header)
    save_file({"payload": payload}, str(target), metadata={"forge_artifact": metadata or _pack_meta(header)})
    return target


def test_an_artifact_config_claiming_huge_dimensions_is_refused_before_any_allocation(artifact, tmp_path, guarded):
    """The probe: a 304-byte artifact whose config claims huge dimensions made from_config ask for 65 GB. Now the
    config is built on the meta device and compared with the stored shapes first."""
    def huge(header):
        header["config"].update(hidden_size=2 ** 17, intermediate_size=2 ** 18, vocab_size=2 ** 17)

    message = refused(ArtifactError, "does not match the artifact's entries", load_model,
                      rewrite(artifact, tmp_path / "huge.forge", huge))
    assert "huge.forge" in message and "model.embed_tokens.weight is [131072, 131072] by the config" in message

    def layers(header):
        header["config"]["num_hidden_layers"] = 10 ** 6  # built even on the meta device, this takes minutes
    refused(ArtifactError, "num_hidden_layers=1000000, but the weights hold only", load_model,
            rewrite(artifact, tmp_path / "layers.forge", layers))


def test_a_zlib_bomb_header_is_inflated_only_up_to_the_cap(artifact, tmp_path):
    """The probe: a 2.7 MB header inflated to 4.5 GB, then KeyError 'entries'. Here 20 MiB of blanks
    compressed to ~20 KB: inflating stops at 16 MiB (+1 byte); the peak of Python allocations stays near that.
    (Measured by hand: the probe's 1 GiB bomb, compressed to 1 MB, is refused in 0.2 s.)"""
    packer = zlib.compressobj(9)
    chunk = b" " * (1 << 20)
    bomb = b"".join(packer.compress(chunk) for _ in range(20)) + packer.flush()
    target = rewrite(artifact, tmp_path / "bomb.forge", metadata=base64.b64encode(bomb).decode())
    tracemalloc.start()
    try:
        message = refused(ArtifactError, "inflates past 16777216 bytes", load_extras, target)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "bomb.forge" in message and peak < 40 << 20


@pytest.mark.parametrize("edit, match", [
    (lambda h: h.pop("entries"), "has no 'entries' and 'config' tables"),
    (lambda h: h["config"].pop("model_type"), "config has no model_type"),
    (lambda h: h["entries"]["model.norm.weight"]["parts"][0].__setitem__(1, "nn"), "not \\[name, dtype, shape"),
    (lambda h: h["entries"]["model.norm.weight"]["parts"][0].__setitem__(2, [10 ** 12]), "in 64 bytes"),
    (lambda h: h["entries"]["model.norm.weight"].__setitem__("shape", [-1]), "needs a codec name and a shape"),
    (lambda h: h["entries"]["model.norm.weight"].__setitem__("codec", "zip"), "unknown codec 'zip'"),
], ids=["no-entries", "no-model-type", "bad-dtype", "part-shape", "negative-shape", "unknown-codec"])
def test_a_malformed_artifact_header_is_named_not_a_traceback(artifact, tmp_path, edit, match, guarded):
    message = refused(ArtifactError, match, load_model, rewrite(artifact, tmp_path / "bad.forge", edit))
    assert "bad.forge" in message


def test_an_artifact_header_length_beyond_the_file_is_refused(artifact, tmp_path):
    for length in (10 ** 15, 2 ** 64 - 1):
        target = tmp_path / "long.forge"
        shutil.copy(artifact, target)
        set_header_length(target, length)
        assert "long.forge" in refused(ArtifactError, f"header length field says {length} bytes", load_extras, target)


def _limit_cases():
    """Every integer setting of every codec (bools are settings too, but carry no size)."""
    return [pytest.param(name, key, id=f"{name}-{key}") for name, codec in CODECS.items()
            for key, value in codec.defaults.items() if isinstance(value, int) and not isinstance(value, bool)]


@pytest.mark.parametrize("codec, key", _limit_cases())
def test_codec_settings_out_of_range_are_refused_when_written_and_when_read(artifact, tmp_path, codec, key):
    """The probe: bfp with mantissa_bits = 2**31 asked for 16 GB. Every integer setting of every codec has a range,
    checked on the spec written and on the metadata read."""
    from forgelib.quant.artifact import check_spec

    with pytest.raises(ValueError, match=f"tensor 'w': codec '{codec}': {key} must be"):
        check_spec("w", {"codec": codec, key: 2 ** 31})
    target = rewrite(artifact, tmp_path / "range.forge",
                     lambda h: h["entries"][f"extra::{codec}"].update({key: 2 ** 31}))
    message = refused(ArtifactError, f"{key} must be .*, got 2147483648", load_extras, target)
    assert message.startswith(str(target)) and f"'extra::{codec}'" in message


@pytest.mark.parametrize("codec", list(CODECS))
def test_an_entry_claiming_more_values_than_its_parts_hold_is_refused(artifact, tmp_path, codec):
    """An entry's shape a thousand times larger than what its parts encode: each codec's check sees it by
    arithmetic on the metadata and the parts' sizes, before decoding."""
    def grow(header):
        entry = header["entries"][f"extra::{codec}"]
        entry["shape"] = [entry["shape"][0] * 1000, *entry["shape"][1:]]

    message = refused(ArtifactError, f"tensor 'extra::{codec}' \\({codec}\\)", load_extras,
                      rewrite(artifact, tmp_path / "grown.forge", grow))
    assert "grown.forge" in message


def test_count_fields_of_the_metadata_must_fit_the_parts(artifact, tmp_path):
    """A block count inflated with the shape to match: the parts' byte counts no longer fit."""
    def grow(header):
        entry = header["entries"]["extra::bfp"]
        entry["n"] *= 1000
        entry["shape"] = [entry["shape"][0] * 1000, entry["shape"][1]]

    refused(ArtifactError, "part 'mant' holds 48 values where the metadata implies 48000", load_extras,
            rewrite(artifact, tmp_path / "count.forge", grow))


# --- packed folders ---------------------------------------------------------------------------------------------


@pytest.fixture
def packed(tmp_path):
    from forgelib.quant import convert_to_bitnet, export_packed

    export_packed(convert_to_bitnet(tiny_llama()), tmp_path / "packed", "2bit")
    return tmp_path / "packed"


@pytest.mark.parametrize("length", [10 ** 15, 2 ** 64 - 1])
def test_a_packed_header_length_beyond_the_file_is_refused(packed, length, guarded):
    """The probe: load_packed with a header length of 10**15 or 2**64-1 raised MemoryError / OverflowError."""
    from forgelib.quant import PackedModelError, header_bytes

    set_header_length(packed / "model.safetensors", length)
    message = refused(PackedModelError, f"header length field says {length} bytes, but the file has only", load_model,
                      packed)
    assert str(packed / "model.safetensors") in message
    refused(PackedModelError, "does not fit the file's", header_bytes, packed / "model.safetensors")


def test_a_packed_config_claiming_huge_dimensions_is_refused_before_the_model_is_built(packed, guarded):
    from forgelib.quant import PackedModelError

    edit_json(packed / "config.json", hidden_size=2 ** 16, intermediate_size=2 ** 17, vocab_size=2 ** 17)
    message = refused(PackedModelError, "the config does not match model.safetensors", load_model, packed)
    assert "model.embed_tokens.weight is [131072, 65536] by the config but [64, 32]" in message


# --- plain folders ----------------------------------------------------------------------------------------------


@pytest.fixture
def plain(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "plain")
    return tmp_path / "plain"


@pytest.mark.parametrize("changes, match", [
    ({"hidden_size": 2 ** 15, "intermediate_size": 2 ** 16, "vocab_size": 2 ** 16},
     "model.embed_tokens.weight is \\[65536, 32768\\] by the config but \\[64, 32\\] in model.safetensors"),
    ({"num_hidden_layers": 10 ** 6}, "num_hidden_layers=1000000, but the weights hold only 12 tensors"),
    ({"intermediate_size": 48}, "mlp.gate_proj.weight is \\[48, 32\\] by the config but \\[64, 32\\]"),
    ({"num_hidden_layers": 2}, "9 tensors of the model are not stored"),  # was: loaded, layer 2 random
    ({"num_attention_heads": 0}, "config.json cannot be read as a model configuration \\(ZeroDivisionError"),
    ({"vocab_size": -1}, "does not describe a causal LM that can be built here"),
], ids=["huge-dimensions", "huge-layer-count", "other-width", "more-layers", "broken-config", "negative-size"])
def test_a_config_that_does_not_match_the_weights_is_refused_before_loading(plain, changes, match, guarded):
    """The probe: a huge config.json beside tiny weights allocated until a 6 GB cap; a config with a layer more than
    the weights loaded with that layer randomly initialised."""
    edit_json(plain / "config.json", **changes)
    assert str(plain) in refused(ModelLoadError, match, load_model, plain)


def test_a_pickle_checkpoint_is_never_unpickled(plain, guarded):
    (plain / "model.safetensors").rename(plain / "pytorch_model.bin")  # torch.load would be the first to run
    message = refused(ModelLoadError, "pytorch_model.bin is a pickle checkpoint, never loaded here", load_model, plain)
    assert "safe_serialization=True" in message


def test_a_truncated_safetensors_file_names_the_tensors_it_lost(plain, guarded):
    data = (plain / "model.safetensors").read_bytes()
    (plain / "model.safetensors").write_bytes(data[:-1000])
    message = refused(ModelLoadError, "model.safetensors is truncated .* lie past its end", load_model, plain)
    assert "model.norm.weight" in message


def test_a_shard_index_may_name_only_files_of_the_folder(plain, guarded):
    (plain / "model.safetensors").unlink()
    (plain / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    refused(ModelLoadError, "names shard '../../etc/passwd', which is not a file of the folder", load_model, plain)


def test_a_huge_or_malformed_config_json_is_refused_unread(plain, guarded):
    (plain / "config.json").write_bytes(b"[" * 2_000_000)
    refused(ModelLoadError, "config.json is 2000000 bytes, more than the 1048576", load_model, plain)
    (plain / "config.json").write_bytes(b"[" * 100_000)  # deep nesting: RecursionError in the parser
    refused(ModelLoadError, "config.json is not valid JSON", load_model, plain)
    (plain / "config.json").write_text("[1, 2]")
    refused(ModelLoadError, "config.json must hold a JSON object, got a list", load_model, plain)


def test_a_folder_that_is_no_model_is_named_without_listing_it(tmp_path):
    """The probe: an error about a model folder at /etc listed /etc's contents."""
    (tmp_path / "private-notes.txt").write_text("not for the error message")
    message = refused(ModelLoadError, "has no config.json: not a Hugging Face model folder", load_model, tmp_path)
    assert "private-notes" not in message and str(tmp_path) in message


# --- Quiet-STaR ----------------------------------------------------------------------------------------------------


@pytest.fixture
def quietstar(tmp_path):
    """A Quiet-STaR tiny Llama saved as a folder and as an artifact (a 4 ms tokenizer with the thought tokens)."""
    from forgelib.data.tokenizer import train_tokenizer
    from forgelib.modelio import save_model
    from forgelib.quietstar import QuietStarConfig, QuietStarModel
    from helpers import tiny_task_llama

    tok = train_tokenizer(["12+7=19", "sort 3,1,2"], vocab_size=300)
    model = QuietStarModel(tiny_task_llama(tok), tok, QuietStarConfig(n_thought=2))
    save_model(model, tmp_path / "folder", tokenizer=tok)
    save_model(model, tmp_path / "artifact", tokenizer=tok, plan={})
    return tmp_path


@pytest.mark.parametrize("changes, match", [
    ({"mixing_hidden": 2 ** 40}, "mixing_hidden 1099511627776 does not match the stored mixing head "
                                 "\\(mixing_head.0.weight \\[64, 64\\]\\)"),
    ({"bogus": 1}, "invalid Quiet-STaR settings \\(.*'bogus'"),
], ids=["huge-mixing-head", "unknown-setting"])
def test_quietstar_settings_are_checked_against_the_stored_head_before_the_wrapper_is_built(
        quietstar, monkeypatch, changes, match):
    """A Quiet-STaR mixing head is as wide as its settings say: a hostile width is refused before the wrapper (and
    its Linear layers) is built, in a folder (quietstar.json) and in an artifact (its 'quietstar' table)."""
    import forgelib.modelio as modelio

    def built(*args, **kwargs):
        raise Reached("the Quiet-STaR wrapper was built")

    monkeypatch.setattr(modelio, "QuietStarModel", built)
    meta = json.loads((quietstar / "folder" / "quietstar.json").read_text())
    edit_json(quietstar / "folder" / "quietstar.json", config={**meta["config"], **changes})
    assert "quietstar.json" in refused(ModelLoadError, match, load_model, quietstar / "folder")
    artifact = rewrite(quietstar / "artifact" / "model.forge", quietstar / "artifact" / "hostile.forge",
                       lambda h: h["quietstar"]["config"].update(changes))
    assert "hostile.forge" in refused(ArtifactError, match, load_model, artifact)
