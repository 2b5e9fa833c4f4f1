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

from ..params import cut, short


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


def load_entry(entry: dict) -> tuple[Any, Any]:
    """(model, tokenizer) of a chain entry (``forgelib.scorecard.chain_models``), loaded quietly."""
    from transformers import AutoTokenizer

    from ..modelio import load_lm

    return load_lm(entry["path"]), AutoTokenizer.from_pretrained(entry["path"])


def token_budget(model, tokenizer, question: str) -> tuple[int, int]:
    """(the most new tokens that still fit the model's context after ``question``'s prompt, that context length):
    generating past ``max_position_embeddings`` is what transformers warns about."""
    from ..data.tokenizer import encode_prompts
    from ..quietstar import base_lm

    context = int(getattr(base_lm(model).config, "max_position_embeddings", 0) or 0) or 2048
    return context - len(encode_prompts(tokenizer, [question])[0]), context


def trace_answer(entry: dict, question: str, max_new_tokens: int = 40, temperature: float = 0.0,
                 think: bool = False, loaded: tuple | None = None) -> dict[str, Any]:
    """One model's answer with its trace: ``question``, ``text``, ``calls`` (tool calls), ``act`` (token, cycles),
    ``thoughts`` (token, thought, weight) when ``think`` on a Quiet-STaR model, ``expert`` (pass 1's choice) where
    the model has experts (None when pass 1 chose one of the router's base centroids: the base model answers),
    ``max_new_tokens`` (capped at the context left after the prompt; ``capped`` says so). ``entry``: a row of
    ``forgelib.scorecard.chain_models``; ``loaded``: its ``load_entry`` when already loaded."""
    from ..scorecard import ScorecardParams, measuring_system
    from ..quietstar import base_lm

    model, tokenizer = loaded or load_entry(entry)
    budget, context = token_budget(model, tokenizer, question)
    if budget < 1:
        raise ValueError(f"the question is {context - budget} tokens: it fills the model's {context}-token context "
                         "and leaves no room for an answer; shorten it")
    lm = base_lm(model)
    system = measuring_system(entry, tokenizer, [], ScorecardParams(max_new_tokens=max_new_tokens))
    out: dict[str, Any] = {"model": entry_label(entry), "question": question, "expert": None, "thoughts": None,
                           "calls": [], "act": None, "max_new_tokens": min(max_new_tokens, budget),
                           "capped": max_new_tokens > budget, "context": context}
    svf = None
    if system.experts:
        svf = _route(lm, tokenizer, system, question, out)
    try:
        _generate(model, svf or lm, tokenizer, question, out, temperature, think)
    finally:
        if svf is not None:
            from ..experts import remove_svf

            remove_svf(svf)
    return out


def _route(lm, tokenizer, system, question: str, out: dict):
    """The model with its SVF experts applied and pass 1's expert loaded (``out["expert"]``; None: a base centroid,
    the base answers)."""
    from ..experts import SVFConfig, apply_svf
    from ..experts.discover import question_features, route
    from ..experts.train import base_weights

    svf = apply_svf(lm, SVFConfig(**system.svf_config))
    with base_weights(svf):
        chosen = int(route(question_features(svf, tokenizer, [question]), system.centroids)[0])
    if chosen < len(system.experts):  # else a base centroid (a family no expert trained for): the base answers
        out["expert"] = chosen
        svf.load_z(system.experts[chosen])
    return svf


def _generate(model, lm, tokenizer, question: str, out: dict, temperature: float, think: bool) -> None:
    """The answer (with thoughts when ``think`` on a Quiet-STaR model, else with the calculator) and the ACT cycles
    of its tokens, into ``out``."""
    from ..quietstar import QuietStarModel, generate_with_thoughts
    from ..tools import generate_with_tools

    budget = out["max_new_tokens"]
    if think and isinstance(model, QuietStarModel):
        trace = generate_with_thoughts(model, tokenizer, question, budget)
        out["text"], ids = trace.text, trace.token_ids
        out["thoughts"] = [(s["token"], s["thought"], round(s["weight"], 3)) for s in trace.steps]
    else:
        trace = generate_with_tools(lm, tokenizer, [question], budget, temperature=temperature)[0]
        out["text"], out["calls"], out["stop"], out["n_generated"] = trace.text, trace.calls, trace.stop, \
            trace.n_generated
        ids = tokenizer(trace.text, add_special_tokens=False).input_ids
    out["act"] = _act_cycles(lm, tokenizer, question, ids)


def entry_label(entry: dict) -> str:
    """``NUMBER PHASE/ROLE``: how the playground names a model of the chain."""
    return f"{entry['number']} {entry['phase']}/{entry['role']}"


ANSWER_FORMAT = ("How to read an answer: worked steps, then the answer: 'a;b#answer' (';' between steps, the answer "
                 "after '#'); '<|tool|>expr<|/tool|>' is a calculator call and '<|result|>' the value it returned.")


def trace_lines(trace: dict) -> list[str]:
    """The trace as text: the model and the question, the answer, then what the model's machinery did."""
    lines = [f"{trace['model']}: {cut(trace.get('question', ''))}", f"  answer: {trace['text']!r}"]
    if trace.get("capped"):
        lines.append(f"  (max tokens cut to {trace['max_new_tokens']}: the model's context is {trace['context']} "
                     "tokens, prompt included)")
    if trace["expert"] is not None:
        lines.append(f"  pass 1 chose expert {trace['expert']}")
    for call in trace["calls"]:
        lines.append(f"  tool call {call.get('expr')!r} -> {call.get('result')!r}")
    if trace["act"]:
        lines.append("  ACT cycles per token: " + " ".join(f"{t!r}:{c}" for t, c in trace["act"]))
    if trace["thoughts"]:
        lines += [f"  before {t!r}: thought {th!r}, mixing weight {w}" for t, th, w in trace["thoughts"]]
    return lines


def phase_playground(session: str | None = None, folder: str | Path | None = None, question: str = "57+38=",
                     entries: list[dict] | None = None):
    """Widget: a model of the chain, a question, max new tokens, temperature, thinking on/off. The answer runs again
    on Enter, on Run and whenever the model or a setting changes (except a max tokens that a greedy answer already
    ended within: the same answer); a busy line stands in its place meanwhile.
    ``entries``: the models to offer (default: the chain of ``folder`` or of ``session``)."""
    import ipywidgets as w

    from ..scorecard import chain_models, latest_session, session_models

    if entries is None:
        entries = chain_models(folder) if folder is not None else session_models(session or latest_session())
    pick = w.Dropdown(options=[(entry_label(e), i) for i, e in enumerate(entries)], value=len(entries) - 1,
                      description="model")
    text = w.Text(value=question, description="question", continuous_update=False, layout=w.Layout(width="60%"))
    tokens = w.IntSlider(value=40, min=1, max=128, description="max tokens", continuous_update=False)
    temperature = w.FloatSlider(value=0.0, min=0.0, max=1.5, step=0.1, description="temperature",
                                continuous_update=False)
    think = w.Checkbox(value=False, description="think (Quiet-STaR models)")
    button = w.Button(description="Run")
    out, legend = w.HTML(), w.HTML(_pre(ANSWER_FORMAT))
    box = w.VBox([pick, text, w.HBox([tokens, temperature, think, button]), out, legend])
    box.controls = {"model": pick, "question": text, "max_tokens": tokens, "temperature": temperature,
                    "think": think, "run": button, "out": out, "legend": legend}
    state: dict[str, Any] = {"key": None, "loaded": None, "quiet": False}

    def run(change=None):
        if not state["quiet"]:  # quiet: the slider's own clamp to the context, not a user's change
            _play(box, entries, state)

    def new_budget(change=None):
        if not state["quiet"] and not _same_answer(box, state):
            _play(box, entries, state)

    for control in (pick, text, temperature, think):
        control.observe(run, names="value")
    tokens.observe(new_budget, names="value")
    button.on_click(run)
    run()
    return box


def _pre(text: str) -> str:
    return "<pre>" + html.escape(text) + "</pre>"


def _loaded(entries: list[dict], index: int, state: dict) -> tuple:
    """The chosen model and tokenizer, loaded once while it stays chosen (the previous one is let go)."""
    if state["key"] != index:
        state["loaded"] = None
        state["loaded"], state["key"] = load_entry(entries[index]), index
    return state["loaded"]


def _same_answer(box, state: dict) -> bool:
    """Whether a new max-tokens value cannot change the last answer: greedy decoding that ended at eos within the new
    budget gives the same answer again (the answer is shown with the new setting, nothing generated)."""
    c, last = box.controls, getattr(box, "last_trace", None)
    if not last or c["temperature"].value != 0 or c["think"].value or last.get("stop") != "eos" or \
            state.get("asked") != (c["model"].value, c["question"].value, 0.0, False):
        return False
    if last["n_generated"] > c["max_tokens"].value:
        return False
    box.last_trace = dict(last, max_new_tokens=c["max_tokens"].value, capped=False)
    return True


def _play(box, entries: list[dict], state: dict) -> None:
    """One run of the playground: the busy line, the max-tokens slider fitted to the context left after the
    question, then the question and the answer (or what is wrong with the question)."""
    c = box.controls
    entry, question = entries[c["model"].value], c["question"].value
    c["out"].value = _pre(f"running {entry_label(entry)} on {short(question)} …")
    c["run"].disabled = True
    try:
        model, tokenizer = _loaded(entries, c["model"].value, state)
        budget, _ = token_budget(model, tokenizer, question)
        state["quiet"] = True
        try:
            c["max_tokens"].max = max(1, budget)  # clamps the value too
        finally:
            state["quiet"] = False
        trace = trace_answer(entry, question, c["max_tokens"].value, c["temperature"].value, c["think"].value,
                             loaded=(model, tokenizer))
    except ValueError as exc:  # a question too long for the context
        c["out"].value = _pre(f"{entry_label(entry)}: {cut(question)}\n  {exc}")
        return
    except Exception as exc:
        c["out"].value = _pre(f"{entry_label(entry)}: {cut(question)}\n  failed: {type(exc).__name__}: "
                              f"{cut(str(exc), 200)}")
        raise
    finally:
        c["run"].disabled = False
    c["out"].value = _pre("\n".join(trace_lines(trace)))
    box.last_trace = trace
    state["asked"] = (c["model"].value, question, float(c["temperature"].value), bool(c["think"].value))
