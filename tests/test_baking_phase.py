"""Phase 6 on tiny real models: the gate read from a report (the gap closed's lower bound, earlier bakes'
adherence by paired non-inferiority), a run end to end on a ternary Quiet-STaR upstream (models handed on, every
metric the issue names, the input suite replayed and retained, the guard, the merged model still ternary and
loadable), a prompt without effect reported and not baked, and parameter errors that name what is wrong."""
import json

import pytest
import torch

from forgelib import paths
from helpers import quietstar_upstream, task_tokenizer
from forgelib.baking.gap import gap_bound, ratio_gap
from forgelib.phases.baking import Params, summarize


def _smoke(section):
    """A section of parameters/smoke.yaml as written."""
    import yaml

    return yaml.safe_load((paths.repo_root() / "parameters" / "smoke.yaml").read_text())[section]


@pytest.fixture(scope="module")
def tok():
    return task_tokenizer(["use calc: say Answer: "] * 20)


def _measured(acc, tool, persona, correct, adheres=None):
    adheres = adheres or {"calculator": [int(tool >= 0.5)] * len(correct),
                          "answer-style": [int(persona >= 0.5)] * len(correct)}
    return {"accuracy": acc, "adherence": {"calculator": tool, "answer-style": persona}, "correct": correct,
            "adheres": adheres, "copy_errors": 0}


# per held-out input: KL(prompted ‖ unbaked), KL(prompted ‖ baked), summed over its positions
HELD = {"calculator": ([2.0, 1.0, 3.0, 2.5, 1.5, 2.0] * 5, [0.2, 0.1, 0.4, 0.2, 0.3, 0.1] * 5),
        "answer-style": ([1.0, 0.5, 1.5, 1.2, 0.8, 1.0] * 5, [0.3, 0.2, 0.5, 0.3, 0.4, 0.2] * 5),
        "library": ([3.0, 2.0, 4.0, 3.5, 2.5, 3.0] * 5, [0.4, 0.3, 0.6, 0.5, 0.4, 0.4] * 5)}


def _gap(name, params):
    a, b = HELD[name]
    return gap_bound(name, a, b, params.min_gap_closed, params.gap_margin).as_row()


def _report(params, n=40):
    library = Params().prompts
    both = {"calculator": [1] * n, "answer-style": [1] * n}
    tool_only = {"calculator": [1] * n, "answer-style": [0] * n}
    return {"library": library,
            "input": {"none": _measured(0.5, 0.0, 0.0, [1, 0] * (n // 2))},
            "taught": {"none": _measured(0.5, 0.0, 0.0, [1, 0] * (n // 2)),
                       "all": _measured(0.75, 1.0, 1.0, [1, 1, 1, 0] * (n // 4))},
            "after": _measured(0.75, 1.0, 1.0, [1, 1, 1, 0] * (n // 4), dict(both)),
            "cycles": [{"prompt": "calculator", "gap": _gap("calculator", params), "adheres_after": tool_only},
                       {"prompt": "answer-style", "gap": _gap("answer-style", params), "adheres_after": both}],
            "passes": [{"after_cycle": 1, "gap": _gap("library", params)}],
            "drift": {"kl_per_token": 0.1}}


def test_gate_reads_the_report():
    params = Params(min_gap_closed=0.6, adherence_margin=0.1)
    metrics, checks = summarize(_report(params), params)
    gate = {c.name: c for c in checks}
    for name in ("calculator", "answer-style"):
        gap, lower, _ = ratio_gap(*HELD[name])
        assert metrics[f"gap_closed_{name}"] == round(gap, 4) and metrics[f"heldout_{name}"] == 30
        assert gate[f"gap_closed_{name}_lower_bound"].value == pytest.approx(lower, abs=1e-4)
        assert gate[f"gap_closed_{name}_lower_bound"].bound == 0.6 and gate[f"gap_closed_{name}_lower_bound"].op == ">"
    # gap closed 1 − 1.3/12, 1 − 1.9/6, 1 − 2.6/18 = 0.892 / 0.683 / 0.856, lower bounds 0.878 / 0.656 / 0.853
    assert metrics["gap_closed_calculator"] == round(1 - 1.3 / 12, 4)
    assert metrics["gap_closed_answer-style"] == round(1 - 1.9 / 6, 4)
    assert metrics["gap_closed_library"] == round(1 - 2.6 / 18, 4)
    assert gate["gap_closed_answer-style_lower_bound"].value == pytest.approx(0.6560, abs=1e-4)
    # earlier bakes retained: adherence 40/40 right after and at the end -> the Agresti-Min bound of a 0/0 table
    kept = gate["adherence_kept_calculator_lower_bound"]
    assert kept.bound == -0.1 and kept.value == pytest.approx(-1.6448536 / 42, abs=1e-4)  # se = sqrt(1/42 / 42)
    assert metrics["tool_use_rate_before"] == 0.0 and metrics["tool_use_rate_after"] == 1.0
    assert metrics["persona_adherence_before"] == 0.0 and metrics["persona_adherence_after"] == 1.0
    assert metrics["acc_retention"] == 1.5 and metrics["acc_after_minus_taught_prompted"] == 0.0
    assert {c.name for c in checks} == {"prompts_baked", "gap_closed_calculator_lower_bound",
                                        "gap_closed_answer-style_lower_bound", "gap_closed_library_lower_bound",
                                        "adherence_kept_calculator_lower_bound",
                                        "adherence_kept_answer-style_lower_bound"}
    assert all(c.passed for c in checks)
    # a target between a prompt's lower bound and its point estimate fails it (0.683 would clear 0.665; the
    # bound 0.656 does not)
    params = Params(min_gap_closed=0.665)
    _, checks = summarize(_report(params), params)
    assert {c.name for c in checks if not c.passed} == {"gap_closed_answer-style_lower_bound"}
    # an earlier bake lost: 8 of 40 questions no longer call the calculator at the end
    params = Params(min_gap_closed=0.6)
    report = _report(params)
    report["after"]["adheres"]["calculator"] = [0] * 8 + [1] * 32
    _, checks = summarize(report, params)
    failed = {c.name: c for c in checks if not c.passed}
    assert set(failed) == {"adherence_kept_calculator_lower_bound"}
    assert failed["adherence_kept_calculator_lower_bound"].value < -0.2
    # 2 of 40 lost: within the margin 0.1 by the point (-0.05), but 40 questions cannot show it: a note says how
    # many would
    report["after"]["adheres"]["calculator"] = [0] * 2 + [1] * 38
    _, checks = summarize(report, params)
    check = {c.name: c for c in checks}["adherence_kept_calculator_lower_bound"]
    assert not check.passed and "40 asked" in check.note and "needed" in check.note
    report = _report(params)
    report["cycles"], report["passes"] = [], []
    _, checks = summarize(report, params)
    assert [c.name for c in checks if not c.passed] == ["prompts_baked"]


SUITE = {"arith": [1, 1], "logic": [1, 1], "recall": [1, 2]}
"""What the tiny upstream "knows": the prompted family and two others, at their levels."""


def _upstream(tok, tmp_path, ternary=True):
    """A Phase-5-like upstream: a Quiet-STaR Llama with ternary (BitLinear) layers, fake-quantized latent weights
    (``ternary=False``: a plain Llama-style model), whose result names the suite ``SUITE``."""
    up = quietstar_upstream(tok, tmp_path / "curriculum", "curriculum", 5, "bk", ternary=ternary)
    up.suite = {f: list(v) for f, v in SUITE.items()}
    return up


TINY = {"families": ["arith"], "levels": [1, 1], "teach_steps": 60, "teach_batch_size": 8,
        "bake": {"steps": 6, "trajectories": 8, "batch_size": 4, "eval_every": 3},
        "calibration_per_level": 4, "retain_per_level": 3, "test_per_level": 6, "max_new_tokens": 14, "max_cycles": 2,
        "drift_per_level": 2, "gap_margin": 0.5, "gap_spread": 0.2, "max_heldout": 10}
"""First round of held-out inputs: ceil(((1.645 + 3.090) · 0.2 / 0.5)²) = 4, at most 10 in all."""
GUARD = {"margin": 0.5, "max_questions": 12}


def _run(session, up, extra=None):
    from forgelib.phases import open_phase

    overrides = {"run": {"quiet": True, "tracking": "jsonl"}, "baking": {**TINY, **(extra or {})}, "guard": GUARD}
    ctx = open_phase("baking", "parameters/smoke.yaml", overrides, session=session, upstream=up)
    return ctx, ctx.spec.load().run(ctx.params, ctx)


@pytest.mark.parametrize("ternary", [True, False], ids=["ternary", "llama"])
def test_phase_runs_end_to_end(tok, tmp_path, ternary, monkeypatch):
    """The run on a tiny upstream: teaching replays the whole input suite at its levels (share ``replay``), every
    bake retains the suite's other families and learns from the taught model with the prompts baked so far, the
    gap-closed checks are the lower bounds of the report's per-input KL values, the guard asks every suite family
    of the Phase-5 model and the handed-on one, and the handed-on model is merged (ternary stays ternary)."""
    from forgelib.phases import baking as phase
    from forgelib.quant.bitnet import BitLinear
    from forgelib.modelio import load_quietstar

    seen = {"teach": [], "bake": []}
    real_teach, real_bake = phase.teach_prompts, phase.bake_prompt

    def teach(*args, **kwargs):
        seen["teach"].append(kwargs)
        return real_teach(*args, **kwargs)

    def bake(model, prompt, *args, **kwargs):
        seen["bake"].append({"student": model, "prompt": prompt, **kwargs})
        return real_bake(model, prompt, *args, **kwargs)

    monkeypatch.setattr(phase, "teach_prompts", teach)
    monkeypatch.setattr(phase, "bake_prompt", bake)
    ctx, result = _run(f"bk-run-{ternary}", _upstream(tok, tmp_path, ternary), {"min_effect": 0.0})
    for key in ("gap_closed_calculator", "gap_closed_answer-style", "persona_adherence_before",
                "persona_adherence_after", "tool_use_rate_before", "tool_use_rate_after", "acc_retention", "drift_kl",
                "gap_closed_calculator_lower_bound", "gap_closed_library_lower_bound", "copy_errors_after"):
        assert key in result.metrics, key
    assert set(result.models) == {"taught", "model"}
    report = json.loads((ctx.dir / "report.json").read_text())
    assert report["suite"] == SUITE and report["unrelated"] == {"logic": [1, 1], "recall": [1, 2]}
    # teaching replays the suite's families the prompts do not target, at their levels, at the stated share (the
    # targeted ones are taught unprompted too)
    (taught_with,) = seen["teach"]
    assert taught_with["replay"] == {"logic": (1, 1), "recall": (1, 2)}
    assert taught_with["replay_share"] == ctx.params.replay == _smoke("baking")["replay"]  # the smoke set's share
    # the bakes: retain data = train questions of the other families at their levels (retain_per_level: 3 per family
    # and level, logic and recall both early in the shuffled list), the taught model as teacher, the prompts so far
    assert [b["prompt"] for b in seen["bake"]] == ["use calc: ", "use calc: say Answer: "]
    for b in seen["bake"]:
        retain = b["retain_data"]
        assert sorted((s.family, s.level) for s in retain) == sorted(
            [("logic", 1)] * 3 + [("recall", 1)] * 3 + [("recall", 2)] * 3)
        assert {s.family for s in retain[:6]} == {"logic", "recall"}
        assert b["teacher"] is not b["student"] and not hasattr(b["teacher"], "peft_config")
        assert len(b["eval_data"]) == 4 and {s.family for s in b["eval_data"]} == {"arith"}
    assert seen["bake"][0]["teacher"] is seen["bake"][1]["teacher"]  # one taught model for every cycle
    assert [c["prompt"] for c in report["cycles"]] == ["calculator", "answer-style"]  # alternating cycles
    assert [c["teacher_prompts"] for c in report["cycles"]] == [["calculator"], ["calculator", "answer-style"]]
    gate = {c.name: c for c in result.gate}
    for row in report["cycles"]:
        held = row["heldout"]
        gap, lower, spread = ratio_gap(held["kl_unbaked"], held["kl_baked"], 0.95)
        assert 4 <= row["gap"]["n"] == len(held["kl_unbaked"]) <= 10  # the first round, and more where needed
        assert row["gap"]["gap"] == pytest.approx(gap, abs=1e-6)
        assert row["gap"]["lower"] == pytest.approx(lower, abs=1e-6)
        assert row["gap_closed"] == pytest.approx(1 - row["kl_baked"] / row["kl_unbaked"])
        assert row["kl_unbaked"] == pytest.approx(sum(held["kl_unbaked"]) / sum(held["positions"]))
        check = gate[f"gap_closed_{row['prompt']}_lower_bound"]
        assert check.value == pytest.approx(lower, abs=1e-4) and check.bound == 0.5
        assert f"adherence_kept_{row['prompt']}_lower_bound" in gate
    curve = report["cycles"][0]["curve"]
    assert [p["step"] for p in curve] == [0, 3, 6] and report["cycles"][0]["curve_inputs"] == 4
    # the guard: every suite family asked of the Phase-5 model and the handed-on model
    guard = json.loads((ctx.dir / "guard.json").read_text())
    assert guard["suite"] == SUITE and guard["labels"] == ["phase-5 model", "phase-6 model"]
    assert {f"keeps_{f}" for f in SUITE} <= set(gate)
    assert all(gate[f"keeps_{f}"].value == guard["families"][f]["lower"] for f in SUITE)
    drift = report["drift"]
    assert drift["families"] == ["logic", "recall"] and drift["n"] == 6  # 2 per family and level
    logic_recall = [x for f in ("logic", "recall") for x in guard["answers"][f]["after"]]
    assert drift["acc_after"] == pytest.approx(sum(logic_recall) / len(logic_recall))
    handed = load_quietstar(paths.resolve(result.models["model"]["path"]))
    layers = [m for m in handed.base.modules() if isinstance(m, BitLinear)]
    assert bool(layers) == ternary  # a ternary model stays ternary, a plain one plain
    assert not any("lora" in n for n, _ in handed.base.named_modules())  # the adapters merged
    taught = load_quietstar(paths.resolve(result.models["taught"]["path"]))
    moved = any(not torch.equal(a, b) for a, b in zip(handed.base.state_dict().values(),
                                                      taught.base.state_dict().values()))
    assert moved  # the bakes changed the weights the taught model had


def test_a_prompt_without_effect_is_reported_not_baked(tok, tmp_path):
    _, result = _run("bk-none", _upstream(tok, tmp_path), {"teach_steps": 0, "min_effect": 0.5})

    report = json.loads((paths.resolve(result.artifacts["report"])).read_text())
    assert report["cycles"] == [] and set(report["not_baked"]) == {"calculator", "answer-style"}
    assert "< min_effect 0.5" in report["not_baked"]["calculator"]
    assert not {c.name: c for c in result.gate}["prompts_baked"].passed


@pytest.mark.parametrize("change, message", [
    ({"families": ["arith", "algebrah"]}, r"unknown \['algebrah'\]"),
    ({"prompts": [{"name": "a", "kind": "tool", "text": "x"}, {"name": "a", "kind": "tool", "text": "y"}]},
     "distinct names"),
    ({"bake": {"stepz": 3}}, "stepz"),
    ({"levels": [3, 1]}, "levels"),
    ({"replay": 1.0}, "replay"),
    ({"adherence_margin": 0.0}, "adherence_margin"),
    ({"min_gap_closed": 1.0}, "min_gap_closed"),
    ({"gap_margin": 0.0}, "gap_margin"),
    ({"heldout_per_level": 8}, "heldout_per_level"),  # removed: the held-out inputs follow from gap_margin
    ({"gate_z": 1.645}, "gate_z"),
])
def test_parameter_errors_name_what_is_wrong(change, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Params(**change)


def test_a_pass_that_does_not_raise_the_library_gap_is_undone(tok, tmp_path):
    """Two passes (tool, persona, tool, persona); a plateau bound no pass can meet undoes the second: its cycles
    are reported as not kept and the handed-on model is the one after the first pass (the same answers)."""

    _, result = _run("bk-plateau", _upstream(tok, tmp_path), {"min_effect": 0.0, "max_cycles": 4,
                                                               "plateau_delta": 10.0, "gap_spread": 0.0})
    report = json.loads((paths.resolve(result.artifacts["report"])).read_text())
    # gap_spread 0 asks for 2 held-out inputs first; where the 2 observed spread needs more, more were drawn
    # (max_heldout 10)
    sizes = []
    for row in report["cycles"] + [report["passes"][0]]:
        sizes.append(row["gap"]["n"])
        held = row["heldout"]
        assert 2 <= sizes[-1] <= 10 and len(held["kl_unbaked"]) == len(held["kl_baked"]) == sizes[-1]
    assert max(sizes) > 2
    assert [c["kept"] for c in report["cycles"]] == [True, True, False, False]
    assert [p["kept"] for p in report["passes"]] == [True, False]
    assert result.metrics["cycles"] == 4 and result.metrics["cycles_kept"] == 2
    assert result.metrics["gap_closed_library"] == round(report["passes"][0]["gap_closed_library"], 4)
    first_pass = report["cycles"][1]
    assert report["after"]["accuracy"] == first_pass["accuracy_after"]
    assert report["after"]["adherence"] == first_pass["adherence_after"]


def test_bench_baking_runs_every_arm(tok, tmp_path):
    import yaml

    from forgelib.bench import baking as bench

    ctx, result = _run("bk-bench", _upstream(tok, tmp_path), {"min_effect": 0.0, "max_cycles": 1})
    result.save(ctx.dir)  # what run_phase writes (the tiny model does not pass the smoke gate)
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({"baking": {**TINY, "bake": {**TINY["bake"], "eval_every": 0}}}))
    out = tmp_path / "bench.json"
    assert bench.main(["--phase6", str(ctx.dir), "--params", str(params), "--seeds", "2", "--steps", "2",
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["per_seed"]) == 2 and set(report["summary"]) == {"calculator", "answer-style"}
    for name, row in report["summary"].items():
        assert {"prompted", "unprompted", "kl", "sft", "half", "plain_lora", "kl_minus_sft"} <= set(row)
        assert "gap_closed_unmerged" in row["plain_lora"] and "seconds" in row["kl"]
        seeds = [s[name]["kl"]["gap_closed"] for s in report["per_seed"]]
        assert row["kl"]["gap_closed"]["mean"] == pytest.approx(sum(seeds) / 2, abs=1e-4)  # interval() rounds
