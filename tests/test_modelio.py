"""forgelib.modelio, the one way in and out: every kind of model folder written by ``save_model`` is told apart by
``model_kind`` and read back by ``load_model`` as a model that computes the same logits."""
import pytest
import torch

from forgelib.modelio import ModelLoadError, load_model, model_kind, save_model
from forgelib.quant import BitLinear, bitlinear_modules, convert_to_bitnet, packed_bitlinear_modules
from forgelib.quietstar import QuietStarConfig, QuietStarModel
from helpers import task_tokenizer


@pytest.fixture(scope="module")
def tok():
    return task_tokenizer()


def cognate(tok):
    from forgelib.models import CognateConfig, CognateForCausalLM

    torch.manual_seed(0)
    return CognateForCausalLM(CognateConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()


def logits(model, tok):
    enc = tok(["12+7=", "sort 3,1,2="], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return out.logits if hasattr(out, "logits") else out[0]


def test_a_plain_folder_round_trips(tok, tmp_path):
    model = cognate(tok)
    assert save_model(model, tmp_path / "m", tokenizer=tok) == {}
    assert model_kind(tmp_path / "m") == "hf"
    back = load_model(tmp_path / "m")
    assert not back.training and torch.equal(logits(back, tok), logits(model, tok))


def test_a_packed_ternary_folder_round_trips_packed_or_trainable(tok, tmp_path):
    model = convert_to_bitnet(cognate(tok))
    report = save_model(model, tmp_path / "p", packing="base3")
    shapes = [m.weight.shape for m in bitlinear_modules(model).values()]  # base-3: 5 codes per byte per matrix
    assert report["packed_bytes"] == sum(-(-(r * c) // 5) for r, c in shapes)
    assert model_kind(tmp_path / "p") == "packed"
    packed, trainable = load_model(tmp_path / "p"), load_model(tmp_path / "p", trainable=True)
    assert len(packed_bitlinear_modules(packed)) == 14
    assert all(isinstance(m, BitLinear) for m in bitlinear_modules(trainable).values())
    ref = logits(model, tok)
    assert torch.equal(logits(packed, tok), ref) and torch.equal(logits(trainable, tok), ref)


def test_a_quietstar_folder_round_trips(tok, tmp_path):
    torch.manual_seed(1)
    model = QuietStarModel(cognate(tok), tok, QuietStarConfig(n_thought=2)).eval()
    with torch.no_grad():
        model.thought_embeddings.normal_()
    save_model(model, tmp_path / "q", tokenizer=tok)
    assert model_kind(tmp_path / "q") == "quietstar"
    back = load_model(tmp_path / "q")
    assert isinstance(back, QuietStarModel)
    assert torch.equal(back.thought_embeddings, model.thought_embeddings)
    assert torch.equal(logits(back.base, tok), logits(model.base, tok))


def test_an_artifact_round_trips_within_its_codecs(tok, tmp_path):
    model = cognate(tok)
    report = save_model(model, tmp_path / "a", tokenizer=tok, plan={})  # every tensor raw16
    assert report["bits_per_weight"] == pytest.approx(16, rel=0.1)
    assert model_kind(tmp_path / "a") == "artifact" and model_kind(tmp_path / "a" / "model.forge") == "artifact"
    back = load_model(tmp_path / "a")
    ref = logits(model, tok)
    assert (logits(back, tok) - ref).abs().max() < 1e-2 * ref.abs().max()


def test_a_folder_that_is_no_model_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="does not exist"):
        model_kind(tmp_path / "missing")


def test_loading_is_quiet_unless_asked(tok, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    save_model(cognate(tok), tmp_path / "m")
    hf_logging.enable_progress_bar()
    load_model(tmp_path / "m")
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the setting it found is back


def test_models_loaded_from_two_threads_at_once_load_as_saved(tok, tmp_path):
    """forgelib.jobs runs jobs side by side in threads (the scorecard loads the chain's models that way): transformers'
    loading keeps global state (meta-device construction, weight tying), and two loads at once gave untied LM heads
    and ModelLoadErrors ('lm_head.weight ... not stored'); load_model loads one model at a time."""
    from concurrent.futures import ThreadPoolExecutor

    model = cognate(tok)
    save_model(model, tmp_path / "m")
    want = logits(model, tok)

    def load(_):
        back = load_model(tmp_path / "m")
        return back.lm_head.weight is back.get_input_embeddings().weight and torch.equal(logits(back, tok), want)

    with ThreadPoolExecutor(2) as pool:
        assert all(pool.map(load, range(8)))
