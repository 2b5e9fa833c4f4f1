"""Phase 6 on tiny real models: the gate read from a report, a run end to end on a ternary Quiet-STaR upstream
(models handed on, every metric the issue names, the merged model still ternary and loadable), a prompt without
effect reported and not baked, and parameter errors that name what is wrong."""
import pytest
import torch

from forgelib import paths
from helpers import quietstar_upstream, task_tokenizer
from forgelib.phases.baking import Params, summarize


@pytest.fixture(scope="module")
def tok():
    return task_tokenizer(["use calc: say Answer: "] * 20)


def _measured(acc, tool, persona, correct):
    return {"accuracy": acc, "adherence": {"calculator": tool, "answer-style": persona}, "correct": correct}


def _report():
    library = Params().prompts
    return {"library": library,
            "input": {"none": _measured(0.5, 0.0, 0.0, [1, 0, 1, 0])},
            "taught": {"none": _measured(0.5, 0.0, 0.0, [1, 0, 1, 0]), "all": _measured(0.75, 1.0, 1.0, [1, 1, 1, 0])},
            "after": _measured(0.75, 1.0, 0.9, [1, 1, 1, 0]),
            "cycles": [{"prompt": "calculator", "gap_closed": 0.9, "adherence_after": {"calculator": 1.0,
                                                                                      "answer-style": 0.0}},
                       {"prompt": "answer-style", "gap_closed": 0.7, "adherence_after": {"calculator": 1.0,
                                                                                        "answer-style": 1.0}}],
            "passes": [{"after_cycle": 1, "gap_closed_library": 0.8}],
            "drift": {"kl_per_token": 0.1}}


def test_gate_reads_the_report():
    metrics, checks = summarize(_report(), Params(min_gap_closed=0.6, bake_retention=0.8))
    gate = {c.name: c for c in checks}
    assert metrics["gap_closed_calculator"] == 0.9 and metrics["gap_closed_answer-style"] == 0.7
    assert gate["gap_closed_calculator"].value == 0.9 and gate["gap_closed_calculator"].bound == 0.6
    assert gate["adherence_kept_answer-style"].bound == 0.8  # bake_retention x the adherence right after its bake
    assert metrics["tool_use_rate_before"] == 0.0 and metrics["tool_use_rate_after"] == 1.0
    assert metrics["persona_adherence_before"] == 0.0 and metrics["persona_adherence_after"] == 0.9
    assert metrics["acc_retention"] == 1.5 and metrics["gap_closed_library"] == 0.8
    assert all(c.passed for c in checks)
    # a bake below the bound, an earlier bake lost, accuracy lost beyond margin + z SE: each fails by name
    _, checks = summarize(_report(), Params(min_gap_closed=0.75, bake_retention=0.95))
    failed = {c.name for c in checks if not c.passed}
    assert failed == {"gap_closed_answer-style", "adherence_kept_answer-style"}
    report = _report()
    report["after"] = _measured(0.0, 1.0, 1.0, [0, 0, 0, 0])
    _, checks = summarize(report, Params(min_gap_closed=0.6, gate_z=0.0))  # 4 questions: the SE term alone is 0.47
    assert not {c.name: c for c in checks}["acc_after_minus_before"].passed
    report = _report()
    report["cycles"], report["passes"] = [], []
    _, checks = summarize(report, Params())
    assert [c.name for c in checks if not c.passed] == ["prompts_baked"]


def _upstream(tok, tmp_path, ternary=True):
    """A Phase-5-like upstream: a Quiet-STaR Llama with ternary (BitLinear) layers, fake-quantized latent weights
    (``ternary=False``: a plain Llama-style model)."""
    return quietstar_upstream(tok, tmp_path / "curriculum", "curriculum", 5, "bk", ternary=ternary)


TINY = {"families": ["arith"], "levels": [1, 1], "teach_steps": 60, "teach_batch_size": 8,
        "bake": {"steps": 6, "trajectories": 8, "batch_size": 4, "eval_every": 3},
        "calibration_per_level": 4, "heldout_per_level": 4, "test_per_level": 6, "max_new_tokens": 14,
        "max_cycles": 2, "drift_per_level": 2}


def _run(session, up, extra=None):
    from forgelib.phases import open_phase

    overrides = {"run": {"quiet": True, "tracking": "jsonl"}, "baking": {**TINY, **(extra or {})}}
    ctx = open_phase("baking", "parameters/smoke.yaml", overrides, session=session, upstream=up)
    return ctx, ctx.spec.load().run(ctx.params, ctx)


@pytest.mark.parametrize("ternary", [True, False], ids=["ternary", "llama"])
def test_phase_runs_end_to_end(tok, tmp_path, ternary):
    import json

    from forgelib.quant.bitnet import BitLinear
    from forgelib.thoughts import load_quietstar

    ctx, result = _run(f"bk-run-{ternary}", _upstream(tok, tmp_path, ternary), {"min_effect": 0.0})
    for key in ("gap_closed_calculator", "gap_closed_answer-style", "persona_adherence_before",
                "persona_adherence_after", "tool_use_rate_before", "tool_use_rate_after", "acc_retention", "drift_kl"):
        assert key in result.metrics, key
    assert set(result.models) == {"taught", "model"}
    report = json.loads((ctx.dir / "report.json").read_text())
    assert [c["prompt"] for c in report["cycles"]] == ["calculator", "answer-style"]  # alternating cycles
    curve = report["cycles"][0]["curve"]
    assert [p["step"] for p in curve] == [0, 3, 6] and curve[0]["kl"] == pytest.approx(report["cycles"][0]["kl_unbaked"])
    handed = load_quietstar(paths.resolve(result.models["model"]["path"]))
    layers = [m for m in handed.base.modules() if isinstance(m, BitLinear)]
    assert bool(layers) == ternary  # a ternary model stays ternary, a plain one plain
    assert not any("lora" in n for n, _ in handed.base.named_modules())  # the adapters merged
    taught = load_quietstar(paths.resolve(result.models["taught"]["path"]))
    moved = any(not torch.equal(a, b) for a, b in zip(handed.base.state_dict().values(), taught.base.state_dict().values()))
    assert moved  # the bakes changed the weights the taught model had


def test_a_prompt_without_effect_is_reported_not_baked(tok, tmp_path):
    _, result = _run("bk-none", _upstream(tok, tmp_path), {"teach_steps": 0, "min_effect": 0.5})
    import json

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
])
def test_parameter_errors_name_what_is_wrong(change, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Params(**change)


def test_a_pass_that_does_not_raise_the_library_gap_is_undone(tok, tmp_path):
    """Two passes (tool, persona, tool, persona); a plateau bound no pass can meet undoes the second: its cycles
    are reported as not kept and the handed-on model is the one after the first pass (the same answers)."""
    import json

    _, result = _run("bk-plateau", _upstream(tok, tmp_path), {"min_effect": 0.0, "max_cycles": 4,
                                                               "plateau_delta": 10.0})
    report = json.loads((paths.resolve(result.artifacts["report"])).read_text())
    assert [c["kept"] for c in report["cycles"]] == [True, True, False, False]
    assert [p["kept"] for p in report["passes"]] == [True, False]
    assert result.metrics["cycles"] == 4 and result.metrics["cycles_kept"] == 2
    assert result.metrics["gap_closed_library"] == round(report["passes"][0]["gap_closed_library"], 4)
    first_pass = report["cycles"][1]
    assert report["after"]["accuracy"] == first_pass["accuracy_after"]
    assert report["after"]["adherence"] == first_pass["adherence_after"]


def test_bench_baking_runs_every_arm(tok, tmp_path):
    import json

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
