"""A generation playground across phases: pick any model of a chain (Phase 1's trunk to Phase 8's artifact), type a
question, set the decoding, and see what each phase's machinery did: the tool calls, the cycles ACT spent on each
token (Cognate models), the thought before each answer token and its mixing weight (Quiet-STaR models, when
thinking), and the expert pass 1 chose (Phases 7 and 8).

``trace_answer`` is the static form (a dict); ``phase_playground`` the widget built on it.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any


def _act_cycles(lm, tokenizer, prompt: str, answer_ids: list[int]) -> list[tuple[str, int]] | None:
    """Cycles ACT used on each answer token (the model run once on prompt + answer), None without ACT."""
    import torch

    from ..data.tokenizer import encode_prompts

    if not getattr(lm.config, "use_act", False):
        return None
    row = encode_prompts(tokenizer, [prompt])[0]
    ids = torch.tensor([row + answer_ids], device=next(lm.parameters()).device)
    with torch.no_grad():
        out = lm(input_ids=ids)
    cycles = getattr(out, "act_cycles", None)
    if cycles is None:
        return None
    tail = cycles[0, len(row) - 1:len(row) - 1 + len(answer_ids)].tolist()  # the step that produced each token
    return [(tokenizer.decode([t]), int(c)) for t, c in zip(answer_ids, tail)]


def trace_answer(entry: dict, question: str, max_new_tokens: int = 40, temperature: float = 0.0,
                 think: bool = False) -> dict[str, Any]:
    """One model's answer with its trace: ``text``, ``calls`` (tool calls), ``act`` (token, cycles), ``thoughts``
    (token, thought, weight) when ``think`` on a Quiet-STaR model, ``expert`` (pass 1's choice) where the model
    has experts (None when pass 1 chose one of the router's base centroids: the base model answers). ``entry``: a row
    of ``forgelib.scorecard.chain_models``."""
    from transformers import AutoTokenizer

    from ..scorecard import ScorecardParams, _system
    from ..thoughts import QuietStarModel, base_lm, generate_with_thoughts
    from ..modelio import load_lm
    from ..tools import generate_with_tools

    model = load_lm(entry["path"])
    tokenizer = AutoTokenizer.from_pretrained(entry["path"])
    lm = base_lm(model)
    system = _system(entry, tokenizer, [], ScorecardParams(max_new_tokens=max_new_tokens))
    out: dict[str, Any] = {"model": f"{entry['number']} {entry['phase']}/{entry['role']}", "expert": None,
                           "thoughts": None, "calls": [], "act": None}
    svf = None
    if system.experts:
        from ..experts import SVFConfig, apply_svf
        from ..experts.discover import question_features, route
        from ..experts.train import base_weights

        svf = apply_svf(lm, SVFConfig(**system.svf_config))
        with base_weights(svf):
            chosen = int(route(question_features(svf, tokenizer, [question]), system.centroids)[0])
        if chosen < len(system.experts):  # else a base centroid (a family no expert trained for): the base answers
            out["expert"] = chosen
            svf.load_z(system.experts[chosen])
    try:
        if think and isinstance(model, QuietStarModel):
            trace = generate_with_thoughts(model, tokenizer, question, max_new_tokens)
            out["text"], ids = trace.text, trace.token_ids
            out["thoughts"] = [(s["token"], s["thought"], round(s["weight"], 3)) for s in trace.steps]
        else:
            trace = generate_with_tools(svf or lm, tokenizer, [question], max_new_tokens, temperature=temperature)[0]
            out["text"], out["calls"] = trace.text, trace.calls
            ids = tokenizer(trace.text, add_special_tokens=False).input_ids
        out["act"] = _act_cycles(svf or lm, tokenizer, question, ids)
    finally:
        if svf is not None:
            from ..experts import remove_svf

            remove_svf(svf)
    return out


def trace_lines(trace: dict) -> list[str]:
    lines = [f"{trace['model']}: {trace['text']!r}"]
    if trace["expert"] is not None:
        lines.append(f"  pass 1 chose expert {trace['expert']}")
    for call in trace["calls"]:
        lines.append(f"  tool call {call.get('expr')!r} -> {call.get('result')!r}")
    if trace["act"]:
        lines.append("  ACT cycles per token: " + " ".join(f"{t!r}:{c}" for t, c in trace["act"]))
    if trace["thoughts"]:
        lines += [f"  before {t!r}: thought {th!r}, mixing weight {w}" for t, th, w in trace["thoughts"]]
    return lines


def phase_playground(session: str | None = None, folder: str | Path | None = None, question: str = "57+38="):
    """Widget: a model of the chain, a question, max new tokens, temperature, thinking on/off; Run (or Enter)."""
    import ipywidgets as w

    from ..scorecard import chain_models, latest_session, session_models

    entries = chain_models(folder) if folder is not None else session_models(session or latest_session())
    pick = w.Dropdown(options=[(f"{e['number']} {e['phase']}/{e['role']}", i) for i, e in enumerate(entries)],
                      value=len(entries) - 1, description="model")
    text = w.Text(value=question, description="question", continuous_update=False, layout=w.Layout(width="60%"))
    tokens = w.IntSlider(value=40, min=4, max=128, description="max tokens")
    temperature = w.FloatSlider(value=0.0, min=0.0, max=1.5, step=0.1, description="temperature")
    think = w.Checkbox(value=False, description="think (Quiet-STaR models)")
    button = w.Button(description="Run")
    out = w.HTML()

    def run(change=None):
        trace = trace_answer(entries[pick.value], text.value, tokens.value, temperature.value, think.value)
        out.value = "<pre>" + html.escape("\n".join(trace_lines(trace))) + "</pre>"
        box.last_trace = trace

    box = w.VBox([pick, text, w.HBox([tokens, temperature, think, button]), out])
    text.observe(run, names="value")
    button.on_click(run)
    run()
    box.controls = {"model": pick, "question": text, "max_tokens": tokens, "temperature": temperature,
                    "think": think, "run": button, "out": out}
    return box
