"""Model loaders read hostile files: every size a file claims is checked against the file and the stored tensors
before anything is allocated, hashed or unpickled, and every refusal is one sentence naming the file and what is
wrong (``ModelLoadError``; ``ArtifactError`` / ``PackedModelError`` are kinds of it).

Each hostile file is a small valid one (an artifact, a packed folder, a plain folder of a 1-layer Llama) with its
header edited. ``guarded`` makes reaching the dangerous step itself a failure: building a model anywhere but on
the meta device, ``from_pretrained``, or ``torch.load``; and every refusal is timed (well under a second)."""
import json
import struct
import time

import pytest
import torch

from forgelib.modelio import ModelLoadError, load_model

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
    message = refused(ModelLoadError, "pytorch_model.bin is a pickle checkpoint, which is never loaded here",
                      load_model, plain)
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
