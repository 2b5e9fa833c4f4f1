"""The viz layer as a new user explores a finished run: the generation playground (re-runs on every change, a busy
line, the question echoed, the answer format explained, max tokens within the context), the model inspector
(packed ternary layers counted, Phase-7 expert scalings shown), the metrics explorer (several metrics, a kept
choice) and readable tables and plots. Widgets are driven through their controls; tiny real models only."""
import matplotlib
import pytest
import torch

matplotlib.use("Agg")

CONTEXT = 24
"""max_position_embeddings of the playground's tiny models: a small context, so the cap is cheap to reach."""


def _text(html_widget) -> str:
    import html

    return html.unescape(html_widget.value).removeprefix("<pre>").removesuffix("</pre>")


@pytest.fixture(scope="module")
def tok():
    from helpers import task_tokenizer

    return task_tokenizer()


def _tiny_lm(tok, seed: int, context: int = CONTEXT, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=context, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=tied)).eval()


@pytest.fixture(scope="module")
def entries(tok, tmp_path_factory):
    """Two chain entries (``forgelib.scorecard.chain_models`` rows) of two different tiny models."""
    root = tmp_path_factory.mktemp("chain")
    rows = []
    for number, phase, seed in ((1, "cognate", 0), (2, "evomerge", 1)):
        folder = root / phase
        _tiny_lm(tok, seed).save_pretrained(folder)
        tok.save_pretrained(folder)
        rows.append({"number": number, "phase": phase, "role": "model", "path": folder, "experts": None})
    return rows


@pytest.fixture
def chain_of(entries, monkeypatch):
    """``phase_playground(session="s")`` offers ``entries`` (the session's chain, as ``session_models`` reads it)."""
    monkeypatch.setattr("forgelib.scorecard.session_models", lambda session: entries)
    return entries


# --- the playground ------------------------------------------------------------------------------------


def test_playground_reruns_on_a_model_change_and_on_every_setting(chain_of):
    from forgelib.viz.playground import phase_playground

    box = phase_playground("s", question="2+3=")
    c = box.controls
    assert box.last_trace["model"] == "2 evomerge/model"
    c["model"].value = 0  # the same question, another model: answered again, under the new name
    assert box.last_trace["model"] == "1 cognate/model" and _text(c["out"]).startswith("1 cognate/model: 2+3=")
    c["max_tokens"].value = 3
    assert box.last_trace["max_new_tokens"] == 3
    before = box.last_trace
    c["temperature"].value = 0.5
    assert box.last_trace is not before
    before = box.last_trace
    c["think"].value = True
    assert box.last_trace is not before


def test_playground_shows_a_busy_line_echoes_the_question_and_explains_the_format(chain_of, monkeypatch):
    from forgelib.viz import playground

    seen = []
    real = playground.trace_answer

    def spy(*args, **kwargs):
        seen.append(_text(box.controls["out"]))
        return real(*args, **kwargs)

    box = playground.phase_playground("s", question="2+3=")
    monkeypatch.setattr(playground, "trace_answer", spy)
    box.controls["question"].value = "4*5="
    assert seen == ["running 2 evomerge/model on '4*5=' …"]  # while the model runs
    lines = _text(box.controls["out"]).splitlines()
    assert lines[0] == "2 evomerge/model: 4*5=" and lines[1].startswith("  answer: ")  # the question above
    legend = _text(box.controls["legend"])
    assert "'a;b#answer'" in legend and "'<|tool|>expr<|/tool|>' is a calculator call" in legend
    assert "'<|result|>' the value it returned" in legend
    assert not box.controls["run"].disabled


def test_max_tokens_is_capped_at_the_context_left_after_the_prompt(chain_of, tok):
    entries = chain_of
    from forgelib.data.tokenizer import encode_prompts
    from forgelib.viz.playground import phase_playground, trace_answer, trace_lines

    prompt = len(encode_prompts(tok, ["12+30="])[0])
    box = phase_playground("s", question="12+30=")
    c = box.controls
    assert c["max_tokens"].max == CONTEXT - prompt and c["max_tokens"].value == CONTEXT - prompt  # 40 clamped
    assert box.last_trace["max_new_tokens"] == CONTEXT - prompt
    trace = trace_answer(entries[0], "12+30=", max_new_tokens=500)  # the static form is capped too
    assert trace["max_new_tokens"] == CONTEXT - prompt and trace["capped"]
    assert f"max tokens cut to {CONTEXT - prompt}: the model's context is {CONTEXT} tokens" in "\n".join(
        trace_lines(trace))
    long_question = "1+" * 40 + "1="
    c["question"].value = long_question  # no room left: said in the answer's place, nothing generated
    text = _text(c["out"])
    assert "fills the model's 24-token context and leaves no room for an answer; shorten it" in text
    with pytest.raises(ValueError, match="shorten it"):
        trace_answer(entries[0], long_question)


def test_playground_loads_models_without_progress_bars(chain_of, capfd):
    from transformers.utils import logging as hf_logging

    from forgelib.viz.playground import phase_playground

    hf_logging.enable_progress_bar()
    try:
        box = phase_playground("s", question="2+3=")
        box.controls["model"].value = 0
    finally:
        hf_logging.disable_progress_bar()
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err
